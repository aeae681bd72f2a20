"""QAT producer: fine-tune a registered fp32 model with fake quantisation, then write its int8 sidecar.

Use it for registry entries with ``quant_mode: "qat"``. The entry names a *recipe* (``qat_recipe``): a
trusted Python file that rebuilds the model, loads the fp32 weights and yields training data
(:class:`~pytest_quantgate.producers.base.QatRecipe`). Two routes:

``"bridge"`` (default; ADR-0208's two-step bridge on torchao pt2e)
    recipe model + fp32 weights → ``torch.export`` → ``prepare_qat_pt2e`` (X86 inductor quantiser, QAT
    config) → fake-quant fine-tune at reduced LR, every epoch over all training data → copy the
    QAT-conditioned weights into a fresh fp32 module (matched by name and shape) → fp32 ONNX → onnxruntime
    static QDQ quantisation calibrated on ``n_calibration`` training samples.

``"pt2e"``
    the same fine-tune, then ``move_exported_model_to_eval`` → ``convert_pt2e`` → ``torch.onnx.export(...,
    dynamo=True)``: a QuantizeLinear/DequantizeLinear graph that onnxruntime loads.

Both write ``<stem>.int8.onnx`` through :func:`~pytest_quantgate.producers.provenance.publish_sidecar`, the
writer every producer shares: the provenance record goes inside the model and one atomic rename publishes
both. Intermediate models live in memory (the onnxruntime output goes to an anonymous ``memfd`` on Linux); a
run killed with SIGKILL while writing leaves at most a locked ``.partial`` beside the sidecar, which the next
writer in that folder sweeps. One exception is outside our control: onnxruntime's calibrator keeps its
augmented model in a ``ort.quant.*`` folder under the system temp dir for the few seconds calibration takes;
a SIGKILL inside that window leaves that folder behind.

torch and torchao are imported only inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pytest_quantgate.engine.ort import import_onnxruntime
from pytest_quantgate.fileio import sha256_file, sweep_partials
from pytest_quantgate.producers.base import Assess, ProducerError, ProducerResult, QatRecipe
from pytest_quantgate.producers.build import build_block
from pytest_quantgate.producers.provenance import (
    check_target,
    provenance_path_for,
    publish_sidecar,
    scratch_dir,
    shaping_versions,
)

if TYPE_CHECKING:
    import onnx
    import torch

    from pytest_quantgate.io.registry import WriteGuard

__all__ = [
    "QatConfig",
    "QatResult",
    "load_onnx_initializers",
    "load_recipe",
    "provenance_path_for",
    "quantize_qat",
]

_ROUTES = ("bridge", "pt2e")
_CALIBRATE_METHODS = ("minmax", "entropy", "percentile", "distribution")
_OPSET = 17


@dataclass(frozen=True, kw_only=True)
class QatConfig:
    """Settings of one QAT run.

    ``lr_qat=None`` means the recipe's fp32 learning rate (its ``fp32_lr`` attribute) divided by 10 (ADR-0208).
    ``n_calibration`` samples for the bridge's static step are drawn (seeded) from the recipe's training data.
    ``threads`` pins torch's intra-op threads while training: float reductions split over another thread count
    round differently, so 1 (the default) is what makes a rerun on any machine write the same bytes.
    ``recipe_name`` names the quantisation scheme (:data:`pytest_quantgate.producers.qat_recipes.QAT_RECIPES`),
    resolved once for prepare and convert. ``distill_weight`` switches on QAD
    (:mod:`pytest_quantgate.producers.qad`): the loss is ``w`` x MSE to the fp32 teacher's outputs plus ``1 - w``
    x the recipe's task loss. ``fold_bn`` folds Conv+BatchNorm pairs into the conv before prepare.
    """

    epochs_qat: int = 3
    lr_qat: float | None = None
    batch_size: int = 64
    seed: int = 0
    n_calibration: int = 128
    route: Literal["bridge", "pt2e"] = "bridge"
    per_channel: bool = True
    calibrate_method: str = "minmax"
    threads: int = 1
    recipe_name: str = "int8-x86"
    distill_weight: float | None = None
    fold_bn: bool = False

    def __post_init__(self) -> None:
        from pytest_quantgate.producers.qat_recipes import resolve

        resolve(self.recipe_name, self.route)  # an unknown or incompatible recipe/route pair fails here, clearly
        weight = self.distill_weight
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                   or not 0.0 <= weight <= 1.0):
            raise ValueError(f"QatConfig.distill_weight must be None or a number in [0, 1], got {weight!r}")
        if not isinstance(self.fold_bn, bool):
            raise ValueError(f"QatConfig.fold_bn must be True or False, got {self.fold_bn!r}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"QatConfig.threads must be an int >= 1, got {self.threads!r}")
        if not isinstance(self.epochs_qat, int) or self.epochs_qat < 1:
            raise ValueError(f"QatConfig.epochs_qat must be an int >= 1, got {self.epochs_qat!r}")
        if self.lr_qat is not None and not (isinstance(self.lr_qat, (int, float)) and 0 < self.lr_qat < math.inf):
            raise ValueError(f"QatConfig.lr_qat must be a positive finite float or None, got {self.lr_qat!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"QatConfig.batch_size must be an int >= 1, got {self.batch_size!r}")
        if not isinstance(self.n_calibration, int) or self.n_calibration < 1:
            raise ValueError(f"QatConfig.n_calibration must be an int >= 1, got {self.n_calibration!r}")
        if self.route not in _ROUTES:
            raise ValueError(f"QatConfig.route must be one of {', '.join(_ROUTES)}, got {self.route!r}")
        if self.calibrate_method not in _CALIBRATE_METHODS:
            raise ValueError(
                f"QatConfig.calibrate_method must be one of {', '.join(_CALIBRATE_METHODS)}, "
                f"got {self.calibrate_method!r}"
            )


@dataclass(frozen=True)
class QatResult(ProducerResult):
    """A :class:`ProducerResult` plus what the fine-tune did.

    ``epoch_losses``: mean training loss of each QAT epoch (fake-quant forward). ``samples_per_epoch``: how
    many training samples each epoch saw (always the whole training set). ``weight_l2_from_fp32``: L2 norm of
    (fine-tuned − fp32 checkpoint) over all parameters.
    """

    epoch_losses: tuple[float, ...] = ()
    samples_per_epoch: tuple[int, ...] = ()
    weight_l2_from_fp32: float = 0.0
    n_train: int = 0
    lr_qat: float = 0.0
    route: str = "bridge"


# --------------------------------------------------------------------------------------------------------------
# Recipes


def load_recipe(path: str | os.PathLike[str]) -> QatRecipe:
    """Import a QAT recipe from a Python file and return its ``recipe`` object (or ``make_recipe()``).

    Trust model: this *executes the file* with the full rights of the test process, exactly like a
    ``conftest.py``. It is only called for a registry entry whose ``quant_mode`` is ``"qat"`` and only when
    the user asked for sidecars to be (re)built, so the registry's author — who also controls the model
    files — is the only party whose code runs. Never point ``qat_recipe`` at a file you did not review.

    The file is imported under a private module name derived from its resolved path, so two recipes with
    the same file name do not collide and the import does not depend on the current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ProducerError(f"QAT recipe {path}: file not found")
    resolved = path.resolve()
    mod_name = "_quantgate_recipe_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise ProducerError(f"QAT recipe {path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise ProducerError(f"QAT recipe {path}: importing it raised {type(exc).__name__}: {exc}") from exc
    if hasattr(module, "recipe"):
        recipe = module.recipe
    elif callable(getattr(module, "make_recipe", None)):
        recipe = module.make_recipe()
    else:
        raise ProducerError(f"QAT recipe {path}: defines neither a module-level `recipe` nor `make_recipe()`")
    if not isinstance(recipe, QatRecipe):
        missing = [m for m in ("build_model", "load_fp32_weights", "training_data", "loss", "example_input")
                   if not callable(getattr(recipe, m, None))]
        raise ProducerError(f"QAT recipe {path}: the recipe object lacks {', '.join(missing)}")
    return recipe


def load_onnx_initializers(model: torch.nn.Module, onnx_path: str | os.PathLike[str]) -> None:
    """Copy an fp32 ONNX file's initializers into ``model``'s parameters and buffers, matched by name and shape.

    Meant for recipes whose model was exported with the legacy exporter (initializer names are the
    ``state_dict`` names). Raises :class:`ProducerError` naming every tensor that has no match.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path), load_external_data=True)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    state = model.state_dict()
    missing = [k for k in state if k not in inits]
    bad_shape = [f"{k} {tuple(state[k].shape)} vs {inits[k].shape}" for k in state
                 if k in inits and tuple(state[k].shape) != tuple(inits[k].shape)]
    if missing or bad_shape:
        raise ProducerError(
            f"{onnx_path}: initializers do not match the recipe model: "
            f"missing {missing or 'none'}; shape mismatch {bad_shape or 'none'}"
        )
    model.load_state_dict({k: torch.from_numpy(np.array(inits[k], copy=True)) for k in state}, strict=True)


# --------------------------------------------------------------------------------------------------------------
# ONNX Runtime's static quantisation, in memory


def _ort_quantize_static_bytes(model: onnx.ModelProto, reader: Any, **kwargs: Any) -> bytes:
    """Run ``onnxruntime.quantization.quantize_static`` and return the output model's bytes (no named file)."""
    from onnxruntime.quantization import quantize_static

    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and Path("/proc/self/fd").is_dir():
        fd = memfd_create("quantgate-int8")
        try:
            quantize_static(model, f"/proc/self/fd/{fd}", reader, **kwargs)
            with open(f"/proc/self/fd/{fd}", "rb") as handle:
                return handle.read()
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="quantgate-qat-") as scratch:
        out = Path(scratch) / "int8.onnx"
        quantize_static(model, out, reader, **kwargs)
        return out.read_bytes()


