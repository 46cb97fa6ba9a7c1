"""The engine against the reference path: one network forward per config and timestep, whole
chains of the embedded default model, per-sample determinism, the kernels' path end to end
(under the Triton interpreter), and on a GPU the graphs, the absence of host syncs and half
precision."""

from __future__ import annotations

import collections
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast
from ddpm_fast.engine import Engine, FastUnet
from ddpm_fast.engine.cpu_conv import CpuConv2d
from ddpm_fast.engine.engine import DTYPES
from ddpm_fast.engine.families.dd_pytorch_v1 import FastBlock
from ddpm_fast.errors import ConfigError
from ddpm_fast.models.dd_pytorch_v1 import Unet, UnetConfig
from ddpm_fast.pipeline import DiffusionConfig, Pipeline
from ddpm_fast.schedule import ScheduleConfig

from .helpers import rel_error

HAS_CUDA = torch.cuda.is_available()
NETWORK_TOLERANCE = 1e-4  # fp32, a whole network
# Images in [0, 1] after a whole chain in fp32; the chains below stay within 5e-6 here.
CHAIN_ATOL = 1e-4
LAUNCH_BUDGET = 130  # issue 30: the seed's step at batch 1, fp32 and bf16
# On a GPU in half precision, against the engine's fp32 chain (DDIM 50, default model):
HALF_CHAIN_MEAN = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def randomized(config: UnetConfig, seed: int = 0) -> Unet:
    """A network with every parameter random (norm gains around 1, so none is trivial)."""
    torch.manual_seed(seed)
    network = Unet(config).eval()
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith((".g", "norm.weight")):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias") or p.dim() == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.5 / p[0].numel() ** 0.5)
    return network


