"""Does an int8 sidecar derive from its fp32 model? Weight-by-weight and op-by-op evidence, without running either.

Use ``check_lineage`` before comparing outputs: a sidecar that is the fp32 file itself, another model, or a
quantisation of an *older* fp32 (the fp32 was retrained and ``quantgate pin`` re-pinned both hashes) can pass an
output budget by luck; its weights cannot hide where they came from. Use ``match_weights`` for per-weight SQNR in
a diagnosis: it pairs every weight of the int8 graph with its fp32 origin even when ORT's fusions or an exporter
renamed it.

Every weight is read, dequantised, paired with its fp32 origin and measured by ``qgraph`` — the one model of an
int8 graph that the diagnosis judges too, so both name the same origin for a weight. That covers QDQ, QOperator,
dynamic and ``MatMulNBits`` sidecars, weights in initializers, ``Constant`` nodes or external data, ORT's renames
and fusions (a Conv's folded BatchNormalization or Mul is reproduced, and the nearer of the folded and plain fp32
weight is kept) and transposed layouts. This module judges that model: graph structure, weights, provenance.

Why the error is measured in quantisation steps: rounding ``w`` to its grid moves each element by at most half a
step, so a PTQ sidecar of *this* fp32 sits within half a step everywhere (a handful of clipped extremes aside),
whatever the weights' spread; a sidecar of an fp32 that has since moved by even a fraction of a step does not. QAT
fine-tunes the weights before rounding, so its error is larger and judged against a threshold measured on QAT
sidecars. See ``THRESHOLDS`` for the measured numbers.

Only ``onnx``, numpy and ``qgraph`` are imported; nothing here runs a model.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelFileError
from ..fileio import sha256_file
from .qgraph import WeightMatch, match_weights

if TYPE_CHECKING:
    import onnx

__all__ = [
    "THRESHOLDS",
    "LineageReport",
    "LineageThresholds",
    "WeightMatch",
    "check_lineage",
    "match_weights",
    "op_structure",
]

# Quantised op -> the float op it replaces (None: quantisation plumbing with no float counterpart).
_FLOAT_OP: dict[str, str | None] = {
    "QuantizeLinear": None, "DequantizeLinear": None, "DynamicQuantizeLinear": None,
    "QLinearConv": "Conv", "ConvInteger": "Conv", "FusedConv": "Conv", "NhwcFusedConv": "Conv",
    "QLinearMatMul": "MatMul", "MatMulInteger": "MatMul", "DynamicQuantizeMatMul": "MatMul",
    "MatMulIntegerToFloat": "MatMul", "MatMulNBits": "MatMul", "FusedMatMul": "MatMul",
    "QGemm": "Gemm", "FusedGemm": "Gemm", "QLinearAdd": "Add", "QLinearMul": "Mul",
    "QLinearSigmoid": "Sigmoid", "QLinearLeakyRelu": "LeakyRelu", "QLinearConcat": "Concat",
    "QLinearGlobalAveragePool": "GlobalAveragePool", "QLinearAveragePool": "AveragePool",
    "QLinearSoftmax": "Softmax", "QLinearWhere": "Where", "QLinearReduceMean": "ReduceMean",
    "QAttention": "Attention", "QLinearConvTranspose": "ConvTranspose",
}

# Ops that carry a model's learned weights: their counts must agree between fp32 and int8. MatMul and Gemm are one
# family because ORT's pre-processing fuses MatMul + Add into Gemm.
_COMPUTE_FAMILY = {"Conv": "Conv", "ConvTranspose": "ConvTranspose", "MatMul": "MatMul/Gemm", "Gemm": "MatMul/Gemm",
                   "LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN", "Einsum": "Einsum", "Attention": "Attention"}

_MODES = ("dynamic", "static", "qat")


@dataclass(frozen=True)
class LineageThresholds:
    """Limits of one quant mode; a sidecar beyond any of them is not derived from the fp32 it is gated against.

    different_corr: every quantised weight must correlate at least this well with its fp32 origin (another model
        or another training run correlates near 0).
    max_off_grid: largest share of a weight's elements more than half a quantisation step from the fp32 value
        (None: not checked, QAT moves weights off the fp32 grid by design).
    max_step_rms: largest RMS error of a weight in quantisation steps (rounding alone gives ≤ 0.289 on average).
    min_matched: least share of the int8 graph's quantised weights that must find an fp32 origin.
    """

    different_corr: float
    max_off_grid: float | None
    max_step_rms: float
    min_matched: float = 1.0


# Measured with scripts/lineage_measure.py (onnxruntime 1.32, torch 2.13; the full table: docs/verdicts.md, "Lineage").
# Per weight (2-D and up), worst over the model's weights:
#   healthy PTQ (bundled dynamic fusion_mlp_v1 and static residual_filter_v1, plus fresh sidecars: dynamic
#     per-channel / uint8 / reduce_range, static per-tensor / QOperator / uint8 / no pre-processing, sidecars of
#     fine-tuned fp32s): off-grid share 0.000 everywhere, error 0.27-0.33 steps RMS, correlation >= 0.9989;
#   healthy QAT (nr_cnn_v1 bridge route): bundled recipe (2 epochs, LR 3e-5) 0.42-0.46 steps, 5 epochs 0.81,
#     1 epoch at the default LR 2e-4 1.14, 2 epochs at 2e-4 2.09 (QAT is a fine-tune: 18-66% of elements off-grid);
#   stale (bundled sidecar vs its fp32 fine-tuned k Adam steps at the training LR): off-grid share >= 0.13 for
#     every PTQ model from k = 1; QAT 0.92 (k=1), 2.36 (5), 3.51 (10), 5.36 (25), 8.0 (50), 12.6 (125 = 1 epoch);
#   other training runs: correlation -0.17..0.21 per weight (other seeds), 0.79 (same seed, 10 instead of 12 epochs);
#   real third-party models (rapidocr PP-OCRv4 det/rec, mobile cls; static QDQ/QOperator, dynamic): off-grid 0.000,
#     <= 0.315 steps, correlation >= 0.9996, every weight matched (ConvBnFusion_* included).
# PTQ: rounding alone keeps every element within half a step, so any real drift shows; QAT's own drift overlaps a
# fp32 fine-tune of < ~10 steps, so 4.0 steps is ~2x the worst healthy QAT measured and catches >= ~20 steps.
THRESHOLDS: Mapping[str, LineageThresholds] = {
    "dynamic": LineageThresholds(different_corr=0.9, max_off_grid=0.05, max_step_rms=0.5),
    "static": LineageThresholds(different_corr=0.9, max_off_grid=0.05, max_step_rms=0.5),
    "qat": LineageThresholds(different_corr=0.9, max_off_grid=None, max_step_rms=4.0),
}


@dataclass(frozen=True)
class LineageReport:
    """Verdict of ``check_lineage``: ``ok`` or the reasons the sidecar is not derived from the fp32 model."""

    ok: bool
    reasons: tuple[str, ...]
    mode: str
    weights_matched: int
    weights_total: int
    min_sqnr_db: float
    median_sqnr_db: float
    max_step_rms: float
    max_off_grid: float
    min_correlation: float
    structure: str
    matches: tuple[WeightMatch, ...] = field(repr=False, default=())

    def lines(self) -> list[str]:
        """Return the verdict, the numbers and the reasons as report lines."""
        head = "lineage OK" if self.ok else "lineage REFUSED: the int8 sidecar is not derived from this fp32 model"
        out = [
            head,
            (f"  weights matched {self.weights_matched}/{self.weights_total}  SQNR min {_db(self.min_sqnr_db)}"
             f" median {_db(self.median_sqnr_db)}  error in steps max {self.max_step_rms:.3f}"
             f"  off-grid max {self.max_off_grid:.3f}  correlation min {self.min_correlation:.5f}"),
            f"  structure: {self.structure}",
        ]
        out += [f"  - {reason}" for reason in self.reasons]
        return out


# ------------------------------------------------------------------------------------------------- structure


def op_structure(model: onnx.ModelProto, quantised: bool) -> Counter[str]:
    """Return the op-type multiset of a graph, quantised ops mapped back to the float ops they replace."""
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        op: str | None = node.op_type
        if quantised and op in _FLOAT_OP:
            op = _FLOAT_OP[node.op_type]
        if op is not None:
            counts[op] += 1
    return counts


def _families(counts: Counter[str]) -> Counter[str]:
    fam: Counter[str] = Counter()
    for op, n in counts.items():
        if op in _COMPUTE_FAMILY:
            fam[_COMPUTE_FAMILY[op]] += n
    return fam


def _diff_text(a: Counter[str], b: Counter[str]) -> str:
    more = ", ".join(f"{op}×{n}" for op, n in sorted((b - a).items()))
    fewer = ", ".join(f"{op}×{n}" for op, n in sorted((a - b).items()))
    return "; ".join(x for x in (f"int8 adds {more}" if more else "", f"int8 drops {fewer}" if fewer else "") if x)


def _structure(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> tuple[str, list[str]]:
    """Compare compute-op counts and graph inputs/outputs; return (summary, reasons)."""
    f_ops, q_ops = op_structure(fp32, False), op_structure(int8, True)
    f_fam, q_fam = _families(f_ops), _families(q_ops)
    reasons: list[str] = []
    fams = sorted(set(f_fam) | set(q_fam))
    summary = ", ".join(f"{k} {f_fam[k]}/{q_fam[k]}" for k in fams) or "no compute ops"
    bad = [k for k in fams if f_fam[k] != q_fam[k]]
    if bad:
        reasons.append("different graph: compute ops fp32/int8 " + ", ".join(f"{k} {f_fam[k]}/{q_fam[k]}" for k in bad)
                       + " (another architecture)")
    other = _diff_text(f_ops, q_ops)
    if other:
        summary += f" (other ops: {other})"
    f_init = {i.name for i in fp32.graph.initializer}
    q_init = {i.name for i in int8.graph.initializer}
    f_in = [i.name for i in fp32.graph.input if i.name not in f_init]
    q_in = [i.name for i in int8.graph.input if i.name not in q_init]
    f_out, q_out = [o.name for o in fp32.graph.output], [o.name for o in int8.graph.output]
    if f_in != q_in:
        reasons.append(f"different graph inputs: fp32 {f_in} vs int8 {q_in}")
    if f_out != q_out:
        reasons.append(f"different graph outputs: fp32 {f_out} vs int8 {q_out}")
    return summary, reasons


# ------------------------------------------------------------------------------------------------- verdict


def _db(value: float) -> str:
    return f"{value:.1f} dB" if math.isfinite(value) else ("inf" if value > 0 else str(value))


def _shape(m: WeightMatch) -> str:
    return "[" + "x".join(map(str, m.shape)) + "]"


def _worst(items: Sequence[WeightMatch], key: Any, limit: int = 3) -> str:
    chosen = sorted(items, key=key)[:limit]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(f"{m.int8_name!r} {_shape(m)}" for m in chosen) + more


def _judge(matches: Sequence[WeightMatch], mode: str, limits: LineageThresholds) -> list[str]:
    reasons: list[str] = []
    weights = [m for m in matches if m.is_weight]
    if not weights:
        return reasons
    orphans = [m for m in weights if m.fp32_name is None]
    if len(weights) - len(orphans) < limits.min_matched * len(weights):
        reasons.append(f"different model: {len(orphans)} of {len(weights)} quantised weights have no fp32 tensor "
                       f"of their name or shape and values: {_worst(orphans, lambda m: m.int8_name)}")
    matched = [m for m in weights if m.fp32_name is not None]
    # NaN: a constant fp32 tensor (all zeros, one value) has no correlation; the step checks below still apply
    unlike = [m for m in matched if m.correlation < limits.different_corr]
    if unlike:
        worst = min(unlike, key=lambda m: m.correlation)
        reasons.append(f"different model (or another training run): {len(unlike)} of {len(matched)} quantised weights "
                       f"do not follow their fp32 values (correlation below {limits.different_corr}; worst "
                       f"{worst.int8_name!r} vs "
                       f"{worst.fp32_name!r}: {worst.correlation:.3f}, SQNR {_db(worst.sqnr_db)}): "
                       f"{_worst(unlike, lambda m: m.correlation)}")
        return reasons
    if limits.max_off_grid is not None:
        # and more than one element: a single clipped extreme of a tiny weight is not drift
        off = [m for m in matched if m.off_grid is not None and m.off_grid > limits.max_off_grid
               and m.off_grid * math.prod(m.shape) > 1.5]
        if off:
            worst = max(off, key=lambda m: m.off_grid or 0.0)
            reasons.append(f"the weights are not this fp32's weights rounded to the int8 grid (an older or retrained "
                           f"fp32, or edited weights): in {len(off)} of {len(matched)} quantised weights more than "
                           f"{limits.max_off_grid:.0%} of elements are over half a quantisation step from the fp32 "
                           f"value "
                           f"(rounding keeps every one within it); worst "
                           f"{worst.int8_name!r}: {worst.off_grid:.1%} off, error {worst.step_rms:.2f} steps RMS")
            return reasons
    far = [m for m in matched if m.step_rms is not None and m.step_rms > limits.max_step_rms]
    if far:
        worst = max(far, key=lambda m: m.step_rms or 0.0)
        reasons.append(f"the weights moved from this fp32 by more than {mode} quantisation explains (an older or "
                       f"retrained fp32, or edited weights): {len(far)} of {len(matched)} quantised weights are over "
                       f"{limits.max_step_rms} steps "
                       f"RMS from the fp32 value; worst {worst.int8_name!r}: {worst.step_rms:.2f} steps, SQNR "
                       f"{_db(worst.sqnr_db)}")
    return reasons


def _load(path: Path, role: str) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ModelFileError(f"{path}: {role} model is not a readable ONNX model ({type(exc).__name__}: {exc})") \
            from None


def _provenance(fp32_sha: str, int8_sha: str, int8_path: Path) -> tuple[str, str | None]:
    """Read the producer's provenance of the sidecar: (what it says, a refusal reason or None)."""
    from ..producers.provenance import read_provenance

    record = read_provenance(int8_path)
    if record is None:
        return "none", None
    name = str(record.get("provenance_source", "provenance"))
    if not isinstance(record.get("fp32_sha256"), str):
        return f"{name} records no fp32 hash", None
    if record.get("int8_sha256") != int8_sha:
        # the sidecar changed since it was hashed: the record describes another file, so it proves nothing
        return f"{name} describes another sidecar (int8 sha256 differs)", None
    if record["fp32_sha256"] != fp32_sha:
        return f"{name} records another fp32", (
            f"stale sidecar: its provenance ({name}) says it was built from an fp32 with sha256 "
            f"{record['fp32_sha256'][:12]}…, the fp32 model is now {fp32_sha[:12]}… (retrained since?); "
            "rebuild the sidecar")
    return f"{name} names this fp32", None


