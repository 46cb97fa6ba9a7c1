"""denoising-diffusion-pytorch's continuous-time files, which ddpm-fast does not sample.

Both lines' GaussianDiffusion (1.6.4 and 2.3.4) assert
``not model.random_or_learned_sinusoidal_cond``, while their continuous-time classes
(ContinuousTimeGaussianDiffusion, VParamContinuousTimeGaussianDiffusion, whose state_dicts also
hold ``model.*``) require those features. So a GaussianDiffusion-shaped file whose network has
them comes from a continuous-time class: its sampling is not the family's discrete chain, and it
is refused rather than sampled as something it is not.
"""

from __future__ import annotations


def fourier_refusal(config, library_version: str) -> str | None:
    """Why the library's GaussianDiffusion would not hold a network of ``config`` (a 1.x or 2.x
    UnetConfig), or None."""
    if not config.learned_sinusoidal_cond and not config.random_fourier_features:
        return None
    return (
        "its network has random or learned Fourier time features (time_mlp.0.weights): "
        f"denoising-diffusion-pytorch {library_version}'s GaussianDiffusion refuses such a "
        "network, so it comes from a continuous-time class (ContinuousTimeGaussianDiffusion, "
        "VParamContinuousTimeGaussianDiffusion), which ddpm-fast does not sample"
    )
