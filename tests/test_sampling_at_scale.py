"""Sampling at scale: sharded, resumable outputs; torchrun ranks giving the bytes of one process;
a run killed at a random point and rerun giving the same bytes; non-finite batches never
written (Pipeline.sample_to, the API of ``ddpm-fast sample``)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast.errors import NonFiniteError, OutputError
from ddpm_fast.output import Group

CHAIN = ["--sampler", "ddim", "--steps", "4"]


def cli(*argv, cwd: Path, env: dict | None = None, check: bool = True, **popen):
    command = [sys.executable, "-m", "ddpm_fast", *map(str, argv)]
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, check=False, **popen
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return result


def torchrun(nproc: int, *argv, cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(random.randint(20000, 60000)),
        # "--": torchrun's own parser would take --num for its --numa-binding
        "-m", "ddpm_fast", "--", *map(str, argv),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, bytes]:
    """Outputs of one process: 7 images in batches of 2 (the last batch is 1)."""
    folder = tmp_path_factory.mktemp("single")
    argv = ["sample", "--num", 7, "--batch-size", 2, *CHAIN]
    cli(*argv, "--out", "x.npz", cwd=folder, env=dict(os.environ, OMP_NUM_THREADS="1"))
    cli(*argv, "--out", "pngs", cwd=folder, env=dict(os.environ, OMP_NUM_THREADS="1"))
    files = {"x.npz": (folder / "x.npz").read_bytes()}
    files |= {p.name: p.read_bytes() for p in (folder / "pngs").glob("*.png")}
    return files


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_gives_the_bytes_of_one_process(single, tmp_path, nproc):
    argv = ["sample", "--num", 7, "--batch-size", 2, *CHAIN]
    result = torchrun(nproc, *argv, "--out", "x.npz", cwd=tmp_path)
    assert result.stdout.count("wrote 7 images") == 1  # rank 0 alone reports
    assert (tmp_path / "x.npz").read_bytes() == single["x.npz"]
    assert not (tmp_path / "x.npz.shards").exists()
    torchrun(nproc, *argv, "--out", "pngs", cwd=tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "pngs").glob("*.png")} == {
        k: v for k, v in single.items() if k.endswith(".png")
    }


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_bytes(single, tmp_path):
    """SIGKILL once at least one shard is written (at a random point after it), rerun: the
    final path never holds a partial file, and the result is the uninterrupted run's."""
    argv = [sys.executable, "-m", "ddpm_fast", "sample", "--num", 7, "--batch-size", 2, *CHAIN]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [*map(str, argv), "--out", "x.npz"], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    shards = tmp_path / "x.npz.shards"
    deadline = time.monotonic() + 300
    while not list(shards.glob("*.npy")) and process.poll() is None:
        assert time.monotonic() < deadline, "no shard written in 300 s"
        time.sleep(0.05)
    time.sleep(random.uniform(0, 0.5))
    process.send_signal(signal.SIGKILL)
    process.wait()
    if (tmp_path / "x.npz").exists():  # killed after the rename: the file is whole
        assert (tmp_path / "x.npz").read_bytes() == single["x.npz"]
    kept = sorted(p.name for p in shards.glob("*.npy")) if shards.exists() else []
    result = cli(*argv[3:], "--out", "x.npz", cwd=tmp_path, env=env)
    if kept and len(kept) < 4:
        assert "resuming" in result.stderr
    assert (tmp_path / "x.npz").read_bytes() == single["x.npz"]


def test_shards_of_another_run_are_refused(tmp_path):
    argv = ["sample", "--num", 4, "--batch-size", 2, *CHAIN, "--out", "x.npz", "--keep-shards"]
    cli(*argv, cwd=tmp_path)
    for change, differs in [
        (["--seed", 5], "seed: before 0, now 5"),
        (["--steps", 5], "steps: before 4, now 5"),
        (["--batch-size", 3], "batch_size: before 2, now 3"),
        (["--reference"], 'backend: before "engine", now "reference"'),
        (["--image-size", 16], "image_shape"),
    ]:
        (tmp_path / "x.npz").unlink(missing_ok=True)
        result = cli(*argv, *change, cwd=tmp_path, check=False)
        assert result.returncode == 2, result.stderr
        assert "x.npz.shards: holds another run" in result.stderr and differs in result.stderr
        assert not (tmp_path / "x.npz").exists()


class NanAt(torch.nn.Module):
    """The default network, whose output for one row turns NaN at one call (counted over the
    whole run): a model that breaks at some step of some batch."""

    def __init__(self, network, call: int, row: int):
        super().__init__()
        self.inner, self.config = network, network.config
        self.call, self.row, self.calls = call, row, 0

    def forward(self, x, t, x_self_cond=None):
        self.calls += 1
        out = self.inner(x, t, x_self_cond)
        if self.calls == self.call:
            out[self.row] = float("nan")
        return out


