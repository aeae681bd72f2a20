"""Resolve the gate's options (command line, then ini, then default) into one frozen settings object."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fileio import writable_file

if TYPE_CHECKING:
    import pytest

EP_CHOICES = ("cpu", "cuda", "openvino", "auto")
REGEN_CHOICES = ("missing", "all", "never")
DIAGNOSE_CHOICES = ("auto", "off", "always")
DECISION_CHOICES = ("point", "conservative")
OPENVINO_PRECISIONS = ("FP32", "FP16", "ACCURACY")
INT8_PRECISIONS = ("exact", "fast")

INT8_PRECISION_HELP = (
    "int8 kernels of the CPU EP: exact (default; session.x64quantprecision=1, so x86 CPUs without VNNI sum int8 "
    "products without saturating, as VNNI CPUs do, and the verdict does not depend on the CPU) | fast "
    "(onnxruntime's default kernels, which saturate U8S8/S8S8 products on x86 CPUs without VNNI: gate what a "
    "deployment that keeps onnxruntime's defaults computes on this CPU)"
)

DEFAULT_REGISTRY = "model/registry.json"
DEFAULT_FIXTURES = "fixtures"
DEFAULT_BATCH_SIZE = 256
DEFAULT_BOOTSTRAP = 1000
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95
DEFAULT_MAX_FIXTURE_GIB = 64.0
# a fixture with more samples is an ERROR before anything runs (0: no ceiling): an error, not a truncation, so a
# verdict always covers the whole pinned fixture. The gate's memory does not grow with the sample count
# (streaming.Units), its time does: ~30 µs per sample for an 8-feature MLP's dynamic sidecar at batch 1 (10^6
# samples in 30 s, measured), so the default admits minutes, and a deflated archive of 10^8 tiny samples (the issue's
# 4.8 MB zip declaring 4 GiB) is refused at once
DEFAULT_MAX_SAMPLES = 10_000_000
MAX_SAMPLES_HELP = (f"refuse soak fixtures with more than N samples, an ERROR before anything runs (default "
                    f"{DEFAULT_MAX_SAMPLES:_}; 0 = no ceiling); memory stays bounded whatever the count, time does not")


@dataclass(frozen=True)
class EpOptions:
    """Provider options that travel with every session the gate creates."""

    cuda_device_id: int = 0
    openvino_device: str = "CPU"
    openvino_precision: str = "FP32"
    # exact: onnxruntime's CPU kernels sum int8 products without saturation on every x86 CPU (see providers.py),
    # so a verdict does not depend on whether the CPU has VNNI; fast: onnxruntime's default kernels
    int8_precision: str = "exact"


@dataclass(frozen=True)
class Settings:
    """Every knob of one gate run, resolved once in :func:`resolve`."""

    enabled: bool = False
    registry: Path = Path(DEFAULT_REGISTRY)
    fixtures_dir: Path = Path(DEFAULT_FIXTURES)
    select: tuple[str, ...] = ()
    eps: tuple[str, ...] = ("auto",)
    strict_ep: bool = False
    strict: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = DEFAULT_SEED
    confidence: float = DEFAULT_CONFIDENCE
    decision: str = "point"
    regen: str = "missing"
    allow_recipes: bool = False
    report: Path | None = None
    html: Path | None = None
    cache: bool = False
    diagnose: str = "auto"  # auto: failed items only; off; always: passing items too
    max_fixture_bytes: int = int(DEFAULT_MAX_FIXTURE_GIB * (1 << 30))
    max_samples: int = DEFAULT_MAX_SAMPLES  # 0: no ceiling
    threads: int | None = None  # ORT intra-op threads; set under xdist so workers do not oversubscribe cores
    ep_options: EpOptions = EpOptions()


# --- parse-time validators (argparse ``type=``): the message names the value and what is allowed ---


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum}")
    return value


def positive_int(text: str) -> int:
    """Parse an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """Parse an integer >= 0."""
    return _int_at_least(text, 0)


def confidence_level(text: str) -> float:
    """Parse a confidence level strictly between 0.5 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.5 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must lie strictly between 0.5 and 1")
    return value


def _usage(name: str, value: object, allowed: str) -> pytest.UsageError:
    import pytest

    return pytest.UsageError(f"quantgate: {name} = {value!r} is invalid; allowed: {allowed}")


def _pick(config: pytest.Config, option: str, ini: str) -> tuple[Any, str]:
    """Return (value, where) from the command line if given, else from the ini file (None if neither)."""
    value = config.getoption(option)
    if value is not None and value != []:
        return value, "--" + option.replace("_", "-")
    raw = config.getini(ini)
    if raw in (None, "", []):
        return None, ini
    return raw, f"{ini} (ini)"


def _choice(config: pytest.Config, option: str, ini: str, choices: tuple[str, ...], default: str) -> str:
    value, where = _pick(config, option, ini)
    if value is None:
        return default
    canonical = {c.lower(): c for c in choices}.get(str(value).strip().lower())
    if canonical is None:
        raise _usage(where, value, ", ".join(choices))
    return canonical


def _int(config: pytest.Config, option: str, ini: str, default: int, minimum: int) -> int:
    value, where = _pick(config, option, ini)
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _usage(where, value, f"an integer >= {minimum}") from None
    if number < minimum:
        raise _usage(where, value, f"an integer >= {minimum}")
    return number


def _flag(config: pytest.Config, option: str, ini: str) -> bool:
    if config.getoption(option):
        return True
    return bool(config.getini(ini))


def _optional_path(config: pytest.Config, option: str, ini: str) -> Path | None:
    """CLI paths are relative to the invocation folder, ini paths to the ini file's folder; None if neither."""
    value = config.getoption(option)
    if value:
        return (config.invocation_params.dir / str(value)).resolve()
    raw = config.getini(ini)
    if raw:
        base = config.inipath.parent if config.inipath is not None else config.rootpath
        return (base / str(raw)).resolve()
    return None


