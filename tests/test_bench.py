"""The sampler benchmark's plumbing (not its figures): one tiny run of the default model writes
a markdown table and a JSON report with every field, and the plot reads them back."""

from __future__ import annotations

import argparse
import json
import mmap
import sys
import time
from pathlib import Path

import pytest
import torch

import ddpm_fast
from ddpm_fast import bench
from ddpm_fast.bench import cli, diffusers_backend, measure, models
from ddpm_fast.bench import report as reporting
from ddpm_fast.errors import ConfigError
from ddpm_fast.schedule import ScheduleConfig

from .helpers import rel_error

DIFFUSERS_FOLDER = Path(__file__).parent / "fixtures" / "diffusers" / "ddpm_cifar10_small"


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
    for key in ("date", "torch", "triton", "onnxruntime", "diffusers", "cores", "cpu", "command"):
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
    order = cli.cells(args)
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

    def recording(name, pipeline, dtype, device, workdir, threads=None, classifier=None):
        sampler = make(name, pipeline, dtype, device, workdir, threads, classifier=classifier)
        return Recorder(sampler, seen, name, dtype)

    monkeypatch.setattr(cli, "make_backend", recording)
    # a bf16 4096^3 is slow on CPUs
    monkeypatch.setattr(cli, "torch_matmul_ceiling", lambda *a: 1e9)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default
    args = bench_args(tmp_path, batch=[1], dtype=["bf16", "fp32"], repeats=1, steps=1)
    report = cli.run(args, save=lambda r: saved.append(len(r["results"])))
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
    floor = measure.network_floor(pipeline, 3)
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

    class Busy(measure.BusyProcesses):  # counted, and short: the test is about the plumbing
        def __enter__(self):
            started.append(self.count)
            return super().__enter__()

    monkeypatch.setattr(cli, "BusyProcesses", Busy)
    args = bench_args(tmp_path, batch=[2], backends=["engine"], repeats=1, under_load=1)
    markdown = bench.main(args).read_text()
    data = json.loads((tmp_path / "run.json").read_text())
    (r,) = data["results"]
    assert started == [1] and len(r["loaded_runs_ms"]) == 1 and r["loaded_ms_per_step"] > 0
    assert r["busy_processes"] == 1
    assert "with 1 busy, ms/step" in markdown and "| engine | fp32 | 2 |" in markdown


def test_busy_processes_spin_and_are_gone_after(tmp_path):
    with measure.BusyProcesses(2) as busy:
        assert all(p.poll() is None for p in busy.processes)
    assert all(p.poll() is not None for p in busy.processes)


def test_a_second_report_of_the_day_does_not_overwrite_the_first(tmp_path):
    assert reporting.unused_name(tmp_path, "sampler-cpu-x") == "sampler-cpu-x"
    (tmp_path / "sampler-cpu-x.md").write_text("first")
    assert reporting.unused_name(tmp_path, "sampler-cpu-x") == "sampler-cpu-x-2"
    (tmp_path / "sampler-cpu-x-2.json").write_text("second")
    assert reporting.unused_name(tmp_path, "sampler-cpu-x") == "sampler-cpu-x-3"


def test_a_second_run_with_the_same_name_keeps_the_first(report):
    out, markdown, _ = report
    args = bench_args(out, backends=["reference"], batch=[1], steps=1, repeats=1)
    second = bench.main(args)
    assert second.name == "run-2.md" and (out / "run-2.json").is_file()
    assert (out / "run.md").read_text() == markdown


def test_peak_resident_memory_sees_an_allocation_freed_inside():
    with measure.PeakResident(interval=0.001) as quiet:
        pass
    with measure.PeakResident(interval=0.001) as peak:
        # Fresh anonymous pages, touched: a malloc'd block (torch.ones) can reuse freed heap
        # pages that are still resident late in a long test session, and then RSS does not move.
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\1" * len(block))
        time.sleep(0.05)
        block.close()
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


# the bench models


