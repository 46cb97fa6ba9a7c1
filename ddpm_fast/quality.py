"""A quality check for samples of 8 x 8 digits: does a classifier fitted on real digits recognise
them, and are all ten digits there?

A smoke test for sampler changes on the embedded default model (trained on scikit-learn's
digits): a broken sampler draws blobs or noise, which the classifier does not recognise. The
classifier is a logistic regression on RBF-kernel features (Nystroem), fitted on 75% of the
digits: far from every training digit all its features vanish and its probabilities flatten, so
noise scores low (a linear classifier can be confident about noise). The figures for the held-out
25% of real digits are the yardstick.

Needs scikit-learn (``pip install ddpm-fast[quality]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from .errors import DdpmFastError

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
PIXEL_MAX = 16.0  # scikit-learn's digits are integers 0..16


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise DdpmFastError(
            "the digit quality check needs scikit-learn: pip install 'ddpm-fast[quality]'"
        ) from None


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as [N, 1, 8, 8] float32 images in [0, 1], and their labels."""
    _sklearn()
    from sklearn.datasets import load_digits

    data, labels = load_digits(return_X_y=True)
    images = torch.from_numpy(data / PIXEL_MAX).float().view(-1, *IMAGE_SHAPE)
    return images, torch.from_numpy(labels)


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    images, labels = digits()
    return train_test_split(
        images.view(len(images), -1).numpy(),
        labels.numpy(),
        test_size=0.25,
        random_state=0,
        stratify=labels.numpy(),
    )


@dataclass(frozen=True)
class QualityReport:
    """How a classifier of real digits sees a set of images."""

    num_images: int
    mean_top_probability: float
    class_shares: tuple[float, ...]  # share of the images classified as 0, 1, ..., 9

    @property
    def min_class_share(self) -> float:
        return min(self.class_shares)

    def __str__(self) -> str:
        shares = " ".join(f"{d}:{s:.1%}" for d, s in enumerate(self.class_shares))
        return (
            f"{self.num_images} images: mean top-class probability {self.mean_top_probability:.3f}"
            f", smallest class share {self.min_class_share:.1%} ({shares})"
        )


@cache
def _classifier():
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    train_x, _, train_y, _ = _split()
    gamma = 1.0 / (train_x.shape[1] * train_x.var())  # the "scale" of an RBF SVM
    classifier = make_pipeline(
        Nystroem(gamma=gamma, n_components=600, random_state=0),
        LogisticRegression(C=10.0, max_iter=5000),
    )
    return classifier.fit(train_x, train_y)


def score_digits(images: torch.Tensor) -> QualityReport:
    """Score [N, 1, 8, 8] images in [0, 1] (what the default model's ``sample`` returns)."""
    _sklearn()
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise DdpmFastError(
            f"the digit quality check takes [N, 1, 8, 8] images, got {list(images.shape)}"
        )
    features = images.detach().cpu().double().reshape(len(images), -1).numpy()
    probabilities = _classifier().predict_proba(features)
    predicted = probabilities.argmax(axis=1)
    counts = np.bincount(predicted, minlength=NUM_CLASSES)
    return QualityReport(
        num_images=len(images),
        mean_top_probability=float(probabilities.max(axis=1).mean()),
        class_shares=tuple(float(c) / len(images) for c in counts),
    )


def real_digits_report() -> QualityReport:
    """The same figures for the held-out real digits (the classifier never saw them)."""
    _, test_x, _, _ = _split()
    return score_digits(torch.from_numpy(test_x).view(-1, *IMAGE_SHAPE))
