"""Gate an int8 sidecar from Python: :func:`check`, and the ``quantgate`` pytest fixture built on it.

For teams that build sidecars inside their own tests, in the style of pytest-regressions::

    def test_my_sidecar(quantgate, tmp_path):
        int8 = build_my_sidecar(tmp_path)                      # a path or an onnx.ModelProto
        quantgate.check("model.onnx", int8, feeds={"x": x}, budget_plcc=0.01, mode="dynamic")

``check`` takes the keys of a registry entry and runs the very gate a registry item runs
(:func:`~..runner.gate.run_one`): the same checks, statistics, lineage, diagnosis and verdict text. The pair
becomes a one-entry registry held in memory, validated by the registry's JSON Schema, whose folder is the
deepest one holding the three files (nothing is written there); models given as ``onnx.ModelProto`` and feeds
given as arrays are saved to a private scratch folder first, removed afterwards. Nothing here imports
onnxruntime until a check runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EpUnavailableError, InputError, ModelFileError, RegistryError
from ..records import GateResult, Outcome
from ..settings import Settings

if TYPE_CHECKING:
    import pytest

    from ..io.registry import Entry, Registry

# keys check() fills in from its fp32, int8 and feeds arguments: giving them as well would contradict those
OWN_KEYS = frozenset({"onnx", "int8_onnx", "sha256", "int8_sha256", "soak_fixture", "quant_calibration_set",
                      "qat_recipe", "int8_build", "quant_options"})
# the short names of keys whose registry name is not ``quant_<name>``
ALIASES = {"budget_plcc": "quant_accuracy_budget_plcc"}
EPS = ("cpu", "cuda", "openvino")
# the registry check() gates stands in this file name, in the folder that holds the three files; never written
REGISTRY_NAME = "quantgate.check"
# a valid registry hash for the schema: the pair is gated as found, no pin is compared
_UNPINNED = "0" * 64


class CheckError(InputError):
    """``check`` could not gate the pair: bad arguments or files, or an unexpected error inside the gate."""

    def __init__(self, message: str, outcome: Outcome | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome


def entry_fields(keys: Mapping[str, Any]) -> dict[str, Any]:
    """Return registry entry fields from ``check`` keywords: ``quant_<name>`` or ``<name>``, as the schema names them.

    ``budget_plcc`` is ``quant_accuracy_budget_plcc``, ``outputs`` is ``quant_outputs``, ``mode`` is
    ``quant_mode``, ``lineage`` is ``quant_lineage``; unprefixed keys such as ``id``, ``kind`` and ``description``
    are themselves. File and hash keys are refused: the arguments give them.
    """
    from ..io.registry import known_keys

    known = known_keys()
    fields: dict[str, Any] = {}
    for key, value in keys.items():
        name = ALIASES.get(key, key)
        if name not in known and f"quant_{name}" in known:
            name = f"quant_{name}"
        if name in OWN_KEYS:
            raise CheckError(f"quantgate.check(): {key!r} is not a keyword of check(): the fp32, int8 and feeds "
                             f"arguments give the files")
        if name not in known:
            allowed = ", ".join(sorted(k.removeprefix("quant_") for k in known - OWN_KEYS))
            raise CheckError(f"quantgate.check(): unknown registry key {key!r}; check() takes the keys of a registry "
                             f"entry, with or without 'quant_': {allowed}")
        if name in fields:
            raise CheckError(f"quantgate.check(): {name!r} is given twice (as {key!r} too)")
        fields[name] = value
    return fields


def _entry_id(fp32: Any, given: Any) -> str:
    """Return the entry id: the one given, else the fp32 file's stem or graph name, made a valid id."""
    if given is not None:
        return str(given)
    raw = fp32.graph.name if _is_model(fp32) else Path(os.fspath(fp32)).name.removesuffix(".onnx")
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", raw).lstrip("_.-")[:128]
    return cleaned or "model"


def _is_model(value: Any) -> bool:
    import onnx

    return isinstance(value, onnx.ModelProto)


@contextmanager
def staged(fp32: Any, int8: Any, feeds: Any) -> Iterator[tuple[Path, Path, Path]]:
    """Yield the paths of both models and the feeds; ModelProtos and arrays live in a scratch folder meanwhile."""
    with ExitStack() as stack:
        scratch: list[Path] = []

        def folder() -> Path:
            if not scratch:
                from ..fileio import scratch_folder

                scratch.append(stack.enter_context(scratch_folder("check", what="check() scratch folder"))[0])
            return scratch[0]

        paths = [_model_path(model, role, folder) for model, role in ((fp32, "fp32"), (int8, "int8"))]
        yield paths[0], paths[1], _feeds_path(feeds, folder)


def _model_path(model: Any, role: str, folder: Any) -> Path:
    if _is_model(model):
        import onnx

        path: Path = folder() / f"{role}.onnx"
        # past protobuf's 2 GiB a model can only be saved with its weights beside it
        large = model.ByteSize() >= (1 << 31) - 1
        onnx.save_model(model, str(path), save_as_external_data=large, location=f"{role}.onnx.data")
        return path
    if not isinstance(model, (str, os.PathLike)):
        raise CheckError(f"quantgate.check(): the {role} model must be a path or an onnx.ModelProto, got "
                         f"{type(model).__name__}")
    path = Path(os.fspath(model))
    if not path.is_file():
        raise ModelFileError(f"quantgate.check(): {role} model {path} is not a file")
    return path


