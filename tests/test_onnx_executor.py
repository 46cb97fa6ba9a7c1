"""The engine's ONNX Runtime executor on the CPU (ddpm_fast.engine.onnx_executor): its chains are
the reference's for every family and sampler, under every thread plan; its executor file is cached
safely; without onnxruntime the engine says so or falls back."""

from __future__ import annotations

import logging
import os

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import ddpm_fast
from ddpm_fast.cli import main
from ddpm_fast.engine import Engine
from ddpm_fast.engine import onnx_executor as ox
from ddpm_fast.engine import threads as th
from ddpm_fast.errors import ConfigError
from ddpm_fast.folding import fold_weights
from ddpm_fast.machine import prune_cache
from ddpm_fast.samplers import step_tables

from .families import CASES, random_network, random_pipeline

CHAIN_ATOL = 1e-4  # images in [0, 1], a whole chain in fp32


@pytest.fixture(scope="module")
def default_pipeline():
    return ddpm_fast.load()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of this test only: each test sees its own exports."""
    monkeypatch.setenv("DDPM_FAST_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "executor-files"


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def assert_reference(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.isfinite(want).all() and (want - want.mean()).abs().max() > 0.05
    torch.testing.assert_close(got, want, rtol=0, atol=CHAIN_ATOL)


@pytest.mark.parametrize(
    "chain",
    [
        dict(sampler="ddpm", steps=15),
        dict(sampler="ddim", steps=8, eta=0.5),
        dict(sampler="dpm++2m", steps=8),  # carries x0 of the step before
        dict(sampler="dpm++2m-sde", steps=8),
    ],
)
def test_default_model_chains_are_the_reference(default_pipeline, cache, chain):
    engine = Engine(default_pipeline, cpu_executor="onnxruntime")
    got = engine.sample(3, seed=4, **chain)
    assert engine.executor()[0] == "onnxruntime" and list(cache.glob("*.onnx"))
    assert_reference(got, default_pipeline.sample(3, seed=4, **chain))


@pytest.mark.parametrize("name", CASES)
def test_every_family_runs_on_onnxruntime(name, cache):
    """Self-conditioning, learned variance, memory key/values, Fourier features: one file per
    family case, fed each step's rows."""
    pipeline = random_pipeline(name, steps=50)
    kwargs = dict(sampler="ddpm", steps=5, seed=3)
    got = Engine(pipeline, cpu_executor="onnxruntime").sample(2, **kwargs)
    assert_reference(got, pipeline.sample(2, **kwargs))


