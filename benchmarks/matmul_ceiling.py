"""The machine's float32 matmul ceiling: a large square matmul in NumPy (its BLAS) and in ONNX
Runtime (MLAS), one thread per process, PROCESSES processes at once (as the engine's batch split
runs one thread per core).

    python benchmarks/matmul_ceiling.py --processes 2

Prints each process's GFLOP/s (median of 7 rounds) and the sum: the machine's practical float32
peak, to set a step's FLOPs (``ddpm_fast.flops``) against. A single well-shaped op may come near
it (or, in another library, a little above); a whole step of small ops, norms and softmaxes
stays well below.

Not ``ddpm_fast.bench``'s ``torch_matmul_ceiling``: that one times torch's matmul, in each dtype
the bench runs, on a GPU as on a CPU, in the bench's own process with all of torch's threads, as
the denominator of its GFLOP/s column. This script times the CPU libraries the engine's CPU
executor rests on, one thread per process as its batch split runs them; the two figures differ
by design.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def rate(run, size: int) -> float:
    """GFLOP/s of ``run`` (one size^3 matmul), median of 7 rounds of 10."""
    for _ in range(3):
        run()
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(10):
            run()
        rounds.append(2 * size**3 / ((time.perf_counter() - start) / 10) / 1e9)
    return statistics.median(rounds)


def blas_and_mlas_rates(size: int) -> tuple[float, float]:
    """(NumPy, ONNX Runtime) GFLOP/s on one thread."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    generator = np.random.default_rng(0)
    a, b = (generator.random((size, size), dtype=np.float32) for _ in range(2))
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ABC"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul", values[:2], values[2:]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return rate(lambda: a @ b, size), rate(lambda: session.run(None, {"A": a, "B": b}), size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(*blas_and_mlas_rates(args.size))
        return
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    command = [sys.executable, __file__, "--worker", "--size", str(args.size)]
    workers = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(args.processes)
    ]
    rates = [tuple(map(float, w.communicate()[0].split())) for w in workers]
    if any(w.returncode for w in workers):
        sys.exit("a worker failed")
    print(f"{args.processes} process(es), one thread each, {args.size}^3 float32 matmul, GFLOP/s")
    print("| process | NumPy (BLAS) | ONNX Runtime (MLAS) |\n|---|---|---|")
    for i, (blas, mlas) in enumerate(rates):
        print(f"| {i} | {blas:.1f} | {mlas:.1f} |")
    print(f"| sum | {sum(r[0] for r in rates):.1f} | {sum(r[1] for r in rates):.1f} |")


if __name__ == "__main__":
    main()
