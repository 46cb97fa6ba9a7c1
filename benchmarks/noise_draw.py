"""One noise draw (``keyed_noise_steps``) now against an older revision's, interleaved in one
process: the NumPy front-end (the warm start's and the ONNX Runtime chains' hot loop) and torch's.

    python benchmarks/noise_draw.py --against 2e89330 --rounds 15

Each round times every (shape, version) in turn, the order of the versions alternating, so a slow
spell of a shared machine lands on both; the table gives each version's median time per draw and
the median of the rounds' new/old ratios. The old modules are read with ``git show`` and run with
today's ``ddpm_fast.errors``. Figures go to stdout; nothing is written.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import subprocess
import time
import types

from ddpm_fast import noise
from ddpm_fast.export import philox

# (batch, steps per draw, image shape): the digits model's warm start and blocks, a CIFAR-10 block,
# a large batch's single step.
SHAPES = [(1, 50, (1, 8, 8)), (16, 50, (1, 8, 8)), (1, 50, (3, 32, 32)), (64, 1, (3, 32, 32))]


def old_module(revision: str, path: str, name: str) -> types.ModuleType:
    """``path`` as it was at ``revision``, its relative imports made absolute."""
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    source = source.replace("from ..errors import", "from ddpm_fast.errors import")
    source = source.replace("from .errors import", "from ddpm_fast.errors import")
    module = types.ModuleType(name)
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def per_draw(draw, repeats: int) -> float:
    """Seconds per call of ``draw``, best of three runs of ``repeats``."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            draw()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD", help="the old revision")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    versions = {
        "numpy": (philox, old_module(args.against, "export/philox.py", "old_philox")),
        "torch": (noise, old_module(args.against, "ddpm_fast/noise.py", "old_noise")),
    }
    print("| front-end | batch x steps x shape | old ms | new ms | new/old (median of rounds) |")
    print("|---|---|---|---|---|")
    for front, (new, old) in versions.items():
        for batch, steps, shape in SHAPES:
            values = batch * steps * math.prod(shape)
            repeats = max(3, min(200, 2_000_000 // values))
            draws = {
                which: functools.partial(m.keyed_noise_steps, 7, range(batch), 1, steps, shape)
                for which, m in (("old", old), ("new", new))
            }
            for draw in draws.values():
                draw()  # warm-up
            times = {"old": [], "new": []}
            for r in range(args.rounds):
                order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
                for which in order:
                    times[which].append(per_draw(draws[which], repeats))
            pairs = zip(times["new"], times["old"], strict=True)
            ratio = statistics.median(n / o for n, o in pairs)
            old_ms, new_ms = (statistics.median(times[w]) * 1e3 for w in ("old", "new"))
            label = f"{batch} x {steps} x {'x'.join(map(str, shape))}"
            print(f"| {front} | {label} | {old_ms:.3f} | {new_ms:.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
