"""Resolve the gate's options (command line, then ini, then default) into one frozen settings object."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .fileio import writable_file

if TYPE_CHECKING:
    import pytest

EP_CHOICES = ("cpu", "cuda", "openvino", "auto")
REGEN_CHOICES = ("missing", "all", "never")
DIAGNOSE_CHOICES = ("auto", "off", "always")
DECISION_CHOICES = ("point", "conservative", "three-way")
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
# samples --quantgate-save-disagreements keeps per entry and EP: a fixture that runs in a blink, and enough to
# hold every top-1 flip of a sidecar near its 1 % budget on a few thousand soak samples
DEFAULT_SAVE_COUNT = 64
DEFAULT_SHARD_DIR = ".quantgate-shards"
SHARD_FORM = "K/N with 1 <= K <= N (e.g. 2/3: the second of three parts)"
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
    sequential: bool = False  # stop as soon as the confidence sequence settles the verdict (engine/sequential.py)
    regen: str = "missing"
    allow_recipes: bool = False
    report: Path | None = None
    html: Path | None = None
    cache: bool = False
    diagnose: str = "auto"  # auto: failed items only; off; always: passing items too
    max_fixture_bytes: int = int(DEFAULT_MAX_FIXTURE_GIB * (1 << 30))
    max_samples: int = DEFAULT_MAX_SAMPLES  # 0: no ceiling
    shard: tuple[int, int] | None = None  # (K, N): measure part K of N of every fixture, write its state
    shard_dir: Path = Path(DEFAULT_SHARD_DIR)  # where shard states are written
    threads: int | None = None  # ORT intra-op threads; set under xdist so workers do not oversubscribe cores
    save_disagreements: Path | None = None  # folder of <id>.<ep>.disagreements.npz fixtures; None: none written
    save_count: int = DEFAULT_SAVE_COUNT
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


def positive_gib(text: str) -> float:
    """Parse a finite number of GiB above 0 (a fixture size cap)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of GiB")
    return value


def confidence_level(text: str) -> float:
    """Parse a confidence level strictly between 0.5 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.5 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must lie strictly between 0.5 and 1")
    return value


def shard_spec(text: str) -> tuple[int, int]:
    """Parse ``K/N`` (1 <= K <= N): which part of every fixture a shard run measures."""
    k, slash, n = str(text).strip().partition("/")
    try:
        part, parts = int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {SHARD_FORM}") from None
    if not slash or not 1 <= part <= parts:
        raise argparse.ArgumentTypeError(f"{text!r} is not {SHARD_FORM}")
    return part, parts


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


OptionKind = Literal["flag", "int", "choice", "confidence", "gib", "text", "eps", "list", "path", "optional-path",
                     "shard"]


def _canonical(choices: tuple[str, ...]) -> Callable[[str], str]:
    """Return an argparse ``type`` that accepts a choice in any case and gives its canonical spelling."""
    table = {c.lower(): c for c in choices}
    return lambda text: table.get(text.strip().lower(), text)


@dataclass(frozen=True)
class Option:
    """One gate option, declared once: its pytest flag and ini twin, its ``quantgate`` flag, its Settings field.

    ``name`` gives ``--quantgate-<name>`` and the ini key ``quantgate_<name>`` (``--quantgate`` itself for the
    empty name) and, unless ``cli`` is False, ``quantgate measure``/``pre-commit``'s ``--<name>``.
    """

    name: str
    field: str  # the Settings field it sets; "ep_options.<f>" for a provider option
    kind: OptionKind
    help: str
    default: Any = None  # a callable is called when the settings are resolved (the regen default reads CI)
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    cli: bool = True
    minimum: int = 0  # the smallest value of an "int" option

    @property
    def flag(self) -> str:
        """Return the pytest flag."""
        return "--quantgate" + (f"-{self.name}" if self.name else "")

    @property
    def dest(self) -> str:
        """Return the pytest dest, which is also the ini key."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def cli_dest(self) -> str:
        """Return the argparse dest of the ``quantgate`` flag."""
        return "eps" if self.name == "ep" else self.name.replace("-", "_")

    def fallback(self) -> Any:
        """Return the default value of the Settings field."""
        return self.default() if callable(self.default) else self.default

    def argparse_kwargs(self, *, pytest_side: bool) -> dict[str, Any]:
        """Return ``add_argument``/``addoption`` keywords (pytest's defaults are None: the ini decides then)."""
        kwargs: dict[str, Any] = {"help": self.help}
        if self.metavar:
            kwargs["metavar"] = self.metavar
        if self.kind == "flag":
            return {**kwargs, "action": "store_true", "default": False}
        if self.kind in ("eps", "list"):
            kwargs.update(action="append", default=None)
            if self.choices:
                kwargs.update(choices=self.choices, type=_canonical(self.choices))
            return kwargs
        convert: dict[str, Callable[[str], Any]] = {
            "int": positive_int if self.minimum == 1 else non_negative_int,
            "confidence": confidence_level,
            "gib": positive_gib,
            "shard": shard_spec,
        }
        if self.kind in convert and not (pytest_side and self.kind in ("gib", "shard")):  # ini twin: one message
            kwargs["type"] = convert[self.kind]
        if self.kind == "choice":
            kwargs.update(choices=self.choices, type=_canonical(self.choices))
        cli_default = None if self.name == "regen" else self.fallback()
        kwargs["default"] = None if pytest_side else cli_default
        return kwargs

    @property
    def ini_type(self) -> Any:
        """Return the type of the ini twin."""
        return {"flag": "bool", "eps": "linelist", "list": "linelist"}.get(self.kind)


