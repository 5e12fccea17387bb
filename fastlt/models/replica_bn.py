"""BatchNorm as the published runs' ``nn.DataParallel`` over four GPUs computes it, at any world size.

The reference trains ``nn.DataParallel(model, device_ids=[0, 1, 2, 3])`` on the concatenated
batch ``cat([view 0, view 1, view 2])`` of 3B images. DataParallel cuts that batch with
``torch.chunk`` into (up to) four contiguous groups, one per GPU, and every BatchNorm layer of
a replica normalises its own group only: with B = 256, group 0 is images 0–191 (view 0, the
CutMix + RandAugment/AutoAugment view), group 3 images 576–767 (contrastive views only). The
running statistics that survive a step are replica 0's (DataParallel broadcasts the module
from device 0 before each forward; in-place buffer updates of the other replicas are lost), so
evaluation uses statistics of view-0 images alone.

:class:`ReplicaGroupBatchNorm` reproduces exactly that for fastlt's layout, where rank r of W
holds samples r·b … (r+1)·b − 1 of each view of the global step as ``[view 0, view 1, view 2]``
(3b rows): the global row of local row v·b + i is v·W·b + r·b + i, which is increasing in the
local row, so each group's rows on a rank are one contiguous slice. In a world of one every
group lies on the rank and is normalised by ``F.batch_norm`` on its slice (ghost groups: the
same call DataParallel's replica makes). With several ranks every group spans ranks, and each
rank combines the per-rank (count, mean, M2) of every group — gathered with gradients, so the
backward pass is that of one process on the whole batch — into the group's statistics (Chan's
parallel formula, stable where E[x²] − E[x]² is not). Group 0's statistics update the running
statistics on every rank alike, so the replicas stay identical without any averaging.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DP_REPLICAS", "ReplicaGroupBatchNorm", "ReplicaLayout", "convert_replica_batchnorm", "replica_layout",
           "rank_world", "replicas_used"]

#: GPUs of the published runs' ``nn.DataParallel`` (``--device_ids`` default [0, 1, 2, 3]).
DP_REPLICAS = 4
VIEWS = 3


class ReplicaLayout(NamedTuple):
    """Where DataParallel's groups of one global forward batch lie.

    ``sizes[k]``: rows of group k in the global batch; ``rows[r][k]``: rows of group k on rank r;
    ``local[k]``: this rank's slice (start, end) of its local batch holding group k's rows."""

    sizes: tuple[int, ...]
    rows: tuple[tuple[int, ...], ...]
    local: tuple[tuple[int, int], ...]

    @property
    def spans_ranks(self) -> bool:
        """Whether some group's rows are on more than one rank (statistics must then be exchanged)."""
        return any(sum(1 for per_rank in self.rows if per_rank[k]) > 1 for k in range(len(self.sizes)))


