"""The DALI training pipeline (``pipeline.backend: dali``): two keyed per-sample
sources (background from the uniform sampler, foreground from the balanced one), decode,
the three background views and the foreground view of docs/design.md §1 "Views", CutMix with
``fn.multi_paste`` and λ from the clipped box (§1 "CutMix"), normalisation to NCHW float —
producing the same :class:`TrainBatch` as the torch backend (§3).

Graph, per sample, top to bottom::

    background source -> bytes, label, windows, flips, jitter, blur, aug choices, bad record
    foreground source -> bytes, label, window, flip, jitter, aug choices, bad, mixed, λ, paste regions
    bg  = decode(bytes)                                  # cpu, or mixed (nvJPEG) on the GPU
          [-> resize to size × size, CIFAR recipe, unless arrays of that size]
    v0  = crop_resize_flip(bg, w0) -> jitter -> RandAugment / CIFAR10Policy
    v1,2= crop_resize_flip(bg, w1,2) -> jitter (p .8) -> gray (p .2) [-> blur, CIFAR]
    if mixed:  fg = same as v0 on the foreground;  image = multi_paste(v0, fg)   # CutMix
    else:      image = v0
    normalize(image, v1, v2) -> float CHW

All random parameters come from the sources (``dali_sources``), keyed by (seed, epoch, global
sample position, stream); the graph has no random operator. So a batch is a pure function
of (spec, epoch, step): the same whatever DALI's thread or worker count or the number of
ranks sharing the global step, and
``epoch(e, start_step)`` continues a stopped epoch exactly. The random-resized-crop
windows are drawn in the source (torchvision's rule, from the header's image size) and
applied by ``fn.resize`` with a region of interest after one full decode, which also flips
(a mirrored window). DALI's ``decoders.image_random_crop`` is not used: its window comes
from DALI's internal generator, which cannot be keyed by sample; and on the CPU, three ROI
decodes of one image (``decoders.image_slice``, measured) cost more than one full decode
shared by the three views.

CPU mode (``device="cpu"``, DALI ``device_id=None``) is a first-class target; GPU mode
(``device="cuda"``) differs only in the decoder (``mixed``) and where the images live —
see ``dali_ops``. The GPU path is not exercised by the CPU test suite.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def

from . import dali_ops as ops
from .batch import TrainBatch, image_layout
from .common import LOG, StreamPlan, image_source_name
from .dali_base import DaliPipelineBase, cuda_index, feed_into, quiet_dali_build, readers_die_with_us, to_torch
from .dali_sources import BackgroundSource, ForegroundSource, SourceConfig
from .spec import TrainPipelineSpec, check_extra

__all__ = ["DaliTrainPipeline"]


@pipeline_def(enable_conditionals=True)
def _train_graph(bg_source, fg_source, *, recipe, size, arrays, fit, augment, aug_graph, mean, std, device,
                 with_foreground, layout, half):
    (bg_data, label_a, crops, flips, col, blur_taps, aug_kinds, aug_interps, aug_params, bg_bad) = \
        fn.external_source(bg_source, num_outputs=BackgroundSource.num_outputs, batch=False, parallel=True)
    (fg_data, label_b, fg_crops, fg_flips, fg_col, fg_kinds, fg_interps, fg_params, fg_bad, mixed, lam, paste_anchors,
     paste_shapes) = fn.external_source(fg_source, num_outputs=ForegroundSource.num_outputs, batch=False,
                                        parallel=True)

    def classification_view(img, window, flag, params, a_kinds, a_interps, a_params):
        # View 0 (and the foreground's view): crop-resize-flip (pad-crop + flip for CIFAR),
        # colour jitter (torchvision's, in the drawn order), then RandAugment (imagenet) / the
        # reference's CIFAR10Policy (cifar), every choice drawn by the source.
        if recipe == "cifar":
            img = ops.flip(ops.pad_crop(img, window, size), flag)
        else:
            img = ops.crop_resize(img, window, size)
        img = ops.jitter(img, params)
        if aug_graph.stages:
            img = ops.keyed_augment(img, aug_graph, a_kinds, a_interps, a_params)
        return img

    def sim_view(img, window, params, taps):
        # Views 1, 2: crop-resize-flip, jitter (p .8, torchvision's order drawn per sample) and
        # grayscale (p .2), PIL's Gaussian blur (p .5) for CIFAR.
        img = ops.jitter(ops.crop_resize(img, window, size), params)
        if recipe == "cifar":
            img = ops.blur(img, taps)
        return img

    def decoded(data):
        # Files are decoded here; arrays are already pixels. The CIFAR recipe then brings every
        # image to size × size (a no-op pass-through for images already that size).
        img = ops.decode(data, arrays, device)
        return ops.fit(img, size) if fit else img

    def foreground_view():
        fg = decoded(fg_data)
        if not augment:
            return ops.resize_full(fg, size)
        return classification_view(fg, fg_crops[0], fg_flips[0], fg_col[0], fg_kinds, fg_interps, fg_params)

    bg = decoded(bg_data)
    if augment:
        v0 = classification_view(bg, crops[0], flips[0], col[0], aug_kinds, aug_interps, aug_params)
        v1 = sim_view(bg, crops[1], col[1], blur_taps[1])
        v2 = sim_view(bg, crops[2], col[2], blur_taps[2])
    else:
        # Deterministic test mode: every view is the whole image resized to size × size.
        v0 = v1 = v2 = ops.resize_full(bg, size)

    # CutMix: only the mixed samples decode and augment a foreground (the conditional splits
    # the batch); fn.multi_paste lays the whole background, then the foreground's box.
    fg_view = foreground_view() if with_foreground else None
    if mixed:
        fg = fg_view if with_foreground else foreground_view()
        image = fn.multi_paste(v0, fg, in_anchors=paste_anchors, shapes=paste_shapes, out_anchors=paste_anchors)
    else:
        image = v0

    # The model's layout (HWC = channels-last storage) and, for fp16 weights, dtype come out of
    # the normalisation itself, so the trainer needs no conversion pass.
    outputs = [ops.normalize(v, mean, std, layout, half) for v in (image, v1, v2)] + [
        label_a, label_b, lam, mixed, bg_bad, fg_bad]
    if with_foreground:
        outputs.append(ops.normalize(fg_view, mean, std))
    return tuple(outputs)


class DaliTrainPipeline(DaliPipelineBase):
    """Training batches of one rank from the DALI graph above.

    ``spec.extra`` options: ``py_num_workers`` (Python reader processes; default 1 on CPU,
    max(2, num_workers // 2) on GPU), ``prefetch_queue_depth`` (2),
    ``py_start_method`` ("fork" on CPU; "spawn" by default on GPU, because forking a process
    that holds a CUDA context is unsafe), ``with_foreground`` (diagnostic output).
    ``self._position`` is the (epoch, step) the live pipeline would produce next.
    """

    def __init__(self, spec: TrainPipelineSpec):
        check_extra(spec.extra)
        if spec.device not in ("cpu", "cuda") and not str(spec.device).startswith("cuda:"):
            raise ValueError(f"pipeline device must be 'cpu' or 'cuda'; got {spec.device!r}")
        super().__init__(spec)
        self.plan = StreamPlan(spec.dataset.labels, spec.batch_size, spec.seed, spec.rank, spec.world_size,
                               spec.background_sampler, spec.foreground_sampler)
        self.steps_per_epoch = self.plan.steps_per_epoch
        # Reader processes: one keeps up with the CPU graph here (a few hundred images/s); a GPU
        # graph consumes thousands per second, so there the readers scale with the workers.
        default_readers = max(2, spec.num_workers // 2) if self.gpu else 1
        self.py_workers = max(1, int(spec.extra.get("py_num_workers", default_readers)))
        self.prefetch = int(spec.extra.get("prefetch_queue_depth", 2))
        self.with_foreground = bool(spec.extra.get("with_foreground", False))
        self.tables, self.aug_graph = ops.augment_tables(
            spec.recipe, spec.image_size, spec.augment and spec.randaugment, n=spec.randaugment_n,
            m=spec.randaugment_m, mstd=spec.randaugment_mstd, mean=spec.mean)
        self.builds = 0  # DALI pipelines built so far (one per run, plus one per resume/jump or recovery)
        self.dtype, memory_format = image_layout(spec)
        self.channels_last = memory_format == torch.channels_last

    # -- pipeline lifetime -------------------------------------------------------------
    def _build(self, epoch: int, step: int) -> None:
        self._drop()
        s = self.spec
        cfg = SourceConfig(dataset=s.dataset, recipe=s.recipe, plan=self.plan, image_size=s.image_size,
                           augment=s.augment, tables=self.tables, seed=s.seed, rank=s.rank,
                           cutmix_prob=s.cutmix_prob, cutmix_per_sample=s.cutmix_per_sample,
                           cutmix_alpha=s.cutmix_alpha, on_error=s.on_error, base_epoch=epoch, base_step=step,
                           bad=self._bad, with_foreground=self.with_foreground,
                           max_pixels=s.max_image_pixels)
        gpu = self._device.type == "cuda"
        start = s.extra.get("py_start_method", "spawn" if gpu else "fork")
        with quiet_dali_build(), readers_die_with_us():
            pipe = self._make(cfg, gpu, start)
        self.builds += 1
        self._pipe = pipe
        self._position = (epoch, step)

    def _make(self, cfg, gpu: bool, start: str):
        s = self.spec
        pipe = _train_graph(BackgroundSource(cfg), ForegroundSource(cfg), recipe=s.recipe, size=s.image_size,
                            arrays=cfg.arrays, fit=ops.needs_fit(s.recipe, s.dataset, s.image_size),
                            augment=s.augment, aug_graph=self.aug_graph, mean=list(s.mean),
                            std=list(s.std), device="gpu" if gpu else "cpu",
                            with_foreground=self.with_foreground,
                            layout="HWC" if self.channels_last else "CHW", half=self.dtype == torch.float16,
                            batch_size=s.batch_size, num_threads=self.num_threads,
                            device_id=cuda_index(self._device) if gpu else None, seed=s.seed + s.rank,
                            py_num_workers=self.py_workers, py_start_method=start,
                            prefetch_queue_depth=self.prefetch)
        pipe.build()
        return pipe

    # -- iteration -------------------------------------------------------------------
    def indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (background, foreground) dataset indices of ``epoch``, step-major."""
        return self.plan.epoch_indices(epoch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]:
        start_step = self.plan.check_start_step(start_step)
        self.plan.epoch_indices(epoch)  # validates epoch
        self._stats = {"skipped_images": 0, "skipped_files": []}
        if start_step == self.steps_per_epoch:
            return
        if self._pipe is None or self._position != (epoch, start_step):
            self._build(epoch, start_step)
        self._position = None  # while iterating, the pipeline's position is ours only
        step = start_step
        # Replaced images are reported by the caller from stats() (the trainer, once per epoch).
        while step < self.steps_per_epoch:
            self._check_workers()
            try:
                outs = self._pipe.run()
            except StopIteration:
                raise RuntimeError(f"DALI ended epoch {epoch} after {step} of {self.steps_per_epoch} steps; "
                                   f"this is a bug in fastlt.pipelines") from None
            except Exception as e:
                self._recover(e, epoch, step)  # raises, or rebuilds at (epoch, step) to retry
                continue
            yield self._batch(outs)
            step += 1
        self._finish_epoch(epoch)

    def _finish_epoch(self, epoch: int) -> None:
        """Consume DALI's end of epoch and reset, so the next epoch starts prefetching now."""
        try:
            self._pipe.run()
        except StopIteration:
            self._pipe.reset()
            self._position = (epoch + 1, 0)
            return
        except Exception:
            self._check_workers()  # a reader died (killed): reported now, not rebuilt around
            self._drop()  # another failure in the next epoch's prefetch: rebuilt and reported there
            return
        self._drop()  # DALI did not stop where expected: never reuse such a pipeline

    def _batch(self, outs) -> TrainBatch:
        dev = self._device
        b, size = self.spec.batch_size, self.spec.image_size
        # The step's one image tensor: each of DALI's three view outputs is copied into its rows
        # (DALI reuses its own output buffers, so one copy is needed), in the model's layout.
        shape = (3 * b, size, size, 3) if self.channels_last else (3 * b, 3, size, size)
        # DALI has no bfloat16: such images come out as float32 and are cast in one more pass.
        fed = torch.float32 if self.dtype == torch.bfloat16 else self.dtype
        images = torch.empty(shape, dtype=fed, device=dev)
        for k in range(3):
            feed_into(outs[k], images[k * b:(k + 1) * b])
        if fed != self.dtype:
            images = images.to(self.dtype)
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)  # NCHW view of NHWC storage: channels-last
        # The small per-sample outputs go to the device from pinned memory, without waiting.
        pinned = dev.type == "cuda"
        label_a, label_b, lam, mixed = (to_torch(o, torch.device("cpu"), pin=pinned).reshape(-1) for o in outs[3:7])
        mixed = mixed.to(torch.bool)
        for bad in (to_torch(outs[7], torch.device("cpu")), to_torch(outs[8], torch.device("cpu"))):
            n = int(bad[:, 1].sum())
            if n:
                self._stats["skipped_images"] += n
                self._stats["skipped_files"].extend(image_source_name(self.spec.dataset, int(idx))
                                                    for idx in bad[:, 0][bad[:, 0] >= 0].tolist())
        label_b = torch.where(mixed, label_b, label_a)
        extra = {}
        if self.with_foreground:
            fg = to_torch(outs[9], dev)
            extra["foreground"] = fg.permute(0, 3, 1, 2) if self.channels_last else fg
        return TrainBatch(images=images, label_a=label_a.to(dev, non_blocking=True),
                          label_b=label_b.to(dev, non_blocking=True), lam=lam.to(dev, non_blocking=True),
                          mixed=mixed.to(dev, non_blocking=True), **extra)

    def _recover(self, err: Exception, epoch: int, step: int) -> None:
        """A DALI run failed. A reader worker's BadImageError is re-raised as such (``raise``).
        Otherwise the decoder rejected a file that passed the header check: find it among the
        images of this and the prefetched steps by decoding them with PIL; ``raise`` names it,
        ``skip`` marks it bad and rebuilds the (stateless) pipeline at this step."""
        b = self.spec.batch_size
        bg, fg = self.plan.epoch_indices(epoch)
        last = min(self.steps_per_epoch, step + self.prefetch + 2)
        bad, names = self._undecodable(err, np.concatenate([bg[step * b:last * b], fg[step * b:last * b]]).tolist(),
                                       f"at epoch {epoch}, step {step} (steps {step}..{last - 1} checked)")
        self._raise_or_mark(err, bad, names, "image(s)", "replace bad images by another image of the same class")
        LOG.warning("DALI decoder failed at epoch %d step %d; marking bad and rebuilding: %s", epoch, step, names)
        self._build(epoch, step)
