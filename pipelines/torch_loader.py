"""The torch DataLoader backend (``pipeline.backend: torch``): the fallback where DALI is not
installed and the baseline of ``bench/bench_pipeline.py``. It produces the same
:class:`~fastlt.pipelines.batch.TrainBatch` as the DALI graphs (docs/design.md §3).

One DataLoader item is one whole step: a worker reads the step's background and foreground
images (``read_bytes`` + PIL decode, or in-memory arrays; under the CIFAR recipe resized to
the view size where they are not that size), makes the three background views and the
foreground view of docs/design.md §1 "Views" (``transforms.py``), and applies CutMix to the
classification view with the step's keyed box (``common.py``).
Every random choice is a keyed draw of (seed, epoch, global sample position) — the views'
parameters are the ones the DALI sources draw for the same key (``view_draw``), applied with
torchvision's, timm's and PIL's functions (``torch_views``) — and CutMix of (seed, epoch, global
step): batches do not
depend on the number of workers or of ranks, and ``start_step`` resumes mid-epoch without
decoding the skipped steps.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .batch import TrainBatch, image_layout
from .common import (DEFAULT_MAX_IMAGE_PIXELS, LOG, BadImageError, PipelineError, Stream, StreamPlan, Substitutes,
                     check_dataset, cutmix_boxes, decode_image, default_workers, describe_error, image_source_name,
                     image_storage, keyed_rng, load_with_policy)
from .spec import TrainPipelineSpec, ValPipelineSpec, check_extra
from .torch_views import apply_view
from .transforms import finish_transform, val_transform
from .view_draw import augment_tables, draw_views

__all__ = ["TorchTrainPipeline", "TorchValPipeline", "image_loader"]


def _as_raised(err: BadImageError) -> BadImageError:
    """A worker's BadImageError as the worker raised it: torch re-raises it in the main process
    with the worker's whole traceback as its message; the last line is the message itself."""
    text = str(err).strip()
    if "Original Traceback" not in text:
        return err
    return BadImageError(text.splitlines()[-1].split("BadImageError: ", 1)[-1])


def _dead_worker(iterator) -> PipelineError | None:
    """After torch's "DataLoader worker ... exited unexpectedly": which worker died and how (torch
    knows the exit status but does not say it)."""
    for w in getattr(iterator, "_workers", ()):
        code = w.exitcode
        if code not in (None, 0):
            try:
                how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            except ValueError:
                how = f"exited with status {code}"
            return PipelineError(f"a data-loader worker process (pid {w.pid}) {how}")
    return None


@contextlib.contextmanager
def _worker_errors(iterator):
    """Failures of the DataLoader's workers as fastlt's errors: a worker's BadImageError as the
    worker raised it, a dead worker as a PipelineError saying which and how it died."""
    try:
        yield
    except BadImageError as e:
        raise _as_raised(e) from None
    except RuntimeError:
        if (dead := _dead_worker(iterator)) is None:
            raise
        raise dead from None


