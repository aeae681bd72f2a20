"""The ``quantgate`` command line: producers, the gate outside pytest, registry validation and pinning.

Exit codes of ``measure`` and ``validate``: 0 pass, 1 a sidecar failed its budget, 2 bad input or usage, 5
nothing to gate (like pytest's "no tests collected").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import InputError, WriteError
from ..fileio import creatable_file, writable_file
from ..reporting.reports import EXIT_ERROR, EXIT_NOTHING, EXIT_PASS, report_outcomes
from ..reporting.reports import err as _err
from ..reporting.reports import out as _out
from ..settings import (
    DEFAULT_FIXTURES,
    DEFAULT_REGISTRY,
    add_gate_args,
    non_negative_int,
    positive_int,
    settings_from_args,
)

# --- shared option groups ---------------------------------------------------------------------------------


def _add_registry_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("registry", nargs="?", default=DEFAULT_REGISTRY, type=Path,
                        help=f"registry JSON (default: {DEFAULT_REGISTRY})")
    parser.add_argument("--fixtures", type=Path, default=Path(DEFAULT_FIXTURES), metavar="DIR",
                        help=f"folder of soak fixtures and calibration sets (default: {DEFAULT_FIXTURES})")
    parser.add_argument("--id", dest="ids", action="append", default=None, metavar="ID",
                        help="only entries whose id matches this glob (repeatable)")


def _load(ns: argparse.Namespace) -> Any:
    from ..io.registry import load_registry

    return load_registry(ns.registry)


def _selected(registry: Any, ids: Sequence[str] | None) -> list[Any]:
    """Return the entries ``--id`` selects (fp32 ones too: validate and pin cover them), or raise naming the typo."""
    from ..runner.plan import select

    return select(registry, ids, "--id")[0]


# --- measure --------------------------------------------------------------------------------------------


def cmd_measure(ns: argparse.Namespace) -> int:
    """Gate every selected entry on every EP; print reports and the summary table."""
    from ..records import Outcome
    from ..runner.plan import plan, run

    settings = settings_from_args(ns)
    try:
        the_plan = plan(_load(ns), settings, ns.ids, "--id")
    except InputError as exc:
        _err(f"quantgate: error: {exc}")
        return EXIT_ERROR
    registry = the_plan.registry
    if not the_plan.entries and not the_plan.problems:
        # like pytest's "no tests collected" (exit 5): a gate that gated nothing must not look like a pass
        _err(f"quantgate: {registry.path}: no gated entry selected (fp32 entries are not gated); nothing to measure")
        return EXIT_NOTHING
    import time
    import uuid

    cache = None
    if ns.cache:
        from ..runner.cache import FolderCache  # it imports pytest (~0.1 s): only when asked for

        cache = FolderCache(ns.cache_dir.resolve())
    started = [0.0]

    def progress(index: int, total: int, entry: Any, ep: str, outcome: Outcome | None) -> None:
        # on stderr: large fixtures and QAT regeneration take minutes, the report stays on stdout
        if outcome is None:
            _err(f"quantgate: [{index}/{total}] {entry.id} [{ep}] ...")
            started[0] = time.perf_counter()
            return
        quiet = f"; {outcome.log[0]}" if outcome.log else ""
        _err(f"quantgate: {entry.id} [{ep}] {outcome.status.upper()} in {time.perf_counter() - started[0]:.1f} s"
             f"{quiet}")
        for note in outcome.notes:  # the rebuilt sidecar's note is in the summary already
            if note != outcome.regenerated:
                _err(f"quantgate: {entry.id} [{ep}]: {note}")

    outcomes = run(the_plan, settings, run_id=uuid.uuid4().hex, cache=cache, progress=progress)
    return report_outcomes(outcomes, str(registry.path), ns.json_out)


# --- merge-shards ---------------------------------------------------------------------------------------


def cmd_merge_shards(ns: argparse.Namespace) -> int:
    """Join the shard states of sharded runs and decide each (entry, EP) as measure would (exit 0 / 1 / 2)."""
    from ..runner.shards import merge_states, size_text

    try:
        outcomes, registry = merge_states(ns.states)
    except InputError as exc:
        _err(f"quantgate: error: {exc}")
        return EXIT_ERROR
    total = sum(Path(path).stat().st_size for path in ns.states)
    _err(f"quantgate: merged {len(ns.states)} shard state(s) ({size_text(total)}) into {len(outcomes)} verdict(s)")
    return report_outcomes(outcomes, registry, ns.json_out)


# --- validate -------------------------------------------------------------------------------------------


def _check_model(registry: Any, entry: Any, role: str, pinned: str | None, field: str) -> None:
    """Run the gate's checks on one model file of an entry: present, parseable, confined, hash as pinned."""
    from ..runner.gate import check_hash, check_model_file

    path = registry.fp32_path(entry) if role == "fp32" else registry.int8_path(entry)
    check_model_file(path, role, entry, registry)
    check_hash(path, pinned, field, entry, registry)


