"""Classifier guidance inside the engine's step (``ddpm_fast.guidance`` is the reference).

The classifier runs on its reference modules under autograd, in fp32 whatever the engine's
dtype (guided-diffusion differentiates its classifier in the dtype it was converted to; the
released ImageNet classifiers are fp16 torsos with fp32 heads: fp32 is the exact case, and the
gradient of a half-precision torso would put its rounding into every step). Everything it reads
is a device tensor indexed by the chain's step tensor, the timestep table and the guidance
columns included, so a guided step needs nothing from the host: on CUDA the classifier's
forward and backward are captured in the step's graph with the network and the update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..samplers import rule


class StepGuidance:
    """The guidance of one batch's chain: ``gradient(x, step)`` before the step (the scaled
    gradient at its input) and ``guide(out, step)`` after it, the coefficient the step's output
    moves by (``rule.add_guidance``). ``rows(part)`` is the same for some rows of the batch (a
    split CPU batch), ``with_labels(buffer)`` for labels held in a graph's buffer; ``key`` says
    what a captured step of it fixes."""

    def __init__(self, network, scale: float, timesteps: torch.Tensor, guidance: dict,
                 labels: torch.Tensor, learned: bool, channels: int):  # fmt: skip
        self.network, self.scale, self.labels = network, scale, labels
        self.timesteps = timesteps  # [steps], what the classifier is given at each step
        self.columns = guidance  # rule.GUIDANCE -> [steps] float32 on the device
        self.learned, self.channels = learned, channels

    @property
    def key(self) -> tuple:
        return (id(self.network), self.scale)

    def with_labels(self, labels: torch.Tensor) -> StepGuidance:
        return StepGuidance(self.network, self.scale, self.timesteps, self.columns,
                            labels, self.learned, self.channels)  # fmt: skip

    def rows(self, part: slice) -> StepGuidance:
        return self.with_labels(self.labels[part])

    def gradient(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        t = self.timesteps.index_select(0, step).expand(x.shape[0])
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            log_probs = F.log_softmax(self.network(x_in, t), dim=-1)
            selected = log_probs.gather(1, self.labels.view(-1, 1))
            return torch.autograd.grad(selected.sum(), x_in)[0] * self.scale

    def guide(self, out: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        def column(name: str) -> torch.Tensor:
            return self.columns[name].index_select(0, step).view(1, 1, 1, 1)

        if self.learned:  # the model's variance, from its output's second half
            v = out[:, self.channels :].float()
            low, high = column("guide_log_var_min"), column("guide_log_var_max")
            return rule.learned_log_var(v, low, high).exp()
        return column("guide")


def step_guidance(classifier, scale: float, tables, timestep_scale: float, labels: torch.Tensor,
                  device: torch.device, channels: int) -> StepGuidance:  # fmt: skip
    """The engine's guidance of a chain ``tables`` for a batch of ``labels`` on ``device``."""
    timesteps = tables.timesteps.to(device)
    if timestep_scale != 1.0:
        timesteps = timesteps.float() * timestep_scale
    columns = {name: tables.guidance[name].float().to(device) for name in rule.GUIDANCE}
    return StepGuidance(classifier.on(device), scale, timesteps, columns, labels,
                        tables.learned, channels)  # fmt: skip