@pytest.mark.parametrize(
    ("name", "family", "parameters"),
    [
        ("ddpm-cifar10", "diffusers-unet2d", 35_746_307),
        ("dd2-cifar10", "dd-pytorch-v2", 35_711_491),
        ("cifar10", "dd-pytorch-v1", None),
    ],
)
def test_the_named_models_are_seeded_random_networks(name, family, parameters):
    pipeline = bench.model_pipeline(name)
    assert pipeline.config.family == family and pipeline.image_shape() == (3, 32, 32)
    if parameters is not None:  # 35.7M, as issue 12 and the README say
        assert pipeline.num_parameters() == parameters
    again = bench.model_pipeline(name).network.state_dict()
    for key, value in pipeline.network.state_dict().items():
        assert torch.equal(value, again[key]), key  # seeded: the same weights every call
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    with torch.no_grad():
        out = pipeline.network(x, torch.tensor([500]))
    assert torch.isfinite(out).all() and out.std() > 1e-2  # not a network of zeros


def test_ddpm_cifar10_is_google_s_architecture_and_scheduler():
    pipeline = bench.model_pipeline("ddpm-cifar10")
    config = pipeline.config
    assert config.block_out_channels == (128, 256, 256, 256) and config.layers_per_block == 2
    assert config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                       "DownBlock2D")  # fmt: skip
    assert config.up_block_types == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert (config.norm_num_groups, config.norm_eps, config.freq_shift) == (32, 1e-6, 1)
    assert not config.flip_sin_to_cos and config.downsample_padding == 0
    assert config.attention_head_dim is None
    diffusion = pipeline.diffusion
    assert diffusion.schedule.name == "diffusers_linear" and diffusion.schedule.timesteps == 1000
    assert diffusion.schedule.kwargs == {"beta_start": 0.0001, "beta_end": 0.02}
    assert (diffusion.objective, diffusion.variance) == ("pred_noise", "fixed_large")


def test_dd2_cifar10_is_the_2x_default_unet():
    config = bench.model_pipeline("dd2-cifar10").config
    assert (config.dim, config.dim_mults) == (64, (1, 2, 4, 8))
    assert config.full_attn == (False, False, False, True)  # 2.x's default: the last stage
    assert config.attn_heads == (4,) * 4 and config.attn_dim_head == (32,) * 4


def test_bench_help_lists_the_models(capsys):
    from ddpm_fast.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in bench.MODELS:
        assert f"{name}:" in text
    assert "diffusers" in text


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ddpm-cifar10", "dd2-cifar10"])
def test_a_new_model_runs_on_the_reference_and_the_engine(tmp_path, model):
    """``bench ddpm-cifar10 --batch 1 --steps 2 --backends reference engine``."""
    args = bench_args(tmp_path, model=model, batch=[1], repeats=1)
    bench.main(args)
    data = json.loads((tmp_path / "run.json").read_text())
    assert [(r["backend"], r["batch"]) for r in data["results"]] == [("engine", 1),
                                                                      ("reference", 1)]  # fmt: skip
    assert data["parameters"] > 35e6 and model in data["model"]


# the diffusers backend


def test_without_diffusers_the_backend_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    args = bench_args(tmp_path, model="ddpm-cifar10", backends=["reference", "diffusers"])
    with pytest.raises(ConfigError, match=r"needs diffusers: pip install 'ddpm-fast\[bench\]'"):
        bench.main(args)
    assert not (tmp_path / "run.json").exists()  # refused before any cell


def test_the_diffusers_backend_is_for_diffusers_models_and_their_schedules(tmp_path):
    pytest.importorskip("diffusers")
    args = bench_args(tmp_path, backends=["diffusers"])  # the embedded model is 1.x
    with pytest.raises(ConfigError, match="runs diffusers-unet2d models"):
        bench.main(args)
    with pytest.raises(ConfigError, match="--sampler ddpm only"):
        bench.main(bench_args(tmp_path, model="ddpm-cifar10", backends=["diffusers"],
                              sampler="ddim"))  # fmt: skip
    pipeline = bench.model_pipeline("ddpm-cifar10")
    pipeline.diffusion.schedule = ScheduleConfig("sigmoid", 1000)  # not one of diffusers'
    with pytest.raises(ConfigError, match="needs a diffusers beta schedule"):
        diffusers_backend.ddpm_scheduler_config(pipeline.diffusion)


