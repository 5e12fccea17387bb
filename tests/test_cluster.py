"""What a cluster does to a job, on loopback (gloo, DS_ACCELERATOR=cpu, several CPU processes):

* SLURM: tasks started without a launcher take their world from the SLURM variables, and a world
  that cannot be determined consistently is refused with one line (``fastlt.training.cluster``);
* a rank that dies (SIGKILL, the out-of-memory killer's way) never hangs the others: they exit in
  bounded time with one line naming it and the latest checkpoint, and ``--resume auto`` continues
  (``fastlt.training.watchdog``);
* ZeRO-1/2 checkpoints resume at another world size through DeepSpeed's universal checkpoint
  (``fastlt.training.universal``);
* torchrun's elastic agent restarts the job on the remaining node, which resumes the latest
  checkpoint with the world-size-invariant sample sequence.

The multi-process tests are marked ``slow`` (``pytest -m slow tests/test_cluster.py``); every
subprocess is bounded by a generous timeout with a message saying which one ran over.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEEPSPEED, REPO, child_env, events, free_port, tiny_config, write_config
from fastlt.errors import LaunchError
from fastlt.training.cluster import first_host, launch_world, slurm_port, tasks_on_node

TORCHRUN = Path(sys.executable).with_name("torchrun")
#: Generous bounds: the test machine is shared and loaded; a healthy tiny run takes well under them.
RUN_TIMEOUT = 600
#: The collective timeout the multi-process tests run with (run.collective_timeout_s).
SHORT_TIMEOUT = 20
#: Bound on every surviving process's exit after a rank was killed: the heartbeat verdict (a few
#: heartbeats of SHORT_TIMEOUT / 12 s) plus process teardown, with room for a loaded machine.
EXIT_BOUND = 60

needs_launchers = pytest.mark.skipif(not (DEEPSPEED.is_file() and TORCHRUN.is_file()),
                                     reason="the deepspeed / torchrun launchers are not installed")


# --------------------------------------------------------------------------------------
# Helpers: processes with a deadline, a long tiny run, the state of a run directory
# --------------------------------------------------------------------------------------


def _start(cmd: list, log: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=child_env(DS_ACCELERATOR="cpu", **env),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_all(procs: list, logs: list, timeout: float, what: str) -> list[int]:
    """Exit codes of ``procs``; fails naming ``what`` (and showing the logs' ends) past ``timeout``."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    _kill_node(q)
            tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs)
            pytest.fail(f"{what} did not exit within {timeout:.0f} s\n{tails}")
    return [p.returncode for p in procs]


def _wait_for(cond, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a process exited while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.2)


def _long_config(tmp_path: Path, name: str, **run) -> Path:
    """The tiny run, long enough (many epochs) to be killed in the middle."""
    cfg = tiny_config(tmp_path / "data", tmp_path / "runs",
                      run={"name": name, "log_every": 1, "collective_timeout_s": SHORT_TIMEOUT, **run},
                      optim={"epochs": 30})
    return write_config(tmp_path / f"{name}.yaml", cfg)


def _torchrun(node: int, config: Path, port: int, log: Path, *extra, nnodes: str = "2", restarts: int = 0):
    cmd = [TORCHRUN, "--nnodes", nnodes, "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"127.0.0.1:{port}", "--rdzv-id", f"job{port}", "--max-restarts", str(restarts), "--rdzv-conf",
           "join_timeout=300,last_call_timeout=2", "-m", "fastlt.train", "--config", config, *extra]
    return _start(cmd, log)


def _workers(agent: subprocess.Popen) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(agent.pid).children()]


def _off_store_node(agents: list, port: int) -> tuple:
    """(agent, worker pid, worker rank) of the node that does not host the rendezvous store: on a
    cluster that is any node but the --rdzv-endpoint's, whose loss ends a torchrun job whatever
    the workers do (its agent serves the store every agent polls)."""
    import psutil

    host = next(a for a in agents if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                                         for c in psutil.Process(a.pid).net_connections()))
    agent = next(a for a in agents if a is not host)
    worker = psutil.Process(_workers(agent)[0])
    return agent, worker.pid, int(worker.environ()["RANK"])