# --------------------------------------------------------------------------------------------------------------
# The producer


def quantize_qat(
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    config: QatConfig,
    *,
    recipe: QatRecipe | str | os.PathLike[str],
    progress: Callable[[str], None] | None = None,
    guard: WriteGuard | None = None,
    assess: Assess | None = None,
) -> QatResult:
    """Fine-tune the model in ``fp32_path`` with fake quantisation and write the int8 sidecar ``int8_path``.

    ``recipe`` is a recipe object or the path of a recipe file (see :func:`load_recipe` for the trust model).
    ``progress`` receives one line per stage and per epoch. ``guard`` (from ``Registry.write_guard``) refuses
    a target the registry names in another role, before the training and again before writing. ``assess``
    gates the build before it is published; its numbers go into the provenance (``build.gate``), beside the
    CPU kernels the training ran on (``build.environment``): the bytes depend on both. Returns a
    :class:`QatResult`; raises :class:`ProducerError` with the file and the reason on any failure, leaving
    ``int8_path`` untouched.
    """
    started = time.monotonic()
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    say = progress or (lambda _line: None)
    if not fp32_path.is_file():
        raise ProducerError(f"{fp32_path}: fp32 model not found")
    check_target(int8_path, fp32_path, guard)
    sweep_partials(int8_path.parent)
    recipe_file: Path | None = None
    if isinstance(recipe, (str, os.PathLike)):
        recipe_file = Path(recipe)
        recipe = load_recipe(recipe_file)
    elif not isinstance(recipe, QatRecipe):
        raise ProducerError(f"{fp32_path}: recipe {recipe!r} does not implement the QatRecipe protocol")

    try:
        import onnx
        import torch
        import torchao  # noqa: F401  (fail early with a clear message when the extra is missing)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ProducerError(f"{fp32_path}: QAT needs the `qat` extra (torch, torchao, onnxscript): {exc}") from exc

    fp32_proto = onnx.load(str(fp32_path))
    init_names = {t.name for t in fp32_proto.graph.initializer}
    inputs_meta = [i for i in fp32_proto.graph.input if i.name not in init_names]
    if len(inputs_meta) != 1:
        raise ProducerError(f"{fp32_path}: QAT supports single-input models, found {len(inputs_meta)} inputs")
    input_name = inputs_meta[0].name
    output_names = [o.name for o in fp32_proto.graph.output]

    lr = config.lr_qat
    if lr is None:
        fp32_lr = getattr(recipe, "fp32_lr", None)
        if not isinstance(fp32_lr, (int, float)) or fp32_lr <= 0:
            raise ProducerError(
                f"{fp32_path}: QatConfig.lr_qat is unset and the recipe has no positive `fp32_lr` to derive it from"
            )
        lr = float(fp32_lr) / 10.0

    if config.distill_weight is not None or config.fold_bn:
        from pytest_quantgate.producers.qad import DistillingRecipe

        recipe = DistillingRecipe(recipe, fp32_path, distill_weight=config.distill_weight, fold_bn=config.fold_bn)
    x_train, y_train = recipe.training_data()
    x_train = np.ascontiguousarray(x_train, dtype=np.float32)
    y_train = np.ascontiguousarray(y_train, dtype=np.float32)
    if len(x_train) == 0 or len(x_train) != len(y_train):
        raise ProducerError(
            f"{fp32_path}: recipe training data must be non-empty with matching lengths, "
            f"got {len(x_train)} inputs and {len(y_train)} targets"
        )

    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        say(f"loading fp32 weights from {fp32_path.name}")
        model = recipe.build_model()
        recipe.load_fp32_weights(model, fp32_path)
        fp32_params = {k: v.detach().clone() for k, v in model.named_parameters()}

        example = recipe.example_input().detach().to(torch.float32)
        if example.shape[0] < 2:  # a batch of 1 would be specialised by torch.export
            example = example.repeat(2, *([1] * (example.dim() - 1)))
        prepared = _prepare_qat(model, example, config.recipe_name)

        losses, seen = _fine_tune(prepared, recipe, x_train, y_train, config, lr, say)

        qat_params = dict(prepared.named_parameters())
        l2 = math.sqrt(
            sum(float((qat_params[k].detach() - v).pow(2).sum()) for k, v in fp32_params.items() if k in qat_params)
        )
        say(f"weights moved {l2:.6g} (L2) from the fp32 checkpoint")

        if config.route == "bridge":
            fresh = _copy_into_fresh(recipe, prepared, fp32_path)
            fp32_onnx = _export_legacy(fresh, example, input_name, output_names)
            if _spec(config).weight_bits == 4:
                int8_bytes = _bridge_int4(fp32_onnx, fp32_path)
                calibration = {"source": "none: int4 weight-only (MatMulNBits) needs no activation ranges",
                               "block_size": _int4_group(), "symmetric": True}
            else:
                calib = _calibration_samples(recipe, x_train, config)
                int8_bytes = _bridge_quantize(fp32_onnx, input_name, calib, config)
                calibration = {
                    "source": "recipe.calibration_data()" if hasattr(recipe, "calibration_data")
                    else "seeded sample of recipe.training_data() inputs",
                    "n_samples": len(calib),
                    "sha256": hashlib.sha256(calib.tobytes()).hexdigest(),
                    "method": config.calibrate_method,
                    "per_channel": config.per_channel,
                    "quant_format": "QDQ",
                    "activation_type": "QUInt8",
                    "weight_type": "QInt8",
                }
        else:
            int8_bytes = _export_pt2e(prepared, example, input_name, output_names)
            calibration = {"source": "fake-quant observers during QAT (pt2e convert)", "n_samples": len(x_train)}
    finally:
        torch.use_deterministic_algorithms(prev_deterministic)
        torch.set_num_threads(prev_threads)

    _check_loads(int8_bytes, int8_path)
    # read while torch is imported and before anything else runs: the kernels the fine-tune used
    build = build_block(threads=config.threads, seed=config.seed, gate=None)
    if assess is not None:
        say("gating the build on the soak fixture (recorded as build.gate)")
        with scratch_dir("qat-assess") as folder:
            candidate = folder / int8_path.name
            candidate.write_bytes(int8_bytes)
            build["gate"] = dict(assess(candidate))
    say(f"writing {int8_path}")
    record = {
        "producer": "qat",
        "mode": "qat",
        "route": config.route,
        "config": asdict(config),
        "lr_qat_effective": lr,
        "recipe": None if recipe_file is None else {"path": recipe_file.name, "sha256": sha256_file(recipe_file)},
        "training": {
            "n_train": len(x_train),
            "samples_per_epoch": seen,
            "epoch_losses": losses,
            "weight_l2_from_fp32": l2,
            "optimizer": "Adam",
            "quantizer": _spec(config).description,
            "recipe_name": config.recipe_name,
            "distillation": None if config.distill_weight is None else {
                "teacher": "the registered fp32 model", "distill_weight": config.distill_weight,
                "loss": "distill_weight * MSE(student, teacher) + (1 - distill_weight) * recipe.loss"},
            "fold_bn": config.fold_bn,
        },
        "calibration": calibration,
        "fp32_path": fp32_path.name,
        "fp32_sha256": sha256_file(fp32_path),
        "library_versions": shaping_versions(torch=True),
        "build": build,
    }
    published = publish_sidecar(int8_bytes, int8_path, record, fp32_path=fp32_path, guard=guard)
    say(f"wrote {int8_path} in {time.monotonic() - started:.1f}s")
    return QatResult(
        int8_path=published.int8_path,
        sha256=published.sha256,
        provenance_path=published.provenance_path,
        provenance=published.provenance,
        epoch_losses=tuple(losses),
        samples_per_epoch=tuple(seen),
        weight_l2_from_fp32=l2,
        n_train=len(x_train),
        lr_qat=lr,
        route=config.route,
    )