def default_regen() -> str:
    """Return ``never`` under CI (a sidecar nobody reviewed must not be gated), else ``missing``."""
    return "never" if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes") else "missing"


# every option of a gate run, in the order --help shows them
OPTIONS: tuple[Option, ...] = (
    Option("", "enabled", "flag", "run the int8-vs-fp32 gate on the registry's entries", False, cli=False),
    Option("registry", "registry", "path", "registry JSON (default: model/registry.json under the rootdir)",
           DEFAULT_REGISTRY, metavar="PATH", cli=False),
    Option("fixtures", "fixtures_dir", "path", "folder of soak fixtures <id>.npz (default: fixtures/ under the "
           "rootdir)", DEFAULT_FIXTURES, metavar="DIR", cli=False),
    Option("select", "select", "list", "gate only entries whose id matches this glob (repeatable)", (),
           metavar="ID", cli=False),
    Option("ep", "eps", "eps", f"execution provider, repeatable: {', '.join(EP_CHOICES)} (default: auto = every "
           "available one)", ("auto",), EP_CHOICES, "EP"),
    Option("strict-ep", "strict_ep", "flag", "an EP that is asked for but unavailable is an error, not a skip",
           False),
    Option("strict", "strict", "flag", "a fixture too small to resolve the budget is an error, not a warning",
           False),
    Option("batch-size", "batch_size", "int", f"samples per run where the batch axis is dynamic (default "
           f"{DEFAULT_BATCH_SIZE})", DEFAULT_BATCH_SIZE, metavar="N",
           minimum=1),
    Option("bootstrap", "bootstrap", "int", f"bootstrap replicates for the drop's interval; 0 disables (default "
           f"{DEFAULT_BOOTSTRAP})", DEFAULT_BOOTSTRAP, metavar="N"),
    Option("seed", "seed", "int", f"seed of the bootstrap (default {DEFAULT_SEED})", DEFAULT_SEED, metavar="N"),
    Option("confidence", "confidence", "confidence", f"confidence level of the interval (default "
           f"{DEFAULT_CONFIDENCE})", DEFAULT_CONFIDENCE, metavar="LEVEL"),
    Option("decision", "decision", "choice", f"verdict rule: {' | '.join(DECISION_CHOICES)} (point: drop > budget "
           "fails; conservative: upper bound > budget fails; three-way: PASS when the interval is under the budget, "
           "FAIL when over it, else INCONCLUSIVE)", "point", DECISION_CHOICES),
    Option("sequential", "sequential", "flag", "evaluate the fixture in chunks and stop as soon as an anytime-valid "
           "confidence sequence of the drop settles PASS or FAIL (three-way verdict; the rest is not run)", False),
    Option("regen", "regen", "choice", f"rebuild sidecars: {' | '.join(REGEN_CHOICES)} (default: missing; never "
           "when CI=true)", default_regen, REGEN_CHOICES),
    Option("allow-recipes", "allow_recipes", "flag", "let regeneration run the Python qat_recipe files named in the "
           "registry (they execute with your rights)", False),
    Option("report", "report", "optional-path", "write every item's metrics, interval, verdict and provenance to "
           "this JSON file", None, metavar="PATH", cli=False),
    Option("html", "html", "optional-path", "write a self-contained HTML report with plots (plots need "
           "matplotlib)", None, metavar="PATH", cli=False),
    Option("cache", "cache", "flag", "skip items whose inputs are unchanged since they passed (pytest's cache; "
           "--cache-dir for quantgate)", False),
    Option("diagnose", "diagnose", "choice", f"where a failing item's drop comes from: {' | '.join(DIAGNOSE_CHOICES)}"
           " (auto: failed items, on the few samples where int8 departs most; always: passing items too)", "auto",
           DIAGNOSE_CHOICES),
    Option("max-fixture-gib", "max_fixture_bytes", "gib", "refuse soak fixtures whose arrays declare more than this "
           f"many GiB (default {DEFAULT_MAX_FIXTURE_GIB:g}); headers are checked before anything is allocated",
           DEFAULT_MAX_FIXTURE_GIB, metavar="GIB"),
    Option("max-samples", "max_samples", "int", MAX_SAMPLES_HELP, DEFAULT_MAX_SAMPLES, metavar="N"),
    Option("save-disagreements", "save_disagreements", "optional-path", "after measuring each entry, write "
           "DIR/<id>.<ep>.disagreements.npz: the soak samples where int8 departs most from fp32 (top-1 and threshold "
           "flips, largest errors) with their 'indices', a ready-to-use soak fixture", None, metavar="DIR"),
    Option("save-count", "save_count", "int", f"samples --quantgate-save-disagreements keeps per entry and EP "
           f"(default {DEFAULT_SAVE_COUNT})", DEFAULT_SAVE_COUNT, metavar="N", minimum=1),
    Option("shard", "shard", "shard", f"measure only part K of N of every fixture ({SHARD_FORM}) and write the "
           "mergeable state of its statistics to --quantgate-shard-dir instead of a verdict; `quantgate merge-shards` "
           "joins the N parts and decides (docs/ci.md)", None, metavar="K/N"),
    Option("shard-dir", "shard_dir", "path", f"folder the shard states are written to (default {DEFAULT_SHARD_DIR} "
           "under the rootdir)", DEFAULT_SHARD_DIR, metavar="DIR"),
    Option("cuda-device", "ep_options.cuda_device_id", "int", "CUDA device id (default 0)", 0, metavar="N"),
    Option("openvino-device", "ep_options.openvino_device", "text", "OpenVINO device_type: CPU, GPU, NPU, ... "
           "(default CPU)", "CPU", metavar="DEVICE"),
    Option("openvino-precision", "ep_options.openvino_precision", "choice", "OpenVINO inference precision: "
           f"{', '.join(OPENVINO_PRECISIONS)} (default FP32, so the fp32 baseline never runs in f16)", "FP32",
           OPENVINO_PRECISIONS),
    Option("int8-precision", "ep_options.int8_precision", "choice", INT8_PRECISION_HELP, "exact", INT8_PRECISIONS),
)


