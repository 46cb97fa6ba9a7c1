"""Classifier guidance, as guided-diffusion's classifier_sample.py samples: every step runs a
noisy-image classifier forward and backward for g = scale * grad_x log p(y | x_t), and moves the
step by it.

- DDPM (the library's ``condition_mean``): the step's mean + variance * g, the variance being
  the model's (learned, or the fixed one the library uses, at the last step too);
- DDIM (``condition_score``): eps - sqrt(1 - abar) * g, x0 re-derived from it; a term
  ``guide * g`` on the step once the columns are worked out (each sampler module's ``guidance``
  columns, ``samplers.rule.GUIDANCE``).

The classifier gets the timestep the library gives it: the original one of a respaced chain,
times the diffusion model's ``timestep_scale`` where it rescales timesteps. Labels are the run's
(drawn per sample index from the seed where none are given, as for class-conditional models).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint_files import (
    check_weights,
    file_kind,
    read_safetensors,
    read_torch,
    weights_sha256,
)
from .errors import CheckpointError, ConfigError
from .models import adm_classifier
from .options import check_real


class Classifier:
    """A loaded classifier (``load_classifier``): its reference network (fp32, no gradients of
    its own), the image size it was trained on and where it came from."""

    def __init__(self, network: adm_classifier.EncoderUNet, image_size: int, *, source: str = "",
                 notes: tuple[str, ...] = ()):  # fmt: skip
        self.network = network.eval().requires_grad_(False)
        self.image_size = image_size
        self.source = source
        self.notes = notes
        self._device_copy = None

    @property
    def num_classes(self) -> int:
        return self.network.num_classes

    @property
    def config(self) -> adm_classifier.ClassifierConfig:
        return self.network.config

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def identity(self) -> dict:
        """What a run manifest records of it: a hash of its weights and its config."""
        return {"weights_sha256": weights_sha256(self.network), "network": self.config.to_dict(),
                "image_size": self.image_size}  # fmt: skip

    def on(self, device: torch.device) -> adm_classifier.EncoderUNet:
        """The network on ``device`` (a copy kept for the next call where it is elsewhere)."""
        if self.device == device:
            return self.network
        if self._device_copy is None or next(self._device_copy.parameters()).device != device:
            self._device_copy = copy.deepcopy(self.network).to(device)
        return self._device_copy

    def gradient(
        self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """scale * grad_x log softmax(classifier(x, t))[y], float32: classifier_sample.py's
        cond_fn."""
        network = self.on(x.device)
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            log_probs = F.log_softmax(network(x_in, timesteps), dim=-1)
            selected = log_probs[torch.arange(len(log_probs), device=x.device), labels]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale


def load_classifier(path: str | os.PathLike, classifier_flags: str | None = None,
                    **flags) -> Classifier:  # fmt: skip
    """A guided-diffusion classifier (EncoderUNetModel ``state_dict()``, a .pt or safetensors
    file). ``flags``: the library's CLASSIFIER_FLAGS names (``image_size``, ``classifier_width``,
    ``classifier_depth``, ``classifier_attention_resolutions``, ``classifier_pool``,
    ``classifier_use_scale_shift_norm``, ``classifier_resblock_updown``; ``classifier_use_fp16``
    accepted: ddpm-fast runs the classifier in fp32) and ``num_head_channels`` (64, as
    create_classifier); ``classifier_flags``: the same as the README's string. The weights fix
    the rest; a flag that contradicts them is a ConfigError naming both."""
    path = Path(path)
    if classifier_flags is not None:
        flags = {**adm_classifier.parse_classifier_flags(classifier_flags), **flags}
    if not path.is_file():
        raise CheckpointError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    weights = read_safetensors(path)[0] if file_kind(path) == "safetensors" else read_torch(path)
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise CheckpointError(f"{path}: not a state_dict of tensors")
    if not adm_classifier.is_classifier(weights):
        if "time_embed.0.weight" in weights or "output_blocks.0.0.in_layers.0.weight" in weights:
            raise CheckpointError(
                f"{path}: a diffusion model, not a classifier: load it with ddpm_fast.load"
            )
        raise CheckpointError(f"{path}: not a guided-diffusion classifier (EncoderUNetModel)")
    try:
        config, image_size = adm_classifier.infer_config(weights, **flags)
    except (ConfigError, CheckpointError) as err:
        raise type(err)(f"{path}: {err}") from None
    with torch.device("meta"):
        skeleton = adm_classifier.EncoderUNet(config)
    check_weights(path, skeleton, weights)
    network = adm_classifier.EncoderUNet(config)
    network.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    notes = [f"guided-diffusion classifier: {config.pool} pooling, {config.num_classes} classes, "
             f"{image_size} px"]  # fmt: skip
    if flags.get("classifier_use_fp16"):
        notes.append("classifier_use_fp16: the classifier runs in fp32 here")
    return Classifier(network, image_size, source=str(path), notes=tuple(notes))


def check_guidance(classifier, scale, image_shape: tuple[int, ...], num_classes: int | None,
                   where: str) -> float:  # fmt: skip
    """The scale, checked with the classifier against the model it guides (``image_shape``
    [C, H, W], its class count where it is class-conditional); one ConfigError each."""
    if not isinstance(classifier, Classifier):
        raise ConfigError(
            f"classifier must come from ddpm_fast.load_classifier, got {type(classifier).__name__}"
        )
    scale = check_real("classifier_scale", scale)  # finite
    size = image_shape[-1]
    if classifier.image_size != size or image_shape[-2] != size:
        raise ConfigError(
            f"the classifier {classifier.source or ''} is for {classifier.image_size} px images; "
            f"{where} draws {image_shape[-2]}x{size}"
        )
    if classifier.config.in_channels != image_shape[0]:
        raise ConfigError(
            f"the classifier takes {classifier.config.in_channels}-channel images; {where} draws "
            f"{image_shape[0]}"
        )
    if num_classes is not None and num_classes != classifier.num_classes:
        raise ConfigError(
            f"{where} has {num_classes} classes, the classifier {classifier.num_classes}"
        )
    return scale


def check_guided_chain(tables, spec) -> None:
    """ConfigError for a chain classifier guidance cannot move: a sampler without guidance
    columns (DPM-Solver), or a step from alphas_cumprod = 0."""
    if tables.guidance is None:
        raise ConfigError(f"classifier guidance runs with ddpm and ddim, not {spec.kind}")
    if not bool(torch.isfinite(tables.guidance["guide"]).all()):
        raise ConfigError(
            "classifier guidance cannot step from alphas_cumprod = 0 (a zero terminal SNR "
            "schedule's last timestep)"
        )


def step_gradients(classifier: Classifier, scale: float, timesteps: torch.Tensor,
                   timestep_scale: float, labels: torch.Tensor):  # fmt: skip
    """``gradient(x, k)`` of a chain visiting ``timesteps`` (the original ones, per step k):
    what ``sample_loop`` moves step k by."""

    def gradient(x: torch.Tensor, k: int) -> torch.Tensor:
        t = torch.full((x.shape[0],), int(timesteps[k]), device=x.device, dtype=torch.long)
        if timestep_scale != 1.0:
            t = t.float() * timestep_scale
        return classifier.gradient(x, t, labels, scale)

    return gradient