def _kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL an agent and every process under it, as a node's loss does (torchrun's workers run in
    their own sessions, so the agent's process group alone would leave them running)."""
    import psutil

    procs = [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _latest(run: Path) -> Path | None:
    pointer = run / "checkpoints" / "latest"
    return run / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


# --------------------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------------------


def _slurm_env(procid: int, ntasks: int = 2, **extra) -> dict:
    """What srun sets for task ``procid`` of a one-node step of ``ntasks`` tasks."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
           "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid), "SLURM_NODEID": "0",
           "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_NNODES": "1",
           "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_TASKS_PER_NODE": str(ntasks), "SLURM_TASKS_PER_NODE": str(ntasks),
           "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost"}
    env.update(extra)
    return env


def test_slurm_node_lists_and_task_counts_read_as_scontrol_would():
    assert first_host("gpu[07-09,12],cpu3") == "gpu07"
    assert first_host("n1,n2") == "n1"
    assert first_host("rack[2-3]-node[010-020]") == "rack2-node010"
    assert tasks_on_node("2(x3),1", 2) == 2 and tasks_on_node("2(x3),1", 3) == 1
    assert tasks_on_node("4", 0) == 4 and tasks_on_node("4", 1) is None
    assert slurm_port(4242, 0) == slurm_port(4242, 0) != slurm_port(4242, 1)  # every task derives the same port
    assert 20000 <= slurm_port(10**9, 7) < 60000


def test_slurm_step_gives_rank_world_and_rendezvous():
    w = launch_world(_slurm_env(1, SLURM_STEP_NODELIST="gpu[03-04]", SLURM_STEP_NUM_NODES="2", SLURM_NNODES="2",
                                SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_NODEID="1", SLURM_LOCALID="0"))
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.source) == (1, 2, 0, 1, "slurm")
    assert w.master_addr == "gpu03" and w.master_port == str(slurm_port(4242, 0))
    given = launch_world(_slurm_env(0, MASTER_ADDR="10.0.0.5", MASTER_PORT="29555"))
    assert (given.master_addr, given.master_port) == ("10.0.0.5", "29555")
    # A launcher inside the step (one torchrun per node) numbers the ranks itself.
    tr = launch_world(_slurm_env(0, RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4",
                                 TORCHELASTIC_RUN_ID="j"))
    assert (tr.rank, tr.world_size, tr.source) == (5, 8, "launcher")
    assert launch_world({}).world_size == 1


@pytest.mark.parametrize("env, says", [
    (_slurm_env(1, RANK="0", WORLD_SIZE="1"), "RANK=0 WORLD_SIZE=1 in the environment contradict the SLURM step"),
    ({"RANK": "1"}, "sets RANK but not WORLD_SIZE"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "rank 2 is outside a world of 2"),
    (_slurm_env(2), "rank 2 is outside a world of 2"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, "not in a job step"),
    ({k: v for k, v in _slurm_env(0).items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID not set"),
    (_slurm_env(0, SLURM_PROCID="x"), "SLURM_PROCID='x' is not a non-negative integer"),
])
def test_inconsistent_worlds_are_refused_naming_the_variables(env, says):
    with pytest.raises(LaunchError, match=says):
        launch_world(env)


def test_a_task_whose_world_contradicts_its_slurm_step_is_refused_in_one_line(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "data", tmp_path / "runs"))
    proc = subprocess.run([sys.executable, "-m", "fastlt.train", "--config", str(config)], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, cwd=REPO,
                          env=child_env(**_slurm_env(1), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("fastlt: error: RANK=0 WORLD_SIZE=1 in the environment contradict the SLURM step "
                                  "this process runs in (task SLURM_PROCID=1 of 2)"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.cluster
def test_two_srun_tasks_without_a_launcher_form_one_world_of_two(tmp_path):
    """What ``srun -n 2 python -m fastlt.train`` (and ``deepspeed --launcher slurm``) start: two tasks
    that see only the SLURM variables (and MASTER_ADDR/PORT, as the sbatch example exports)."""
    cfg = tiny_config(tmp_path / "data", tmp_path / "runs", run={"name": "s", "max_steps_per_epoch": 2},
                      optim={"epochs": 1})
    config = write_config(tmp_path / "s.yaml", cfg)
    port = str(free_port())
    logs = [tmp_path / f"task{i}.log" for i in range(2)]
    procs = [_start([sys.executable, "-m", "fastlt.train", "--config", config], logs[i],
                    **_slurm_env(i, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for i in range(2)]
    assert _wait_all(procs, logs, RUN_TIMEOUT, "the two SLURM tasks") == [0, 0], logs[0].read_text()[-3000:]
    out = logs[0].read_text()
    assert "2 rank(s) on cpu" in out and "2 steps/epoch of 4/rank" in out
    metrics = json.loads((tmp_path / "runs" / "s" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["replica_digests"])) == 1


# --------------------------------------------------------------------------------------
# A rank that dies
# --------------------------------------------------------------------------------------


def _assert_lost_rank_reported(logs: list, rank: int, run: Path) -> Path:
    """Exactly one ``fastlt: error`` line among all processes' output, naming ``rank`` and the
    latest checkpoint, which is complete; returns it."""
    from fastlt.training.checkpoint import CheckpointManager

    lines = [ln for log in logs for ln in log.read_text().splitlines() if "fastlt: error:" in ln]
    latest = _latest(run)
    assert latest is not None
    assert len(lines) == 1, lines
    assert f"rank {rank} (pid " in lines[0] and "died: killed" in lines[0], lines[0]
    assert f"The latest checkpoint is {latest}, complete and untouched: continue with --resume auto" in lines[0]
    CheckpointManager(run / "checkpoints").verify(latest)  # every file present and whole
    return latest


@pytest.mark.slow
@pytest.mark.cluster
@needs_launchers
def test_a_killed_rank_of_the_deepspeed_launcher_ends_the_job_at_once_and_resume_continues(tmp_path):
    config = _long_config(tmp_path, "ds")
    run = tmp_path / "runs" / "ds"
    log = tmp_path / "ds.log"
    launcher = _start([DEEPSPEED, "--num_gpus", "2", "--master_port", free_port(), "--module", "fastlt.train",
                       "--config", config], log)
    _wait_for(lambda: _latest(run) is not None, RUN_TIMEOUT, "the first checkpoint", [launcher])
    import psutil

    ranks = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(launcher.pid).children(recursive=True)
             if "fastlt.train" in " ".join(p.cmdline()) and "RANK" in p.environ()}
    survivor = ranks[0]
    ranks[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    _wait_all([launcher], [log], EXIT_BOUND, "the deepspeed launcher after rank 1 was killed")
    survivor.wait(timeout=EXIT_BOUND)
    took = time.monotonic() - t0
    latest = _assert_lost_rank_reported([log], 1, run)
    print(f"deepspeed launcher, rank 1 killed: every process exited {took:.1f} s later")

    # --resume auto continues the run, here on one process (ZeRO-0 resumes on any number of ranks).
    proc = subprocess.run([sys.executable, "-m", "fastlt.train", "--config", str(config), "--resume", "auto",
                           "--set", f"optim.epochs={int(latest.name[5:9]) + 1}"], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, cwd=REPO, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {latest}" in proc.stdout


@pytest.mark.slow
@pytest.mark.cluster
@needs_launchers
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_the_dead_worker_of_one_torchrun_node_never_hangs_the_other(tmp_path, how):
    """Two torchrun agents (one per "node") on loopback. SIGKILL: the worker dies (its sockets
    close); SIGSTOP: it stops answering without closing them, as a node that vanished does."""
    config = _long_config(tmp_path, "tr")
    run = tmp_path / "runs" / "tr"
    port = free_port()
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    agents = [_torchrun(i, config, port, logs[i]) for i in range(2)]
    _wait_for(lambda: _latest(run) is not None, RUN_TIMEOUT, "the first checkpoint", agents)
    victim_agent, victim, victim_rank = _off_store_node(agents, port)
    os.kill(victim, getattr(signal, how))
    t0 = time.monotonic()
    others = [a for a in agents if a is not victim_agent]
    try:
        rcs = _wait_all(others, logs, EXIT_BOUND, f"the other node after rank {victim_rank} got {how}")
        took = time.monotonic() - t0
        print(f"torchrun, 2 nodes, rank {victim_rank} {how}: the other node exited {took:.1f} s later")
        assert rcs == [1]  # torchrun's agent: its worker failed (with fastlt's exit code 4)
        _assert_lost_rank_reported(logs, victim_rank, run)
    finally:
        if how == "SIGSTOP":  # the frozen node stays frozen: end it
            _kill_node(victim_agent)
            with contextlib.suppress(ProcessLookupError):  # already gone with its agent
                os.kill(victim, signal.SIGKILL)
        _wait_all(agents, logs, EXIT_BOUND, "the killed node's agent")


# --------------------------------------------------------------------------------------
# ZeRO-1/2 at another world size: DeepSpeed's universal checkpoint
# --------------------------------------------------------------------------------------


def _fidelity_config(root: Path, name: str, zero: int, epochs: int) -> Path:
    """A configuration whose losses do not depend on how the global batch is split over ranks
    (a ViT: LayerNorm per token; frozen BatchNorm in the heads), as in test_distributed_fidelity."""
    vit = {"backbone": "vit_small_patch16_224", "backbone_kwargs": {"img_size": 16, "patch_size": 8},
           "use_norm": True, "freeze_bn": True}
    cfg = tiny_config(root / "data", root / "runs", model=vit, optim={"epochs": epochs, "lr": 0.01},
                      data={"batch_size": 16}, method={"l_d_warm": 0}, deepspeed={"zero_stage": zero},
                      run={"name": name, "log_every": 1, "max_steps_per_epoch": 3, "eval_every": 2})
    return write_config(root / f"{name}.yaml", cfg)


def _losses(run: Path, epoch: int) -> list:
    return [(r["step"], r["loss"], r["ce"], r["scl"]) for r in events(run, "train") if r["epoch"] == epoch]


def _run_ranks(config: Path, ranks: int, *extra) -> str:
    """stdout of ``config`` trained on ``ranks`` processes (the deepspeed launcher, or one plain process)."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "fastlt.train", "--config", str(config), *map(str, extra)]
    else:
        cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module",
               "fastlt.train", "--config", str(config), *map(str, extra)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO,
                              env=child_env(DS_ACCELERATOR="cpu"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{config.name} on {ranks} rank(s) did not finish within {RUN_TIMEOUT} s")
    assert proc.returncode == 0, f"{config.name} on {ranks} rank(s)\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.cluster
@needs_launchers
@pytest.mark.parametrize("zero", [1, 2])
def test_zero_shards_of_two_ranks_resume_on_one_and_on_four_through_the_universal_checkpoint(tmp_path, zero):
    root = tmp_path
    _run_ranks(_fidelity_config(root, "ref", 0, 2), 1)  # the ZeRO-0 reference, two epochs on one process
    _run_ranks(_fidelity_config(root, "two", zero, 2), 2)  # ZeRO on two ranks; its epoch-1 checkpoint is resumed
    ckpt = root / "runs" / "two" / "checkpoints" / "epoch0001_step000000"
    assert len(list(ckpt.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    reference = _losses(root / "runs" / "ref", 1)
    assert len(reference) == 3
    for ranks, said in ((1, "converting it once to DeepSpeed's universal checkpoint"),
                        (4, "loading its universal form")):
        out = _run_ranks(_fidelity_config(root, f"on{ranks}", zero, 2), ranks, "--resume", ckpt)
        assert f"checkpoint {ckpt} holds ZeRO shards of 2 rank(s) and this run has {ranks}: {said}" in out, out[-3000:]
        assert f"resumed from {ckpt}: epoch 1 step 0" in out
        got = _losses(root / "runs" / f"on{ranks}", 1)
        assert [g[0] for g in got] == [r[0] for r in reference]
        for g, r in zip(got, reference):
            # fp32 sums in another order (other shard boundaries, other per-rank batches): 1e-4 relative.
            assert g[1:] == pytest.approx(r[1:], rel=1e-4, abs=1e-5), (ranks, g, r)
    assert (ckpt / "universal" / "zero").is_dir() and not (ckpt / "universal.partial").exists()


# --------------------------------------------------------------------------------------
# Elastic restarts: torchrun --nnodes 1:2 --max-restarts 1
# --------------------------------------------------------------------------------------


def _samples(run: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(run.glob("samples.rank*.jsonl")) for line in f.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.cluster
@needs_launchers
def test_an_elastic_job_restarts_on_the_remaining_node_and_trains_every_sample_once(tmp_path):
    epochs, steps, batch = 6, 15, 8  # 15 whole steps of 8 of the 123 images
    cfg = tiny_config(tmp_path / "data", tmp_path / "runs", optim={"epochs": epochs},
                      run={"name": "el", "log_every": 1, "collective_timeout_s": SHORT_TIMEOUT, "sample_log": True,
                           "max_steps_per_epoch": steps, "eval_every": epochs})
    config = write_config(tmp_path / "el.yaml", cfg)
    run = tmp_path / "runs" / "el"
    port = free_port()
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    agents = [_torchrun(i, config, port, logs[i], "--resume", "auto", nnodes="1:2", restarts=1) for i in range(2)]
    # Kill one node (its agent and its worker) once epoch 1 has started: whichever epoch K it is
    # in then, the restart must resume the start of K (the latest checkpoint).
    _wait_for(lambda: any(s["epoch"] >= 1 for s in _samples(run)), RUN_TIMEOUT, "epoch 1", agents)
    victim_agent, _, victim_rank = _off_store_node(agents, port)
    _kill_node(victim_agent)
    survivor = next(a for a in agents if a is not victim_agent)
    rcs = _wait_all([survivor], logs, RUN_TIMEOUT, "the remaining node's elastic restart and the rest of the run")
    _wait_all([victim_agent], logs, EXIT_BOUND, "the killed node")
    out = logs[agents.index(survivor)].read_text()
    assert rcs == [0], out[-4000:]

    samples = _samples(run)
    first, second = [s for s in samples if s["attempt"] == 0], [s for s in samples if s["attempt"] == 1]
    assert {s["world_size"] for s in first} == {2} and {s["world_size"] for s in second} == {1}
    killed_in = second[0]["epoch"]
    assert second[0]["step"] == 0 and 1 <= killed_in < epochs and max(s["epoch"] for s in first) <= killed_in
    assert f"resumed from {run / 'checkpoints' / f'epoch{killed_in:04d}_step000000'}: epoch {killed_in} step 0" in out
    # The lineage of the finished run: epochs before K from the first launch, K.. from the restart.
    lineage = [s for s in first if s["epoch"] < killed_in] + second
    for epoch in range(epochs):
        rows = [(p, b) for s in lineage if s["epoch"] == epoch for p, b in zip(s["positions"], s["background"])]
        positions = sorted(p for p, _ in rows)
        assert positions == list(range(steps * batch)), f"epoch {epoch}: positions {positions}"  # each once
        assert len({b for _, b in rows}) == len(rows), f"epoch {epoch}: a sample trained twice"
    # World-size invariance: the steps of epoch K trained by 2 ranks before the kill used the
    # samples the single rank used for the same global positions after the restart.
    before = {p: b for s in first if s["epoch"] == killed_in for p, b in zip(s["positions"], s["background"])}
    after = {p: b for s in second if s["epoch"] == killed_in for p, b in zip(s["positions"], s["background"])}
    assert all(after[p] == b for p, b in before.items())
    print(f"elastic: rank {victim_rank}'s node killed in epoch {killed_in} after {len(before)} of its samples; "
          f"restarted at world size 1 from epoch {killed_in} step 0")
