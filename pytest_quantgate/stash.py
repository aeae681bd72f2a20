"""The keys of what the plugin keeps in ``config.stash`` (no module globals), shared by plugin and items."""

from __future__ import annotations

from typing import Any

import pytest

from .settings import Settings

SETTINGS_KEY = pytest.StashKey[Settings]()
RUN_ID_KEY = pytest.StashKey[str]()
ROWS_KEY = pytest.StashKey[dict[str, dict[str, Any]]]()
