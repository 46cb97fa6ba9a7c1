"""The sampler benchmark's plumbing (not its figures): one tiny run of the default model writes
a markdown table and a JSON report with every field, and the plot reads them back."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from ddpm_fast import bench


def bench_args(tmp_path, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    options = ["--steps", "2", "--repeats", "2", "--batch", "1", "3", "--device", "cpu"]
    args = parser.parse_args(["default", *options, "--out", str(tmp_path), "--name", "run"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    markdown = bench.main(bench_args(out))
    return out, markdown.read_text(), json.loads((out / "run.json").read_text())


def test_every_backend_and_batch_is_measured(report):
    _, _, data = report
    rows = {(r["backend"], r["batch"]) for r in data["results"]}
    assert rows == {("reference", 1), ("engine", 1), ("reference", 3), ("engine", 3)}
    for r in data["results"]:
        assert len(r["runs_ms"]) == 2 and r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
        assert r["ms_per_step"] > 0 and r["vs_reference"] > 0 and r["forward_gflop"] > 0
        assert r["of_ceiling"] > 0
        if r["backend"] == "reference":
            assert r["vs_reference"] == 1.0
    batch3 = [r["forward_gflop"] for r in data["results"] if r["batch"] == 3]
    batch1 = [r["forward_gflop"] for r in data["results"] if r["batch"] == 1]
    assert batch3[0] == pytest.approx(3 * batch1[0], rel=1e-6)  # FLOPs scale with the batch


def test_the_report_says_where_it_ran(report):
    _, markdown, data = report
    machine = data["machine"]
    for key in ("date", "torch", "triton", "onnxruntime", "cores", "cpu", "command"):
        assert key in machine
    assert data["ceiling_flops"]["fp32"] > 1e8
    assert "| backend | dtype | batch |" in markdown and "| engine | fp32 | 3 |" in markdown
    assert machine["torch"] in markdown


def test_the_plot_reads_the_report(report):
    pytest.importorskip("matplotlib")
    out, _, _ = report
    png = out / "plot.png"
    bench.plot([out / "run.json"], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(ValueError, match="steps must be at least 1"):
        bench.main(bench_args(tmp_path, steps=0))


def test_the_headline_cells_come_first():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    backends = ["compile", "reference", "engine", "engine-eager"]
    args = parser.parse_args(
        ["--batch", "1", "64", "--dtype", "bf16", "fp32", "--backends", *backends]
    )
    order = bench.cells(args)
    assert order[:6] == [
        (1, "bf16", "engine"),  # the headline first
        (1, "bf16", "engine-eager"),
        (1, "fp32", "engine"),
        (1, "fp32", "engine-eager"),
        (1, "fp32", "reference"),
        (1, "fp32", "compile"),  # what compiles the reference runs in its dtype only
    ]
    assert order[6:] == [(64, *cell[1:]) for cell in order[:6]]


class Recorder:
    """A backend that records the cuDNN TF32 flag it samples under, around the real one."""

    def __init__(self, inner, seen: list, name: str, dtype: str):
        self.inner, self.seen, self.name, self.dtype = inner, seen, name, dtype

    def sample(self, *args, **kwargs):
        import torch

        self.seen.append((self.name, self.dtype, torch.backends.cudnn.allow_tf32))
        return self.inner.sample(*args, **kwargs)


def test_each_cell_is_saved_and_fp32_runs_without_tf32(tmp_path, monkeypatch):
    seen, saved = [], []
    make = bench.make_backend

    def recording(name, pipeline, dtype, device, workdir, threads=None):
        return Recorder(make(name, pipeline, dtype, device, workdir, threads), seen, name, dtype)

    monkeypatch.setattr(bench, "make_backend", recording)
    monkeypatch.setattr(bench, "matmul_ceiling", lambda *a: 1e9)  # a bf16 4096^3 is slow on CPUs
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default
    args = bench_args(tmp_path, batch=[1], dtype=["bf16", "fp32"], repeats=1, steps=1)
    report = bench.run(args, save=lambda r: saved.append(len(r["results"])))
    assert saved == [1, 2, 3]  # one save per cell
    assert [(r["backend"], r["dtype"]) for r in report["results"]] == [
        ("engine", "bf16"),
        ("engine", "fp32"),
        ("reference", "fp32"),
    ]
    reference = report["results"][2]["ms_per_step"]  # ratios filled in once it is measured
    for r in report["results"]:
        assert r["vs_reference"] == pytest.approx(reference / r["ms_per_step"])
    assert {(name, dtype, tf32) for name, dtype, tf32 in seen} == {
        ("reference", "fp32", False),
        ("engine", "bf16", True),
        ("engine", "fp32", False),
    }
    assert [r["cudnn_tf32"] for r in report["results"]] == [True, False, False]
    assert torch.backends.cudnn.allow_tf32  # restored after each cell


def test_counting_flops_leaves_the_network_where_it_is():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    pipeline = bench.model_pipeline("default")
    network = pipeline.network
    before = [(p.device, p.data_ptr()) for p in network.parameters()]
    floor = bench.network_floor(pipeline, 3)
    assert [(p.device, p.data_ptr()) for p in network.parameters()] == before
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(torch.zeros(3, *pipeline.image_shape()), torch.zeros(3, dtype=torch.long))
    assert floor["flops"] == counter.get_total_flops() > 0


def test_the_cpu_report_has_peak_memory_and_the_thread_plan(report):
    _, markdown, data = report
    for r in data["results"]:
        assert r["peak_memory_mb"] > 50  # torch alone is more: a resident size, not a "-"
        assert r["threads"] and r["loaded_ms_per_step"] is None
    assert "CPU threads:" in markdown and "- engine, batch 3:" in markdown
    assert "Under load" not in markdown


def test_under_load_times_every_cell_again_beside_busy_processes(tmp_path, monkeypatch):
    started = []

    class Busy(bench.BusyProcesses):  # counted, and short: the test is about the plumbing
        def __enter__(self):
            started.append(self.count)
            return super().__enter__()

    monkeypatch.setattr(bench, "BusyProcesses", Busy)
    args = bench_args(tmp_path, batch=[2], backends=["engine"], repeats=1, under_load=1)
    markdown = bench.main(args).read_text()
    data = json.loads((tmp_path / "run.json").read_text())
    (r,) = data["results"]
    assert started == [1] and len(r["loaded_runs_ms"]) == 1 and r["loaded_ms_per_step"] > 0
    assert r["busy_processes"] == 1
    assert "with 1 busy, ms/step" in markdown and "| engine | fp32 | 2 |" in markdown


def test_busy_processes_spin_and_are_gone_after(tmp_path):
    with bench.BusyProcesses(2) as busy:
        assert all(p.poll() is None for p in busy.processes)
    assert all(p.poll() is not None for p in busy.processes)


def test_a_second_report_of_the_day_does_not_overwrite_the_first(tmp_path):
    assert bench.unused_name(tmp_path, "sampler-cpu-x") == "sampler-cpu-x"
    (tmp_path / "sampler-cpu-x.md").write_text("first")
    assert bench.unused_name(tmp_path, "sampler-cpu-x") == "sampler-cpu-x-2"
    (tmp_path / "sampler-cpu-x-2.json").write_text("second")
    assert bench.unused_name(tmp_path, "sampler-cpu-x") == "sampler-cpu-x-3"


def test_peak_resident_memory_sees_an_allocation_freed_inside():
    with bench.PeakResident(interval=0.001) as quiet:
        pass
    with bench.PeakResident(interval=0.001) as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    assert peak.peak - quiet.peak > 50


def test_a_dpm_solver_chain_is_measured(tmp_path, monkeypatch):
    """``bench --sampler dpm++2m --steps 20`` runs every backend on that chain (the figures are
    not checked here)."""
    from ddpm_fast.pipeline import Pipeline

    chains = []
    real = Pipeline.sample_batches

    def spy(self, num, **options):
        chains.append((options["sampler"], options["steps"]))
        return real(self, num, **options)

    monkeypatch.setattr(Pipeline, "sample_batches", spy)
    args = bench_args(tmp_path, sampler="dpm++2m", steps=20, repeats=1, batch=[2])
    text = bench.main(args).read_text()
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["sampler"] == "dpm++2m" and "sampler dpm++2m" in text
    assert {r["backend"] for r in data["results"]} == {"reference", "engine"}
    assert set(chains) == {("dpm++2m", 20)}
