"""``ddpm_fast.from_diffusers``: the same images as diffusers' own pipelines, for the same
generator, checked against the real diffusers (the `dev` extra pins the fixtures' 0.42.1), and
``noise="torch-generator"`` on Pipeline/Engine.

Every network here is a small random UNet2DModel whose images are checked to be mostly inside
(0, 1) before they are compared: a chain that saturates to 0 or 1 would compare equal on its
clamps, whatever its noise.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed (scripts/install.sh dev installs it)"
)

import ddpm_fast  # noqa: E402
from ddpm_fast.errors import ConfigError  # noqa: E402

# diffusers 0.42.1's DPM-Solver under NumPy 2 (its own code, not ddpm-fast's).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "ddpm_cifar10_small")
# Images in [0, 1] after a whole chain in fp32: the bound (a 30-step chain).
TOLERANCE = 5e-4
UNET = dict(
    sample_size=8,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**UNET).eval()


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same_images(ours: np.ndarray, theirs: np.ndarray, min_inside: float = 0.5):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    inside = ((theirs > 0.01) & (theirs < 0.99)).mean()
    assert inside > min_inside, f"only {inside:.0%} of the reference's pixels are inside (0, 1)"
    assert np.abs(ours - theirs).max() <= TOLERANCE


def scheduler(kind: str, **config):
    return getattr(diffusers, kind)(**config)


# (pipeline class, scheduler class, scheduler config, call arguments)
CASES = {
    "ddpm-1000": ("DDPMPipeline", "DDPMScheduler", {}, dict(num_inference_steps=1000)),
    "ddpm-30": ("DDPMPipeline", "DDPMScheduler", {}, dict(num_inference_steps=30)),
    "ddpm-30-fixed_large": (
        "DDPMPipeline", "DDPMScheduler", dict(variance_type="fixed_large"),
        dict(num_inference_steps=30),
    ),
    "ddim-eta0": ("DDIMPipeline", "DDIMScheduler", {}, dict(num_inference_steps=10)),
    "ddim-eta0.5": ("DDIMPipeline", "DDIMScheduler", {}, dict(num_inference_steps=10, eta=0.5)),
    "ddim-clipped-eps": (
        "DDIMPipeline", "DDIMScheduler", {},
        dict(num_inference_steps=10, eta=0.5, use_clipped_model_output=True),
    ),
    "ddim-in-ddpm-pipeline": ("DDPMPipeline", "DDIMScheduler", {}, dict(num_inference_steps=10)),
    # x0 predictions: random eps networks drive DPM-Solver's unclipped chains to the clamps.
    "dpm++2m": (
        "DDPMPipeline", "DPMSolverMultistepScheduler", dict(prediction_type="sample"),
        dict(num_inference_steps=20),
    ),
    "dpm++2m-sde-karras": (
        "DDPMPipeline", "DPMSolverMultistepScheduler",
        dict(prediction_type="sample", algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
        dict(num_inference_steps=20),
    ),
}  # fmt: skip


@pytest.mark.parametrize("engine", [False, True], ids=["reference", "engine"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_images_as_diffusers(unet, case, engine):
    pipeline_kind, scheduler_kind, config, call = CASES[case]
    pipe = quiet(
        getattr(diffusers, pipeline_kind)(unet=unet, scheduler=scheduler(scheduler_kind, **config))
    )
    batch = 2 if case == "ddpm-1000" else 3
    theirs = pipe(batch_size=batch, generator=generator(7), output_type="np", **call).images
    fast = quiet(ddpm_fast.from_diffusers(pipe, engine=engine))
    ours = fast(batch_size=batch, generator=generator(7), output_type="np", **call).images
    if call.get("use_clipped_model_output"):
        # x0 is clipped (which is what the option is about), so more pixels end on the clamps;
        # the option must change the images for the comparison to test it.
        unclipped = {**call, "use_clipped_model_output": False}
        other = pipe(batch_size=batch, generator=generator(7), output_type="np", **unclipped)
        assert np.abs(other.images - theirs).max() > 100 * TOLERANCE
        assert_same_images(ours, theirs, min_inside=0.25)
    else:
        assert_same_images(ours, theirs)


def test_a_list_of_generators_draws_each_image_from_its_own(unet):
    pipe = quiet(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()))
    call = dict(num_inference_steps=30, output_type="np")
    theirs = pipe(batch_size=3, generator=[generator(i) for i in range(3)], **call).images
    fast = quiet(ddpm_fast.from_diffusers(pipe))
    ours = fast(batch_size=3, generator=[generator(i) for i in range(3)], **call).images
    assert_same_images(ours, theirs)
    alone = fast(batch_size=1, generator=[generator(2)], **call).images
    assert_same_images(alone[0:1], theirs[2:3])


def test_output_types_and_return_dict(unet):
    pipe = quiet(diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()))
    fast = quiet(ddpm_fast.from_diffusers(pipe, engine=False))
    call = dict(batch_size=2, num_inference_steps=5)
    for output_type in ("pil", "np", "pt"):
        theirs = pipe(generator=generator(1), output_type=output_type, **call)
        ours = fast(generator=generator(1), output_type=output_type, **call)
        assert type(ours) is type(theirs) is diffusers.ImagePipelineOutput
        if output_type == "pil":
            assert [im.size for im in ours.images] == [im.size for im in theirs.images]
            diff = [
                np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
                for a, b in zip(ours.images, theirs.images, strict=True)
            ]
            assert max(diff) <= 1  # a rounding step of uint8 at most
        elif output_type == "pt":
            assert ours.images.device == theirs.images.device
            assert_same_images(ours.images.numpy(), theirs.images.numpy())
        else:
            assert_same_images(ours.images, theirs.images)
    (images,) = fast(generator=generator(1), output_type="np", return_dict=False, **call)
    assert isinstance(images, np.ndarray) and images.shape == (2, 8, 8, 3)


def test_successive_batches_continue_the_generator(unet):
    """sample(4, batch_size=2) with one generator: two diffusers calls with it, in turn."""
    pipe = quiet(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()))
    g = generator(5)
    theirs = [pipe(batch_size=2, generator=g, num_inference_steps=20, output_type="pt").images
              for _ in range(2)]  # fmt: skip
    fast = ddpm_fast.from_diffusers(pipe)
    ours = fast.sample(4, steps=20, batch_size=2, generator=generator(5))
    assert_same_images(ours.numpy(), torch.cat(theirs).numpy())


@pytest.mark.parametrize("executor", ["torch", "onnxruntime"])
def test_split_batches_share_one_stream(unet, executor, monkeypatch):
    """The engine's CPU plan may run parts of a batch side by side; each reads its rows of the
    same draws (forced here: 2 cores, any network split)."""
    from ddpm_fast.engine import threads

    if executor == "onnxruntime":
        pytest.importorskip("onnxruntime")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: (2, "2 (test)"))
    monkeypatch.setattr(threads, "SPLIT_MIN_FLOPS", 0)
    pipe = quiet(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()))
    theirs = pipe(batch_size=4, generator=generator(3), num_inference_steps=20, output_type="np")
    fast = quiet(ddpm_fast.from_diffusers(pipe, cpu_executor=executor))
    ours = fast(batch_size=4, generator=generator(3), num_inference_steps=20, output_type="np")
    assert fast.pipeline.thread_plan((4, 3, 8, 8)).workers == 2
    assert_same_images(ours.images, theirs.images)


def test_philox_noise_is_batch_invariant_and_the_default_without_a_generator(unet):
    pipe = quiet(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()))
    fast = quiet(ddpm_fast.from_diffusers(pipe, engine=False))
    both = fast(batch_size=2, seed=11, num_inference_steps=20, output_type="np").images
    first = fast(batch_size=1, seed=11, num_inference_steps=20, output_type="np").images
    np.testing.assert_allclose(both[:1], first, rtol=0, atol=1e-5)  # batch-size rounding only
    same = fast.sample(2, seed=11, steps=20).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(both, same)
    # a generator with noise="philox": its seed picks the Philox stream
    seeded = fast(
        batch_size=2, generator=generator(11), noise="philox", num_inference_steps=20,
        output_type="np",
    ).images  # fmt: skip
    assert np.array_equal(seeded, both)
    torch.manual_seed(0)
    a = fast(batch_size=1, num_inference_steps=5, output_type="np").images
    b = fast(batch_size=1, num_inference_steps=5, output_type="np").images
    torch.manual_seed(0)
    again = fast(batch_size=1, num_inference_steps=5, output_type="np").images
    assert not np.array_equal(a, b) and np.array_equal(a, again)


def test_a_folder_sampled_with_torch_generator_noise_gives_diffusers_images():
    """A user of a checkpoint folder reproduces a diffusers run: Pipeline and Engine."""
    pipe = quiet(diffusers.DDPMPipeline.from_pretrained(FOLDER))
    theirs = pipe(batch_size=2, generator=generator(4), num_inference_steps=30, output_type="pt")
    loaded = ddpm_fast.load(FOLDER)
    for sampler in (loaded, ddpm_fast.engine.Engine(loaded)):
        ours = sampler.sample(2, steps=30, noise="torch-generator", seed=4)
        assert_same_images(ours.numpy(), theirs.images.numpy())


def test_the_wrapper_exposes_ddpm_fast(unet, tmp_path):
    pipe = quiet(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()))
    fast = ddpm_fast.from_diffusers(pipe, engine=False)
    assert fast.to("cpu") is fast and fast.device == torch.device("cpu")
    out = fast.sample_to(tmp_path / "grid.png", 2, steps=3, seed=1)
    assert out.path.is_file()
    with fast.progress_bar(total=3) as bar:
        bar.update(3)
    fast.set_progress_bar_config(disable=True)
    assert fast.progress_bar(range(2)).disable


def test_unsupported_pipelines_fail_in_one_line_before_any_work(unet):
    cases = [
        (diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.EulerDiscreteScheduler()),
         "EulerDiscreteScheduler"),
        (diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(thresholding=True)),
         "thresholding"),
        (diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(
            set_alpha_to_one=False)), "set_alpha_to_one"),
        (unet, "UNet2DModel"),
    ]  # fmt: skip
    conditional = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
        cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    cases.append(((conditional, diffusers.DDPMScheduler()), "UNet2DConditionModel"))
    for given, named in cases:
        args = given if isinstance(given, tuple) else (given,)
        with pytest.raises(ConfigError) as error:
            ddpm_fast.from_diffusers(*args)
        message = str(error.value)
        assert named in message and "\n" not in message
    fast = ddpm_fast.from_diffusers(
        quiet(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()))
    )
    with pytest.raises(TypeError):
        fast(batch_size=1, eta=0.5)  # DDPMPipeline takes no eta
    with pytest.raises(ConfigError, match="generators for 3 images"):
        fast(batch_size=3, generator=[generator(0)] * 2)
