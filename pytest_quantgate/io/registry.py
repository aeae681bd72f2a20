"""Load and validate ``registry.json`` against the bundled JSON Schema, and resolve its paths safely.

Parsing refuses what Python's json accepts but a registry must not hold: ``NaN``, ``Infinity`` and numbers
that overflow to infinity (``1e999``), nesting too deep to walk, special files and files over
:data:`REGISTRY_MAX_BYTES`. Every failure is a :class:`RegistryError` naming the file (and line or field).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import MappingProxyType
from typing import Any

from ..errors import RegistryError
from ..fileio import read_bounded

# Budgets used when an entry has no ``quant_accuracy_budget_plcc`` (ADR-0129 for PTQ, ADR-0208 for QAT).
DEFAULT_BUDGET_PLCC = {"dynamic": 0.01, "static": 0.01, "qat": 0.002}
# Affine check (int8 regressed on fp32): |slope - 1| and |offset| / std(fp32) must stay below this. 0.1 leaves
# room for the fp32 drift of a QAT fine-tune (nr_cnn_v1: slope 1.02, offset 0.075 std) and still fails a 10 % gain
# error, let alone 0.5·y + 10.
DEFAULT_BUDGET_SLOPE = 0.1
# Dynamic sidecars compute activation ranges per batch, so their output depends on the batch they run at: the
# gate runs them at the deployment batch, 1 (one request at a time) unless the entry says otherwise.
DEFAULT_DEPLOY_BATCH = {"dynamic": 1}
# Fewer samples than this make the percentile bootstrap interval unreliable (and 1 sample has no spread at all)
DEFAULT_MIN_SAMPLES = 30
# A registry is hand-written text; 16 MiB holds some 30 000 entries and stops /dev/zero-like inputs early.
REGISTRY_MAX_BYTES = 16 * 1024 * 1024
# Ids name files (``<id>.npz`` fixtures, reports, caches such as ``<id>.<ep>.<digest>.json``): 128 bytes leave
# 127 of NAME_MAX's 255 for whatever suffix a file named after an id gets.
ID_MAX_LENGTH = 128
# Registry keys that hold paths, and the role of the file each names (for messages about overwrites).
PATH_FIELDS = {
    "onnx": "fp32 model",
    "int8_onnx": "int8 sidecar",
    "soak_fixture": "soak fixture",
    "quant_calibration_set": "calibration set",
    "qat_recipe": "QAT recipe",
}


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """Return the registry JSON Schema shipped inside the package."""
    text = resources.files("pytest_quantgate").joinpath("schema/registry.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def known_keys() -> frozenset[str]:
    """Return every entry key the schema names (the gate reads no other)."""
    return frozenset(load_schema()["$defs"]["entry"]["properties"])


@dataclass(frozen=True)
class Entry:
    """One validated registry entry, with the gate's defaults applied."""

    id: str
    index: int
    mode: str
    onnx: str
    sha256: str | None
    int8_onnx: str
    int8_sha256: str | None
    budget_plcc: float
    calibration_set: str | None = None
    soak_fixture: str | None = None
    compare: str = "output"
    residual_input: str | None = None
    target_output: str | None = None
    budget_mae: float | None = None
    budget_max_abs: float | None = None
    budget_slope: float = DEFAULT_BUDGET_SLOPE
    budget_relative: float | None = None
    min_samples: int | None = None
    channel_axis: int | None = None
    channel_axis_set: bool = False  # quant_channel_axis given (null included): else the default axis applies
    argmax_axis: int | None = None
    budget_label_flip: float | None = None
    deploy_batch: int | None = None
    explicit_budget_plcc: float | None = None
    lineage: bool = True
    qat_recipe: str | None = None
    min_speedup: float | None = None
    quant_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    # per-output rules (quant_outputs): output name -> {ignore, budget_plcc, channel_axis, argmax_axis,
    # budget_label_flip}; the entry-level keys are the defaults of every output
    outputs: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    kind: str | None = None
    description: str | None = None
    int8_onnx_explicit: bool = False  # int8_onnx given, rather than derived from onnx
    # the keys the schema does not name (project metadata such as license or notes), as written
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # the whole entry object as written, for digests of everything a verdict depends on (the cache key)
    source: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def gated(self) -> bool:
        """Return True when the entry ships an int8 sidecar the gate must check."""
        return self.mode != "fp32"

    @property
    def location(self) -> str:
        """Return the entry's JSON path in the registry, e.g. ``$.models[2]``."""
        return f"$.models[{self.index}]"

    def as_mode(self, mode: str) -> Entry:
        """Return the entry as the registry would read it with ``quant_mode`` set to ``mode``.

        The mode's defaults (budget, deploy batch) apply wherever the entry does not set them, exactly as when
        the entry is loaded, so a candidate of another mode is gated as the registry will gate it once written.
        """
        source = {**self.source, "quant_mode": mode}
        budget = self.explicit_budget_plcc if self.explicit_budget_plcc is not None else \
            DEFAULT_BUDGET_PLCC.get(mode, 0.0)
        return replace(self, mode=mode, budget_plcc=float(budget),
                       deploy_batch=source.get("quant_deploy_batch", DEFAULT_DEPLOY_BATCH.get(mode)),
                       source=MappingProxyType(source))