def cmd_validate(ns: argparse.Namespace) -> int:
    """Check the schema, that every file exists and is readable, and every pinned hash matches; run nothing."""
    from ..io.soak import find_fixture
    from ..producers.dispatch import calibration_set

    try:
        registry = _load(ns)
        entries = _selected(registry, ns.ids)
    except InputError as exc:
        _err(f"quantgate: error: {exc}")
        return EXIT_ERROR
    fixtures = ns.fixtures.resolve()
    problems = [p.message for p in registry.problems]
    for entry in entries:
        # the gate's own checks, one problem per file, so one bad file does not hide the next
        steps: list[tuple[Any, ...]] = [(_check_model, registry, entry, "fp32", entry.sha256, "sha256")]
        if entry.gated:
            steps += [(_check_model, registry, entry, "int8", entry.int8_sha256, "int8_sha256"),
                      # soak_candidates itself refuses escaping paths: resolve it inside the try too
                      (lambda e=entry: find_fixture(registry.soak_candidates(e, fixtures)),)]
        if entry.mode == "static":
            steps.append((calibration_set, registry, entry, fixtures))
        for check, *args in steps:
            try:
                check(*args)
            except InputError as exc:
                problems.append(str(exc))
    for problem in problems:
        _out(f"quantgate ERROR: {problem}")
    _out(f"{registry.path}: {len(entries)} entries, {len(problems)} problem(s)")
    return EXIT_ERROR if problems else EXIT_PASS


# --- pin ------------------------------------------------------------------------------------------------


# a pin hashes a few files and rewrites a small text file; waiting longer than this means a stuck process
PIN_LOCK_TIMEOUT_S = 120.0


