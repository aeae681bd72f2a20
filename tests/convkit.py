"""Image-to-image conv models with large intermediate maps, and their ORT QDQ sidecars, for the diagnosis tests.

Inputs are crops of scikit-image's real photographs; sidecars are built by onnxruntime.quantization.quantize_static.
The conv weights are seeded smoothing/edge filters (the tests and the benchmark need the activation sizes of a
real image model, not a trained one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def photo_crops(count: int, size: int, seed: int = 3) -> np.ndarray:
    """Return ``count`` grey crops of ``size``×``size`` from scikit-image's photographs, shape (count, 1, size, size)."""
    from skimage import color, data, transform

    photos = [data.camera(), color.rgb2gray(data.astronaut()), color.rgb2gray(data.chelsea()), data.coins()]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        img = np.asarray(photos[i % len(photos)], dtype=np.float64)
        img = img / 255.0 if img.max() > 1.0 else img
        if min(img.shape) < size:
            img = transform.resize(img, (max(size, img.shape[0]), max(size, img.shape[1])))
        top = int(rng.integers(0, img.shape[0] - size + 1))
        left = int(rng.integers(0, img.shape[1] - size + 1))
        crops.append(img[top:top + size, left:left + size])
    return np.stack(crops)[:, None].astype(np.float32)


def conv_chain(path: Path, layers: int = 3, channels: int = 8, size: int = 256, seed: int = 5,
               out_channels: int = 1) -> Path:
    """Save a Conv-Relu chain 1→channels→…→out_channels (plus the input) on ``size``×``size`` maps; return ``path``."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    prev, prev_ch = "image", 1
    for i in range(layers):
        out_ch = out_channels if i == layers - 1 else channels
        w = rng.normal(0.0, np.sqrt(2.0 / (prev_ch * 9)), size=(out_ch, prev_ch, 3, 3)).astype(np.float32)
        b = rng.normal(0.0, 0.05, size=(out_ch,)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}.weight"), numpy_helper.from_array(b, f"conv{i}.bias")]
        conv_out = f"/conv{i}/Conv_output_0"
        nodes.append(helper.make_node("Conv", [prev, f"conv{i}.weight", f"conv{i}.bias"], [conv_out],
                                      name=f"/conv{i}/Conv", pads=[1, 1, 1, 1]))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [conv_out], [f"/relu{i}/Relu_output_0"], name=f"/relu{i}/Relu"))
            prev = f"/relu{i}/Relu_output_0"
        else:
            prev = conv_out
        prev_ch = out_ch
    nodes.append(helper.make_node("Add", ["image", prev], ["restored"], name="/Add"))
    graph = helper.make_graph(
        nodes, "conv_chain",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("restored", TensorProto.FLOAT, ["N", out_channels, size, size])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_bn(path: Path, channels: int = 8, size: int = 32, seed: int = 9) -> Path:
    """Save Conv→BatchNormalization→Relu→Conv (a BatchNorm ORT folds into the first Conv); return ``path``."""
    rng = np.random.default_rng(seed)
    arrays = {
        "conv.weight": rng.normal(0, 0.3, (channels, 1, 3, 3)),
        "bn.gamma": rng.uniform(0.5, 2.0, (channels,)),
        "bn.beta": rng.normal(0, 0.1, (channels,)),
        "bn.mean": rng.normal(0, 0.1, (channels,)),
        "bn.var": rng.uniform(0.5, 2.0, (channels,)),
        "out.weight": rng.normal(0, 0.2, (1, channels, 3, 3)),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    nodes = [
        helper.make_node("Conv", ["image", "conv.weight"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["bn_out"],
                         name="/bn/BatchNormalization"),
        helper.make_node("Relu", ["bn_out"], ["r"], name="/relu/Relu"),
        helper.make_node("Conv", ["r", "out.weight"], ["restored"], name="/out/Conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "conv_bn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("restored", TensorProto.FLOAT, ["N", 1, size, size])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def quantise_qdq(fp32: Path, int8: Path, calibration: np.ndarray, pre_process: bool = False,
                 per_channel: bool = True) -> Path:
    """Write a static QDQ int8 sidecar of ``fp32`` calibrated on ``calibration`` (optionally after quant_pre_process)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        quantize_static,
    )

    source = fp32
    if pre_process:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        source = int8.with_name(int8.stem + ".pre.onnx")
        quant_pre_process(str(fp32), str(source))  # ORT's optimiser folds BatchNorm: ConvBnFusion_* initializers

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter([{"image": calibration[i:i + 2]} for i in range(0, len(calibration), 2)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    quantize_static(str(source), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel)
    if source != fp32:
        source.unlink()
    return int8