def test_a_model_that_turns_nan_stops_naming_the_samples_and_shard(tmp_path):
    """Batches of 2, 4 steps: call 11 is step 3 of the third batch (samples 4 and 5)."""
    pipeline = ddpm_fast.load()
    pipeline.network = NanAt(pipeline.network, call=11, row=1)
    pattern = r"samples 4\.\.5 gave NaN .* \(samples 5\): 000000004-000000006.npy not written"
    with pytest.raises(NonFiniteError, match=pattern):
        pipeline.sample_to(tmp_path / "x.npz", 8, steps=4, sampler="ddim", batch_size=2)
    shards = sorted(p.name for p in (tmp_path / "x.npz.shards").glob("*.npy"))
    assert shards == ["000000000-000000002.npy", "000000002-000000004.npy"]
    assert not (tmp_path / "x.npz").exists()
    for shard in shards:
        assert np.isfinite(np.load(tmp_path / "x.npz.shards" / shard)).all()


def test_sample_to_is_the_cli(tmp_path):
    """The API writes what the CLI writes, and refuses what it refuses."""
    from ddpm_fast.engine import Engine

    engine = Engine(ddpm_fast.load())
    engine.sample_to(tmp_path / "api.npz", 3, steps=4, sampler="ddim", batch_size=2)
    cli("sample", "--num", 3, "--batch-size", 2, *CHAIN, "--out", "cli.npz", cwd=tmp_path)
    assert (tmp_path / "api.npz").read_bytes() == (tmp_path / "cli.npz").read_bytes()
    engine.sample_to(tmp_path / "pngs", 2, steps=4, sampler="ddim")
    with pytest.raises(OutputError, match="holds another run"):
        engine.sample_to(tmp_path / "pngs", 2, steps=4, sampler="ddim", seed=1)


def test_auto_batch_size_on_the_cpu_is_the_default(tmp_path):
    pipeline = ddpm_fast.load()
    assert pipeline.auto_batch_size(1000, "cpu") == 64
    assert pipeline.auto_batch_size(5, "cpu") == 5
    output = pipeline.sample_to(tmp_path / "x.npz", 3, steps=2, sampler="ddim", batch_size="auto")
    assert np.load(output.path)["arr_0"].shape == (3, 8, 8, 1)


def test_two_ranks_share_the_batches(tmp_path):
    """The batch grid split by rank, in one process (no torchrun): rank r draws batches
    r, r + 2, ...; together they draw each image once."""
    pipeline = ddpm_fast.load()
    out = tmp_path / "pngs"
    pipeline.sample_to(out, 7, steps=3, sampler="ddim", batch_size=2, group=Group(0, 2))
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["000000.png", "000001.png", "000004.png", "000005.png"]
    pipeline.sample_to(out, 7, steps=3, sampler="ddim", batch_size=2, group=Group(1, 2))
    assert len(list(out.glob("*.png"))) == 7


def start_rank(rank: int, world: int, port: int, argv: list, cwd: Path, env: dict):
    """One rank as torchrun starts it (its environment), but with no agent over it: on several
    machines nothing kills the other ranks when one dies."""
    env = dict(
        env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    command = [sys.executable, "-m", "ddpm_fast", *map(str, argv)]
    return subprocess.Popen(command, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_named_and_a_rerun_resumes(single, tmp_path):
    """SIGKILL rank 1 of 2 once a shard is written: rank 0 stops within the barrier timeout
    with one line naming rank 1; torchrun with 3 ranks then resumes to one process's bytes."""
    argv = ["sample", "--num", 7, "--batch-size", 2, *CHAIN, "--out", "x.npz"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DDPM_FAST_BARRIER_TIMEOUT="5")
    port = random.randint(20000, 60000)
    ranks = [start_rank(r, 2, port, argv, tmp_path, env) for r in range(2)]
    shards = tmp_path / "x.npz.shards"
    deadline = time.monotonic() + 300
    while not list(shards.glob("*.npy")) and ranks[0].poll() is None:
        assert time.monotonic() < deadline, "no shard written in 300 s"
        time.sleep(0.02)
    ranks[1].kill()
    ranks[1].communicate()
    try:
        _, err = ranks[0].communicate(timeout=240)  # 3 x its slowest batch, at least 5 s
    finally:
        ranks[0].kill()
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line and not line.startswith("sampling")]
    assert ranks[0].returncode == 2, err
    assert len(lines) == 1 and "rank 1 finished no batch in" in lines[0], err
    assert not (tmp_path / "x.npz").exists()
    torchrun(3, *argv, cwd=tmp_path)
    assert (tmp_path / "x.npz").read_bytes() == single["x.npz"]