def _from_config(config: pytest.Config, o: Option) -> Any:
    """Return one option's value from the command line, else the ini file, else its default; validate it."""
    dest = o.dest
    if o.kind == "flag":
        return _flag(config, dest, dest)
    if o.kind == "int":
        return _int(config, dest, dest, o.fallback(), o.minimum)
    if o.kind == "choice":
        return _choice(config, dest, dest, o.choices, o.fallback())
    if o.kind == "path":
        return _path(config, dest, dest, o.fallback())
    if o.kind == "optional-path":
        return _optional_path(config, dest, dest)
    if o.kind == "eps":
        return _eps(config)
    if o.kind == "gib":
        return _gib(config)
    value, where = _pick(config, dest, dest)
    if o.kind == "shard":
        if value is None:
            return None
        try:
            return shard_spec(str(value))
        except argparse.ArgumentTypeError:
            raise _usage(where, value, SHARD_FORM) from None
    if o.kind == "list":
        return tuple(s for v in (value or []) for s in str(v).replace(",", " ").split())
    if o.kind == "confidence":
        if value is None:
            return o.fallback()
        try:
            return confidence_level(str(value))
        except argparse.ArgumentTypeError as exc:
            raise _usage(where, value, "a number strictly between 0.5 and 1") from exc
    return o.fallback() if value is None else value


