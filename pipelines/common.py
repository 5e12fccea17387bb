"""What every pipeline backend shares: keyed randomness, the paired sample streams, the
CutMix draw, the dataset check and bad-input handling (docs/design.md §1 "Samplers" and
"CutMix", §3 pipeline contract).

Every random choice of a training pipeline is a pure function of a key
``(seed, epoch, global step or global sample position, stream)`` — never of the rank, the
number of ranks, how many workers or threads ran, what ran before, or whether the pipeline
was rebuilt (docs/design.md §3 "Distributed = one big GPU"). That is what makes both backends
deterministic and resumable at any step (``start_step``), lets a run resume on another
number of ranks with the same data, and lets the DALI and torch backends draw the *same*
sample indices, CutMix boxes, λ and augmentation parameters for the same spec.

- :class:`StreamPlan`: the background (canvas) and foreground (patch) index streams, global
  sequences from ``fastlt.method.sampling`` sharded step-major: rank r of W takes samples
  r·B … r·B + B − 1 of every global step of B·W samples.
- :func:`cutmix_boxes`: per batch (one coin and one box for the whole global step, the
  reference behaviour) or per sample, λ = 1 − clipped box area/(H·W) (fastlt.method.cutmix).
- :class:`Substitutes` / :func:`load_with_policy`: ``on_error: skip`` replaces a bad image by
  another image of the same class, chosen by a keyed draw, so the label stays right and the
  run stays deterministic; ``raise`` names the file.
- :func:`image_storage` / :func:`check_dataset`: whether a dataset holds decoded arrays or
  encoded files, and whether that fits the view recipe (the CIFAR recipe takes either, the
  imagenet recipe files).
- :func:`worker_failure`: a dead worker process (torch's RuntimeError, DALI's PipelineError) as
  one message with the likely cause and what to do.
"""
from __future__ import annotations

import logging
import os
import re
import signal
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fastlt.method.cutmix import area_lambda, sample_box
from fastlt.errors import BadImageError, PipelineError

from .decode import IMAGE_FORMATS, check_encoded_image, decode_image, describe_error
from .spec import DEFAULT_MAX_IMAGE_PIXELS

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "IMAGE_FORMATS", "LOG", "BadImageError", "Stream", "StreamPlan", "Substitutes",
           "check_dataset", "check_encoded_image", "SpawnedReaderSource", "cutmix_boxes", "decode_image",
           "default_workers", "describe_error", "die_with_parent", "image_source_name", "image_storage", "keyed_rng",
           "keyed_seed", "load_with_policy", "worker_failure"]

LOG = logging.getLogger("fastlt.pipelines")


class Stream:
    """Tags that separate the independent random streams drawn for one key."""

    BACKGROUND = 1
    FOREGROUND = 2
    CUTMIX = 3
    SUBSTITUTE = 4
    FOREGROUND_SAMPLER = 5
    CUTMIX_SAMPLE = 6


def keyed_rng(*key: int) -> np.random.Generator:
    """A numpy Generator that is a pure function of ``key`` (non-negative integers)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def keyed_seed(*key: int) -> int:
    """A 63-bit integer seed that is a pure function of ``key`` (for torch.manual_seed)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return int(value)


