"""QAT recipe for ``fusion_mlp_v1`` (used by ``scripts/quant_table.py``; the registry ships it ``dynamic``).

The model is built from bare matmuls (ORT's dynamic quantiser leaves Gemm in float), which torchao's x86
quantiser does not annotate: the QAT producer refuses it rather than fine-tune without fake quantisation.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_quantgate_bundled_recipe",
                                               Path(__file__).resolve().parents[1] / "recipe.py")
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)

recipe = _shared.BundledRecipe("fusion_mlp", build_args=(64,))
