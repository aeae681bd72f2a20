"""Load and validate ``registry.json`` against the bundled JSON Schema, and resolve its paths safely."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .errors import RegistryError

# Budgets used when an entry has no ``quant_accuracy_budget_plcc`` (ADR-0129 for PTQ, ADR-0208 for QAT).
DEFAULT_BUDGET_PLCC = {"dynamic": 0.01, "static": 0.01, "qat": 0.002}
# Affine check (int8 regressed on fp32): |slope - 1| and |offset| / std(fp32) must stay below this. 0.1 leaves
# room for the fp32 drift of a QAT fine-tune (nr_cnn_v1: slope 1.02, offset 0.075 std) and still fails a 10 % gain
# error, let alone 0.5·y + 10.
DEFAULT_BUDGET_SLOPE = 0.1
QUANT_MODES = ("fp32", "static", "dynamic", "qat")
# Dynamic sidecars compute activation ranges per batch, so their output depends on the batch they run at: the
# gate runs them at the deployment batch, 1 (one request at a time) unless the entry says otherwise.
DEFAULT_DEPLOY_BATCH = {"dynamic": 1}
# Fewer samples than this make the percentile bootstrap interval unreliable (and 1 sample has no spread at all)
DEFAULT_MIN_SAMPLES = 30


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """Return the registry JSON Schema shipped inside the package."""
    text = resources.files("pytest_quantgate").joinpath("schema/registry.schema.json").read_text("utf-8")
    return json.loads(text)


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
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def gated(self) -> bool:
        """Return True when the entry ships an int8 sidecar the gate must check."""
        return self.mode != "fp32"

    @property
    def location(self) -> str:
        """Return the entry's JSON path in the registry, e.g. ``$.models[2]``."""
        return f"$.models[{self.index}]"


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
        return self.resolve(entry, entry.int8_onnx, "int8_onnx" if "int8_onnx" in entry.raw else "onnx")

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


def resolve_inside(base: Path, relative: str, *, where: str) -> Path:
    """Join ``relative`` onto ``base``; refuse absolute paths and anything (symlinks too) that leaves ``base``."""
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or PureWindowsPath(relative).drive:
        raise RegistryError(f"{where}: {relative!r} is an absolute path; paths must be relative to {base}")
    base_real = base.resolve()
    candidate = base / relative
    # resolve() follows symlinks, so a link that points outside the folder is caught here too
    real = candidate.resolve()
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
        hint = "a 64-character hex sha256" if "0-9a-fA-F]{64}" in error.validator_value else f"to match {error.validator_value}"
        return f"at {path}: {error.instance!r} is not valid; expected {hint}"
    if validator == "type":
        return f"at {path}: expected {error.validator_value}, got {type(error.instance).__name__} {error.instance!r}"
    return f"at {path}: {error.message}"


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
        raw=raw,
    )


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
            details = "; ".join(_describe(e).replace("at $", f"at $.models[{index}]", 1) for e in errors)
            problems.append(EntryProblem(index, shown, f"{path}: entry {shown!r} is invalid: {details}"))
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
    )


def load_registry(path: str | Path) -> Registry:
    """Read, parse and validate a registry file; raise RegistryError for whole-file problems."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"{path}: registry file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read the registry: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from None
    return parse_registry(data, path)


def _entry_spans(text: str) -> list[tuple[int, int]]:
    """Return the (start, end) offsets of every object two levels deep (the entries of ``models``)."""
    spans: list[tuple[int, int]] = []
    depth = 0
    start = -1
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
        elif char in "{[":
            depth += 1
            if char == "{" and depth == 3:  # root object, models array, entry object
                start = pos
        elif char in "}]":
            if char == "}" and depth == 3 and start >= 0:
                spans.append((start, pos + 1))
                start = -1
            depth -= 1
    return spans


def pin_text(text: str, updates: Mapping[str, Mapping[str, str]], path: Path) -> str:
    """Return the registry text with hash fields set, keeping the file's formatting and key order.

    ``updates`` maps entry id -> {field: value}. A missing field is inserted right after the entry's ``onnx``.
    """
    import re

    pending = {k: dict(v) for k, v in updates.items()}
    pieces: list[str] = []
    last = 0
    for start, end in _entry_spans(text):
        body = text[start:end]
        try:
            entry_id = json.loads(body).get("id")
        except (json.JSONDecodeError, AttributeError):
            continue
        if entry_id not in pending:
            continue
        for key, value in pending.pop(entry_id).items():
            pattern = re.compile(r'("%s"\s*:\s*)"[^"]*"' % re.escape(key))
            if pattern.search(body):
                body = pattern.sub(lambda m, v=value: f'{m.group(1)}"{v}"', body, count=1)
                continue
            anchor = re.search(r'"onnx"\s*:\s*"[^"]*"', body)
            if anchor is None:
                raise RegistryError(f"{path}: entry {entry_id!r}: cannot find where to insert {key!r}")
            line_start = body.rfind("\n", 0, anchor.start())
            indent = body[line_start + 1 : anchor.start()] if line_start >= 0 else ""
            sep = f",\n{indent}" if line_start >= 0 and not indent.strip() else ", "
            body = f'{body[: anchor.end()]}{sep}"{key}": "{value}"{body[anchor.end():]}'
        pieces.append(text[last:start])
        pieces.append(body)
        last = end
    pieces.append(text[last:])
    if pending:
        raise RegistryError(f"{path}: no entry with id {', '.join(repr(k) for k in pending)}")
    result = "".join(pieces)
    # the edit must change exactly the requested fields and nothing else
    before, after = json.loads(text), json.loads(result)
    for raw in before["models"]:
        if isinstance(raw, dict) and raw.get("id") in updates:
            raw.update(updates[raw["id"]])
    if before != after:
        raise RegistryError(f"{path}: pinning would change more than the hash fields; edit the file by hand")
    return result
