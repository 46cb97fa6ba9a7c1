"""What checking a cached executor file costs at first use, against opening its session.

    python benchmarks/cache_check.py default cifar10 --rounds 5

For each model (a bench model name, 'default' or a checkpoint), exports the engine's executor file
into the cache if it has none (``Engine.sample``), then times, for the file and for its Winograd
form where there is one, alternating round by round: the check the first session of a process
makes before it opens the file (reading the seal, reading the bytes and hashing them:
``table_chain.read_seal`` and ``machine.read_checked``; later sessions of the same process find
the file already checked), and ONNX Runtime's session open. Prints a markdown table with the
medians and the check's share of the open; nothing is written but the cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ddpm_fast.bench import model_pipeline
from ddpm_fast.engine import Engine
from ddpm_fast.engine.table_chain import read_seal
from ddpm_fast.export.onnx_sampler import CPU, open_session
from ddpm_fast.machine import read_checked


def timed(work, *args, **kwargs):
    """(seconds, result) of ``work(*args, **kwargs)``."""
    start = time.perf_counter()
    result = work(*args, **kwargs)
    return time.perf_counter() - start, result


def check(path, key: str, file, sha256: str) -> None:
    """What a process's first session of a file does before it opens: the seal read, the bytes
    read and hashed."""
    read_seal(path, key)
    read_checked(file, sha256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="bench model names, 'default' or checkpoints")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="the sessions' intra-op threads")
    args = parser.parse_args()
    print("| model | file | MB | check ms | session open ms | check / open |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        pipeline = model_pipeline(model)
        engine = Engine(pipeline, cpu_executor="onnxruntime")
        engine.sample(
            1, sampler="ddim", steps=2
        )  # exports the executor file, if the cache has none
        chain = engine.ort_chain(engine.sampler_spec("ddim", 2))
        path = chain.executor_file(tuple(pipeline.image_shape()[1:]))
        key = chain.sessions.key(path)
        seal = read_seal(path, key)
        for name, sha256 in seal["files"].items():
            file = path.with_name(name)
            times = {"check": [], "open": []}
            for _ in range(args.rounds):
                took, _ = timed(check, path, key, file, sha256)
                times["check"].append(took)
                took, _ = timed(open_session, file, [CPU], threads=args.threads)
                times["open"].append(took)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(
                f"| {model} | {file.suffix} | {file.stat().st_size / 1e6:.0f} | {ms['check']:.0f} "
                f"| {ms['open']:.0f} | {ms['check'] / ms['open']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