@dataclass(frozen=True)
class NamedFile:
    """A file a registry entry names: who names it, in which field, relative to which folder."""

    owner: str  # the entry's id, or models[i] for an entry without a usable id
    field: str  # a key of PATH_FIELDS; "int8_onnx" also for the sidecar derived from "onnx"
    relative: str
    in_fixtures: bool = False  # also looked up in the fixtures folder (soak fixtures, calibration sets)
    fp32: str | None = None  # for an int8 sidecar: the fp32 model it is built from

    @property
    def role(self) -> str:
        """Return what the file is, e.g. ``fp32 model``."""
        return PATH_FIELDS[self.field]


@dataclass(frozen=True)
class WriteGuard:
    """The files one producer run must not write over: everything the registry names in another role.

    Built by :meth:`Registry.write_guard` for one entry; :meth:`check` is called by the one function that
    publishes sidecars (``producers.provenance.publish_sidecar``) right before it writes, and before the work.
    """

    registry: Path
    writer: str  # entry id
    field: str  # the field naming the target: int8_onnx, or onnx when the sidecar name is derived from it
    protected: tuple[tuple[str, str], ...]  # (real path, "role of entry 'x' (field 'f')")

    def check(self, target: str | os.PathLike[str]) -> None:
        """Raise RegistryError when ``target`` is (or links to) a file the registry names in another role."""
        real = os.path.realpath(target)
        identity = _identity(real)
        for other, role in self.protected:
            if other == real or (identity is not None and _identity(other) == identity):
                raise RegistryError(
                    f"{self.registry}: entry {self.writer!r} field {self.field!r}: refusing to write the int8 "
                    f"sidecar {target}: that file is the {role}; give the sidecar a path of its own")


