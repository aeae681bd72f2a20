"""A trained GRU tagger gated end to end: padding masked by an extra fixture array, its state output ignored.

The model reads a digit image row by row (8 steps of 8 pixels, padded after a random length) and emits log
probabilities of the digit at every step plus its recurrent state ``hidden_out`` [layers, batch, hidden] (batch
second, so the fixture stacks one input per sample). Its int8 sidecar is ORT's dynamic quantisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import GateProject

T, F, H, CLASSES = 8, 8, 32, 10


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Train the GRU tagger (a few seconds), export it, quantise it dynamic; return paths and the soak arrays."""
    import modelkit
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    seqs = (x / 16.0).reshape(-1, T, F).astype(np.float32)
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, T + 1, size=len(seqs))
    valid = np.arange(T)[None, :] < lengths[:, None]
    seqs = np.where(valid[..., None], seqs, 0.0).astype(np.float32)

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = torch.nn.GRU(F, H, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(H, CLASSES)

        def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out, state = self.gru(rows)
            return torch.log_softmax(self.head(out), dim=-1), state

    torch.manual_seed(0)
    net = Tagger()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy(seqs[:1200]), torch.from_numpy(y[:1200]).long()
    for _ in range(60):
        logp, _ = net(xs)
        loss = torch.nn.functional.nll_loss(logp[:, -3:].reshape(-1, CLASSES), ys.repeat_interleave(3))
        opt.zero_grad()
        loss.backward()
        opt.step()
    root = tmp_path_factory.mktemp("tagger")
    fp32, int8 = root / "tagger.onnx", root / "tagger.int8.onnx"
    torch.onnx.export(net.eval(), (torch.zeros(1, T, F),), str(fp32), input_names=["rows"],
                      output_names=["logprobs", "hidden_out"], opset_version=17, dynamo=False)
    modelkit.quantize_dynamic_file(fp32, int8)
    soak = seqs[1200:1500]
    arrays = {"rows": soak[:, None], "valid": valid[1200:1500, None].astype(np.int64),
              "padding": ~valid[1200:1500, None]}
    return fp32, int8, arrays


def _entry(project: GateProject, tagger: tuple[Path, Path, dict[str, np.ndarray]], entry_id: str,
           **extra: Any) -> dict[str, Any]:
    import modelkit

    fp32, int8, arrays = tagger
    (project.model / f"{entry_id}.onnx").write_bytes(fp32.read_bytes())
    (project.model / f"{entry_id}.int8.onnx").write_bytes(int8.read_bytes())
    np.savez(project.fixtures / f"{entry_id}.npz", **arrays)
    return modelkit.pin({"id": entry_id, "onnx": f"{entry_id}.onnx", "quant_mode": "dynamic", **extra},
                        project.model)


def test_a_gru_is_judged_on_its_real_steps_with_its_state_reported_only(
        project: GateProject, tagger: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    import onnxruntime as ort

    rules = {"logprobs": {"mask": "valid", "argmax_axis": 3}, "hidden_out": {"ignore": True}}
    inverted = {"logprobs": {"mask": "padding", "mask_invert": True, "argmax_axis": 3}, "hidden_out": {"ignore": True}}
    project.write([_entry(project, tagger, "gru", quant_outputs=rules),
                   _entry(project, tagger, "gru_inverted", quant_outputs=inverted),
                   _entry(project, tagger, "gru_typo", quant_outputs={"logprobs": {"mask": "vaild"}})])
    report = tmp_path / "r.json"
    result = project.run("--quantgate-report", str(report), "-v")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*gru_typo*key 'mask': 'vaild' is not an array of the soak fixture (arrays: "
                                 "'padding', 'rows', 'valid')*"])
    items = {i["id"]: i["result"] for i in json.loads(report.read_text())["items"] if i.get("result")}
    logprobs, hidden = items["gru"]["outputs"]
    assert hidden["ignored"] and logprobs["mask"] == "valid"
    assert items["gru_inverted"]["outputs"][0]["vs_fp32"] == logprobs["vs_fp32"]
    # an independent evaluation: both models over every sample, numpy over the real steps only
    fp32, int8, arrays = tagger
    runs = []
    for path in (fp32, int8):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        runs.append(np.concatenate([session.run(["logprobs"], {"rows": r})[0] for r in arrays["rows"]]))
    keep = arrays["valid"][:, 0].astype(bool)
    a, b = runs[0][keep].astype(np.float64).ravel(), runs[1][keep].astype(np.float64).ravel()
    assert logprobs["vs_fp32"]["plcc"] == pytest.approx(float(np.corrcoef(a, b)[0, 1]), rel=1e-9)
    flips = float(np.mean(np.argmax(runs[0], axis=2)[keep] != np.argmax(runs[1], axis=2)[keep]))
    assert logprobs["labels"]["flip_rate"] == pytest.approx(flips, abs=1e-12)