def _spec(config: QatConfig) -> Any:
    from pytest_quantgate.producers.qat_recipes import resolve

    return resolve(config.recipe_name, config.route)


def _dynamic_batch(example: torch.Tensor) -> tuple[dict[int, Any]]:
    import torch

    return ({0: torch.export.Dim("batch", min=1)},)


def _prepare_qat(model: torch.nn.Module, example: torch.Tensor, recipe_name: str = "int8-x86") -> torch.nn.Module:
    from pytest_quantgate.producers.qat_recipes import prepare, resolve

    spec = resolve(recipe_name, "bridge")
    try:
        prepared: torch.nn.Module = prepare(model, example, spec, _dynamic_batch(example))
    except Exception as exc:
        route = "quantize_ QATConfig" if spec.quantizer is None else "torch.export / prepare_qat_pt2e"
        raise ProducerError(f"QAT recipe {recipe_name!r}: prepare failed on the recipe model ({route}): "
                            f"{type(exc).__name__}: {exc}") from exc
    # the quantisers annotate conv/linear modules only; a model built from bare matmuls gets no fake-quant
    # at all, and "QAT" would silently be plain fp32 fine-tuning
    if fake_quant_count(prepared) == 0:
        what = "no torch.nn.Linear" if spec.quantizer is None else "no conv/linear pattern"
        raise ProducerError(
            f"prepare ({recipe_name}) inserted no fake-quant node: the quantiser found {what} in the recipe "
            "model (bare `x @ W` matmuls are not annotated); build it from torch.nn.Linear / Conv modules"
        )
    return prepared


