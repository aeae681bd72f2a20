"""diagnose() on the bundled sidecars, on a deliberately broken QDQ sidecar and on graphs it cannot analyse."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import convkit
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pytest_quantgate import fileio
from pytest_quantgate.analysis import diagnosis, qgraph
from pytest_quantgate.analysis.diagnosis import Diagnosis, diagnose, feeds_from_fixture
from pytest_quantgate.analysis.qgraph import sqnr_db
from pytest_quantgate.engine.logcapture import capture_logs
from pytest_quantgate.reporting.reports import diagnosis_lines

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model"
FIXTURES = ROOT / "fixtures"
BROKEN_SCALE = "/body/body.3/Relu_output_0_scale"
BROKEN_TENSOR = "/body/body.3/Relu_output_0"


def _feeds(entry_id: str, count: int = 3) -> list[dict[str, np.ndarray]]:
    with np.load(FIXTURES / f"{entry_id}.npz") as npz:
        inputs = {k: npz[k] for k in npz.files if k != "target"}
    return feeds_from_fixture(inputs, batched=True, count=count, batch=16)


@pytest.fixture()
def residual(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the bundled static residual filter (so a test can watch the folder for stray files)."""
    for name in ("residual_filter_v1.onnx", "residual_filter_v1.int8.onnx"):
        shutil.copy(MODEL / name, tmp_path / name)
    return tmp_path / "residual_filter_v1.onnx", tmp_path / "residual_filter_v1.int8.onnx"


def _check_json(diag: Diagnosis) -> dict:
    data = json.loads(json.dumps(diag.to_dict(), allow_nan=False))
    assert data["format"] == diag.format
    return data


def test_sqnr_db_matches_definition() -> None:
    x = np.array([3.0, 4.0])
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x + np.array([0.3, 0.4])) == pytest.approx(20.0)
    assert sqnr_db(x, np.array([np.nan, 1.0])) == float("-inf")


def test_static_qdq_sidecar_weights_activations_and_outputs(residual: tuple[Path, Path]) -> None:
    fp32, int8 = residual
    before = sorted(p.name for p in fp32.parent.iterdir())
    diag = diagnose(fp32, int8, _feeds("residual_filter_v1"), top=4)
    assert sorted(p.name for p in fp32.parent.iterdir()) == before, "diagnose wrote beside the user's models"
    assert diag.format == "qdq"
    assert set(diag.analysed) == {"outputs", "weights", "activations"}
    assert len(diag.worst) == 4
    keys = [t.rank_key for t in diag.worst]
    assert keys == sorted(keys)
    kinds = {t.kind for t in diag.worst}
    assert kinds == {"weight", "activation"}
    # rounding a healthy calibration: every local error is well above 20 dB (the fused Relu clamp is not noise)
    assert all(t.sqnr_db is not None and t.sqnr_db > 20 for t in diag.worst)
    act = next(t for t in diag.worst if t.kind == "activation")
    assert act.xmodel_db is not None and act.exclude and all(n.startswith("/") for n in act.exclude)
    assert [o.tensor for o in diag.outputs] == ["clean"]
    assert diag.outputs[0].xmodel_db > 30
    lines = diagnosis_lines(diag)
    assert lines[0].startswith("Diagnosis (qdq sidecar, 3 feed(s)")
    assert any("local dB" in line and "vs fp32 dB" in line for line in lines)
    assert any(line.startswith("  Suggestion: ") and "--nodes-to-exclude" in line for line in lines)
    _check_json(diag)


