"""Run fp32 and int8 side by side on a soak fixture and turn the outputs into a verdict.

What is compared
    Per output, over every fixture sample (flattened, float64): the int8 output against the fp32 output, and
    both against the fixture's ``target`` where it has one. With ``quant_compare: residual`` the named input
    (the filter's own input) is subtracted from the outputs and the target first, so a residual filter's
    near-identity output does not inflate the correlation.

The drop
    Without a target: ``1 − PLCC(fp32, int8)``. With a target: the larger of the target drop
    ``PLCC(fp32, t) − PLCC(int8, t)`` and the implied drop ``PLCC(fp32, t) · (1 − PLCC(fp32, int8))``, the
    drop the int8 deviations would cause if they were unrelated to the target, as quantisation error is
    (see :class:`~pytest_quantgate.metrics.DropTerm`). The implied term stops a sidecar that is a different
    model of similar quality from passing on the target alone. The entry's drop is the worst output's.

The interval
    A paired percentile bootstrap over samples: each replicate draws sample indices with replacement (seeded
    from ``--quantgate-seed`` and the entry id, so the interval is the same on every run, worker and
    collection order) and recomputes the drop for fp32, int8 and target on the *same* indices, from
    per-sample sufficient statistics. It is shown with every verdict and in the summary.

The decision rule
    ``point`` (default): FAIL when the drop on the full fixture exceeds the budget. ``conservative``
    (``--quantgate-decision conservative``): FAIL when the upper bound of the interval exceeds it, so a PASS
    holds for nearly every resampled fixture; use it where a bad sidecar costs more than a rebuild.

    Rationale: a verdict is only worth having if it survives resampling the fixture, i.e. if it would be the
    same on another draw of soak samples from the same source. When the interval lies wholly on one side of
    the budget, the point and the conservative rule agree and resampled fixtures reproduce the verdict (the
    interval is the spread of the drop over exactly such resamples). When it straddles the budget no rule on
    this fixture is stable, so the gate does not pretend: it warns that the fixture cannot resolve the
    verdict and estimates the samples needed (half-width ∝ 1/√n); ``--quantgate-strict`` makes that an
    error. The point rule is the default because it is unbiased (a sidecar exactly at the budget fails half
    the time under either rule's resampling, but the conservative rule also fails sidecars that are good
    and merely measured on a small fixture).

The other budgets (checked on the full fixture, every breach reported; the first is the verdict's reason)
    - degenerate outputs: NaN/inf or constant int8 output (raw, before any residual subtraction): FAIL.
    - gain and offset (``quant_budget_slope``): int8 regressed on fp32; ``|slope − 1|`` and the mean shift
      in fp32 standard deviations must stay within it (PLCC is blind to ``0.5·y + 10``). For residual entries
      it is checked on the raw outputs first, then on the residuals.
    - absolute errors (``quant_budget_mae``, ``quant_budget_max_abs``): mean and worst ``|int8 − fp32|`` in
      output units; off unless the entry sets them.
    - relative (``quant_budget_relative`` r, MLPerf style, needs a target): ``PLCC(int8, t) ≥ r · PLCC(fp32,
      t)``. It replaces the default PLCC budget by ``(1 − r) · PLCC(fp32, t)`` (an explicit
      ``quant_accuracy_budget_plcc`` still applies; the tighter wins), so the interval and decision rule above
      apply to it unchanged; its implied-drop term reduces to ``PLCC(fp32, int8) ≥ r``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import FixtureError, SignatureMismatchError
from .metrics import (
    DegenerateOutputError,
    DropTerm,
    Interval,
    PairMetrics,
    bootstrap_drop,
    check_finite_and_varying,
    pair_metrics,
    samples_needed,
)
from .soak import FeedPlan, Fixture, TensorSpec

if TYPE_CHECKING:
    import onnxruntime as ort

    from .registry import Entry

PASS, FAIL = "PASS", "FAIL"


def signature(session: ort.InferenceSession) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Return the (inputs, outputs) of a session as TensorSpecs."""

    def spec(arg: Any) -> TensorSpec:
        return TensorSpec(arg.name, arg.type, tuple(arg.shape))

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
            if r.type != t.type or fixed_r != fixed_t:
                raise SignatureMismatchError(
                    f"{int8_name}: int8 {kind[:-1]} {r.name!r} is {t.describe()}, the fp32 graph has {r.describe()}"
                )


