"""The DALI validation pipeline (docs/design.md §1 "Evaluation"): decode, resize the shorter side to 256/224·size and centre-crop size
(ImageNet-style recipes), CIFAR-recipe images resized to size × size (arrays of that size as they
are), normalised to NCHW float.

Each rank reads images ``rank::world_size`` of the list, without padding, so that every
image is evaluated exactly once across ranks; the last batch may be smaller. The source is
a batch-mode parallel ``external_source`` keyed by (pass, batch index), so iterating again
is another identical pass. ``on_error``: ``raise`` names the file; ``skip`` leaves the image
out of the evaluation (a substitute would bias the score) and counts it.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from . import dali_ops as ops
from .common import (DEFAULT_MAX_IMAGE_PIXELS, LOG, BadImageError, SpawnedReaderSource, check_encoded_image, describe_error,
                     image_source_name, image_storage)
from .dali_base import DaliPipelineBase, cuda_index, quiet_dali_build, readers_die_with_us, to_torch
from .spec import ValPipelineSpec
from .transforms import val_resize_size

__all__ = ["DaliValPipeline", "ValSource"]


def _placeholder_jpeg() -> np.ndarray:
    """A valid 8×8 JPEG decoded in place of a skipped image; its row is dropped afterwards."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="JPEG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


class ValSource(SpawnedReaderSource):
    """Batch-mode source: batch ``k`` of a pass holds this rank's images k·B … k·B+B−1
    (counted from ``start``). Outputs data, label int64 (), keep bool () — False where an
    unreadable image was replaced by a placeholder (``skip``) — and the dataset index."""

    def __init__(self, dataset, recipe: str, indices: np.ndarray, batch_size: int, on_error: str, start: int = 0,
                 bad=(), max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.dataset, self.recipe, self.indices = dataset, recipe, indices
        self.max_pixels = max_pixels
        self.arrays = image_storage(dataset) == "arrays"
        self.batch_size, self.on_error, self.start = batch_size, on_error, start
        self.bad = frozenset(int(b) for b in bad)
        self.labels = np.asarray(dataset.labels, dtype=np.int64)
        self._placeholder = None

    def _read(self, i: int):
        if self.arrays:
            return np.ascontiguousarray(self.dataset.images[i]), True
        try:
            if i in self.bad:
                raise ValueError("the DALI decoder failed on this file earlier in this pass")
            data = self.dataset.read_bytes(i)
            check_encoded_image(data, self.max_pixels)
            return np.frombuffer(data, dtype=np.uint8), True
        except (OSError, ValueError, SyntaxError) as e:
            name = image_source_name(self.dataset, i)
            if self.on_error == "raise":
                raise BadImageError(f"cannot read validation image {name}: {describe_error(e)}. Fix or remove "
                                    f"the file, or set data.on_error: skip to leave it out of evaluation") from e
            if self._placeholder is None:
                self._placeholder = _placeholder_jpeg()
            return self._placeholder, False

    def __call__(self, info):
        lo = self.start + int(info.iteration) * self.batch_size
        if lo >= len(self.indices):
            raise StopIteration
        data, labels, keep, index = [], [], [], []
        for i in self.indices[lo:lo + self.batch_size].tolist():
            d, ok = self._read(i)
            data.append(d)
            labels.append(np.array(self.labels[i], np.int64))
            keep.append(np.array(ok))
            index.append(np.array(i, np.int64))
        return data, labels, keep, index


@pipeline_def
def _val_graph(source, *, recipe, size, arrays, mean, std, device):
    data, labels, keep, index = fn.external_source(source, num_outputs=4, batch=True, batch_info=True, parallel=True)
    img = ops.decode(data, arrays, device)
    if recipe == "imagenet":
        img = fn.resize(img, resize_shorter=val_resize_size(size), antialias=True, interp_type=types.INTERP_LINEAR)
        out = fn.crop_mirror_normalize(img, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5, rounding="truncate",
                                       dtype=types.FLOAT,
                                       output_layout="CHW", mean=[255.0 * m for m in mean],
                                       std=[255.0 * s for s in std])
    else:
        out = ops.normalize(ops.resize_full(img, size), mean, std)
    return out, labels, keep, index


class DaliValPipeline(DaliPipelineBase):
    """Validation batches ``(images, labels)`` of one rank from DALI (see the module docstring).
    ``self._position`` is the batch the live pipeline would produce next (0: a fresh pass)."""

    def __init__(self, spec: ValPipelineSpec):
        super().__init__(spec)
        self.indices = np.arange(spec.rank, len(spec.dataset), spec.world_size, dtype=np.int64)
        self._start = 0

    def __len__(self) -> int:
        return -(-len(self.indices) // self.spec.batch_size)

    def _build(self, start_batch: int) -> None:
        self._drop()
        s = self.spec
        source = ValSource(s.dataset, s.recipe, self.indices, s.batch_size, s.on_error,
                           start=start_batch * s.batch_size, bad=self._bad, max_pixels=s.max_image_pixels)
        with quiet_dali_build(), readers_die_with_us():
            pipe = _val_graph(source, recipe=s.recipe, size=s.image_size, arrays=source.arrays, mean=list(s.mean),
                              std=list(s.std), device="gpu" if self.gpu else "cpu", batch_size=s.batch_size,
                              num_threads=self.num_threads, device_id=cuda_index(self._device) if self.gpu else None,
                              py_num_workers=1, py_start_method="spawn" if self.gpu else "fork")
            pipe.build()
        self._pipe = pipe
        self._start = start_batch
        self._position = start_batch

    def __iter__(self):
        self._stats = {"skipped_images": 0, "skipped_files": []}
        if len(self.indices) == 0:
            return
        if self._pipe is None or self._position != 0:
            self._build(0)
        self._position = None  # while iterating, the pipeline's position is ours only
        k = 0
        host = torch.device("cpu")
        while True:
            self._check_workers()
            try:
                outs = self._pipe.run()
            except StopIteration:
                self._pipe.reset()
                # A pipeline rebuilt mid-pass restarts mid-pass: only one built at 0 is reusable.
                self._position = 0 if self._start == 0 else None
                break
            except Exception as e:
                self._recover(e, k)
                continue
            keep = to_torch(outs[2], host).reshape(-1).to(torch.bool)
            index = to_torch(outs[3], host).reshape(-1)
            self._count_skipped(image_source_name(self.spec.dataset, int(i)) for i in index[~keep].tolist())
            images = to_torch(outs[0], self._device)
            labels = to_torch(outs[1], host).reshape(-1)
            k += 1
            if not keep.all():
                images, labels = images[keep.to(images.device)], labels[keep]
            if len(labels):
                yield images, labels.to(self._device, non_blocking=True)
        if self._stats["skipped_images"]:
            LOG.warning("validation: left out %d unreadable image(s) (on_error: skip); first: %s",
                        self._stats["skipped_images"], self._stats["skipped_files"][0])

    def _recover(self, err: Exception, batch: int) -> None:
        """As in the training pipeline: a reader's BadImageError is re-raised; a decoder failure
        is traced to its file with PIL, then raised (``raise``) or the pass is rebuilt from this
        batch with the file left out (``skip``)."""
        b = self.spec.batch_size
        bad, names = self._undecodable(err, self.indices[batch * b:(batch + 4) * b].tolist(), f"at batch {batch}")
        self._raise_or_mark(err, bad, names, "validation image(s)", "leave them out of evaluation")
        self._build(batch)
