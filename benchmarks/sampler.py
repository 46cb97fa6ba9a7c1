"""The sampler benchmark (``ddpm_fast.bench``; the same as ``ddpm-fast bench``): every backend
side by side in one process, written as markdown and JSON.

    python benchmarks/sampler.py                      # CPU: reference vs engine, batch 1 and 16
    python benchmarks/sampler.py --backends reference engine onnxruntime --batch 1 4 16
    python benchmarks/sampler.py --device cuda --batch 1 64 --steps 1000 --dtype fp32 bf16 \\
        --backends reference compile-reduce-overhead compile-max-autotune engine

See ``ddpm_fast/bench/`` (its ``__init__``) for what is measured and how.
"""

import argparse
import sys

from ddpm_fast import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_arguments(parser)
    try:
        bench.main(parser.parse_args())
    except KeyboardInterrupt:  # a time limit's SIGINT (gpu_suite.sh): every finished cell is saved
        print("interrupted: the report holds every cell measured before", file=sys.stderr)
        sys.exit(130)
