"""Which world this process belongs to, from its launcher's or its scheduler's environment.

Read before any process group exists (``fastlt.training.distributed.process_info``), in this order:

1. **A launcher** (``deepspeed``, ``torchrun``, DeepSpeed's per-node ``launch.py``, or variables
   you set yourself): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (or
   DeepSpeed's ``LOCAL_SIZE``), ``MASTER_ADDR``/``MASTER_PORT``, as PyTorch's ``env://`` reads them.
2. **A SLURM step without a launcher** (``srun python -m fastlt.train``, and ``deepspeed
   --launcher slurm``, whose srun starts the script itself): the conventional mapping
   ``RANK = SLURM_PROCID``, ``WORLD_SIZE = SLURM_STEP_NUM_TASKS`` (``SLURM_NTASKS``), ``LOCAL_RANK =
   SLURM_LOCALID``, ``LOCAL_WORLD_SIZE`` = this node's entry of ``SLURM_STEP_TASKS_PER_NODE``;
   ``MASTER_ADDR`` (if unset) = the first host of the step's node list, ``MASTER_PORT`` (if
   unset) = a port derived from the job and step ids, the same on every task.
3. Otherwise a world of one.

A world that cannot be determined consistently is refused with one :class:`LaunchError` line
naming the variables: ``RANK`` without ``WORLD_SIZE``, a rank outside its world, launcher
variables that contradict the SLURM step the process runs in (which made two tasks of a 2-task
step both train as rank 0 of a world of one), or a process started directly inside an
allocation of several tasks (a batch script calling ``python`` without ``srun``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from fastlt.errors import LaunchError

__all__ = ["World", "first_host", "launch_world", "slurm_port", "tasks_on_node"]

_LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class World:
    """This process's place in the job and where its rendezvous is (None: not decided here)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    source: str
    """``launcher``, ``slurm`` or ``single``."""
    master_addr: str | None = None
    master_port: str | None = None


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise LaunchError(f"environment variable {key}={value!r} is not a non-negative integer; the launcher or "
                          "the job script set it wrongly (unset it, or start the job with deepspeed/torchrun/srun)")
    return int(value)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``gpu[07-09,12],cpu3`` -> ``gpu07``), as ``scontrol show
    hostnames`` would print it first: the first name, each bracket replaced by its first number."""
    head = re.split(r",(?![^\[]*\])", nodelist.strip(), maxsplit=1)[0]
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], head)
    if not host or "[" in host or "]" in host:
        raise LaunchError(f"SLURM node list {nodelist!r} cannot be read; set MASTER_ADDR to the first node's address")
    return host


def slurm_port(job_id: int, step_id: int) -> int:
    """A rendezvous port every task of a step derives alike (20000-59999, away from ephemeral ports
    on most systems), different for consecutive steps and neighbouring jobs."""
    return 20000 + (job_id * 97 + step_id) % 40000


def tasks_on_node(spec: str, node_id: int) -> int | None:
    """This node's task count from ``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1``: 2 on nodes 0-2, 1 on node 3)."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def _check(world: World, where: str) -> World:
    if world.world_size < 1 or not 0 <= world.rank < world.world_size:
        raise LaunchError(f"{where}: rank {world.rank} is outside a world of {world.world_size}; the launch is "
                          "inconsistent (every rank must be 0..world-1)")
    if world.local_world_size < 1 or not 0 <= world.local_rank < world.local_world_size \
            or world.local_world_size > world.world_size:
        raise LaunchError(f"{where}: local rank {world.local_rank} of {world.local_world_size} on this node does "
                          f"not fit a world of {world.world_size}; the launch is inconsistent")
    return world


