"""The ddpm-fast command: outputs, resume, info, convert, and one clear line for bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm_fast.cli import main

from .helpers import FIXTURES

FAST = ["--sampler", "ddim", "--steps", "4"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_png_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, _ = run(capsys, "sample", "--num", 5, *FAST, "--out", out)
    assert code == 0 and "wrote 5 images" in stdout
    image = Image.open(out)
    # 3 x 2 cells of 8 x 8 scaled up 8 times, 2 pixels of padding around each
    assert image.size == (3 * 66 + 2, 2 * 66 + 2)


def test_sample_npz_is_uint8_nhwc(tmp_path, capsys):
    out = tmp_path / "samples.npz"
    code, _, _ = run(capsys, "sample", "--num", 3, "--batch-size", 2, *FAST, "--out", out)
    assert code == 0
    array = np.load(out)["arr_0"]
    assert array.dtype == np.uint8 and array.shape == (3, 8, 8, 1)


def test_folder_output_resumes(tmp_path, capsys):
    folder = tmp_path / "pngs"
    argv = ["sample", "--num", 6, "--batch-size", 2, *FAST, "--out", folder]
    assert run(capsys, *argv)[0] == 0
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{i:06d}.png" for i in range(6)] + ["run.json"]
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "000003.png").unlink()
    code, _, err = run(capsys, *argv)
    assert code == 0 and "resuming: 2 of 6 images still to draw" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == first
    code, _, err = run(capsys, *argv)
    assert "nothing to draw" in err


def test_info(capsys):
    code, out, _ = run(capsys, "info", FIXTURES / "trainer.pt")
    assert code == 0
    assert "family:      dd-pytorch-v1" in out
    assert "schedule:    linear, 30 timesteps" in out
    assert "EMA weights" in out


def test_convert_then_sample_without_options(tmp_path, capsys):
    converted = tmp_path / "model.safetensors"
    code, _, _ = run(
        capsys, "convert", FIXTURES / "diffusion_state_dict.pt", converted, "--image-size", 8
    )
    assert code == 0
    code, _, _ = run(capsys, "sample", converted, "--num", 2, *FAST, "--out", tmp_path / "s.png")
    assert code == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "--steps", 5000], "steps must be between 1 and the schedule's 1000"),
        (["sample", "--out", "/nonexistent/dir/x.png"], "cannot write there"),
        (["sample", "nope.pt"], "nope.pt: no such file"),
        (["sample", "--device", "tpu:x"], "unknown device"),
        (["sample", "--eta", 0.5], "--eta applies to --sampler ddim only"),
        (["sample", FIXTURES / "unet_state_dict.pt"], "image size is not stored"),
        (["convert", FIXTURES / "unet_state_dict.pt", "out.pt"], "must be a .safetensors file"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("ddpm-fast: error: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [["sample", "--num", "0"], ["sample", "--sampler", "euler"], ["sample", "--steps", "x"]],
)
def test_argparse_errors_exit_2_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm-fast: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["sample", "--bogus"], ["bench", "default", "--bogus"]])
def test_an_unknown_option_is_one_line_for_bench_and_the_others(capsys, argv):
    """bench's options are parsed by its command (so that parsing imports no torch); an unknown
    option is still one line and exit 2, for bench and every other command."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--bogus" in err and err.startswith("ddpm-fast") and err.count("\n") == 1


def test_parsing_a_command_line_imports_no_torch():
    """`sample --onnx` runs in deployments without torch; where torch is installed, it must not
    pay torch's import (over a second) either: parsing the command line leaves it alone."""
    code = (
        "import sys; from ddpm_fast.cli import parse_arguments;"
        " args = parse_arguments(['sample', '--onnx', 'x.onnx']);"
        " print(args.onnx, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["x.onnx", "False"]


def test_python_dash_m_and_the_console_script(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ddpm_fast", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("ddpm-fast ")
    console_script = Path(sys.executable).parent / "ddpm-fast"  # installed beside the interpreter
    script = subprocess.run(
        [str(console_script), "sample", "--num", "2", *FAST, "--out", str(tmp_path / "s.png")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert script.returncode == 0, script.stderr
    assert (tmp_path / "s.png").exists()


def test_sample_runs_the_engine_unless_told_reference(tmp_path, capsys):
    """The engine's images equal the reference's to within a uint8 step."""
    engine, reference = tmp_path / "engine.npz", tmp_path / "reference.npz"
    assert run(capsys, "sample", "--num", 4, *FAST, "--out", engine)[0] == 0
    assert run(capsys, "sample", "--num", 4, *FAST, "--reference", "--out", reference)[0] == 0
    a = np.load(engine)["arr_0"].astype(int)
    b = np.load(reference)["arr_0"].astype(int)
    assert np.abs(a - b).max() <= 1 and a.std() > 10


def test_engine_options_are_checked(tmp_path, capsys):
    code, _, err = run(
        capsys, "sample", "--reference", "--dtype", "bf16", "--out", tmp_path / "x.png"
    )
    assert code == 2 and "--dtype applies to the engine" in err
    pytest.importorskip("onnxruntime")
    code, _, err = run(capsys, "sample", "--onnx", tmp_path / "m.onnx", "--dtype", "fp16")
    assert code == 2 and "--dtype does not apply to --onnx" in err


def test_bench_writes_its_tables(tmp_path, capsys):
    argv = ["bench", "default", "--steps", 1, "--repeats", 1, "--batch", 2, "--device", "cpu"]
    code, stdout, _ = run(capsys, *argv, "--out", tmp_path, "--name", "b")
    assert code == 0 and "| engine | fp32 | 2 |" in stdout
    assert (tmp_path / "b.md").exists() and (tmp_path / "b.json").exists()
    code, _, err = run(capsys, *argv[:2], "--steps", 0, "--out", tmp_path)
    assert code == 2 and "steps must be at least 1" in err
