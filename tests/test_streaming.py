"""The streaming engine: sums against scipy, chunking and merging, npz reading, channels, labels, batches, floors."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy import stats

from pytest_quantgate.errors import FixtureError
from pytest_quantgate.records import Outcome, read_report
from pytest_quantgate.engine.streaming import Field, PairAccumulator, describe_sums

# --- the sums agree with scipy on float64, however the data is chunked ------------------------------------------


def _data(seed: int, samples: int = 60, channels: int = 3, m: int = 500) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    # large offsets and unequal channel scales: the case where naive one-pass sums cancel
    scale = np.array([1.0, 300.0, 0.01])[:channels]
    a = (rng.normal(1000.0, 1.0, (samples, channels, m)) * scale[None, :, None]).astype(np.float32)
    b = (a + rng.normal(0, 0.05, a.shape) * scale[None, :, None]).astype(np.float32)
    t = (a.astype(np.float64) + rng.normal(0, 0.5, a.shape) * scale[None, :, None])
    return a, b, t


def _accumulate(a: np.ndarray, b: np.ndarray, t: np.ndarray | None, chunk: int) -> PairAccumulator:
    acc = PairAccumulator(a.shape[0], a.shape[1], with_target=t is not None, seed=1)
    for start in range(0, a.shape[0], chunk):
        acc.add(start, a[start:start + chunk], b[start:start + chunk],
                None if t is None else t[start:start + chunk])
    return acc


def test_each_named_field_holds_what_its_name_says() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(5.0, 2.0, (6, 2, 9)).astype(np.float32)
    b = (a + rng.normal(0, 0.3, a.shape)).astype(np.float32)
    t = (a + rng.normal(0, 1.0, a.shape)).astype(np.float32)
    acc = _accumulate(a, b, t, 6)
    assert acc.shift is not None and len(Field) == 13 and acc.stats.shape == (6, 2, 13)
    x, y, z = (v.astype(np.float64) - acc.shift[k][None, :, None] for k, v in enumerate((a, b, t)))
    err = b.astype(np.float64) - a.astype(np.float64)  # errors are taken unshifted
    expected = {
        Field.COUNT: np.full((6, 2), 9.0), Field.SUM_A: x.sum(2), Field.SUM_B: y.sum(2), Field.SUM_T: z.sum(2),
        Field.SUM_AA: (x * x).sum(2), Field.SUM_BB: (y * y).sum(2), Field.SUM_TT: (z * z).sum(2),
        Field.SUM_AB: (x * y).sum(2), Field.SUM_AT: (x * z).sum(2), Field.SUM_BT: (y * z).sum(2),
        Field.SUM_ABS_ERR: np.abs(err).sum(2), Field.SUM_SQ_ERR: (err * err).sum(2),
        Field.MAX_ABS_ERR: np.abs(err).max(2),
    }
    assert set(expected) == set(Field)
    for field, want in expected.items():
        np.testing.assert_allclose(acc.stats[..., field], want, rtol=1e-9, atol=1e-9, err_msg=field.name)


@pytest.mark.parametrize("chunk", [1, 7, 60])
def test_output_metrics_match_scipy_in_float64_for_any_chunking(chunk: int) -> None:
    a, b, t = _data(0)
    acc = _accumulate(a, b, t, chunk)
    rows = acc.output_rows()
    totals = rows.sum(axis=0)
    totals[Field.MAX_ABS_ERR] = rows[:, Field.MAX_ABS_ERR].max()
    got = describe_sums(totals, acc.output_shift(), 0, 1, acc.reservoir())
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    assert got["plcc"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-10)
    fit = stats.linregress(x, y)
    assert got["slope"] == pytest.approx(fit.slope, rel=1e-9)
    assert got["intercept"] == pytest.approx(fit.intercept, rel=1e-6, abs=1e-6)
    assert got["mae"] == pytest.approx(np.mean(np.abs(y - x)), rel=1e-12)
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((y - x) ** 2)), rel=1e-12)
    assert got["max_abs"] == pytest.approx(np.max(np.abs(y - x)), rel=1e-12)
    with_t = describe_sums(totals, acc.output_shift(), 0, 2, acc.reservoir())
    assert with_t["plcc"] == pytest.approx(stats.pearsonr(x, t.ravel()).statistic, abs=1e-10)
    # rank correlations come from the bounded reservoir: close to scipy on everything, never the whole array
    assert acc.reservoir().shape[0] <= 20_000 + a.shape[0]
    assert got["srocc"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=0.01)


def test_channel_metrics_match_scipy_per_channel() -> None:
    a, b, t = _data(1)
    acc = _accumulate(a, b, None, 13)
    plcc = acc.channel_sums().plcc(0, 1)
    for c in range(a.shape[1]):
        expected = stats.pearsonr(a[:, c].astype(np.float64).ravel(), b[:, c].astype(np.float64).ravel()).statistic
        assert plcc[c] == pytest.approx(expected, abs=1e-10)


def test_merging_two_halves_gives_the_sums_of_the_whole() -> None:
    """A fixture split across workers or shards: each half accumulated alone, then merged."""
    a, b, t = _data(2)
    whole = _accumulate(a, b, t, 60)
    first = PairAccumulator(60, 3, with_target=True, seed=1)
    second = PairAccumulator(60, 3, with_target=True, seed=1)
    first.add(0, a[:25], b[:25], t[:25])
    second.add(25, a[25:], b[25:], t[25:])  # a different shift: the merge re-expresses its sums
    merged = first.merge(second)
    assert merged.seen.all()
    np.testing.assert_allclose(merged.channel_sums().plcc(0, 1), whole.channel_sums().plcc(0, 1), atol=1e-12)
    np.testing.assert_allclose(merged.channel_sums().plcc(1, 2), whole.channel_sums().plcc(1, 2), atol=1e-12)


# --- npz: memory-mapped, streamed, sharded, and never trusting a header ------------------------------------------


def _npz_fixture(tmp_path: Path, compressed: bool) -> tuple[Path, np.ndarray]:
    x = np.arange(50 * 6, dtype=np.float32).reshape(50, 6)
    path = tmp_path / ("c.npz" if compressed else "s.npz")
    (np.savez_compressed if compressed else np.savez)(path, x=x, target=x[:, 0].copy())
    return path, x


@pytest.mark.parametrize("compressed", [False, True])
def test_fixture_chunks_stream_every_sample_in_order(tmp_path: Path, compressed: bool) -> None:
    from pytest_quantgate.io.soak import load_fixture

    path, x = _npz_fixture(tmp_path, compressed)
    fixture = load_fixture(path)
    got = [block["x"] for block, _ in fixture.chunks(7)]
    assert [len(g) for g in got] == [7] * 7 + [1]
    np.testing.assert_array_equal(np.concatenate(got), x)
    assert isinstance(fixture.inputs["x"], np.memmap) != compressed  # stored members are memory-mapped


def test_a_folder_of_shards_is_one_fixture(tmp_path: Path) -> None:
    from pytest_quantgate.io.soak import find_fixture, load_fixture

    folder = tmp_path / "big"
    folder.mkdir()
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    np.savez(folder / "part-000.npz", x=x[:12])
    np.savez_compressed(folder / "part-001.npz", x=x[12:])
    fixture = load_fixture(find_fixture([folder]))
    assert fixture.samples == 30
    np.testing.assert_array_equal(np.concatenate([b["x"] for b, _ in fixture.chunks(5)]), x)
    np.testing.assert_array_equal(fixture.take([3, 20])["x"], x[[3, 20]])
    np.savez(folder / "part-002.npz", y=x)
    with pytest.raises(FixtureError, match="every shard must hold the same arrays"):
        load_fixture(folder)


def test_a_header_that_lies_about_its_size_is_refused_before_allocating(tmp_path: Path) -> None:
    from numpy.lib import format as npy

    from pytest_quantgate.io.soak import load_fixture

    path = tmp_path / "lie.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as handle:
        npy.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (1_000_000_000, 64)})
        handle.write(b"\0" * 64)
    with pytest.raises(FixtureError, match=r"declares shape \(1000000000, 64\).*does not match its data"):
        load_fixture(path)


def test_a_zip_bomb_is_refused_by_the_cap_before_inflating(tmp_path: Path) -> None:
    from pytest_quantgate.io.soak import load_fixture

    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros((4096, 4096), np.float32))  # 64 MiB of zeros in ~65 KB
    assert path.stat().st_size < 200_000
    with pytest.raises(FixtureError, match="over the fixture cap of 1048576 bytes"):
        load_fixture(path, max_bytes=1 << 20)
    assert load_fixture(path).samples == 4096  # under the default cap it is an ordinary (lazy) fixture


# --- models for the verdict tests ---------------------------------------------------------------------------------


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17, ml: bool = False) -> Path:
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("ai.onnx.ml", 3)] if ml else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _registry(tmp_path: Path, entries: list[dict[str, Any]]) -> Path:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"schema_version": 1, "models": entries}, indent=2))
    return path


def _measure(registry: Path, fixtures: Path, *args: str) -> tuple[int, dict[str, Outcome]]:
    """Run ``quantgate measure`` and read its JSON back into typed outcomes (the round trip under test)."""
    from pytest_quantgate.frontends.cli import main

    out = registry.parent / "out.json"
    code = main(["measure", str(registry), "--fixtures", str(fixtures), "--ep", "cpu", "--bootstrap", "200",
                 "--json", str(out), *args])
    rows = {o.entry_id: o for o in read_report(json.loads(out.read_text()))}
    return code, rows


def _head(path: Path, score_gain: float, score_bias: float) -> Path:
    """A detector-like head: [N, 6, 100] = 4 box rows (0-320 px) + 2 score rows (0-1) from one input."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 16)).astype(np.float32)
    box = helper.make_node("MatMul", ["W", "x"], ["lin"])
    split = helper.make_node("Split", ["lin", "sizes"], ["boxes_raw", "scores_raw"], axis=1)
    boxes = helper.make_node("Mul", ["boxes_raw", "k"], ["boxes"])
    scores_scaled = helper.make_node("Mul", ["scores_raw", "g"], ["scores_g"])
    scores_biased = helper.make_node("Add", ["scores_g", "c"], ["scores_b"])
    scores = helper.make_node("Sigmoid", ["scores_b"], ["scores"])
    cat = helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1)
    graph = helper.make_graph(
        [box, split, boxes, scores_scaled, scores_biased, scores, cat], "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 100])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 100])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([4, 2], np.int64), "sizes"),
         numpy_helper.from_array(np.array(60.0, np.float32), "k"),
         numpy_helper.from_array(np.array(score_gain, np.float32), "g"),
         numpy_helper.from_array(np.array(score_bias, np.float32), "c")])
    return _save(graph, path)


