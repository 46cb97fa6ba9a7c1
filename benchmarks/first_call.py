"""The first call of a new engine in a fresh process, its files cached: the seconds from
``Engine(...)`` to the end of a one-step chain (opening, and where the cache asks, checking the
executor file and its sessions). Start-up (imports, building the model) is not counted.

    python benchmarks/first_call.py cifar10 --batch 1     # run twice: the first run exports

Run it alternately with another checkout's interpreter to compare two versions on one machine.
"""

from __future__ import annotations

import argparse
import time

from ddpm_fast.bench import model_pipeline
from ddpm_fast.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a bench model name, 'default' or a checkpoint")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    pipeline = model_pipeline(args.model)
    start = time.perf_counter()
    Engine(pipeline, cpu_executor="onnxruntime").sample(args.batch, steps=1, seed=0)
    print(f"{time.perf_counter() - start:.2f}")


if __name__ == "__main__":
    main()
