"""Shared types of the producers: the result every producer returns and the QAT recipe protocol."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is only needed by the QAT producer; never import it at module load
    import numpy as np
    import torch


# gates a built sidecar (its file) before it is published; returns the numbers recorded as ``build.gate``
Assess = Callable[[Path], Mapping[str, Any]]


class ProducerError(Exception):
    """A producer could not build a sidecar; the message names the file and what went wrong."""


@dataclass(frozen=True)
class ProducerResult:
    """What a producer wrote: the sidecar, its sha256 to pin, and the provenance recorded beside it."""

    int8_path: Path
    sha256: str
    provenance_path: Path
    provenance: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class QatRecipe(Protocol):
    """How to rebuild one model for quantisation-aware training (user code: trusted, opt-in).

    A recipe is a Python file named by a registry entry's ``qat_recipe`` key that defines a module-level
    ``recipe`` object (or ``make_recipe()`` returning one) with these members.
    """

    def build_model(self) -> torch.nn.Module:
        """Return a fresh fp32 module with the architecture of the registered fp32 ONNX."""
        ...

    def load_fp32_weights(self, model: torch.nn.Module, fp32_onnx: Path) -> None:
        """Load the registered fp32 weights into ``model`` (e.g. from the ONNX initializers)."""
        ...

    def training_data(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(inputs, targets)`` float32 arrays from the training distribution (not the soak set)."""
        ...

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the training loss."""
        ...

    def example_input(self) -> torch.Tensor:
        """Return one example batch (batch axis 0 is exported as dynamic)."""
        ...
