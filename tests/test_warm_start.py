"""The CLI's warm start: a second ``sample`` of the same model and chain runs without torch and
writes the same bytes as the full path; anything that would change the images misses."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ddpm_fast import warm_start
from ddpm_fast.cli import build_parser, main
from ddpm_fast.errors import NonFiniteError
from ddpm_fast.output import Output

pytest.importorskip("onnxruntime")

FAST = ["--sampler", "ddim", "--steps", "4"]


@pytest.fixture
def warm(tmp_path, monkeypatch):
    """Warm starts on, on ONNX Runtime, with a cache of this test's own."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DDPM_FAST_CACHE_DIR", str(cache))
    monkeypatch.setenv("DDPM_FAST_CPU_EXECUTOR", "onnxruntime")
    monkeypatch.delenv(warm_start.ENV, raising=False)
    return cache


def sample(*argv):
    assert main(["sample", *map(str, argv)]) == 0


def sample_in_new_process(*argv) -> bool:
    """Runs ``sample`` in a fresh interpreter; whether it imported torch."""
    code = (
        "import sys; from ddpm_fast.cli import main; "
        f"assert main({[str(a) for a in ('sample', *argv)]!r}) == 0; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    return out.stdout.strip().splitlines()[-1] == "True"


def records(cache):
    return sorted(p.name for p in (cache / warm_start.FOLDER).glob("*.json"))


def test_the_second_sample_needs_no_torch_and_writes_the_same_bytes(warm, tmp_path):
    # 2 + 2 + 1 images: the batch split in two parts, and a batch of one (the adaptive plan).
    argv = ["--num", 5, "--batch-size", 2, "--seed", 3, *FAST]
    sample(*argv, "--out", tmp_path / "full.npz")
    assert len(records(warm)) == 1
    assert not sample_in_new_process(*argv, "--out", tmp_path / "warm.npz")
    assert (tmp_path / "warm.npz").read_bytes() == (tmp_path / "full.npz").read_bytes()
    # Another seed, number and batch size are the warm start's own to apply: still warm.
    argv = ["--num", 3, "--batch-size", 3, "--seed", 4, *FAST]
    assert not sample_in_new_process(*argv, "--out", tmp_path / "warm.png")
    os.environ[warm_start.ENV] = "0"
    try:
        sample(*argv, "--out", tmp_path / "full.png")
    finally:
        del os.environ[warm_start.ENV]
    assert (tmp_path / "warm.png").read_bytes() == (tmp_path / "full.png").read_bytes()


def test_a_folder_begun_by_the_full_path_is_resumed_warm(warm, tmp_path):
    sample("--num", 2, *FAST, "--out", tmp_path / "pngs")
    assert not sample_in_new_process("--num", 4, *FAST, "--out", tmp_path / "pngs")
    sample("--num", 4, *FAST, "--out", tmp_path / "all.npz")  # warm too: same images
    drawn = np.load(tmp_path / "all.npz")["arr_0"]
    from PIL import Image

    for i in range(4):
        image = np.asarray(Image.open(tmp_path / "pngs" / f"{i:06d}.png"))
        assert np.array_equal(image.reshape(drawn[i].shape), drawn[i])


def test_another_chain_or_model_option_misses_and_records_its_own(warm, tmp_path):
    sample("--num", 1, *FAST, "--out", tmp_path / "a.npz")
    sample("--num", 1, "--sampler", "ddim", "--steps", 5, "--out", tmp_path / "b.npz")
    sample("--num", 1, *FAST, "--eta", 0.5, "--out", tmp_path / "c.npz")
    assert len(records(warm)) == 3
    sample("--num", 2, "--seed", 9, *FAST, "--out", tmp_path / "d.npz")  # warm: no new record
    assert len(records(warm)) == 3


def key_of(*argv):
    return warm_start.warm_key(build_parser().parse_args(["sample", *map(str, argv)]))


def test_the_key_covers_what_changes_the_images(warm, tmp_path):
    base = key_of(*FAST, "--out", "x.png")
    assert base is not None
    assert key_of(*FAST, "--out", "y.npz", "--num", 7, "--seed", 2, "--threads", 1) == base
    assert key_of("--sampler", "ddim", "--steps", 5, "--out", "x.png") != base
    assert key_of(*FAST, "--online", "--out", "x.png") != base
    assert key_of(*FAST, "--beta-schedule", "cosine", "--out", "x.png") != base
    from ddpm_fast.default_model import ASSET

    copy = tmp_path / "model.safetensors"
    copy.write_bytes(ASSET.read_bytes())
    same_bytes = key_of(copy, *FAST, "--out", "x.png")
    assert same_bytes not in (None, base)  # another path
    copy.write_bytes(ASSET.read_bytes() + b" ")
    assert key_of(copy, *FAST, "--out", "x.png") not in (None, same_bytes)


@pytest.mark.parametrize(
    "argv",
    [
        ["--reference"],
        ["--device", "cuda"],
        ["--dtype", "bf16"],
        ["--cpu-executor", "torch"],
        ["--batch-size", "auto"],
        ["--onnx", "x.onnx"],
    ],
)
def test_what_cannot_start_warm_has_no_key(warm, argv):
    assert key_of(*FAST, *argv, "--out", "x.png") is None


def test_the_environment_can_turn_it_off(warm, monkeypatch):
    monkeypatch.setenv(warm_start.ENV, "0")
    assert key_of(*FAST, "--out", "x.png") is None
    monkeypatch.setenv(warm_start.ENV, "1")
    monkeypatch.setenv("DDPM_FAST_CPU_EXECUTOR", "torch")
    assert key_of(*FAST, "--out", "x.png") is None
    monkeypatch.setenv("DDPM_FAST_CPU_EXECUTOR", "auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert key_of(*FAST, "--out", "x.png") is None


def test_a_damaged_record_or_a_missing_executor_file_runs_the_full_path(warm, tmp_path):
    argv = ["--num", 2, *FAST]
    sample(*argv, "--out", tmp_path / "a.npz")
    (record,) = (warm / warm_start.FOLDER).glob("*.json")
    record.write_text("{not json")
    assert sample_in_new_process(*argv, "--out", tmp_path / "b.npz")  # full path: torch
    assert json.loads(record.read_text())["format"] == warm_start.FORMAT  # recorded again
    (executor_file,) = (warm / "executor-files").glob("*.onnx")
    executor_file.unlink()
    assert sample_in_new_process(*argv, "--out", tmp_path / "c.npz")
    assert executor_file.exists()
    tables = record.with_suffix(".npz")
    tables.write_bytes(b"")
    assert warm_start.WarmStart.find(record.stem) is None
    for out in ("b.npz", "c.npz"):
        assert (tmp_path / out).read_bytes() == (tmp_path / "a.npz").read_bytes()


def test_a_chain_that_is_not_finite_is_not_written(warm, tmp_path, monkeypatch):
    sample("--num", 2, *FAST, "--out", tmp_path / "a.npz")
    from ddpm_fast.engine.table_chain import TableChain

    monkeypatch.setattr(TableChain, "run", lambda self, x, *args: x * np.float32("nan"))
    with pytest.raises(NonFiniteError, match="samples 0..1 gave NaN"):
        warm_start.WarmStart.find(key_of("--num", 2, *FAST, "--out", "b.npz")).sample_to(
            Output(tmp_path / "b.npz"),
            build_parser().parse_args(["sample", "--num", "2", *FAST, "--out", "b.npz"]),
            say=lambda message: None,
        )
    assert not (tmp_path / "b.npz").exists()


def test_the_tables_round_trip(tmp_path):
    from ddpm_fast.engine.table_chain import ChainTables

    rng = np.random.default_rng(0)
    tables = ChainTables(
        rng.standard_normal((5, 7), dtype=np.float32),
        rng.standard_normal((5, 3), dtype=np.float32),
        np.array([1, 1, 0, 1, 0], dtype=bool),
        True,
        False,
    )
    tables.save(tmp_path / "t.npz")
    back = ChainTables.load(tmp_path / "t.npz")
    assert np.array_equal(back.time_rows, tables.time_rows)
    assert np.array_equal(back.coeffs, tables.coeffs)
    assert np.array_equal(back.noise_on, tables.noise_on)
    assert (back.carries_x0_prev, back.self_condition) == (True, False)
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_only_what_the_warm_start_applies_is_left_out_of_the_key():
    args = build_parser().parse_args(["sample", "--out", "x.png"])
    left_out = set(vars(args)) & set(warm_start.APPLIED)
    assert left_out == {
        "num",
        "seed",
        "batch_size",
        "threads",
        "out",
        "keep_shards",
        "run",
        "command",
    }


def test_only_the_most_recently_used_records_are_kept(warm, tmp_path, monkeypatch):
    monkeypatch.setattr(warm_start, "MAX_RECORDS", 2)
    for steps in (3, 4, 5):
        sample("--num", 1, "--sampler", "ddim", "--steps", steps, "--out", tmp_path / f"{steps}")
        time.sleep(0.02)  # distinct modification times
    kept = records(warm)
    assert len(kept) == 2 and len(list((warm / warm_start.FOLDER).glob("*.npz"))) == 2
    assert key_of("--sampler", "ddim", "--steps", 3, "--out", "x.png") + ".json" not in kept