def image_loader(dataset, recipe: str, size: int | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """A function index -> RGB PIL image; raises OSError/ValueError for a missing or undecodable
    file (handled by the ``on_error`` policy).

    In-memory arrays (``image_storage`` "arrays") are taken as they are; encoded files are
    decoded fully with PIL. With the cifar recipe and ``size``, an image that is not
    size × size (a 28 px or 64 px file, say) is first resized to it — PIL bilinear, antialiased
    when shrinking, the aspect ratio not kept — so that the pad-crop and the policy see the
    geometry they are defined for; size × size images are not touched."""
    from PIL import Image

    fit = size if recipe == "cifar" else None

    def fitted(img):
        if fit is not None and img.size != (fit, fit):
            return img.resize((fit, fit), Image.BILINEAR)
        return img

    if image_storage(dataset) == "arrays":
        images = dataset.images

        def load_array(i: int):
            return fitted(Image.fromarray(np.ascontiguousarray(images[i]), mode="RGB"))

        return load_array

    def load_file(i: int):
        # Header first (the pixel limit), then the full decode; any failure is a ValueError.
        return fitted(decode_image(dataset.read_bytes(i), max_pixels))

    return load_file


class _StepDataset(Dataset):
    """Map-style dataset whose item ``step`` is the whole batch of that step of one epoch."""

    def __init__(self, spec: TrainPipelineSpec, plan: StreamPlan, epoch: int):
        self.spec = spec
        self.plan = plan
        self.epoch = epoch
        self.bg, self.fg = plan.epoch_indices(epoch)
        self.labels = np.asarray(spec.dataset.labels, dtype=np.int64)
        self.tables, self.fill = augment_tables(spec.recipe, spec.image_size, spec.augment and spec.randaugment,
                                                n=spec.randaugment_n, m=spec.randaugment_m,
                                                mstd=spec.randaugment_mstd, mean=spec.mean)
        self.finish = finish_transform(spec.mean, spec.std)
        self.load = image_loader(spec.dataset, spec.recipe, spec.image_size, spec.max_image_pixels)
        self.substitutes = Substitutes(self.labels)
        self.with_foreground = bool(spec.extra.get("with_foreground", False))
        self.dtype, self.memory_format = image_layout(spec)

    def __len__(self) -> int:
        return len(self.bg) // self.spec.batch_size

    def _sample(self, index: int, position: int, stream: int, views: int, skipped: list):
        s = self.spec
        key = (s.seed, self.epoch, position, stream)
        img, used, bad = load_with_policy(s.dataset, index, key, s.on_error, self.substitutes, self.load)
        skipped.extend(bad)
        # The views' parameters are the keyed draw the DALI sources make for the same key
        # (view_draw): the views are a pure function of (seed, epoch, global position, stream),
        # and the same images as the DALI backend's.
        rng = keyed_rng(*key)
        params = draw_views(rng, s.recipe, (img.size[1], img.size[0]), views, augment=s.augment)
        choices = self.tables.choices(rng)
        out = [self.finish(apply_view(img, p, s.image_size, tables=self.tables if v == 0 else None,
                                      choices=choices, fill=self.fill, augment=s.augment))
               for v, p in enumerate(params)]
        return out, int(self.labels[used])

    def __getitem__(self, step: int):
        s = self.spec
        b, size = s.batch_size, s.image_size
        # CutMix decisions first: a foreground image is only loaded and augmented where a box
        # is pasted (about half the samples at cutmix_prob 0.5), unless the caller asks for it.
        positions = self.plan.positions(step)
        boxes, lam, applied = cutmix_boxes(s.seed, self.epoch, step, positions, size, size, prob=s.cutmix_prob,
                                           per_sample=s.cutmix_per_sample, alpha=s.cutmix_alpha)
        # The step's one image tensor, in the model's layout and dtype: every view is written
        # into its row once (the cast, if any, happens in that write).
        images = torch.empty((3 * b, 3, size, size), dtype=self.dtype, memory_format=self.memory_format)
        skipped: list[str] = []
        la, lb = [], []
        fgv = {}
        for i in range(b):
            pos, gpos = step * b + i, positions[i]
            views, ya = self._sample(int(self.bg[pos]), gpos, Stream.BACKGROUND, 3, skipped)
            for k, v in enumerate(views):
                images[k * b + i].copy_(v)
            la.append(ya)
            if applied[i] or self.with_foreground:
                (fgv[i],), yb = self._sample(int(self.fg[pos]), gpos, Stream.FOREGROUND, 1, skipped)
            else:
                yb = ya  # label_b equals label_a where nothing is pasted (the contract)
            lb.append(yb if applied[i] else ya)
        for i in np.flatnonzero(applied):
            y0, x0, y1, x1 = (int(v) for v in boxes[i])
            images[i, :, y0:y1, x0:x1] = fgv[i][:, y0:y1, x0:x1]
        batch = dict(images=images, label_a=torch.tensor(la, dtype=torch.int64),
                     label_b=torch.tensor(lb, dtype=torch.int64), lam=torch.from_numpy(lam),
                     mixed=torch.from_numpy(applied))
        if self.with_foreground:
            batch["foreground"] = torch.stack([fgv[i] for i in range(b)])
        return batch, skipped


class TorchTrainPipeline:
    """Training batches of one rank from a torch DataLoader (see the module docstring).

    ``spec.extra`` options: ``with_foreground`` (bool) adds the pre-paste foreground view to
    each batch (diagnostics/tests); ``prefetch_factor`` (int, default 2) steps per worker.
    """

    backend = "torch"

    def __init__(self, spec: TrainPipelineSpec):
        check_dataset(spec)
        check_extra(spec.extra)
        self.spec = spec
        self.plan = StreamPlan(spec.dataset.labels, spec.batch_size, spec.seed, spec.rank, spec.world_size,
                               spec.background_sampler, spec.foreground_sampler)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.num_workers = default_workers(spec.num_workers)
        self._stats = {"skipped_images": 0, "skipped_files": []}
        self._device = torch.device(spec.device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"pipeline device {spec.device!r} requested but CUDA is not available; use device 'cpu'")

    def indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (background, foreground) dataset indices of ``epoch``, step-major."""
        return self.plan.epoch_indices(epoch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]:
        start_step = self.plan.check_start_step(start_step)
        self._stats = {"skipped_images": 0, "skipped_files": []}
        dataset = _StepDataset(self.spec, self.plan, epoch)
        steps = range(start_step, self.steps_per_epoch)
        if len(steps) == 0:
            return
        pin = self._device.type == "cuda"
        kwargs = {}
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = int(self.spec.extra.get("prefetch_factor", 2))
        loader = DataLoader(dataset, batch_size=None, sampler=steps, num_workers=self.num_workers,
                            pin_memory=pin, **kwargs)
        iterator = iter(loader)
        with _worker_errors(iterator):
            for batch, skipped in iterator:
                if skipped:
                    self._stats["skipped_images"] += len(skipped)
                    self._stats["skipped_files"].extend(skipped)
                if pin:
                    batch = {k: v.to(self._device, non_blocking=True) for k, v in batch.items()}
                yield TrainBatch(**batch)
        # Replaced images are reported by the caller from stats() (the trainer, once per epoch):
        # a consumer that stops at steps_per_epoch never runs code placed after this loop.

    def stats(self) -> dict:
        """Counters of the last epoch: ``skipped_images`` and the ``skipped_files`` messages."""
        return {"skipped_images": self._stats["skipped_images"], "skipped_files": list(self._stats["skipped_files"])}

    def close(self) -> None:
        """Nothing persistent: workers live for one epoch's iteration."""


class _ValDataset(Dataset):
    def __init__(self, spec: ValPipelineSpec, indices: np.ndarray):
        self.spec = spec
        self.indices = indices
        self.labels = np.asarray(spec.dataset.labels, dtype=np.int64)
        self.transform = val_transform(spec.recipe, spec.image_size, spec.mean, spec.std)
        self.load = image_loader(spec.dataset, spec.recipe, spec.image_size, spec.max_image_pixels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        try:
            img = self.load(i)
        except (OSError, ValueError, SyntaxError) as e:
            name = image_source_name(self.spec.dataset, i)
            if self.spec.on_error == "raise":
                raise BadImageError(f"cannot read validation image {name}: {describe_error(e)}. Fix or remove "
                                    f"the file, or set data.on_error: skip to leave it out of evaluation") from e
            return None, f"{name}: {describe_error(e)}"
        return (self.transform(img), int(self.labels[i])), None


def _collate_val(items):
    good = [it for it, _ in items if it is not None]
    bad = [msg for _, msg in items if msg is not None]
    if good:
        images = torch.stack([g[0] for g in good])
        labels = torch.tensor([g[1] for g in good], dtype=torch.int64)
    else:
        images, labels = None, None
    return images, labels, bad


class TorchValPipeline:
    """Validation batches ``(images, labels)`` of one rank: images ``rank::world_size`` (no
    padding: every image is evaluated exactly once across ranks). Iterating again is another
    pass. With ``on_error: skip`` an unreadable image is left out (never replaced: evaluating
    a substitute would bias the score) and counted in :meth:`stats`."""

    backend = "torch"

    def __init__(self, spec: ValPipelineSpec):
        check_dataset(spec)
        self.spec = spec
        self.indices = np.arange(spec.rank, len(spec.dataset), spec.world_size, dtype=np.int64)
        self.num_workers = default_workers(spec.num_workers)
        self._device = torch.device(spec.device)
        self._stats = {"skipped_images": 0, "skipped_files": []}

    def __len__(self) -> int:
        """Number of batches of this rank."""
        return -(-len(self.indices) // self.spec.batch_size)

    def __iter__(self):
        self._stats = {"skipped_images": 0, "skipped_files": []}
        if len(self.indices) == 0:
            return
        loader = DataLoader(_ValDataset(self.spec, self.indices), batch_size=self.spec.batch_size, shuffle=False,
                            num_workers=self.num_workers, collate_fn=_collate_val,
                            pin_memory=self._device.type == "cuda")
        iterator = iter(loader)
        with _worker_errors(iterator):
            for images, labels, bad in iterator:
                if bad:
                    self._stats["skipped_images"] += len(bad)
                    self._stats["skipped_files"].extend(bad)
                if images is None:
                    continue
                yield images.to(self._device, non_blocking=True), labels.to(self._device, non_blocking=True)
        if self._stats["skipped_images"]:
            LOG.warning("validation: left out %d unreadable image(s) (on_error: skip); first: %s",
                        self._stats["skipped_images"], self._stats["skipped_files"][0])

    def stats(self) -> dict:
        return {"skipped_images": self._stats["skipped_images"], "skipped_files": list(self._stats["skipped_files"])}

    def close(self) -> None:
        """Nothing persistent."""
