"""Shards, PNGs and signals: whatever is on disk is checked before it counts (a bad shard or PNG is
drawn again with one line, never merged), a killed run resumed again and again gives the same
bytes, and Ctrl-C / SIGTERM exit 130 / 143 with one line and no temporary file."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddpm_fast.cli import main
from ddpm_fast.errors import ConfigError, OutputError
from ddpm_fast.output import Output

FAST = ["--sampler", "ddim", "--steps", "3"]
RUN = ["sample", "--num", 8, "--batch-size", 2, *FAST]
SHARD = "000000002-000000004.npy"  # images 2..3, the second batch


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def notes(err: str) -> list[str]:
    """stderr's lines, less the progress bar's redrawn lines ("\r")."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    return [line for line in lines if line and not line.startswith("sampling")]


def warnings_and_notes(caplog, err: str) -> list[str]:
    """In this process the warnings go to pytest's log capture, not stderr: both, in order."""
    said = [r.getMessage() for r in caplog.records if r.name == "ddpm_fast.output"]
    return [f"ddpm-fast: {m}" for m in said] + notes(err)


def temporaries(*folders: Path) -> list[str]:
    return [p.name for f in folders if f.is_dir() for p in f.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """A finished .npz with its shards kept, a folder of PNGs, and the shards of a --seed 1 run."""
    root = tmp_path_factory.mktemp("made")
    for argv in (
        [*RUN, "--out", root / "x.npz", "--keep-shards"],
        [*RUN, "--out", root / "s1.npz", "--keep-shards", "--seed", 1],
        [*RUN, "--out", root / "pngs"],
    ):
        assert main([str(a) for a in argv]) == 0
    return {"root": root, "npz": (root / "x.npz").read_bytes()}


def damage(case: str, shard: Path, made: dict) -> None:
    """Alter one shard as a user, a disk or another run might."""
    shards = made["root"] / "x.npz.shards"
    images = np.load(shard)
    if case == "one image":
        np.save(shard, images[:1])
    elif case == "rgb":
        np.save(shard, np.repeat(images, 3, axis=3))
    elif case == "float32":
        np.save(shard, images.astype(np.float32))
    elif case == "seed 1":
        shutil.copy(made["root"] / "s1.npz.shards" / SHARD, shard)
    elif case == "another index":
        shutil.copy(shards / "000000004-000000006.npy", shard)
    elif case == "zeros":
        np.save(shard, np.zeros_like(images))
    elif case == "bit flipped":
        data = bytearray(shard.read_bytes())
        data[200] ^= 1
        shard.write_bytes(bytes(data))
    elif case in ("100 bytes", "0 bytes"):
        os.truncate(shard, int(case.split()[0]))
    elif case == "folder":
        shard.unlink()
        shard.mkdir()
    elif case == "fifo":  # an open for reading would wait for a writer forever
        shard.unlink()
        os.mkfifo(shard)
    else:
        raise AssertionError(case)


CASES = [
    ("one image", "holds shape (1, 8, 8, 1), not (2, 8, 8, 1)"),
    ("rgb", "holds shape (2, 8, 8, 3), not (2, 8, 8, 1)"),
    ("float32", "holds float32, not uint8"),
    ("seed 1", "is not this run's images 2..3"),
    ("another index", "is not this run's images 2..3"),
    ("zeros", "carries no digest"),
    ("bit flipped", "is not this run's images 2..3"),
    ("100 bytes", "not a whole .npy file (100 bytes)"),
    ("0 bytes", "not a whole .npy file (0 bytes)"),
    ("folder", "was an empty folder"),
    ("fifo", "unreadable (not a regular file)"),
]


@pytest.mark.parametrize(("case", "why"), CASES, ids=[c for c, _ in CASES])
def test_a_bad_shard_is_drawn_again_with_one_line(made, tmp_path, capsys, caplog, case, why):
    """Resume over kept shards of which one is bad: one warning naming it, that batch drawn
    again, the .npz the uninterrupted run's."""
    shards = tmp_path / "x.npz.shards"
    shutil.copytree(made["root"] / "x.npz.shards", shards)
    damage(case, shards / SHARD, made)
    code, _, err = run(capsys, *RUN, "--out", tmp_path / "x.npz")
    assert code == 0, err
    said = warnings_and_notes(caplog, err)
    assert said[0].startswith(f"ddpm-fast: {shards / SHARD}: {why}"), err
    assert said[0].endswith("; drawing images 2..3 again"), err
    assert said[1:] == ["ddpm-fast: resuming: 2 of 8 images still to draw"], err
    assert (tmp_path / "x.npz").read_bytes() == made["npz"]
    assert not shards.exists() and not temporaries(tmp_path)


def test_the_npz_never_takes_a_shards_header(made, tmp_path):
    """A shard that turns bad after the resume's check (another process, a disk) stops the
    assembly with one error naming it: no .npz, no temporary, the shards kept."""
    shards = tmp_path / "x.npz.shards"
    shutil.copytree(made["root"] / "x.npz.shards", shards)
    output = Output(tmp_path / "x.npz")
    output.start(_run_of(shards), 2)
    assert output.pending(8, 2) == []
    damage("one image", shards / SHARD, made)
    with pytest.raises(OutputError, match=f"{SHARD}: holds shape .* a rerun draws it again"):
        output.finish(8, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz.shards"]
    assert len(list(shards.glob("*.npy"))) == 4


def _run_of(store: Path) -> dict:
    """The run a manifest records, as write_samples is given it."""
    import json

    held = json.loads((store / "run.json").read_text())
    return {k: v for k, v in held.items() if k not in ("ddpm_fast_run", "batch_size")}


@pytest.mark.parametrize(
    ("case", "why"),
    [("cut", "000001.png is not a whole PNG"), ("16x16", "000001.png is 16x16 L, not 8x8 L")],
)
def test_a_damaged_png_in_a_folder_is_drawn_again(made, tmp_path, capsys, caplog, case, why):
    from PIL import Image

    folder = tmp_path / "pngs"
    shutil.copytree(made["root"] / "pngs", folder)
    reference = {p.name: p.read_bytes() for p in folder.iterdir()}
    if case == "cut":
        os.truncate(folder / "000001.png", 30)
    else:
        Image.new("L", (16, 16), 77).save(folder / "000001.png")
    code, _, err = run(capsys, *RUN, "--out", folder)
    assert code == 0, err
    said = warnings_and_notes(caplog, err)
    assert said[0].startswith(f"ddpm-fast: {folder}: {why}"), err
    assert said[0].endswith("; drawing images 0..1 again"), err
    assert said[1:] == ["ddpm-fast: resuming: 2 of 8 images still to draw"], err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == reference


def test_the_barrier_timeout_is_checked(monkeypatch):
    from ddpm_fast.distributed import barrier_timeout

    monkeypatch.delenv("DDPM_FAST_BARRIER_TIMEOUT", raising=False)
    assert barrier_timeout() == 600
    monkeypatch.setenv("DDPM_FAST_BARRIER_TIMEOUT", "7200")
    assert barrier_timeout() == 7200
    for bad in ("abc", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("DDPM_FAST_BARRIER_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="DDPM_FAST_BARRIER_TIMEOUT"):
            barrier_timeout()


# subprocesses: kill -9, SIGINT, SIGTERM

SLOW_RUN = ["sample", "--num", 12, "--batch-size", 2, "--sampler", "ddim", "--steps", 6]


def start(argv: list, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "ddpm_fast", *map(str, argv)]
    return subprocess.Popen(command, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)


def wait_for_more(process: subprocess.Popen, store: Path, pattern: str, than: int) -> None:
    """Until ``store`` holds more than ``than`` files of ``pattern`` or the process ends."""
    deadline = time.monotonic() + 300
    while len(list(store.glob(pattern))) <= than and process.poll() is None:
        assert time.monotonic() < deadline, "no new file in 300 s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def slow_npz(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("slow")
    assert main([str(a) for a in [*SLOW_RUN, "--out", folder / "x.npz"]]) == 0
    return (folder / "x.npz").read_bytes()


@pytest.mark.slow
def test_a_run_killed_five_times_resumes_to_the_same_bytes(slow_npz, tmp_path):
    """SIGKILL at a random point after each new shard, five times in a row, then a rerun to
    the end: the uninterrupted run's bytes."""
    shards = tmp_path / "x.npz.shards"
    for _ in range(5):
        before = len(list(shards.glob("*.npy")))
        process = start([*SLOW_RUN, "--out", "x.npz"], tmp_path)
        wait_for_more(process, shards, "*.npy", before)
        time.sleep(random.uniform(0, 0.3))
        process.kill()
        process.communicate()
        if (tmp_path / "x.npz").exists():  # killed after the rename: the file is whole
            assert (tmp_path / "x.npz").read_bytes() == slow_npz
    process = start([*SLOW_RUN, "--out", "x.npz"], tmp_path)
    _, err = process.communicate()
    assert process.returncode == 0, err
    assert (tmp_path / "x.npz").read_bytes() == slow_npz


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [
        (signal.SIGINT, 130, "ddpm-fast: interrupted"),
        (signal.SIGTERM, 143, "ddpm-fast: terminated"),
    ],
    ids=["SIGINT", "SIGTERM"],
)
@pytest.mark.parametrize("out", ["x.npz", "pngs"])
def test_a_signal_exits_with_one_line_and_a_rerun_resumes(slow_npz, tmp_path, sig, code, line, out):
    store = tmp_path / ("x.npz.shards" if out == "x.npz" else out)
    process = start([*SLOW_RUN, "--out", out], tmp_path)
    wait_for_more(process, store, "[0-9]*", 0)
    process.send_signal(sig)
    _, err = process.communicate()
    assert process.returncode == code, err
    assert notes(err) == [line], err
    assert not temporaries(tmp_path, store)
    process = start([*SLOW_RUN, "--out", out, "--keep-shards"], tmp_path)
    _, err = process.communicate()
    assert process.returncode == 0, err
    assert any("resuming" in note for note in notes(err)), err
    if out == "x.npz":
        assert (tmp_path / out).read_bytes() == slow_npz
    else:
        assert len(list(store.glob("*.png"))) == 12
