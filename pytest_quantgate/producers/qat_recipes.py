"""Named QAT recipes: one map from a recipe name to what ``prepare`` inserts and what ``convert`` writes.

The QAT producer (:mod:`pytest_quantgate.producers.qat`) resolves ``QatConfig.recipe_name`` here for both steps,
so the fake quantisation a model is trained with and the sidecar it is converted to can never disagree:

``int8-x86``
    prepare: ``prepare_qat_pt2e`` with torchao's ``X86InductorQuantizer`` (QAT config: int8 per-channel symmetric
    weights, uint8 per-tensor affine activations); convert: ORT static QDQ with the same layout (bridge route)
    or ``convert_pt2e`` (pt2e route).
``int8-arm``
    prepare: ``ArmInductorQuantizer`` (same int8 scheme, ARM inductor patterns); convert: as ``int8-x86``.
``int8-xnnpack``
    refused: torchao 0.18 ships no ``XNNPACKQuantizer`` (it lives in ExecuTorch now).
``int4-weight-only``
    prepare: ``quantize_(model, QATConfig(IntxWeightOnlyConfig(int4, PerGroup(32)), step="prepare"))`` on the
    eager model (``FakeQuantizedLinear``: symmetric int4 per group of 32 inputs, activations stay float);
    convert: bridge only, ORT ``MatMulNBits`` with blocks of 32, symmetric. ``convert_pt2e`` has no int4
    weight-only path to ONNX, so the pt2e route refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

INT4_GROUP = 32


@dataclass(frozen=True)
class QatRecipeSpec:
    """What one named recipe means for prepare (the quantiser) and convert (the sidecar it becomes)."""

    name: str
    quantizer: str | None  # "x86" | "arm" for pt2e quantisers; None for torchao's eager weight-only QAT
    weight_bits: int
    routes: tuple[str, ...]  # routes that can carry it
    description: str
    unavailable: str | None = None  # why this torch/torchao cannot run it at all


QAT_RECIPES: Mapping[str, QatRecipeSpec] = MappingProxyType({
    "int8-x86": QatRecipeSpec(
        "int8-x86", "x86", 8, ("bridge", "pt2e"),
        "X86InductorQuantizer(get_default_x86_inductor_quantization_config(is_qat=True))"),
    "int8-arm": QatRecipeSpec(
        "int8-arm", "arm", 8, ("bridge", "pt2e"),
        "ArmInductorQuantizer(get_default_arm_inductor_quantization_config(is_qat=True))"),
    "int8-xnnpack": QatRecipeSpec(
        "int8-xnnpack", "xnnpack", 8, ("bridge", "pt2e"), "XNNPACKQuantizer",
        unavailable="torchao 0.18 ships no XNNPACKQuantizer (it moved to ExecuTorch); use int8-x86 or int8-arm"),
    "int4-weight-only": QatRecipeSpec(
        "int4-weight-only", None, 4, ("bridge",),
        f"QATConfig(IntxWeightOnlyConfig(torch.int4, PerGroup({INT4_GROUP})), step='prepare') -> ORT MatMulNBits "
        f"(block {INT4_GROUP}, symmetric)"),
})



def resolve(name: str, route: str) -> QatRecipeSpec:
    """Return the recipe named ``name`` for ``route``; raise ValueError naming what is wrong and what is allowed."""
    spec = QAT_RECIPES.get(name)
    if spec is None:
        raise ValueError(f"QatConfig.recipe_name {name!r} is not a QAT recipe; recipes: {', '.join(QAT_RECIPES)}")
    if spec.unavailable is not None:
        raise ValueError(f"QatConfig.recipe_name {name!r} cannot run here: {spec.unavailable}")
    if route not in spec.routes:
        raise ValueError(f"QatConfig.recipe_name {name!r} cannot go through route {route!r}: only "
                         f"{', '.join(spec.routes)} can carry it (convert_pt2e has no int{spec.weight_bits} "
                         f"weight-only path that onnxruntime loads)")
    return spec


def quantizer(spec: QatRecipeSpec) -> Any:
    """Return the pt2e quantiser of an int8 recipe, configured for QAT."""
    if spec.quantizer == "x86":
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    if spec.quantizer == "arm":
        from torchao.quantization.pt2e.quantizer.arm_inductor_quantizer import (
            ArmInductorQuantizer,
            get_default_arm_inductor_quantization_config,
        )

        return ArmInductorQuantizer().set_global(get_default_arm_inductor_quantization_config(is_qat=True))
    raise ValueError(f"recipe {spec.name!r} has no pt2e quantiser")


def prepare(model: Any, example: Any, spec: QatRecipeSpec, dynamic_shapes: Any) -> Any:
    """Insert the recipe's fake quantisation into ``model`` (train mode); return the module to fine-tune."""
    if spec.quantizer is None:
        import torch
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.qat import QATConfig

        model.train()
        int4 = getattr(torch, "int4")  # noqa: B009  (the torch stubs lack int4)
        base = IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(INT4_GROUP))
        quantize_(model, QATConfig(base, step="prepare"))
        return model
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model.train()
    exported = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes).module()
    return prepare_qat_pt2e(exported, quantizer(spec))


def train_mode(prepared: Any) -> None:
    """Put a prepared module in training mode (exported graphs need torchao's helper, eager ones ``.train()``)."""
    import torch

    if isinstance(prepared, torch.fx.GraphModule):
        from torchao.quantization.pt2e import move_exported_model_to_train

        move_exported_model_to_train(prepared)
    else:
        prepared.train()
