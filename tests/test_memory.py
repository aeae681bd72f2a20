"""Memory that does not grow with the sample count: per-sample rows up to a cap, hashed blocks past it.

Below the cap the numbers are the per-sample ones bit for bit (the rest of the suite pins them); past it the
state stays the same size from 10^5 to 10^7 samples, the sums are the per-sample sums, and the bootstrap over
blocks gives the per-sample bootstrap's interval within Monte-Carlo error, on synthetic data and on the bundled
models. A generated archive of two million tiny samples is gated end to end under a 2.5 GiB address-space cap.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import modelkit
import numpy as np
import pytest

from pytest_quantgate.engine import streaming
from pytest_quantgate.engine.comparison import Collector, CompareOptions, plan_outputs
from pytest_quantgate.engine.streaming import Field, LabelAccumulator, PairAccumulator, Units
from pytest_quantgate.io.soak import Fixture, TensorSpec

REPO = Path(__file__).resolve().parents[1]


# --- the state does not grow with the sample count ---------------------------------------------------------------


def _feed(samples: int, chunk: int = 1 << 18) -> tuple[PairAccumulator, LabelAccumulator, int]:
    """Fold ``samples`` one-element samples (fp32, int8, target, labels) in chunks; return the traced peak too."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(chunk, 1, 1)).astype(np.float32)
    b = a + rng.normal(scale=0.05, size=a.shape).astype(np.float32)
    t = a + rng.normal(scale=0.5, size=a.shape)
    tracemalloc.start()
    acc = PairAccumulator(samples, 1, with_target=True, seed=3)
    labels = LabelAccumulator(samples, acc.units)
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        acc.add(start, a[:count], b[:count], t[:count])
        labels.add(start, a[:count, 0] > 0, b[:count, 0] > 0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return acc, labels, peak


def test_the_state_does_not_grow_from_ten_thousand_to_ten_million_samples() -> None:
    sizes = {}
    for samples in (10**4, 10**5, 10**6, 10**7):
        acc, labels, peak = _feed(samples)
        sizes[samples] = (acc.stats.nbytes + labels.nbytes(), acc.nbytes() + labels.nbytes(), peak)
        total = acc.stats[..., Field.COUNT].sum()
        assert total == samples  # every sample counted once, in its own row or in a block
        print(f"{samples:>9} samples: units {acc.units.count}, rows {sizes[samples][0] / 2**20:.2f} MiB, "
              f"state {sizes[samples][1] / 2**20:.2f} MiB, traced peak {peak / 2**20:.1f} MiB")
    cap = streaming.MAX_UNITS
    assert sizes[10**4][0] == 10**4 * (streaming.FIELDS * 8 + 16)  # below the cap: one row per sample
    # past the cap: the same rows at 10^5, 10^6 and 10^7 samples, and the reservoir holds at most cap samples
    assert sizes[10**5][0] == sizes[10**6][0] == sizes[10**7][0] == cap * (streaming.FIELDS * 8 + 16)
    reservoir = cap * (8 + 8 + 8 + 3 * 8)  # index, priority, width, one triple per kept sample
    bound = sizes[10**5][0] + cap + 3 * 8 + 2 * reservoir  # + seen flags, NaN counts, a pending reservoir batch
    assert all(state <= bound for _, state, _ in sizes.values()), sizes
    # the traced peak is the chunk's temporaries plus the state: the same at 10^6 and 10^7 samples
    assert sizes[10**7][2] <= sizes[10**6][2] + (1 << 20)


def test_units_are_per_sample_below_the_cap_and_bounded_by_bytes_for_many_channels() -> None:
    assert not Units.plan(65_536, 0).blocked and Units.plan(65_537, 0).count == streaming.MAX_UNITS
    # 1024 channels: 256 MiB of rows hold 2520 units; a 25 200-channel head still gets MIN_UNITS blocks
    assert Units.plan(10**6, 0, 1024).count == streaming.STATE_BYTES // (1024 * streaming.FIELDS * 8) == 2520
    assert Units.plan(10**6, 0, 25_200).count == streaming.MIN_UNITS
    assert Units.plan(100, 0, 25_200).count == 100  # fewer samples than that: per sample, as before
    assert Units.plan(10**6, 0, cap=300).count == 300  # an explicit cap (tests) wins over the byte rule


# --- past the cap: the per-sample sums, whatever the chunking, order or split --------------------------------------


def _data(samples: int = 3000, channels: int = 3, m: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    a = (rng.normal(100.0, 2.0, (samples, channels, m))).astype(np.float32)
    b = (a + rng.normal(0, 0.05, a.shape)).astype(np.float32)
    t = a.astype(np.float64) + rng.normal(0, 0.5, a.shape)
    return a, b, t


def _accumulate(a: np.ndarray, b: np.ndarray, t: np.ndarray, units: Units, chunks: list[tuple[int, int]]
                ) -> PairAccumulator:
    acc = PairAccumulator(a.shape[0], a.shape[1], with_target=True, seed=units.seed, units=units)
    for lo, hi in chunks:
        acc.add(lo, a[lo:hi], b[lo:hi], t[lo:hi])
    return acc


def _cuts(samples: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(samples, lo + size)) for lo in range(0, samples, size)]


def _same_sums(got: PairAccumulator, want: PairAccumulator, what: str) -> None:
    """Assert two accumulators hold the same statistics per channel (their shifts may differ)."""
    g, w = got.channel_sums(), want.channel_sums()
    for x, y in ((0, 1), (0, 2), (1, 2)):
        np.testing.assert_allclose(g.plcc(x, y), w.plcc(x, y), rtol=0, atol=1e-12, err_msg=what)
    summed = [Field.COUNT, Field.SUM_ABS_ERR, Field.SUM_SQ_ERR]
    np.testing.assert_allclose(g.values[:, summed], w.values[:, summed], rtol=1e-12, err_msg=what)
    assert (g.values[:, Field.MAX_ABS_ERR] == w.values[:, Field.MAX_ABS_ERR]).all(), what  # a max is exact


def test_blocks_hold_the_per_sample_sums_whatever_the_chunking_order_or_split() -> None:
    a, b, t = _data()
    samples = a.shape[0]
    whole = _accumulate(a, b, t, Units(samples, samples, 5), _cuts(samples, samples))
    units = Units(samples, 256, 5)
    cases = {f"chunks of {size}": _cuts(samples, size) for size in (1, 7, 64, samples)}
    cases["reversed"] = _cuts(samples, 64)[::-1]  # another first chunk: other shifts too
    for name, chunks in cases.items():
        blocked = _accumulate(a, b, t, units, chunks)
        _same_sums(blocked, whole, name)
        assert blocked.stats.shape[0] == 256 and blocked.stats[..., Field.COUNT].sum() == a.size
    # two halves accumulated apart, then merged
    first = _accumulate(a, b, t, units, [(0, 1200)])
    second = _accumulate(a, b, t, units, [(1200, samples)])
    merged = first.merge(second)
    _same_sums(merged, whole, "merged")
    np.testing.assert_array_equal(merged.reservoir(), _accumulate(a, b, t, units, [(0, samples)]).reservoir())


def test_the_reservoir_past_the_cap_is_a_fixed_subset_of_the_per_sample_one() -> None:
    a, b, t = _data(samples=30_000, channels=1, m=2)
    samples = a.shape[0]
    full = _accumulate(a, b, t, Units(samples, samples, 5), _cuts(samples, 4096)).reservoir()
    kept = [_accumulate(a, b, t, Units(samples, 1000, 5), _cuts(samples, size)).reservoir() for size in (999, 4096)]
    np.testing.assert_array_equal(kept[0], kept[1])  # the same samples whatever the chunking
    # RESERVOIR triples at least; every kept triple is one the per-sample reservoir has, in sample order
    assert kept[0].shape[0] == streaming.RESERVOIR
    rows = {tuple(row) for row in full}
    assert all(tuple(row) in rows for row in kept[0])


def test_nan_samples_are_counted_past_the_cap() -> None:
    a, b, t = _data()
    b[[3, 100, 2500], 1, 4] = np.nan
    blocked = _accumulate(a, b, t, Units(a.shape[0], 256, 5), _cuts(a.shape[0], 64))
    assert blocked.nonfinite() == (False, True, 3)


# --- past the cap: the interval agrees with the per-sample bootstrap ---------------------------------------------


def _entry(**extra: Any) -> Any:
    return modelkit.registry_entry(**extra)


def _intervals(outputs: dict[str, tuple[np.ndarray, np.ndarray]], specs: tuple[TensorSpec, ...], target: np.ndarray,
               cap: int, seeds: range, entry: Any) -> np.ndarray:
    """Return (seed, [drop, low, high, label low, label high]) for a Collector with ``cap`` units."""
    x = next(iter(outputs.values()))[0].astype(np.float32)
    samples = x.shape[0]
    inputs = (TensorSpec("x", "tensor(float)", ("N", *x.shape[1:])),)
    fixture = Fixture(Path("soak.npz"), "0", {"x": x}, target)
    plans = plan_outputs(entry, fixture, inputs, specs)
    rows = []
    for seed in seeds:
        collector = Collector(entry, plans, samples, seed, "soak.npz", max_units=cap)
        for lo, hi in _cuts(samples, 4096):
            collector.add(lo, {"x": x[lo:hi]}, target[lo:hi], {k: v[0][lo:hi] for k, v in outputs.items()},
                          {k: v[1][lo:hi] for k, v in outputs.items()})
        assert collector.units is not None and collector.units.blocked == (cap < samples)
        result = collector.decide("cpu", CompareOptions(seed=seed))
        assert result.interval is not None
        label = next(o.labels for o in result.outputs if o.labels is not None)
        assert label is not None and label.interval is not None
        rows.append([result.drop, result.interval.low, result.interval.high, label.interval.low,
                     label.interval.high])
    return np.array(rows)


def agree(per_sample: np.ndarray, blocked: np.ndarray, what: str) -> None:
    """Assert every interval bound of the blocked runs matches the per-sample runs within 4 Monte-Carlo SEs."""
    for column, name in ((1, "low"), (2, "high"), (3, "label low"), (4, "label high")):
        if column >= per_sample.shape[1]:
            break
        p, b = per_sample[:, column], blocked[:, column]
        # each run's spread over seeds is its Monte-Carlo error (for blocks, the partition's too)
        se = np.sqrt(p.var(ddof=1) / p.size + b.var(ddof=1) / b.size)
        print(f"{what} {name}: per-sample {p.mean():.6g} ± {p.std(ddof=1):.2g}, blocked {b.mean():.6g} ± "
              f"{b.std(ddof=1):.2g} ({abs(b.mean() - p.mean()) / se:.1f} SE)")
        assert abs(b.mean() - p.mean()) <= 4 * se + 1e-12, (what, name, p, b)


def test_the_blocked_interval_agrees_with_the_per_sample_bootstrap_on_synthetic_data() -> None:
    """20 000 samples: per sample, and summed into 1024 blocks; a value output with a target and a label output."""
    rng = np.random.default_rng(1)
    samples = 20_000
    ref = rng.normal(size=(samples, 1)).astype(np.float32)
    test = (ref + rng.normal(scale=0.1, size=ref.shape)).astype(np.float32)
    target = (ref + rng.normal(scale=0.6, size=ref.shape)).astype(np.float32)
    labels = rng.integers(0, 4, size=(samples, 3))
    flipped = np.where(rng.random(labels.shape) < 0.02, (labels + 1) % 4, labels)
    specs = (TensorSpec("y", "tensor(float)", ("N", 1)), TensorSpec("cls", "tensor(int64)", ("N", 3)))
    outputs = {"y": (ref, test), "cls": (labels, flipped)}
    entry = _entry(quant_target_output="y")
    per_sample = _intervals(outputs, specs, target, samples, range(6), entry)
    blocked = _intervals(outputs, specs, target, 1024, range(6), entry)
    # the point drop is the same sums added in another order
    np.testing.assert_allclose(blocked[:, 0], per_sample[:, 0], rtol=1e-9)
    agree(per_sample, blocked, "synthetic")


@pytest.mark.parametrize("entry_id, cap", [("fusion_mlp_v1", 256), ("nr_cnn_v1", 256), ("residual_filter_v1", 128)])
def test_the_blocked_interval_agrees_with_the_per_sample_bootstrap_on_the_bundled_models(
        entry_id: str, cap: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled fixtures (320-1200 samples) gated per sample, and with the cap lowered to 128-256 blocks."""
    from pytest_quantgate.io.registry import load_registry
    from pytest_quantgate.runner.gate import measure, prepare
    from pytest_quantgate.settings import Settings

    registry = load_registry(REPO / "model" / "registry.json")
    entry = registry.entry(entry_id)
    base = Settings(enabled=True, registry=registry.path, fixtures_dir=REPO / "fixtures", eps=("cpu",),
                    regen="never")
    runs = {}
    for mode, units in (("per-sample", 1 << 16), ("blocked", cap)):
        monkeypatch.setattr(streaming, "MAX_UNITS", units)
        rows = []
        for seed in range(6):
            settings = dataclasses.replace(base, seed=seed)
            result, collector = measure(prepare(registry, entry, "cpu", settings), settings)
            assert result.passed and result.interval is not None and result.drop is not None
            assert collector.unit_count == min(units, result.samples)
            rows.append([result.drop, result.interval.low, result.interval.high])
        runs[mode] = np.array(rows)
    np.testing.assert_allclose(runs["blocked"][:, 0], runs["per-sample"][:, 0], rtol=1e-9)
    agree(runs["per-sample"], runs["blocked"], entry_id)


# --- past the cap: the worst samples for the diagnosis ------------------------------------------------------------


def test_the_worst_samples_past_the_cap_are_the_per_sample_ones() -> None:
    rng = np.random.default_rng(2)
    samples = 5000
    ref = rng.normal(size=(samples, 4)).astype(np.float32)
    test = (ref + rng.normal(scale=0.01, size=ref.shape) * rng.exponential(size=(samples, 1))).astype(np.float32)
    x = ref.copy()
    specs = (TensorSpec("y", "tensor(float)", ("N", 4)),)
    fixture = Fixture(Path("soak.npz"), "0", {"x": x}, None)
    inputs = (TensorSpec("x", "tensor(float)", ("N", 4)),)
    entry = _entry()
    plans = plan_outputs(entry, fixture, inputs, specs)
    picked = {}
    for cap in (samples, 300):
        collector = Collector(entry, plans, samples, 0, "soak.npz", max_units=cap)
        for lo, hi in _cuts(samples, 64):
            collector.add(lo, {"x": x[lo:hi]}, None, {"y": ref[lo:hi]}, {"y": test[lo:hi]})
        picked[cap] = collector.worst_samples(8)
        assert collector.state_bytes() < 2 << 20
    assert picked[300] == picked[samples]


# --- end to end: two million tiny samples under an address-space cap ---------------------------------------------


def _tiny_project(root: Path, samples: int) -> Path:
    """An 8-feature MLP, its dynamic int8 sidecar run at batch 64, and ``samples`` deflated samples."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_memory import tiny_project  # the benchmark measures the same model at 10^5 to 10^7 samples

    return tiny_project(root, samples, deploy_batch=64)


def _measure_capped(root: Path, registry: Path, diagnose: str, verdicts: tuple[int, ...]) -> tuple[Any, float]:
    """Run `quantgate measure` in a child under a 2.5 GiB address-space cap; return its JSON row and peak RSS (MiB).

    The child must exit with one of ``verdicts`` (0 pass, 1 fail); anything else fails the test with its output.
    """
    out = root / "o.json"
    code = (f"import sys; from pytest_quantgate.frontends.cli import main; "
            f"rc = main(['measure', {str(registry)!r}, '--fixtures', {str(root / 'fixtures')!r}, '--ep', 'cpu', "
            f"'--diagnose', {diagnose!r}, '--json', {str(out)!r}]); "
            f"hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]; "
            f"print('MAXRSS', hwm); sys.exit(0 if rc in {verdicts!r} else 100 + rc)")
    proc = subprocess.run(["prlimit", f"--as={5 << 29}", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())[0], int(proc.stdout.split("MAXRSS")[-1].split()[0]) / 1024


def test_two_million_tiny_samples_are_gated_under_a_memory_cap(tmp_path: Path) -> None:
    """The issue's shape: many tiny samples in a small archive. Before, the per-sample state alone outgrew the
    2.5 GiB cap (an 'unexpected MemoryError' naming no file); now it finishes with a verdict in bounded RSS."""
    samples = 2_000_000
    registry = _tiny_project(tmp_path, samples)
    assert (tmp_path / "fixtures" / "tiny.npz").stat().st_size < 24 << 20  # 64 MB of float32 samples
    row, peak_mib = _measure_capped(tmp_path, registry, "always", verdicts=(0,))
    result = row["result"]
    assert row["verdict"] == "PASS" and result["samples"] == samples and result["interval"] is not None
    assert len(result["diagnosis"]["samples"]) == 4  # the worst samples, found among each output's kept ones
    print(f"{samples} tiny samples: peak RSS {peak_mib:.0f} MiB, drop {result['drop']:.3g}, "
          f"interval {result['interval']}")
    assert peak_mib < 600, f"peak RSS {peak_mib:.0f} MiB"


# --- the sample ceiling, and what is left of MemoryError ----------------------------------------------------------


def test_a_fixture_over_the_sample_ceiling_is_an_error_naming_it(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_quantgate.frontends.cli import main

    registry = _tiny_project(tmp_path, 1000)
    fixtures = str(tmp_path / "fixtures")
    assert main(["measure", str(registry), "--fixtures", fixtures, "--ep", "cpu", "--max-samples", "999"]) == 2
    out = capsys.readouterr()
    assert f"{tmp_path / 'fixtures' / 'tiny.npz'}: 1000 samples, over the ceiling of 999" in out.out + out.err
    assert "--quantgate-max-samples" in out.out + out.err
    for ceiling in ("1000", "0"):  # at the ceiling, and no ceiling
        assert main(["measure", str(registry), "--fixtures", fixtures, "--ep", "cpu", "--max-samples", ceiling]) == 0
    assert main(["measure", str(registry), "--max-samples", "-1"]) == 2
    assert "--max-samples: '-1' must be >= 0" in capsys.readouterr().err


def test_the_pytest_option_and_its_ini_twin_set_the_ceiling(project: Any) -> None:
    project.write([project.add_sidecar("alpha")])  # the digits fixture: 1197 samples
    result = project.run("--quantgate-max-samples", "100")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*alpha.npz: 1197 samples, over the ceiling of 100 (--quantgate-max-samples*"])
    result = project.run("--quantgate-max-samples", "many")
    result.stderr.fnmatch_lines(["*--quantgate-max-samples: 'many' is not an integer*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    project.pytester.makeini("[pytest]\nquantgate_max_samples = -5\n")
    result = project.run()
    result.stderr.fnmatch_lines(["*quantgate_max_samples (ini) = '-5' is invalid; allowed: an integer >= 0*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    project.pytester.makeini("[pytest]\nquantgate_max_samples = 1197\n")
    project.run().assert_outcomes(passed=1)


def test_running_out_of_memory_is_an_error_naming_the_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the issue saw as "unexpected MemoryError" naming no file, should memory still run out (a chunk)."""
    from pytest_quantgate.engine import comparison
    from pytest_quantgate.io.registry import load_registry
    from pytest_quantgate.runner.gate import run_one
    from pytest_quantgate.settings import Settings

    registry_path = _tiny_project(tmp_path, 500)
    calls = []

    def exhausted(self: Any, start: int, *args: Any) -> None:
        calls.append(start)
        if start >= 128:
            raise MemoryError

    monkeypatch.setattr(comparison.Collector, "add", exhausted)
    registry = load_registry(registry_path)
    settings = Settings(enabled=True, registry=registry_path, fixtures_dir=tmp_path / "fixtures", eps=("cpu",),
                        regen="never")
    outcome = run_one(registry, registry.entry("tiny"), "cpu", settings)
    assert outcome.status == "error" and outcome.traceback is None, outcome
    assert outcome.message.startswith(f"{tmp_path / 'fixtures' / 'tiny.npz'}: out of memory after 128 of 500 samples")


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_taking_a_few_samples_of_many_tiny_ones_reads_large_blocks(tmp_path: Path, save: Any) -> None:
    from pytest_quantgate.io.soak import load_fixture

    x = np.arange(200_000 * 3, dtype=np.float32).reshape(200_000, 3)
    save(tmp_path / "f.npz", x=x)
    picked = load_fixture(tmp_path / "f.npz").take([199_999, 5, 70_001, 5])
    np.testing.assert_array_equal(picked["x"], x[[5, 70_001, 199_999]])


def test_the_issues_archive_of_tiny_samples_is_refused_at_once(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A 1.4 MB zip declaring 320 MB of 8-float samples (10^7 + 1 of them): an ERROR from the headers alone."""
    import zipfile

    from numpy.lib import format as npy

    from pytest_quantgate.frontends.cli import main

    registry = _tiny_project(tmp_path, 100)
    shape = (10_000_001, 8)
    path = tmp_path / "fixtures" / "tiny.npz"
    zeros = bytes(1 << 22)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive, \
            archive.open("x.npy", "w", force_zip64=True) as member:
        npy.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": shape})
        for left in range(shape[0] * shape[1] * 4, 0, -len(zeros)):
            member.write(zeros[: min(left, len(zeros))])
    assert path.stat().st_size < 2 << 20
    assert main(["measure", str(registry), "--fixtures", str(tmp_path / "fixtures"), "--ep", "cpu"]) == 2
    out = capsys.readouterr()
    assert f"{path}: 10000001 samples, over the ceiling of 10000000 (--quantgate-max-samples" in out.out + out.err


def _task_project(root: Path, samples: int) -> Path:
    """A model with a raw detector head [N, 84, 8400] and a score map [N, 2, 320, 420], its dynamic sidecar."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(1)
    consts = {"w": rng.normal(0, 0.6, (84, 1, 3, 3)).astype(np.float32), "b": np.zeros(84, np.float32),
              "axis1": np.array([1], np.int64), "at0": np.array([0], np.int64), "at2": np.array([2], np.int64),
              "at4": np.array([4], np.int64), "at84": np.array([84], np.int64),
              "px": np.array([640.0], np.float32), "flat": np.array([0, 84, 8400], np.int64),
              "scale": np.array([1, 1, 4, 4], np.float32)}
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Slice", ["c", "at0", "at4", "axis1"], ["raw_boxes"]),
             helper.make_node("Slice", ["c", "at4", "at84", "axis1"], ["raw_scores"]),
             helper.make_node("Sigmoid", ["raw_boxes"], ["unit_boxes"]),
             helper.make_node("Mul", ["unit_boxes", "px"], ["boxes_px"]),
             helper.make_node("Sigmoid", ["raw_scores"], ["class_scores"]),
             helper.make_node("Concat", ["boxes_px", "class_scores"], ["grid_head"], axis=1),
             helper.make_node("Reshape", ["grid_head", "flat"], ["head"]),
             helper.make_node("Slice", ["c", "at0", "at2", "axis1"], ["two"]),
             helper.make_node("Resize", ["two", "", "scale"], ["big"], mode="nearest"),
             helper.make_node("Sigmoid", ["big"], ["maps"])]
    graph = helper.make_graph(nodes, "task", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 80, 105])],
                              [helper.make_tensor_value_info("head", TensorProto.FLOAT, ["N", 84, 8400]),
                               helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["N", 2, 320, 420])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, root / "task.onnx")
    quantize_dynamic(str(root / "task.onnx"), str(root / "task.int8.onnx"), weight_type=QuantType.QInt8)
    (root / "fixtures").mkdir()
    np.savez(root / "fixtures" / "task.npz", x=rng.uniform(-1, 1, (samples, 1, 80, 105)).astype(np.float32))
    entry = {"id": "task", "onnx": "task.onnx", "quant_mode": "dynamic", "quant_lineage": False,
             "quant_outputs": {"head": {"detections": {"layout": "yolo", "score_threshold": 0.6}},
                               "maps": {"threshold": 0.5}}}
    import modelkit

    return modelkit.write_registry(root / "registry.json", [modelkit.pin(entry, root)])


def test_detector_heads_and_score_maps_are_judged_under_a_memory_cap(tmp_path: Path) -> None:
    """Every anchor of an 8400-anchor head passes NMS candidates and the maps are 268k values per sample: the task
    views stream like the sums (counts per sample and class or channel), so the run stays under a 2.5 GiB cap."""
    registry = _task_project(tmp_path, 96)
    row, peak_mib = _measure_capped(tmp_path, registry, "off", verdicts=(0, 1))
    result = row["result"]
    head, maps = result["outputs"]
    assert head["detections"]["fp32"] > 1000 and len(maps["thresholds"]["channels"]) == 2
    print(f"task views: peak RSS {peak_mib:.0f} MiB, {head['detections']['fp32']} fp32 detections, verdict "
          f"{result['verdict']}: {result['reason'][:200]}")
    assert peak_mib < 1200, f"peak RSS {peak_mib:.0f} MiB"