def test_a_collapsed_score_channel_fails_although_the_boxes_dominate(tmp_path: Path) -> None:
    """The YOLO case: scores constant in the sidecar, boxes right; the flattened PLCC alone would pass."""
    from pytest_quantgate.fileio import sha256_file

    (tmp_path / "fixtures").mkdir()
    x = np.random.default_rng(0).normal(size=(64, 16, 100)).astype(np.float32)
    np.savez(tmp_path / "fixtures" / "det.npz", x=x)
    np.savez(tmp_path / "fixtures" / "ok.npz", x=x)
    _head(tmp_path / "det.onnx", 1.0, 0.0)
    _head(tmp_path / "det.int8.onnx", 0.0, -9.0)  # every score ~0.0001: no detection survives
    _head(tmp_path / "ok.onnx", 1.0, 0.0)
    _head(tmp_path / "ok.int8.onnx", 1.0, 0.0)
    # hand-built float "sidecars" isolate the comparison: the lineage check (tested in test_lineage) is off
    entries = [{"id": name, "onnx": f"{name}.onnx", "quant_mode": "static", "quant_calibration_set": "x.npz",
                "quant_lineage": False,
                "sha256": sha256_file(tmp_path / f"{name}.onnx"),
                "int8_sha256": sha256_file(tmp_path / f"{name}.int8.onnx")} for name in ("det", "ok")]
    registry = _registry(tmp_path, entries)
    code, rows = _measure(registry, tmp_path / "fixtures")
    assert code == 1
    assert rows["ok"].verdict == "PASS"
    det = rows["det"]
    assert det.verdict == "FAIL" and det.result.kind == "drop", det
    output = det.result.outputs[0]
    assert output.channels == 6 and output.worst_channel in (4, 5)
    assert 1.0 - output.vs_fp32.plcc < 0.01  # the flattened drop alone would have passed the 0.01 budget
    assert "worst channel" in det.message
    # the entry can opt out of the per-channel view: then only the whole array counts, and it passes
    entries[0]["quant_channel_axis"] = None
    entries[0]["quant_budget_slope"] = 1.0
    code, rows = _measure(_registry(tmp_path, entries), tmp_path / "fixtures")
    assert rows["det"].verdict == "PASS", rows["det"]