CONFIGS = {
    "plain": UnetConfig(dim=16, dim_mults=(1, 2)),
    "self-cond+learned-var": UnetConfig(
        dim=16, dim_mults=(1, 2, 2), self_condition=True, learned_variance=True
    ),
    "fourier+groups4": UnetConfig(
        dim=8, dim_mults=(1, 2, 4), learned_sinusoidal_cond=True, resnet_block_groups=4
    ),
    "1-channel": UnetConfig(dim=8, dim_mults=(1, 2), channels=1, attn_heads=2, attn_dim_head=8),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_one_forward_is_the_reference_network(name):
    config = CONFIGS[name]
    network = randomized(config)
    timesteps = torch.tensor([999, 500, 1, 0])
    fast = FastUnet(network, timesteps)
    x = torch.randn(3, config.channels, 16, 16)
    cond = torch.rand_like(x) * 2 - 1 if config.self_condition else None
    with torch.no_grad():
        for k, t in enumerate(timesteps.tolist()):
            want = network(x, torch.full((3,), t), cond)
            got = fast(x, torch.tensor([k]), cond)
            assert got.shape == want.shape
            assert rel_error(got, want) <= NETWORK_TOLERANCE, (name, t)


@pytest.mark.parametrize("name", ["plain", "fourier+groups4"])
def test_conv_biases_in_the_group_norm_are_the_reference_network(name):
    """Where the GroupNorm kernel runs, each Block's conv bias is its pre-bias instead (checked
    here on the PyTorch path, which computes the same sum)."""
    config = CONFIGS[name]
    network = randomized(config)
    fast = FastUnet(network, torch.tensor([700, 3]), fuse=True)
    blocks = [m for m in fast.modules() if isinstance(m, FastBlock)]
    assert blocks and all(b.proj.bias is None and b.pre_bias is not None for b in blocks)
    x = torch.randn(2, config.channels, 16, 16)
    with torch.no_grad():
        for k, t in enumerate((700, 3)):
            want = network(x, torch.full((2,), t))
            assert rel_error(fast(x, torch.tensor([k])), want) <= NETWORK_TOLERANCE


def test_the_engine_leaves_the_reference_network_as_it_was():
    network = randomized(CONFIGS["plain"])
    before = {k: v.clone() for k, v in network.state_dict().items()}
    FastUnet(network, torch.tensor([5]))
    after = network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_cpu_convolutions_are_the_convolutions():
    conv = torch.nn.Conv2d(32, 24, 3, padding=1).requires_grad_(False)
    fast = CpuConv2d(conv)
    for shape in [(1, 32, 4, 4), (2, 32, 16, 16)]:
        x = torch.randn(shape)
        want = conv(x)
        assert rel_error(fast(x), want) <= 1e-5
        assert rel_error(fast(x), want) <= 1e-5  # the planned path, second call


def gpu_step_launches(
    network: FastUnet, monkeypatch, batch: int = 1, size: int = 32
) -> collections.Counter:
    """Launches of one engine step (network and sampler update) as the GPU path makes them,
    counted on the meta device (``ddpm_fast.engine.step_cost``: ATen ops and every Triton kernel,
    each launcher forced to its kernel)."""
    from ddpm_fast.engine import step_cost

    shape = (batch, network.channels, size, size)
    return step_cost.count_network(copy.deepcopy(network), shape).counts()


@pytest.mark.parametrize("model", ["adm-cifar10", "adm-imagenet64"])
def test_launches_per_step_of_the_adm_models(model, monkeypatch):
    """OpenAI's ADM U-Nets (ddpm_fast.bench's), one fp32 step at batch 1 as on a GPU: every
    GroupNorm fused (one kernel, or two where its reduction is split); a class-conditional
    model gathers its time and label embeddings and runs the blocks' projections in the step.
    Prints the counts (pytest -s)."""
    from ddpm_fast.bench import model_pipeline
    from ddpm_fast.bench.models import ADM_MODELS

    pipeline = model_pipeline(model)
    fast = FastUnet(pipeline.network, torch.arange(0, 1000, 100), fuse=True)
    size = ADM_MODELS[model][0]
    launches = gpu_step_launches(fast, monkeypatch, size=size)
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in pipeline.network.modules())
    triton = sum(n for op, n in launches.items() if op.startswith("triton"))
    print(f"launches per step, {model} fp32 batch 1: {launches.total()} ({triton} Triton "
          f"kernels): {dict(launches)}")  # fmt: skip
    # each GroupNorm one kernel, or two where a large group is split (partial, apply)
    split = launches["triton group_norm_partial_kernel"]
    assert launches["triton group_norm_fused_kernel"] + split == norms
    assert launches["triton group_norm_apply_kernel"] == split
    assert launches["index_select"] == (2 if pipeline.num_classes else 1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_step_of_the_seed_launches_at_most_130_kernels(dtype):
    """The seed's CIFAR-10 U-Net (ddpm_fast.bench's), one step at batch 1 as on an H100/H200
    (132 multiprocessors): the fused form (``fuse``: residuals, biases, skips, norms around the
    attention's 1x1 convs in the kernels) against the same network unfused. One gather of the
    time conditioning; no add or concatenation of its own but the final block's (of two conv
    outputs), and no conv bias of its own. Prints the counts (pytest -s)."""
    from ddpm_fast.bench import model_pipeline
    from ddpm_fast.engine import step_cost
    from ddpm_fast.engine.network import cast_convolutions

    pipeline = model_pipeline("cifar10")
    counted = {}
    for fuse in (False, True):
        network = FastUnet(pipeline.network, torch.arange(0, 1000, 100), fuse=fuse)
        cast_convolutions(network, DTYPES[dtype])
        if dtype != "fp32":
            network = network.to(memory_format=torch.channels_last)
        counted[fuse] = step_cost.count_network(network, (1, 3, 32, 32), DTYPES[dtype])
    launches = counted[True].counts()
    triton = sum(n for op, n in launches.items() if op.startswith("triton"))
    print(f"launches per step, cifar10 {dtype} batch 1: {counted[True].total} ({triton} Triton "
          f"kernels; unfused {counted[False].total}): {dict(launches)}")  # fmt: skip
    assert launches["index_select"] == 1
    assert launches["add"] == launches["convolution bias"] == 0 and launches["cat"] == 1
    assert counted[True].total <= LAUNCH_BUDGET < counted[False].total


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_the_middle_attention_gives_sdpa_heads_contiguous_in_d(monkeypatch, channels_last):
    """SDPA's fused kernels want the last (d) axis contiguous; in NCHW it was H x W apart."""
    strides = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        strides.extend(t.stride(-1) for t in (q, k, v))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    network = randomized(CONFIGS["plain"])
    fast = FastUnet(network, torch.tensor([10]))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    fast = fast.to(memory_format=memory_format)
    x = torch.randn(2, 3, 16, 16).to(memory_format=memory_format)
    with torch.no_grad():
        got = fast(x, torch.tensor([0]))
        want = network(x, torch.full((2,), 10))
    assert strides == [1, 1, 1]
    assert rel_error(got, want) <= NETWORK_TOLERANCE


@pytest.fixture(scope="module")
def default_pipeline():
    return ddpm_fast.load()


@pytest.fixture(scope="module")
def default_engine(default_pipeline):
    return Engine(default_pipeline)


@pytest.mark.parametrize(
    "chain",
    [
        dict(sampler="ddim", steps=50),
        dict(steps=100),
        dict(sampler="ddim", steps=20, eta=1.0),
        dict(sampler="dpm++2m", steps=20),
        dict(sampler="dpm++2m-sde-karras", steps=10),
    ],
    ids=["ddim50", "ddpm100", "ddim20-eta1", "dpm++2m-20", "dpm++2m-sde-karras-10"],
)
def test_whole_chains_give_the_reference_images(default_pipeline, default_engine, chain):
    want = default_pipeline.sample(6, seed=11, **chain)
    got = default_engine.sample(6, seed=11, **chain)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (want - want.mean()).abs().max() > 0.1  # images, not a constant
    torch.testing.assert_close(got, want, rtol=0, atol=CHAIN_ATOL)


def test_a_sample_is_the_same_image_in_any_batch(default_engine):
    """The same noise and the same function; the convolutions' algorithms (chosen per batch
    shape) sum in other orders, hence a few fp32 ulps more than the reference's 1e-5."""
    kwargs = dict(sampler="ddim", steps=10, seed=3)
    in_64 = default_engine.sample(64, batch_size=64, **kwargs)
    in_7 = default_engine.sample(14, batch_size=7, **kwargs)
    alone = default_engine.sample(1, start_index=12, **kwargs)
    torch.testing.assert_close(in_7, in_64[:14], rtol=0, atol=5e-5)
    torch.testing.assert_close(alone[0], in_64[12], rtol=0, atol=5e-5)
    assert not torch.allclose(in_64[0], in_64[1])


def small_pipeline(name: str, objective: str, variance: str = "fixed_small") -> Pipeline:
    diffusion = DiffusionConfig(
        image_size=8, schedule=ScheduleConfig("linear", 30), objective=objective, variance=variance
    )
    return Pipeline(Unet(CONFIGS[name]), diffusion)


@pytest.mark.parametrize(
    ("name", "objective", "variance"),
    [
        ("self-cond+learned-var", "pred_v", "fixed_small"),  # learned_range
        ("plain", "pred_x0", "fixed_large"),
        ("fourier+groups4", "pred_noise", "fixed_small"),
    ],
)
def test_chains_of_other_networks_and_objectives(name, objective, variance):
    torch.manual_seed(0)
    pipeline = small_pipeline(name, objective, variance)
    chains = (
        dict(steps=30),
        dict(sampler="ddim", steps=6, eta=0.3),
        dict(sampler="dpm++2m", steps=6, timestep_spacing="trailing"),
    )
    for chain in chains:
        want = pipeline.sample(3, seed=2, **chain)
        got = Engine(pipeline).sample(3, seed=2, **chain)
        torch.testing.assert_close(got, want, rtol=0, atol=CHAIN_ATOL)


def test_bad_options_are_config_errors(default_pipeline):
    with pytest.raises(ConfigError, match="dtype must be one of"):
        Engine(default_pipeline, dtype="fp8")
    if not HAS_CUDA:
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            Engine(default_pipeline, cuda_graph=True).sample(1, steps=2)


def test_the_engine_is_a_pipeline_with_the_same_contract(default_pipeline, default_engine):
    assert isinstance(default_engine, Pipeline)
    assert default_engine.config == default_pipeline.config
    with pytest.raises(ConfigError, match="steps must be between"):
        default_engine.sample(1, steps=5000)


@pytest.mark.slow
def test_a_bf16_chain_keeps_its_last_conv_in_fp32_and_within_twice_pytorchs_error(
    default_pipeline,
):
    """bf16 on the CPU, by flash-attention's rule on whole chains: the engine's images against
    the fp32 reference's, at most twice the error of PyTorch's own bf16 (the reference under
    autocast). The last conv stays fp32: the sampler amplifies its rounding near t = T."""
    engine = Engine(default_pipeline, dtype="bf16")
    kwargs = dict(sampler="ddim", steps=10, seed=7)
    want = default_pipeline.sample(8, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = default_pipeline.sample(8, **kwargs)
    got = engine.sample(8, **kwargs)
    network = next(iter(engine._chains.values())).network
    final_conv = network.body.final_conv
    final = getattr(final_conv, "conv", final_conv)  # CpuConv2d wraps it
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {m.weight.dtype for m in convs if m is not final} == {torch.bfloat16}
    assert final.weight.dtype == torch.float32
    assert (got - want).abs().mean() <= 2 * (own - want).abs().mean()


# GPU


@pytest.mark.gpu
def test_graph_replay_is_eager(default_pipeline):
    kwargs = dict(sampler="ddpm", steps=50, seed=5, device="cuda")
    graphed = Engine(default_pipeline, cuda_graph=True).sample(8, **kwargs)
    eager = Engine(default_pipeline, cuda_graph=False).sample(8, **kwargs)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_graphs_read_torch_generator_noise(default_pipeline, where):
    """noise="torch-generator": each step's draw is copied into the graph's noise buffer before
    its replay; the images are the reference's from the same generator (on the CPU or CUDA)."""
    kwargs = dict(sampler="ddpm", steps=30, noise="torch-generator")
    want = default_pipeline.sample(4, generator=torch.Generator(where).manual_seed(2), **kwargs)
    for graphs in (True, False):
        got = Engine(default_pipeline, cuda_graph=graphs).sample(
            4, device="cuda", generator=torch.Generator(where).manual_seed(2), **kwargs
        )
        torch.testing.assert_close(got, want, rtol=0, atol=CHAIN_ATOL)


@pytest.mark.gpu
def test_the_gpu_engine_gives_the_cpu_reference_images(default_pipeline):
    for chain in (
        dict(sampler="ddim", steps=50),
        dict(steps=100),
        dict(sampler="dpm++2m", steps=20),
    ):
        want = default_pipeline.sample(6, seed=11, device="cpu", **chain)
        got = Engine(default_pipeline).sample(6, seed=11, device="cuda", **chain)
        torch.testing.assert_close(got, want, rtol=0, atol=CHAIN_ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m-sde"])
def test_no_host_sync_inside_the_chain(default_pipeline, sampler):
    engine = Engine(default_pipeline, cuda_graph=True)
    engine.sample(4, sampler=sampler, steps=10, device="cuda")  # prepare and capture first
    syncs = []

    def on_step(k: int) -> None:
        syncs.append(k)

    from ddpm_fast.noise import keyed_noise
    from ddpm_fast.samplers import step_tables

    spec = engine.sampler_spec(sampler, 10)
    tables = step_tables(engine.schedule, spec)
    x = keyed_noise(0, range(4), 0, engine.image_shape(), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = engine._run_chain(x, tables, spec, seed=0, indices=range(4), on_step=on_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert syncs == list(range(1, 11))
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_chains_stay_near_fp32(default_pipeline, dtype):
    kwargs = dict(sampler="ddim", steps=50, seed=4, device="cuda")
    fp32 = Engine(default_pipeline).sample(16, **kwargs)
    half = Engine(default_pipeline, dtype=dtype).sample(16, **kwargs)
    assert (half - fp32).abs().mean() <= HALF_CHAIN_MEAN[dtype]


@pytest.mark.gpu
def test_a_failed_capture_falls_back_to_eager_with_one_warning(default_pipeline, monkeypatch):
    from ddpm_fast.engine import engine as engine_module

    def broken(*args, **kwargs):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(engine_module, "CapturedStep", broken)
    engine = Engine(default_pipeline, cuda_graph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = engine.sample(2, steps=5, device="cuda")
        b = engine.sample(2, steps=5, batch_size=1, device="cuda")
    assert [str(w.message) for w in caught if "capture failed" in str(w.message)].__len__() == 1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_prepared_chains_are_cached_and_bounded(default_pipeline):
    from ddpm_fast.engine.engine import MAX_CHAINS

    engine = Engine(default_pipeline)
    engine.sample(1, sampler="ddim", steps=3)
    first = next(iter(engine._chains.values()))
    engine.sample(1, sampler="ddim", steps=3)
    assert list(engine._chains.values()) == [first]  # reused, not rebuilt
    for steps in range(4, 4 + MAX_CHAINS + 1):
        engine.sample(1, sampler="ddim", steps=steps)
    assert len(engine._chains) == MAX_CHAINS and first not in engine._chains.values()


@pytest.mark.slow
def test_the_gpu_path_on_the_cpu(monkeypatch):
    """What runs on a GPU, run here: every launcher forced to its Triton kernel (interpreted):
    fused norms, the attention's projections, linear attention, the step drawing its own noise
    with learned variance; and the CUDA-graph branch of the chain with a stand-in graph that
    re-runs the captured step at each replay. After the warm-up steps the state is reset, and
    the device-side step index, the in-kernel noise and the in-place state give the reference
    chain, for two batches in a row through one captured step."""
    from ddpm_fast.engine import engine as engine_module
    from ddpm_fast.engine.graph import WARMUP_STEPS
    from ddpm_fast.kernels import HAS_TRITON, group_norm, linear_attention, projection
    from ddpm_fast.kernels import sampler_step as step_module

    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    launched = set()
    for module in (group_norm, projection, linear_attention, step_module):

        def spy(backend, x, kernel, module=module, real=module.use_triton):
            if real(backend, x, kernel):
                launched.add(module.__name__.rsplit(".", 1)[1])
                return True
            return False

        monkeypatch.setattr(module, "use_triton", spy)

    class Replayed:
        captures = 0

        def __init__(self, step, state, pool):
            Replayed.captures += 1
            self.state, self.step = state, step
            for _ in range(WARMUP_STEPS + 1):  # the warm-ups and the captured run
                step()

        def replay(self):
            self.step()

    monkeypatch.setattr(engine_module, "CapturedStep", Replayed)
    monkeypatch.setattr(engine_module, "new_graph_pool", lambda: None)
    monkeypatch.setattr(Engine, "_uses_graphs", lambda self, device: True)
    monkeypatch.setenv("DDPM_FAST_KERNELS_BACKEND", "triton")
    torch.manual_seed(0)
    config = UnetConfig(dim=8, dim_mults=(1, 2), self_condition=True, learned_variance=True)
    diffusion = DiffusionConfig(image_size=8, schedule=ScheduleConfig("linear", 100))
    pipeline = Pipeline(randomized(config), diffusion)
    chains = (dict(steps=3), dict(sampler="dpm++2m-sde", steps=3))  # the second reads x0_prev
    kwargs = dict(batch_size=2, seed=4, start_index=2**31)
    engine = Engine(pipeline)
    got = [engine.sample(4, **kwargs, **chain) for chain in chains]
    monkeypatch.delenv("DDPM_FAST_KERNELS_BACKEND")
    for images, chain in zip(got, chains, strict=True):
        want = pipeline.sample(4, **kwargs, **chain)
        torch.testing.assert_close(images, want, rtol=0, atol=CHAIN_ATOL)
    assert Replayed.captures == len(chains)
    assert launched == {"group_norm", "projection", "linear_attention", "sampler_step"}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_step_writes_the_next_steps_input(dtype, monkeypatch):
    """Where the step kernel runs and the network takes x in another dtype or layout (bf16,
    channels_last), the chain state holds that input and the step writes it with x_next (the
    kernel's ``also_out``; here the PyTorch path's copy): the same images, bit for bit, as
    casting x at each step."""
    from ddpm_fast.engine import engine as engine_module

    torch.manual_seed(0)
    config = UnetConfig(dim=8, dim_mults=(1, 2))
    diffusion = DiffusionConfig(image_size=8, schedule=ScheduleConfig("linear", 100))
    pipeline = Pipeline(randomized(config), diffusion)
    kwargs = dict(steps=3, seed=2)
    engine = Engine(pipeline, dtype=dtype, cpu_executor="torch")
    want = engine.sample(2, **kwargs)
    real = engine_module.draws_noise
    monkeypatch.setattr(engine_module, "draws_noise", lambda x, b=None: x.numel() == 0 or real(x))
    engine = Engine(pipeline, dtype=dtype, cpu_executor="torch")
    states = []
    new_state = engine_module.PreparedChain.new_state

    def spy(chain, shape):
        states.append(new_state(chain, shape))
        return states[-1]

    monkeypatch.setattr(engine_module.PreparedChain, "new_state", spy)
    got = engine.sample(2, **kwargs)
    assert states and all(s.x_in is not None for s in states)
    assert torch.equal(got, want)


@pytest.mark.slow
def test_a_compiled_engine_gives_the_reference_chain():
    """Engine(compile=True): the fast network through torch.compile (inductor, the kernels as
    custom ops; here the engine's PyTorch step on the CPU), the reference's images."""
    torch.manual_seed(0)
    config = UnetConfig(dim=8, dim_mults=(1, 2))
    diffusion = DiffusionConfig(image_size=8, schedule=ScheduleConfig("linear", 100))
    pipeline = Pipeline(randomized(config), diffusion)
    kwargs = dict(sampler="ddim", steps=3, seed=3)
    engine = Engine(pipeline, compile=True, cpu_executor="torch")
    got = engine.sample(2, **kwargs)
    torch.testing.assert_close(got, pipeline.sample(2, **kwargs), rtol=0, atol=CHAIN_ATOL)
    chain = next(iter(engine._chains.values()))
    assert type(chain.network).__name__ == "OptimizedModule"
    with pytest.raises(ConfigError, match="compile must be True or False"):
        Engine(pipeline, compile="yes")
