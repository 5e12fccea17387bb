"""Faults against a run directory (reliability review II, items 1-3, 6-8 and the checkpoint
bullet of 12): foreign checkpoints, the ``latest`` pointer, two processes in one directory,
a changed training set, signals in every phase, unwritable folders, checkpoints that are valid
archives with the wrong contents.

Each test asserts the exit code, the one line, and that every file of the run directory that
existed before is byte-identical after (``tree_digest``). Refusals happen in preflight, so they
are driven in-process through ``fastlt.cli``; what needs a live trainer runs
``python -m fastlt.train`` and stops it deterministically with the test-only pause point of
``fastlt.training.signals`` (``FASTLT_TEST_PAUSE``): the child announces the pause in a file and
waits there until it is signalled, so no test races a running process.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env, error_line, run_fastlt as fastlt, tiny_config, tree_digest, write_config

#: Bound on a child reaching its pause point (imports and set-up on a loaded 2-core machine).
PAUSE_TIMEOUT = 300
#: "Within seconds" (issue item 7), generously bounded for a loaded machine.
STOP_TIMEOUT = 60



@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The synthetic dataset of tiny_config, generated once for this module."""
    from fastlt.config.loader import config_from_dict
    from fastlt.data.build import build_datasets

    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    build_datasets(config_from_dict(tiny_config(root, tmp_path_factory.mktemp("unused"))))
    return root


def list_config(data_root: Path, out: Path, name: str, **run) -> dict:
    """tiny_config on the synthetic images read as a list dataset (its train.txt can change)."""
    cfg = tiny_config(data_root, out, run={"name": name, "log_every": 1, **run})
    cfg["data"] = {k: v for k, v in cfg["data"].items() if k != "synthetic"}
    cfg["data"].update(kind="list", train_list="train.txt", val_list="val.txt", num_classes=6)
    return cfg


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_root):
    """A finished 2-epoch run on a list copy of the data (checkpoints epoch0001, epoch0002, best.pt, ...)."""
    out = tmp_path_factory.mktemp("runs")
    data = out / "data"
    shutil.copytree(data_root, data)
    cfg = list_config(data, out, "base")
    fastlt("--config", write_config(out / "base.yaml", cfg))
    return {"dir": out / "base", "cfg": cfg}


def copy_run(base_run, tmp_path: Path, name: str, **run) -> tuple[Path, Path]:
    """A copy of the base run as tmp_path/name and its config (run section updated)."""
    shutil.copytree(base_run["dir"], tmp_path / name)
    cfg = json.loads(json.dumps(base_run["cfg"]))
    cfg["run"].update(name=name, output_dir=str(tmp_path), **run)
    return tmp_path / name, write_config(tmp_path / f"{name}.yaml", cfg)


