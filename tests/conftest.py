"""Shared fixtures: a small gate project (real model fitted on real data, real ORT sidecar) in a temp folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelkit

# pytester's in-process runs drop modules first imported inside a run; importing the whole plugin here keeps one
# copy of every class (an exception class imported twice would not match its own ``except`` clause)
import pytest_quantgate.frontends.cli  # noqa: F401
import pytest_quantgate.runner.gate  # noqa: F401
import pytest_quantgate.frontends.items  # noqa: F401

# the same for onnxruntime's quantisation tooling, which the PTQ producers import lazily: regeneration inside a
# pytester run would be its first import. (torch cannot be re-imported at all once pytester dropped it: "bad call
# flags", duplicate torchao op registrations; so tests that train run pytest in a subprocess.)
import onnxruntime.quantization  # noqa: F401

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def digits_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the fp32 model, its dynamic-int8 sidecar and a soak fixture once per session."""
    root = tmp_path_factory.mktemp("digits_assets")
    onnx.save(modelkit.mlp_model(modelkit.fitted_mlp_weights()), root / "digits.onnx")
    modelkit.quantize_dynamic_file(root / "digits.onnx", root / "digits.int8.onnx")
    _, _, test_x, test_y = modelkit.digits_split()
    np.savez_compressed(root / "digits.npz", features=test_x, target=test_y)
    np.savez_compressed(root / "digits_notarget.npz", features=test_x)
    return root


class GateProject:
    """A pytester project holding model/registry.json and fixtures/ with the digits model."""

    def __init__(self, pytester: pytest.Pytester, assets: Path) -> None:
        self.pytester = pytester
        self.root = pytester.path
        self.model = self.root / "model"
        self.fixtures = self.root / "fixtures"
        self.model.mkdir()
        self.fixtures.mkdir()
        for name in ("digits.onnx", "digits.int8.onnx"):
            shutil.copy(assets / name, self.model / name)
        shutil.copy(assets / "digits.npz", self.fixtures / "digits.npz")
        self.assets = assets

    def add_sidecar(self, entry_id: str, model: onnx.ModelProto | None = None, fixture: str = "digits.npz",
                    mode: str = "dynamic", **extra: Any) -> dict[str, Any]:
        """Copy the fp32 model under a new id with ``model`` (default: the healthy int8) as its sidecar."""
        shutil.copy(self.assets / "digits.onnx", self.model / f"{entry_id}.onnx")
        if model is None:
            shutil.copy(self.assets / "digits.int8.onnx", self.model / f"{entry_id}.int8.onnx")
        else:
            onnx.save(model, self.model / f"{entry_id}.int8.onnx")
        shutil.copy(self.assets / fixture, self.fixtures / f"{entry_id}.npz")
        entry = {"id": entry_id, "onnx": f"{entry_id}.onnx", "quant_mode": mode, **extra}
        return modelkit.pin(entry, self.model)

    def write(self, entries: list[dict[str, Any]], **top: Any) -> Path:
        """Write model/registry.json."""
        data = {"schema_version": 1, "models": entries, **top}
        path = self.model / "registry.json"
        path.write_text(json.dumps(data, indent=2))
        return path

    def run(self, *args: str) -> pytest.RunResult:
        """Run pytest --quantgate in-process."""
        return self.pytester.runpytest("--quantgate", "-p", "no:cacheprovider", "--quantgate-bootstrap", "200",
                                       *args)


@pytest.fixture
def project(pytester: pytest.Pytester, digits_assets: Path) -> GateProject:
    """Return a fresh gate project in the pytester folder."""
    return GateProject(pytester, digits_assets)


def append_to_output(model: onnx.ModelProto, op: str, value: float, output: str = "score") -> onnx.ModelProto:
    """Return a copy of ``model`` whose ``output`` goes through ``op(output, value)`` (a mutated sidecar)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == output:
                node.output[i] = f"{output}_pre_{op}"
    const = f"const_{op}_{len(graph.initializer)}"
    graph.initializer.append(numpy_helper.from_array(np.array([value], np.float32), const))
    graph.node.append(helper.make_node(op, [f"{output}_pre_{op}", const], [output], name=f"mutant_{op}"))
    return model


def affine(model: onnx.ModelProto, gain: float, offset: float) -> onnx.ModelProto:
    """Return ``gain * y + offset`` applied to the model's output."""
    return append_to_output(append_to_output(model, "Mul", gain), "Add", offset)


def rounded_weights(model: onnx.ModelProto, step: float) -> onnx.ModelProto:
    """Return a copy with every float initializer rounded to a multiple of ``step`` (a crude, lossy 'int8')."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((np.round(array / step) * step).astype(np.float32), init.name))
    return model
