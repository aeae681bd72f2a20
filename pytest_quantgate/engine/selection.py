"""Channel selections written in a registry: ``"4:"``-style slices or explicit lists of indices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import RegistryError


def select_channels(spec: str | Sequence[int] | None, size: int, where: str) -> np.ndarray:
    """Return the sorted channel indices ``spec`` names among ``size`` channels; None selects them all.

    A string is a Python slice without a step (``"4:"``, ``"0:4"``, ``":-1"``); a list names indices. An empty
    selection or an index past ``size`` is a RegistryError naming ``where`` (the entry, output and field).
    """
    if spec is None:
        return np.arange(size)
    if isinstance(spec, str):
        parts = spec.split(":")
        if len(parts) != 2:
            raise RegistryError(f"{where}: {spec!r} is not a slice such as '4:' or '0:4'")
        try:
            bounds = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            raise RegistryError(f"{where}: {spec!r} is not a slice such as '4:' or '0:4'") from None
        chosen = np.arange(size)[slice(bounds[0], bounds[1])]
    else:
        chosen = np.asarray(sorted({int(i) for i in spec}), dtype=np.intp)
        past = [int(i) for i in chosen if not 0 <= i < size]
        if past:
            raise RegistryError(f"{where}: channel(s) {past} out of range: the axis has {size} channels")
    if chosen.size == 0:
        raise RegistryError(f"{where}: {spec!r} selects no channel of the {size} along the axis")
    return np.asarray(chosen, dtype=np.intp)