def start_paused(config: Path, point: str, tmp_path: Path, *args: str, module: str = "fastlt.train"):
    """``python -m <module> --config config args`` stopped at pause point ``point``; returns the Popen."""
    marker = tmp_path / f"paused-{point.replace(':', '_')}"
    env = child_env(FASTLT_TEST_PAUSE=point, FASTLT_TEST_PAUSE_FILE=str(marker))
    proc = subprocess.Popen([sys.executable, "-m", module, *args, "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + PAUSE_TIMEOUT
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the child never reached pause point {point} (exit {proc.returncode})\n{err[-4000:]}")
        time.sleep(0.05)
    return proc


def stop(proc, sig) -> tuple[int, str]:
    """Send ``sig`` and wait (bounded) for the exit; returns (exit code, stderr)."""
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run did not stop within {STOP_TIMEOUT} s of {sig.name}") from None
    return proc.returncode, err


def last_line(err: str) -> str:
    assert "Traceback" not in err, err[-4000:]
    return err.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------
# 1. --resume PATH of another run
# --------------------------------------------------------------------------------------


def test_1_resume_from_another_runs_checkpoint_never_writes_over_this_run(base_run, tmp_path, capsys):
    """Before the fix the run went ahead (exit 0) and replaced A's best.pt, last.pt,
    metrics.json, checkpoints and config.yaml with B's continuation."""
    from fastlt.cli import train_main

    a, config_a = copy_run(base_run, tmp_path, "A")
    b, _ = copy_run(base_run, tmp_path, "B")
    before = {"A": tree_digest(a), "B": tree_digest(b)}
    foreign = b / "checkpoints" / "epoch0001_step000000"
    for target in (foreign, b):  # a checkpoint of B, or B's run directory (its latest)
        assert train_main(["--config", str(config_a), "--resume", str(target)]) == 2
        line = error_line(capsys.readouterr().err)
        assert f"is a checkpoint of another run ({b}), and this run's directory {a} already holds best.pt" in line
        assert "start a new run from the checkpoint with a run.name whose directory does not exist yet" in line
    assert {"A": tree_digest(a), "B": tree_digest(b)} == before


def test_1_a_new_run_initialised_from_another_runs_checkpoint_records_its_lineage(base_run, tmp_path):
    """What resuming a foreign checkpoint means now: a new run in an empty directory that
    continues from it, leaves its source untouched and says where it came from."""
    b, _ = copy_run(base_run, tmp_path, "B")
    before = tree_digest(b)
    cfg = json.loads(json.dumps(base_run["cfg"]))
    cfg["run"].update(name="fresh", output_dir=str(tmp_path))
    source = b / "checkpoints" / "epoch0001_step000000"
    done = fastlt("--config", write_config(tmp_path / "fresh.yaml", cfg), "--resume", source)
    assert f"resumed from {source}: epoch 1 step 0" in done.stdout
    assert f"a new run initialised from a checkpoint of run {b.resolve()} (lineage in config.yaml" in done.stdout
    assert tree_digest(b) == before
    fresh = tmp_path / "fresh"
    lineage = {"initialised_from": str(source.resolve()), "source_run": str(b.resolve()), "epoch": 1, "step": 0}
    assert json.loads((fresh / "metrics.json").read_text())["lineage"] == lineage
    assert json.loads((fresh / "checkpoints" / "epoch0002_step000000" / "meta.json").read_text())["lineage"] == lineage
    assert (fresh / "config.yaml").read_text().startswith(f"# lineage: initialised from checkpoint {source.resolve()}")
    assert (fresh / "best.pt").is_file() and not (fresh / ".fastlt.lock").exists()


# --------------------------------------------------------------------------------------
# 2. the latest pointer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pointer", ["../../B/checkpoints/epoch0002_step000000", "ABSOLUTE", b"\xff\xfe\x00junk\n",
                                     "epoch0009_step000000"])
def test_2_a_latest_pointer_that_is_not_a_tag_here_is_damaged(base_run, tmp_path, capsys, pointer):
    """Before the fix CheckpointManager.latest() joined whatever the file said: '../../B/...'
    or an absolute path resumed B's checkpoint into A (the same overwrite as item 1), and
    `fastlt eval` followed it out of the run directory; random bytes were a UnicodeDecodeError
    traceback."""
    from fastlt.cli import main, train_main

    a, config_a = copy_run(base_run, tmp_path, "A")
    b, _ = copy_run(base_run, tmp_path, "B")
    if pointer == "ABSOLUTE":
        pointer = str(b / "checkpoints" / "epoch0002_step000000")
    (a / "checkpoints" / "latest").write_bytes(pointer if isinstance(pointer, bytes) else pointer.encode())
    before = {"A": tree_digest(a), "B": tree_digest(b)}
    newest = a / "checkpoints" / "epoch0002_step000000"
    for argv, call in ((["--config", str(config_a), "--resume", "auto"], train_main),
                       (["eval", "--config", str(config_a), "--checkpoint", str(a)], main)):
        assert call(argv) == 2
        line = error_line(capsys.readouterr().err)
        assert f"{a}/checkpoints/latest is a damaged pointer (" in line
        assert line.endswith(f"the newest intact checkpoint is {newest}: resume it with --resume {newest}")
    assert {"A": tree_digest(a), "B": tree_digest(b)} == before


# --------------------------------------------------------------------------------------
# 3. one process per run directory
# --------------------------------------------------------------------------------------


def test_3_a_second_trainer_and_eval_are_refused_while_a_run_holds_its_directory(base_run, tmp_path, capsys):
    """Before the fix both trainers ran in the same directory (interleaved logs, deleted
    .partial folders, the last one's results replacing the other's), and `fastlt eval` wrote
    its report into it. The holder is a real trainer paused in its set-up; SIGTERM there ends it
    with 143 (item 7, set-up phase) and nothing written."""
    from fastlt.cli import main, train_main

    run, config = copy_run(base_run, tmp_path, "A")
    before = tree_digest(run)
    holder = start_paused(config, "setup", tmp_path, "--resume", "auto")
    try:
        busy = (f"run directory {run} is in use by another fastlt process: host {socket.gethostname()}, "
                f"pid {holder.pid}, started ")
        assert train_main(["--config", str(config), "--resume", "auto"]) == 2
        line = error_line(capsys.readouterr().err)
        assert line.startswith(f"fastlt: error: {busy}") and "(fastlt train). Wait for it to finish" in line
        assert main(["eval", "--config", str(config), "--checkpoint", str(run / "best.pt")]) == 2
        assert error_line(capsys.readouterr().err).startswith(f"fastlt: error: {busy}")
        assert tree_digest(run) == {**before, ".fastlt.lock": tree_digest(run)[".fastlt.lock"]}
    finally:
        rc, err = stop(holder, signal.SIGTERM)
    assert rc == 143, err[-3000:]
    assert last_line(err).startswith("fastlt: stopped by SIGTERM during setup; nothing was trained in this launch")
    assert tree_digest(run) == before  # the lock file went with its holder


