"""The plugin's exceptions: bad input (an ERROR outcome) versus a failed comparison (a FAILED outcome)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .comparison import GateResult


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


class QuantGateFailure(QuantGateError):
    """The int8 sidecar failed the gate; carries the full result for the failure report."""

    def __init__(self, result: GateResult) -> None:
        super().__init__(result.reason)
        self.result = result
