"""Skip an item whose inputs are unchanged since it passed, using pytest's cache (``--quantgate-cache``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import pytest

from .fileio import sha256_file
from .registry import Entry, Registry
from .settings import Settings

CACHE_PREFIX = "quantgate/v1/"


def key(registry: Registry, entry: Entry, ep: str, settings: Settings) -> str | None:
    """Return a digest of everything a verdict depends on, or None when an input is missing.

    Covered: fp32, int8 and fixture bytes; the whole registry entry (budgets, compare mode, ...); the EP and
    its options; the installed onnxruntime; the statistics settings; the plugin version.
    """
    from . import __version__, providers
    from .soak import find_fixture

    try:
        fixture = find_fixture(registry.soak_candidates(entry, settings.fixtures_dir))
        files = [sha256_file(registry.fp32_path(entry)), sha256_file(registry.int8_path(entry)),
                 sha256_file(fixture)]
    except Exception:  # any input problem: no cache, let the full check report it
        return None
    material = {
        "files": files,
        "entry": dict(entry.raw),
        "ep": ep,
        "ep_options": asdict(settings.ep_options),
        "onnxruntime": providers.ort_distribution(),
        "stats": [settings.bootstrap, settings.seed, settings.confidence, settings.decision, settings.batch_size,
                  settings.strict],
        "quantgate": __version__,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def lookup(config: pytest.Config, digest: str) -> dict[str, Any] | None:
    """Return the row cached for this digest, if any."""
    if config.cache is None:
        return None
    value = config.cache.get(CACHE_PREFIX + digest, None)
    return dict(value) if isinstance(value, dict) else None


def store(config: pytest.Config, digest: str, row: dict[str, Any]) -> None:
    """Remember a passing row (failures are never cached: they must be re-measured)."""
    if config.cache is not None:
        slim = {k: v for k, v in row.items() if k not in ("plot", "diagnosis")}
        config.cache.set(CACHE_PREFIX + digest, slim)