def _identity(path: str) -> tuple[int, int] | None:
    """Return (device, inode) of an existing file (catches hard links), else None."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


@dataclass(frozen=True)
class EntryProblem:
    """An entry that could not be validated; reported as an error item of its own."""

    index: int
    label: str
    message: str


@dataclass(frozen=True)
class Registry:
    """A parsed registry: its valid entries and the problems of the invalid ones."""

    path: Path
    schema_version: int
    entries: tuple[Entry, ...]
    problems: tuple[EntryProblem, ...] = ()
    # every file any entry names (valid or not), so that no writer overwrites one in another role
    named_files: tuple[NamedFile, ...] = ()

    @property
    def folder(self) -> Path:
        """Return the folder every entry path is relative to."""
        return self.path.parent

    def entry(self, entry_id: str) -> Entry:
        """Return the entry with this id or raise RegistryError."""
        for entry in self.entries:
            if entry.id == entry_id:
                return entry
        raise RegistryError(f"{self.path}: no entry with id {entry_id!r}")

    def resolve(self, entry: Entry, relative: str, field_name: str) -> Path:
        """Resolve an entry path against the registry folder, refusing absolute paths and escapes."""
        return resolve_inside(self.folder, relative, where=f"{self.path}: entry {entry.id!r} field {field_name!r}")

    def fp32_path(self, entry: Entry) -> Path:
        """Return the fp32 ONNX path of an entry."""
        return self.resolve(entry, entry.onnx, "onnx")

    def int8_path(self, entry: Entry) -> Path:
        """Return the int8 sidecar path of an entry."""
        return self.resolve(entry, entry.int8_onnx, "int8_onnx" if entry.int8_onnx_explicit else "onnx")

    def write_guard(self, entry: Entry, fixtures_dir: Path | None = None) -> WriteGuard:
        """Return the guard of the entry's sidecar: every file named in another role (its own fp32 included).

        Another entry's sidecar is protected too, unless that entry builds it from the same fp32 model (two
        entries gating one sidecar with different budgets). Paths are compared after following symlinks, and
        by inode where the file exists, so a link or a hard link to a protected file is caught as well.
        """
        own_fp32 = _real(self.folder / entry.onnx)
        own_int8 = _real(self.folder / entry.int8_onnx)
        protected: list[tuple[str, str]] = [(_real(self.path), f"registry {self.path.name} itself")]
        for named in self.named_files:
            bases = [self.folder] + ([fixtures_dir] if named.in_fixtures and fixtures_dir is not None else [])
            for base in bases:
                real = _real(base / named.relative)
                if not real:
                    continue
                if named.field == "int8_onnx" and real == own_int8 and named.fp32 is not None \
                        and _real(self.folder / named.fp32) == own_fp32:
                    continue  # this entry's own sidecar, or a twin built from the same fp32
                owner = "this entry" if named.owner == entry.id else f"entry {named.owner!r}"
                protected.append((real, f"{named.role} of {owner} (field {named.field!r})"))
        if fixtures_dir is not None:  # soak fixtures named by default after each id
            for entry_id in {n.owner for n in self.named_files}:
                real = _real(fixtures_dir / f"{entry_id}.npz")
                if real:
                    protected.append((real, f"soak fixture of entry {entry_id!r} (default {entry_id}.npz)"))
        field_name = "int8_onnx" if entry.int8_onnx_explicit else "onnx"
        return WriteGuard(self.path, entry.id, field_name, tuple(protected))

    def data_candidates(self, entry: Entry, relative: str, field_name: str, fixtures_dir: Path) -> list[Path]:
        """Return where a data file (soak fixture, calibration set) named by an entry may live, in order.

        Data paths are looked up relative to the registry folder first, then relative to the fixtures
        folder; each lookup is confined to its own base folder.
        """
        where = f"{self.path}: entry {entry.id!r} field {field_name!r}"
        found = [resolve_inside(self.folder, relative, where=where)]
        try:
            alt = resolve_inside(fixtures_dir, relative, where=where)
        except RegistryError:
            alt = None  # escaping the fixtures folder is fine as long as the registry lookup is inside
        if alt is not None and alt not in found:
            found.append(alt)
        return found

    def soak_candidates(self, entry: Entry, fixtures_dir: Path) -> list[Path]:
        """Return every place the entry's soak fixture is looked for, in order."""
        if entry.soak_fixture is not None:
            return self.data_candidates(entry, entry.soak_fixture, "soak_fixture", fixtures_dir)
        return [fixtures_dir / f"{entry.id}.npz"]

    def calibration_candidates(self, entry: Entry, fixtures_dir: Path) -> list[Path]:
        """Return every place the entry's calibration set is looked for, in order."""
        if entry.calibration_set is None:
            return []
        return self.data_candidates(entry, entry.calibration_set, "quant_calibration_set", fixtures_dir)


def _real(path: Path) -> str:
    """Return the symlink-free absolute path, or '' when it cannot be named (NUL byte, bad encoding)."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return ""


def _named_files(models: Sequence[Any]) -> tuple[NamedFile, ...]:
    """Collect every path any entry names, valid or not: a broken entry's files still must not be written over."""
    found: list[NamedFile] = []
    for index, raw in enumerate(models):
        if not isinstance(raw, dict):
            continue
        owner = raw["id"] if isinstance(raw.get("id"), str) else f"models[{index}]"
        onnx = raw.get("onnx") if isinstance(raw.get("onnx"), str) else None
        for key in PATH_FIELDS:
            value = raw.get(key)
            if key == "int8_onnx" and value is None and onnx is not None and raw.get("quant_mode", "fp32") != "fp32":
                value = str(PurePosixPath(onnx).with_suffix("")) + ".int8.onnx"
            if isinstance(value, str) and value:
                found.append(NamedFile(owner, key, value, in_fixtures=key in ("soak_fixture", "quant_calibration_set"),
                                       fp32=onnx if key == "int8_onnx" else None))
    return tuple(found)


