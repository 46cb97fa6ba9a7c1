"""The engine's CPU executor file with and without its Winograd convolutions, interleaved in
one process.

    python benchmarks/winograd_step.py cifar10 --batch 1 2 8 --rounds 7
    python benchmarks/winograd_step.py cifar10 --batch 2 8 --parts 2   # the split of 4 and 16

Exports the engine's executor file for the model (or finds it in the cache) with its Winograd form
(``ddpm_fast.engine.winograd``), then times a session of each on one thread, as each part of the
engine's batch split runs (``--parts``: that many side by side, as the split runs them),
alternating round by round on the same inputs (the first step of a
2-step DDIM chain from random x_T), and says how far apart their outputs are. Figures go to
stdout as a markdown table; nothing is written but the cache.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

from ddpm_fast.bench import model_pipeline
from ddpm_fast.engine import Engine, winograd
from ddpm_fast.export.onnx_sampler import CPU, open_session


def step_feeds(chain, batch: int, image_shape) -> dict:
    """The first step's inputs of ``chain`` (an ``OrtChain``) for ``batch`` random images."""
    generator = np.random.default_rng(0)
    x, z = (generator.standard_normal((batch, *image_shape), dtype=np.float32) for _ in range(2))
    return chain.chain.feeds(x, np.zeros_like(x), z, 0)


def run_side_by_side(sessions: list, feeds: dict, repeats: int) -> float:
    """Seconds per step of ``sessions`` each running ``repeats`` steps at once, one per thread
    (ONNX Runtime releases the interpreter lock), as the engine's batch split runs its parts."""

    def steps(session):
        for _ in range(repeats):
            session.run(None, feeds)

    workers = [threading.Thread(target=steps, args=(s,)) for s in sessions]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a bench model name, 'default' or a checkpoint")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--parts", type=int, default=1, help="sessions side by side")
    parser.add_argument("--seconds", type=float, default=1.0, help="per session and round")
    args = parser.parse_args()
    pipeline = model_pipeline(args.model)
    engine = Engine(pipeline, cpu_executor="onnxruntime")
    engine.sample(1, sampler="ddim", steps=2)  # exports the executor file, if the cache has none
    spec = engine.sampler_spec("ddim", 2)
    chain = engine.ort_chain(spec)
    path = chain.executor_file(tuple(pipeline.image_shape()[1:]))
    variant = winograd.variant_path(path)
    if not variant.is_file():
        print(f"{path.name}: no convolution of this model is worth the Winograd form")
        return
    print(f"`{path.name}`, {winograd.rewritten(variant)} convolutions rewritten\n")
    print(f"{args.parts} session(s) side by side, one thread each\n")
    print("| batch | direct ms/step | Winograd ms/step | speedup per round | max rel. difference |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        forms = [
            [open_session(path, [CPU], threads=1, batch=batch) for _ in range(args.parts)],
            [open_session(variant, [CPU], threads=1, batch=batch) for _ in range(args.parts)],
        ]
        feeds = step_feeds(chain, batch, pipeline.image_shape())
        outputs = [form[0].run(None, feeds) for form in forms]
        difference = max(
            float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(*outputs, strict=True)
        )
        repeats = max(1, round(args.seconds / run_side_by_side(forms[0], feeds, 1)))
        ms = [[], []]
        for r in range(args.rounds):
            for i in (r % 2, 1 - r % 2):
                ms[i].append(run_side_by_side(forms[i], feeds, repeats) * 1e3)
        per_round = [d / w for d, w in zip(*ms, strict=True)]
        print(
            f"| {batch} | {statistics.median(ms[0]):.2f} | {statistics.median(ms[1]):.2f} "
            f"| {statistics.median(per_round):.3f}x ({min(per_round):.2f}-{max(per_round):.2f}) "
            f"| {difference:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