def test_the_scheduler_config_is_google_s():
    pipeline = bench.model_pipeline("ddpm-cifar10")
    config = diffusers_backend.ddpm_scheduler_config(pipeline.diffusion)
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "clip_sample",
                "variance_type"):  # fmt: skip
        assert config[key] == models.DDPM_CIFAR10_SCHEDULER[key], key
    assert config["prediction_type"] == "epsilon"


def test_diffusers_unet_holds_the_same_weights_and_computes_the_same_forward():
    """The weights' mapping (ddpm-fast keys -> diffusers') is exact: one forward of diffusers'
    UNet2DModel built by the backend and of the reference within 1e-5."""
    pytest.importorskip("diffusers")
    pipeline = bench.model_pipeline("ddpm-cifar10")
    backend = diffusers_backend.DiffusersBackend(pipeline, "cpu")
    unet = backend.pipeline.unet
    assert unet.dtype == torch.float32 and unet.config.sample_size == 32
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=generator) * 0.9 + 0.05
    t = torch.tensor([999, 17])
    with torch.no_grad():
        ours = pipeline.network(x, t)
        theirs = unet(x, t).sample
    assert rel_error(theirs, ours) <= 1e-5


def test_the_from_diffusers_row_gives_the_diffusers_rows_images():
    """The drop-in around the diffusers backend's own pipeline object, with the same generator."""
    pytest.importorskip("diffusers")
    pipeline = ddpm_fast.load(DIFFUSERS_FOLDER)
    call = dict(batch_size=2, steps=5, seed=1, device="cpu")
    theirs = diffusers_backend.DiffusersBackend(pipeline, "cpu").sample(2, **call)
    ours = diffusers_backend.FromDiffusersBackend(pipeline, "cpu", "fp32").sample(2, **call)
    assert ((theirs > 0.01) & (theirs < 0.99)).float().mean() > 0.5
    assert (ours - theirs).abs().max() <= 5e-4


def test_the_diffusers_backend_is_timed_like_the_others(tmp_path):
    pytest.importorskip("diffusers")
    args = bench_args(tmp_path, model="ddpm-cifar10", batch=[2], repeats=1, steps=2,
                      backends=["reference", "diffusers"])  # fmt: skip
    bench.main(args)
    data = json.loads((tmp_path / "run.json").read_text())
    assert [r["backend"] for r in data["results"]] == ["reference", "diffusers"]
    assert data["machine"]["diffusers"] == "0.42.1"  # the pinned version, in the report
    assert "diffusers 0.42.1" in (tmp_path / "run.md").read_text()
    (r,) = [r for r in data["results"] if r["backend"] == "diffusers"]
    assert r["dtype"] == "fp32" and r["batch"] == 2 and r["ms_per_step"] > 0
    assert r["vs_reference"] > 0 and "PyTorch threads" in r["threads"]
    images = diffusers_backend.DiffusersBackend(bench.model_pipeline("ddpm-cifar10"), "cpu").sample(
        3, batch_size=3, steps=2, seed=0, device="cpu"
    )
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_classifier_adds_guided_rows_set_against_the_guided_reference(tmp_path, monkeypatch):
    """--classifier: each guided backend twice (unguided, then +guided), ratios within each."""
    from ddpm_fast.bench import models as bench_models

    adm = Path(__file__).parent / "fixtures" / "adm"
    flags = json.loads((adm / "guided_uncond.json").read_text())
    pipeline = ddpm_fast.load(adm / "guided_uncond.pt", **flags)
    classifier_flags = json.loads((adm / "classifier_attention.json").read_text())
    guide = ddpm_fast.load_classifier(
        adm / "classifier_attention.pt", num_head_channels=16, **classifier_flags
    )
    monkeypatch.setattr(cli, "model_pipeline", lambda model: pipeline)
    monkeypatch.setattr(cli, "model_classifier", lambda model: guide)
    monkeypatch.setattr(cli, "torch_matmul_ceiling", lambda *a: 1e9)
    args = bench_args(tmp_path, batch=[1], repeats=1, steps=2, classifier=True)
    report = cli.run(args)
    rows = {r["backend"]: r for r in report["results"]}
    assert list(rows) == ["engine", "engine+guided", "reference", "reference+guided"]
    assert rows["reference+guided"]["vs_reference"] == 1.0 == rows["reference"]["vs_reference"]
    guided = rows["reference+guided"]["ms_per_step"] / rows["engine+guided"]["ms_per_step"]
    assert rows["engine+guided"]["vs_reference"] == pytest.approx(guided)
    assert "classifier" in report
    with pytest.raises(ConfigError, match="has classifiers for"):
        bench_models.model_classifier("cifar10")


