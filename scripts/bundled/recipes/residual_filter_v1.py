"""QAT recipe for ``residual_filter_v1`` (used by ``scripts/quant_table.py``; the registry ships it ``static``).

Training pairs are ``residual_filter.datasets()["train"]``; ``calibration_data()`` returns the ``"calib"`` split, the
same 128 patches as ``fixtures/residual_filter_v1.calib.npz``, so the bridge and static PTQ calibrate alike.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_quantgate_bundled_recipe",
                                               Path(__file__).resolve().parents[1] / "recipe.py")
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)

recipe = _shared.BundledRecipe("residual_filter", split="train", calibration_split="calib")