def run_model(session: ort.InferenceSession, fixture: Fixture, plan: FeedPlan, label: str,
              timings: list[float] | None = None) -> dict[str, np.ndarray]:
    """Run a session over every fixture sample; return each output with samples on axis 0.

    ``timings``, when given, receives the wall time of each full-size run (seconds), so latency comes from
    the gate's own runs instead of extra ones.
    """
    names = [o.name for o in session.get_outputs()]
    pieces: dict[str, list[np.ndarray]] = {n: [] for n in names}
    full = plan.batch if plan.batched else 1
    for part in plan.slices():
        if plan.batched:
            feed = {k: v[part] for k, v in fixture.inputs.items()}
        else:
            feed = {k: v[part.start] for k, v in fixture.inputs.items()}
        start = time.perf_counter()
        outs = session.run(names, feed)
        if timings is not None and part.stop - part.start == full:
            timings.append(time.perf_counter() - start)
        for name, out in zip(names, outs):
            out = np.asarray(out)
            if plan.batched:
                count = part.stop - part.start
                if out.ndim == 0 or out.shape[0] != count:
                    raise FixtureError(
                        f"{label}: output {name!r} has shape {out.shape} for a batch of {count}; the model does "
                        f"not keep the batch axis, so stack one model input per sample (add a leading axis)"
                    )
                pieces[name].append(out)
            else:
                pieces[name].append(out[None, ...])
    return {n: np.concatenate(p, axis=0) for n, p in pieces.items()}


@dataclass(frozen=True)
class OutputReport:
    """Metrics of one output: int8 vs fp32, and fp32/int8 vs target where the output has one."""

    name: str
    drop: float
    vs_fp32: PairMetrics
    fp32_vs_target: PairMetrics | None = None
    int8_vs_target: PairMetrics | None = None


@dataclass(frozen=True)
class GateResult:
    """The verdict of one entry on one EP, with every number needed to explain it."""

    entry_id: str
    ep: str
    mode: str
    samples: int
    budget: float
    verdict: str
    reason: str
    kind: str  # "pass" | "drop" | "relative" | "nonfinite" | "constant" | "affine" | "mae" | "max_abs" | "speed"
    drop: float | None = None
    interval: Interval | None = None
    outputs: tuple[OutputReport, ...] = ()
    compare: str = "output"
    decision: str = "point"
    needed_samples: int | None = None
    warnings: tuple[str, ...] = ()
    also: tuple[str, ...] = ()  # further budget breaches after the first
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Return True when the sidecar passed."""
        return self.verdict == PASS

    @property
    def headroom(self) -> float | None:
        """Return budget / drop (how many times the drop fits in the budget); inf when drop <= 0."""
        if self.drop is None:
            return None
        return float("inf") if self.drop <= 0 else self.budget / self.drop

    def to_row(self) -> dict[str, Any]:
        """Return a JSON-able summary row (travels from xdist workers to the controller)."""
        row = {
            "id": self.entry_id,
            "ep": self.ep,
            "mode": self.mode,
            "samples": self.samples,
            "drop": self.drop,
            "budget": self.budget,
            "headroom": self.headroom,
            "verdict": self.verdict,
            "kind": self.kind,
            "reason": self.reason,
            "decision": self.decision,
            "ci": [self.interval.low, self.interval.high] if self.interval else None,
            "ci_level": self.interval.level if self.interval else None,
            "needed_samples": self.needed_samples,
            "warnings": list(self.warnings),
            "also": list(self.also),
            "outputs": [
                {
                    "name": o.name,
                    "drop": o.drop,
                    "vs_fp32": asdict(o.vs_fp32),
                    "fp32_vs_target": asdict(o.fp32_vs_target) if o.fp32_vs_target else None,
                    "int8_vs_target": asdict(o.int8_vs_target) if o.int8_vs_target else None,
                }
                for o in self.outputs
            ],
        }
        row.update(self.extra)
        return row


@dataclass(frozen=True)
class CompareOptions:
    """Statistics knobs that come from the settings."""

    bootstrap: int = 1000
    seed: int = 0
    confidence: float = 0.95
    decision: str = "point"
    strict: bool = False


def _residual_base(entry: Entry, fixture: Fixture, inputs: Sequence[TensorSpec], output: str) -> np.ndarray:
    name = entry.residual_input
    if name is None:
        if len(inputs) != 1:
            raise FixtureError(
                f"entry {entry.id!r}: quant_compare is 'residual' but the model has {len(inputs)} inputs; "
                f"name one in 'quant_residual_input'"
            )
        name = inputs[0].name
    if name not in fixture.inputs:
        raise FixtureError(f"entry {entry.id!r}: quant_residual_input {name!r} is not a model input")
    return fixture.inputs[name].astype(np.float64)


def _target_output(entry: Entry, outputs: Sequence[TensorSpec], fixture: Fixture) -> str | None:
    if fixture.target is None:
        return None
    names = [o.name for o in outputs]
    if entry.target_output is not None:
        if entry.target_output not in names:
            raise FixtureError(f"entry {entry.id!r}: quant_target_output {entry.target_output!r} is not an output {names}")
        return entry.target_output
    if len(names) != 1:
        raise FixtureError(
            f"{fixture.path}: has a 'target' but the model has outputs {names}; "
            f"name the one it belongs to in the entry's 'quant_target_output'"
        )
    return names[0]


PROBE_SIZE = 64


def fp32_probe(values: np.ndarray) -> list[float]:
    """Return fp32 output values at fixed, evenly spaced positions: compared across EPs in the summary."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    index = np.linspace(0, flat.size - 1, num=min(PROBE_SIZE, flat.size)).astype(np.int64)
    return [float(v) for v in flat[index]]


