"""The engine's use of the CPU's cores: the plan per chain (split, adaptive, fixed, pinned), the
governor's choice of thread count from step times, the split runner, the cores a process may use,
and that every plan gives the reference's images, the same bits in every run."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import ddpm_fast
from ddpm_fast.engine import Engine
from ddpm_fast.engine import threads as th
from ddpm_fast.errors import ConfigError
from ddpm_fast.samplers import step_tables

CHAIN_ATOL = 1e-4  # fp32 images in [0, 1] after a whole chain, against the reference


class FakeClock:
    """A clock whose steps take what ``cost(thread count)`` says."""

    def __init__(self, cost):
        self.now = 0.0
        self.cost = cost

    def __call__(self) -> float:
        return self.now

    def advance(self) -> None:
        self.now += self.cost(torch.get_num_threads())


def run_steps(governor: th.ThreadGovernor, clock: FakeClock, steps: int) -> list[int]:
    """The thread count of each of ``steps`` steps."""
    counts = []
    for _ in range(steps):
        counts.append(torch.get_num_threads())
        clock.advance()
        governor.step_done()
    return counts


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_governor_keeps_the_faster_count_and_follows_the_load(restore_threads):
    load = {"on": False}
    # Quiet: 2 threads 25 ms, 1 thread 31 ms. Loaded: 2 threads 105 ms, 1 thread 30 ms.
    clock = FakeClock(lambda n: {(2, False): 25, (1, False): 31, (2, True): 105, (1, True): 30}[
        (n, load["on"])
    ])  # fmt: skip
    governor = th.ThreadGovernor(2, clock=clock)
    governor.start()
    quiet = run_steps(governor, clock, 300)
    assert quiet.count(1) <= 5  # probes only, each ended after its first slow step
    assert quiet[-20:] == [2] * 20
    load["on"] = True
    loaded = run_steps(governor, clock, 300)
    assert loaded[:3].count(1) >= 1  # the jump starts a probe at once
    assert loaded[10:].count(2) <= 6  # losing probes end after one slow step, and grow apart
    load["on"] = False
    after = run_steps(governor, clock, 300)
    assert after[-100:].count(2) >= 94  # a probe found the quiet machine again: probes only


def test_a_new_chain_keeps_what_the_governor_learnt(restore_threads):
    clock = FakeClock(lambda n: 30 if n == 1 else 100)
    governor = th.ThreadGovernor(2, clock=clock)
    governor.start()
    run_steps(governor, clock, 30)
    governor.start()
    assert torch.get_num_threads() == 1


def plan(batch=16, flops=43e6, threads=None, invariant=True):
    return th.plan_threads(
        batch=batch,
        flops_per_sample=flops,
        threads=threads,
        thread_invariant=None if invariant is None else lambda n: invariant,
    )


def test_plans(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cores", lambda: (4, "4 in this process's CPU affinity"))
    small = plan()
    assert (small.threads, small.workers, small.adaptive) == (4, 1, True)
    assert "1 while the machine is loaded" in small.describe()
    assert not plan(invariant=False).adaptive
    assert "last bits" in plan(invariant=False).reason
    big = plan(flops=4e9)
    assert (big.threads, big.workers) == (1, 4)
    assert plan(batch=3, flops=4e9).workers == 3
    assert plan(batch=1, flops=4e9).workers == 1
    pinned = plan(threads=3, flops=4e9)
    assert (pinned.threads, pinned.workers, pinned.adaptive) == (3, 1, False)
    assert "threads=3" in pinned.describe()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "OMP_NUM_THREADS=1" in plan().describe() and plan().threads == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(th, "available_cores", lambda: (1, "1 CPU"))
    assert (plan(flops=4e9).threads, plan(flops=4e9).workers) == (1, 1)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"proc": "0::/job\n", "sys/job/cpu.max": "150000 100000\n"}, 1.5),
        ({"proc": "0::/job\n", "sys/job/cpu.max": "max 100000\n"}, None),
        (
            {
                "proc": "4:memory:/x\n1:cpu,cpuacct:/job\n",
                "sys/cpu,cpuacct/job/cpu.cfs_quota_us": "300000\n",
                "sys/cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
            },
            3.0,
        ),
        (
            {
                "proc": "1:cpu:/\n",
                "sys/cpu/cpu.cfs_quota_us": "-1\n",
                "sys/cpu/cpu.cfs_period_us": "100000\n",
            },
            None,
        ),
        ({"proc": "0::/gone\n"}, None),
    ],
    ids=["v2-quota", "v2-max", "v1-quota", "v1-none", "v2-no-file"],
)
def test_cgroup_quotas(tmp_path, files, expected):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert th._cgroup_cores(tmp_path / "proc", tmp_path / "sys") == expected


def test_available_cores_are_the_affinity_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(th, "_cgroup_cores", lambda *a: None)
    assert th.available_cores()[0] == 4
    monkeypatch.setattr(th, "_cgroup_cores", lambda *a: 1.5)
    cores, why = th.available_cores()
    assert cores == 2 and "quota of 1.5" in why
    monkeypatch.setattr(th, "_cgroup_cores", lambda *a: 8.0)
    assert th.available_cores()[0] == 4


def test_the_split_runs_every_part_and_reports_each_step_once(restore_threads):
    seen = []
    counts = []

    def run_part(rows, on_step):
        counts.append(torch.get_num_threads())
        for k in range(1, 6):
            on_step(k)
        return torch.arange(rows.start, rows.stop)

    out = th.run_split(run_part, 7, 3, seen.append)
    assert out.tolist() == list(range(7))
    assert seen == [1, 2, 3, 4, 5]
    assert counts == [1, 1, 1]


def test_an_error_in_one_part_stops_the_others_and_is_raised(restore_threads):
    started = threading.Barrier(2)
    stopped = []

    def run_part(rows, on_step):
        started.wait(timeout=10)
        if rows.start == 0:
            raise ValueError("part 0 failed")
        try:
            for k in range(1, 10_000):
                on_step(k)
                time.sleep(0.001)  # part 0's error comes long before the end, whatever the load
        finally:
            stopped.append(k)
        return torch.zeros(1)

    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="part 0 failed"):
        th.run_split(run_part, 4, 2, lambda k: None)
    assert stopped and stopped[0] < 9_999
    assert torch.get_num_threads() == before


@pytest.fixture(scope="module")
def default_pipeline():
    return ddpm_fast.load()


@pytest.mark.parametrize("mode", ["split", "adaptive", "pinned-1"])
def test_every_plan_gives_the_reference_images_and_the_same_bits(
    default_pipeline, monkeypatch, mode, restore_threads
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cores", lambda: (2, "2 (test)"))
    if mode == "split":
        monkeypatch.setattr(th, "SPLIT_MIN_FLOPS", 0)
    engine = Engine(default_pipeline, threads=1 if mode == "pinned-1" else None)
    kwargs = dict(sampler="ddim", steps=12, seed=5, batch_size=5)
    first = engine.sample(5, **kwargs)
    again = engine.sample(5, **kwargs)
    plan = engine.thread_plan((5, *default_pipeline.image_shape()))
    assert plan.workers == (2 if mode == "split" else 1)
    assert torch.equal(first, again)
    want = default_pipeline.sample(5, **kwargs)
    assert (want - want.mean()).abs().max() > 0.1
    torch.testing.assert_close(first, want, rtol=0, atol=CHAIN_ATOL)


def test_the_split_reports_progress_per_step(default_pipeline, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cores", lambda: (2, "2 (test)"))
    monkeypatch.setattr(th, "SPLIT_MIN_FLOPS", 0)
    engine = Engine(default_pipeline)
    seen = []
    x = torch.randn(4, *default_pipeline.image_shape())
    spec = default_pipeline.sampler_spec("ddim", 7, 0.0)
    tables = step_tables(default_pipeline.schedule, spec)
    engine._run_chain(x, tables, spec, seed=0, indices=range(4), on_step=seen.append)
    assert seen == list(range(1, 8))


def test_the_thread_check_compares_one_thread_with_many(default_pipeline, restore_threads):
    engine = Engine(default_pipeline)
    spec = default_pipeline.sampler_spec("ddim", 3, 0.0)
    chain = engine.prepare(step_tables(default_pipeline.schedule, spec), spec, "cpu")
    shape = (2, *default_pipeline.image_shape())
    calls = []
    forward = chain.network.forward

    def spy(x, step, x_self_cond=None):
        calls.append(torch.get_num_threads())
        out = forward(x, step, x_self_cond)
        return out + 1e-3 if torch.get_num_threads() == 1 else out  # as if 1 thread differed

    chain.network.forward = spy
    assert chain.thread_invariant(shape, 2) is False
    assert calls == [2, 1]
    assert chain.thread_invariant(shape, 2) is False and len(calls) == 2  # checked once


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2"])
def test_bad_thread_counts_are_config_errors(default_pipeline, bad):
    with pytest.raises(ConfigError, match="threads"):
        Engine(default_pipeline, threads=bad)