def _argmax_model(path: Path, flip: bool) -> Path:
    """Logits [N, 10] -> ArgMax labels [N]; ``flip`` turns every 4 into a 5 (the int8 mutant)."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(8, 10)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"]),
             helper.make_node("ArgMax", ["logits"], ["raw"], axis=1, keepdims=0)]
    inits = [numpy_helper.from_array(w, "W")]
    if flip:
        nodes += [helper.make_node("Equal", ["raw", "four"], ["is4"]),
                  helper.make_node("Where", ["is4", "five", "raw"], ["label"])]
        inits += [numpy_helper.from_array(np.array(4, np.int64), "four"),
                  numpy_helper.from_array(np.array(5, np.int64), "five")]
    else:
        nodes.append(helper.make_node("Identity", ["raw"], ["label"]))
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])], inits)
    return _save(graph, path)


def test_label_outputs_are_judged_by_agreement_never_by_plcc(tmp_path: Path) -> None:
    from pytest_quantgate.fileio import sha256_file

    (tmp_path / "fixtures").mkdir()
    x = np.random.default_rng(1).normal(size=(400, 8)).astype(np.float32)
    for name in ("flip", "same"):
        np.savez(tmp_path / "fixtures" / f"{name}.npz", x=x)
        _argmax_model(tmp_path / f"{name}.onnx", False)
    _argmax_model(tmp_path / "flip.int8.onnx", True)
    _argmax_model(tmp_path / "same.int8.onnx", False)
    entries = [{"id": n, "onnx": f"{n}.onnx", "quant_mode": "static", "quant_calibration_set": "x.npz",
                "quant_lineage": False,
                "sha256": sha256_file(tmp_path / f"{n}.onnx"), "int8_sha256": sha256_file(tmp_path / f"{n}.int8.onnx")}
               for n in ("flip", "same")]
    code, rows = _measure(_registry(tmp_path, entries), tmp_path / "fixtures")
    assert rows["same"].verdict == "PASS"
    flip = rows["flip"]
    assert flip.verdict == "FAIL" and flip.result.kind == "labels", flip
    labels = flip.result.outputs[0].labels
    expected = float(np.mean(np.argmax(x @ np.random.default_rng(5).normal(size=(8, 10)).astype(np.float32), 1) == 4))
    assert labels.flip_rate == pytest.approx(expected)
    assert labels.interval.low < labels.flip_rate < labels.interval.high
    assert "differ on" in flip.message and "quant_budget_label_flip" in flip.message


def test_a_sequence_of_maps_output_is_compared_as_an_array_in_key_order(tmp_path: Path) -> None:
    """skl2onnx's default ZipMap probabilities: seq(map(int64, float)), a list of dicts in Python."""
    from pytest_quantgate.fileio import sha256_file

    def zipmap(path: Path, gain: float) -> Path:
        w = np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32) * gain
        nodes = [helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=1),
                 helper.make_node("ZipMap", ["p"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[2, 0, 1])]
        out = helper.make_tensor_sequence_value_info("probs", TensorProto.UNDEFINED, None)
        out.type.sequence_type.elem_type.map_type.key_type = TensorProto.INT64
        out.type.sequence_type.elem_type.map_type.value_type.tensor_type.elem_type = TensorProto.FLOAT
        graph = helper.make_graph(nodes, "zm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                                  [out], [numpy_helper.from_array(w, "W")])
        return _save(graph, path, ml=True)

    (tmp_path / "fixtures").mkdir()
    np.savez(tmp_path / "fixtures" / "zm.npz", x=np.random.default_rng(3).normal(size=(200, 8)).astype(np.float32))
    zipmap(tmp_path / "zm.onnx", 1.0)
    zipmap(tmp_path / "zm.int8.onnx", 1.0)
    entry = {"id": "zm", "onnx": "zm.onnx", "quant_mode": "static", "quant_calibration_set": "x.npz",
             "quant_lineage": False,
             "sha256": sha256_file(tmp_path / "zm.onnx"), "int8_sha256": sha256_file(tmp_path / "zm.int8.onnx")}
    code, rows = _measure(_registry(tmp_path, [entry]), tmp_path / "fixtures")
    assert code == 0 and rows["zm"].verdict == "PASS", rows["zm"]
    zipmap(tmp_path / "zm.int8.onnx", -1.0)  # probabilities reversed: must fail, not crash
    entry["int8_sha256"] = sha256_file(tmp_path / "zm.int8.onnx")
    code, rows = _measure(_registry(tmp_path, [entry]), tmp_path / "fixtures")
    assert code == 1 and rows["zm"].verdict == "FAIL", rows["zm"]


def test_below_the_sample_floor_the_fixture_is_an_error_naming_the_count(tmp_path: Path) -> None:
    from pytest_quantgate.fileio import sha256_file

    (tmp_path / "fixtures").mkdir()
    np.savez(tmp_path / "fixtures" / "few.npz", x=np.random.default_rng(0).normal(size=(2, 16, 100)).astype(np.float32))
    _head(tmp_path / "few.onnx", 1.0, 0.0)
    _head(tmp_path / "few.int8.onnx", 1.0, 0.0)  # identical: a 2-sample fixture would have "passed" with CI [0, 0]
    entry = {"id": "few", "onnx": "few.onnx", "quant_mode": "static", "quant_calibration_set": "x.npz",
             "quant_lineage": False,
             "sha256": sha256_file(tmp_path / "few.onnx"), "int8_sha256": sha256_file(tmp_path / "few.int8.onnx")}
    code, rows = _measure(_registry(tmp_path, [entry]), tmp_path / "fixtures")
    assert code == 2 and rows["few"].verdict == "ERROR"
    assert "2 sample(s); entry 'few' needs at least 30" in rows["few"].message


def test_a_dynamic_sidecar_verdict_does_not_depend_on_the_batch_size_option(tmp_path: Path) -> None:
    """Dynamic sidecars run at their deployment batch (1 by default), whatever --batch-size says."""
    import modelkit

    from pytest_quantgate.fileio import sha256_file

    (tmp_path / "fixtures").mkdir()
    onnx.save(modelkit.mlp_model(modelkit.fitted_mlp_weights()), tmp_path / "d.onnx")
    modelkit.quantize_dynamic_file(tmp_path / "d.onnx", tmp_path / "d.int8.onnx")
    _, _, test_x, test_y = modelkit.digits_split()
    np.savez(tmp_path / "fixtures" / "d.npz", features=test_x, target=test_y)
    entry = {"id": "d", "onnx": "d.onnx", "quant_mode": "dynamic", "sha256": sha256_file(tmp_path / "d.onnx"),
             "int8_sha256": sha256_file(tmp_path / "d.int8.onnx")}
    registry = _registry(tmp_path, [entry])
    drops = {batch: _measure(registry, tmp_path / "fixtures", "--batch-size", str(batch))[1]["d"].result.drop
             for batch in (1, 32, 256)}
    assert drops[1] == pytest.approx(drops[32], abs=1e-9) and drops[1] == pytest.approx(drops[256], abs=1e-9)


# --- real size: memory stays bounded as samples grow -------------------------------------------------------------


def _image_model(path: Path, channels: int = 8) -> Path:
    rng = np.random.default_rng(11)
    w1 = (rng.normal(size=(channels, 1, 3, 3)) / 3).astype(np.float32)
    w2 = (rng.normal(size=(channels, channels, 3, 3)) / (3 * np.sqrt(channels))).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "img", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 256, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 256, 256])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return _save(graph, path)


