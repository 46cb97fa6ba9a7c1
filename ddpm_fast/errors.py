"""The exceptions a user can act on; the CLI prints them as one line and exits with 2."""

from __future__ import annotations


class DdpmFastError(Exception):
    """Base class of every error ddpm-fast raises for bad input (files, options, arguments)."""


class CheckpointError(DdpmFastError):
    """A checkpoint file cannot be read, is not one ddpm-fast knows, or does not fit its network."""


class ConfigError(DdpmFastError, ValueError):
    """An option or argument is out of range or inconsistent with the model."""


class NonFiniteError(DdpmFastError):
    """A chain gave NaN or infinite values; ``indices`` are the samples concerned."""

    def __init__(self, message: str, indices: list[int] | tuple[int, ...] = ()):
        super().__init__(message)
        self.indices = list(indices)

    @classmethod
    def in_chain(cls, indices: range, bad: list[int]) -> NonFiniteError:
        """The error for the batch of samples ``indices`` whose rows ``bad`` are not finite."""
        which = [indices[i] for i in bad]
        shown = ", ".join(map(str, which[:8])) + (" ..." if len(which) > 8 else "")
        return cls(
            f"the chain of samples {indices.start}..{indices.stop - 1} gave NaN or infinite "
            f"values (samples {shown})",
            indices=which,
        )


class OutputError(DdpmFastError):
    """Results cannot be written where they were asked for (not writable, disk full), or the
    output already holds another run's results."""