def fake_quant_count(prepared: torch.nn.Module) -> int:
    """Return how many fake-quantize modules ``prepare_qat_pt2e`` inserted."""
    return sum(1 for _, module in prepared.named_modules() if "FakeQuant" in type(module).__name__)


def _fine_tune(prepared: torch.nn.Module, recipe: QatRecipe, x_train: np.ndarray, y_train: np.ndarray,
               config: QatConfig, lr: float, say: Callable[[str], None]) -> tuple[list[float], list[int]]:
    import torch

    from pytest_quantgate.producers.qat_recipes import train_mode

    train_mode(prepared)
    gen = torch.Generator().manual_seed(config.seed)
    x_all, y_all = torch.from_numpy(x_train), torch.from_numpy(y_train)
    opt = torch.optim.Adam(prepared.parameters(), lr=lr)
    losses: list[float] = []
    seen: list[int] = []
    for epoch in range(config.epochs_qat):
        order = torch.randperm(len(x_all), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = recipe.loss(prepared(x_all[idx]), y_all[idx])
            if not torch.isfinite(loss):
                raise ProducerError(f"QAT epoch {epoch + 1}: loss became {float(loss)} (lr_qat={lr}); lower lr_qat")
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / count)
        seen.append(count)
        say(f"QAT epoch {epoch + 1}/{config.epochs_qat}: mean loss {losses[-1]:.6g} over {count} samples")
    return losses, seen