def cmd_pin(ns: argparse.Namespace) -> int:
    """Write the current sha256 of each selected entry's files into the registry, keeping its formatting.

    Concurrent pins serialise on a file lock and each re-reads the registry under it, so none is lost. A
    symlinked registry is written through to its target (the link stays a link), atomically.
    """
    import os

    from filelock import FileLock, Timeout

    from ..fileio import atomic_write_text, lock_path_for, sha256_file, sweep_partials
    from ..io.registry import load_registry_text, pin_text

    target = Path(os.path.realpath(ns.registry))
    try:
        load_registry_text(ns.registry)  # refuse a missing, special or malformed file before taking the lock
        sweep_partials(target.parent)
        with FileLock(str(lock_path_for(target)), timeout=PIN_LOCK_TIMEOUT_S):
            registry, text = load_registry_text(target)  # re-read under the lock: the last pin's edits count
            updates: dict[str, dict[str, Any]] = {}
            for entry in _selected(registry, ns.ids):
                fields: dict[str, str] = {}
                fp32 = registry.fp32_path(entry)
                if fp32.is_file():
                    fields["sha256"] = sha256_file(fp32)
                if entry.gated and registry.int8_path(entry).is_file():
                    fields["int8_sha256"] = sha256_file(registry.int8_path(entry))
                changed: dict[str, Any] = {k: v for k, v in fields.items()
                                           if (getattr(entry, k) or "").lower() != v}
                for key, value in changed.items():
                    _out(f"{entry.id}: {key} {getattr(entry, key) or '(none)'} -> {value}")
                build = _pinned_build(registry, entry)
                if build != entry.source.get("int8_build", _ABSENT) and (build is not None
                                                                          or "int8_build" in entry.source):
                    changed["int8_build"] = build
                    _out(f"{entry.id}: int8_build {_describe_build(build)}")
                if changed:
                    updates[entry.id] = changed
            if not updates:
                _out(f"{ns.registry}: every selected hash is already pinned")
                return EXIT_PASS
            atomic_write_text(target, pin_text(text, updates, target), "registry")
    except Timeout:
        _err(f"quantgate: error: {ns.registry}: another process has held the pin lock {lock_path_for(target)} "
             f"for {PIN_LOCK_TIMEOUT_S:g} s")
        return EXIT_ERROR
    except InputError as exc:
        _err(f"quantgate: error: {exc}")
        return EXIT_ERROR
    except OSError as exc:
        _err(f"quantgate: error: {ns.registry}: cannot write the registry: {exc.strerror or exc}")
        return EXIT_ERROR
    hashes = sum(len(set(v) - {"int8_build"}) for v in updates.values())
    builds = sum("int8_build" in v for v in updates.values())
    _out(f"{ns.registry}: pinned {hashes} hash(es)" + (f" and {builds} build record(s)" if builds else ""))
    return EXIT_PASS


_ABSENT = object()


def _pinned_build(registry: Any, entry: Any) -> dict[str, Any] | None:
    """Return what the entry's sidecar records of its build, for the registry's ``int8_build`` (None: nothing)."""
    from ..producers.build import pinned_build
    from ..producers.provenance import read_provenance

    sidecar = registry.int8_path(entry)
    if not entry.gated or not sidecar.is_file():
        return None
    return pinned_build(read_provenance(sidecar))


def _describe_build(build: dict[str, Any] | None) -> str:
    """Return one line about a pinned build record."""
    if build is None:
        return "removed (the sidecar records no build)"
    text = f"{build['producer']}, reproducible: {build['reproducible']}"
    environment = build.get("environment") or {}
    if environment:
        text += f" (torch {environment.get('torch_cpu_capability')}, {environment.get('cpu_vendor')})"
    gate = build.get("gate") or {}
    if isinstance(gate.get("drop"), (int, float)):
        text += f", build-time drop {gate['drop']:.6f}"
    return text


# --- producers ------------------------------------------------------------------------------------------


def _produce_file(ns: argparse.Namespace, mode: str) -> int:
    """Run one producer on an ONNX file (``MODEL.onnx``) or on a registry entry (``registry.json --id ID``)."""
    from ..engine.logcapture import CapturedLogs, capture_logs
    from ..producers.base import ProducerError

    source = Path(ns.source)
    captured: CapturedLogs | None = None
    try:
        if source.suffix == ".json":
            return _produce_registry(ns, mode)
        output = Path(ns.output) if ns.output else source.with_name(source.name.removesuffix(".onnx") + ".int8.onnx")
        from ..producers import ptq_dynamic, ptq_static

        config: Any
        fn: Any
        if mode == "dynamic":
            config, fn = ptq_dynamic.config_from_args(ns), ptq_dynamic.quantize_dynamic
        else:
            config, fn = ptq_static.config_from_args(ns), ptq_static.quantize_static
        # onnxruntime's tooling logs the same advice and warnings many times: caught here, summarised once
        with capture_logs() as captured:
            result = fn(source, output, config)
    except (ProducerError, InputError, ValueError, TypeError) as exc:
        _print_logs(captured)
        _err(f"quantgate: error: {exc}")
        return EXIT_ERROR
    _print_logs(captured)
    _out(f"wrote {result.int8_path}")
    _out(f"provenance {result.provenance_path}")
    _out(f"int8_sha256 {result.sha256}")
    return EXIT_PASS


def _print_logs(captured: Any) -> None:
    """Print the summary of what onnxruntime and friends logged during a step (nothing when they were quiet)."""
    if captured is not None:
        for line in captured.summary().lines():
            _err(line)