_HOLD = ("import sys; from fastlt.training.runlock import RunLock; RunLock(sys.argv[1], sys.argv[2]).acquire(); "
         "print('locked', flush=True); sys.stdin.read()")


def _holder(run_dir: Path, command: str):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), command], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=child_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_3_profile_is_refused_and_a_killed_holder_leaves_no_stale_lock(base_run, tmp_path, capsys):
    """`fastlt profile` takes the same lock on its <name>-profile directory. A holder killed by
    SIGKILL cannot release anything itself: the kernel drops its lock, so the next command runs."""
    from fastlt.cli import main
    from fastlt.training.runlock import RunLock

    _, config = copy_run(base_run, tmp_path, "A")
    profile_dir = tmp_path / "A-profile"
    holder = _holder(profile_dir, "fastlt profile")
    try:
        before = tree_digest(profile_dir)
        assert main(["profile", "--config", str(config), "--steps", "1", "--warmup", "0"]) == 2
        line = error_line(capsys.readouterr().err)
        assert f"run directory {profile_dir} is in use by another fastlt process: host {socket.gethostname()}, " \
               f"pid {holder.pid}" in line and "(fastlt profile)" in line
        assert tree_digest(profile_dir) == before
    finally:
        holder.kill()
        holder.wait(timeout=STOP_TIMEOUT)
    assert (profile_dir / ".fastlt.lock").exists()  # SIGKILL: the file stays, its lock does not
    with RunLock(profile_dir, "fastlt test") as lock:
        assert lock.held and "(fastlt test)" in (profile_dir / ".fastlt.lock").read_text()
    assert not (profile_dir / ".fastlt.lock").exists()


def test_3_a_file_system_without_locks_is_named(tmp_path, monkeypatch):
    """NFS mounted with nolock / Lustre without -o flock answer flock with ENOLCK: say so
    (and leave no run directory behind) instead of running unprotected."""
    from fastlt.errors import OutputError
    from fastlt.training.runlock import RunLock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OutputError, match=r"its file system does not support file locks .* --set run.lock=false"):
        RunLock(tmp_path / "new").acquire()
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------
# 6. the training set changed between stop and resume
# --------------------------------------------------------------------------------------