def test_broken_activation_scale_ranks_first(residual: tuple[Path, Path], tmp_path: Path) -> None:
    fp32, int8 = residual
    model = onnx.load(str(int8))
    for init in model.graph.initializer:
        if init.name == BROKEN_SCALE:
            init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * 8).astype(np.float32), init.name))
            break
    else:
        pytest.fail(f"{BROKEN_SCALE} not in the bundled sidecar")
    broken = tmp_path / "broken.int8.onnx"
    onnx.save(model, str(broken))
    healthy = diagnose(fp32, int8, _feeds("residual_filter_v1"))
    diag = diagnose(fp32, broken, _feeds("residual_filter_v1"))
    first = diag.worst[0]
    assert (first.kind, first.tensor, first.node) == ("activation", BROKEN_TENSOR, "/body/body.3/Relu")
    assert healthy.worst[0].tensor != BROKEN_TENSOR  # the ranking moved because of the break
    before = next(t for t in healthy.worst if t.tensor == BROKEN_TENSOR).sqnr_db
    assert before - first.sqnr_db == pytest.approx(20 * np.log10(8), abs=3)  # 8x coarser steps: ~18 dB
    assert "'/body/body.3/Relu'" in diag.suggestion and "--nodes-to-exclude" in diag.suggestion
    assert BROKEN_TENSOR in "\n".join(diagnosis_lines(diag))