def _seed_for(base: int, entry_id: str) -> int:
    # a stable per-entry stream: verdicts never depend on collection order or on the xdist worker
    return base ^ int.from_bytes(hashlib.sha256(entry_id.encode()).digest()[:4], "little")


def _affine_breach(name: str, ref: np.ndarray, test: np.ndarray, budget: float, what: str) -> str | None:
    """Return the breach text when int8 regressed on fp32 has a gain or offset error beyond ``budget``."""
    x = ref.ravel()
    y = test.ravel()
    xm, ym = float(x.mean()), float(y.mean())
    dx = x - xm
    var = float(dx @ dx)
    std = float(np.sqrt(var / x.size))
    if var == 0.0:
        return None
    slope = float(dx @ (y - ym)) / var
    intercept = ym - slope * xm
    offset = abs(ym - xm) / std  # the affine error at the mean, in fp32 standard deviations
    if abs(slope - 1.0) <= budget and offset <= budget:
        return None
    return (f"output {name!r}{what}: int8 ≈ {slope:.4f}·fp32 {intercept:+.4g}; the gain/offset error exceeds "
            f"quant_budget_slope {budget:g} (|slope−1| {abs(slope - 1):.4f}, offset {offset:.4f} std)")


def compare(
    entry: Entry,
    ep: str,
    fixture: Fixture,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    fp32_out: Mapping[str, np.ndarray],
    int8_out: Mapping[str, np.ndarray],
    options: CompareOptions,
) -> GateResult:
    """Compute every metric, the drop and its interval, and decide the verdict (rules in the module docstring)."""
    samples = fixture.samples
    relative = entry.budget_relative
    if relative is not None and fixture.target is None:
        raise FixtureError(
            f"entry {entry.id!r} field 'quant_budget_relative': the soak fixture {fixture.path} has no "
            f"{'target'!r} array; a relative budget compares int8 and fp32 against the target"
        )
    base = dict(entry_id=entry.id, ep=ep, mode=entry.mode, samples=samples, budget=entry.budget_plcc,
                compare=entry.compare, decision=options.decision)
    target_name = _target_output(entry, outputs, fixture)
    reports: list[OutputReport] = []
    terms: list[DropTerm] = []
    raw_breaches: list[tuple[str, str]] = []
    for spec in outputs:
        ref = fp32_out[spec.name].astype(np.float64)
        test = int8_out[spec.name].astype(np.float64)
        try:
            # raw outputs first: a constant output minus the residual input is not constant
            check_finite_and_varying(ref, f"fp32 output {spec.name!r}")
            check_finite_and_varying(test, f"int8 output {spec.name!r}")
        except DegenerateOutputError as exc:
            return GateResult(**base, verdict=FAIL, kind=exc.kind, reason=str(exc), outputs=tuple(reports))
        target = None
        if spec.name == target_name:
            target = fixture.target.astype(np.float64).reshape(ref.shape) if fixture.target.size == ref.size else None
            if target is None:
                raise FixtureError(
                    f"{fixture.path}: 'target' has shape {fixture.target.shape}, output {spec.name!r} has {ref.shape}"
                )
        if entry.compare == "residual":
            resid = _residual_base(entry, fixture, inputs, spec.name)
            if resid.size != ref.size:
                raise FixtureError(
                    f"entry {entry.id!r}: residual comparison needs output {spec.name!r} {ref.shape} and its input "
                    f"{resid.shape} to have the same shape"
                )
            breach = _affine_breach(spec.name, ref, test, entry.budget_slope, " (raw, before the residual)")
            if breach is not None:
                raw_breaches.append(("affine", breach))
            resid = resid.reshape(ref.shape)
            ref, test = ref - resid, test - resid
            if target is not None:
                target = target - resid
            try:
                check_finite_and_varying(ref, f"fp32 residual of output {spec.name!r}")
                check_finite_and_varying(test, f"int8 residual of output {spec.name!r}")
            except DegenerateOutputError as exc:
                return GateResult(**base, verdict=FAIL, kind=exc.kind, reason=str(exc), outputs=tuple(reports))
        vs_fp32 = pair_metrics(ref, test)
        term = DropTerm(ref, test, target, implied=True)
        if target is not None:
            fp32_t, int8_t = pair_metrics(ref, target), pair_metrics(test, target)
            drop = max(fp32_t.plcc - int8_t.plcc, fp32_t.plcc * (1.0 - vs_fp32.plcc))
            reports.append(OutputReport(spec.name, drop, vs_fp32, fp32_t, int8_t))
        else:
            reports.append(OutputReport(spec.name, 1.0 - vs_fp32.plcc, vs_fp32))
        terms.append(term)

    budget = entry.budget_plcc
    relative_note = ""
    if relative is not None:
        ref_t = next(r.fp32_vs_target for r in reports if r.fp32_vs_target is not None)
        allowed = (1.0 - relative) * ref_t.plcc
        explicit = entry.raw.get("quant_accuracy_budget_plcc")
        budget = allowed if explicit is None else min(float(explicit), allowed)
        relative_note = (f" (quant_budget_relative {relative:g}: int8 PLCC vs target must be >= {relative:g} × fp32 "
                         f"PLCC vs target {ref_t.plcc:.6f})")
        base["budget"] = budget
    worst = max(reports, key=lambda r: r.drop)
    probe = fp32_probe(fp32_out[outputs[0].name])
    drop = worst.drop
    interval = bootstrap_drop(terms, samples, options.bootstrap, _seed_for(options.seed, entry.id), options.confidence)
    needed = samples_needed(samples, interval, drop, budget) if interval else None
    warnings: list[str] = []
    if entry.min_samples is not None and samples < entry.min_samples:
        warnings.append(f"fixture has {samples} samples, fewer than quant_min_samples={entry.min_samples}")
    if needed is not None:
        warnings.append(
            f"the {interval.level:.0%} interval [{interval.low:.6f}, {interval.high:.6f}] straddles the budget "
            f"{budget:g}: this fixture cannot resolve the verdict; "
            + (f"about {needed} samples would" if needed else "the drop sits on the budget, no sample count would")
        )
    common = dict(base, drop=drop, interval=interval, outputs=tuple(reports), needed_samples=needed,
                  warnings=tuple(warnings), extra={"fp32_probe": probe})

    # every budget is checked and every breach reported; a gross gain/offset error of a residual entry's raw
    # output leads (it is the diagnosis), then the PLCC drop, then the checks PLCC cannot see (gain and offset
    # errors have PLCC 1.0) and the absolute errors
    breaches: list[tuple[str, str]] = list(raw_breaches)
    over = drop > budget
    if options.decision == "conservative" and interval is not None:
        over = interval.high > budget
    if over:
        bound = "" if options.decision == "point" or interval is None else (
            f" (upper {interval.level:.0%} bound {interval.high:.6f})")
        how = ""
        if worst.fp32_vs_target is not None and worst.int8_vs_target is not None:
            target_drop = worst.fp32_vs_target.plcc - worst.int8_vs_target.plcc
            if drop > target_drop:
                how = (f"; implied by int8 vs fp32 PLCC {worst.vs_fp32.plcc:.6f} (the int8 output does not track "
                       f"the fp32 output; against the target alone the drop is {target_drop:.6f})")
        kind = "drop" if relative is None else "relative"
        breaches.append((kind, f"PLCC drop {drop:.6f} > budget {budget:g}{bound} on output {worst.name!r}"
                               f"{relative_note}{how}"))
    for rep in reports:
        m = rep.vs_fp32
        if abs(m.slope - 1.0) > entry.budget_slope or m.offset_rel > entry.budget_slope:
            breaches.append(("affine", (
                f"output {rep.name!r}: int8 ≈ {m.slope:.4f}·fp32 {m.intercept:+.4g}; the gain/offset error exceeds "
                f"quant_budget_slope {entry.budget_slope:g} (|slope−1| {abs(m.slope - 1):.4f}, "
                f"offset {m.offset_rel:.4f} std)")))
        if entry.budget_mae is not None and m.mae > entry.budget_mae:
            breaches.append(("mae", (
                f"output {rep.name!r}: mean |int8 − fp32| {m.mae:.6g} exceeds quant_budget_mae {entry.budget_mae:g}")))
        if entry.budget_max_abs is not None and m.max_abs > entry.budget_max_abs:
            breaches.append(("max_abs", (
                f"output {rep.name!r}: max |int8 − fp32| {m.max_abs:.6g} exceeds quant_budget_max_abs "
                f"{entry.budget_max_abs:g}")))
    if breaches:
        kind, reason = breaches[0]
        return GateResult(**common, verdict=FAIL, kind=kind, reason=reason,
                          also=tuple(text for _, text in breaches[1:]))
    return GateResult(**common, verdict=PASS, kind="pass", reason=(
        f"PLCC drop {drop:.6f} <= budget {budget:g}{relative_note}"))