def _produce_registry(ns: argparse.Namespace, mode: str) -> int:
    from ..engine.logcapture import capture_logs
    from ..io.registry import load_registry
    from ..producers.dispatch import produce
    from ..runner.gate import assessor

    registry = load_registry(getattr(ns, "source", None) or ns.registry)
    entries = _selected(registry, ns.ids)
    picked = [e for e in entries if e.mode == mode]
    if not picked:
        _err(f"quantgate: error: no selected entry of {registry.path} has quant_mode {mode!r}")
        return EXIT_ERROR
    overrides = _explicit_overrides(ns)
    for entry in picked:
        captured = None
        try:
            with capture_logs() as captured:
                result = produce(registry, entry, ns.fixtures.resolve(),
                                 allow_recipes=getattr(ns, "allow_recipes", False), progress=_out, overrides=overrides,
                                 assess=assessor(registry, entry, ns.fixtures.resolve()))
        except WriteError as exc:  # the file names the sidecar; the entry says which one of the registry
            raise WriteError(f"{registry.path}: entry {entry.id!r}: {exc}") from None
        finally:
            _print_logs(captured)
        _out(f"{entry.id}: wrote {result.int8_path}")
        _out(f"{entry.id}: int8_sha256 {result.sha256} (pin with `quantgate pin {registry.path} --id {entry.id}`)")
    return EXIT_PASS


def _explicit_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """Return the producer options given on the command line (None means 'not given')."""
    skip = {"command", "source", "registry", "output", "fixtures", "ids", "allow_recipes", "func", "calibration_set"}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(ns).items()
            if k not in skip and v is not None}


def cmd_ptq_dynamic(ns: argparse.Namespace) -> int:
    """Dynamic PTQ."""
    return _produce_file(ns, "dynamic")


def cmd_ptq_static(ns: argparse.Namespace) -> int:
    """Static PTQ."""
    if Path(ns.source).suffix != ".json" and ns.calibration_set is None:
        _err("quantgate ptq-static: error: --calibration-set is required for an ONNX file")
        return EXIT_ERROR
    return _produce_file(ns, "static")


def cmd_qat(ns: argparse.Namespace) -> int:
    """QAT (two-step bridge or pt2e) for registry entries with a recipe."""
    from ..producers.base import ProducerError

    try:
        return _produce_registry(ns, "qat")
    except (ProducerError, InputError) as exc:
        _err(f"quantgate: error: {exc}")
        return EXIT_ERROR


def cmd_advise(ns: argparse.Namespace) -> int:
    """Build candidates in escalation order, gate each, keep the cheapest passing one (exit 0 / 1 / 2)."""
    from .advise import run_command

    return run_command(ns, settings_from_args(ns), _out, _err)


