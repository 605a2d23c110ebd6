"""Errors the project raises on bad input.

Every user-facing failure is an `L2CError` whose message is one line that
says what is wrong and with which file or key; the command-line entry points
print that line to stderr and exit non-zero (see `l2c_jax.cli`).
"""


class L2CError(Exception):
    """Bad input: a checkpoint, a config or an argument that cannot be used."""


class CheckpointError(L2CError):
    """A checkpoint that is missing, unreadable, unsafe or does not match."""


class ConfigError(L2CError):
    """An invalid configuration or argument."""