def _copy_into_fresh(recipe: QatRecipe, prepared: torch.nn.Module, fp32_path: Path) -> torch.nn.Module:
    """Copy the QAT-conditioned parameters (and plain buffers) into a fresh fp32 module; fail on any mismatch."""
    import torch

    fresh = recipe.build_model()
    fresh_state = fresh.state_dict()
    qat_state = {k: v for k, v in prepared.state_dict().items() if "activation_post_process" not in k}
    unmatched = [k for k in fresh_state if k not in qat_state]
    bad_shape = [f"{k} {tuple(fresh_state[k].shape)} vs {tuple(qat_state[k].shape)}" for k in fresh_state
                 if k in qat_state and tuple(qat_state[k].shape) != tuple(fresh_state[k].shape)]
    qat_param_names = {k for k, _ in prepared.named_parameters()}
    extra = sorted(qat_param_names - set(fresh_state))
    if unmatched or bad_shape or extra:
        raise ProducerError(
            f"{fp32_path}: cannot copy QAT weights into a fresh fp32 module: unmatched in fresh model "
            f"{unmatched or 'none'}; shape mismatch {bad_shape or 'none'}; QAT parameters with no fp32 home "
            f"{extra or 'none'}"
        )
    with torch.no_grad():
        fresh.load_state_dict({k: qat_state[k].detach().clone() for k in fresh_state}, strict=True)
    fresh.eval()
    return fresh