def test_large_outputs_stream_in_bounded_memory(tmp_path: Path) -> None:
    """8×256×256 float outputs for 240 samples (1 GiB per model if held) gated under a 3 GiB address-space cap.

    The fixture is real photographs (scikit-image), 256×256 luma crops; the sidecar is ORT static QDQ.
    """
    from skimage import data as skdata
    from skimage.transform import resize

    from pytest_quantgate.fileio import sha256_file
    from pytest_quantgate.producers.ptq_static import StaticConfig, quantize_static

    photos = [skdata.camera(), skdata.coins(), skdata.moon(), skdata.page(), skdata.text(), skdata.brick()]
    crops = []
    rng = np.random.default_rng(0)
    while len(crops) < 240:
        img = photos[len(crops) % len(photos)].astype(np.float32) / 255.0
        y, x = rng.integers(0, img.shape[0] - 128), rng.integers(0, img.shape[1] - 128)
        crops.append(resize(img[y:y + 128, x:x + 128], (256, 256), anti_aliasing=True).astype(np.float32))
    x = np.stack(crops)[:, None]
    (tmp_path / "fixtures").mkdir()
    np.savez(tmp_path / "fixtures" / "img.npz", x=x)
    np.savez(tmp_path / "fixtures" / "img.calib.npz", x=x[:32])
    _image_model(tmp_path / "img.onnx")
    quantize_static(tmp_path / "img.onnx", tmp_path / "img.int8.onnx",
                    StaticConfig(calibration_set=tmp_path / "fixtures" / "img.calib.npz"))
    entry = {"id": "img", "onnx": "img.onnx", "quant_mode": "static", "quant_calibration_set": "img.calib.npz",
             "quant_accuracy_budget_plcc": 0.05,
             "sha256": sha256_file(tmp_path / "img.onnx"), "int8_sha256": sha256_file(tmp_path / "img.int8.onnx")}
    registry = _registry(tmp_path, [entry])
    code = (f"import sys; from pytest_quantgate.frontends.cli import main; "
            f"rc = main(['measure', {str(registry)!r}, '--fixtures', {str(tmp_path / 'fixtures')!r}, '--ep', 'cpu', "
            f"'--json', {str(tmp_path / 'o.json')!r}]); "
            # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child started from a large pytest worker would
            # report the worker's size
            f"hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]; "
            f"print('MAXRSS', hwm); sys.exit(rc)")
    limit = 3 << 30
    proc = subprocess.run(["prlimit", f"--as={limit}", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    peak_mib = int(proc.stdout.split("MAXRSS")[-1].split()[0]) / 1024
    (row,) = read_report(json.loads((tmp_path / "o.json").read_text()))
    assert row.verdict == "PASS" and row.result is not None and row.result.samples == 240
    # whole outputs of both models in float32 are 960 MiB each: the streamed gate holds one chunk of them
    assert peak_mib < 900, f"peak RSS {peak_mib:.0f} MiB"
    print(f"large outputs: 240 samples, peak RSS {peak_mib:.0f} MiB")


def test_the_json_report_round_trips_through_the_typed_records(tmp_path: Path) -> None:
    """Every item of measure's JSON (strict JSON: no NaN/Infinity) loads as the typed Outcome it came from."""
    repo = Path(__file__).resolve().parents[1]
    from pytest_quantgate.frontends.cli import main

    out = tmp_path / "report.json"
    assert main(["measure", str(repo / "model" / "registry.json"), "--fixtures", str(repo / "fixtures"), "--ep", "cpu",
                 "--bootstrap", "100", "--diagnose", "always", "--json", str(out)]) == 0

    def strict(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    items = json.loads(out.read_text(), parse_constant=strict)
    assert len(items) == 3
    for item in items:
        outcome = Outcome.from_json(item)
        result = outcome.result
        assert result is not None and result.drop == item["result"]["drop"]
        assert result.timing is not None and result.timing.int8_bytes == (repo / "model" / f"{outcome.entry_id}.int8"
                                                                          ".onnx").stat().st_size
        assert result.provenance is not None and result.provenance.ep == "cpu"
        assert result.lineage is not None and result.lineage.ok
        assert result.diagnosis is not None and len(result.diagnosis.samples) == 4  # --diagnose always
        assert isinstance(result.outputs[0].vs_fp32.plcc, float) and result.interval is not None
        # compared as JSON: a NaN metric (slope of a constant output) is never == itself as a float
        assert json.loads(json.dumps(outcome.to_json())) == item


def test_a_record_that_does_not_fit_is_refused_naming_the_field() -> None:
    """Loading checks every field against its annotation, so a hand-edited or older report cannot pass as new."""
    from pytest_quantgate.records import RecordError

    good = Outcome("m", "cpu", "dynamic", "error", "boom").to_json()
    assert Outcome.from_json(good) == Outcome("m", "cpu", "dynamic", "error", "boom")
    with pytest.raises(RecordError, match=r"Outcome\.status: 'fine' is not one of"):
        Outcome.from_json({**good, "status": "fine"})
    with pytest.raises(RecordError, match=r"Outcome\.ep: missing"):
        Outcome.from_json({k: v for k, v in good.items() if k != "ep"})
    with pytest.raises(RecordError, match=r"Outcome\.notes\[1\]: expected a string"):
        Outcome.from_json({**good, "notes": ["a", 3]})


def test_the_fp32_model_named_as_its_own_sidecar_fails_on_lineage(tmp_path: Path) -> None:
    """Drop 0 and every budget met, yet it quantises nothing: a FAIL of kind lineage, never a PASS."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    from pytest_quantgate.fileio import sha256_file

    shutil.copy(repo / "model" / "fusion_mlp_v1.onnx", tmp_path / "m.onnx")
    shutil.copy(repo / "model" / "fusion_mlp_v1.onnx", tmp_path / "m.int8.onnx")
    (tmp_path / "fixtures").mkdir()
    shutil.copy(repo / "fixtures" / "fusion_mlp_v1.npz", tmp_path / "fixtures" / "m.npz")
    digest = sha256_file(tmp_path / "m.onnx")
    entry = {"id": "m", "onnx": "m.onnx", "quant_mode": "dynamic", "sha256": digest, "int8_sha256": digest}
    code, rows = _measure(_registry(tmp_path, [entry]), tmp_path / "fixtures")
    assert code == 1
    row = rows["m"]
    assert row.verdict == "FAIL" and row.result.kind == "lineage" and row.result.drop == pytest.approx(0.0, abs=1e-12)
    assert "not a quantised sidecar: m.int8.onnx is the fp32 file itself" in row.message


def test_an_unexpected_exception_is_that_entrys_error_and_the_others_still_run(project: Any) -> None:
    """A NonZero output changes length per sample: whatever breaks inside, one ERROR line, no traceback."""
    from pytest_quantgate.fileio import sha256_file

    nodes = [helper.make_node("NonZero", ["features"], ["nz"])]
    graph = helper.make_graph(nodes, "nz", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("nz", TensorProto.INT64, [2, "K"])])
    _save(graph, project.model / "nz.onnx", opset=13)
    _save(graph, project.model / "nz.int8.onnx", opset=13)
    (project.fixtures / "nz.npz").write_bytes((project.fixtures / "digits.npz").read_bytes())
    odd = {"id": "nz", "onnx": "nz.onnx", "quant_mode": "dynamic", "quant_lineage": False,
           "sha256": sha256_file(project.model / "nz.onnx"), "int8_sha256": sha256_file(project.model / "nz.int8.onnx")}
    project.write([odd, project.add_sidecar("healthy")])
    result = project.run("--quantgate-report=report.json")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*quantgate ERROR: nz [[]cpu[]]: *"])
    assert "Traceback" not in result.stdout.str()
    rows = {r.entry_id: r for r in read_report(json.loads((project.root / "report.json").read_text()))}
    assert rows["healthy"].verdict == "PASS" and rows["nz"].verdict == "ERROR"


def test_measure_keeps_every_entry_when_one_raises_anything(project: Any, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Fault injection: an arbitrary exception (and a recipe's sys.exit) inside one entry's run."""
    from pytest_quantgate.runner import gate
    from pytest_quantgate.frontends.cli import main

    real = gate.measure

    def flaky(prepared: Any, settings: Any) -> Any:
        if prepared.entry.id == "boom":
            raise KeyError("surprise")
        if prepared.entry.id == "quits":
            raise SystemExit(3)
        return real(prepared, settings)

    monkeypatch.setattr(gate, "measure", flaky)
    project.write([project.add_sidecar("boom"), project.add_sidecar("quits"), project.add_sidecar("fine")])
    out = project.root / "out.json"
    code = main(["measure", str(project.model / "registry.json"), "--fixtures", str(project.fixtures), "--ep", "cpu",
                 "--bootstrap", "100", "--json", str(out)])
    assert code == 2
    rows = {r.entry_id: r for r in read_report(json.loads(out.read_text()))}
    assert rows["fine"].verdict == "PASS"
    assert rows["boom"].verdict == "ERROR" and "unexpected KeyError: 'surprise'" in rows["boom"].message
    assert "entry 'boom' ($.models[0])" in rows["boom"].message and "Traceback" in rows["boom"].traceback
    assert rows["quits"].verdict == "ERROR" and "unexpected SystemExit: 3" in rows["quits"].message
    assert "Traceback" not in capsys.readouterr().out


@pytest.mark.parametrize(("spread", "verdict"), [(1e-6, "PASS"), (0.1, "FAIL")])
def test_a_channel_below_one_8bit_step_of_its_magnitude_is_not_judged(spread: float, verdict: str) -> None:
    """A saturated score (0.999 ± 1e-6) that int8 keeps constant is not a collapse; a real score (± 0.1) is."""
    from pytest_quantgate.engine.comparison import CompareOptions, compare
    from pytest_quantgate.io.registry import parse_registry
    from pytest_quantgate.io.soak import Fixture, TensorSpec

    entry = parse_registry({"schema_version": 1, "models": [
        {"id": "d", "onnx": "d.onnx", "quant_mode": "dynamic", "sha256": "0" * 64, "int8_sha256": "1" * 64}]},
        Path("registry.json")).entries[0]
    rng = np.random.default_rng(0)
    ref = np.empty((64, 3, 50))
    ref[:, 0] = rng.uniform(0, 320, (64, 50))  # box coordinates
    ref[:, 1] = 0.5 + spread * rng.normal(size=(64, 50))  # a score that barely moves (or does)
    ref[:, 2] = rng.uniform(0, 1, (64, 50))  # a score that moves
    test = ref + rng.normal(0, 0.002, ref.shape) * np.array([100.0, 0.0, 1.0])[None, :, None]
    test[:, 1] = 0.5  # int8 keeps the second channel constant
    fixture = Fixture(Path("soak.npz"), "0", {"x": np.zeros((64, 1), np.float32)}, None)
    spec_in = (TensorSpec("x", "tensor(float)", ("N", 1)),)
    spec_out = (TensorSpec("y", "tensor(float)", ("N", 3, 50)),)
    result = compare(entry, "cpu", fixture, spec_in, spec_out, {"y": ref}, {"y": test}, CompareOptions(bootstrap=100))
    assert result.verdict == verdict, result.reason
    assert result.outputs[0].channels == 3


def test_an_input_without_a_declared_shape_is_not_called_a_scalar(tmp_path: Path) -> None:
    from pytest_quantgate.fileio import sha256_file

    nodes = [helper.make_node("Add", ["x", "x"], ["y"])]
    graph = helper.make_graph(nodes, "free", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    for name in ("free.onnx", "free.int8.onnx"):
        _save(graph, tmp_path / name)
    (tmp_path / "fixtures").mkdir()
    np.savez(tmp_path / "fixtures" / "free.npz", z=np.ones((40, 3), np.float32))
    entry = {"id": "free", "onnx": "free.onnx", "quant_mode": "static", "quant_calibration_set": "x.npz",
             "quant_lineage": False, "sha256": sha256_file(tmp_path / "free.onnx"),
             "int8_sha256": sha256_file(tmp_path / "free.int8.onnx")}
    code, rows = _measure(_registry(tmp_path, [entry]), tmp_path / "fixtures")
    assert code == 2
    assert "'x': float32 (no shape declared in the model)" in rows["free"].message
    # with the right array name it runs: samples on axis 0, any trailing shape
    np.savez(tmp_path / "fixtures" / "free.npz", x=np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32))
    code, rows = _measure(_registry(tmp_path, [entry]), tmp_path / "fixtures")
    assert code == 0 and rows["free"].verdict == "PASS", rows["free"]


def _anchor_major(path: Path, noise: float) -> Path:
    """[N, 1100, 3]: an anchor-major head (more anchors than the default channel view splits), from x [N, 8]."""
    rng = np.random.default_rng(11)
    w = rng.normal(size=(8, 3300)).astype(np.float32)
    w += noise * rng.normal(size=w.shape).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["flat"]), helper.make_node("Reshape", ["flat", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "anchors", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1100, 3])],
                              [numpy_helper.from_array(w, "W"),
                               numpy_helper.from_array(np.array([-1, 1100, 3], dtype=np.int64), "shape")])
    return _save(graph, path)