def _chunk_sizes(n: int, replicas: int) -> tuple[int, ...]:
    """The sizes ``torch.chunk(batch of n, replicas)`` gives — what DataParallel's scatter uses:
    ⌈n / replicas⌉ rows each, the last group smaller, and fewer groups when the rows run out."""
    step = -(-n // replicas)
    return tuple(min(step, n - start) for start in range(0, n, step))


def replicas_used(global_rows: int, replicas: int = DP_REPLICAS) -> int:
    """How many replicas DataParallel runs for a batch of ``global_rows`` rows."""
    return len(_chunk_sizes(global_rows, replicas))


@functools.lru_cache(maxsize=64)
def replica_layout(local_rows: int, rank: int, world: int, replicas: int = DP_REPLICAS) -> ReplicaLayout:
    """The groups of a global batch of ``world`` ranks × ``local_rows`` rows laid out as
    ``[view 0, view 1, view 2]`` per rank, seen from ``rank``."""
    if local_rows < VIEWS or local_rows % VIEWS:
        raise ValueError(f"method.reference_parallelism: a training forward pass must hold the three views of "
                         f"the step's samples (3·b rows); got {local_rows} rows")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    b = local_rows // VIEWS
    sizes = _chunk_sizes(world * local_rows, replicas)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]

    def overlap(r: int, k: int) -> list[tuple[int, int]]:
        """Local (start, end) pieces of group k on rank r, one per view."""
        lo, hi = starts[k], starts[k] + sizes[k]
        pieces = []
        for v in range(VIEWS):
            base = v * world * b + r * b  # global row of rank r's first sample of view v
            a, e = max(lo, base), min(hi, base + b)
            if a < e:
                pieces.append((v * b + a - base, v * b + e - base))
        return pieces

    rows = tuple(tuple(sum(e - a for a, e in overlap(r, k)) for k in range(len(sizes))) for r in range(world))
    local = []
    for k in range(len(sizes)):
        pieces = overlap(rank, k)
        local.append((pieces[0][0], pieces[-1][1]) if pieces else (0, 0))
    return ReplicaLayout(sizes, rows, tuple(local))


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ReplicaGroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm (1-d or 2-d input) whose training forward normalises each of the published
    runs' DataParallel groups on its own and keeps group 0's running statistics (module
    docstring). Evaluation uses the running statistics, as any BatchNorm. Parameters, buffers
    and state-dict keys are those of ``nn.BatchNorm1d``/``2d``, so checkpoints load either way."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, replicas: int = DP_REPLICAS, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.replicas = replicas

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"ReplicaGroupBatchNorm expects 2-d, 3-d or 4-d input; got {x.dim()}-d")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", replicas={self.replicas}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)  # once per forward, as replica 0's counter
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        rank, world = rank_world()
        layout = replica_layout(x.shape[0], rank, world, self.replicas)
        if layout.spans_ranks:
            return self._exchanged(x, layout, rank, factor)
        parts = []
        for k, (start, end) in enumerate(layout.local):
            if start < end:
                keep = k == 0 and self.track_running_stats
                parts.append(F.batch_norm(x[start:end], self.running_mean if keep else None,
                                          self.running_var if keep else None, self.weight, self.bias, True, factor,
                                          self.eps))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _exchanged(self, x: Tensor, layout: ReplicaLayout, rank: int, factor: float) -> Tensor:
        """Groups that span ranks: every rank's per-group (mean, M2) gathered with gradients and
        combined; each rank normalises its own rows of each group."""
        from fastlt.training.distributed import all_gather_with_grad

        dims = [0] + list(range(2, x.dim()))
        per_row = x[0].numel() // x.shape[1]  # elements per channel of one row (H·W for images)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in at least fp32
        local = []
        for start, end in layout.local:
            if start < end:
                part = xf[start:end]
                mean = part.mean(dims)
                m2 = (part - _channel(mean, x.dim())).square().sum(dims)
            else:
                mean = m2 = xf.new_zeros(x.shape[1])
            local.append(torch.stack([mean, m2]))
        gathered = all_gather_with_grad(torch.stack(local)[None])  # (W, groups, 2, C)
        counts = torch.tensor(layout.rows, dtype=xf.dtype, device=x.device) * per_row  # (W, groups)
        parts = []
        for k, (start, end) in enumerate(layout.local):
            n = counts[:, k]
            total = n.sum()
            means, m2s = gathered[:, k, 0], gathered[:, k, 1]
            mean = (n[:, None] * means).sum(0) / total
            m2 = m2s.sum(0) + (n[:, None] * (means - mean).square()).sum(0)
            if k == 0 and self.track_running_stats:
                with torch.no_grad():
                    unbiased = m2 / (total - 1) if total > 1 else m2
                    self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                    self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
            if start < end:
                y = (xf[start:end] - _channel(mean, x.dim())) * _channel(torch.rsqrt(m2 / total + self.eps), x.dim())
                if self.affine:
                    y = y * _channel(self.weight.to(xf.dtype), x.dim()) + _channel(self.bias.to(xf.dtype), x.dim())
                parts.append(y.to(x.dtype))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _channel(v: Tensor, dim: int) -> Tensor:
    """A per-channel vector shaped to broadcast over (N, C, ...) input."""
    return v.view(1, -1, *([1] * (dim - 2)))


def convert_replica_batchnorm(module: nn.Module, replicas: int = DP_REPLICAS) -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d``/``2d`` replaced by a :class:`ReplicaGroupBatchNorm`
    holding the same parameters and buffers (the way ``SyncBatchNorm.convert_sync_batchnorm``
    converts). Other normalisation layers are left alone; a BatchNorm subclass (which may do more
    than normalise) is refused rather than silently changed."""
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        out = ReplicaGroupBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats, replicas)
        with torch.no_grad():
            if module.affine:
                out.weight = module.weight
                out.bias = module.bias
            if module.track_running_stats:
                out.running_mean = module.running_mean
                out.running_var = module.running_var
                out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, ReplicaGroupBatchNorm):
        raise ValueError(f"method.reference_parallelism: cannot convert the BatchNorm subclass "
                         f"{type(module).__name__}; only nn.BatchNorm1d and nn.BatchNorm2d are reproduced")
    for name, child in module.named_children():
        module.add_module(name, convert_replica_batchnorm(child, replicas))
    return module