def _feeds_path(feeds: Any, folder: Any) -> Path:
    if isinstance(feeds, (str, os.PathLike)):
        path = Path(os.fspath(feeds))
        if not path.exists():
            from ..errors import FixtureError

            raise FixtureError(f"quantgate.check(): feeds {path} does not exist (an .npz, or a folder of .npz shards)")
        return path
    if not isinstance(feeds, Mapping) or not feeds:
        raise CheckError("quantgate.check(): feeds must be a path to an .npz or a non-empty dict of numpy arrays "
                         "(samples on axis 0; 'target' for ground truth)")
    arrays = {str(name): np.asarray(value) for name, value in feeds.items()}
    if any(a.dtype == object for a in arrays.values()):
        raise CheckError("quantgate.check(): feeds hold an object array; give numeric numpy arrays")
    from ..io.npz import save_arrays

    written: Path = folder() / "feeds.npz"
    with open(written, "wb") as handle:
        save_arrays(handle, arrays)
    return written


def build_registry(fp32: Path, int8: Path, feeds: Path, fields: Mapping[str, Any]) -> tuple[Registry, Entry]:
    """Return the one-entry registry (validated by the schema) that gates ``int8`` against ``fp32`` on ``feeds``."""
    from ..io.registry import parse_registry

    real = [p.resolve() for p in (fp32, int8, feeds)]
    try:
        common = Path(os.path.commonpath([p.parent for p in real]))
    except ValueError:  # Windows: files on two drives share no folder
        raise CheckError(f"quantgate.check(): {fp32}, {int8} and {feeds} share no folder (two drives); copy them "
                         f"onto one") from None
    fp32_rel, int8_rel, feeds_rel = (p.relative_to(common).as_posix() for p in real)
    entry = {**fields, "onnx": fp32_rel, "int8_onnx": int8_rel, "soak_fixture": feeds_rel,
             "sha256": _UNPINNED, "int8_sha256": _UNPINNED}
    if entry.get("quant_mode") == "static":
        entry["quant_calibration_set"] = feeds_rel  # required by the schema; nothing is rebuilt, so never read
    path = common / REGISTRY_NAME
    registry = parse_registry({"schema_version": 1, "models": [entry]}, path)
    if registry.problems:
        message = registry.problems[0].message.replace(f"{path}: ", "quantgate.check(): ", 1)
        raise RegistryError(message.replace("$.models[0].", "").replace(" at $.models[0]", ""))
    found = registry.entries[0]
    if not found.gated:
        raise CheckError("quantgate.check(): mode 'fp32' gates nothing; give the sidecar's mode (static, dynamic or "
                         "qat)")
    # the pair is gated as found: no pinned hash to compare
    return registry, replace(found, sha256=None, int8_sha256=None)


def run_check(fp32: Any, int8: Any, *, feeds: Any, ep: str = "cpu", settings: Settings | None = None,
              **keys: Any) -> tuple[Outcome, str]:
    """Gate the pair as a registry item would; return its outcome and the registry label the failure text names."""
    import uuid

    from ..engine.ort import OnnxRuntimeError, check_onnxruntime
    from ..runner.gate import run_one

    if ep not in EPS:
        raise CheckError(f"quantgate.check(): ep {ep!r} is not one of {', '.join(EPS)}")
    fields = entry_fields(keys)
    fields["id"] = _entry_id(fp32, fields.get("id"))
    try:
        check_onnxruntime()
    except OnnxRuntimeError as exc:
        raise CheckError(f"quantgate.check(): {exc}") from None
    base = settings if settings is not None else Settings()
    with staged(fp32, int8, feeds) as (fp32_path, int8_path, feeds_path):
        registry, entry = build_registry(fp32_path, int8_path, feeds_path, fields)
        # the run's statistics and kernels, but nothing rebuilt, cached or reported for a pair outside a registry
        run = replace(base, enabled=True, registry=registry.path, fixtures_dir=registry.folder, eps=(ep,), select=(),
                      regen="never", cache=False, report=None, html=None)
        outcome = run_one(registry, entry, ep, run, run_id=uuid.uuid4().hex)
    return outcome, str(registry.path)


def result_of(outcome: Outcome) -> GateResult:
    """Return the measured result; raise EpUnavailableError for a skip and CheckError for an error."""
    if outcome.status == "skip":
        raise EpUnavailableError(outcome.message)
    if outcome.status == "error" or outcome.result is None:
        raise CheckError(outcome.message, outcome)
    return outcome.result


