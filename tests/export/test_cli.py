"""ddpm-fast export, verify and sample --onnx: the same images as from the checkpoint, exit codes,
one-line errors."""

import numpy as np
import pytest

from ddpm_fast import save_pipeline
from ddpm_fast.cli import main

from .common import make_pipeline, perturbed
from .test_onnx_sampler import foreign_onnx

CHAIN = ["--sampler", "ddim", "--steps", "4", "--eta", "0.5"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    return save_pipeline(make_pipeline(objective="pred_v", self_condition=True), folder / "m.st")


@pytest.fixture(scope="module")
def step_file(checkpoint):
    path = checkpoint.with_name("step.onnx")
    assert main(["export", str(checkpoint), "--what", "step", *CHAIN, "--out", str(path)]) == 0
    return path


def test_export_prints_the_verification_and_ok(checkpoint, tmp_path, capsys):
    out = tmp_path / "unet.onnx"
    code, stdout, _ = run(capsys, "export", checkpoint, "--out", out, "--steps", 5)
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith(f"{out}: unet fp32; onnxruntime CPUExecutionProvider")
    assert sum(line.startswith("  model_output") for line in lines) == 6
    assert lines[-2].startswith("ok: 6 comparisons, max rel error")
    assert lines[-1].startswith(f"wrote {out} (unet, fp32, opset 17,")
    assert out.is_file() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("out", ["samples.npz", "grid.png"])
def test_sample_onnx_writes_the_checkpoints_images(checkpoint, step_file, tmp_path, capsys, out):
    from_onnx, from_checkpoint = tmp_path / f"onnx-{out}", tmp_path / f"ckpt-{out}"
    argv = ["--num", 5, "--batch-size", 2, "--seed", 4]
    code, stdout, _ = run(capsys, "sample", "--onnx", step_file, *argv, "--out", from_onnx)
    assert code == 0 and f"wrote 5 images to {from_onnx}" in stdout
    assert run(capsys, "sample", checkpoint, *argv, *CHAIN, "--out", from_checkpoint)[0] == 0
    if out.endswith(".npz"):
        a, b = np.load(from_onnx)["arr_0"], np.load(from_checkpoint)["arr_0"]
        assert a.shape == (5, 8, 8, 1) and a.std() > 10
        # 1e-4 in [0, 1] moves a uint8 pixel by at most one step, and rarely
        assert np.abs(a.astype(int) - b).max() <= 1 and (a != b).mean() < 0.01
    else:
        assert from_onnx.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_onnx_folder_resumes(step_file, tmp_path, capsys):
    folder = tmp_path / "pngs"
    argv = ["sample", "--onnx", step_file, "--num", 4, "--batch-size", 2, "--out", folder]
    assert run(capsys, *argv)[0] == 0
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(first) == [f"{i:06d}.png" for i in range(4)] + ["run.json"]
    (folder / "000002.png").unlink()
    code, _, err = run(capsys, *argv)
    assert code == 0 and "resuming: 2 of 4 images still to draw" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == first


def test_verify_an_existing_file(checkpoint, step_file, capsys):
    code, stdout, _ = run(capsys, "verify", step_file, checkpoint)
    assert code == 0
    assert stdout.splitlines()[0].endswith(
        "ddim, 4 steps, eta 0.5; onnxruntime CPUExecutionProvider"
    )
    assert stdout.splitlines()[-1].startswith("ok: 12 comparisons")


def test_verify_fails_with_exit_1_and_no_ok_for_other_weights(checkpoint, step_file, capsys):
    import ddpm_fast

    other = save_pipeline(perturbed(ddpm_fast.load(checkpoint)), step_file.with_name("p.st"))
    code, stdout, _ = run(capsys, "verify", step_file, other)
    assert code == 1
    assert stdout.splitlines()[-1].startswith("FAILED:") and "\nok" not in stdout
    assert "<-- over the tolerance" in stdout


def test_export_that_fails_verification_exits_1_and_writes_nothing(
    checkpoint, tmp_path, capsys, monkeypatch
):
    from ddpm_fast.export import verify

    monkeypatch.setattr(verify, "TOLERANCE", {"fp32": 1e-12, "fp16": 1e-12})
    out = tmp_path / "unet.onnx"
    code, stdout, err = run(capsys, "export", checkpoint, "--steps", 4, "--out", out)
    assert code == 1 and "FAILED" in stdout and "not written" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "--onnx", "{step}", "--steps", "8"], "exported for 4 steps, not 8"),
        (["sample", "--onnx", "{step}", "--sampler", "ddpm"], "not sampler 'ddpm'"),
        (["sample", "--onnx", "{step}", "--image-size", "16"], "--image-size does not apply"),
        (["sample", "{ckpt}", "--onnx", "{step}"], "give a checkpoint or --onnx FILE, not both"),
        (["sample", "--onnx", "{truncated}"], "truncated.onnx: onnxruntime cannot load it"),
        (["sample", "--onnx", "{foreign}"], "without ddpm-fast metadata"),
        (["verify", "{truncated}"], "truncated.onnx: not a readable ONNX file"),
        (["verify", "{foreign}"], "without ddpm-fast metadata"),
        (["verify", "{step}"], "was not exported from embedded default"),
        (["verify", "missing.onnx"], "missing.onnx: no such file"),
        (["export", "{ckpt}", "--sampler", "ddpm", "--eta", "0.3"], "--eta applies to"),
        (["export", "{ckpt}", "--opset", "9"], "opset must be an integer in [14, 20]"),
        (["sample", "--onnx", "{step}", "--device", "cuda"], "'cuda' asked for"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(
    checkpoint, step_file, tmp_path, capsys, monkeypatch, argv, message
):
    monkeypatch.chdir(tmp_path)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(step_file.read_bytes()[:5000])
    names = {
        "step": step_file,
        "ckpt": checkpoint,
        "truncated": truncated,
        "foreign": foreign_onnx(tmp_path / "foreign.onnx"),
    }
    code, _, err = run(capsys, *[a.format(**names) for a in argv])
    assert code == 2
    assert err.startswith("ddpm-fast: error: ") and message in err, err
    assert err.count("\n") == 1
