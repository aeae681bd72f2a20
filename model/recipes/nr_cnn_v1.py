"""QAT recipe for ``nr_cnn_v1`` (registry ``qat_recipe: "recipes/nr_cnn_v1.py"``).

Executed by ``pytest_quantgate.producers.qat.load_recipe`` (trusted, opt-in user code). The recipe itself is
``scripts/bundled/recipe.py``'s BundledRecipe over the training script ``scripts/bundled/nr_cnn.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_quantgate_bundled_recipe", Path(__file__).resolve().parents[2]
                                               / "scripts" / "bundled" / "recipe.py")
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)

recipe = _shared.BundledRecipe("nr_cnn")