def _from_args(ns: argparse.Namespace, o: Option) -> Any:
    """Return one option's value from parsed ``add_gate_args`` options, as the Settings field holds it."""
    value = getattr(ns, o.cli_dest, None)
    if o.kind == "eps":
        return tuple(dict.fromkeys(value or ["auto"]))
    if o.kind == "gib":
        return int(float(o.fallback() if value is None else value) * (1 << 30))
    if o.kind == "flag":
        return bool(value)
    if o.kind == "optional-path":  # relative to the folder the command runs in, as pytest's flags are
        return Path(value).resolve() if value else None
    if o.kind == "path":
        return Path(o.fallback() if value is None else value).resolve()
    return o.fallback() if value is None else value


def _build(values: dict[str, Any], **fixed: Any) -> Settings:
    """Return the Settings of field values keyed as in :data:`OPTIONS` (``ep_options.<f>`` for providers)."""
    top = {k: v for k, v in values.items() if not k.startswith("ep_options.")}
    ep = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("ep_options.")}
    ep["openvino_device"] = str(ep.get("openvino_device") or "CPU").strip().upper()
    return Settings(**top, **fixed, ep_options=EpOptions(**ep))


def resolve(config: pytest.Config) -> Settings:
    """Build the settings from the command line, the ini file and the defaults; raise UsageError on bad values."""
    return _build({o.field: _from_config(config, o) for o in OPTIONS}, threads=_worker_threads(config))


def add_pytest_options(parser: pytest.Parser) -> None:
    """Add every option to pytest, each flag with an ini twin that shares its help text."""
    group = parser.getgroup("quantgate", "quantised-model regression gate")
    for o in OPTIONS:
        group.addoption(o.flag, dest=o.dest, **o.argparse_kwargs(pytest_side=True))
        parser.addini(o.dest, help=o.help, type=o.ini_type)


# --- the command line's gate options (quantgate measure and pre-commit) ---------------------------------


def add_gate_args(parser: argparse.ArgumentParser) -> None:
    """Add the gate options that ``quantgate measure`` and ``quantgate pre-commit`` share (from :data:`OPTIONS`)."""
    for o in OPTIONS:
        if o.cli:
            parser.add_argument(f"--{o.name}", dest=o.cli_dest, **o.argparse_kwargs(pytest_side=False))
    parser.add_argument("--cache-dir", type=Path, default=Path(".quantgate-cache"), metavar="DIR",
                        help="where --cache keeps passing rows (default: .quantgate-cache)")
    parser.add_argument("--json", dest="json_out", type=writable_file, default=None, metavar="PATH",
                        help="also write every outcome as JSON")


def settings_from_args(ns: argparse.Namespace) -> Settings:
    """Build the settings of a CLI gate run from parsed ``add_gate_args`` options."""
    values = {o.field: _from_args(ns, o) for o in OPTIONS if o.cli}
    return _build(values, enabled=True, registry=ns.registry.resolve(), fixtures_dir=ns.fixtures.resolve(),
                  select=tuple(ns.ids or ()))
