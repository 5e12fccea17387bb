"""Index samplers for the two ConCutMix streams (ARCHITECTURE §1, "Samplers").

Each training step pairs a *background* (canvas) index with a *foreground* (patch) index.
The background stream is ``uniform`` by default and the foreground stream ``balanced``;
the alternatives are ``reverse`` (class weight ∝ 1/N_j) and ``sqrt`` (∝ √N_j).

Every sampler yields, per (epoch, rank), ``num_samples(world_size)`` = ⌈N / W⌉ indices,
whatever its kind, so background and foreground streams pair up one to one. Indices are a
pure function of (seed, epoch, rank): the generator is
``np.random.default_rng([seed, epoch, rank, stream])`` (rank omitted for ``uniform``,
whose permutation all ranks share), so a resumed run replays the same sequence and a
step's indices are a slice of its epoch's array.

``uniform``: one shuffled permutation of the N indices per (seed, epoch), padded by
wrapping around to a multiple of W (as torch's DistributedSampler does), rank r taking
positions r, r+W, r+2W, ... Every index is visited at least once per epoch across ranks,
exactly once among the unpadded positions; two ranks share an index only through the
≤ W−1 padding duplicates (none when W divides N).

``balanced`` / ``reverse`` / ``sqrt``: each rank draws its own stream, independently per
sample: a class j with probability ∝ w_j (1, 1/N_j, √N_j over the classes that have
images), then an image of that class uniformly.
"""
from __future__ import annotations

import abc

import numpy as np

__all__ = ["SAMPLER_KINDS", "ClassWeightedSampler", "Sampler", "UniformSampler", "make_sampler"]

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
    """Base: validated labels, class counts and the per-rank epoch length shared by all kinds."""

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
        """Samples per epoch on a single rank (= num_samples(1) = N)."""
        return self.num_samples(1)

    def num_samples(self, world_size: int = 1) -> int:
        """Indices per rank per epoch: ⌈N / world_size⌉, the same for every kind."""
        _, world_size = _check_world(0, world_size)
        return -(-self.labels.shape[0] // world_size)

    @abc.abstractmethod
    def epoch_indices(self, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """The ``num_samples(world_size)`` int64 indices of ``rank`` in ``epoch``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, n={self.labels.shape[0]}, classes={self.num_classes}, seed={self.seed})"


class UniformSampler(Sampler):
    """Instance-uniform: every image once per epoch, shuffled, sharded across ranks."""

    kind = "uniform"

    def epoch_indices(self, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        epoch = _check_nonneg_int("epoch", epoch)
        rank, world_size = _check_world(rank, world_size)
        rng = np.random.default_rng([self.seed, epoch, _STREAM[self.kind]])
        perm = rng.permutation(self.labels.shape[0])
        # np.resize repeats the permutation cyclically: the padding is its first entries.
        padded = np.resize(perm, self.num_samples(world_size) * world_size)
        return padded[rank::world_size].astype(np.int64, copy=False)


class ClassWeightedSampler(Sampler):
    """Class-then-instance sampling: class j with probability ∝ w_j, then a uniform image of j.

    ``kind`` picks w_j: ``balanced`` 1, ``reverse`` 1/N_j, ``sqrt`` √N_j (0 for classes
    with no image). ``class_probs`` holds the normalised class probabilities.
    """

    def __init__(self, kind: str, labels, seed: int) -> None:
        if kind not in ("balanced", "reverse", "sqrt"):
            raise ValueError(f"ClassWeightedSampler kind must be balanced, reverse or sqrt, got {kind!r}")
        super().__init__(labels, seed)
        self.kind = kind
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

    def epoch_indices(self, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        epoch = _check_nonneg_int("epoch", epoch)
        rank, world_size = _check_world(rank, world_size)
        n = self.num_samples(world_size)
        rng = np.random.default_rng([self.seed, epoch, rank, _STREAM[self.kind]])
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
