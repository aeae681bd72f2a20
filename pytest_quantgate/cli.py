"""The ``quantgate`` command line (filled in by the producers and measure/validate/pin work)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the quantgate command line and return its exit code."""
    return 0