@dataclass
class StreamPlan:
    """The paired background/foreground index streams of one rank (step-major shards of the
    epoch's global sequences; see the module docstring).

    ``steps_per_epoch`` = N // (B·W): the incomplete last global step is dropped, the same
    number of steps on every rank and for every sampler kind (all yield N per epoch).
    """

    labels: np.ndarray
    batch_size: int
    seed: int
    rank: int
    world_size: int
    background_kind: str = "uniform"
    foreground_kind: str = "balanced"

    def __post_init__(self):
        from fastlt.method.sampling import make_sampler, steps_per_epoch  # local: cheap import in DALI workers

        self.labels = np.asarray(self.labels, dtype=np.int64)
        seed = _check_nonneg_int("seed", self.seed)
        # The foreground seed is derived so that it never equals the background stream when
        # both kinds are "uniform".
        self._bg = make_sampler(self.background_kind, self.labels, seed)
        self._fg = make_sampler(self.foreground_kind, self.labels, keyed_seed(seed, Stream.FOREGROUND_SAMPLER) >> 1)
        self.steps_per_epoch = steps_per_epoch(len(self.labels), self.batch_size, self.world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size {self.batch_size} per rank × {self.world_size} rank(s) is larger than the "
                             f"epoch of {len(self.labels)} images; lower the batch size")
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(background, foreground) dataset indices of this rank for ``epoch``: steps × B each,
        sample i of step s at s·B + i."""
        from fastlt.method.sampling import shard_step_major

        epoch = _check_nonneg_int("epoch", epoch)
        if self._cache is None or self._cache[0] != epoch:
            bg, fg = (shard_step_major(s.epoch_indices(epoch), self.batch_size, self.rank, self.world_size)
                      for s in (self._bg, self._fg))
            self._cache = (epoch, bg, fg)
        return self._cache[1], self._cache[2]

    def position(self, step: int, i: int) -> int:
        """Global position in the epoch of this rank's sample ``i`` of step ``step`` (the key of
        its random choices)."""
        return (step * self.world_size + self.rank) * self.batch_size + i

    def positions(self, step: int) -> list[int]:
        """Global positions of this rank's samples of step ``step``."""
        first = self.position(step, 0)
        return list(range(first, first + self.batch_size))

    def check_start_step(self, start_step: int) -> int:
        start_step = _check_nonneg_int("start_step", start_step)
        if start_step > self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is past the end of the epoch ({self.steps_per_epoch} steps); "
                             f"it must be in [0, {self.steps_per_epoch}]")
        return start_step


def cutmix_boxes(seed: int, epoch: int, step: int, positions: Sequence[int], h: int, w: int, *, prob: float,
                 per_sample: bool, alpha: float = 1.0):
    """The CutMix decisions for the samples at global ``positions`` of global step ``step``
    (docs/design.md §1 "CutMix").

    Per batch: one coin with probability ``prob`` and one box, keyed by (seed, epoch, step),
    for every sample of the global step on every rank (the reference behaviour). Per sample:
    a coin and a box for each sample, keyed by its global position. The box is drawn by
    :func:`fastlt.method.cutmix.sample_box` (the reference's rand_bbox: side 2·⌊⌊S·r⌋/2⌋, r = √(1−λ0))
    and λ = 1 − clipped area/(H·W) by :func:`fastlt.method.cutmix.area_lambda`.

    Returns ``(boxes, lam, applied)``: int64 (n, 4) rows ``(y0, x0, y1, x1)`` (all zero where
    not applied), float32 (n,), bool (n,) for the n = len(positions) samples.
    """
    n = len(positions)
    boxes = np.zeros((n, 4), dtype=np.int64)
    lam = np.ones(n, dtype=np.float32)
    applied = np.zeros(n, dtype=bool)
    if not per_sample:
        rng = keyed_rng(seed, epoch, step, Stream.CUTMIX)
        if rng.random() < prob:
            box = sample_box(h, w, alpha, rng)
            boxes[:] = box
            lam[:] = area_lambda(box, h, w)
            applied[:] = True
        return boxes, lam, applied
    for k, p in enumerate(positions):
        rng = keyed_rng(seed, epoch, p, Stream.CUTMIX_SAMPLE)
        if rng.random() < prob:
            box = sample_box(h, w, alpha, rng)
            boxes[k] = box
            lam[k] = area_lambda(box, h, w)
            applied[k] = True
    return boxes, lam, applied


