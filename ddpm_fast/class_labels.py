"""Class labels of a class-conditional model's samples: checked where given, drawn where not.

Where a run gives no labels, the label of sample i is drawn from the seed with the project's
Philox stream (``ddpm_fast.noise_stream``), at key (i << 32) | seed like its noise but at counter
words (0, 1, 0, 0), which the noise never uses (its counters are (offset, 0, 0, 0)); so sample i
has the same label in any batch, process count or resume, as it has the same noise. The word is
mapped to [0, K) by ``(word * K) >> 32``. Pure Python: no torch, no NumPy (the CLI's torch-free
paths and ``OnnxSampler`` draw the same labels).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from . import noise_stream as stream
from .errors import ConfigError
from .options import check_seed

LABEL_COUNTER = 1  # the second counter word: the noise's is always 0


class _PythonOps:
    """The one ArrayOps function the rounds need, on Python ints."""

    @staticmethod
    def mulhilo(a: int, x: int) -> tuple[int, int]:
        p = a * x
        return p >> 32, p & stream.MASK32


def draw_labels(seed: int, indices: Sequence[int], num_classes: int) -> list[int]:
    """The labels of samples ``indices`` drawn from ``seed``, each in [0, num_classes)."""
    seed = check_seed(seed)
    labels = []
    for index in indices:
        word = stream.philox4x32(0, LABEL_COUNTER, 0, 0, seed, int(index), _PythonOps())[0]
        labels.append((word * num_classes) >> 32)
    return labels


def check_labels(class_labels, num: int, num_classes: int | None, model: str) -> list[int] | None:
    """The labels of ``num`` images as a list (an int labels them all; a sequence must hold
    ``num``), or None where none are given; ConfigError for labels an unconditional model cannot
    take, a label outside [0, num_classes) or a count other than ``num``."""
    if class_labels is None:
        return None
    if num_classes is None:
        raise ConfigError(f"{model} is not class-conditional: it takes no class labels")
    array_like = hasattr(class_labels, "tolist")  # a NumPy array or a torch tensor
    if isinstance(class_labels, str | bytes) or not (
        _is_int(class_labels) or isinstance(class_labels, Sequence) or array_like
    ):
        raise ConfigError(
            f"class_labels must be an int or a sequence of ints, got {class_labels!r}"
        )
    if array_like:
        class_labels = class_labels.tolist()
    labels = [class_labels] * num if _is_int(class_labels) else list(class_labels)
    if len(labels) != num:
        raise ConfigError(
            f"{len(labels)} class labels for {num} images: give one label, or one per image"
        )
    for label in labels:
        if not _is_int(label):
            raise ConfigError(f"class labels must be integers, got {label!r}")
        if not 0 <= label < num_classes:
            raise ConfigError(
                f"class label {label} is outside [0, {num_classes}) for {model} "
                f"({num_classes} classes)"
            )
    return [int(label) for label in labels]


def labels_for(
    given: list[int] | None, seed: int, indices: range, first: int, num_classes: int | None
) -> list[int] | None:
    """The labels of samples ``indices`` (rows ``first`` .. of the run's ``given`` labels, or
    drawn from the seed); None for an unconditional model."""
    if num_classes is None:
        return None
    if given is not None:
        return given[first : first + len(indices)]
    return draw_labels(seed, indices, num_classes)


def run_labels(
    given: list[int] | None, seed: int, num: int, num_classes: int | None
) -> tuple[list[int] | str | None, list[int] | None]:
    """What a run of ``num`` images records of its labels (the given list, or "drawn from the
    seed", which stays true as a run grows: part of its identity, so a resume with other labels
    is refused), and the labels themselves (``label_ids``); (None, None) for an unconditional
    model."""
    if num_classes is None:
        return None, None
    recorded = given if given is not None else "drawn from the seed"
    return recorded, labels_for(given, seed, range(num), 0, num_classes)


def parse_labels(text: str) -> int | list[int]:
    """The CLI's ``--class-labels``: "207" or "1,2,3"."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--class-labels takes an integer or a comma-separated list, got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
