"""The keys of what the plugin keeps in ``config.stash`` (no module globals), shared by plugin and items."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ..settings import Settings

if TYPE_CHECKING:
    from ..records import Outcome

SETTINGS_KEY = pytest.StashKey[Settings]()
RUN_ID_KEY = pytest.StashKey[str]()
# each item's outcome by node id, rebuilt on the controller from the JSON form xdist carries on the report
OUTCOMES_KEY = pytest.StashKey[dict[str, "Outcome"]]()