def _path(config: pytest.Config, option: str, ini: str, default: str) -> Path:
    """Like :func:`_optional_path`, falling back to ``default`` under the rootdir."""
    given = _optional_path(config, option, ini)
    if given is not None:
        return given
    # pytest picks the rootdir before plugin options are known, so `--quantgate-html out.html` (with a space)
    # can move it; the invocation folder is the second place the default is looked for
    for folder in (config.rootpath, config.invocation_params.dir):
        if (folder / default).exists():
            return (folder / default).resolve()
    return (config.rootpath / default).resolve()


def _eps(config: pytest.Config) -> tuple[str, ...]:
    value, where = _pick(config, "quantgate_ep", "quantgate_ep")
    if value is None:
        return ("auto",)
    items = [str(v).strip().lower() for v in value for v in str(v).replace(",", " ").split()]
    for item in items:
        if item not in EP_CHOICES:
            raise _usage(where, item, ", ".join(EP_CHOICES))
    # keep the user's order but drop repeats so ids stay unique
    return tuple(dict.fromkeys(items))


def _gib(config: pytest.Config) -> int:
    value, where = _pick(config, "quantgate_max_fixture_gib", "quantgate_max_fixture_gib")
    if value is None:
        return int(DEFAULT_MAX_FIXTURE_GIB * (1 << 30))
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _usage(where, value, "a positive number of GiB") from None
    if not number > 0 or number != number or number == float("inf"):
        raise _usage(where, value, "a positive number of GiB")
    return int(number * (1 << 30))