def _slurm_step(env: Mapping[str, str]) -> World:
    where = "SLURM step"
    rank, ntasks = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
    local = _int(env, "SLURM_LOCALID")
    if rank is None or ntasks is None or local is None:
        missing = [k for k, v in (("SLURM_PROCID", rank), ("SLURM_STEP_NUM_TASKS/SLURM_NTASKS", ntasks),
                                  ("SLURM_LOCALID", local)) if v is None]
        raise LaunchError(f"{where}: {', '.join(missing)} not set, so this task's rank cannot be determined; start "
                          "the job with srun (or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    node_id = _int(env, "SLURM_NODEID") or 0
    local_n = tasks_on_node(per_node, node_id) if per_node else None
    if local_n is None:
        local_n = _int(env, "SLURM_NTASKS_PER_NODE")
    if local_n is None:
        nodes = _int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_NNODES")
        if nodes is None or ntasks % nodes:
            raise LaunchError(f"{where}: the number of tasks on this node cannot be determined (no "
                              "SLURM_STEP_TASKS_PER_NODE / SLURM_NTASKS_PER_NODE); pass --ntasks-per-node to srun")
        local_n = ntasks // nodes
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError(f"{where}: neither MASTER_ADDR nor a SLURM node list (SLURM_STEP_NODELIST) is set, "
                              "so the ranks cannot find each other; export MASTER_ADDR=<first node> in the job script")
        addr = first_host(nodelist)
    port = env.get("MASTER_PORT")
    if not port:
        job = _int(env, "SLURM_JOB_ID") or _int(env, "SLURM_JOBID")
        if job is None:
            raise LaunchError(f"{where}: neither MASTER_PORT nor SLURM_JOB_ID is set; export MASTER_PORT in the "
                              "job script")
        port = str(slurm_port(job, _int(env, "SLURM_STEP_ID") or _int(env, "SLURM_STEPID") or 0))
    return _check(World(rank, ntasks, local, local_n, "slurm", addr, port),
                  f"{where} (SLURM_PROCID={rank}, {ntasks} tasks, SLURM_LOCALID={local} of {local_n})")


def launch_world(env: Mapping[str, str] | None = None) -> World:
    """This process's world from ``env`` (``os.environ``) by the rules of the module docstring."""
    env = os.environ if env is None else env
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    step_tasks = (_int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")) if in_step else None
    if "RANK" in env or "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        if rank is None or world is None:
            have, lack = ("RANK", "WORLD_SIZE") if rank is not None else ("WORLD_SIZE", "RANK")
            raise LaunchError(f"the environment sets {have} but not {lack}, so the job's world is unknown; set both "
                              f"(and LOCAL_RANK), or unset {have} and start the job with deepspeed, torchrun or srun")
        local = _int(env, "LOCAL_RANK")
        if local is None:
            local = _int(env, "SLURM_LOCALID") if in_step else None
        if local is None:
            if world > 1:
                raise LaunchError(f"RANK={rank} WORLD_SIZE={world} are set but LOCAL_RANK is not, so this rank's "
                                  "device cannot be chosen; set LOCAL_RANK (deepspeed and torchrun set all three)")
            local = 0
        local_n = _int(env, "LOCAL_WORLD_SIZE") or _int(env, "LOCAL_SIZE") or world
        # torchrun sets TORCHELASTIC_RUN_ID, DeepSpeed's per-node launch.py CROSS_RANK: a launcher
        # inside a SLURM step (one task per node) legitimately numbers the ranks itself.
        by_launcher = "TORCHELASTIC_RUN_ID" in env or "CROSS_RANK" in env
        if in_step and step_tasks and step_tasks > 1 and not by_launcher:
            procid = _int(env, "SLURM_PROCID")
            if world != step_tasks or rank != procid:
                raise LaunchError(
                    f"RANK={rank} WORLD_SIZE={world} in the environment contradict the SLURM step this process runs "
                    f"in (task SLURM_PROCID={procid} of {step_tasks}): the tasks would not form one job. Unset "
                    f"{', '.join(k for k in _LAUNCHER_KEYS if k in env)} in the job script so fastlt reads the "
                    "SLURM variables, or start one launcher (torchrun / deepspeed) per node")
        return _check(World(rank, world, local, local_n, "launcher", env.get("MASTER_ADDR"), env.get("MASTER_PORT")),
                      f"launcher environment (RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local})")
    if in_step:
        return _slurm_step(env)
    if "SLURM_JOB_ID" in env and (_int(env, "SLURM_NTASKS") or 1) > 1:
        raise LaunchError(f"this process runs inside SLURM job {env['SLURM_JOB_ID']} of {env['SLURM_NTASKS']} tasks "
                          "but not in a job step, so it would train alone while the allocation expects "
                          f"{env['SLURM_NTASKS']} ranks; start it with srun (srun python -m fastlt.train ...), or "
                          "with srun -n 1 for a single process")
    return World(0, 1, 0, 1, "single")
