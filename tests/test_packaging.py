"""The distribution: kernels/ and export/ install as ddpm_fast.kernels and ddpm_fast.export, in a
wheel and in an editable install, and never as top-level names."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ddpm_fast

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, json, ddpm_fast.kernels, ddpm_fast.export;"
    "print(json.dumps([ddpm_fast.kernels.__file__, ddpm_fast.export.__file__,"
    " importlib.util.find_spec('kernels') is None, importlib.util.find_spec('export') is None]))"
)


def probe(cwd: Path, env: dict | None = None) -> list:
    import json

    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("ddpm_fast-*.whl")
    return path


def test_wheel_maps_the_top_level_folders_into_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "ddpm_fast/kernels/__init__.py" in names
    assert "ddpm_fast/export/__init__.py" in names
    assert "ddpm_fast/models/dd_pytorch_v1.py" in names
    assert "ddpm_fast/engine/__init__.py" in names  # the fast path, a subpackage of its own
    assert "ddpm_fast/assets/default.safetensors" in names  # the embedded default model
    assert not [n for n in names if n.startswith(("kernels/", "export/", "tests/"))]


def test_installed_wheel_imports(wheel, tmp_path):
    import os

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    kernels, export, no_kernels, no_export = probe(tmp_path, env)
    assert Path(kernels).is_relative_to(target) and Path(export).is_relative_to(target)
    assert no_kernels and no_export


def test_editable_install_maps_to_the_repository_folders(tmp_path):
    if not Path(ddpm_fast.__file__).resolve().is_relative_to(REPO):
        pytest.skip("ddpm_fast is not installed editable from this checkout")
    kernels, export, no_kernels, no_export = probe(tmp_path)
    assert Path(kernels).resolve() == REPO / "kernels" / "__init__.py"
    assert Path(export).resolve() == REPO / "export" / "__init__.py"
    assert no_kernels and no_export
