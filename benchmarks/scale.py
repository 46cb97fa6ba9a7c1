"""Images per second of `ddpm-fast sample` in 1 process and under torchrun with N processes, in
one run (interleaved rounds, median), each writing the same .npz; the bytes of every run are
checked equal. Writes markdown + JSON under benchmarks/results/.

    python benchmarks/scale.py                          # CPU: 1 and 2 processes, default model
    python benchmarks/scale.py --procs 1 2 --num 256 --batch-size 32 --steps 100
    python benchmarks/scale.py cifar10 --device cuda --procs 1 2 --num 1024 --batch-size 128

MODEL is a checkpoint, "default" (the embedded model) or one of ``ddpm-fast bench``'s named
configurations (cifar10, cifar10-64, cifar10-128: saved to a temporary file first).

On a CPU each process gets cores / N OpenMP threads (OMP_NUM_THREADS), so N processes share the
machine rather than oversubscribing it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def command(procs: int, args: argparse.Namespace, out: Path, checkpoint: str | None) -> list[str]:
    sample = [
        "sample", "--num", str(args.num), "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--sampler", args.sampler, "--out", str(out),
        *(["--device", args.device] if args.device else []),
        *([checkpoint] if checkpoint else []),
    ]  # fmt: skip
    if procs == 1:
        return [sys.executable, "-m", "ddpm_fast", *sample]
    port = str(random.randint(20000, 60000))
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
        "--master-port", port, "-m", "ddpm_fast", "--", *sample,
    ]  # fmt: skip


def run_once(
    procs: int, args: argparse.Namespace, folder: Path, checkpoint: str | None
) -> tuple[float, bytes]:
    out = folder / f"p{procs}.npz"
    out.unlink(missing_ok=True)
    env = dict(os.environ)
    if not args.device or args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // procs))
    start = time.perf_counter()
    subprocess.run(command(procs, args, out, checkpoint), env=env, check=True, capture_output=True)
    return time.perf_counter() - start, out.read_bytes()


def cpu_model() -> str:
    from ddpm_fast.machine import cpu_model

    return cpu_model()


def model_file(model: str, folder: Path) -> str | None:
    """The checkpoint ``ddpm-fast sample`` reads: None for the embedded model; a named
    configuration of the sampler benchmark is saved as a ddpm-fast file first."""
    from ddpm_fast import bench, save_pipeline

    if model == "default":
        return None
    if model in bench.MODELS:
        return str(save_pipeline(bench.model_pipeline(model), folder / f"{model}.safetensors"))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="default", help="default: the embedded model")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default=f"scale-{date.today().isoformat()}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the tables")
    args = parser.parse_args()

    times: dict[int, list[float]] = {p: [] for p in args.procs}
    outputs: dict[int, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = model_file(args.model, Path(tmp))
        for _ in range(args.repeats):  # interleaved, so a change in load hits every count
            for procs in args.procs:
                seconds, data = run_once(procs, args, Path(tmp), checkpoint)
                times[procs].append(seconds)
                outputs.setdefault(procs, data)
    same = len(set(outputs.values())) == 1
    base = statistics.median(times[args.procs[0]])
    rows = []
    for procs in args.procs:
        median = statistics.median(times[procs])
        rows.append({
            "processes": procs,
            "median_s": median,
            "min_s": min(times[procs]),
            "max_s": max(times[procs]),
            "images_per_s": args.num / median,
            "speed_up": base / median,
        })  # fmt: skip
    lines = [
        f"# ddpm-fast sample: 1 vs N processes ({date.today().isoformat()})",
        "",
        f"machine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}",
        f"command: {' '.join(sys.argv)}",
        f"run: {args.num} images, batch {args.batch_size}, {args.sampler} {args.steps} steps, "
        f"device {args.device or 'cpu'}, median of {args.repeats} interleaved rounds "
        "(start-up included)",
        f"same bytes in every run: {'yes' if same else 'NO'}",
        "",
        "| processes | median s (min-max) | images/s | speed-up |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['median_s']:.1f} ({r['min_s']:.1f}-{r['max_s']:.1f}) "
            f"| {r['images_per_s']:.2f} | {r['speed_up']:.2f}x |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{args.name}.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "rows": rows,
                "same_bytes": same,
                "times": times,
            },
            indent=2,
        )
    )
    print("\n".join(lines))
    if not same:
        sys.exit("the outputs differ between process counts")


if __name__ == "__main__":
    main()
