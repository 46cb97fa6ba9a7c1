"""The exceptions a user can act on; the CLI prints them as one line and exits with 2."""


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


class OutputError(DdpmFastError):
    """Results cannot be written where they were asked for (not writable, disk full), or the
    output already holds another run's results."""