def check(fp32: Any, int8: Any, *, feeds: Any, budget_plcc: float | None = None,
          outputs: Mapping[str, Mapping[str, Any]] | None = None, mode: str = "static", ep: str = "cpu",
          settings: Settings | None = None, **entry_keys: Any) -> GateResult:
    """Gate ``int8`` against ``fp32`` on ``feeds`` with the keys of a registry entry; return the typed result.

    ``fp32`` and ``int8`` are paths or ``onnx.ModelProto``; ``feeds`` a path to an ``.npz`` (or a folder of shards)
    or a dict of numpy arrays, samples on axis 0 (``target`` for ground truth, other extra arrays never fed).
    ``budget_plcc`` is ``quant_accuracy_budget_plcc`` (None: the mode's default, 0.01 for PTQ, 0.002 for QAT),
    ``outputs`` is ``quant_outputs``, ``mode`` is ``quant_mode``; any other entry key goes by its registry name
    with or without ``quant_`` (``lineage=False``, ``budget_mae=0.05``, ``id="my_model"``). ``settings`` are the
    run's options (bootstrap, seed, decision, kernels, ...; default: the plugin's defaults).

    A failing sidecar is returned (``result.passed`` is False; :func:`assert_passes` fails a test with the
    registry item's text); bad input raises an :class:`~..errors.InputError` (CheckError, ModelFileError, ...),
    an unavailable EP :class:`~..errors.EpUnavailableError`.
    """
    outcome, _ = run_check(fp32, int8, feeds=feeds, ep=ep, settings=settings,
                           **_named(budget_plcc, outputs, mode), **entry_keys)
    return result_of(outcome)


def _named(budget_plcc: float | None, outputs: Mapping[str, Mapping[str, Any]] | None, mode: str) -> dict[str, Any]:
    """Return check()'s named keywords as registry keys; None leaves the registry's default."""
    named: dict[str, Any] = {"quant_mode": mode}
    if budget_plcc is not None:
        named["quant_accuracy_budget_plcc"] = budget_plcc
    if outputs is not None:
        named["quant_outputs"] = {name: dict(rules) for name, rules in outputs.items()}
    return named


def registry_label(result: GateResult) -> str:
    """Return the registry a result of :func:`check` was gated in, as its failure text names it."""
    provenance = result.provenance
    if provenance is None:
        return REGISTRY_NAME
    parents = [Path(ref.path).parent for ref in (provenance.fp32, provenance.int8, provenance.fixture)]
    try:
        return str(Path(os.path.commonpath(parents)) / REGISTRY_NAME)
    except ValueError:
        return REGISTRY_NAME


def assert_passes(result: GateResult, registry: str | None = None) -> GateResult:
    """Fail the calling test with the registry item's report unless ``result`` passed; return it."""
    if not result.passed:
        import pytest

        from ..reporting.reports import failure_text

        pytest.fail(failure_text(result, registry if registry is not None else registry_label(result)),
                    pytrace=False)
    return result


class QuantgateFixture:
    """The ``quantgate`` pytest fixture: :func:`check` that fails, skips and warns as a registry item does."""

    def __init__(self, request: pytest.FixtureRequest | None = None, settings: Settings | None = None) -> None:
        self.request = request
        self.settings = settings if settings is not None else _run_settings(request)
        self.results: list[GateResult] = []  # every result this test measured, in order

    def check(self, fp32: Any, int8: Any, *, feeds: Any, budget_plcc: float | None = None,
              outputs: Mapping[str, Mapping[str, Any]] | None = None, mode: str = "static", ep: str = "cpu",
              **entry_keys: Any) -> GateResult:
        """Gate the pair (see :func:`check`); fail the test with the registry item's text unless it passes."""
        import pytest

        from ..reporting.reports import failure_text
        from .items import junit_properties

        try:
            outcome, label = run_check(fp32, int8, feeds=feeds, ep=ep, settings=self.settings,
                                       **_named(budget_plcc, outputs, mode), **entry_keys)
        except InputError as exc:
            pytest.fail(f"quantgate ERROR: {exc}", pytrace=False)
        node = self.request.node if self.request is not None else None
        where = f"{outcome.entry_id} [{outcome.ep}]"
        if node is not None:
            for note in outcome.notes:
                node.warn(pytest.PytestWarning(f"quantgate {outcome.entry_id}: {note}"))
            if outcome.log:
                node.add_report_section("call", "onnxruntime log", "\n".join(outcome.log))
        if outcome.status == "skip":
            pytest.skip(f"quantgate: {outcome.message} (use --quantgate-strict-ep to make this an error)")
        if outcome.status == "error" or outcome.result is None:
            pytest.fail(f"quantgate ERROR: {where}: {outcome.message}", pytrace=False)
        result = outcome.result
        self.results.append(result)
        if node is not None:
            node.user_properties.extend(junit_properties(result))
            for warning in result.warnings:
                node.warn(pytest.PytestWarning(f"quantgate {where}: {warning}"))
        if not result.passed:
            pytest.fail(failure_text(result, label), pytrace=False)
        return result


def _run_settings(request: pytest.FixtureRequest | None) -> Settings:
    """Return the run's resolved --quantgate-* settings (resolved in pytest_configure, with or without --quantgate)."""
    if request is None:
        return Settings()
    from .stash import SETTINGS_KEY

    return request.config.stash.get(SETTINGS_KEY, Settings())