def _worker_threads(config: pytest.Config) -> int | None:
    """Return the cores per xdist worker (ORT would otherwise start one thread per core in every worker)."""
    workerinput = getattr(config, "workerinput", None)
    if not workerinput or "workercount" not in workerinput:
        return None
    return max(1, (os.cpu_count() or 1) // int(workerinput["workercount"]))


def default_regen() -> str:
    """Return ``never`` under CI (a sidecar nobody reviewed must not be gated), else ``missing``."""
    return "never" if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes") else "missing"


def resolve(config: pytest.Config) -> Settings:
    """Build the settings from the command line, the ini file and the defaults; raise UsageError on bad values."""
    select_value, _ = _pick(config, "quantgate_select", "quantgate_select")
    select = tuple(s for v in (select_value or []) for s in str(v).replace(",", " ").split())
    confidence_value, where = _pick(config, "quantgate_confidence", "quantgate_confidence")
    confidence = DEFAULT_CONFIDENCE
    if confidence_value is not None:
        try:
            confidence = confidence_level(str(confidence_value))
        except argparse.ArgumentTypeError as exc:
            raise _usage(where, confidence_value, "a number strictly between 0.5 and 1") from exc
    ov_device, _ = _pick(config, "quantgate_openvino_device", "quantgate_openvino_device")
    return Settings(
        enabled=_flag(config, "quantgate", "quantgate"),
        registry=_path(config, "quantgate_registry", "quantgate_registry", DEFAULT_REGISTRY),
        fixtures_dir=_path(config, "quantgate_fixtures", "quantgate_fixtures", DEFAULT_FIXTURES),
        select=select,
        eps=_eps(config),
        strict_ep=_flag(config, "quantgate_strict_ep", "quantgate_strict_ep"),
        strict=_flag(config, "quantgate_strict", "quantgate_strict"),
        batch_size=_int(config, "quantgate_batch_size", "quantgate_batch_size", DEFAULT_BATCH_SIZE, 1),
        bootstrap=_int(config, "quantgate_bootstrap", "quantgate_bootstrap", DEFAULT_BOOTSTRAP, 0),
        seed=_int(config, "quantgate_seed", "quantgate_seed", DEFAULT_SEED, 0),
        confidence=confidence,
        decision=_choice(config, "quantgate_decision", "quantgate_decision", DECISION_CHOICES, "point"),
        regen=_choice(config, "quantgate_regen", "quantgate_regen", REGEN_CHOICES, default_regen()),
        allow_recipes=_flag(config, "quantgate_allow_recipes", "quantgate_allow_recipes"),
        report=_optional_path(config, "quantgate_report", "quantgate_report"),
        html=_optional_path(config, "quantgate_html", "quantgate_html"),
        cache=_flag(config, "quantgate_cache", "quantgate_cache"),
        diagnose=_choice(config, "quantgate_diagnose", "quantgate_diagnose", DIAGNOSE_CHOICES, "auto"),
        max_fixture_bytes=_gib(config),
        max_samples=_int(config, "quantgate_max_samples", "quantgate_max_samples", DEFAULT_MAX_SAMPLES, 0),
        threads=_worker_threads(config),
        ep_options=EpOptions(
            cuda_device_id=_int(config, "quantgate_cuda_device", "quantgate_cuda_device", 0, 0),
            openvino_device=str(ov_device or "CPU").strip().upper(),
            openvino_precision=_choice(
                config, "quantgate_openvino_precision", "quantgate_openvino_precision", OPENVINO_PRECISIONS, "FP32"
            ),
            int8_precision=_choice(config, "quantgate_int8_precision", "quantgate_int8_precision", INT8_PRECISIONS,
                                   "exact"),
        ),
    )


# --- the command line's gate options (quantgate measure and pre-commit) ---------------------------------


def add_gate_args(parser: argparse.ArgumentParser) -> None:
    """Add the gate options that ``quantgate measure`` and ``quantgate pre-commit`` share."""
    parser.add_argument("--ep", dest="eps", action="append", choices=EP_CHOICES, default=None,
                        help="execution provider, repeatable (default: auto = every available one)")
    parser.add_argument("--strict-ep", action="store_true", help="an unavailable EP is an error, not a skip")
    parser.add_argument("--strict", action="store_true", help="a fixture too small to resolve the budget is an error")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="N")
    parser.add_argument("--bootstrap", type=non_negative_int, default=DEFAULT_BOOTSTRAP, metavar="N")
    parser.add_argument("--seed", type=non_negative_int, default=0, metavar="N")
    parser.add_argument("--confidence", type=confidence_level, default=DEFAULT_CONFIDENCE, metavar="LEVEL")
    parser.add_argument("--decision", choices=DECISION_CHOICES, default="point")
    parser.add_argument("--cuda-device", type=non_negative_int, default=0, metavar="N")
    parser.add_argument("--openvino-device", default="CPU", metavar="DEVICE")
    parser.add_argument("--openvino-precision", choices=OPENVINO_PRECISIONS, default="FP32")
    parser.add_argument("--int8-precision", choices=INT8_PRECISIONS, default="exact", help=INT8_PRECISION_HELP)
    parser.add_argument("--regen", choices=REGEN_CHOICES, default=None,
                        help="rebuild sidecars: missing | all | never (default: missing; never when CI=true)")
    parser.add_argument("--allow-recipes", action="store_true", help="let regeneration run qat_recipe files")
    parser.add_argument("--cache", action="store_true", help="skip entries unchanged since they passed")
    parser.add_argument("--cache-dir", type=Path, default=Path(".quantgate-cache"), metavar="DIR",
                        help="where --cache keeps passing rows (default: .quantgate-cache)")
    parser.add_argument("--diagnose", choices=DIAGNOSE_CHOICES, default="auto",
                        help="diagnose failing entries (auto), never (off), or passing ones too (always)")
    parser.add_argument("--max-fixture-gib", type=float, default=DEFAULT_MAX_FIXTURE_GIB, metavar="GIB",
                        help="refuse fixtures whose arrays declare more than this (default %(default)s)")
    parser.add_argument("--max-samples", type=non_negative_int, default=DEFAULT_MAX_SAMPLES, metavar="N",
                        help=MAX_SAMPLES_HELP)
    parser.add_argument("--json", dest="json_out", type=writable_file, default=None, metavar="PATH",
                        help="also write every outcome as JSON")


def settings_from_args(ns: argparse.Namespace) -> Settings:
    """Build the settings of a CLI gate run from parsed ``add_gate_args`` options."""
    return Settings(
        enabled=True,
        registry=ns.registry.resolve(),
        fixtures_dir=ns.fixtures.resolve(),
        select=tuple(ns.ids or ()),
        eps=tuple(dict.fromkeys(ns.eps or ["auto"])),
        strict_ep=ns.strict_ep,
        strict=ns.strict,
        batch_size=ns.batch_size,
        bootstrap=ns.bootstrap,
        seed=ns.seed,
        confidence=ns.confidence,
        decision=ns.decision,
        regen=ns.regen or default_regen(),
        allow_recipes=bool(getattr(ns, "allow_recipes", False)),
        diagnose=ns.diagnose,
        max_fixture_bytes=int(ns.max_fixture_gib * (1 << 30)),
        max_samples=getattr(ns, "max_samples", DEFAULT_MAX_SAMPLES),
        ep_options=EpOptions(ns.cuda_device, ns.openvino_device.upper(), ns.openvino_precision,
                             getattr(ns, "int8_precision", "exact")),
    )
