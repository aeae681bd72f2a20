"""The plugin's exceptions for bad input (an ERROR outcome); a failed comparison is items.QuantGateFailure."""

from __future__ import annotations


class QuantGateError(Exception):
    """Base class of every error the gate reports as text rather than as a traceback."""


class InputError(QuantGateError):
    """Bad input (registry, model, fixture, hash, EP): the entry cannot be compared at all.

    Raised while an item is set up, so pytest reports it as an ERROR, distinct from a failed comparison.
    """


class RegistryError(InputError):
    """The registry file, or one of its entries, is malformed."""


class ModelFileError(InputError):
    """An ONNX file is missing, unreadable, corrupt or unsafe."""


class HashMismatchError(InputError):
    """A file's sha256 differs from the value pinned in the registry."""


class FixtureError(InputError):
    """A soak fixture is missing, unreadable, or does not match the model's inputs."""


class SignatureMismatchError(InputError):
    """The int8 graph's inputs or outputs differ from the fp32 graph's."""


class EpUnavailableError(InputError):
    """The requested execution provider cannot run here (missing, or ORT fell back to another EP)."""


class InsufficientSamplesError(InputError):
    """The fixture is too small to resolve the budget (raised only in strict mode)."""


class WriteError(InputError):
    """A file cannot be written (read-only folder, full disk, no permission, size limit); nothing was changed.

    Raised by the write helpers in :mod:`.fileio`, naming the file meant to be written (never its hidden
    partial), what the OS said and what to do; the file that was there before is left as it was.
    """


class ShardError(InputError):
    """Shard states that cannot be merged: missing, duplicated or mismatched parts, or an unknown format."""
