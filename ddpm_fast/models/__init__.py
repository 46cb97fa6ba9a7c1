"""Reference networks, one module per family of checkpoints."""

from . import dd_pytorch_v1

FAMILIES = {dd_pytorch_v1.FAMILY: dd_pytorch_v1}

__all__ = ["FAMILIES", "dd_pytorch_v1"]