def test_6_resume_on_a_changed_training_set(base_run, tmp_path, capsys):
    """Before the fix a list shrunk from 123 to 100 images resumed mid-epoch at step 3 with new
    class counts and no word. Now: refused inside an epoch; at an epoch boundary refused unless
    run.allow_data_change=true, and then logged."""
    from fastlt.cli import train_main

    data = tmp_path / "data"
    shutil.copytree(base_run["dir"].parent / "data", data)
    cfg = list_config(data, tmp_path, "d")
    config = write_config(tmp_path / "d.yaml", cfg)
    rc, err = stop(start_paused(config, "step:1:3", tmp_path), signal.SIGTERM)
    assert rc == 143, err[-3000:]
    run = tmp_path / "d"
    mid, boundary = run / "checkpoints" / "epoch0001_step000004", run / "checkpoints" / "epoch0001_step000000"
    assert (run / "checkpoints" / "latest").read_text() == mid.name
    lines = (data / "train.txt").read_text().splitlines()
    (data / "train.txt").write_text("\n".join(lines[23:]) + "\n")  # class 0 (the first 40 lines) loses 23
    before = tree_digest(run)

    assert train_main(["--config", str(config), "--resume", "auto"]) == 2
    line = error_line(capsys.readouterr().err)
    assert (f"checkpoint {mid} stopped inside epoch 1 at step 4, and the training set has changed since it was "
            "written (123 -> 100 images; 1 class count(s) changed (class 0: 40 -> 17)): step 4 would not mean the "
            "same images") in line and f"--resume {boundary} with --set run.allow_data_change=true" in line
    assert train_main(["--config", str(config), "--resume", str(boundary)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"checkpoint {boundary} (epoch 1) was trained on another training set (123 -> 100 images" in line
    assert tree_digest(run) == before

    done = fastlt("--config", config, "--resume", boundary, "--set", "run.allow_data_change=true")
    assert (f"warning: the training set changed since checkpoint {boundary} (123 -> 100 images; 1 class count(s) "
            "changed (class 0: 40 -> 17)); continuing on the new one from epoch 1") in done.stdout
    meta = json.loads((run / "checkpoints" / "epoch0002_step000000" / "meta.json").read_text())
    assert meta["dataset"]["images"] == 100 and meta["dataset"]["class_counts"][0] == 17


# --------------------------------------------------------------------------------------
# 7. SIGINT / SIGTERM in every phase
# --------------------------------------------------------------------------------------


def test_7_a_signal_in_the_final_evaluation_or_the_report_stops_the_run_resumably(data_root, tmp_path):
    """Before the fix SIGTERM during the final evaluation printed "stopping after the current
    step and saving a checkpoint", then finished the evaluation and the report and exited 0.
    Now each phase stops within seconds with 130/143 and leaves a state --resume auto finishes
    from. One run walks the phases: SIGTERM in its final evaluation, then its resume gets SIGINT
    in the final report, then a second resume completes it (the set-up phase:
    test_3_a_second_trainer...; the steps: test_faults.py::test_14_sigterm_exits_143)."""
    config = write_config(tmp_path / "s.yaml", tiny_config(data_root, tmp_path, optim={"epochs": 1},
                                                            run={"name": "s", "log_every": 1}))
    run, ckpt = tmp_path / "s", tmp_path / "s" / "checkpoints" / "epoch0001_step000000"
    code, err = stop(start_paused(config, "eval:0", tmp_path), signal.SIGTERM)
    assert code == 143, err[-3000:]
    assert last_line(err) == (f"fastlt: stopped by SIGTERM during the evaluation of epoch 0; checkpoint {ckpt} is "
                              "complete: continue with --resume auto (it continues from there and runs this "
                              "evaluation first)")
    assert not (run / "metrics.json").exists() and not (run / "best.pt").exists()
    before = tree_digest(ckpt)

    code, err = stop(start_paused(config, "report", tmp_path, "--resume", "auto"), signal.SIGINT)
    assert code == 130, err[-3000:]
    assert last_line(err) == (f"fastlt: stopped by SIGINT during the final report (last.pt, metrics.json, plots); the "
                              f"training is complete in checkpoint {ckpt}: --resume auto writes the report")
    assert (run / "last.pt").is_file() and not (run / "metrics.json").exists()

    done = fastlt("--config", config, "--resume", "auto")  # the evaluation finished in the first resume
    assert "eval epoch 0:" not in done.stdout and "the evaluation of epoch 0 already ran" in done.stdout
    assert json.loads((run / "metrics.json").read_text())["evaluated_epochs"] == [0]
    assert tree_digest(ckpt) == before


# --------------------------------------------------------------------------------------
# 8. every folder a run writes, before the first step
# --------------------------------------------------------------------------------------


@pytest.fixture()
def immutable():
    """Make a folder refuse new files for this process: mode 0555, or for root (who ignores
    modes) the immutable attribute; skips where neither is possible."""
    made = []

    def make(path: Path) -> str:
        if os.geteuid() != 0:
            path.chmod(0o555)
            made.append(("chmod", path))
            return "permission denied"
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)],
                                                            capture_output=True).returncode:
            pytest.skip("running as root without chattr +i: no way to make a folder read-only for this process")
        made.append(("chattr", path))
        return "operation not permitted (read-only or immutable folder)"

    yield make
    for how, path in made:
        if how == "chmod":
            path.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(path)], check=True)


