"""Index samplers for the two ConCutMix streams (docs/design.md §1, "Samplers"), and their
step-major sharding over ranks (§3 "Distributed = one big GPU").

Each training step pairs a *background* (canvas) index with a *foreground* (patch) index.
The background stream is ``uniform`` by default and the foreground stream ``balanced``;
the alternatives are ``reverse`` (class weight ∝ 1/N_j) and ``sqrt`` (∝ √N_j).

A sampler yields the epoch's **global** sequence: N indices, a pure function of (seed,
epoch) — ``np.random.default_rng([seed, epoch, stream])`` — and of nothing else, so the
sequence is the same for 1 or 64 ranks, a resumed run replays it, and the background and
foreground streams pair up one to one.

* ``uniform``: one shuffled permutation of the N indices (every image once per epoch);
* ``balanced`` / ``reverse`` / ``sqrt``: N independent draws of a class j with probability
  ∝ w_j (1, 1/N_j, √N_j over the classes that have images), then an image of that class
  uniformly.

:func:`shard_step_major` splits the sequence into global steps of G = B·W samples (the
incomplete last global step is dropped); rank r takes positions r·B … r·B + B − 1 of every
global step. The union over ranks of a global step is therefore the same samples, in the
same order, whatever W is — what one process with batch G would see.
"""
from __future__ import annotations

import abc

import numpy as np

__all__ = ["SAMPLER_KINDS", "ClassWeightedSampler", "Sampler", "UniformSampler", "global_position", "make_sampler",
           "shard_step_major", "steps_per_epoch"]

SAMPLER_KINDS = ("uniform", "balanced", "reverse", "sqrt")
# Stream ids keep the generators of different kinds apart for the same seed.
_STREAM = {kind: i for i, kind in enumerate(SAMPLER_KINDS)}


def _check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_world(rank, world_size) -> tuple[int, int]:
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
    return int(rank), int(world_size)


class Sampler(abc.ABC):
    """Base: validated labels and class counts shared by all kinds."""

    kind: str

    def __init__(self, labels, seed: int) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D array of class ids, got shape {labels.shape}")
        if labels.size == 0:
            raise ValueError("labels is empty: a sampler needs at least one training sample")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers (class ids), got dtype {labels.dtype}")
        if labels.min() < 0:
            k = int(np.argmin(labels))
            raise ValueError(f"labels must be >= 0, got {int(labels[k])} at position {k}")
        self.labels = labels.astype(np.int64, copy=False)
        self.seed = _check_nonneg_int("seed", seed)
        self.class_counts = np.bincount(self.labels).astype(np.int64)
        self.num_classes = int(self.class_counts.shape[0])

    def __len__(self) -> int:
        """Samples per epoch (N, whatever the kind)."""
        return int(self.labels.shape[0])

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _check_nonneg_int("epoch", epoch), _STREAM[self.kind]])

    @abc.abstractmethod
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The N int64 dataset indices of ``epoch``, in sample order."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, n={len(self)}, classes={self.num_classes}, seed={self.seed})"


class UniformSampler(Sampler):
    """Instance-uniform: every image once per epoch, shuffled."""

    kind = "uniform"

    def epoch_indices(self, epoch: int) -> np.ndarray:
        return self._rng(epoch).permutation(len(self)).astype(np.int64, copy=False)


class ClassWeightedSampler(Sampler):
    """Class-then-instance sampling: class j with probability ∝ w_j, then a uniform image of j.

    ``kind`` picks w_j: ``balanced`` 1, ``reverse`` 1/N_j, ``sqrt`` √N_j (0 for classes
    with no image). ``class_probs`` holds the normalised class probabilities.
    """

    def __init__(self, kind: str, labels, seed: int) -> None:
        if kind not in ("balanced", "reverse", "sqrt"):
            raise ValueError(f"ClassWeightedSampler kind must be balanced, reverse or sqrt, got {kind!r}")
        self.kind = kind
        super().__init__(labels, seed)
        counts = self.class_counts.astype(np.float64)
        present = counts > 0
        weights = np.zeros_like(counts)
        if kind == "balanced":
            weights[present] = 1.0
        elif kind == "reverse":
            weights[present] = 1.0 / counts[present]
        else:
            weights[present] = np.sqrt(counts[present])
        self.class_probs = weights / weights.sum()
        # Images grouped by class once: class j's images are order[offsets[j]:offsets[j+1]].
        self._order = np.argsort(self.labels, kind="stable")
        self._offsets = np.concatenate([[0], np.cumsum(self.class_counts)[:-1]])
        self._cdf = np.cumsum(self.class_probs)
        self._cdf[-1] = 1.0  # guard the last bucket against round-off

    def epoch_indices(self, epoch: int) -> np.ndarray:
        rng = self._rng(epoch)
        n = len(self)
        # Inverse-CDF class draw; side="right" never returns a zero-probability class,
        # because a zero-width bucket is skipped by a strict comparison.
        classes = np.searchsorted(self._cdf, rng.random(n), side="right")
        counts = self.class_counts[classes]
        # floor(u·count) with u in [0, 1); the minimum only guards against float round-up.
        within = np.minimum((rng.random(n) * counts).astype(np.int64), counts - 1)
        return self._order[self._offsets[classes] + within]


def make_sampler(kind: str, labels, seed: int) -> Sampler:
    """A sampler of ``kind`` (one of SAMPLER_KINDS) over ``labels`` (class id per image)."""
    if kind == "uniform":
        return UniformSampler(labels, seed)
    if kind in ("balanced", "reverse", "sqrt"):
        return ClassWeightedSampler(kind, labels, seed)
    raise ValueError(f"unknown sampler kind {kind!r}; valid kinds: {', '.join(SAMPLER_KINDS)}")


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Whole global steps of B·W samples in an epoch of ``num_samples`` (the rest is dropped)."""
    _check_world(0, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    return num_samples // (batch_size * world_size)


def shard_step_major(indices: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Rank ``rank``'s share of an epoch's global sequence, step-major: for every global step s
    the positions s·B·W + r·B … s·B·W + r·B + B − 1, concatenated (steps × B indices)."""
    rank, world_size = _check_world(rank, world_size)
    steps = steps_per_epoch(len(indices), batch_size, world_size)
    g = batch_size * world_size
    return np.asarray(indices[: steps * g]).reshape(steps, world_size, batch_size)[:, rank].reshape(-1)


def global_position(step: int, i: int, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
    """Position in the epoch's global sequence of sample ``i`` of rank ``rank``'s step ``step``."""
    return (step * world_size + rank) * batch_size + i