def resolve_inside(base: Path, relative: str, *, where: str) -> Path:
    """Join ``relative`` onto ``base``; refuse absolute paths and anything (symlinks too) that leaves ``base``."""
    windows = PureWindowsPath(relative)
    if PurePosixPath(relative).is_absolute() or windows.is_absolute() or windows.drive:
        raise RegistryError(f"{where}: {relative!r} is an absolute path; paths must be relative to {base}")
    candidate = base / relative
    try:
        base_real = base.resolve()
        # resolve() follows symlinks, so a link that points outside the folder is caught here too
        real = candidate.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise RegistryError(f"{where}: {relative!r} cannot be resolved: {exc}") from None
    if not real.is_relative_to(base_real):
        raise RegistryError(f"{where}: {relative!r} resolves to {real}, outside the folder {base_real}")
    return candidate


def _json_path(parts: Sequence[Any]) -> str:
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _describe(error: Any) -> str:
    """Turn one jsonschema error into 'at <path>: <what was expected>'."""
    path = _json_path(list(error.absolute_path))
    validator = error.validator
    if validator == "required":
        missing = [m for m in error.validator_value if m not in (error.instance or {})]
        detail = f"missing required field(s) {', '.join(repr(m) for m in missing)}"
        if error.schema_path and "then" in list(error.schema_path):
            mode = (error.instance or {}).get("quant_mode")
            detail += f" (required when quant_mode is {mode!r})"
        return f"at {path}: {detail}"
    if validator == "enum":
        return f"at {path}: {error.instance!r} is not one of {', '.join(repr(v) for v in error.validator_value)}"
    if validator == "pattern":
        if "0-9a-fA-F]{64}" in error.validator_value:
            hint = "a 64-character hex sha256"
        elif "A-Za-z0-9_." in error.validator_value:
            hint = "an id of ASCII letters, digits, '_', '.' and '-' that starts with a letter or digit"
        elif "u0000" in error.validator_value:
            hint = "a path without NUL bytes"
        else:
            hint = f"to match {error.validator_value}"
        return f"at {path}: {error.instance!r} is not valid; expected {hint}"
    if validator == "maxLength":
        return f"at {path}: {len(error.instance)} characters, over the {error.validator_value} allowed"
    if validator == "type":
        return f"at {path}: expected {error.validator_value}, got {type(error.instance).__name__} {error.instance!r}"
    return f"at {path}: {error.message}"


def _unencodable_paths(raw: Mapping[str, Any], index: int) -> str:
    """Return why path fields cannot name a file on this system (lone surrogates, say), or '' when they can."""
    found = []
    for key in PATH_FIELDS:
        value = raw.get(key)
        if isinstance(value, str):
            try:
                os.fsencode(value)
            except UnicodeError:
                found.append(f"at $.models[{index}].{key}: {value!r} cannot be encoded as a file name")
    return "; ".join(found)


def _entry_from(raw: Mapping[str, Any], index: int) -> Entry:
    mode = raw.get("quant_mode", "fp32")
    onnx = raw["onnx"]
    default_int8 = str(PurePosixPath(onnx).with_suffix("")) + ".int8.onnx"
    budget = raw.get("quant_accuracy_budget_plcc", DEFAULT_BUDGET_PLCC.get(mode, 0.0))
    return Entry(
        id=raw["id"],
        index=index,
        mode=mode,
        onnx=onnx,
        sha256=raw.get("sha256"),
        int8_onnx=raw.get("int8_onnx", default_int8),
        int8_sha256=raw.get("int8_sha256"),
        budget_plcc=float(budget),
        calibration_set=raw.get("quant_calibration_set"),
        soak_fixture=raw.get("soak_fixture"),
        compare=raw.get("quant_compare", "output"),
        residual_input=raw.get("quant_residual_input"),
        target_output=raw.get("quant_target_output"),
        budget_mae=raw.get("quant_budget_mae"),
        budget_max_abs=raw.get("quant_budget_max_abs"),
        budget_slope=float(raw.get("quant_budget_slope", DEFAULT_BUDGET_SLOPE)),
        budget_relative=raw.get("quant_budget_relative"),
        min_samples=raw.get("quant_min_samples"),
        channel_axis=raw.get("quant_channel_axis"),
        channel_axis_set="quant_channel_axis" in raw,
        argmax_axis=raw.get("quant_argmax_axis"),
        budget_label_flip=raw.get("quant_budget_label_flip"),
        deploy_batch=raw.get("quant_deploy_batch", DEFAULT_DEPLOY_BATCH.get(mode)),
        explicit_budget_plcc=raw.get("quant_accuracy_budget_plcc"),
        lineage=bool(raw.get("quant_lineage", True)),
        qat_recipe=raw.get("qat_recipe"),
        min_speedup=raw.get("quant_min_speedup"),
        quant_options=MappingProxyType(dict(raw.get("quant_options", {}))),
        outputs=MappingProxyType({k: MappingProxyType(dict(v)) for k, v in raw.get("quant_outputs", {}).items()}),
        kind=raw.get("kind"),
        description=raw.get("description"),
        int8_onnx_explicit="int8_onnx" in raw,
        raw=MappingProxyType({k: v for k, v in raw.items() if k not in known_keys()}),
        source=MappingProxyType(dict(raw)),
    )