def test_8_an_unwritable_checkpoint_folder_is_found_before_the_first_step(data_root, tmp_path, capsys, immutable):
    """Before the fix preflight probed only the run directory: a read-only checkpoints/ trained
    a whole epoch and then failed with the wrong cause ("its folder does not exist ... make room")."""
    from fastlt.cli import train_main

    cfg = tiny_config(data_root, tmp_path, run={"name": "r"})
    config = write_config(tmp_path / "r.yaml", cfg)
    ckpts = tmp_path / "r" / "checkpoints"
    ckpts.mkdir(parents=True)
    (tmp_path / "r" / "notes.txt").write_text("mine")
    before = tree_digest(tmp_path / "r")
    reason = immutable(ckpts)
    assert train_main(["--config", str(config)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line == (f"fastlt: error: checkpoint folder {ckpts} cannot be written: {ckpts} does not accept new files "
                    f"({reason}); choose a writable folder")
    assert tree_digest(tmp_path / "r") == before and sorted(os.listdir(tmp_path / "r")) == ["checkpoints", "notes.txt"]


@pytest.fixture()
def tmpfs(tmp_path):
    """``mount(options)``: a fresh tmpfs under tmp_path (e.g. 'size=32k' to be full at once, 'ro'
    to be read-only); skips where this process may not mount (not root, or no CAP_SYS_ADMIN)."""
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode:
            pytest.skip("this process cannot mount a tmpfs (needs root / CAP_SYS_ADMIN)")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize("options, reason", [
    ("size=32k", "has no room for the run's files (the disk is full, ENOSPC)"),
    ("ro", "does not accept new files (the file system is read-only)"),
])
def test_8_a_full_or_read_only_file_system_is_named(data_root, tmp_path, capsys, tmpfs, options, reason):
    """A full disk used to be found at the first checkpoint, after an epoch (an empty probe file
    still fits on a full disk); the preflight probe now writes data and names the errno."""
    from fastlt.cli import train_main

    out = tmpfs(options)
    config = write_config(tmp_path / "r.yaml", tiny_config(data_root, out, run={"name": "r"}))
    assert train_main(["--config", str(config)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"fastlt: error: run directory (run.output_dir / run.name) {out}/r cannot be written: ")
    assert reason in line and os.listdir(out) == []


def test_8_eval_checks_its_report_folder_before_evaluating(base_run, tmp_path, capsys, immutable):
    """Before the fix `fastlt eval` evaluated the whole split, then failed writing the report."""
    from fastlt.cli import main

    run, config = copy_run(base_run, tmp_path, "A")
    report = tmp_path / "report"
    report.mkdir()
    reason = immutable(report)
    before = tree_digest(run)
    assert main(["eval", "--config", str(config), "--checkpoint", str(run / "best.pt"), "--report-dir",
                 str(report)]) == 2
    assert error_line(capsys.readouterr().err) == (f"fastlt: error: --report-dir {report} cannot be written: {report} "
                                                   f"does not accept new files ({reason}); choose a writable folder")
    assert tree_digest(run) == before


# --------------------------------------------------------------------------------------
# 12. a checkpoint that is a valid archive with the wrong contents
# --------------------------------------------------------------------------------------


def _wrong_meta_type(ckpt: Path) -> str:
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps(dict(meta, epoch="2")))
    return "meta.json is damaged ('epoch' is '2', not a non-negative integer)"


def _rng_of_other_tensors(ckpt: Path) -> str:
    torch.save({"torch": torch.zeros(3), "weights": torch.ones(2)}, ckpt / "rng_rank00000.pt")
    return "rng_rank00000.pt is damaged: it does not hold fastlt's random generator states"


def _best_pt_as_model_states(ckpt: Path) -> str:
    shutil.copy(ckpt.parent.parent / "best.pt", ckpt / "mp_rank_00_model_states.pt")
    return ("mp_rank_00_model_states.pt is damaged: it holds no DeepSpeed 'module' state (found ['meta', 'model']; "
            "a best.pt / last.pt is not a checkpoint)")


def _extra_shards(ckpt: Path) -> str:
    for r in (0, 1):
        shutil.copy(ckpt / "mp_rank_00_model_states.pt", ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return ("it holds 2 optimizer shards (zero_pp_rank_1_mp_rank_00_optim_states.pt among them) but meta.json says "
            "1 rank(s) wrote it")


@pytest.mark.parametrize("damage", [_wrong_meta_type, _rng_of_other_tensors, _best_pt_as_model_states, _extra_shards])
def test_12_a_checkpoint_with_the_wrong_contents_is_damaged(base_run, tmp_path, capsys, damage):
    """Before the fix each passed the check (complete archives) and failed later: a TypeError /
    KeyError traceback from the RNG restore or from DeepSpeed's loader after the engine had
    started, or a 'written by 1 ranks' message for extra shards."""
    from fastlt.cli import train_main

    run, config = copy_run(base_run, tmp_path, "A")
    ckpt, prev = run / "checkpoints" / "epoch0002_step000000", run / "checkpoints" / "epoch0001_step000000"
    what = damage(ckpt)
    before = tree_digest(run)
    assert train_main(["--config", str(config), "--resume", "auto"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"fastlt: error: checkpoint {ckpt} cannot be used: ") or what.startswith("meta.json"), line
    assert what in line, line
    assert line.endswith(f"it cannot be resumed. resume from the previous complete checkpoint with --resume {prev}")
    assert tree_digest(run) == before
