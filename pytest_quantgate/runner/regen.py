"""Rebuild a missing (or every) int8 sidecar before it is gated, once per run, safely across xdist workers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelFileError, RegistryError
from ..fileio import atomic_write_text, lock_path_for, sha256_file, sweep_partials
from ..io.registry import Entry, Registry
from ..settings import Settings

if TYPE_CHECKING:
    from ..producers.base import Assess
    from ..producers.build import Difference


@dataclass(frozen=True)
class Regenerated:
    """A sidecar this run rebuilt, how its hash compares with the pin, and why it differs."""

    path: Path
    sha256: str
    pinned: str | None
    reused: bool = False  # another item (EP, xdist worker) of this run already rebuilt it
    record: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)  # the rebuild's provenance
    pinned_build: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)  # entry's int8_build

    @property
    def matches_pin(self) -> bool:
        """Return True when the rebuilt file hashes to the pinned value."""
        return self.pinned is not None and self.pinned.lower() == self.sha256

    def difference(self) -> Difference | None:
        """Return why the rebuilt bytes differ from the pinned ones (None when they match)."""
        from ..producers.build import explain

        return None if self.matches_pin else explain(self.pinned_build, self.record)

    def note(self, registry: Registry, entry: Entry) -> str:
        """Return the line that tells the user what was rebuilt and, when it differs from the pin, why."""
        verb = "reused the sidecar rebuilt earlier in this run," if self.reused else "rebuilt"
        difference = self.difference()
        if difference is None:
            return f"{verb} {self.path.name}; sha256 matches the pin"
        return (f"{verb} {self.path.name}: sha256 {self.sha256} differs from the pinned int8_sha256 {self.pinned}: "
                f"{difference.text}")

    def review(self, gate_passed: bool) -> tuple[bool, str]:
        """Return whether the rebuild may be used without review (docs/regeneration.md) and why, in one clause."""
        from ..producers.build import usable_without_review

        difference = self.difference()
        if difference is None:
            return True, "it matches the pin"
        return usable_without_review(difference, self.pinned_build, self.record, gate_passed)


def pinned_build_of(entry: Entry) -> Mapping[str, Any] | None:
    """Return the entry's ``int8_build`` (what ``quantgate pin`` recorded of the reviewed build), if any."""
    value = entry.source.get("int8_build")
    return value if isinstance(value, Mapping) else None


def _lock_path(sidecar: Path) -> Path:
    return lock_path_for(sidecar)


def _marker_path(sidecar: Path) -> Path:
    """Where a build records its run id: beside the lock, so the sidecar's bytes (and its pin) stay untouched."""
    return _lock_path(sidecar).with_suffix(".built")


def _built_in_run(sidecar: Path, run_id: str) -> bool:
    """Return True when this run already built the sidecar and the file is still exactly that build."""
    try:
        record = json.loads(_marker_path(sidecar).read_text("utf-8"))
        return bool(record.get("gate_run_id") == run_id and record.get("sha256") == sha256_file(sidecar))
    except (OSError, ValueError, AttributeError):
        return False


def _reused(sidecar: Path, entry: Entry, run_id: str) -> Regenerated | None:
    """Return the sidecar as 'reused' when an earlier item of this run built it, else None (nothing rebuilt)."""
    if not _built_in_run(sidecar, run_id):
        return None
    from ..producers.provenance import read_provenance

    return Regenerated(sidecar, sha256_file(sidecar), entry.int8_sha256, reused=True,
                       record=read_provenance(sidecar), pinned_build=pinned_build_of(entry))


def _stamp(sidecar: Path, sha256: str, run_id: str) -> None:
    atomic_write_text(_marker_path(sidecar), json.dumps({"gate_run_id": run_id, "sha256": sha256}) + "\n")


def ensure_sidecar(registry: Registry, entry: Entry, settings: Settings, run_id: str,
                   assess: Assess | None = None) -> Regenerated | None:
    """Build the entry's sidecar when the regen policy asks for it; return what was built, if anything.

    A file lock makes one worker build while the others wait; the build lands by atomic rename, so nobody
    reads a half-written file. With ``all``, the run id recorded beside the lock stops a second build of the
    same sidecar in the same run (several EPs, several workers). The sidecar's folder is swept of dead
    writers' partials first, and the producer refuses to write over any file the registry names otherwise.
    """
    from filelock import FileLock

    registry.fp32_path(entry)  # refuse a bad fp32 path first: it is what the int8 default derives from
    sidecar = registry.int8_path(entry)
    sweep_partials(sidecar.parent)
    if settings.regen == "never":
        if not sidecar.exists():
            raise ModelFileError(
                f"{registry.path}: entry {entry.id!r}: int8 sidecar {sidecar} does not exist and "
                f"--quantgate-regen is 'never'; build it with `quantgate {_producer(entry)} {registry.path} "
                f"--id {entry.id}` or run with --quantgate-regen missing"
            )
        return None
    if settings.regen == "missing" and sidecar.exists():
        return _reused(sidecar, entry, run_id)
    with FileLock(str(_lock_path(sidecar))):
        if (settings.regen == "missing" and sidecar.exists()) or _built_in_run(sidecar, run_id):
            return _reused(sidecar, entry, run_id)
        from ..producers.base import ProducerError
        from ..producers.dispatch import produce

        try:
            result = produce(registry, entry, settings.fixtures_dir, allow_recipes=settings.allow_recipes,
                             assess=assess)
        except ProducerError as exc:
            raise ModelFileError(f"{registry.path}: entry {entry.id!r}: rebuilding {sidecar.name} failed: "
                                 f"{exc}") from None
        except RegistryError:
            raise
        _stamp(sidecar, result.sha256, run_id)
        return Regenerated(sidecar, result.sha256, entry.int8_sha256, record=result.provenance,
                           pinned_build=pinned_build_of(entry))


def _producer(entry: Entry) -> str:
    return {"dynamic": "ptq-dynamic", "static": "ptq-static", "qat": "qat"}.get(entry.mode, "ptq-static")