def check_lineage(fp32_path: Path, int8_path: Path, mode: str, *, thresholds: LineageThresholds | None = None,
                  fp32_sha256: str | None = None, int8_sha256: str | None = None) -> LineageReport:
    """Decide whether the int8 sidecar was quantised from this fp32 model; name what does not match.

    ``thresholds`` replaces ``THRESHOLDS[mode]``; pass the files' sha256 when already known to skip hashing.
    Raises ModelFileError for an unreadable file and ValueError for a mode other than dynamic/static/qat.
    """
    if mode not in _MODES:
        raise ValueError(f"lineage is checked for quant modes {', '.join(_MODES)}, not {mode!r}")
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    fp32, int8 = _load(fp32_path, "fp32"), _load(int8_path, "int8")
    fp32_sha = fp32_sha256 or sha256_file(fp32_path)
    int8_sha = int8_sha256 or sha256_file(int8_path)
    structure, reasons = _structure(fp32, int8)
    provenance, stale = _provenance(fp32_sha, int8_sha, int8_path)
    structure += f"; provenance: {provenance}"
    matches = match_weights(fp32, int8)
    quantised = [m for m in matches if m.quantised]
    if not quantised:
        what = "is the fp32 file itself (same bytes)" if fp32_sha == int8_sha else "holds no quantised tensor"
        reasons.insert(0, f"not a quantised sidecar: {int8_path.name} {what}; no DequantizeLinear, QLinear*, "
                          f"*Integer or MatMulNBits weight was found")
    else:
        reasons += _judge(matches, mode, thresholds or THRESHOLDS[mode])
    if stale is not None:
        reasons.append(stale)
    weights = [m for m in matches if m.is_weight and m.fp32_name is not None]
    sqnrs = [m.sqnr_db for m in weights]
    return LineageReport(
        ok=not reasons,
        reasons=tuple(reasons),
        mode=mode,
        weights_matched=sum(1 for m in matches if m.is_weight and m.fp32_name is not None),
        weights_total=sum(1 for m in matches if m.is_weight),
        min_sqnr_db=min(sqnrs) if sqnrs else math.nan,
        median_sqnr_db=statistics.median(sqnrs) if sqnrs else math.nan,
        max_step_rms=max((m.step_rms for m in weights if m.step_rms is not None), default=math.nan),
        max_off_grid=max((m.off_grid for m in weights if m.off_grid is not None), default=math.nan),
        min_correlation=min((m.correlation for m in weights if math.isfinite(m.correlation)), default=math.nan),
        structure=structure,
        matches=matches,
    )
