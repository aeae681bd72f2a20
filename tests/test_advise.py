"""``quantgate advise`` on models built here (not the bundled ones): the choice passes the gate on its own."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import modelkit
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_quantgate.frontends.cli import main
from pytest_quantgate.fileio import sha256_file

BOOT = "200"
RECIPE = '''
"""QAT recipe of the test conv net (digits images, 8x8)."""
from pathlib import Path

import numpy as np

fp32_lr = 1e-2


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    order = np.random.default_rng(7).permutation(len(x))
    return x[order[:600]], data.target.astype(np.float32)[order[:600], None]


class Recipe:
    fp32_lr = 1e-2

    def build_model(self):
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                              nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                                              nn.AdaptiveAvgPool2d(1), nn.Flatten())
                self.head = nn.Linear(8, 1)

            def forward(self, image):
                return self.head(self.features(image))

        return Net()

    def load_fp32_weights(self, model, fp32_onnx):
        import torch

        model.load_state_dict(torch.load(Path(fp32_onnx).with_suffix(".pt"), weights_only=True))

    def training_data(self):
        return _digits()

    def loss(self, prediction, target):
        import torch.nn.functional as F

        return F.mse_loss(prediction, target)

    def example_input(self):
        import torch

        return torch.zeros(2, 1, 8, 8)


recipe = Recipe()
'''


def _outlier_mlp(path: Path) -> None:
    """Write a Gemm-Relu-Gemm-Relu-Gemm net fitted on digits whose second hidden layer has one channel x1000.

    The readout of that channel is scaled by 1/1000, so the fp32 function is unchanged, but one range dominates
    the hidden activation: every per-tensor int8 activation scale (static or dynamic) wipes out the other
    channels. Keeping fc1 and fc2 in fp32 fixes it.
    """
    train_x, train_y, _, _ = modelkit.digits_split()
    rng = np.random.default_rng(3)
    w0 = rng.normal(0, 0.4, (64, 32)).astype(np.float32)
    b0 = rng.normal(0, 0.1, 32).astype(np.float32)
    w1 = rng.normal(0, 0.3, (32, 24)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 24).astype(np.float32)
    h1 = np.maximum(np.maximum(train_x @ w0 + b0, 0) @ w1 + b1, 0)
    coef, *_ = np.linalg.lstsq(np.hstack([h1, np.ones((len(h1), 1))]), train_y, rcond=None)
    w2 = coef[:-1].reshape(24, 1).astype(np.float32)
    b2 = np.array([coef[-1]], np.float32)
    w1[:, 0] *= 1000
    b1[0] *= 1000
    w2[0] /= 1000
    weights = {"w0": w0, "b0": b0, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    nodes = [helper.make_node("Gemm", ["features", "w0", "b0"], ["h0"], name="fc0"),
             helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             helper.make_node("Gemm", ["r0", "w1", "b1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["score"], name="fc2")]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _digit_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.float32)
    order = np.random.default_rng(7).permutation(len(x))
    return x[order[:600]], y[order[:600]], x[order[600:]], y[order[600:]]


def _conv_net(folder: Path) -> None:
    """Train the recipe's conv net briefly on digit images; write conv.onnx and its state dict conv.pt."""
    import torch

    namespace: dict[str, Any] = {}
    exec(compile(RECIPE, "recipe", "exec"), namespace)  # noqa: S102  (the test's own recipe text)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine
    torch.manual_seed(0)
    model = namespace["recipe"].build_model()
    train_x, train_y, _, _ = _digit_images()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)[:, None]
    model.train()
    for _ in range(40):
        for start in range(0, len(x), 100):
            loss = torch.nn.functional.mse_loss(model(x[start:start + 100]), y[start:start + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    torch.set_num_threads(threads)
    torch.save(model.state_dict(), folder / "conv.pt")
    torch.onnx.export(model, (torch.zeros(2, 1, 8, 8),), str(folder / "conv.onnx"), input_names=["image"],
                      output_names=["score"], dynamic_axes={"image": {0: "N"}, "score": {0: "N"}}, opset_version=17,
                      dynamo=False)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the three models, their soak fixtures and calibration sets once."""
    root = tmp_path_factory.mktemp("advise_assets")
    onnx.save(modelkit.mlp_model(modelkit.fitted_mlp_weights()), root / "mlp.onnx")
    _outlier_mlp(root / "outlier.onnx")
    train_x, _, test_x, test_y = modelkit.digits_split()
    np.savez(root / "soak.npz", features=test_x, target=test_y)
    np.savez(root / "calib.npz", features=train_x[:200])
    np.savez(root / "calib_small.npz", features=train_x[:40])
    _conv_net(root)
    img_train, _, img_test, img_test_y = _digit_images()
    np.savez(root / "conv_soak.npz", image=img_test, target=img_test_y[:, None])
    np.savez(root / "conv_calib.npz", image=img_train[:200])
    (root / "conv_recipe.py").write_text(RECIPE)
    return root


ENTRIES: dict[str, dict[str, Any]] = {
    "mlp": {"id": "mlp", "onnx": "mlp.onnx", "quant_mode": "fp32", "soak_fixture": "soak.npz"},
    "outlier": {"id": "outlier", "onnx": "outlier.onnx", "quant_mode": "fp32", "soak_fixture": "soak.npz",
                "quant_accuracy_budget_plcc": 0.002},
    "conv": {"id": "conv", "onnx": "conv.onnx", "quant_mode": "fp32", "soak_fixture": "conv_soak.npz",
             "quant_calibration_set": "conv_calib.npz", "qat_recipe": "conv_recipe.py"},
}


def project(tmp_path: Path, assets: Path, ids: list[str], **changes: dict[str, Any]) -> Path:
    """Copy the assets into a registry folder with the named entries (pinned); return the registry path."""
    for item in assets.iterdir():
        shutil.copy(item, tmp_path / item.name)
    entries = [modelkit.pin({**ENTRIES[i], **changes.get(i, {})}, tmp_path) for i in ids]
    return modelkit.write_registry(tmp_path / "registry.json", entries)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def measured_drop(capsys: pytest.CaptureFixture[str], registry: Path, entry_id: str) -> dict[str, Any]:
    """Gate the written registry with ``quantgate measure`` and return its row (exit code must be 0)."""
    out_json = registry.parent / "measure.json"
    code, out = run(capsys, "measure", str(registry), "--id", entry_id, "--ep", "cpu", "--bootstrap", BOOT,
                    "--json", str(out_json))
    assert code == 0, out
    row: dict[str, Any] = json.loads(out_json.read_text())[0]
    out_json.unlink()
    return row


def test_mlp_choice_is_written_and_passes_measure_with_the_same_numbers(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = project(tmp_path, assets, ["mlp"])
    result = tmp_path / "advice.json"
    code, out = run(capsys, "advise", str(registry), "--id", "mlp", "--ep", "cpu", "--bootstrap", BOOT,
                    "--calibration-set", str(tmp_path / "calib.npz"), "--stages", "dynamic,static,int4",
                    "--write", "--json", str(result))
    assert code == 0, out
    advice = json.loads(result.read_text())
    chosen = advice["candidates"][advice["chosen"]]
    assert chosen["status"] == "pass"
    passing = [c for c in advice["candidates"] if c["status"] == "pass"]
    # cheapest = fastest measured int8 latency, then smallest file
    assert min((c["int8_ms"], c["int8_bytes"]) for c in passing) == (chosen["int8_ms"], chosen["int8_bytes"])
    stages = {c["stage"] for c in advice["candidates"]}
    assert {"dynamic", "static", "int4"} <= stages
    written = json.loads(registry.read_text())["models"][0]
    assert written["quant_mode"] == chosen["mode"]
    assert written["quant_options"] == chosen["options"]
    assert written["int8_sha256"] == sha256_file(tmp_path / "mlp.int8.onnx") == chosen["int8_sha256"]
    # the build is recorded as `quantgate pin` records it, so a later rebuild is explained against it
    assert written["int8_build"]["reproducible"] == "bytes" and written["int8_build"]["producer"]
    row = measured_drop(capsys, registry, "mlp")
    assert row["verdict"] == "PASS"
    assert abs(row["result"]["drop"] - chosen["drop"]) <= 1e-9, (chosen["stage"], chosen["options"])
    ci = row["result"]["interval"]
    assert [ci["low"], ci["high"]] == pytest.approx(chosen["ci"], abs=1e-9)
    # the table printed the same drop
    assert f"{chosen['drop']:.6f}" in out


def test_outlier_fails_dynamic_and_static_and_passes_with_fp32_exclusions(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = project(tmp_path, assets, ["outlier"])
    result = tmp_path / "advice.json"
    body = tmp_path / "pr.md"
    code, out = run(capsys, "advise", str(registry), "--id", "outlier", "--ep", "cpu", "--bootstrap", BOOT,
                    "--calibration-set", str(tmp_path / "calib.npz"), "--stages", "dynamic,static,exclusions",
                    "--write", "--json", str(result), "--pr-body", str(body))
    assert code == 0, out
    advice = json.loads(result.read_text())
    rows = advice["candidates"]
    # entropy keeps minmax's ranges on this net (built, compared, not gated again)
    statuses = [r["status"] for r in rows if r["stage"] in ("dynamic", "static")]
    assert statuses == ["fail", "fail", "fail", "skip", "fail"]
    chosen = rows[advice["chosen"]]
    assert chosen["stage"] == "exclusions" and chosen["mode"] == "static"
    assert chosen["options"]["nodes_to_exclude"]
    row = measured_drop(capsys, registry, "outlier")
    assert abs(row["result"]["drop"] - chosen["drop"]) <= 1e-9
    assert row["result"]["drop"] <= 0.002
    # the registry names what rebuilds it: the static producer with those options gives the same bytes
    from pytest_quantgate.producers.dispatch import produce
    from pytest_quantgate.io.registry import load_registry

    loaded = load_registry(registry)
    import dataclasses

    entry = dataclasses.replace(loaded.entry("outlier"), int8_onnx="rebuilt.int8.onnx")
    rebuilt = produce(loaded, entry, tmp_path, allow_recipes=False)
    assert rebuilt.sha256 == chosen["int8_sha256"]
    text = body.read_text()
    assert "| 1 | dynamic |" in text and "(chosen)" in text and "quantgate measure" in text


def test_nothing_passes_exits_1_keeps_the_best_numbers_and_writes_nothing(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = project(tmp_path, assets, ["mlp"], mlp={"quant_accuracy_budget_plcc": 1e-9})
    before = snapshot(tmp_path)
    result = tmp_path.parent / f"{tmp_path.name}-advice.json"
    code, out = run(capsys, "advise", str(registry), "--id", "mlp", "--ep", "cpu", "--bootstrap", BOOT,
                    "--calibration-set", str(tmp_path / "calib.npz"), "--stages", "dynamic,static",
                    "--write", "--json", str(result))
    assert code == 1, out
    assert "no candidate passes its budget" in out
    advice = json.loads(result.read_text())
    assert advice["found"] is False and advice["chosen"] is None
    drops = [c["drop"] for c in advice["candidates"] if c["drop"] is not None]
    assert advice["best_numbers"]["drop"] == min(drops)
    assert "write a QAT recipe" in advice["next_step"] and "not advised" in advice["next_step"]
    assert snapshot(tmp_path) == before  # --write wrote nothing, and no scratch folder is left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_conv_net_skips_convinteger_and_int4_and_passes_static_without_write(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = project(tmp_path, assets, ["conv"])
    before = snapshot(tmp_path)
    result = tmp_path.parent / f"{tmp_path.name}-advice.json"
    code, out = run(capsys, "advise", str(registry), "--id", "conv", "--ep", "cpu", "--bootstrap", BOOT,
                    "--stages", "dynamic,static,int4", "--json", str(result))
    assert code == 0, out
    advice = json.loads(result.read_text())
    skipped = {c["stage"]: c["reason"] for c in advice["candidates"] if c["status"] == "skip"}
    dynamic = [c["reason"] for c in advice["candidates"] if c["status"] == "skip" and c["stage"] == "dynamic"]
    assert any("ConvInteger" in reason for reason in dynamic), dynamic
    # its one Gemm holds 1% of the weights: a MatMul-only sidecar would leave it fp32, so none is built
    assert any("MatMul/Gemm hold 1% of the weights" in reason for reason in dynamic), dynamic
    assert "not MatMul-heavy" in skipped["int4"]
    assert not [c for c in advice["candidates"] if c["stage"] == "dynamic" and c["status"] != "skip"]
    assert advice["candidates"][advice["chosen"]]["status"] == "pass"
    assert snapshot(tmp_path) == before  # no --write: nothing beside the registry changed


def test_small_calibration_set_is_warned_about(tmp_path: Path, assets: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    registry = project(tmp_path, assets, ["mlp"])
    code, out = run(capsys, "advise", str(registry), "--id", "mlp", "--ep", "cpu", "--bootstrap", BOOT,
                    "--calibration-set", str(tmp_path / "calib_small.npz"), "--stages", "static")
    assert code == 0, out
    assert "holds 40 sample(s), fewer than the 100+" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--id", "nope"], "match no entry"),
    (["--id", "mlp", "--calibration-set", "missing.npz"], "missing.npz: file not found"),
    (["--id", "mlp", "--stages", "dynamic,magic"], "unknown stage(s) magic"),
    ([], "give --id ID or --all-failing"),
    (["--id", "mlp", "--ep", "cpu", "--ep", "openvino"], "exactly one --ep"),
])
def test_bad_input_exits_2(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                           message: str) -> None:
    registry = project(tmp_path, assets, ["mlp"])
    before = snapshot(tmp_path)
    code, out = run(capsys, "advise", str(registry), *argv)
    assert code == 2, out
    assert message in out
    assert snapshot(tmp_path) == before


def test_all_failing_advises_only_failing_entries_and_edits_only_their_text(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for item in assets.iterdir():
        shutil.copy(item, tmp_path / item.name)
    modelkit.quantize_dynamic_file(tmp_path / "mlp.onnx", tmp_path / "mlp.int8.onnx")
    modelkit.quantize_dynamic_file(tmp_path / "outlier.onnx", tmp_path / "outlier.int8.onnx")
    entries = [modelkit.pin({**ENTRIES["mlp"], "quant_mode": "dynamic"}, tmp_path),
               modelkit.pin({**ENTRIES["outlier"], "quant_mode": "dynamic",
                             "quant_calibration_set": "calib.npz"}, tmp_path)]
    registry = tmp_path / "registry.json"
    text = json.dumps({"schema_version": 1, "models": entries}, indent=4) + "\n"
    registry.write_text(text)
    mlp_sidecar = sha256_file(tmp_path / "mlp.int8.onnx")
    result = tmp_path.parent / f"{tmp_path.name}-advice.json"
    code, out = run(capsys, "advise", str(registry), "--all-failing", "--ep", "cpu", "--bootstrap", BOOT,
                    "--stages", "dynamic,static,exclusions", "--write", "--json", str(result))
    assert code == 0, out
    advices = json.loads(result.read_text())
    assert [a["id"] for a in advices] == ["outlier"]
    new = registry.read_text()
    first_entry_end = text.index("},") + 2
    assert new[:first_entry_end] == text[:first_entry_end]  # the passing entry's text is untouched
    assert sha256_file(tmp_path / "mlp.int8.onnx") == mlp_sidecar
    assert measured_drop(capsys, registry, "outlier")["verdict"] == "PASS"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_qad_candidate_passes_measure_and_its_options_rebuild_it(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = project(tmp_path, assets, ["conv"])
    result = tmp_path.parent / f"{tmp_path.name}-advice.json"
    code, out = run(capsys, "advise", str(registry), "--id", "conv", "--ep", "cpu", "--bootstrap", BOOT,
                    "--stages", "qad", "--allow-recipes", "--epochs-qat", "2", "--write", "--json", str(result))
    assert code == 0, out
    advice = json.loads(result.read_text())
    chosen = advice["candidates"][advice["chosen"]]
    assert chosen["stage"] == "qad" and chosen["mode"] == "qat"
    assert chosen["budget"] == 0.002  # the QAT mode's default budget (ADR-0208), not the PTQ one
    assert chosen["options"] == {"epochs_qat": 2, "distill_weight": 1.0, "fold_bn": True}
    row = measured_drop(capsys, registry, "conv")
    assert abs(row["result"]["drop"] - chosen["drop"]) <= 1e-9
    from pytest_quantgate.producers.provenance import read_provenance

    provenance = read_provenance(tmp_path / "conv.int8.onnx")
    assert provenance is not None
    assert provenance["training"]["distillation"]["distill_weight"] == 1.0
    assert provenance["training"]["fold_bn"] is True
    # lr_qat was not given: a tenth of the recipe's training rate
    assert provenance["lr_qat_effective"] == pytest.approx(1e-3)
    import dataclasses

    from pytest_quantgate.producers.dispatch import produce
    from pytest_quantgate.io.registry import load_registry

    loaded = load_registry(registry)
    entry = dataclasses.replace(loaded.entry("conv"), int8_onnx="rebuilt.int8.onnx")
    assert produce(loaded, entry, tmp_path, allow_recipes=True).sha256 == chosen["int8_sha256"]


def test_qat_stages_are_skipped_with_the_reason_and_the_next_step(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = project(tmp_path, assets, ["conv"], conv={"quant_accuracy_budget_plcc": 1e-9})
    result = tmp_path.parent / f"{tmp_path.name}-advice.json"
    code, out = run(capsys, "advise", str(registry), "--id", "conv", "--ep", "cpu", "--bootstrap", BOOT,
                    "--stages", "static,qat,qad", "--json", str(result))
    assert code == 1, out
    advice = json.loads(result.read_text())
    skipped = [c for c in advice["candidates"] if c["stage"] in ("qat", "qad")]
    assert [c["status"] for c in skipped] == ["skip", "skip"]
    assert all("--allow-recipes" in c["reason"] for c in skipped)
    assert "rerun with --allow-recipes" in advice["next_step"]


MLP_RECIPE = '''
"""QAT recipe of the digits MLP (Gemm weights [in, out] become Linear weights [out, in])."""
import numpy as np


class Recipe:
    fp32_lr = 1e-2

    def build_model(self):
        from torch import nn

        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    def load_fp32_weights(self, model, fp32_onnx):
        import onnx
        import torch
        from onnx import numpy_helper

        w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fp32_onnx)).graph.initializer}
        state = {"0.weight": w["w1"].T, "0.bias": w["b1"], "2.weight": w["w2"].T, "2.bias": w["b2"]}
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})

    def training_data(self):
        from sklearn.datasets import load_digits

        data = load_digits()
        order = np.random.default_rng(7).permutation(len(data.data))[:600]
        return (data.data[order] / 16.0).astype(np.float32), data.target[order, None].astype(np.float32)

    def loss(self, prediction, target):
        import torch.nn.functional as F

        return F.mse_loss(prediction, target)

    def example_input(self):
        import torch

        return torch.zeros(2, 64)


recipe = Recipe()
'''


@pytest.mark.parametrize("name", ["int4-weight-only", "int8-arm"])
def test_named_recipes_prepare_and_convert_the_same_scheme(tmp_path: Path, assets: Path, name: str) -> None:
    import onnxruntime as ort

    from pytest_quantgate.producers.qat import QatConfig, quantize_qat

    shutil.copy(assets / "mlp.onnx", tmp_path / "mlp.onnx")
    (tmp_path / "recipe.py").write_text(MLP_RECIPE)
    result = quantize_qat(tmp_path / "mlp.onnx", tmp_path / "mlp.int8.onnx",
                          QatConfig(epochs_qat=1, recipe_name=name), recipe=tmp_path / "recipe.py")
    ops = {n.op_type for n in onnx.load(str(result.int8_path)).graph.node}
    if name == "int4-weight-only":
        assert "MatMulNBits" in ops and "QuantizeLinear" not in ops
    else:
        assert "QuantizeLinear" in ops
    assert result.provenance["training"]["recipe_name"] == name
    _, _, test_x, _ = modelkit.digits_split()
    out = ort.InferenceSession(str(result.int8_path), providers=["CPUExecutionProvider"]).run(None, {"features": test_x})
    assert np.isfinite(out[0]).all()


@pytest.mark.parametrize(("options", "message"), [
    ({"recipe_name": "int8-xnnpack"}, "torchao 0.18 ships no XNNPACKQuantizer"),
    ({"recipe_name": "int4-weight-only", "route": "pt2e"}, "cannot go through route 'pt2e'"),
    ({"recipe_name": "int9"}, "'int9' is not a QAT recipe; recipes: int8-x86, int8-arm"),
    ({"distill_weight": 1.5}, "distill_weight must be None or a number in [0, 1]"),
])
def test_incompatible_recipe_combinations_are_refused(options: dict[str, Any], message: str) -> None:
    from pytest_quantgate.producers.qat import QatConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        QatConfig(**options)


def test_fold_batchnorm_keeps_the_function(assets: Path) -> None:
    import torch

    from pytest_quantgate.producers.qad import fold_batchnorm

    namespace: dict[str, Any] = {}
    exec(compile(RECIPE, "recipe", "exec"), namespace)  # noqa: S102  (the test's own recipe text)
    model = namespace["recipe"].build_model()
    model.load_state_dict(torch.load(assets / "conv.pt", weights_only=True))
    model.eval()
    x = torch.from_numpy(_digit_images()[2][:64])
    before = model(x).detach()
    assert fold_batchnorm(model) == 1
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(model(x), before, atol=1e-5)


def test_a_candidate_of_another_mode_is_gated_with_that_modes_defaults(tmp_path: Path) -> None:
    """A dynamic entry runs at batch 1 by default; its static candidate must run as a written static entry would.

    Gating the static candidate at the dynamic entry's batch made advise's drop differ from what ``measure``
    repeats on the written registry whenever the latency ranking picked a batch-sensitive candidate (int4's
    MatMulNBits): the flaky equality in the test above.
    """
    from pytest_quantgate.io.registry import load_registry

    registry = tmp_path / "registry.json"
    pins = {"sha256": "0" * 64, "int8_sha256": "1" * 64}
    models = [{"id": "d", "onnx": "d.onnx", "quant_mode": "dynamic", **pins},
              {"id": "p", "onnx": "p.onnx", "quant_mode": "dynamic", "quant_deploy_batch": 8,
               "quant_accuracy_budget_plcc": 0.05, **pins}]
    registry.write_text(json.dumps({"schema_version": 1, "models": models}))
    written = {**models[0], "quant_mode": "static", "quant_calibration_set": "c.npz"}
    loaded = load_registry(registry)
    d, p = loaded.entries
    assert d.deploy_batch == 1
    as_static = d.as_mode("static")
    registry.write_text(json.dumps({"schema_version": 1, "models": [written]}))
    (expected,) = load_registry(registry).entries
    assert (as_static.mode, as_static.deploy_batch, as_static.budget_plcc) == \
        (expected.mode, expected.deploy_batch, expected.budget_plcc) == ("static", None, 0.01)
    assert as_static.as_mode("qat").budget_plcc == 0.002
    pinned = p.as_mode("static")  # what the entry sets itself stays
    assert (pinned.deploy_batch, pinned.budget_plcc) == (8, 0.05)


# --------------------------------------------------------------------------------------------------------------
# The wider candidate space and the search (issue 21, deliverables 2 and 3)


def _conv_attention(path: Path) -> None:
    """Write Conv -> Flatten -> MatMul(constant W) and a MatMul whose B is computed (attention-like)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w"], ["h"], name="proj"),
             helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "ht"], ["scores"], name="attn")]
    inits = [numpy_helper.from_array(rng.normal(size=(2, 1, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.normal(size=(32, 8)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "conv_attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", "N"])],
                              initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_conv_graph_gets_both_matmul_only_dynamic_variants(tmp_path: Path) -> None:
    from pytest_quantgate.frontends.advise import STAGES, graph_facts, ptq_candidates

    _conv_attention(tmp_path / "m.onnx")
    facts = graph_facts(tmp_path / "m.onnx")
    assert (facts.conv_nodes, facts.matmul_nodes, facts.matmul_any) == (1, 1, 2)
    candidates, skipped = ptq_candidates(facts, STAGES, has_calibration=True)
    dynamic = [dict(c.options) for c in candidates if c.stage == "dynamic"]
    for per_channel in (False, True):
        for const_b in (True, False):
            assert {"per_channel": per_channel, "op_types_to_quantize": ["MatMul", "Gemm"],
                    "matmul_const_b_only": const_b} in dynamic
    assert dynamic.index({"per_channel": False, "op_types_to_quantize": ["MatMul", "Gemm"],
                          "matmul_const_b_only": True}) == 0  # cheapest first
    assert any("ConvInteger" in r.reason for r in skipped)  # the whole-graph dynamic is still refused


def _advise(capsys: pytest.CaptureFixture[str], registry: Path, entry_id: str, *argv: str) -> tuple[int, str,
                                                                                                     dict[str, Any]]:
    result = registry.parent.parent / f"{registry.parent.name}-advice.json"
    code, out = run(capsys, "advise", str(registry), "--id", entry_id, "--ep", "cpu", "--bootstrap", BOOT,
                    "--json", str(result), *argv)
    return code, out, json.loads(result.read_text())


def _table_rows(out: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#  ")) + 2
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return lines[start:end]


def test_conv_dynamic_variants_that_build_the_same_graph_are_gated_once(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_quantgate.frontends import advise

    monkeypatch.setattr(advise, "MATMUL_ONLY_SHARE", 0.0)  # the conv net's Gemm (1% of weights) gets its variants
    registry = project(tmp_path, assets, ["conv"])
    _, _, advice = _advise(capsys, registry, "conv", "--stages", "dynamic", "--exhaustive")
    rows = [c for c in advice["candidates"] if "matmul_const_b_only" in c["options"]]
    by_const_b = {(c["options"]["per_channel"], c["options"]["matmul_const_b_only"]): c for c in rows}
    assert len(by_const_b) == 4, advice["candidates"]
    # the conv net's only MatMul-like node is a Gemm with a constant B: matmul_const_b_only=False changes nothing
    for per_channel in (False, True):
        assert by_const_b[(per_channel, True)]["drop"] is not None
        duplicate = by_const_b[(per_channel, False)]
        assert duplicate["status"] == "skip" and "same graph as #" in duplicate["reason"]
        assert duplicate["drop"] is None and duplicate["build_s"] is not None


def test_a16w8_candidate_builds_with_16_bit_activations_and_is_gated(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = project(tmp_path, assets, ["conv"])
    code, out, advice = _advise(capsys, registry, "conv", "--stages", "a16w8", "--write")
    (row,) = advice["candidates"]
    assert row["stage"] == "a16w8" and row["options"]["activation_type"] == "uint16", row
    assert row["drop"] is not None and row["verdict"] == "PASS" and code == 0, out
    model = onnx.load(str(tmp_path / "conv.int8.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    zero_points = {inits[n.input[2]].data_type for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    assert zero_points == {TensorProto.UINT16}
    assert measured_drop(capsys, registry, "conv")["verdict"] == "PASS"


def _count_gates(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from pytest_quantgate.frontends import advise

    gated: list[str] = []
    original = advise._gate_candidate

    def counting(*args: Any, **kwargs: Any) -> Any:
        gated.append(str(args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(advise, "_gate_candidate", counting)
    return gated


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from pytest_quantgate.frontends import advise

    built: list[str] = []
    original = advise.build_candidate

    def counting(candidate: Any, *args: Any, **kwargs: Any) -> None:
        built.append(candidate.label)
        original(candidate, *args, **kwargs)

    monkeypatch.setattr(advise, "build_candidate", counting)
    return built


def test_a_calibration_method_with_the_minmax_ranges_is_not_gated_again(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    registry = project(tmp_path, assets, ["mlp"], mlp={"quant_accuracy_budget_plcc": 1e-9})
    gated = _count_gates(monkeypatch)
    code, out, advice = _advise(capsys, registry, "mlp", "--calibration-set", str(tmp_path / "calib.npz"),
                                "--stages", "static")
    assert code == 1, out
    rows = {c["options"]["calibrate_method"]: c for c in advice["candidates"]}
    # ORT's entropy calibrator keeps MinMax's ranges here (see docs/producers.md): built, compared, not gated
    assert rows["entropy"]["status"] == "skip" and "same ranges as minmax (#1)" in rows["entropy"]["reason"]
    assert rows["entropy"]["drop"] is None
    # percentile clips the ranges: gated
    assert rows["minmax"]["drop"] is not None and rows["percentile"]["drop"] is not None
    assert len(gated) == 2


def test_a_stage_stops_at_its_first_pass_unless_exhaustive(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    registry = project(tmp_path, assets, ["mlp"])
    builds = _count_builds(monkeypatch)
    argv = ("--calibration-set", str(tmp_path / "calib.npz"), "--stages", "static")
    code, out, advice = _advise(capsys, registry, "mlp", *argv)
    assert code == 0, out
    assert [c["status"] for c in advice["candidates"]] == ["pass", "untried", "untried"]
    assert all("#1 of this stage passed" in c["reason"] for c in advice["candidates"][1:])
    assert len(builds) == 1
    assert "[mlp] [1/3] static static calibrate_method=minmax per_channel: building…" in out
    progress = (r"\[mlp\] \[1/3\] .*: built, gated: drop"
                r" \d\.\d{6} PASS \(\d+\.\d s\); (about \d+ min|under a minute) left")
    assert re.search(progress, out)
    # the JSON keeps every candidate, the untried ones too, as the table does
    assert len(advice["candidates"]) == len(_table_rows(out)) == 3
    assert all({"status", "reason", "build_s", "gate_s", "cached"} <= set(c) for c in advice["candidates"])

    code, out, advice = _advise(capsys, registry, "mlp", *argv, "--exhaustive")
    assert code == 0, out
    statuses = [c["status"] for c in advice["candidates"]]
    assert "untried" not in statuses and statuses[0] == "pass" and len(builds) == 4
    assert len(advice["candidates"]) == len(_table_rows(out)) == 3


def test_max_minutes_0_stops_before_the_first_candidate_and_says_why(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    registry = project(tmp_path, assets, ["mlp"])
    builds = _count_builds(monkeypatch)
    code, out, advice = _advise(capsys, registry, "mlp", "--calibration-set", str(tmp_path / "calib.npz"),
                                "--stages", "dynamic,static,exclusions", "--max-minutes", "0")
    assert code == 1, out
    assert builds == []
    rows = advice["candidates"]
    assert rows and all(r["status"] == "untried" and "--max-minutes 0 reached" in r["reason"] for r in rows)
    assert {r["stage"] for r in rows} == {"dynamic", "static", "exclusions"}
    assert "rerun with a larger --max-minutes" in advice["next_step"]
    assert "--max-minutes 0 reached" in out and len(_table_rows(out)) == len(rows)


def test_a_second_run_takes_every_candidate_from_the_cache(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    registry = project(tmp_path, assets, ["mlp"])
    cache = tmp_path.parent / f"{tmp_path.name}-cache"
    builds = _count_builds(monkeypatch)
    argv = ("--calibration-set", str(tmp_path / "calib.npz"), "--stages", "dynamic,static", "--cache",
            "--cache-dir", str(cache))
    code, out, first = _advise(capsys, registry, "mlp", *argv)
    assert code == 0, out
    built = len(builds)
    assert built == 2 and not any(c["cached"] for c in first["candidates"])  # one per stage: each passes
    code, out, second = _advise(capsys, registry, "mlp", *argv)
    assert code == 0, out
    assert len(builds) == built  # nothing rebuilt
    tried = [c for c in second["candidates"] if c["drop"] is not None]
    assert tried and all(c["cached"] for c in tried)
    assert [c["drop"] for c in second["candidates"]] == [c["drop"] for c in first["candidates"]]
    assert [c["int8_sha256"] for c in second["candidates"]] == [c["int8_sha256"] for c in first["candidates"]]
    measured = [row for row in _table_rows(out) if row.endswith(("PASS", "FAIL"))]
    assert len(measured) == len(tried) and all(" cached " in row for row in measured)
    # another calibration set is another key: the static candidates are built again
    np.savez(tmp_path / "calib2.npz", features=np.load(tmp_path / "calib.npz")["features"][:150])
    code, out, third = _advise(capsys, registry, "mlp", "--calibration-set", str(tmp_path / "calib2.npz"),
                               "--stages", "static", "--cache", "--cache-dir", str(cache))
    assert len(builds) == built + 1 and not third["candidates"][0]["cached"]


def test_op_type_head_and_a16w8_escalations_are_built_from_the_focused_diagnosis(
        tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = project(tmp_path, assets, ["outlier"])
    code, out, advice = _advise(capsys, registry, "outlier", "--calibration-set", str(tmp_path / "calib.npz"),
                                "--stages", "static,optypes,head,a16w8", "--exhaustive")
    assert code == 1, out
    rows = advice["candidates"]
    optypes = [r for r in rows if r["stage"] == "optypes"]
    assert optypes and all(len(r["options"]["op_types_to_exclude"]) == 1 for r in optypes)
    # in the diagnosis' order: the worst tensor is relu1's output (the x1000 channel), then the Gemms' weights
    assert [r["options"]["op_types_to_exclude"] for r in optypes] == [["Relu"], ["Gemm"]]
    assert "ranked on soak samples" in out and "for score: r1" in out
    (head,) = [r for r in rows if r["stage"] == "head"]
    assert head["label"].startswith("head in fp32:") and "fc2" in head["options"]["nodes_to_exclude"]
    (a16,) = [r for r in rows if r["stage"] == "a16w8"]
    assert all(r["status"] in ("pass", "fail", "skip") for r in rows), rows
    assert a16["drop"] is not None and a16["drop"] < rows[0]["drop"]  # 16-bit activations resolve the outlier


def test_a_chosen_sidecar_slower_than_fp32_is_said_and_task_verdicts_show_their_budget_use() -> None:
    from dataclasses import replace

    import recordkit

    from pytest_quantgate.frontends.advise import Advice, Candidate, CandidateResult, summary_lines

    slow = replace(recordkit.timing(), fp32_ms=9.4, int8_ms=33.7, speedup=9.4 / 33.7)
    gate = recordkit.gate_result(timing=slow)
    chosen = CandidateResult(Candidate("a16w8", "static", {"activation_type": "uint16"}, "a16w8"), "pass", gate=gate)
    lines = summary_lines(Advice("m", "cpu", (chosen,), 0, 0, "review the table"))
    assert "chosen #1: static (a16w8), drop 0.000700 <= budget 0.01" in lines[0]
    assert lines[1].startswith("warning: #1 runs at x0.28 the speed of fp32 on this machine (int8 33.700 ms vs "
                               "fp32 9.400 ms per sample); set quant_min_speedup")
    judged = CandidateResult(chosen.candidate, "pass", gate=replace(gate, drop=None, timing=recordkit.timing()))
    lines = summary_lines(Advice("m", "cpu", (judged,), 0, 0, "review the table"))
    assert "budget use" in lines[0] and "warning" not in " ".join(lines)
