"""Skip an item whose inputs are unchanged since it passed, using pytest's cache (``--quantgate-cache``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from ..fileio import sha256_file
from ..io.registry import Entry, Registry
from ..records import GateResult, RecordError
from ..settings import Settings

CACHE_PREFIX = "quantgate/v2/"  # v2: typed GateResult records (v1 held row dicts)


def key(registry: Registry, entry: Entry, ep: str, settings: Settings) -> str | None:
    """Return a digest of everything a verdict depends on, or None when an input is missing.

    Covered: fp32, int8 and fixture bytes; the whole registry entry (budgets, compare mode, ...); the EP and
    its options; the installed onnxruntime; the statistics settings; the plugin version.
    """
    from .. import __version__
    from ..engine import providers
    from ..io.npz import digest
    from ..io.soak import find_fixture

    try:
        fixture = find_fixture(registry.soak_candidates(entry, settings.fixtures_dir))
        files = [sha256_file(registry.fp32_path(entry)), sha256_file(registry.int8_path(entry)),
                 digest(fixture)]  # a folder of shards too
    except Exception:  # any input problem: no cache, let the full check report it
        return None
    material = {
        "files": files,
        "entry": dict(entry.source),
        "ep": ep,
        "ep_options": asdict(settings.ep_options),
        "onnxruntime": providers.ort_distribution(),
        "stats": [settings.bootstrap, settings.seed, settings.confidence, settings.decision, settings.batch_size,
                  settings.strict, settings.max_samples, settings.max_fixture_bytes],
        "quantgate": __version__,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


class PytestCache:
    """Passing results in pytest's own cache (``.pytest_cache``), shared by xdist workers."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def get(self, digest: str) -> GateResult | None:
        """Return the result cached for this digest, if any."""
        if self.config.cache is None:
            return None
        return _load(self.config.cache.get(CACHE_PREFIX + digest, None))

    def set(self, digest: str, result: GateResult) -> None:
        """Remember a passing result (failures are never cached: they must be re-measured)."""
        if self.config.cache is not None:
            self.config.cache.set(CACHE_PREFIX + digest, _slim(result))


class FolderCache:
    """Passing results as JSON files in a folder: the cache of ``quantgate measure --cache``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, digest: str) -> GateResult | None:
        """Return the result cached for this digest, if any."""
        try:
            value = json.loads((self.folder / f"{digest}.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return _load(value)

    def set(self, digest: str, result: GateResult) -> None:
        """Remember a passing result atomically."""
        from ..fileio import atomic_write_text

        atomic_write_text(self.folder / f"{digest}.json", json.dumps(_slim(result)), "cache entry")


def _slim(result: GateResult) -> dict[str, Any]:
    """Return the JSON form without the plot and diagnosis: a cached pass is shown in the summary, not plotted."""
    if result.plot is None and result.diagnosis is None and result.focus_plot is None:
        return result.to_json()
    return replace(result, plot=None, diagnosis=None, focus_plot=None).to_json()


def _load(value: Any) -> GateResult | None:
    """Return the cached result, or None for anything unreadable (an older format, a hand-edited file): a miss."""
    if not isinstance(value, dict):
        return None
    try:
        result = GateResult.from_json(value)
    except (RecordError, TypeError):
        return None
    return result if result.passed else None