def cmd_report_merge(ns: argparse.Namespace) -> int:
    """Merge the JSON reports of separate EP jobs into one model × EP table (exit 0 / 1 / 2)."""
    from ..reporting.merge import run_command

    return run_command(ns.reports, ns.json_out, ns.html_out, ns.step_summary, _out, _err)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="quantgate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("measure", help="gate the registry outside pytest (exit 0 pass, 1 fail, 2 error)")
    _add_registry_args(p)
    add_gate_args(p)
    p.set_defaults(func=cmd_measure)

    from . import precommit

    p = sub.add_parser("pre-commit", help="gate only the entries whose files changed (for pre-commit hooks)")
    precommit.add_arguments(p)
    p.set_defaults(func=precommit.run)

    p = sub.add_parser("merge-shards", help="join the states of `measure --shard K/N` (or --quantgate-shard) runs "
                                            "and decide (exit 0 pass, 1 fail, 2 error)")
    p.add_argument("states", nargs="+", type=Path, metavar="STATE", help="shard state files (.npz), every K of N")
    p.add_argument("--json", dest="json_out", type=writable_file, default=None, metavar="PATH",
                   help="also write every outcome as JSON")
    p.set_defaults(func=cmd_merge_shards)

    p = sub.add_parser("validate", help="check schema, files and pinned hashes without running models")
    _add_registry_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("pin", help="write the files' current sha256 into the registry")
    _add_registry_args(p)
    p.set_defaults(func=cmd_pin)

    from ..producers import ptq_dynamic, ptq_static

    for name, mod, func in (("ptq-dynamic", ptq_dynamic, cmd_ptq_dynamic), ("ptq-static", ptq_static, cmd_ptq_static)):
        p = sub.add_parser(name, help=f"{name.replace('-', ' ')}: write an int8 sidecar "
                                      "(MODEL.onnx [-o OUT], or REGISTRY.json [--id ID])")
        p.add_argument("source", help="an fp32 .onnx file, or a registry .json to rebuild its entries")
        p.add_argument("-o", "--output", type=creatable_file, default=None,
                       help="sidecar path (default: <stem>.int8.onnx beside MODEL)")
        p.add_argument("--fixtures", type=Path, default=Path(DEFAULT_FIXTURES), metavar="DIR")
        p.add_argument("--id", dest="ids", action="append", default=None, metavar="ID")
        mod.add_arguments(p)
        p.set_defaults(func=func)

    p = sub.add_parser("qat", help="QAT: fine-tune with fake quantisation and write the sidecar (runs the recipe)")
    _add_registry_args(p)
    p.add_argument("--allow-recipes", action="store_true", help="allow running the entries' qat_recipe files")
    p.add_argument("--epochs-qat", type=positive_int, default=None, metavar="N")
    p.add_argument("--lr-qat", type=float, default=None)
    p.add_argument("--route", choices=("bridge", "pt2e"), default=None)
    p.add_argument("--seed", type=non_negative_int, default=None)
    p.set_defaults(func=cmd_qat)

    from . import advise

    p = sub.add_parser("advise", help="try dynamic, static, exclusions, int4, QAT/QAD; keep the cheapest passing "
                                      "sidecar (exit 0 found, 1 none passes, 2 bad input)")
    _add_registry_args(p)
    add_gate_args(p)
    advise.add_arguments(p)
    p.set_defaults(func=cmd_advise)

    p = sub.add_parser("report", help="work with JSON reports: `report merge` joins the reports of EP jobs")
    report = p.add_subparsers(dest="report_command", required=True)
    p = report.add_parser("merge", help="one model × EP table from the JSON reports of separate EP jobs, with "
                                        "each EP's provenance; flags EPs whose drops diverge (exit 0 pass, 1 a FAIL "
                                        "or a divergence, 2 refused input)")
    p.add_argument("reports", nargs="+", type=Path, metavar="REPORT.json",
                   help="JSON reports (--quantgate-report or quantgate measure --json), one per EP job")
    p.add_argument("--json", dest="json_out", type=creatable_file, default=None, metavar="OUT",
                   help="write the merged table, provenance columns and divergences as JSON")
    p.add_argument("--html", dest="html_out", type=creatable_file, default=None, metavar="OUT",
                   help="write the merged table as one self-contained HTML page")
    p.add_argument("--step-summary", action="store_true",
                   help="append the table as markdown to $GITHUB_STEP_SUMMARY (printed when it is unset)")
    p.set_defaults(func=cmd_report_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the quantgate command line and return its exit code."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    if ns.command not in ("validate", "pin", "report", "merge-shards"):  # these run no model: no onnxruntime
        from ..engine.ort import OnnxRuntimeError, check_onnxruntime

        try:
            check_onnxruntime()
        except OnnxRuntimeError as exc:
            _err(f"quantgate: error: {exc}")
            return EXIT_ERROR
    try:
        return int(ns.func(ns))
    except InputError as exc:  # a file that cannot be written (or read) anywhere below: one line, never a traceback
        _err(f"quantgate: error: {exc}")
        return EXIT_ERROR
    except OSError as exc:  # the OS refused something no helper names (no usable temp folder at all): still one line
        _err(f"quantgate: error: {type(exc).__name__}: {exc}")
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
