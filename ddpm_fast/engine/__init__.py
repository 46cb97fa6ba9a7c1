"""The fast path: ``Engine(pipeline, dtype="fp32", cuda_graph=None)`` samples like the pipeline.

See :mod:`ddpm_fast.engine.engine` for the chain, :mod:`ddpm_fast.engine.network` for the
network's transformations and :mod:`ddpm_fast.engine.graph` for the CUDA graphs.
"""

from .engine import DTYPES, Engine
from .network import FastUnet

__all__ = ["DTYPES", "Engine", "FastUnet"]
