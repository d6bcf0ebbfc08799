"""Exceptions a user can act on.

Every error that comes from bad input (a checkpoint, a config, token ids, a
dataset, a distributed setup) is a subclass of `BloomRuntimeError`, so the CLI
can print its message on one line and exit with status 2 instead of a traceback.
"""


class BloomRuntimeError(Exception):
    """Base class: a mistake in what the user gave us, not a bug in the runtime."""


class CheckpointError(BloomRuntimeError):
    """A checkpoint file is missing, unreadable, truncated, or holds wrong tensors."""


class ConfigError(BloomRuntimeError):
    """A model config is missing keys or holds inconsistent values."""


class InputError(BloomRuntimeError):
    """Arguments to the API or CLI are out of range or malformed."""


class DatasetError(BloomRuntimeError):
    """An evaluation dataset is missing files, columns, or holds bad rows."""


class DistributedError(BloomRuntimeError):
    """The tensor-parallel setup does not match the checkpoint or failed on a rank."""
