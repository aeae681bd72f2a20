"""Run every benchmark and print one table: measured, baseline (same run), ratio, target, met?

Usage: ``python bench/run_all.py [--quick] [--json PATH]``. Wall times are medians of interleaved repetitions;
no target is asserted anywhere (CI machines are too noisy): read the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_collect
import bench_gate
import bench_memory
import bench_realsize
import bench_sequential
import bench_shards
import bench_startup
import bench_xdist
from common import print_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--no-realsize", action="store_true", help="skip the real-size models (about a minute)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip memory against the sample count (bench_memory: a few minutes)")
    parser.add_argument("--no-sequential", action="store_true",
                        help="skip the sequential mode's share of samples (bench_sequential: about a minute)")
    args = parser.parse_args(argv)
    q = args.quick
    results = [
        bench_gate.run(3 if q else 7),
        *bench_gate.run_inprocess(3 if q else 5),
        bench_collect.run(3 if q else 7),
        bench_startup.run(7 if q else 21),
        bench_xdist.run(2 if q else 5),
        bench_xdist.run(2 if q else 3, repeat=10),
    ]
    results += bench_shards.run(quick=q)
    if not args.no_realsize:
        results += bench_realsize.run(quick=q)
    if not args.no_sequential:
        results += bench_sequential.run(quick=q)
    if not args.no_memory:
        results += bench_memory.run(quick=q)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
