"""gpu_suite.sh's preflight, in one process: every import the suite needs, that they come from this
checkout, the versions (printed for machine.txt), and on CUDA that torch sees a GPU and that Triton
compiles and runs a kernel on it. A missing piece exits with one line on stderr.

    python benchmarks/gpu_preflight.py cuda|cpu

A file, not a heredoc: ``@triton.jit`` reads its function's source, which code from stdin has
not. On the CPU (the suite's dry run) the kernel runs under the Triton interpreter.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
from pathlib import Path

NEEDED = (
    "torch",
    "triton",
    "numpy",
    "einops",
    "safetensors",
    "tqdm",
    "PIL",
    "pytest",
    "pytest_benchmark",
    "ddpm_fast",
    "ddpm_fast.kernels",
    "ddpm_fast.export",
    "ddpm_fast.engine",
    "ddpm_fast.bench",
)
CHECKOUT = Path(__file__).resolve().parent.parent


def version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception:  # absent, or broken as it loads
        return "absent"


def check_imports() -> None:
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except Exception as error:  # an ImportError, or a library that fails as it loads
            message = (str(error).splitlines() or [""])[0][:120]
            missing.append(f"{name} ({type(error).__name__}: {message})")
    if missing:
        sys.exit("cannot import " + "; ".join(missing))
    for name, folder in (
        ("ddpm_fast", "ddpm_fast"),
        ("ddpm_fast.kernels", "kernels"),
        ("ddpm_fast.export", "export"),
    ):
        where = Path(os.path.realpath(sys.modules[name].__file__)).parent
        if where != CHECKOUT / folder:
            sys.exit(f"{name} imports from {where}, not from this checkout's {folder}/")


def run_a_kernel(device: str) -> None:
    """Define, compile (or interpret) and run one Triton kernel: the toolchain end to end."""
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel below is defined
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    x = torch.zeros(1000, device=device)
    try:
        add_one[(4,)](x, x.numel(), BLOCK=256)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as error:
        message = (str(error).splitlines() or [""])[0][:200]
        sys.exit(f"Triton cannot compile and run a kernel: {type(error).__name__}: {message}")
    if not bool((x == 1).all()):
        sys.exit("a Triton kernel ran but computed a wrong result")


def main(device: str) -> None:
    check_imports()
    import numpy
    import torch
    import triton

    print(
        f"python: {platform.python_version()} | torch: {torch.__version__} | cuda: "
        f"{torch.version.cuda} | triton: {triton.__version__} | numpy: {numpy.__version__} | "
        f"onnx: {version('onnx')} | onnxruntime: {version('onnxruntime')}"
    )
    if importlib.util.find_spec("setuptools") is None:  # torch.utils.cpp_extension imports it
        print("warning: no setuptools: torch.compile (Inductor) may fail in the compile stages")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
    run_a_kernel(device)
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        print(
            f"device: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
            f"{p.multi_processor_count} SMs, {torch.cuda.device_count()} visible"
        )
    else:
        print("device: cpu (DDPM_FAST_SUITE_DEVICE=cpu: a dry run of the control flow, no timings)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