def test_the_cost_model_counts_the_engines_launches_and_adds_them_up():
    """step_cost on the meta device: the launches do not depend on the batch, the bytes and
    FLOPs grow with it, and a prediction is its launches' roofline times plus their cost."""
    import dataclasses

    from ddpm_fast.engine import step_cost

    pipeline = ddpm_fast.load()
    one, four = (step_cost.count_step(pipeline, b) for b in (1, 4))
    assert one.counts() == four.counts() and one.total > 10
    assert one.bytes < four.bytes and one.flops < four.flops
    assert one.counts()["triton sampler_step_kernel"] == 1
    gpu = step_cost.GPUS["H100"]
    p = step_cost.predict(four, gpu, "fp32")
    assert p.launch_s == pytest.approx(four.total * gpu.launch_s)
    free = step_cost.predict(four, dataclasses.replace(gpu, launch_s=0.0), "fp32")
    assert p.step_s == pytest.approx(free.step_s + p.launch_s)
    # sum of max(bytes / bandwidth, flops / peak) >= all the bytes at the bandwidth
    assert free.step_s >= four.bytes / gpu.bandwidth * (1 - 1e-9)
    half = step_cost.count_step(pipeline, 4, torch.bfloat16)
    assert half.bytes < four.bytes  # bf16 activations and weights


def test_the_auto_batch_follows_the_cost_model_within_a_memory_budget(monkeypatch):
    """``batch_size="auto"`` on CUDA, here with a fake device and memory budget: the largest
    batch memory holds, but no larger than the smallest power of two within 5% of the best
    predicted images per second (the cost model's; a bigger batch then gains little)."""
    from ddpm_fast.bench import model_pipeline
    from ddpm_fast.engine import Engine, step_cost
    from ddpm_fast.engine import engine as engine_module
    from ddpm_fast.pipeline import Pipeline

    pipeline = model_pipeline("cifar10")
    gpu = step_cost.GPUS["H200"]
    network = step_cost.gpu_network(pipeline, torch.float32)

    def rate(batch):
        step = step_cost.count_network(network, (batch, *pipeline.image_shape()))
        return batch / step_cost.predict(step, gpu, "fp32").step_s

    chosen = step_cost.throughput_batch(pipeline, 1000, torch.float32, gpu)
    best = max(rate(b) for b in [1 << k for k in range(10)] + [1000])
    assert 1 < chosen < 1000 and chosen & (chosen - 1) == 0  # the seed's knee: 128 on an H200
    assert rate(chosen) >= 0.95 * best > rate(chosen // 2)
    assert step_cost.throughput_batch(pipeline, 3, torch.float32, gpu) <= 3
    # The engine on "CUDA": the memory budget (the pipeline's measurement) caps it.
    monkeypatch.setattr(Pipeline, "auto_batch_size", lambda self, num, device=None: min(num, 700))
    monkeypatch.setattr(engine_module, "resolve_device", lambda d, default: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    engine = Engine(pipeline)
    assert engine.auto_batch_size(5000) == chosen
    assert engine.auto_batch_size(2) == step_cost.throughput_batch(pipeline, 2, torch.float32, gpu)
