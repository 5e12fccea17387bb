"""Regression guard for `make bench`: speed-up ratios (never absolute times) against committed floors.

Reads one or more pytest-benchmark JSON files and bench/floors.json, whose entries name a
benchmark group, its baseline test and its candidate test, the minimum ratio
baseline_time / candidate_time, and a note saying which claim the floor guards and how it was
set. Times are each test's fastest round (pytest-benchmark's `min`): on a shared, noisy machine
the minimum is the least disturbed estimate of what the code costs.

A floor belongs to the device in its test ids (`[cuda-...]`: a GPU floor; anything else: a CPU
floor). Floors of the device this run is on must have their results: a missing result is a
failure (a benchmark that errored and wrote nothing must not pass). Floors of another device
are reported as "not measured" and decide nothing; the last line says how many were. An entry
whose `min_ratio` is null records a dropped claim: its ratio is printed when measured, never
checked. Exit status: 0 when every floor of this device was measured and holds, 1 when one is
below its floor or has no result, 2 when a results file is missing. An entry
with ``"metric": "<extra_info key>"`` compares that cost instead of the time (e.g.
``cpu_ms_per_image``: CPU time rather than wall time, which other jobs on the machine do not
change): ratio baseline / candidate.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_times(paths: list[Path], metric: str | None = None) -> dict[str, float]:
    """Each benchmark's fastest round, or its ``extra_info[metric]`` (benchmarks without it are left out)."""
    times: dict[str, float] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if metric is None:
                times.update({b["name"]: b["stats"]["min"] for b in data["benchmarks"]})
            else:
                times.update({b["name"]: float(b["extra_info"][metric]) for b in data["benchmarks"]
                              if b.get("extra_info", {}).get(metric) is not None})
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            print(f"check_floors: {path} is not pytest-benchmark --benchmark-json output ({type(e).__name__}: {e}); "
                  "rerun the benchmarks (make bench)", file=sys.stderr)
            raise SystemExit(2) from None  # as for a missing file: nothing could be checked
    return times


def floor_device(spec: dict) -> str:
    """'cuda' for a floor whose tests carry the CUDA device in their ids, else 'cpu'."""
    return "cuda" if any("[cuda-" in spec[k] for k in ("baseline", "candidate")) else "cpu"


def run_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check(costs: dict[str | None, dict[str, float]], floors: dict[str, dict], device: str
          ) -> tuple[list[str], int, int]:
    """The report lines, the number of failed floors and the number not measured on this device;
    ``costs[metric]`` holds the measured cost of each benchmark (``None``: its fastest round)."""
    w = max([len("ratio"), *map(len, floors)])
    lines = [f"{'ratio':<{w}} {'measured':>9} {'floor':>7}  verdict"]
    failed = not_measured = 0
    for name, spec in floors.items():
        measured = costs.get(spec.get("metric"), {})
        base, cand = measured.get(spec["baseline"]), measured.get(spec["candidate"])
        floor = spec["min_ratio"]
        shown = f"{floor:>7.2f}" if floor is not None else f"{'-':>7}"
        if base is None or cand is None:
            if floor is None:
                verdict = "not measured (claim dropped, no floor)"
            elif floor_device(spec) == device:
                verdict, failed = f"FAILED: no result for {spec['baseline'] if base is None else spec['candidate']}", \
                    failed + 1
            else:
                verdict, not_measured = f"not measured ({floor_device(spec)} floor; this run is on {device})", \
                    not_measured + 1
            lines.append(f"{name:<{w}} {'-':>9} {shown}  {verdict}")
            continue
        ratio = base / cand
        if floor is None:
            verdict = "reported (claim dropped, no floor)"
        elif ratio >= floor:
            verdict = "ok"
        else:
            verdict, failed = "BELOW FLOOR", failed + 1
        lines.append(f"{name:<{w}} {ratio:>9.2f} {shown}  {verdict}")
    return lines, failed, not_measured


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+", help="pytest-benchmark --benchmark-json output(s)")
    p.add_argument("--floors", type=Path, default=Path(__file__).with_name("floors.json"))
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="the device this run's floors must hold on (default: cuda when torch sees one, else cpu)")
    args = p.parse_args(argv)
    for path in args.results:
        if not path.is_file():  # missing, or a folder / FIFO (reading one would fail or block)
            what = "is not a regular file" if path.exists() else "not found"
            print(f"check_floors: {path} {what}; run the benchmarks first (make bench)", file=sys.stderr)
            return 2
    device = args.device or run_device()
    floors = json.loads(args.floors.read_text())
    costs = {m: load_times(args.results, m) for m in {None, *(spec.get("metric") for spec in floors.values())}}
    lines, failed, not_measured = check(costs, floors, device)
    print("\n".join(lines))
    if not_measured:
        print(f"check_floors: {not_measured} floor(s) of another device not measured in this {device} run")
    if failed:
        print(f"check_floors: {failed} {device} floor(s) below their floor or without a result", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