def entry_from_source(raw: Mapping[str, Any], index: int) -> Entry:
    """Return the entry of a validated entry object as written (``Entry.source``), e.g. kept in a shard state."""
    return _entry_from(raw, index)


def parse_registry(data: Any, path: Path) -> Registry:
    """Validate parsed JSON; whole-file problems raise, per-entry problems are collected."""
    import jsonschema

    schema = load_schema()
    top_schema = {k: v for k, v in schema.items() if k != "properties"}
    top_schema["properties"] = {**schema["properties"], "models": {"type": "array"}}
    validator_cls = jsonschema.Draft202012Validator
    top_errors = sorted(validator_cls(top_schema).iter_errors(data), key=lambda e: list(e.absolute_path))
    if top_errors:
        details = "; ".join(_describe(e) for e in top_errors)
        raise RegistryError(f"{path}: not a valid registry: {details}")

    entry_schema = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/entry"}
    entry_validator = validator_cls(entry_schema)
    entries: list[Entry] = []
    problems: list[EntryProblem] = []
    seen: dict[str, list[int]] = {}
    for index, raw in enumerate(data["models"]):
        label = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
        errors = sorted(entry_validator.iter_errors(raw), key=lambda e: (list(e.absolute_path), e.validator))
        if errors:
            shown = label or f"models[{index}]"
            # dict.fromkeys: jsonschema reports one "required" error per missing key, each naming all of them
            details = "; ".join(dict.fromkeys(_describe(e).replace("at $", f"at $.models[{index}]", 1)
                                              for e in errors))
            problems.append(EntryProblem(index, shown, f"{path}: entry {shown!r} is invalid: {details}"))
            continue
        bad_paths = _unencodable_paths(raw, index)
        if bad_paths:
            problems.append(EntryProblem(index, raw["id"], f"{path}: entry {raw['id']!r} is invalid: {bad_paths}"))
            continue
        seen.setdefault(raw["id"], []).append(index)
        entries.append(_entry_from(raw, index))

    duplicates = {eid: idx for eid, idx in seen.items() if len(idx) > 1}
    if duplicates:
        kept = []
        for entry in entries:
            if entry.id in duplicates:
                where = ", ".join(f"$.models[{i}]" for i in duplicates[entry.id])
                problems.append(
                    EntryProblem(
                        entry.index,
                        f"{entry.id}@models[{entry.index}]",
                        f"{path}: duplicate id {entry.id!r} at {where}; ids must be unique",
                    )
                )
            else:
                kept.append(entry)
        entries = kept
    return Registry(
        path=path,
        schema_version=data["schema_version"],
        entries=tuple(sorted(entries, key=lambda e: e.id)),
        problems=tuple(sorted(problems, key=lambda p: (p.label, p.index))),
        named_files=_named_files(data["models"]),
    )


def load_registry(path: str | Path) -> Registry:
    """Read, parse and validate a registry file; raise RegistryError for whole-file problems."""
    return load_registry_text(path)[0]


def load_registry_text(path: str | Path) -> tuple[Registry, str]:
    """Return the validated registry and the exact text it was parsed from (one read: what pin edits)."""
    path = Path(path)
    text = read_registry_text(path)
    data = parse_json_text(text, path)
    try:
        return parse_registry(data, path), text
    except RecursionError:  # a schema walk too deep; _check_depth makes this unreachable for parsed files
        raise RegistryError(f"{path}: nested too deeply to validate") from None


