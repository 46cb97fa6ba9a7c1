"""Two or more backends' sampling chains, interleaved in one process: the ratio that drift cannot
fake. ``ddpm-fast bench`` times a cell's repeats one after another, backend after backend, so on a
shared machine whose speed wanders by 10-20% over a minute a slow spell can land on one backend
only. Here every round runs one chain of each backend in turn (the order rotating each round), and
the report gives each round's ratio to the first backend and their median.

    python benchmarks/interleaved.py cifar10 --batch 1 --steps 100 --rounds 7
    python benchmarks/interleaved.py default --batch 1 16 --backends engine onnxruntime

The backends are ``ddpm-fast bench``'s (``ddpm_fast.bench.make_backend``); each is warmed up by one
chain first. Figures go to stdout as a markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from ddpm_fast.bench import BACKENDS, make_backend, model_pipeline, timed_chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a bench model name, 'default' or a checkpoint")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument(
        "--backends", nargs="+", default=["engine", "onnxruntime"], choices=BACKENDS
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sampler", default="ddpm")
    args = parser.parse_args()
    pipeline = model_pipeline(args.model)
    first = args.backends[0]
    print(f"| batch | {' | '.join(f'{b} ms/step' for b in args.backends)} | ratios to {first} |")
    print(f"|---|{'---|' * len(args.backends)}---|")
    with tempfile.TemporaryDirectory(prefix="ddpm-fast-interleaved-") as workdir:
        for batch in args.batch:
            samplers = {
                name: make_backend(name, pipeline, "fp32", "cpu", Path(workdir))
                for name in args.backends
            }
            for sampler in samplers.values():  # warm-up: sessions, exports, plans
                timed_chain(sampler, batch, args.steps, "cpu", 0, args.sampler)
            ms = {name: [] for name in samplers}
            for r in range(args.rounds):
                names = list(samplers)
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    seconds = timed_chain(
                        samplers[name], batch, args.steps, "cpu", r + 1, args.sampler
                    )
                    ms[name].append(seconds * 1e3 / args.steps)
            medians = [f"{statistics.median(ms[name]):.2f}" for name in samplers]
            ratios = []
            for name in list(samplers)[1:]:
                per_round = [
                    theirs / ours for ours, theirs in zip(ms[first], ms[name], strict=True)
                ]
                spread = f"{min(per_round):.2f}-{max(per_round):.2f}"
                ratios.append(f"{name} {statistics.median(per_round):.2f}x ({spread})")
            print(f"| {batch} | {' | '.join(medians)} | {'; '.join(ratios)} |", flush=True)


if __name__ == "__main__":
    main()
