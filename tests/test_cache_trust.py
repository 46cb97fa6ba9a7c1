"""A cache folder that is damaged, stale or shared (issue 32): a cached executor file, its Winograd
form, a warm-start record and its tables are used only where they are verifiably what their key
names; anything else is exported again (or the record skipped and written again) with one
warning line, never a traceback, never another model's images.

The files are found by pattern (``*/*.onnx``, ``warm-starts/*``), not by this version's names, so
that each test runs, and fails where it should, on code older than the seal as well."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import ddpm_fast
from ddpm_fast.cli import main
from ddpm_fast.engine import Engine, winograd

pytest.importorskip("onnxruntime")

SAMPLE = ["--steps", "5", "--num", "4"]


def other_weights() -> ddpm_fast.Pipeline:
    """The default model with every weight times 0.9: the same architecture, other images."""
    pipeline = ddpm_fast.load()
    with torch.no_grad():
        for tensor in pipeline.network.parameters():
            tensor.mul_(0.9)
    return pipeline


def sample(cache: Path, out: Path, *argv: str, monkeypatch) -> bytes:
    """``ddpm-fast sample`` of the default model (or ``argv``'s) on ONNX Runtime with ``cache``;
    the .npz it wrote."""
    monkeypatch.setenv("DDPM_FAST_CACHE_DIR", str(cache))
    monkeypatch.setenv("DDPM_FAST_CPU_EXECUTOR", "onnxruntime")
    monkeypatch.delenv("DDPM_FAST_WARM_START", raising=False)
    assert main(["sample", *SAMPLE, *argv, "--out", str(out)]) == 0
    return out.read_bytes()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Caches made once, whose executor files the tests copy: the default model's, and those of
    the default weights x 0.9, of 16x16 images, and of DPM-Solver++; and the images of each."""
    root = tmp_path_factory.mktemp("made")
    other = ddpm_fast.save_pipeline(other_weights(), root / "other.safetensors")
    runs = {
        "default": [],
        "other": [str(other)],
        "big": ["--image-size", "16"],
        "dpm": ["--sampler", "dpm++2m"],
    }
    with pytest.MonkeyPatch.context() as monkeypatch:
        images = {
            name: sample(root / name, root / f"{name}.npz", *argv, monkeypatch=monkeypatch)
            for name, argv in runs.items()
        }
    return root, images


def executor_file(cache: Path) -> Path:
    (path,) = cache.glob("*/*.onnx")
    return path


def record_files(cache: Path) -> tuple[Path, Path]:
    (meta,) = (cache / "warm-starts").glob("*.json")
    return meta, meta.with_suffix(".npz")


@pytest.fixture
def cache(made, tmp_path, monkeypatch):
    """The default model's cache of this test, made by a run of its own (a record names its
    executor file by path: a copied cache would name the original's in older versions)."""
    _, images = made
    assert (
        sample(tmp_path / "cache", tmp_path / "first.npz", monkeypatch=monkeypatch)
        == (images["default"])
    )
    return tmp_path / "cache"


@pytest.fixture
def noted(caplog):
    """The warning lines (logged or Python warnings) of a test, and that it printed no traceback."""
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def lines() -> list[str]:
            logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            return logged + [str(w.message) for w in caught]

        yield lines


def assert_default_images(made, got: bytes) -> None:
    _, images = made
    assert images["default"] != images["other"]  # the x 0.9 model's images do differ
    assert got == images["default"]


def swap_in(source: Path, target: Path) -> None:
    """``source``'s bytes in ``target``'s place, as a user copying files between caches would."""
    target.write_bytes(source.read_bytes())


@pytest.mark.parametrize("record", ["record", "no record"])
def test_another_models_executor_file_is_exported_again(made, cache, tmp_path, noted, record,
                                                        monkeypatch):  # fmt: skip
    root, _ = made
    if record == "no record":
        shutil.rmtree(cache / "warm-starts")
    swap_in(executor_file(root / "other"), executor_file(cache))
    got = sample(cache, tmp_path / "o.npz", monkeypatch=monkeypatch)
    assert_default_images(made, got)
    assert len(noted()) == 1, noted()
    # And the rerun finds it sealed again: nothing to say, the same images.
    assert sample(cache, tmp_path / "p.npz", monkeypatch=monkeypatch) == got
    assert len(noted()) == 1


def test_another_models_file_with_its_seal_is_exported_again(made, cache, tmp_path, noted,
                                                             monkeypatch):  # fmt: skip
    """The other model's file and the seal beside it, copied together into this model's slot:
    the seal names the other key."""
    root, _ = made
    for other in executor_file(root / "other").parent.iterdir():
        swap_in(other, executor_file(cache).with_suffix(other.suffix))
    assert_default_images(made, sample(cache, tmp_path / "o.npz", monkeypatch=monkeypatch))
    assert len(noted()) == 1, noted()


DAMAGE = {
    "truncated": lambda data: data[:5000],
    "empty": lambda data: b"",
    "garbage": lambda data: np.random.default_rng(0).bytes(100_000),
    "one byte flipped": lambda data: data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_executor_file_is_exported_again(made, cache, tmp_path, noted, damage,
                                                   monkeypatch):  # fmt: skip
    path = executor_file(cache)
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    assert_default_images(made, sample(cache, tmp_path / "o.npz", monkeypatch=monkeypatch))
    assert len(noted()) == 1, noted()


@pytest.mark.parametrize("other", ["big", "dpm"])
def test_a_file_of_other_images_or_another_sampler_in_its_slot_is_exported_again(
    made, cache, tmp_path, noted, other, monkeypatch
):
    """A 16x16 file, or DPM-Solver++'s (which takes x0_prev), in the 8x8 DDPM file's place."""
    root, _ = made
    swap_in(executor_file(root / other), executor_file(cache))
    assert_default_images(made, sample(cache, tmp_path / "o.npz", monkeypatch=monkeypatch))
    assert len(noted()) == 1, noted()


def test_a_record_whose_tables_were_edited_is_skipped_and_written_again(
    made, cache, tmp_path, noted, monkeypatch
):
    _, tables = record_files(cache)
    with np.load(tables) as data:
        edited = dict(data)
    edited["coeffs"] = edited["coeffs"] * 1.5
    with open(tables, "wb") as f:
        np.savez(f, **edited)
    assert_default_images(made, sample(cache, tmp_path / "o.npz", monkeypatch=monkeypatch))
    assert len(noted()) == 1, noted()
    with np.load(tables) as data:  # recorded again: the engine's tables
        assert not np.array_equal(data["coeffs"], edited["coeffs"])


def test_a_record_pointing_at_a_file_of_other_images_is_skipped(made, cache, tmp_path, noted,
                                                                monkeypatch):  # fmt: skip
    root, _ = made
    meta, _ = record_files(cache)
    entry = json.loads(meta.read_text())
    field = next(k for k in entry if k.endswith("_file"))  # executor_file (step_file before)
    entry[field] = str(executor_file(root / "big"))
    meta.write_text(json.dumps(entry))
    assert_default_images(made, sample(cache, tmp_path / "o.npz", monkeypatch=monkeypatch))
    assert len(noted()) == 1, noted()


def test_a_checkpoint_edited_in_place_does_not_reuse_its_record(made, tmp_path, noted,
                                                                monkeypatch):  # fmt: skip
    """Same size, same modification time: the record's key hashes the checkpoint's bytes."""
    root, images = made
    checkpoint = ddpm_fast.save_pipeline(ddpm_fast.load(), tmp_path / "model.safetensors")
    before = checkpoint.stat()
    first = sample(tmp_path / "cache", tmp_path / "a.npz", str(checkpoint), monkeypatch=monkeypatch)
    assert first == images["default"]
    other = (root / "other.safetensors").read_bytes()
    assert len(other) == before.st_size
    checkpoint.write_bytes(other)
    os.utime(checkpoint, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert checkpoint.stat().st_mtime_ns == before.st_mtime_ns
    again = sample(tmp_path / "cache", tmp_path / "b.npz", str(checkpoint), monkeypatch=monkeypatch)
    assert again == images["other"]
    assert noted() == []


def test_a_replaced_winograd_form_is_exported_again(tmp_path, noted, monkeypatch):
    """Sessions run the Winograd form (forced here: the default model has none of its own, and
    batches of one open it too): a form with other weights in its place is not run."""
    monkeypatch.setenv("DDPM_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(winograd, "worth_it", lambda *shape: True)
    monkeypatch.setattr(winograd, "MIN_BATCH", 1)  # every part of the batch split
    pipeline = ddpm_fast.load()
    kwargs = dict(sampler="ddim", steps=4, seed=2)
    want = Engine(pipeline, cpu_executor="onnxruntime").sample(2, **kwargs)
    (form,) = (tmp_path / "cache").glob(f"*/*{winograd.SUFFIX}")
    model = onnx.load(str(form))
    weights = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * 0.9, weights.name))
    onnx.save(model, str(form))
    got = Engine(pipeline, cpu_executor="onnxruntime").sample(2, **kwargs)
    assert torch.equal(got, want)
    assert len(noted()) == 1, noted()


def stderr_lines(text: str) -> list[str]:
    """stderr without the progress bars (tqdm's carriage-return segments)."""
    import re

    segments = (re.sub(r"^sampling:.*?(it|step)/s\]", "", s) for s in re.split(r"[\r\n]", text))
    return [s for s in segments if s.strip() and not s.startswith("sampling:")]


def test_a_cache_path_that_is_a_file_says_so_in_one_line(made, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {
        **os.environ,
        "DDPM_FAST_CACHE_DIR": str(blocker),
        "DDPM_FAST_CPU_EXECUTOR": "onnxruntime",
    }
    env.pop("DDPM_FAST_WARM_START", None)
    out = tmp_path / "o.npz"
    code = "import sys; from ddpm_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "sample", *SAMPLE, "--out", str(out)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("ddpm-fast: cannot write the engine's") and str(blocker) in lines[0]
    assert_default_images(made, out.read_bytes())


FIFO_IN_PLACE_OF = {
    "executor file": "executor-files/*.onnx",
    "seal": "executor-files/*.json",
    "record": "warm-starts/*.json",
    "record tables": "warm-starts/*.npz",
}


@pytest.mark.parametrize("entry", FIFO_IN_PLACE_OF)
def test_a_fifo_in_the_cache_is_not_read_forever(made, cache, tmp_path, entry):
    """A FIFO where a cache file belongs: an open for reading would wait for a writer forever."""
    (path,) = cache.glob(FIFO_IN_PLACE_OF[entry])
    path.unlink()
    os.mkfifo(path)
    env = {**os.environ, "DDPM_FAST_CACHE_DIR": str(cache), "DDPM_FAST_CPU_EXECUTOR": "onnxruntime"}
    env.pop("DDPM_FAST_WARM_START", None)
    out = tmp_path / "o.npz"
    code = "import sys; from ddpm_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "sample", *SAMPLE, "--out", str(out)],
        capture_output=True, text=True, env=env, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(stderr_lines(result.stderr)) <= 1, stderr_lines(result.stderr)
    assert_default_images(made, out.read_bytes())


def test_a_file_is_hashed_once_per_process_and_version(tmp_path, monkeypatch):
    """A session per thread count and batch size: one hash of each file, until it changes."""
    from ddpm_fast import machine

    path = tmp_path / "f"
    path.write_bytes(b"cached bytes")
    sha = machine.sha256_of(b"cached bytes")
    hashed = []
    monkeypatch.setattr(machine, "read_checked", lambda p, s: hashed.append(p))
    for _ in range(3):
        machine.check_file(path, sha)
    assert len(hashed) == 1
    os.utime(path, ns=(0, path.stat().st_mtime_ns))  # metadata changed: the inode change time too
    machine.check_file(path, sha)
    assert len(hashed) == 2


def test_a_file_replaced_while_its_session_opens_is_not_used(tmp_path, monkeypatch):
    """What was checked is what was opened: a file replaced between the check and the open."""
    import onnxruntime as ort

    from ddpm_fast.engine.table_chain import executor_session, write_seal
    from ddpm_fast.machine import StaleEntry

    path = tmp_path / "executor-k.onnx"
    path.write_bytes(b"the sealed bytes")
    write_seal(path, "k", (8, 8), ["x"])

    def replaced_on_open(name, *args, **kwargs):
        other = tmp_path / "other"
        other.write_bytes(b"the sealed bytes")  # the same bytes, another file
        os.replace(other, name)

    monkeypatch.setattr(ort, "InferenceSession", replaced_on_open)
    with pytest.raises(StaleEntry, match="changed while its session opened"):
        executor_session(path, "k", 1, 1)