def _export_legacy(model: torch.nn.Module, example: torch.Tensor, input_name: str, output_names: list[str]) -> bytes:
    import torch

    buf = io.BytesIO()
    axes = {name: {0: "N"} for name in [input_name, *output_names]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), buf,  # type: ignore[arg-type]  # a file object works too
                              input_names=[input_name], output_names=output_names, dynamic_axes=axes,
                              opset_version=_OPSET, do_constant_folding=True, dynamo=False)
    except Exception as exc:
        raise ProducerError(f"exporting the QAT-conditioned fp32 module to ONNX failed: "
                            f"{type(exc).__name__}: {exc}") from exc
    return buf.getvalue()


def _calibration_samples(recipe: QatRecipe, x_train: np.ndarray, config: QatConfig) -> np.ndarray:
    if hasattr(recipe, "calibration_data"):
        calib = np.ascontiguousarray(recipe.calibration_data(), dtype=np.float32)[: config.n_calibration]
    else:
        rng = np.random.default_rng(config.seed)
        idx = np.sort(rng.permutation(len(x_train))[: config.n_calibration])
        calib = x_train[idx]
    if len(calib) == 0:
        raise ProducerError("no calibration samples")
    return calib


class _ArrayReader:
    """An onnxruntime ``CalibrationDataReader`` over an in-memory array, in batches of 16."""

    def __init__(self, name: str, data: np.ndarray, batch: int = 16) -> None:
        self._batches = iter([{name: data[i : i + batch]} for i in range(0, len(data), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _bridge_quantize(fp32_onnx: bytes, input_name: str, calib: np.ndarray, config: QatConfig) -> bytes:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType

    reader = type("_Reader", (_ArrayReader, CalibrationDataReader), {})(input_name, calib)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "distribution": CalibrationMethod.Distribution,
    }[config.calibrate_method]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _ort_quantize_static_bytes(
                onnx.load_from_string(fp32_onnx),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
            )
    except Exception as exc:
        raise ProducerError(f"onnxruntime static quantisation of the QAT-conditioned model failed: "
                            f"{type(exc).__name__}: {exc}") from exc


def _int4_group() -> int:
    from pytest_quantgate.producers.qat_recipes import INT4_GROUP

    return INT4_GROUP


def _bridge_int4(fp32_onnx: bytes, fp32_path: Path) -> bytes:
    """Convert the QAT-conditioned fp32 ONNX to int4 weight-only MatMulNBits with the recipe's group size."""
    from pytest_quantgate.producers.weight_only import quantize_matmul_nbits

    with tempfile.TemporaryDirectory(prefix="quantgate-qat-int4-") as scratch:
        source, built = Path(scratch) / "fp32.onnx", Path(scratch) / "int4.onnx"
        source.write_bytes(fp32_onnx)
        try:
            quantize_matmul_nbits(source, built, bits=4, block_size=_int4_group(), symmetric=True,
                                  accuracy_level=None, nodes_to_exclude=())
        except Exception as exc:
            raise ProducerError(f"{fp32_path}: int4 weight-only convert (MatMulNBits) of the QAT-conditioned model "
                                f"failed: {type(exc).__name__}: {exc}") from exc
        return built.read_bytes()


def _export_pt2e(prepared: torch.nn.Module, example: torch.Tensor, input_name: str,
                 output_names: list[str]) -> bytes:
    import torch
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    try:
        move_exported_model_to_eval(prepared)
        converted = convert_pt2e(prepared)
        with warnings.catch_warnings(), open(os.devnull, "w") as devnull:
            warnings.simplefilter("ignore")
            saved = sys.stdout
            sys.stdout = devnull  # the dynamo exporter prints progress lines
            try:
                program = torch.onnx.export(converted, (example,), dynamo=True, input_names=[input_name],
                                            output_names=output_names, opset_version=_OPSET,
                                            dynamic_shapes=_dynamic_batch(example), external_data=False)
            finally:
                sys.stdout = saved
        if program is None:
            raise ProducerError("pt2e route: the dynamo ONNX export returned no program")
        return bytes(program.model_proto.SerializeToString())
    except Exception as exc:
        raise ProducerError(f"pt2e route: convert_pt2e / dynamo ONNX export failed: "
                            f"{type(exc).__name__}: {exc}") from exc


def _check_loads(int8_bytes: bytes, int8_path: Path) -> None:
    ort = import_onnxruntime()

    try:
        ort.InferenceSession(int8_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ProducerError(f"{int8_path}: onnxruntime cannot load the produced int8 model: {exc}") from exc