def image_source_name(dataset, index: int) -> str:
    """How to name image ``index`` of ``dataset`` in a message: its path and list line when known."""
    if hasattr(dataset, "full_path"):
        name = dataset.full_path(index)
        if hasattr(dataset, "line_number") and hasattr(dataset, "list_file"):
            name += f" (line {dataset.line_number(index)} of {dataset.list_file})"
        return name
    return f"array image {index}"


class Substitutes:
    """``on_error: skip``: pick another image of the same class for a bad one.

    The replacement for the ``attempt``-th failure at a given key is drawn uniformly among
    the other images of the class by a keyed generator, so a skip never changes the label
    and never makes the run depend on timing. Images already known to be bad are avoided.
    """

    def __init__(self, labels: np.ndarray, bad: Sequence[int] = ()):
        labels = np.asarray(labels, dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=int(labels.max()) + 1 if labels.size else 0)
        self._order = order
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._labels = labels
        self.bad = set(int(b) for b in bad)

    def members(self, cls: int) -> np.ndarray:
        return self._order[self._starts[cls]:self._starts[cls + 1]]

    def pick(self, index: int, key: Sequence[int], attempt: int) -> int | None:
        """Another image of ``index``'s class not known to be bad, or None if there is none."""
        members = self.members(int(self._labels[index]))
        candidates = [int(m) for m in members if int(m) != index and int(m) not in self.bad] \
            if len(members) <= 4096 else None
        if candidates is not None:
            if not candidates:
                return None
            rng = keyed_rng(*key, attempt, Stream.SUBSTITUTE)
            return candidates[int(rng.integers(len(candidates)))]
        # Large classes: rejection-sample instead of building the candidate list.
        rng = keyed_rng(*key, attempt, Stream.SUBSTITUTE)
        for _ in range(64):
            m = int(members[int(rng.integers(len(members)))])
            if m != index and m not in self.bad:
                return m
        return None


def load_with_policy(dataset, index: int, key: Sequence[int], on_error: str, substitutes: Substitutes,
                     load: Callable[[int], object], max_attempts: int = 8):
    """``load(index)`` with the ``on_error`` policy; returns (value, used_index, skipped_names).

    ``raise``: the first failure raises :class:`BadImageError` naming the file. ``skip``: the
    image is replaced by another one of the same class (up to ``max_attempts`` times);
    every replaced file is returned so the caller can count and log it.
    """
    skipped: list[str] = []
    current = int(index)
    for attempt in range(max_attempts + 1):
        try:
            return load(current), current, skipped
        except (OSError, ValueError, SyntaxError) as e:
            name = image_source_name(dataset, current)
            if on_error == "raise":
                raise BadImageError(f"cannot read image {name}: {describe_error(e)}. "
                                    f"Fix or remove the file, or set data.on_error: skip to replace bad "
                                    f"images by another image of the same class") from e
            skipped.append(f"{name}: {describe_error(e)}")
            substitutes.bad.add(current)
            nxt = substitutes.pick(int(index), key, attempt)
            if nxt is None:
                break
            current = nxt
    raise BadImageError(f"image {image_source_name(dataset, int(index))} is bad and no readable image of its class "
                        f"{int(substitutes._labels[index])} could replace it (tried: {'; '.join(skipped)})")


def image_storage(dataset) -> str | None:
    """How ``dataset`` holds its images: "arrays" — decoded, ``images`` uint8 (N, H, W, 3) in memory
    (``fastlt.data.ArrayDataset``, the CIFAR pickle batches); "files" — encoded, ``read_bytes(i)``
    (``fastlt.data.LongTailedList``, an image-folder dataset with the same interface); None —
    neither."""
    images = getattr(dataset, "images", None)
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8:
        return "arrays"
    if callable(getattr(dataset, "read_bytes", None)):
        return "files"
    return None


