"""Regression guard for `make bench`: speed-up ratios (never absolute times) against committed floors.

Reads a pytest-benchmark JSON file and bench/floors.json, whose entries name a benchmark group,
its baseline test and its candidate test, and the minimum ratio baseline_time / candidate_time.
Times are each test's fastest round (pytest-benchmark's `min`): on a shared, noisy machine the
minimum is the least disturbed estimate of what the code costs. An entry with ``"metric":
"<extra_info key>"`` compares that cost instead (e.g. ``cpu_ms_per_image``, CPU time rather
than wall time, which another job on the machine does not change): ratio baseline / candidate.
Prints one line per floor and exits non-zero if any measured ratio is below its floor.
Floors whose tests did not run (e.g. GPU-only) are reported as skipped, not failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_times(path: Path, metric: str | None = None) -> dict[str, float]:
    """Each benchmark's fastest round, or its ``extra_info[metric]`` (benchmarks without it are left out)."""
    data = json.loads(path.read_text())
    if metric is None:
        return {b["name"]: b["stats"]["min"] for b in data["benchmarks"]}
    return {b["name"]: float(b["extra_info"][metric]) for b in data["benchmarks"]
            if b.get("extra_info", {}).get(metric) is not None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="pytest-benchmark --benchmark-json output")
    p.add_argument("--floors", type=Path, default=Path(__file__).with_name("floors.json"))
    args = p.parse_args(argv)
    if not args.results.exists():
        print(f"check_floors: {args.results} not found; run the benchmarks first (make bench)", file=sys.stderr)
        return 2
    floors = json.loads(args.floors.read_text())
    costs = {m: load_times(args.results, m) for m in {spec.get("metric") for spec in floors.values()}}
    failed = 0
    print(f"{'ratio':<48} {'measured':>9} {'floor':>7}  verdict")
    for name, spec in floors.items():
        measured = costs[spec.get("metric")]
        base, cand = measured.get(spec["baseline"]), measured.get(spec["candidate"])
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
