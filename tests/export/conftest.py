"""The ONNX tests need onnx and onnxruntime (the ``onnx`` extra; ``scripts/install.sh dev`` brings
them). Where they are missing the tests are left out with a note, except on CI, where that is an
error: CI must run them."""

import importlib.util
import os

MISSING = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
if MISSING and os.environ.get("CI"):
    raise ImportError(
        f"{', '.join(MISSING)} not installed: CI must run the ONNX tests (scripts/install.sh dev)"
    )
collect_ignore_glob = ["test_*.py"] if MISSING else []


def pytest_report_header(config):
    if MISSING:
        return f"tests/export left out: {', '.join(MISSING)} not installed (pip install '.[onnx]')"
    return None