def test_dynamic_sidecar_weights_by_name_and_simulated_activations(tmp_path: Path) -> None:
    diag = diagnose(MODEL / "fusion_mlp_v1.onnx", MODEL / "fusion_mlp_v1.int8.onnx", _feeds("fusion_mlp_v1"),
                    top=10)
    assert diag.format == "dynamic"
    weights = {t.tensor: t for t in diag.worst if t.kind == "weight"}
    assert set(weights) == {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight"}
    assert weights["mlp.2.weight"].node == "/mlp/mlp.2/MatMul"  # the fp32 node name nodes_to_exclude takes
    assert all(20 < t.sqnr_db < 60 for t in weights.values())
    acts = [t for t in diag.worst if t.kind == "activation"]
    assert acts and all(t.sqnr_db is not None for t in acts)
    assert any("run time" in n and "no calibrated scales" in n for n in diag.notes)
    assert diag.outputs[0].tensor == "score"
    _check_json(diag)


def test_qat_sidecar_with_retrained_weights_is_said_not_ranked() -> None:
    diag = diagnose(MODEL / "nr_cnn_v1.onnx", MODEL / "nr_cnn_v1.int8.onnx", _feeds("nr_cnn_v1", 2))
    assert diag.format == "qdq"
    assert diag.worst
    if any("trained (QAT)" in n for n in diag.notes):
        assert all(t.sqnr_db is None or t.sqnr_db > 10 for t in diag.worst)


def test_unreadable_int8_model_is_a_diagnosis_not_an_exception(tmp_path: Path) -> None:
    bad = tmp_path / "bad.int8.onnx"
    bad.write_bytes(b"not an onnx file")
    diag = diagnose(MODEL / "fusion_mlp_v1.onnx", bad, _feeds("fusion_mlp_v1"))
    assert diag.worst == () and diag.analysed == ()
    assert "could not load the models" in diag.notes[0]
    assert "could not load" in "\n".join(diagnosis_lines(diag))
    _check_json(diag)


def test_float_only_sidecar_and_wrong_feeds(tmp_path: Path) -> None:
    same = diagnose(MODEL / "fusion_mlp_v1.onnx", MODEL / "fusion_mlp_v1.onnx", _feeds("fusion_mlp_v1"))
    assert same.format == "unknown" and same.outputs[0].xmodel_db == float("inf")
    assert any("only outputs were compared" in n for n in same.notes)
    _check_json(same)
    wrong = diagnose(MODEL / "residual_filter_v1.onnx", MODEL / "residual_filter_v1.int8.onnx",
                     [{"x": np.zeros((1, 1, 32, 32), np.float32)}])
    assert "outputs" not in wrong.analysed and any("lack model input" in n for n in wrong.notes)
    assert any(t.kind == "weight" for t in wrong.worst)  # weights need no feeds
    empty = diagnose(MODEL / "residual_filter_v1.onnx", MODEL / "residual_filter_v1.int8.onnx", [])
    assert any("no feeds" in n for n in empty.notes)


# ------------------------------------------------------------------------------------------------------------
# bounded memory, temporary folders, log noise, renamed weights

MiB = 1 << 20


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A 9-layer conv chain with 4×256×256 maps, its QDQ sidecar, and two real-photo feeds of batch 8 (.npz)."""
    root = tmp_path_factory.mktemp("chain")
    fp32 = convkit.conv_chain(root / "chain.onnx", layers=9, channels=4, size=256)
    int8 = convkit.quantise_qdq(fp32, root / "chain.int8.onnx", convkit.photo_crops(4, 256, seed=1))
    np.savez(root / "feeds.npz", image=convkit.photo_crops(16, 256, seed=2))
    return fp32, int8, root / "feeds.npz"


RSS_CHILD = """
import json, sys
from pathlib import Path
import numpy as np
import onnx  # imported before the baseline: the diagnosis reads graphs with it, a fixed cost that is not data
import onnxruntime as ort
from pytest_quantgate.analysis.diagnosis import diagnose

fp32, int8, npz, bound = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
images = np.load(npz)["image"]
feeds = [{"image": images[:8]}, {"image": images[8:]}]
for path in (fp32, int8):  # the memory of plain inference on these feeds: the baseline
    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")  # the int8 kernels the diagnosis uses
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for feed in feeds:
        session.run(None, feed)
    del session
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child of a large pytest worker starts at the worker's size
def hwm():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024
base = hwm()
diag = diagnose(fp32, int8, feeds, top=30, memory_bytes=bound, temp_dir=Path(sys.argv[5]))
peak = hwm()
print(json.dumps({"base": base, "peak": peak, "diag": diag.to_dict()}))
"""


def _diagnose_in_child(chain: tuple[Path, Path, Path], bound: int, work: Path) -> tuple[int, dict[str, Any]]:
    fp32, int8, npz = chain
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, str(fp32), str(int8), str(npz), str(bound), str(work)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return found["peak"] - found["base"], found["diag"]


def test_activations_compared_within_the_memory_bound(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    tensor = 8 * 4 * 256 * 256 * 4  # one map of one feed: 8 MiB
    pairs = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(chain[1])).graph.node)
    # what collecting every activation holds: pre, post and the fp32 twin of every Q/DQ pair, of both feeds
    assert pairs * 3 * tensor * 2 > 400 * MiB
    bound = 48 * MiB
    grown, bounded = _diagnose_in_child(chain, bound, tmp_path)
    said = next((n for n in bounded["notes"] if "group(s)" in n), "")
    assert f"{pairs} activation(s) compared in" in said and "under a 48 MiB bound" in said, bounded["notes"]
    assert int(said.split(" in ")[1].split()[0]) >= pairs // 2
    # the bound counts the activation arrays a group holds; the cut graphs' sessions, ORT's own buffers during a
    # run and the allocator's slack come on top (peak RSS measured with VmHWM grew 37-63 MiB at this 48 MiB bound
    # on an AVX-512 Xeon, 66-90 MiB on an AVX2 AMD EPYC with the other xdist worker busy); collecting every
    # activation instead holds over 400 MiB, so twice the bound still tells the two apart
    assert grown < 2 * bound, \
        f"peak RSS grew by {grown / MiB:.0f} MiB over plain inference, bound {bound / MiB:.0f} MiB"
    # the same diagnosis in one group grows far past it: the measurement can fail
    whole_grown, whole = _diagnose_in_child(chain, 1 << 36, tmp_path)
    assert whole_grown > 3 * bound, f"{whole_grown / MiB:.0f} MiB"
    # grouping changes nothing in the numbers
    rows = [(t["tensor"], t["sqnr_db"], t["xmodel_db"]) for t in bounded["worst"]]
    assert rows == [(t["tensor"], t["sqnr_db"], t["xmodel_db"]) for t in whole["worst"]]
    acts = {t["tensor"]: t for t in bounded["worst"] if t["kind"] == "activation"}
    assert {"/relu0/Relu_output_0", "/conv8/Conv_output_0", "restored", "image"} <= set(acts)
    assert all(t["xmodel_db"] is not None for t in acts.values())
    assert list(tmp_path.iterdir()) == []


def test_temp_folder_removed_on_success_and_on_exceptions(residual: tuple[Path, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fp32, int8 = residual
    work = tmp_path / "work"
    work.mkdir()
    seen: list[Path] = []
    real = diagnosis._compare_activations

    def spy(plan: Any, fgraph: Any, qgraph: Any, ffeeds: Any, qfeeds: Any, tmp: Path) -> Any:
        seen.append(tmp)
        assert (tmp / fileio.OWNER_LOCK).exists() and tmp.parent == work
        assert tmp.name.startswith(f"{diagnosis.TEMP_PREFIX}{os.getpid()}-")
        return real(plan, fgraph, qgraph, ffeeds, qfeeds, tmp)

    monkeypatch.setattr(diagnosis, "_compare_activations", spy)
    assert diagnose(fp32, int8, _feeds("residual_filter_v1", 1), temp_dir=work).worst
    assert seen and list(work.iterdir()) == []

    def broken(*args: Any) -> Any:
        raise RuntimeError("ORT arena failed")

    monkeypatch.setattr(diagnosis, "_compare_activations", broken)
    diag = diagnose(fp32, int8, _feeds("residual_filter_v1", 1), temp_dir=work)
    assert any("activations not analysed: RuntimeError: ORT arena failed" in n for n in diag.notes)
    assert list(work.iterdir()) == []

    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(diagnosis, "_compare_activations", interrupted)
    with pytest.raises(KeyboardInterrupt):
        diagnose(fp32, int8, _feeds("residual_filter_v1", 1), temp_dir=work)
    assert list(work.iterdir()) == []


KILLED_CHILD = """
import sys, time
from pathlib import Path
import numpy as np
from pytest_quantgate.analysis import diagnosis

def stall(plan, fgraph, qgraph, ffeeds, qfeeds, tmp):
    Path(sys.argv[3]).write_text(str(tmp))
    time.sleep(120)

diagnosis._compare_activations = stall
with np.load(sys.argv[4]) as npz:
    feeds = diagnosis.feeds_from_fixture({"luma": npz["luma"]}, batched=True, count=1)
diagnosis.diagnose(Path(sys.argv[1]), Path(sys.argv[2]), feeds, temp_dir=Path(sys.argv[5]))
"""


def test_folder_of_a_killed_diagnosis_is_swept_by_the_next(residual: tuple[Path, Path], tmp_path: Path) -> None:
    fp32, int8 = residual
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "inside"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(fp32), str(int8), str(marker),
         str(FIXTURES / "residual_filter_v1.npz"), str(work)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for _ in range(600):
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), "the child never reached the activation comparison"
        (left,) = list(work.iterdir())
        assert str(left) == marker.read_text() and left.name.startswith(f"{diagnosis.TEMP_PREFIX}{child.pid}-")
        assert diagnosis.sweep_temp_folders(work) == []  # its owner is alive and holds the lock: kept
        assert left.exists()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert left.exists()  # a killed run cannot clean up after itself
    diag = diagnose(fp32, int8, _feeds("residual_filter_v1", 1), temp_dir=work)
    assert any("removed 1 temporary folder(s) left by killed runs" in n for n in diag.notes)
    assert list(work.iterdir()) == []


def test_sweep_without_a_lock_file_goes_by_the_pid(tmp_path: Path) -> None:
    mine = tmp_path / f"{diagnosis.TEMP_PREFIX}{os.getpid()}-abc"
    mine.mkdir()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    dead = tmp_path / f"{diagnosis.TEMP_PREFIX}{int(child.stdout)}-def"
    (dead / "sub").mkdir(parents=True)
    other = tmp_path / f"{diagnosis.TEMP_PREFIX}abc"  # no owner in the name: never guessed at
    other.mkdir()
    assert diagnosis.sweep_temp_folders(tmp_path) == []  # too young: its owner may be about to take the lock
    old = time.time() - 2 * fileio.SCRATCH_GRACE_S
    os.utime(dead, (old, old))
    assert diagnosis.sweep_temp_folders(tmp_path) == [dead]
    assert mine.exists() and other.exists() and not dead.exists()


def _renamed(int8: Path, dest: Path, old: str, new: str) -> Path:
    model = onnx.load(str(int8))
    for init in model.graph.initializer:
        if init.name == old:
            init.name = new
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    onnx.save(model, str(dest))
    return dest


def test_renamed_weight_matched_by_value_and_no_log_noise(residual: tuple[Path, Path], tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    fp32, int8 = residual
    renamed = _renamed(int8, tmp_path / "renamed.int8.onnx", "body.2.weight_quantized", "onnx::Conv_77_quantized")
    feeds = _feeds("residual_filter_v1", 1)
    healthy = diagnose(fp32, int8, feeds, top=10)
    diag = diagnose(fp32, renamed, feeds, top=10)
    before = next(t for t in healthy.worst if t.tensor == "body.2.weight")
    after = next(t for t in diag.worst if t.tensor.startswith("body.2.weight"))
    assert after.tensor == "body.2.weight (onnx::Conv_77_quantized)"
    assert after.sqnr_db == pytest.approx(before.sqnr_db) and after.node == "/body/body.2/Conv"
    assert any("matched to their fp32 origin by shape and value" in n for n in diag.notes)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    # ORT's own weight matcher logs an ERROR:root line for this very sidecar: captured, counted, not printed
    from onnxruntime.quantization.qdq_loss_debug import create_weight_matching

    handlers = list(logging.getLogger().handlers)
    with capture_logs(level=logging.DEBUG, native=False) as logs:
        create_weight_matching(str(fp32), str(renamed))
    caught = logs.summary()
    assert caught.total >= 1 and "not found" in caught.messages[0].text
    assert logging.getLogger().handlers == handlers
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_weight_folded_by_convbn_fusion_matched_to_its_fp32_origin(tmp_path: Path) -> None:
    fp32 = convkit.conv_bn(tmp_path / "cbn.onnx")
    int8 = convkit.quantise_qdq(fp32, tmp_path / "cbn.int8.onnx", convkit.photo_crops(4, 32), pre_process=True)
    assert "ConvBnFusion_W_conv.weight_quantized" in {i.name for i in onnx.load(str(int8)).graph.initializer}
    diag = diagnose(fp32, int8, [{"image": convkit.photo_crops(2, 32, seed=4)}], top=10)
    fused = next(t for t in diag.worst if t.kind == "weight" and t.tensor.startswith("conv.weight"))
    assert fused.tensor == "conv.weight (ConvBnFusion_W_conv.weight_quantized)" and fused.node == "/conv/Conv"
    assert fused.sqnr_db is not None and fused.sqnr_db > 30  # rounding only, once the folded scale is fitted
    assert any("per-channel scale (a folded BatchNorm)" in n for n in diag.notes)
    assert any("ConvBnFusion_BN_B_bn.beta_quantized" in n and "not compared" in n for n in diag.notes)


def test_transposed_and_unrelated_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(24, 40))
    other = rng.normal(size=(24, 40))
    model = helper_model({"w": w, "other": other})
    onnx.save(model, str(tmp_path / "m.onnx"))
    graph = qgraph.Graph(onnx.load(str(tmp_path / "m.onnx")), tmp_path)
    step = np.abs(w).max() / 127
    deq = np.round(w.T / step) * step
    noise = rng.normal(size=(40, 24))
    tensors = [qgraph.QTensor(k, v, None, "qdq") for k, v in {"a": deq, "b": noise}.items()]
    found = {p.tensor.name: (p.fp32_name, p.reference, p.how) for p in qgraph.pair(tensors, qgraph.read_fp32(graph))
             if p.fp32_name is not None}
    assert set(found) == {"a"}
    name, ref, how = found["a"]
    assert (name, how) == ("w", "value-transposed") and np.array_equal(ref, w.astype(np.float32).T)


def helper_model(arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    nodes = [helper.make_node("MatMul", ["x", k], [f"y_{k}"]) for k in arrays]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 24])],
                              [helper.make_tensor_value_info(f"y_{k}", TensorProto.FLOAT, None) for k in arrays],
                              initializer=inits)
    return helper.make_model(graph)
