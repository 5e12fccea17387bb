"""Regression guard for `make bench`: speed-up ratios (never absolute times) against committed floors.

Reads a pytest-benchmark JSON file and bench/floors.json, whose entries name a benchmark group,
its baseline test and its candidate test, and the minimum ratio baseline_time / candidate_time.
Times are each test's fastest round (pytest-benchmark's `min`): on a shared, noisy machine the
minimum is the least disturbed estimate of what the code costs.
Prints one line per floor and exits non-zero if any measured ratio is below its floor.
Floors whose tests did not run (e.g. GPU-only) are reported as skipped, not failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_times(path: Path) -> dict[str, float]:
    data = json.loads(path.read_text())
    return {b["name"]: b["stats"]["min"] for b in data["benchmarks"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="pytest-benchmark --benchmark-json output")
    p.add_argument("--floors", type=Path, default=Path(__file__).with_name("floors.json"))
    args = p.parse_args(argv)
    if not args.results.exists():
        print(f"check_floors: {args.results} not found; run the benchmarks first (make bench)", file=sys.stderr)
        return 2
    means = load_times(args.results)
    floors = json.loads(args.floors.read_text())
    failed = 0
    print(f"{'ratio':<48} {'measured':>9} {'floor':>7}  verdict")
    for name, spec in floors.items():
        base, cand = means.get(spec["baseline"]), means.get(spec["candidate"])
        if base is None or cand is None:
            print(f"{name:<48} {'-':>9} {spec['min_ratio']:>7.2f}  skipped (not run here)")
            continue
        ratio = base / cand
        ok = ratio >= spec["min_ratio"]
        failed += not ok
        print(f"{name:<48} {ratio:>9.2f} {spec['min_ratio']:>7.2f}  {'ok' if ok else 'BELOW FLOOR'}")
    if failed:
        print(f"check_floors: {failed} ratio(s) below their floor", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
