"""bench/check_floors.py: a floor of this run's device without a result fails; floors of another
device are "not measured" and decide nothing; the floors file itself says what each floor guards."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
spec = importlib.util.spec_from_file_location("check_floors", BENCH / "check_floors.py")
check_floors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_floors)

FLOORS = {
    "cpu label": {"baseline": "test_dense", "candidate": "test_fast", "min_ratio": 10.0, "note": "n"},
    "gpu label": {"baseline": "test_x[cuda-B1-ref]", "candidate": "test_x[cuda-B1-triton]", "min_ratio": 2.0,
                  "note": "n"},
    "dropped": {"baseline": "test_a", "candidate": "test_b", "min_ratio": None, "note": "n"},
}


def _write(tmp_path, times: dict, name="r.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"benchmarks": [{"name": k, "stats": {"min": v}} for k, v in times.items()]}))
    return path


def _run(tmp_path, capsys, device, *results):
    floors = tmp_path / "floors.json"
    floors.write_text(json.dumps(FLOORS))
    rc = check_floors.main([*map(str, results), "--floors", str(floors), "--device", device])
    return rc, capsys.readouterr()


def test_cpu_run_passes_only_on_its_floors_and_reports_gpu_floors_not_measured(tmp_path, capsys):
    rc, out = _run(tmp_path, capsys, "cpu", _write(tmp_path, {"test_dense": 1.0, "test_fast": 0.05}))
    assert rc == 0
    assert "not measured (cuda floor; this run is on cpu)" in out.out
    assert "1 floor(s) of another device not measured" in out.out


def test_cpu_floor_below_or_missing_fails(tmp_path, capsys):
    rc, out = _run(tmp_path, capsys, "cpu", _write(tmp_path, {"test_dense": 1.0, "test_fast": 0.2}))  # 5x < 10x
    assert rc == 1 and "BELOW FLOOR" in out.out
    rc, out = _run(tmp_path, capsys, "cpu", _write(tmp_path, {"test_dense": 1.0}))
    assert rc == 1 and "FAILED: no result for test_fast" in out.out


def test_gpu_run_fails_on_a_missing_gpu_result(tmp_path, capsys):
    """A Triton benchmark that errored on the GPU writes nothing: that must not pass."""
    rc, out = _run(tmp_path, capsys, "cuda", _write(tmp_path, {"test_x[cuda-B1-ref]": 1.0}))
    assert rc == 1 and "FAILED: no result for test_x[cuda-B1-triton]" in out.out
    # Results may come from several files (one per suite): merged before the check.
    rc, out = _run(tmp_path, capsys, "cuda", _write(tmp_path, {"test_x[cuda-B1-ref]": 1.0}, "a.json"),
                   _write(tmp_path, {"test_x[cuda-B1-triton]": 0.25}, "b.json"))
    assert rc == 0 and "not measured (cpu floor; this run is on cuda)" in out.out


def test_dropped_claim_is_reported_never_checked(tmp_path, capsys):
    rc, out = _run(tmp_path, capsys, "cpu", _write(tmp_path, {"test_dense": 1.0, "test_fast": 0.05, "test_a": 1.0,
                                                              "test_b": 4.0}))
    (line,) = [ln for ln in out.out.splitlines() if ln.startswith("dropped ")]
    assert rc == 0 and line.split()[1:] == ["0.25", "-", "reported", "(claim", "dropped,", "no", "floor)"]


def test_missing_results_file_is_an_error(tmp_path, capsys):
    rc, out = _run(tmp_path, capsys, "cpu", tmp_path / "absent.json")
    assert rc == 2 and "not found" in out.err


@pytest.mark.parametrize("name,floor", json.loads((BENCH / "floors.json").read_text()).items())
def test_every_committed_floor_says_what_it_guards(name, floor):
    # "metric" (optional) names the benchmarks' extra_info cost compared instead of the time.
    assert {"baseline", "candidate", "min_ratio", "note"} <= set(floor) <= {"baseline", "candidate", "min_ratio",
                                                                            "note", "metric"}, name
    assert "guards" in floor["note"] or "dropped" in floor["note"], f"{name}: note does not say what it guards"