def check_dataset(spec) -> None:
    """Raise ValueError unless ``spec.dataset`` fits ``spec.recipe``: recipe "cifar" takes decoded
    arrays or encoded files (:func:`image_storage`; images of another size than ``image_size`` are
    resized to it first), recipe "imagenet" takes files."""
    storage = image_storage(spec.dataset)
    if storage is None:
        images = getattr(spec.dataset, "images", None)
        raise ValueError(f"the pipeline cannot read images from a {type(spec.dataset).__name__}: it needs either "
                         f"images uint8 (N, H, W, 3) in memory (got images {getattr(images, 'shape', None)} "
                         f"{getattr(images, 'dtype', None)}) or read_bytes(i) returning encoded image bytes. Use "
                         f"fastlt.data.ArrayDataset / cifar_lt for arrays, fastlt.data.LongTailedList for files")
    if spec.recipe == "imagenet" and storage == "arrays":
        raise ValueError(f"recipe 'imagenet' reads encoded files (read_bytes(i), fastlt.data.LongTailedList); got "
                         f"in-memory arrays {spec.dataset.images.shape}. For CIFAR-style arrays use recipe 'cifar'")
    if len(spec.dataset.labels) != len(spec.dataset):
        raise ValueError(f"dataset has {len(spec.dataset)} images but {len(spec.dataset.labels)} labels")


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _libc():
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc() if os.name == "posix" else None


def die_with_parent(parent: int) -> None:
    """Called in a reader process that process ``parent`` started: from now on the kernel kills
    this process with SIGKILL when its parent ends (Linux ``PR_SET_PDEATHSIG``), even by
    SIGKILL or the out-of-memory killer, which leave no chance to stop the readers. Without it
    a reader outlives the trainer and waits on its socket for ever. A reader whose parent has
    already gone is killed at once. Nothing happens in ``parent`` itself, or where ``prctl``
    is not available (not Linux)."""
    if os.getpid() == parent or _LIBC is None or not hasattr(_LIBC, "prctl"):
        return
    if _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # it ended before the request above was made
        os.kill(os.getpid(), signal.SIGKILL)


class SpawnedReaderSource:
    """Base of a DALI source object: a reader process that unpickles it (``py_start_method=
    "spawn"``) dies with the process that pickled it, the trainer (:func:`die_with_parent`)."""

    def __getstate__(self):
        return {**self.__dict__, "_parent": os.getpid()}

    def __setstate__(self, state):
        self.__dict__.update(state)
        die_with_parent(state["_parent"])


def default_workers(requested: int) -> int:
    """Worker processes to use: the request, bounded by the cores this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(int(requested), cores))


_TORCH_WORKER_DEATH = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|"
                                 r"exited unexpectedly(?: with exit code (-?\d+))?)")


def worker_failure(err: BaseException, *, num_workers: int, last_checkpoint=None) -> PipelineError | None:
    """The PipelineError for a data worker that died, or None when ``err`` is something else.

    torch reports a dead DataLoader worker as a RuntimeError (raised from its SIGCHLD handler,
    so anywhere in the main process); the DALI pipelines raise PipelineError themselves."""
    if isinstance(err, PipelineError):
        what = str(err)
    else:
        m = _TORCH_WORKER_DEATH.search(str(err))
        if m is None:
            return None
        pids, sig, code = m.groups()
        # torch words the signal as strsignal() does ("Killed"); name it as users know it (SIGKILL).
        names = {signal.strsignal(n): n.name for n in signal.Signals if signal.strsignal(n)}
        how = (f"was killed by signal {names.get(sig.strip(), sig.strip())}" if sig else
               f"exited unexpectedly (exit code {code})" if code else "exited unexpectedly")
        what = f"a data-loader worker process (pid {pids.strip()}) {how}"
    where = (f"The last checkpoint {last_checkpoint} is complete: continue with --resume auto"
             if last_checkpoint is not None else "No checkpoint had been written yet")
    return PipelineError(f"{what}. A worker killed by SIGKILL is most often the out-of-memory killer: lower "
                         f"pipeline.num_workers (now {num_workers}) or data.batch_size. {where}")