def test_an_anchor_major_head_is_judged_whole_by_default_and_per_channel_when_asked(tmp_path: Path) -> None:
    """Past MAX_DEFAULT_CHANNELS the default axis is not split (its per-sample sums would grow with the output)."""
    from pytest_quantgate.engine.comparison import MAX_DEFAULT_CHANNELS
    from pytest_quantgate.fileio import sha256_file

    assert 1100 > MAX_DEFAULT_CHANNELS
    (tmp_path / "fixtures").mkdir()
    _anchor_major(tmp_path / "a.onnx", 0.0)
    _anchor_major(tmp_path / "a.int8.onnx", 0.01)
    np.savez(tmp_path / "fixtures" / "a.npz", x=np.random.default_rng(2).normal(size=(64, 8)).astype(np.float32))
    entry = {"id": "a", "onnx": "a.onnx", "quant_mode": "dynamic", "quant_lineage": False,
             "sha256": sha256_file(tmp_path / "a.onnx"), "int8_sha256": sha256_file(tmp_path / "a.int8.onnx")}
    _, rows = _measure(_registry(tmp_path, [entry]), tmp_path / "fixtures")
    result = rows["a"].result
    assert result is not None and result.outputs[0].channels == 1
    assert any("1100 entries along axis 1" in w and "quant_channel_axis" in w for w in result.warnings)
    _, rows = _measure(_registry(tmp_path, [{**entry, "quant_channel_axis": 1}]), tmp_path / "fixtures")
    asked = rows["a"].result
    assert asked is not None and asked.outputs[0].channels == 1100 and asked.outputs[0].channel_axis == 1
    assert not any("entries along axis" in w for w in asked.warnings)
