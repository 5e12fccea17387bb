"""Processes and ranks (docs/design.md §3 "Distributed", "Engine"): the device, the process
environment DeepSpeed reads, the process group, and the few collective helpers the trainer
and the evaluation need.

* :func:`resolve_device`, :func:`process_info`, :func:`prepare_process_env` — before any
  process group exists: ``run.device`` → cpu/cuda, the rank/world of this process from the
  launcher's environment (read only), and the environment DeepSpeed reads (a plain
  ``python -m fastlt.train`` is a world of one);
* :func:`init_distributed` — DeepSpeed's process group (gloo on CPU, NCCL on GPUs);
* :func:`barrier`, :func:`any_rank`, :func:`mean_over_ranks`, :func:`gather_variable`,
  :func:`average_buffers`, :func:`replica_digests` — collectives that are no-ops in a world of one;
* :func:`all_gather_with_grad`, :func:`all_gather_tensor` — the global batch's features and
  labels for the balanced contrastive loss (docs/design.md §3: its contrast set is the global
  batch plus the centers).
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

from fastlt.errors import ConfigError

__all__ = ["ProcessInfo", "all_gather_tensor", "all_gather_with_grad", "any_rank", "average_buffers", "barrier",
           "gather_variable", "init_distributed", "mean_over_ranks", "prepare_process_env", "process_info",
           "replica_digests", "resolve_device"]


def resolve_device(requested: str) -> str:
    """run.device -> "cpu" or "cuda" (auto: CUDA when available)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' was requested but no CUDA device is available; "
                          "use run.device=cpu (or auto)")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the job, from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_info() -> ProcessInfo:
    """This process's ranks from the launcher's or SLURM's environment (``fastlt.training.cluster``;
    a world of one without either). LaunchError for a world that cannot be determined consistently."""
    from fastlt.training.cluster import launch_world

    w = launch_world()
    return ProcessInfo(rank=w.rank, world_size=w.world_size, local_rank=w.local_rank,
                       local_world_size=w.local_world_size)


def prepare_process_env(device: str) -> None:
    """Set what DeepSpeed reads from the environment before it is imported: the accelerator, and
    the ranks and rendezvous of ``process_info`` where no launcher set them (a SLURM step, or a
    plain ``python -m fastlt.train``: a world of one)."""
    from fastlt.training.cluster import launch_world

    if device == "cpu":
        if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
            raise ConfigError(f"run.device is cpu but DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}; "
                              "unset DS_ACCELERATOR or set run.device to match")
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    w = launch_world()
    if w.source != "launcher":
        os.environ.update(RANK=str(w.rank), LOCAL_RANK=str(w.local_rank), WORLD_SIZE=str(w.world_size),
                          LOCAL_WORLD_SIZE=str(w.local_world_size))
        os.environ.setdefault("MASTER_ADDR", w.master_addr or "127.0.0.1")
        # A world of one: port 0, its rendezvous store binds a free port itself (a port picked here,
        # closed and passed on could be taken by another process before the store bound it).
        os.environ.setdefault("MASTER_PORT", w.master_port or ("0" if w.world_size == 1 else str(_free_port())))


def init_distributed(device: str, proc: ProcessInfo, timeout_s: float | None = None) -> None:
    """Bring up DeepSpeed's process group for ``proc`` (gloo on CPU, NCCL on CUDA). ``timeout_s``
    (``run.collective_timeout_s``) bounds every collective: a rank that waits longer for the
    others raises instead of hanging (None: DeepSpeed's default, 10 minutes)."""
    from datetime import timedelta

    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about a minute, once
    # per machine); gloo does the same job for fastlt's CPU runs, which are for development
    # and CI. FASTLT_DS_SHM_COMM=1 keeps DeepSpeed's op.
    if device == "cpu" and os.environ.get("FASTLT_DS_SHM_COMM") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if device == "cuda":
        torch.cuda.set_device(proc.local_rank)  # before NCCL comes up, so each rank binds its own GPU
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False, **kwargs)
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores; without this each would spawn one thread per core.
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // proc.local_world_size))


def world_size() -> int:
    """Ranks of the initialised process group (1 without one)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size()


_world = world_size


def barrier() -> None:
    if _world() > 1:
        torch.distributed.barrier()


def any_rank(flags: list[bool], device) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (a no-op for a single process)."""
    if _world() == 1:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]  # host sync (epoch ends and log intervals only)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``t`` over all ranks (a copy; ``t`` itself for a single process).
    Per-rank means of equal-size shares average to the global mean: the logged losses are the
    global batch's, whatever the number of ranks."""
    world = _world()
    if world == 1:
        return t
    out = t.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out.div_(world)


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape on all ranks) concatenated along dim 0, in rank order, with
    gradients flowing back to each rank's own rows: the gradient of rank r's rows is the sum over
    all ranks of the gradient reaching them (a reduce-scatter), so that with data-parallel
    gradient averaging a loss over the gathered tensor trains as one process on the whole batch.
    A single process gets ``t`` back."""
    if _world() == 1:
        return t
    return _GatherWithGrad.apply(t)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        ctx.rows, ctx.rank, ctx.world = t.shape[0], rank, world
        parts = [torch.empty_like(t) for _ in range(world)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if torch.distributed.get_backend() == "nccl":
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            torch.distributed.reduce_scatter_tensor(mine, grad)
            return mine
        # gloo has no reduce-scatter: sum everything, keep this rank's rows.
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape everywhere, no gradient) concatenated along dim 0."""
    if _world() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_variable(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of per-rank length over all ranks (every rank gets the result)."""
    world = _world()
    if world == 1:
        return t
    n = torch.tensor([t.numel()], device=t.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks.

    DeepSpeed all-reduces gradients, so parameters stay identical, but each rank updates its
    running statistics from its own batches. Averaging them before evaluation and checkpoints
    (as timm's distribute_bn does) gives every replica the same model.
    """
    world = _world()
    if world == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
            buf.div_(world)


def replica_digests(module: torch.nn.Module) -> list[str]:
    """Every rank's weights digest; raises if data parallelism left the replicas different."""
    from fastlt.models.signature import weights_digest

    mine = weights_digest(module)
    world = _world()
    if world == 1:
        return [mine]
    digests: list = [None] * world
    torch.distributed.all_gather_object(digests, mine)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the {world} ranks finished with different weights (digests {digests}); "
                           "data-parallel replicas diverged — please report this with the config")
    return digests
