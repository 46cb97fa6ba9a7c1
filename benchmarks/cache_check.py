"""What checking a cached executor file costs at first use, against opening its session.

    python benchmarks/cache_check.py default cifar10 --rounds 5

For each model (a bench model name, 'default' or a checkpoint), exports the engine's executor file
into the cache if it has none (``Engine.sample``), then times, for the file and for its Winograd
form where there is one, alternating round by round: the check a session makes before it opens
(reading the seal, reading the bytes once and hashing them: ``table_chain.read_seal`` and
``machine.read_checked``), ONNX Runtime's session open from those bytes, and the open from the path
as before the check. Prints a markdown table with the medians and the check's share of the open;
nothing is written but the cache.
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


def check(path, key: str, file, sha256: str) -> bytes:
    """What a session does before it opens: the seal read, the bytes read once and hashed."""
    read_seal(path, key)
    return read_checked(file, sha256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="bench model names, 'default' or checkpoints")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="the sessions' intra-op threads")
    args = parser.parse_args()
    print(
        "| model | file | MB | check ms | open from bytes ms | open from path ms | check / open |"
    )
    print("|---|---|---|---|---|---|---|")
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
            times = {"check": [], "bytes": [], "path": []}
            for _ in range(args.rounds):
                took, content = timed(check, path, key, file, sha256)
                times["check"].append(took)
                took, _ = timed(open_session, file, [CPU], threads=args.threads, content=content)
                times["bytes"].append(took)
                del content
                took, _ = timed(open_session, file, [CPU], threads=args.threads)
                times["path"].append(took)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(
                f"| {model} | {file.suffix} | {file.stat().st_size / 1e6:.0f} | {ms['check']:.0f} "
                f"| {ms['bytes']:.0f} | {ms['path']:.0f} | {ms['check'] / ms['path']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
