"""The DALI training pipeline (``pipeline.backend: dali``, issue 5): two keyed per-sample
sources (background from the uniform sampler, foreground from the balanced one), decode,
the three background views and the foreground view of ARCHITECTURE §1 "Views", CutMix with
``fn.multi_paste`` and λ from the clipped box (§1 "CutMix"), normalisation to NCHW float —
producing the same :class:`TrainBatch` as the torch backend (§3).

Graph, per sample, top to bottom::

    background source -> bytes, label, windows, flips, colour, blur, aug choices, bad record
    foreground source -> bytes, label, window, flip, colour, aug choices, bad, mixed, λ, paste regions
    bg  = decode(bytes)                                  # cpu, or mixed (nvJPEG) on the GPU
    v0  = crop_resize_flip(bg, w0) -> colour -> RandAugment / CIFAR10Policy
    v1,2= crop_resize_flip(bg, w1,2) -> colour (jitter p .8, gray p .2) [-> blur, CIFAR]
    if mixed:  fg = same as v0 on the foreground;  image = multi_paste(v0, fg)   # CutMix
    else:      image = v0
    normalize(image, v1, v2) -> float CHW

All random parameters come from the sources (``dali_sources``), keyed by (seed, epoch, rank,
sample position, stream); the graph has no random operator. So a batch is a pure function
of (spec, epoch, step): the same whatever DALI's thread or worker count, and
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

import contextlib
import io
import re
import warnings
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def

from . import dali_ops as ops
from .batch import TrainBatch, TrainPipelineSpec
from .common import LOG, BadImageError, StreamPlan, check_extra, default_workers, image_source_name
from .dali_sources import BackgroundSource, ForegroundSource, SourceConfig, raise_from_worker
from .torch_loader import _check_dataset

__all__ = ["DaliTrainPipeline", "quiet_dali_build", "to_torch"]


_QUIET = re.compile(r"(WARNING: `nvidia\.dali\.fn\.experimental\.\w+` is now deprecated"
                    r"|The external source node .* produces \d+ outputs, but)")


@contextlib.contextmanager
def quiet_dali_build():
    """Silence two known, harmless warnings while a graph is built: DALI's auto_aug still calls
    the deprecated ``fn.experimental`` aliases, and a source output a recipe does not use
    (e.g. blur σ outside CIFAR) is reported as wasted work (a few bytes per sample).

    DALI issues the first one under its own ``simplefilter("default")``, which overrides any
    filter set here, so the messages are dropped at ``showwarning`` instead; every other
    warning is shown as usual."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not _QUIET.match(str(message)):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


