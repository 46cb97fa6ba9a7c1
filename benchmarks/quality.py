"""The digits quality table of the README: ``ddpm-fast quality``'s figures for each chain of
``CHAINS`` on the embedded default model (256 images, seed 0, the reference path), with a PNG
grid of the first 64 images of each, written to benchmarks/results/quality/.

    python benchmarks/quality.py [--num 256] [--out benchmarks/results/quality]

Not a timing: the figures are the classifier's (see ddpm_fast.quality), the same on any machine
up to float rounding.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

import ddpm_fast
from ddpm_fast.images import save_grid, to_uint8
from ddpm_fast.quality import real_digits_report, score_digits
from ddpm_fast.version import __version__

CHAINS = [
    ("DDPM", dict(sampler="ddpm", steps=1000)),
    ("DDIM", dict(sampler="ddim", steps=50)),
    ("DDIM", dict(sampler="ddim", steps=20)),
    ("DDIM", dict(sampler="ddim", steps=10)),
    ("DPM-Solver++(2M)", dict(sampler="dpm++2m", steps=20)),
    ("DPM-Solver++(2M)", dict(sampler="dpm++2m", steps=10)),
]
GRID_IMAGES = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/quality")
    parser.add_argument(
        "--only", nargs="+", metavar="SAMPLER-STEPS", help="these chains only, e.g. dpm++2m-20"
    )
    args = parser.parse_args()
    chains = CHAINS
    if args.only:
        chains = [c for c in CHAINS if f"{c[1]['sampler']}-{c[1]['steps']}" in args.only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = ddpm_fast.load()
    rows = []
    for label, chain in chains:
        images = pipeline.sample(args.num, batch_size=args.num, seed=0, **chain)
        report = score_digits(images)
        grid = f"{chain['sampler']}-{chain['steps']}.png"
        save_grid(to_uint8(images[:GRID_IMAGES].numpy()), out / grid)
        rows.append((label, chain["steps"], report, grid))
        print(f"{label} {chain['steps']}: {report}", flush=True)
    real = real_digits_report()
    lines = [
        f"# Digits quality, {datetime.date.today()}",
        "",
        f"- ddpm-fast {__version__}, torch {torch.__version__}, python {platform.python_version()}",
        f"- model: the embedded default; {args.num} images, seed 0, reference path",
        f"- command: `python {' '.join(sys.argv)}`",
        "",
        "| sampler | steps | mean top-class probability | smallest class share | grid |",
        "|---|---:|---:|---:|---|",
    ]
    for label, steps, report, grid in rows:
        lines.append(
            f"| {label} | {steps} | {report.mean_top_probability:.3f} | "
            f"{report.min_class_share:.1%} | [{grid}]({grid}) |"
        )
    lines.append(
        f"| real digits (held out) | | {real.mean_top_probability:.3f} | "
        f"{real.min_class_share:.1%} | |"
    )
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
