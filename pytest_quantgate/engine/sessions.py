"""Run ONNX Runtime sessions for the gate: signatures, one timed run of a chunk, outputs as arrays."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FixtureError, SignatureMismatchError
from ..io.soak import TensorSpec

if TYPE_CHECKING:
    import onnxruntime as ort


def signature(session: ort.InferenceSession, unshaped: frozenset[str] = frozenset()
              ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Return the (inputs, outputs) of a session as TensorSpecs; ``unshaped`` names inputs without a shape."""

    def spec(arg: Any) -> TensorSpec:
        shape = arg.shape if isinstance(arg.shape, (list, tuple)) else ()
        return TensorSpec(arg.name, arg.type, tuple(shape), known_rank=arg.name not in unshaped)

    return tuple(spec(a) for a in session.get_inputs()), tuple(spec(a) for a in session.get_outputs())


def check_signatures(fp32: ort.InferenceSession, int8: ort.InferenceSession, fp32_name: str, int8_name: str) -> None:
    """Refuse an int8 graph whose inputs or outputs differ from the fp32 graph's (names, types, fixed dims)."""
    (fi, fo), (qi, qo) = signature(fp32), signature(int8)
    for kind, ref, test in (("inputs", fi, qi), ("outputs", fo, qo)):
        ref_names = [s.name for s in ref]
        test_names = [s.name for s in test]
        if sorted(ref_names) != sorted(test_names):
            raise SignatureMismatchError(
                f"{int8_name}: int8 graph {kind} {test_names} differ from the fp32 graph's {ref_names} ({fp32_name})"
            )
        by_name = {s.name: s for s in test}
        for r in ref:
            t = by_name[r.name]
            fixed_r = tuple(d if isinstance(d, int) else None for d in r.shape)
            fixed_t = tuple(d if isinstance(d, int) else None for d in t.shape)
            if kind == "outputs" and len(fixed_r) == len(fixed_t):
                # an output dim the fp32 graph leaves symbolic may be fixed in the int8 one: the quantiser's shape
                # inference (quant_pre_process) resolves dims the exporter named; only two fixed dims can disagree
                fixed_t = tuple(None if a is None else b for a, b in zip(fixed_r, fixed_t))
                fixed_r = tuple(None if b is None else a for a, b in zip(fixed_r, fixed_t))
            if r.type != t.type or fixed_r != fixed_t:
                raise SignatureMismatchError(
                    f"{int8_name}: int8 {kind[:-1]} {r.name!r} is {t.describe()}, the fp32 graph has {r.describe()}"
                )
    for spec in fo:
        if not (spec.type.startswith("tensor(") or spec.type.startswith("seq(map(")):
            raise SignatureMismatchError(
                f"{fp32_name}: output {spec.name!r} has type {spec.type}; the gate compares tensors and sequences "
                f"of maps (e.g. skl2onnx ZipMap probabilities), not this type"
            )


def as_array(value: Any, spec: TensorSpec, label: str) -> np.ndarray:
    """Return one output as an array: tensors as they are (strings as str), a sequence of maps as (samples, keys)
    in key order."""
    if spec.type.startswith("seq(map("):
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise FixtureError(f"{label}: output {spec.name!r} ({spec.type}) did not return a list of maps")
        if not value:
            return np.zeros((0, 0))
        keys = sorted(value[0])
        if any(sorted(v) != keys for v in value):
            raise FixtureError(f"{label}: output {spec.name!r}: the maps of one run have different keys")
        return np.asarray([[float(v[k]) for k in keys] for v in value], dtype=np.float64)
    if spec.type == "tensor(string)":  # class names (skl2onnx's label for string classes): compared by equality
        return np.asarray(value, dtype=np.str_)
    array = np.asarray(value)
    if array.dtype == object:
        raise FixtureError(f"{label}: output {spec.name!r} ({spec.type}) is not a numeric tensor")
    return array


def run(session: ort.InferenceSession, outputs: tuple[TensorSpec, ...], feed: Mapping[str, np.ndarray],
        label: str) -> tuple[dict[str, np.ndarray], float]:
    """Run one feed; return each output as an array and the wall time in seconds."""
    names = [o.name for o in outputs]
    start = time.perf_counter()
    values = session.run(names, dict(feed))
    elapsed = time.perf_counter() - start
    return {spec.name: as_array(v, spec, label) for spec, v in zip(outputs, values)}, elapsed