def read_registry_text(path: Path) -> str:
    """Return the text of a registry file: a regular file of at most REGISTRY_MAX_BYTES, UTF-8."""
    raw = read_bounded(path, REGISTRY_MAX_BYTES, "registry file", RegistryError)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{path}: the registry is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def parse_json_text(text: str, path: Path) -> Any:
    """Parse registry JSON text; refuse non-finite numbers and nesting deeper than MAX_JSON_DEPTH."""
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NonFinite as exc:
        raise RegistryError(f"{path}:{_where_token(text, exc.token)}: {exc.token} is not a finite number; "
                            "budgets and options must be finite JSON numbers") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from None
    except RecursionError:
        raise RegistryError(f"{path}: malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # e.g. an integer literal over Python's 4300-digit limit
        raise RegistryError(f"{path}: malformed JSON: {exc}") from None
    _check_depth(data, path)
    return data


# Real registries are five levels deep (root, models, entry, quant_options, a list); 32 is generous and keeps
# every later walk (schema validation, digests, reports) far from Python's recursion limit.
MAX_JSON_DEPTH = 32


class _NonFinite(ValueError):
    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.token = token


def _refuse_constant(token: str) -> Any:
    raise _NonFinite(token)


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # 1e999 overflows to inf
        raise _NonFinite(token)
    return value


def _where_token(text: str, token: str) -> str:
    """Return ``line:col`` (and the key it belongs to) of the first ``token`` outside a JSON string."""
    in_string = escaped = False
    for pos, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif text.startswith(token, pos) and (pos == 0 or text[pos - 1] not in "0123456789.eE+-"):
            line = text.count("\n", 0, pos) + 1
            col = pos - (text.rfind("\n", 0, pos) + 1) + 1
            key = _key_before(text, pos)
            return f"{line}:{col}" + (f": field {key!r}" if key else "")
    return "?"


def _key_before(text: str, pos: int) -> str | None:
    import re

    match = re.search(r'"((?:[^"\\]|\\.)*)"\s*:\s*-?$', text[max(0, pos - 2000) : pos])
    if match is None:
        return None
    try:
        key: str = json.loads(f'"{match.group(1)}"')
    except ValueError:
        return None
    return key


def _check_depth(data: Any, path: Path) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH, walking iteratively (no recursion to overflow)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RegistryError(f"{path}: malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _members(text: str, start: int, decoder: json.JSONDecoder) -> tuple[dict[str, tuple[int, int, int]], int]:
    """Return the members of the JSON object at ``start``: key -> (key start, value start, value end), and its end.

    Strings are scanned by json's own scanner, so keys and values holding quotes, backslashes or unicode
    escapes are read exactly; a key given twice maps to its last occurrence, the one json.loads keeps.
    """
    from json.decoder import scanstring  # type: ignore[attr-defined]  # not in typeshed

    members: dict[str, tuple[int, int, int]] = {}
    pos = _skip_ws(text, start + 1)
    if text[pos] == "}":
        return members, pos + 1
    while True:
        key_start = pos
        key, pos = scanstring(text, pos + 1)
        pos = _skip_ws(text, pos) + 1  # the colon
        value_start = _skip_ws(text, pos)
        _, value_end = decoder.raw_decode(text, value_start)
        members[key] = (key_start, value_start, value_end)
        pos = _skip_ws(text, value_end)
        if text[pos] == "}":
            return members, pos + 1
        pos = _skip_ws(text, pos + 1)  # the comma


def entry_spans(text: str) -> list[tuple[int, int]]:
    """Return the (start, end) offsets of every object in the root's ``models`` array."""
    decoder = json.JSONDecoder()
    return [(start, decoder.raw_decode(text, start)[1]) for start, _ in _entry_objects(text)]


def _entry_objects(text: str) -> list[tuple[int, dict[str, tuple[int, int, int]]]]:
    """Return (start, members) of every object in the root's ``models`` array."""
    decoder = json.JSONDecoder()
    root = _skip_ws(text, 0)
    members, _ = _members(text, root, decoder)
    if "models" not in members:
        return []
    pos = _skip_ws(text, members["models"][1] + 1)
    found = []
    while pos < len(text) and text[pos] != "]":
        if text[pos] == "{":
            entry, end = _members(text, pos, decoder)
            found.append((pos, entry))
        else:
            _, end = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, end)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return found


def _indent(text: str, key_start: int) -> str | None:
    """Return the whitespace before a key on its line, or None when the key does not start its line."""
    line_start = text.rfind("\n", 0, key_start)
    indent = text[line_start + 1 : key_start]
    return indent if line_start >= 0 and not indent.strip() else None


def _encoded(value: Any, indent: str | None, step: str = "  ") -> str:
    """Return a field's JSON value: objects over several lines under an indented key, else on one line."""
    if not isinstance(value, Mapping) or indent is None:
        return json.dumps(value, sort_keys=True)
    return json.dumps(value, sort_keys=True, indent=step).replace("\n", "\n" + indent)


def _indent_step(text: str) -> str:
    """Return the file's own indentation step (the first indented line's leading whitespace), else two spaces."""
    import re

    found = re.search(r"\n([ \t]+)\S", text)
    return found.group(1) if found else "  "


def _value_edits(text: str, start: int, end: int, value: Any, indent: str | None,
                 step: str) -> list[tuple[int, int, str]]:
    """Return the edits that turn the JSON value at text[start:end] into ``value``, keeping what is unchanged.

    An object replacing an object is edited member by member (recursively), so a build record re-pinned after
    a rebuild changes only the lines that differ, in the file's own layout; anything else is replaced whole.
    """
    old = json.loads(text[start:end])
    if old == value:
        return []
    if not (isinstance(value, Mapping) and isinstance(old, dict)) or set(old) - set(value) or not old:
        return [(start, end, _encoded(value, indent, step))]
    members, _ = _members(text, start, json.JSONDecoder())
    edits: list[tuple[int, int, str]] = []
    for key, new in value.items():
        if key in members:
            key_start, value_start, value_end = members[key]
            edits.extend(_value_edits(text, value_start, value_end, new, _indent(text, key_start), step))
            continue
        last_key, _, last_end = max(members.values(), key=lambda m: m[2])
        inner = _indent(text, last_key)
        sep = f",\n{inner}" if inner is not None else ", "
        edits.append((last_end, last_end, f"{sep}{json.dumps(key)}: {_encoded(new, inner, step)}"))
    return edits


def pin_text(text: str, updates: Mapping[str, Mapping[str, Any]], path: Path) -> str:
    """Return the registry text with hash fields set, keeping the file's formatting and key order.

    ``updates`` maps entry id -> {field: JSON value}. A missing hash is inserted right after the entry's ``onnx``,
    a missing object (``int8_build``) after its last field.
    Any valid JSON is handled (escaped quotes and unicode escapes in names, keys given twice); the result is
    checked to differ from the input by exactly the requested fields.
    """
    try:
        objects = _entry_objects(text)
    except (ValueError, IndexError) as exc:
        raise RegistryError(f"{path}: cannot locate the entries to pin: {exc}") from None
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), applied from the back
    pending = {k: dict(v) for k, v in updates.items()}
    step = _indent_step(text)
    for _, members in objects:
        if "id" not in members:
            continue
        _, id_start, id_end = members["id"]
        entry_id = json.loads(text[id_start:id_end])
        if not isinstance(entry_id, str) or entry_id not in pending:
            continue
        for key, value in pending.pop(entry_id).items():
            if key in members:
                key_start, value_start, value_end = members[key]
                edits.extend(_value_edits(text, value_start, value_end, value, _indent(text, key_start), step))
                continue
            if "onnx" not in members:
                raise RegistryError(f"{path}: entry {entry_id!r}: cannot find where to insert {key!r}")
            # hashes go right after "onnx" (where a reader looks for them); an object (a build record) goes
            # last, so the entry's own settings stay together at the top
            anchor = max(members, key=lambda k: members[k][2]) if isinstance(value, Mapping) else "onnx"
            key_start, _, anchor_end = members[anchor]
            line_start = text.rfind("\n", 0, key_start)
            indent = text[line_start + 1 : key_start] if line_start >= 0 else ""
            multiline = line_start >= 0 and not indent.strip()
            sep = f",\n{indent}" if multiline else ", "
            encoded = _encoded(value, indent if multiline else None, step)
            edits.append((anchor_end, anchor_end, f"{sep}{json.dumps(key)}: {encoded}"))
    if pending:
        raise RegistryError(f"{path}: no entry with id {', '.join(repr(k) for k in pending)}")
    result = text
    for start, end, replacement in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        result = result[:start] + replacement + result[end:]
    # the edit must change exactly the requested fields and nothing else
    before, after = json.loads(text), json.loads(result)
    for raw in before["models"]:
        if isinstance(raw, dict) and raw.get("id") in updates:
            raw.update(updates[raw["id"]])
    if before != after:
        raise RegistryError(f"{path}: pinning would change more than the hash fields; edit the file by hand")
    return result
