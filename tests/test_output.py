"""Where samples go: refusal of mixed runs in a folder, writability checked before sampling,
write failures as one clear error that keeps what was written, nothing non-finite written."""

import errno
import json
import os

import numpy as np
import pytest
import torch

from ddpm_fast.cli import main
from ddpm_fast.pipeline import Pipeline

from .helpers import FIXTURES

FAST = ["--sampler", "ddim", "--steps", "3"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, message: str) -> None:
    """stderr holds one error line, beside the progress bar's redrawn lines ("\r")."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line and not line.startswith("sampling")]
    assert len(lines) == 1 and lines[0].startswith("ddpm-fast: error: "), err
    assert message in lines[0], err


def pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def contents(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def folder_run(tmp_path, capsys):
    """A folder holding a finished run of 4 images, and its argv."""
    folder = tmp_path / "pngs"
    argv = ["sample", "--num", 4, "--batch-size", 2, *FAST, "--out", folder]
    assert run(capsys, *argv)[0] == 0
    return folder, argv


@pytest.mark.parametrize(
    ("change", "differs"),
    [
        (["--seed", 1], "seed: before 0, now 1"),
        (["--sampler", "ddpm"], 'sampler: before "ddim", now "ddpm"'),
        (["--steps", 4], "steps: before 3, now 4"),
        (["--eta", 0.5], "eta: before 0.0, now 0.5"),
        (["--reference"], 'backend: before "engine", now "reference"'),
        ([FIXTURES / "trainer.pt", "--image-size", 8], "model."),
        (["--objective", "pred_x0"], "model.diffusion.objective"),
    ],
)
def test_a_folder_refuses_another_run(folder_run, capsys, change, differs):
    folder, argv = folder_run
    before = contents(folder)
    (folder / "000003.png").unlink()  # something to resume: still refused
    code, _, err = run(capsys, *argv[:1], *argv[1:], *change)
    assert code == 2
    one_error_line(err, "holds another run")
    assert differs in err
    assert contents(folder) == {k: v for k, v in before.items() if k != "000003.png"}


def test_the_same_run_resumes_and_more_images_extend_it(folder_run, capsys):
    folder, argv = folder_run
    before = contents(folder)
    (folder / "000001.png").unlink()
    assert run(capsys, *argv)[0] == 0
    assert contents(folder) == before
    more = [a if a != 4 else 6 for a in argv]
    assert run(capsys, *more)[0] == 0
    assert pngs(folder) == [f"{i:06d}.png" for i in range(6)]


def test_a_folder_of_images_without_a_manifest_is_refused(folder_run, capsys):
    folder, argv = folder_run
    (folder / "run.json").unlink()
    code, _, err = run(capsys, *argv)
    assert code == 2
    one_error_line(err, "holds images but no run.json")


def test_a_corrupt_manifest_is_refused(folder_run, capsys):
    folder, argv = folder_run
    (folder / "run.json").write_text("{half")
    code, _, err = run(capsys, *argv)
    assert code == 2
    one_error_line(err, "run.json: unreadable")
    (folder / "run.json").write_text(json.dumps([1, 2]))
    code, _, err = run(capsys, *argv)
    one_error_line(err, "not a ddpm-fast run manifest")


def never_sample(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("sampled although the output could not be written")

    monkeypatch.setattr(Pipeline, "sample_batches", fail)


@pytest.mark.parametrize("name", ["x.png", "x.npz", "pngs"])
def test_a_read_only_target_is_refused_before_sampling(tmp_path, capsys, monkeypatch, name):
    """Tried by creating a file (root ignores permission bits; a read-only file system only
    shows on a write): here mkstemp fails as on a read-only mount."""
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    never_sample(monkeypatch)
    code, _, err = run(capsys, "sample", "--num", 2, *FAST, "--out", tmp_path / name)
    assert code == 2
    one_error_line(err, "Read-only file system")
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("afile/x.png", "is not a folder"),
        ("afile/x.npz", "is not a folder"),
        ("afile/sub", "is not a folder"),
        ("afile", "exists and is not a folder"),
        ("missing/x.png", "is not a folder"),
        ("adir.png", "is a folder"),
    ],
)
def test_impossible_targets_are_refused_before_sampling(
    tmp_path, capsys, monkeypatch, out, message
):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir.png").mkdir()
    never_sample(monkeypatch)
    code, _, err = run(capsys, "sample", "--num", 2, *FAST, "--out", tmp_path / out)
    assert code == 2
    one_error_line(err, message)


def disk_full_after(monkeypatch, writes: int) -> None:
    """Every file ddpm-fast writes is flushed with fsync before its rename: after ``writes``
    of them, fsync fails as on a full disk (ENOSPC), with the temporary file half written."""
    import ddpm_fast.files

    count = {"n": 0}
    fsync = os.fsync

    def full(fd: int) -> None:
        count["n"] += 1
        if count["n"] > writes:
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(ddpm_fast.files.os, "fsync", full)


@pytest.mark.parametrize("name", ["x.png", "x.npz"])
def test_a_full_disk_keeps_the_shards_and_a_rerun_writes_the_file(
    tmp_path, capsys, monkeypatch, name
):
    """run.json and 2 shards are written, then the file itself fails: no file, no temporary,
    the shards kept; the rerun draws nothing and writes what a clean run writes."""
    argv = ["sample", "--num", 4, "--batch-size", 2, *FAST]
    clean = tmp_path / "clean" / name
    clean.parent.mkdir()
    assert run(capsys, *argv, "--out", clean)[0] == 0
    out = tmp_path / "full" / name
    out.parent.mkdir()
    with monkeypatch.context() as patch:
        disk_full_after(patch, 3)
        code, _, err = run(capsys, *argv, "--out", out)
    assert code == 2
    one_error_line(err, "No space left on device); the 2 shards are kept in")
    assert sorted(p.name for p in out.parent.iterdir()) == [f"{name}.shards"]
    code, _, err = run(capsys, *argv, "--out", out)
    assert code == 0 and "nothing to draw" in err
    assert out.read_bytes() == clean.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == [name]


def test_a_full_disk_keeps_the_folder_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference"
    argv = ["sample", "--num", 6, "--batch-size", 2, *FAST]
    assert run(capsys, *argv, "--out", reference)[0] == 0
    folder = tmp_path / "pngs"
    with monkeypatch.context() as patch:
        disk_full_after(patch, 4)  # run.json, 3 images; the second batch's second image fails
        code, _, err = run(capsys, *argv, "--out", folder)
    assert code == 2
    one_error_line(err, "the 3 images already there are kept, and a rerun resumes")
    assert pngs(folder) == ["000000.png", "000001.png", "000002.png"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert run(capsys, *argv, "--out", folder)[0] == 0
    assert contents(folder) == contents(reference)


def test_a_non_finite_batch_is_not_written(tmp_path, capsys, monkeypatch):
    run_chain = Pipeline._run_chain

    def poisoned(self, x, *args, indices, **kwargs):
        x = run_chain(self, x, *args, indices=indices, **kwargs)
        if 2 in indices:
            x[indices.index(2)] = float("inf")
        return x

    monkeypatch.setattr(Pipeline, "_run_chain", poisoned)
    argv = ["sample", "--num", 4, "--batch-size", 2, *FAST, "--reference"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "pngs")
    assert code == 2
    one_error_line(err, "samples 2..3 gave NaN or infinite values (samples 2)")
    assert pngs(tmp_path / "pngs") == ["000000.png", "000001.png"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "x.npz")
    assert code == 2 and not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "--eta", "inf", "--sampler", "ddim"], "eta must be finite"),
        (["sample", "--eta", "nan", "--sampler", "ddim"], "eta must be finite"),
        (["sample", "--eta", "-1", "--sampler", "ddim"], "eta must be at least 0"),
        (["sample", "--seed", "-1"], "seed must be an integer in [0, 2**32)"),
        (["sample", "--seed", str(2**32)], "seed must be an integer in [0, 2**32)"),
        (["sample", "--device", "meta"], "not 'meta'"),
        (["sample", "--image-size", "7"], "not a multiple of the network's 2"),
        (["sample", "--timesteps", str(10**9)], "timesteps must be at most 100000"),
        (["convert", FIXTURES / "trainer.pt", "afile/m.safetensors"], "is not a folder"),
        (["export", "--out", "afile/m.onnx"], "is not a folder"),
        (["export", "--out", "m.txt"], "must end in .onnx"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    never_sample(monkeypatch)
    code, _, err = run(capsys, *argv)
    assert code == 2
    one_error_line(err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_convert_to_a_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    import ddpm_fast.checkpoints as checkpoints

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", full)
    out = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "convert", FIXTURES / "trainer.pt", out, "--image-size", 8)
    assert code == 2
    one_error_line(err, "cannot write (No space left on device)")
    assert list(tmp_path.iterdir()) == []


def test_images_written_are_finite_uint8(tmp_path, capsys):
    assert run(capsys, "sample", "--num", 3, *FAST, "--out", tmp_path / "x.npz")[0] == 0
    array = np.load(tmp_path / "x.npz")["arr_0"]
    assert array.dtype == np.uint8 and array.std() > 5
    assert torch.from_numpy(array).float().isfinite().all()
