"""Run a command and report its peak RSS, from a process small enough not to inflate it.

Usage: ``python bench/rss_launch.py OUT.json CMD...``. On Linux a child's ``ru_maxrss`` starts at its parent's
resident size at fork (the copied address space counts until exec), so a big parent (one that built fixtures,
or pytest) would set a floor under every peak it measures. This launcher imports nothing heavy, so the floor is a
bare interpreter; ``RUSAGE_CHILDREN`` then gives the largest peak of the command and every descendant it waited for.
Writes ``{"rc": ..., "maxrss_kb": ...}`` to OUT.json and exits with the command's status.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def main(argv: list[str]) -> int:
    out, cmd = argv[0], argv[1:]
    rc = subprocess.call(cmd)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"rc": rc, "maxrss_kb": usage.ru_maxrss}, f)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
