"""A package's names imported on first use (PEP 562), so that its torch-free modules (ONNX
Runtime sampling, the CLI's warm start) import without torch."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_getattr(package: str, names: dict[str, str]) -> Callable[[str], object]:
    """The module ``__getattr__`` of ``package``: each of ``names`` (name -> submodule) is
    imported from its submodule on first access and kept as the package's attribute."""

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
