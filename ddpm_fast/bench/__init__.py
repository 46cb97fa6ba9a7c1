"""The sampler benchmark behind ``ddpm-fast bench`` and ``benchmarks/sampler.py``: whole sampling
chains, every backend side by side in one process, with the machine's ceiling beside them.

Each measurement samples ``batch`` images with a ``steps``-step DDPM chain through the backend's
``sample`` (noise, the update and the copy back included). A cell is one (batch, dtype, backend):
its first call is the warm-up (engine preparation, graph capture, compilation, ONNX session) and is
reported apart, then ``repeats`` calls are timed. Cells run one after another, batch by batch, the
engine first, then the reference, then the other backends (``cells``), and the report is saved after
every cell, so a run cut short keeps all it finished. Per cell: median ms per step and its spread
(min-max), the chain's time and images/s, the warm-up (first call less one chain), peak memory
(CUDA's allocations on a GPU, the process's resident set on the CPU), the ratio to the reference's
median at that batch, and the floor: FLOPs of one network forward (``torch.utils.flop_counter``,
counted on the meta device), the bytes its weights alone take to read, and the FLOP/s achieved
against a large torch matmul timed in the same run (``torch_matmul_ceiling``: the machine's
practical ceiling). Every fp32 cell runs with cuDNN's TF32 off, as the engine runs
(``precision_flags``), so that all fp32 rows compute the same thing; ``cudnn_tf32`` records it.
``--under-load N`` times every cell again with N busy processes beside it (``BusyProcesses``), and
the report adds the loaded/quiet ratios; on the CPU it also says how each backend used the cores. A
report never overwrites an earlier one of the same day (``unused_name``).

A "backend" here is a bench backend, one way to sample a chain and one row of the report; not the
kernels' dispatch (``backend="triton"``), ``Pipeline.backend`` or torch.distributed's backend.

One job a module:

- ``models``: the model zoo (``MODELS``, ``model_pipeline``): seeded random networks, "default"
  (the embedded model) or a checkpoint;
- ``backends``: reference, torch.compile, the engine, ONNX Runtime (``make_backend``);
  ``diffusers_backend``: diffusers' DDPMPipeline and the schedule's translation into its
  DDPMScheduler (the ``bench`` extra);
- ``measure``: a chain's time, one forward's FLOPs, peak memory, busy processes, the matmul
  ceiling;
- ``report``: the machine, the markdown and JSON, the results files' names, the plot;
- ``cli``: the options and the run loop (``add_arguments``, ``main``, ``run``, ``cells``).
"""

from .backends import BACKENDS, make_backend
from .cli import add_arguments, main
from .measure import timed_chain
from .models import MODELS, model_pipeline
from .report import plot

__all__ = [
    "BACKENDS",
    "MODELS",
    "add_arguments",
    "main",
    "make_backend",
    "model_pipeline",
    "plot",
    "timed_chain",
]
