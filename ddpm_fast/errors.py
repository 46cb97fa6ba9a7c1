"""The exceptions a user can act on; the CLI prints them as one line and exits with 2."""


class DdpmFastError(Exception):
    """Base class of every error ddpm-fast raises for bad input (files, options, arguments)."""


class CheckpointError(DdpmFastError):
    """A checkpoint file cannot be read, is not one ddpm-fast knows, or does not fit its network."""


class ConfigError(DdpmFastError, ValueError):
    """An option or argument is out of range or inconsistent with the model."""