def assert_block(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32's per-op tolerance, relative to the output's size."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_the_onnx_form_of_each_block_is_the_reference_block():
    """The blocks as the executor file runs them, on random inputs (a mean that is not zero, gains
    that are not one), within fp32's per-op tolerance of the reference block: 1.x's and 2.x's
    attentions at two image sizes (2.x's with their memory slots, full and linear), both
    versions' norm blocks without time scale/shift."""
    from ddpm_fast.engine.families import dd_pytorch_v1_onnx as v1
    from ddpm_fast.engine.families import dd_pytorch_v2_onnx as v2

    one = random_network("v1-selfcond-learned-var")
    two = random_network("v2-selfcond-learned-var-full-attn")
    torch.manual_seed(1)
    blocks = [
        (one.downs[0][2], v1.TokenLinearAttention, True),
        (one.ups[-1][2], v1.TokenLinearAttention, True),
        (one.mid_attn, v1.TokenAttention, True),
        (two.downs[0][2], v2.TokenAttention, False),  # full_attn=(True, False)
        (two.downs[1][2], v2.TokenLinearAttention, False),
        (two.mid_attn, v2.TokenAttention, False),
    ]
    for block, form, residual in blocks:
        fast = form(block)
        channels = fast.channels
        for size in (4, 8):
            x = torch.randn(3, channels, size, size) * 2 + 0.5
            want = block(x)
            got = fast(x)
            assert got.shape == want.shape and (want - x * residual).abs().max() > 0.1
            assert_block(got, want)
    for form, network in ((v1.AffineBlock, one), (v2.RmsBlock, two)):
        block = fold_weights(network).downs[0][0].block2  # no time scale/shift: its own gain
        x = torch.randn(3, block.proj.in_channels, 8, 8) + 0.5
        assert_block(form(block)(x), block(x))


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][0].startswith("dd-pytorch")])
def test_the_onnx_form_is_the_reference_network(name):
    """A family's whole folded network with its onnx_form swaps, fed its time rows
    (onnx_time_rows where the family has them), is the reference network."""
    from ddpm_fast.engine.families import mapping

    network = random_network(name)
    fast = mapping(CASES[name][0])
    swapped = fold_weights(network)
    fast.onnx_form(swapped)
    x, x_self_cond = torch.randn(2, network.channels, 8, 8), torch.rand(2, network.channels, 8, 8)
    t = torch.tensor([3, 40])
    rows = network.time_conditioning(t)
    if hasattr(fast, "onnx_time_rows"):
        rows = fast.onnx_time_rows(network, rows)
    want = network(x, t, x_self_cond)
    got = swapped.forward_conditioned(x, rows, x_self_cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_a_one_x_executor_file_holds_the_onnx_form(cache):
    """The swaps reach the file: two fused LayerNormalizations per stage and one in the middle,
    no Einsum (the reference's attention) and no Transpose of the downsampling's unshuffle."""
    import onnx

    pipeline = random_pipeline("v1-selfcond-learned-var", steps=50)
    Engine(pipeline, cpu_executor="onnxruntime").sample(1, sampler="ddim", steps=2, seed=0)
    (path,) = cache.glob("*.onnx")
    nodes = onnx.load(path, load_external_data=False).graph.node
    stages = len(pipeline.network.downs) + len(pipeline.network.ups)
    assert sum(node.op_type == "LayerNormalization" for node in nodes) == 2 * stages + 1
    assert not [node.name for node in nodes if node.op_type == "Einsum"]
    unshuffles = [n.name for n in nodes if n.op_type == "Transpose" and ".3/" in n.name]
    assert not unshuffles and any(n.op_type == "Transpose" for n in nodes)


@pytest.mark.parametrize("mode", ["split", "whole", "pinned-1", "pinned-2"])
def test_every_thread_plan_gives_the_reference_images(
    default_pipeline, cache, monkeypatch, mode, restore_threads
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cores", lambda: (2, "2 (test)"))
    threads = {"pinned-1": 1, "pinned-2": 2}.get(mode)
    engine = Engine(default_pipeline, threads=threads, cpu_executor="onnxruntime")
    batch = 1 if mode == "whole" else 4
    kwargs = dict(sampler="ddim", steps=10, seed=6, batch_size=batch)
    first = engine.sample(batch, **kwargs)
    plan = engine.thread_plan((batch, *default_pipeline.image_shape()))
    assert plan.workers == (2 if mode == "split" else 1)
    assert torch.equal(engine.sample(batch, **kwargs), first)  # the same bits every run
    assert_reference(first, default_pipeline.sample(batch, **kwargs))


def test_the_split_reports_progress_once_per_step(
    default_pipeline, cache, monkeypatch, restore_threads
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cores", lambda: (2, "2 (test)"))
    engine = Engine(default_pipeline, cpu_executor="onnxruntime")
    spec = default_pipeline.sampler_spec("ddim", 6, 0.0)
    tables = step_tables(default_pipeline.schedule, spec)
    seen = []
    x = torch.randn(4, *default_pipeline.image_shape())
    engine._run_chain(x, tables, spec, seed=0, indices=range(4), on_step=seen.append)
    assert seen == list(range(1, 7))


def test_sessions_fix_the_batch_and_the_least_recently_used_go(
    default_pipeline, cache, monkeypatch
):
    """Each batch size gets its own session (the file's batch axis fixed); past MAX_SESSIONS the
    least recently used is dropped, and a batch seen again opens a new one."""
    monkeypatch.setattr(ox, "MAX_SESSIONS", 2)
    engine = Engine(default_pipeline, threads=1, cpu_executor="onnxruntime")
    kwargs = dict(sampler="ddim", steps=3, seed=5)
    for batch in (1, 2, 3, 1):
        got = engine.sample(batch, batch_size=batch, **kwargs)
        assert_reference(got, default_pipeline.sample(batch, batch_size=batch, **kwargs))
    sessions = engine.executor_sessions()._sessions
    batches = [key[2] for key in sessions]
    assert batches == [3, 1]
    session = sessions[next(iter(sessions))]
    assert session.get_inputs()[0].shape[0] == 3  # fixed, not "batch"


def test_the_chains_of_an_engine_share_its_sessions(default_pipeline, cache, monkeypatch):
    """Another sampler or chain length reads the same executor file: it opens no session of its
    own (nor a second thread check), and its images are still the reference's."""
    engine = Engine(default_pipeline, threads=1, cpu_executor="onnxruntime")
    engine.sample(2, sampler="ddim", steps=3, seed=5)
    opened = []
    real_open = ox.executor_session
    monkeypatch.setattr(
        ox, "executor_session", lambda *args: opened.append(args) or real_open(*args)
    )
    for chain in (dict(sampler="ddpm", steps=4), dict(sampler="ddim", steps=5, eta=0.5)):
        got = engine.sample(2, seed=5, **chain)
        assert_reference(got, default_pipeline.sample(2, seed=5, **chain))
    assert opened == []
    engine.sample(3, sampler="ddpm", steps=4, seed=5)  # a new batch size: a new session
    assert len(opened) == 1


def test_the_executor_file_is_exported_once_and_reused(default_pipeline, cache, monkeypatch):
    kwargs = dict(sampler="ddim", steps=4, seed=1)
    first = Engine(default_pipeline, cpu_executor="onnxruntime").sample(2, **kwargs)
    files = sorted(cache.glob("*"))  # no temporary file left: the file and its seal
    assert [p.suffix for p in files] == [".json", ".onnx"] and files[0].stem == files[1].stem

    def no_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(ox, "export_executor_file", no_export)
    # A new engine, and another chain of the same model: the same file serves both.
    again = Engine(default_pipeline, cpu_executor="onnxruntime")
    assert torch.equal(again.sample(2, **kwargs), first)
    again.sample(2, sampler="ddpm", steps=3, seed=1)


def test_only_the_most_recently_used_executor_files_are_kept(default_pipeline, cache, monkeypatch):
    """A new version or an edited checkout exports new files: the old ones are pruned, and an
    engine whose file was pruned exports it again."""
    monkeypatch.setattr(ox, "MAX_EXECUTOR_FILES", 1)
    ddim = dict(sampler="ddim", steps=3, seed=2)
    first = Engine(default_pipeline, cpu_executor="onnxruntime")
    images = first.sample(2, **ddim)
    (ddim_file,) = cache.glob("*.onnx")
    # DPM-Solver++ carries x0_prev: another file, and the older one goes.
    Engine(default_pipeline, cpu_executor="onnxruntime").sample(2, sampler="dpm++2m", steps=3)
    (kept,) = cache.glob("*.onnx")
    assert kept != ddim_file and not ddim_file.exists()
    again = Engine(default_pipeline, cpu_executor="onnxruntime").sample(2, **ddim)
    assert torch.equal(again, images)
    assert [p.name for p in cache.glob("*.onnx")] == [ddim_file.name]
    assert torch.equal(first.sample(3, **ddim)[:2], images)  # a new session: its file is back


def test_executor_files_beyond_the_byte_budget_are_pruned(default_pipeline, cache, monkeypatch):
    """Larger models' files fill the disk long before eight are kept: a byte budget prunes the
    older ones, never the file just exported."""
    monkeypatch.setattr(ox, "MAX_EXECUTOR_BYTES", 1)  # below any file's size
    Engine(default_pipeline, cpu_executor="onnxruntime").sample(2, sampler="ddim", steps=3)
    (ddim_file,) = cache.glob("*.onnx")
    Engine(default_pipeline, cpu_executor="onnxruntime").sample(2, sampler="dpm++2m", steps=3)
    (kept,) = cache.glob("*.onnx")
    assert kept != ddim_file and not ddim_file.exists()


def test_the_cache_keeps_the_most_recent_files_within_the_budget(tmp_path):
    def entry(name, size, form_size, age):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(b"x" * size)
        if form_size:
            path.with_suffix(".form").write_bytes(b"y" * form_size)
        os.utime(path, (1e9 - age, 1e9 - age))

    entry("newest", 50, 40, 0)
    entry("second", 5, 0, 1)  # 95 bytes so far
    entry("third", 3, 3, 2)  # its form takes the total past 100
    entry("oldest", 1, 0, 3)  # within the budget alone, but older than a removed entry
    prune_cache(tmp_path, "*.onnx", keep=8, suffixes=(".form",), max_bytes=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "newest.form",
        "newest.onnx",
        "second.onnx",
    ]
    prune_cache(tmp_path, "*.onnx", keep=8, suffixes=(".form",), max_bytes=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["newest.form", "newest.onnx"]
    prune_cache(tmp_path, "*.onnx", keep=1, suffixes=(".form",))  # no budget: the count alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["newest.form", "newest.onnx"]


def test_the_key_changes_with_the_weights_and_the_versions(default_pipeline, monkeypatch):
    key = ox.file_key(default_pipeline, (8, 8), False, False)
    assert ox.file_key(default_pipeline, (8, 8), False, False) == key
    assert ox.file_key(default_pipeline, (16, 16), False, False) != key
    assert ox.file_key(default_pipeline, (8, 8), False, True) != key
    other = ddpm_fast.load()
    with torch.no_grad():
        next(other.network.parameters()).view(-1)[0] += 1e-3
    assert ox.file_key(other, (8, 8), False, False) != key
    monkeypatch.setattr(ox.torch, "__version__", "0.0-test")
    assert ox.file_key(default_pipeline, (8, 8), False, False) != key


def test_a_damaged_file_is_exported_again(default_pipeline, cache, caplog):
    kwargs = dict(sampler="ddim", steps=4, seed=2)
    want = Engine(default_pipeline, cpu_executor="onnxruntime").sample(2, **kwargs)
    (path,) = cache.glob("*.onnx")
    path.write_bytes(b"not an onnx file")
    got = Engine(default_pipeline, cpu_executor="onnxruntime").sample(2, **kwargs)
    assert torch.equal(got, want)
    assert "exporting it again" in caplog.text
    assert path.stat().st_size > 1000


def test_a_cache_folder_that_cannot_be_written_exports_for_this_process(
    default_pipeline, tmp_path, monkeypatch, caplog
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DDPM_FAST_CACHE_DIR", str(blocker / "cache"))
    kwargs = dict(sampler="ddim", steps=4, seed=2)
    got = Engine(default_pipeline, cpu_executor="onnxruntime").sample(2, **kwargs)
    assert_reference(got, default_pipeline.sample(2, **kwargs))
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.startswith("cannot write the engine's executor file into")


def test_the_thread_check_compares_sessions(default_pipeline, cache):
    engine = Engine(default_pipeline, cpu_executor="onnxruntime")
    spec = default_pipeline.sampler_spec("ddim", 3, 0.0)
    chain = engine.prepare(step_tables(default_pipeline.schedule, spec), spec, "cpu")
    shape = (2, *default_pipeline.image_shape())
    real = chain.chain.session
    asked = []

    def spy(shape, threads):
        asked.append(threads)
        session = real(shape, threads)
        if threads == 1:

            class Shifted:  # as if one thread gave other bits
                def run(self, names, feeds):
                    return [out + 1e-3 for out in session.run(names, feeds)]

            return Shifted()
        return session

    chain.chain.session = spy
    assert chain.thread_invariant(shape, 2) is False
    assert asked == [2, 1]
    assert chain.thread_invariant(shape, 2) is False and len(asked) == 2  # checked once


def test_without_onnxruntime_auto_runs_pytorch_and_asking_for_it_is_an_error(
    default_pipeline, monkeypatch
):
    monkeypatch.setattr(ox, "missing_packages", lambda: ["onnxruntime"])
    engine = Engine(default_pipeline, cpu_executor="auto")
    executor, why = engine.executor()
    assert executor == "torch" and "onnxruntime not installed" in why
    with pytest.raises(ConfigError, match=r"needs onnxruntime: pip install 'ddpm-fast\[onnx\]'"):
        Engine(default_pipeline, cpu_executor="onnxruntime")


def test_half_precision_runs_pytorch(default_pipeline):
    assert Engine(default_pipeline, dtype="bf16", cpu_executor="auto").executor()[0] == "torch"
    with pytest.raises(ConfigError, match="fp32 chains only"):
        Engine(default_pipeline, dtype="bf16", cpu_executor="onnxruntime")


def test_bad_executors_are_config_errors(default_pipeline, monkeypatch):
    with pytest.raises(ConfigError, match="cpu_executor must be one of auto, onnxruntime, torch"):
        Engine(default_pipeline, cpu_executor="openvino")
    monkeypatch.setenv("DDPM_FAST_CPU_EXECUTOR", "tensorrt")
    with pytest.raises(ConfigError, match="DDPM_FAST_CPU_EXECUTOR must be one of"):
        Engine(default_pipeline)


def test_the_environment_sets_the_default(default_pipeline, monkeypatch):
    monkeypatch.delenv("DDPM_FAST_CPU_EXECUTOR")
    assert Engine(default_pipeline).executor()[0] == "onnxruntime"
    monkeypatch.setenv("DDPM_FAST_CPU_EXECUTOR", "torch")
    assert Engine(default_pipeline).executor()[0] == "torch"
    assert Engine(default_pipeline, cpu_executor="auto").executor()[0] == "onnxruntime"


def test_info_names_the_executor(monkeypatch, capsys):
    monkeypatch.delenv("DDPM_FAST_CPU_EXECUTOR")
    assert main(["info"]) == 0
    assert "cpu threads: onnxruntime (onnxruntime installed" in capsys.readouterr().out
    assert main(["info", "--cpu-executor", "torch"]) == 0
    assert "cpu threads: torch (cpu_executor='torch')" in capsys.readouterr().out


def test_the_cli_samples_on_onnxruntime_and_says_when_it_exports(
    cache, tmp_path, default_pipeline, caplog
):
    out = tmp_path / "x.png"
    args = ["sample", "--cpu-executor", "onnxruntime", "--steps", "5", "--num", "4"]
    assert main([*args, "--out", str(out), "--seed", "9"]) == 0
    assert out.is_file() and list(cache.glob("*.onnx"))
    assert "exporting the engine's CPU executor file to" in caplog.text  # the CLI shows engine INFO
    caplog.clear()
    assert main([*args, "--out", str(out), "--seed", "9"]) == 0
    assert "exporting" not in caplog.text  # found in the cache


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reference", "--cpu-executor", "torch"], "--cpu-executor applies to the engine"),
        (["--onnx", "m.onnx", "--cpu-executor", "torch"], "--cpu-executor does not apply"),
    ],
)
def test_cli_flag_misuse(args, message, tmp_path, capsys):
    assert main(["sample", *args, "--out", str(tmp_path / "x.png")]) != 0
    assert message in capsys.readouterr().err
