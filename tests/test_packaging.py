"""The distribution as a user installs it: a wheel built from the tracked files, installed
non-editable into a fresh environment where neither the repository nor an editable finder is on
the path, used from a folder outside the repository; and ``sample --onnx`` in an environment
without torch. kernels/ and export/ install as ddpm_fast.kernels and ddpm_fast.export, never as
top-level names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import ddpm_fast

REPO = Path(__file__).resolve().parents[1]
# Installed with the wheel from the repository's folders (kernels/ and export/ map into ddpm_fast).
PACKAGE_FOLDERS = {
    "ddpm_fast": "ddpm_fast",
    "kernels": "ddpm_fast/kernels",
    "export": "ddpm_fast/export",
}
# What a torch-less deployment lacks: torch and everything that only comes with it.
TORCH_DISTRIBUTIONS = ("torch", "triton", "functorch", "torchgen", "nvidia")
PROBE = (
    "import importlib.util, json, ddpm_fast, ddpm_fast.kernels, ddpm_fast.export, ddpm_fast.engine;"
    "print(json.dumps([ddpm_fast.__file__, ddpm_fast.kernels.__file__, ddpm_fast.export.__file__,"
    " importlib.util.find_spec('kernels') is None, importlib.util.find_spec('export') is None]))"
)


def run(
    argv: list, cwd: Path, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or os.environ).items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def source_files() -> list[str]:
    """The files a clean clone has: tracked and untracked-but-not-ignored (no build/ leftovers)."""
    if shutil.which("git") and (REPO / ".git").exists():
        out = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], REPO).stdout
        return [name for name in out.split("\0") if name and (REPO / name).is_file()]
    skip = {".venv", "build", "dist", ".git", "__pycache__"}
    return [
        str(p.relative_to(REPO))
        for p in REPO.rglob("*")
        if p.is_file() and not skip & set(p.relative_to(REPO).parts)
    ]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", source, "--no-deps"]
    run([*pip_wheel, "--no-build-isolation", "--no-index", "-q", "-w", out], source)
    (path,) = out.glob("ddpm_fast-*.whl")
    return path


def fresh_environment(root: Path, wheel: Path, *, torch: bool) -> Path:
    """A new venv with the wheel installed (not editable) and the test environment's other
    packages visible through a .pth file: symlinks to each of them, less ddpm-fast and its
    editable finder, and less torch where ``torch`` is False. Returns the venv's bin folder."""
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], root)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index"]
    run([*pip, "-q", wheel], root)
    deps = root / "deps"
    deps.mkdir()
    skipped = ("ddpm_fast", "ddpm-fast", "__editable__", *(() if torch else TORCH_DISTRIBUTIONS))
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(skipped) and not entry.name.endswith(".pth"):
            (deps / entry.name).symlink_to(entry)
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root)
    (Path(site.stdout.strip()) / "test_deps.pth").write_text(f"{deps}\n")
    return venv / "bin"


def test_every_package_folder_is_in_the_wheel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, installed in PACKAGE_FOLDERS.items():
        for module in (REPO / folder).rglob("*.py"):
            relative = module.relative_to(REPO / folder).as_posix()
            assert f"{installed}/{relative}" in names, f"{folder}/{relative} is not in the wheel"
    assert "ddpm_fast/assets/default.safetensors" in names  # the embedded default model
    assert any(n.endswith("/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    assert not [n for n in names if n.startswith(("kernels/", "export/", "tests/"))]


def test_the_installed_wheel_runs_from_outside_the_repository(wheel, tmp_path):
    bin_dir = fresh_environment(tmp_path, wheel, torch=True)
    outside = tmp_path / "work"
    outside.mkdir()
    files = json.loads(run([bin_dir / "python", "-c", PROBE], outside).stdout)
    package, kernels, export, no_kernels, no_export = files
    for path in (package, kernels, export):
        assert Path(path).is_relative_to(bin_dir.parent) and not Path(path).is_relative_to(REPO)
    assert no_kernels and no_export
    argv = ["sample", "--num", 2, "--steps", 10, "--sampler", "ddim", "--out", "x.png"]
    run([bin_dir / "ddpm-fast", *argv], outside)
    assert (outside / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = run([bin_dir / "ddpm-fast", "info"], outside).stdout
    assert "family:      dd-pytorch-v1" in info and "embedded default" in info


def test_the_installed_wheel_starts_warm(wheel, tmp_path):
    """The second sample of the same chain runs on ONNX Runtime from the cache, without torch
    (``ddpm_fast.warm_start``), and writes the same bytes."""
    pytest.importorskip("onnxruntime")
    bin_dir = fresh_environment(tmp_path, wheel, torch=True)
    outside = tmp_path / "work"
    outside.mkdir()
    env = {**os.environ, "DDPM_FAST_CPU_EXECUTOR": "auto", "DDPM_FAST_CACHE_DIR": str(tmp_path)}
    argv = ["sample", "--num", 3, "--steps", 5, "--sampler", "ddim"]
    run([bin_dir / "ddpm-fast", *argv, "--out", "full.npz"], outside, env=env)
    code = (
        "import sys; from ddpm_fast.cli import main; "
        f"main({[str(a) for a in argv] + ['--out', 'warm.npz']!r}); print('torch' in sys.modules)"
    )
    warm = run([bin_dir / "python", "-c", code], outside, env=env).stdout.splitlines()[-1]
    assert warm == "False"
    assert (outside / "warm.npz").read_bytes() == (outside / "full.npz").read_bytes()


def test_sample_onnx_runs_without_torch(wheel, tmp_path):
    pytest.importorskip("onnxruntime")
    from ddpm_fast.export import export_onnx

    step = tmp_path / "step.onnx"
    export_onnx(ddpm_fast.load(), step, what="step", sampler="ddim", steps=5)
    bin_dir = fresh_environment(tmp_path, wheel, torch=False)
    outside = tmp_path / "work"
    outside.mkdir()
    assert run([bin_dir / "python", "-c", "import torch"], outside, check=False).returncode != 0
    run([bin_dir / "ddpm-fast", "sample", "--onnx", step, "--num", 3, "--out", "x.npz"], outside)
    assert (outside / "x.npz").exists()
    run([bin_dir / "ddpm-fast", "sample", "--onnx", step, "--num", 2, "--out", "pngs"], outside)
    assert (outside / "pngs" / "000001.png").exists()
    refused = run([bin_dir / "ddpm-fast", "sample", "--out", "y.png"], outside, check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "needs PyTorch, which is not installed" in refused.stderr


def test_editable_install_maps_to_the_repository_folders(tmp_path):
    if not Path(ddpm_fast.__file__).resolve().is_relative_to(REPO):
        pytest.skip("ddpm_fast is not installed editable from this checkout")
    probe = run([sys.executable, "-c", PROBE], tmp_path).stdout
    _, kernels, export, no_kernels, no_export = json.loads(probe)
    assert Path(kernels).resolve() == REPO / "kernels" / "__init__.py"
    assert Path(export).resolve() == REPO / "export" / "__init__.py"
    assert no_kernels and no_export
