"""A PNG of ms per step against batch size, one line per backend and dtype, from the JSON reports
of the sampler benchmark (matplotlib needed: ``pip install 'ddpm-fast[plot]'``).

    python benchmarks/plot.py benchmarks/results/sampler-cpu-*.json \
        --out benchmarks/results/sampler-cpu.png
"""

import argparse
from pathlib import Path

from ddpm_fast import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="JSON files of the sampler benchmark")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    bench.plot(args.reports, args.out)
