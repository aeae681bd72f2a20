"""``quantgate pre-commit FILE...``: gate only the registry entries whose files a commit changes.

pre-commit passes the staged file names that match the hook's ``files`` pattern (``.onnx``, ``.npz``,
``registry.json``). An entry is gated when one of its files is among them: the fp32 model, the int8 sidecar, the
soak fixture, the calibration set, or the entry itself in a changed registry. For a changed registry the entries
are compared with ``git show HEAD:<registry>``; an entry that is new or differs in any field counts as changed, and
the schema problems of a changed registry are reported as errors. When nothing gated changed, no model runs and the
exit code is 0. Otherwise the output and exit codes are those of ``quantgate measure``: 0 pass, 1 a sidecar failed
its budget, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

from ..reporting.reports import EXIT_ERROR, EXIT_PASS, err, out, report_outcomes
from ..settings import DEFAULT_FIXTURES, DEFAULT_REGISTRY, add_gate_args, settings_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the hook's arguments: the changed files, the registry and fixtures, and measure's gate options."""
    parser.add_argument("filenames", nargs="*", type=Path, help="changed files (pre-commit passes them)")
    parser.add_argument("--registry", type=Path, default=Path(DEFAULT_REGISTRY), metavar="PATH",
                        help=f"registry JSON (default: {DEFAULT_REGISTRY})")
    parser.add_argument("--fixtures", type=Path, default=Path(DEFAULT_FIXTURES), metavar="DIR",
                        help=f"folder of soak fixtures and calibration sets (default: {DEFAULT_FIXTURES})")
    add_gate_args(parser)


def _git_head_text(path: Path) -> str | None:
    """Return the file's text at HEAD, or None when HEAD or the file there does not exist (or git fails)."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path.parent, capture_output=True,
                             text=True, check=True).stdout.strip()
        relative = path.resolve().relative_to(Path(top).resolve()).as_posix()
        shown = subprocess.run(["git", "show", f"HEAD:{relative}"], cwd=top, capture_output=True, check=True)
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None
    return shown.stdout.decode("utf-8", "replace")


def changed_entry_ids(registry_path: Path) -> set[str] | None:
    """Return the ids of entries that are new or differ from HEAD; None when HEAD has no usable registry (all new)."""
    text = _git_head_text(registry_path)
    if text is None:
        return None
    try:
        before = json.loads(text)
        old = {m["id"]: m for m in before.get("models", []) if isinstance(m, dict) and isinstance(m.get("id"), str)}
    except (json.JSONDecodeError, AttributeError, TypeError):
        return None
    now = json.loads(registry_path.read_text(encoding="utf-8"))
    changed = set()
    for raw in now.get("models", []):
        if isinstance(raw, dict) and isinstance(raw.get("id"), str) and old.get(raw["id"]) != raw:
            changed.add(raw["id"])
    return changed


def entry_files(registry: Any, entry: Any, fixtures_dir: Path) -> set[Path]:
    """Return every file an entry's verdict depends on, resolved (missing ones too: a deletion is a change)."""
    from ..errors import InputError

    files: set[Path] = set()
    for get in (lambda: [registry.fp32_path(entry)], lambda: [registry.int8_path(entry)],
                lambda: registry.soak_candidates(entry, fixtures_dir),
                lambda: registry.calibration_candidates(entry, fixtures_dir)):
        try:
            files.update(p.resolve() for p in get())
        except InputError:
            continue  # an unsafe path: the gate itself reports it when the entry runs
    return files


def _shown(path: Path) -> str:
    """Return the path relative to the working folder when it lies inside it (as pre-commit named it)."""
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def run(ns: argparse.Namespace) -> int:
    """Gate the entries touched by ``ns.filenames``; return measure's exit code (0 when nothing gated changed)."""
    from ..errors import InputError
    from ..io.registry import load_registry

    changed = {Path(f).resolve() for f in ns.filenames}
    registry_path = ns.registry.resolve()
    if not changed:
        out("quantgate pre-commit: no file given; nothing to gate")
        return EXIT_PASS
    fixtures_dir = ns.fixtures.resolve()
    registry_changed = registry_path in changed
    try:
        registry = load_registry(registry_path)
    except InputError as exc:
        err(f"quantgate: error: {exc}")
        return EXIT_ERROR
    edited = changed_entry_ids(registry_path) if registry_changed else set()
    picked: list[tuple[str, list[str]]] = []
    for entry in registry.entries:
        if not entry.gated:
            continue
        why = sorted(_shown(p) for p in entry_files(registry, entry, fixtures_dir) & changed)
        if edited is None or entry.id in edited:
            why.insert(0, f"{_shown(registry_path)} (entry changed)")
        if why:
            picked.append((entry.id, why))
    from ..records import Outcome

    problems = [Outcome(p.label, "-", "-", "error", p.message) for p in registry.problems] if registry_changed else []
    if not picked and not problems:
        out(f"quantgate pre-commit: no gated file changed ({len(changed)} file(s) checked against "
             f"{registry_path}); nothing to gate")
        return EXIT_PASS

    from ..runner.plan import plan, run

    # ns.ids and ns.registry as measure's settings expect them
    settings = settings_from_args(argparse.Namespace(**{**vars(ns), "registry": registry_path, "ids": None}))
    reasons = dict(picked)
    the_plan = plan(registry, settings, keep=lambda e: e.id in reasons, problems=False)

    def progress(index: int, total: int, entry: Any, ep: str, outcome: Outcome | None) -> None:
        if outcome is None and ep == the_plan.eps[0]:
            out(f"quantgate pre-commit: gating {entry.id} on {', '.join(the_plan.eps)} (changed: "
                f"{', '.join(reasons[entry.id])})")

    outcomes = [*problems, *run(the_plan, settings, progress=progress)]
    if not the_plan.eps:
        for entry in the_plan.entries:
            out(f"quantgate pre-commit: gating {entry.id} on no EP (changed: {', '.join(reasons[entry.id])})")
    out()
    return report_outcomes(outcomes, str(registry.path), ns.json_out)
