"""Pick and run the producer a registry entry's ``quant_mode`` names; used by regeneration and the CLI."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError, RegistryError
from ..io.registry import Entry, Registry
from .base import Assess, ProducerError, ProducerResult


def _config(cls: type, options: Mapping[str, Any], entry: Entry, registry: Registry, **fixed: Any) -> Any:
    """Build a producer config from the entry's ``quant_options``; a bad key is a registry error."""
    try:
        return cls(**{**dict(options), **fixed})
    except (TypeError, ValueError) as exc:
        raise RegistryError(
            f"{registry.path}: entry {entry.id!r} field 'quant_options': {exc} (options of {cls.__name__})"
        ) from None


def calibration_set(registry: Registry, entry: Entry, fixtures_dir: Path) -> Path:
    """Return the entry's calibration set path, or raise naming every place looked at."""
    candidates = registry.calibration_candidates(entry, fixtures_dir)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "nowhere (no quant_calibration_set)"
    raise RegistryError(f"{registry.path}: entry {entry.id!r} field 'quant_calibration_set': not found; looked in: "
                        f"{looked}")


def produce(
    registry: Registry,
    entry: Entry,
    fixtures_dir: Path,
    *,
    allow_recipes: bool,
    progress: Callable[[str], None] | None = None,
    overrides: Mapping[str, Any] | None = None,
    assess: Assess | None = None,
) -> ProducerResult:
    """Build the entry's int8 sidecar with the producer of its mode; raise ProducerError or RegistryError.

    ``assess`` gates a training producer's build before it is published (its bytes depend on the CPU's float
    kernels, so the drop measured at build time is recorded with them); PTQ builds are byte-reproducible and
    record nothing of the machine.
    """
    fp32 = registry.fp32_path(entry)
    int8 = registry.int8_path(entry)
    if not fp32.is_file():
        raise ProducerError(f"{registry.path}: entry {entry.id!r}: fp32 model {fp32} does not exist")
    # refuse, before any work, a sidecar path that is a file the registry names in another role; the one
    # publishing function checks the same guard again right before it writes
    guard = registry.write_guard(entry, fixtures_dir)
    guard.check(int8)
    options = {**dict(entry.quant_options), **dict(overrides or {})}
    if entry.mode == "dynamic":
        from .ptq_dynamic import DynamicConfig, quantize_dynamic

        return quantize_dynamic(fp32, int8, _config(DynamicConfig, options, entry, registry), guard=guard)
    if entry.mode == "static":
        from .ptq_static import StaticConfig, quantize_static

        calib = calibration_set(registry, entry, fixtures_dir)
        config = _config(StaticConfig, options, entry, registry, calibration_set=calib)
        return quantize_static(fp32, int8, config, guard=guard)
    if entry.mode == "qat":
        if entry.qat_recipe is None:
            raise RegistryError(f"{registry.path}: entry {entry.id!r}: quant_mode 'qat' needs a 'qat_recipe' to "
                                f"rebuild its sidecar")
        recipe = registry.resolve(entry, entry.qat_recipe, "qat_recipe")
        if not allow_recipes:
            raise RegistryError(
                f"{registry.path}: entry {entry.id!r} field 'qat_recipe': rebuilding this sidecar runs the Python "
                f"file {recipe}; opt in with --quantgate-allow-recipes (pytest) or --allow-recipes (quantgate)"
            )
        from .qat import QatConfig, quantize_qat

        config = _config(QatConfig, options, entry, registry)
        try:
            return quantize_qat(fp32, int8, config, recipe=recipe, progress=progress, guard=guard, assess=assess)
        except (ProducerError, InputError):  # a write failure too: it names the sidecar, not the recipe
            raise
        except (Exception, SystemExit) as exc:  # the recipe is user code: whatever it raises is reported
            refused = _temp_write_refused(exc)
            if refused is not None:  # the temp folder is full or read-only: not the recipe's doing
                raise refused from exc
            raise ProducerError(f"{registry.path}: entry {entry.id!r}: QAT recipe {recipe} raised "
                                f"{type(exc).__name__}: {exc}") from exc
    raise ProducerError(f"{registry.path}: entry {entry.id!r}: quant_mode {entry.mode!r} has no producer")


def _temp_write_refused(exc: BaseException) -> InputError | None:
    """Return the WriteError for an OS refusal to write in the temp folder (QAT's working files), else None."""
    import tempfile

    from .ptq_common import scratch_write_error

    found = scratch_write_error(exc, Path(tempfile.gettempdir()))
    if found is None or not str(found).startswith(str(Path(tempfile.gettempdir()))):
        return None  # a file the recipe itself writes elsewhere: the recipe's error, reported as such
    return found
