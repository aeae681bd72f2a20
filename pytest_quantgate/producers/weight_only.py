"""Int4 weight-only quantisation: constant-weight MatMuls become ``MatMulNBits`` (onnxruntime contrib op).

Use it for MatMul/Gemm-heavy graphs (MLPs, transformers): weights are stored in 4 bits per block of
``block_size`` input channels with one scale per block; activations stay in float (or, with ``accuracy_level`` 4,
are quantised to int8 per block at run time). ORT's quantiser only rewrites ``MatMul`` nodes, so a plain
``Gemm`` (``alpha = beta = 1``, ``transA = 0``, constant ``B``) is first rewritten into ``MatMul`` + ``Add`` with the
same numbers. Conv and other ops stay in float. Called by
:func:`pytest_quantgate.producers.ptq_dynamic.quantize_dynamic`
when ``DynamicConfig.weight_bits`` is 4, so a registry entry rebuilds it as ``quant_mode: "dynamic"`` with
``quant_options: {"weight_bits": 4, ...}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

MATMUL_OPS = frozenset({"MatMul", "Gemm"})


def constant_weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Return the names of MatMul/Gemm nodes whose weight (input B) is an initializer."""
    initializers = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in MATMUL_OPS and len(n.input) > 1 and n.input[1] in initializers]


def gemm_to_matmul(model: onnx.ModelProto) -> list[str]:
    """Rewrite plain constant-B Gemm nodes as MatMul (+ Add for C) in place; return the rewritten node names.

    A Gemm with ``transB = 1`` gets a transposed copy of its weight. Gemms with ``transA``, ``alpha`` or ``beta``
    other than the defaults, or with a non-constant B, are left alone (MatMulNBits cannot take them).
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    nodes = []
    rewritten: list[str] = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits
                 and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)
        if not plain:
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            array = numpy_helper.to_array(inits[weight]).T.copy()
            # a weight shared with another node keeps its original layout there: write a transposed copy
            new_name = weight if users.get(weight, 0) == 1 else f"{weight}_T"
            replacement = numpy_helper.from_array(array, new_name)
            if new_name == weight:
                inits[weight].CopyFrom(replacement)
            else:
                model.graph.initializer.append(replacement)
            weight = new_name
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        rewritten.append(node.name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def quantize_matmul_nbits(source: Path, built: Path, *, bits: int, block_size: int, symmetric: bool,
                          accuracy_level: int | None, nodes_to_exclude: tuple[str, ...]) -> dict[str, Any]:
    """Write ``built``: ``source`` with every constant-weight MatMul (and plain Gemm) in ``bits``-bit blocks.

    Returns the provenance step. Raises ValueError when the graph has no MatMul/Gemm with a constant weight.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(source))
    if not constant_weight_matmuls(model):
        raise ValueError(f"{source}: no MatMul/Gemm with a constant weight: weight-only int{bits} has nothing to do")
    rewritten = gemm_to_matmul(model)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                          bits=bits)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, nodes_to_exclude=list(nodes_to_exclude),
                                     algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(built), use_external_data_format=False)
    return {"step": "matmul_nbits", "status": "ran", "bits": bits, "block_size": block_size, "symmetric": symmetric,
            "accuracy_level": accuracy_level, "gemm_rewritten_as_matmul": rewritten}