@pipeline_def(enable_conditionals=True)
def _train_graph(bg_source, fg_source, *, recipe, size, augment, aug_graph, mean, std, device, with_foreground):
    (bg_data, label_a, crops, flips, col, blur_taps, aug_kinds, aug_interps, aug_params, bg_bad) = \
        fn.external_source(bg_source, num_outputs=BackgroundSource.num_outputs, batch=False, parallel=True)
    (fg_data, label_b, fg_crops, fg_flips, fg_col, fg_kinds, fg_interps, fg_params, fg_bad, mixed, lam, paste_anchors,
     paste_shapes) = fn.external_source(fg_source, num_outputs=ForegroundSource.num_outputs, batch=False,
                                        parallel=True)

    def classification_view(img, window, flag, params, a_kinds, a_interps, a_params):
        # View 0 (and the foreground's view): crop-resize-flip (pad-crop + flip for CIFAR),
        # colour jitter, then RandAugment (imagenet) / the reference's CIFAR10Policy (cifar),
        # every choice drawn by the source.
        if recipe == "cifar":
            img = ops.flip(ops.pad_crop(img, window, size), flag)
        else:
            img = ops.crop_resize(img, window, size)
        img = ops.colour(img, params)
        if aug_graph.stages:
            img = ops.keyed_augment(img, aug_graph, a_kinds, a_interps, a_params)
        return img

    def sim_view(img, window, params, taps):
        # Views 1, 2: crop-resize-flip, jitter (p .8) and grayscale (p .2) in one colour twist,
        # PIL's Gaussian blur (p .5) for CIFAR.
        img = ops.colour(ops.crop_resize(img, window, size), params)
        if recipe == "cifar":
            img = ops.blur(img, taps)
        return img

    def foreground_view():
        fg = ops.decode(fg_data, recipe, device)
        if not augment:
            return ops.resize_full(fg, size)
        return classification_view(fg, fg_crops[0], fg_flips[0], fg_col[0], fg_kinds, fg_interps, fg_params)

    bg = ops.decode(bg_data, recipe, device)
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

    outputs = [ops.normalize(image, mean, std), ops.normalize(v1, mean, std), ops.normalize(v2, mean, std),
               label_a, label_b, lam, mixed, bg_bad, fg_bad]
    if with_foreground:
        outputs.append(ops.normalize(fg_view, mean, std))
    return tuple(outputs)


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """Copy a DALI batch (uniform shape) into a new torch tensor on ``device``.

    The copy is needed: DALI reuses its output buffers on the next run."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    if hasattr(tensor_list, "as_tensor"):
        t = tensor_list.as_tensor()
    else:
        t = tensor_list
    out = torch.empty(tuple(t.shape()), dtype=to_torch_type[t.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(t, out, cuda_stream=stream)  # GPU: an async copy on the current stream
    return out


def cuda_index(device: torch.device) -> int:
    """The CUDA device ordinal for DALI: the explicit index, else the current device (set per
    local rank by the trainer), never a silent GPU 0 on a multi-GPU node."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _pil_decodes(dataset, index: int) -> str | None:
    """None if PIL decodes image ``index`` fully, else why not (used to find a file a DALI decoder
    rejected, since DALI's error no longer knows which sample it came from)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(dataset.read_bytes(index))) as im:
            im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        return f"{type(e).__name__}: {e}"
    return None


class DaliTrainPipeline:
    """Training batches of one rank from the DALI graph above.

    ``spec.extra`` options: ``py_num_workers`` (Python reader processes; default 1 on CPU,
    max(2, num_workers // 2) on GPU), ``prefetch_queue_depth`` (2),
    ``py_start_method`` ("fork" on CPU; "spawn" by default on GPU, because forking a process
    that holds a CUDA context is unsafe), ``with_foreground`` (diagnostic output).
    """

    backend = "dali"

    def __init__(self, spec: TrainPipelineSpec):
        _check_dataset(spec)
        check_extra(spec.extra)
        if spec.device not in ("cpu", "cuda") and not str(spec.device).startswith("cuda:"):
            raise ValueError(f"pipeline device must be 'cpu' or 'cuda'; got {spec.device!r}")
        self.spec = spec
        self._device = torch.device(spec.device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"pipeline device {spec.device!r} requested but CUDA is not available; use 'cpu'")
        self.plan = StreamPlan(spec.dataset.labels, spec.batch_size, spec.seed, spec.rank, spec.world_size,
                               spec.background_sampler, spec.foreground_sampler)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.num_threads = max(1, default_workers(spec.num_workers))
        # Reader processes: one keeps up with the CPU graph here (a few hundred images/s); a GPU
        # graph consumes thousands per second, so there the readers scale with the workers.
        gpu = self._device.type == "cuda"
        default_readers = max(2, spec.num_workers // 2) if gpu else 1
        self.py_workers = max(1, int(spec.extra.get("py_num_workers", default_readers)))
        self.prefetch = int(spec.extra.get("prefetch_queue_depth", 2))
        self.with_foreground = bool(spec.extra.get("with_foreground", False))
        self.tables, self.aug_graph = ops.augment_tables(
            spec.recipe, spec.image_size, spec.augment and spec.randaugment, n=spec.randaugment_n,
            m=spec.randaugment_m, mstd=spec.randaugment_mstd, mean=spec.mean)
        self._bad: set[int] = set()
        self.builds = 0  # DALI pipelines built so far (one per run, plus one per resume/jump or recovery)
        self._pipe = None
        self._next: tuple[int, int] | None = None  # (epoch, step) the live pipeline would produce next
        self._stats = {"skipped_images": 0, "skipped_files": []}

    # -- pipeline lifetime -------------------------------------------------------------
    def _build(self, epoch: int, step: int) -> None:
        self._drop()
        s = self.spec
        cfg = SourceConfig(dataset=s.dataset, recipe=s.recipe, plan=self.plan, image_size=s.image_size,
                           augment=s.augment, tables=self.tables, seed=s.seed, rank=s.rank,
                           cutmix_prob=s.cutmix_prob, cutmix_per_sample=s.cutmix_per_sample,
                           cutmix_alpha=s.cutmix_alpha, on_error=s.on_error, base_epoch=epoch, base_step=step,
                           bad=self._bad, with_foreground=self.with_foreground)
        gpu = self._device.type == "cuda"
        start = s.extra.get("py_start_method", "spawn" if gpu else "fork")
        with quiet_dali_build():
            pipe = self._make(cfg, gpu, start)
        self.builds += 1
        self._pipe = pipe
        self._next = (epoch, step)

    def _make(self, cfg, gpu: bool, start: str):
        s = self.spec
        pipe = _train_graph(BackgroundSource(cfg), ForegroundSource(cfg), recipe=s.recipe, size=s.image_size,
                            augment=s.augment, aug_graph=self.aug_graph, mean=list(s.mean),
                            std=list(s.std), device="gpu" if gpu else "cpu",
                            with_foreground=self.with_foreground,
                            batch_size=s.batch_size, num_threads=self.num_threads,
                            device_id=cuda_index(self._device) if gpu else None, seed=s.seed + s.rank,
                            py_num_workers=self.py_workers, py_start_method=start,
                            prefetch_queue_depth=self.prefetch)
        pipe.build()
        return pipe

    def _drop(self) -> None:
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            pipe._shutdown()  # stops DALI's executor; the Python worker pool closes with the object
            del pipe
        self._next = None

    def close(self) -> None:
        """Stop the DALI pipeline and its Python workers."""
        self._drop()

    def __del__(self):
        try:
            self._drop()
        except Exception:  # interpreter shutdown: DALI may already be gone
            pass

    # -- iteration -------------------------------------------------------------------
    def indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (background, foreground) dataset indices of ``epoch``, step-major."""
        return self.plan.epoch_indices(epoch)

    def stats(self) -> dict:
        """Counters of the last epoch: ``skipped_images`` and the ``skipped_files`` names."""
        return {"skipped_images": self._stats["skipped_images"], "skipped_files": list(self._stats["skipped_files"])}

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]:
        start_step = self.plan.check_start_step(start_step)
        self.plan.epoch_indices(epoch)  # validates epoch
        self._stats = {"skipped_images": 0, "skipped_files": []}
        if start_step == self.steps_per_epoch:
            return
        if self._pipe is None or self._next != (epoch, start_step):
            self._build(epoch, start_step)
        self._next = None  # while iterating, the pipeline's position is ours only
        step = start_step
        try:
            while step < self.steps_per_epoch:
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
        finally:
            if self._stats["skipped_images"]:
                LOG.warning("epoch %d: replaced %d unreadable image(s) by images of the same class "
                            "(on_error: skip); first: %s", epoch, self._stats["skipped_images"],
                            self._stats["skipped_files"][0])

    def _finish_epoch(self, epoch: int) -> None:
        """Consume DALI's end of epoch and reset, so the next epoch starts prefetching now."""
        try:
            self._pipe.run()
        except StopIteration:
            self._pipe.reset()
            self._next = (epoch + 1, 0)
            return
        except Exception:
            self._drop()  # a failure in the next epoch's prefetch: rebuilt and reported there
            return
        self._drop()  # DALI did not stop where expected: never reuse such a pipeline

    def _batch(self, outs) -> TrainBatch:
        dev = self._device
        host = torch.device("cpu")
        image, view1, view2 = (to_torch(o, dev) for o in outs[:3])
        label_a = to_torch(outs[3], host).reshape(-1)
        label_b = to_torch(outs[4], host).reshape(-1)
        lam = to_torch(outs[5], host).reshape(-1)
        mixed = to_torch(outs[6], host).reshape(-1).to(torch.bool)
        for bad in (to_torch(outs[7], host), to_torch(outs[8], host)):
            n = int(bad[:, 1].sum())
            if n:
                self._stats["skipped_images"] += n
                for idx in bad[:, 0][bad[:, 0] >= 0].tolist():
                    self._stats["skipped_files"].append(image_source_name(self.spec.dataset, int(idx)))
        label_b = torch.where(mixed, label_b, label_a)
        extra = {}
        if self.with_foreground:
            extra["foreground"] = to_torch(outs[9], dev)
        return TrainBatch(image=image, view1=view1, view2=view2, label_a=label_a.to(dev, non_blocking=True),
                          label_b=label_b.to(dev, non_blocking=True), lam=lam.to(dev, non_blocking=True),
                          mixed=mixed.to(dev, non_blocking=True), **extra)

    def _recover(self, err: Exception, epoch: int, step: int) -> None:
        """A DALI run failed. A reader worker's BadImageError is re-raised as such (``raise``).
        Otherwise the decoder rejected a file that passed the header check: find it among the
        images of this and the prefetched steps by decoding them with PIL; ``raise`` names it,
        ``skip`` marks it bad and rebuilds the (stateless) pipeline at this step."""
        self._drop()  # a failed DALI pipeline object cannot be run again
        raise_from_worker(err)
        if self.spec.recipe == "cifar":
            raise err
        culprits = []
        b = self.spec.batch_size
        bg, fg = self.plan.epoch_indices(epoch)
        last = min(self.steps_per_epoch, step + self.prefetch + 2)
        seen = set()
        for idx in np.concatenate([bg[step * b:last * b], fg[step * b:last * b]]).tolist():
            if idx in seen or idx in self._bad:
                continue
            seen.add(idx)
            why = _pil_decodes(self.spec.dataset, idx)
            if why is not None:
                culprits.append((idx, why))
        if not culprits:
            raise RuntimeError(f"the DALI pipeline failed at epoch {epoch}, step {step}, and no image of the steps "
                               f"{step}..{last - 1} fails to decode with PIL; DALI said: {err}") from err
        names = "; ".join(f"{image_source_name(self.spec.dataset, i)} ({why})" for i, why in culprits)
        if self.spec.on_error == "raise":
            raise BadImageError(f"cannot decode image(s) {names}. Fix or remove the file(s), or set data.on_error: "
                                f"skip to replace bad images by another image of the same class") from err
        LOG.warning("DALI decoder failed at epoch %d step %d; marking bad and rebuilding: %s", epoch, step, names)
        self._bad.update(i for i, _ in culprits)
        self._build(epoch, step)
