"""The pipeline contract (docs/design.md §3): one typed training batch whatever the backend.

Every backend (DALI on GPU, DALI on CPU, torch DataLoader) yields :class:`TrainBatch`
objects for a :class:`~fastlt.pipelines.spec.TrainPipelineSpec`; the trainer depends on
nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["TrainBatch", "image_layout"]


def image_layout(spec) -> tuple[torch.dtype, torch.memory_format]:
    """The torch dtype and memory format of a spec's ``dtype`` / ``memory_format`` names."""
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    return getattr(torch, spec.dtype), formats[spec.memory_format]


@dataclass
class TrainBatch:
    """One training step's data, per rank.

    The images of the step are one tensor, written once by the pipeline in the layout and dtype
    the model's first layer takes (``TrainPipelineSpec.memory_format`` / ``dtype``), so the
    training step feeds it to the model as it is: no concatenation, no copy, no cast.

    Attributes:
        images: (3B, 3, H, W) float, normalised: rows 0..B−1 the classification input (CutMix
            already applied where ``mixed`` is set), rows B..2B−1 and 2B..3B−1 the two
            contrastive ("sim") views of the background images. ``image``, ``view1`` and
            ``view2`` are views of it.
        label_a: (B,) int64 background class.
        label_b: (B,) int64 foreground class (equal to ``label_a`` where not mixed).
        lam: (B,) float32 weight of ``label_a`` in the area label, 1 − box area/(H·W)
            (1.0 where not mixed).
        mixed: (B,) bool, whether a CutMix box was pasted into the sample.
        foreground: diagnostic only, None unless the spec asks for it
            (``extra["with_foreground"]``): (B, 3, H, W) the foreground view 0 before pasting,
            so tests can check the pasted region pixel for pixel.
    """

    images: Tensor
    label_a: Tensor
    label_b: Tensor
    lam: Tensor
    mixed: Tensor
    foreground: Tensor | None = None

    @classmethod
    def from_views(cls, image: Tensor, view1: Tensor, view2: Tensor, **fields_) -> "TrainBatch":
        """A batch from three separate (B, 3, H, W) view tensors (one concatenation; for tests and
        for code that builds its views itself)."""
        return cls(images=torch.cat([image, view1, view2]), **fields_)

    def __len__(self) -> int:
        return self.label_a.shape[0]

    @property
    def image(self) -> Tensor:
        """(B, 3, H, W) the classification input (a view of ``images``)."""
        return self.images[: len(self)]

    @property
    def view1(self) -> Tensor:
        """(B, 3, H, W) the first contrastive view (a view of ``images``)."""
        return self.images[len(self): 2 * len(self)]

    @property
    def view2(self) -> Tensor:
        """(B, 3, H, W) the second contrastive view (a view of ``images``)."""
        return self.images[2 * len(self):]

    def to(self, device, non_blocking: bool = True) -> "TrainBatch":
        """Every tensor on ``device`` (a no-op for tensors already there)."""
        return TrainBatch(**{f.name: None if getattr(self, f.name) is None
                             else getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def validate(self) -> None:
        """Raise ValueError if the tensors do not fit the contract (used by tests and backends)."""
        b = len(self)
        t = self.images
        if t.dim() != 4 or t.shape[0] != 3 * b or t.shape[1] != 3 or not t.is_floating_point():
            raise ValueError(f"TrainBatch.images: expected float (3B={3 * b}, 3, H, W); got {tuple(t.shape)} {t.dtype}")
        if self.foreground is not None and (self.foreground.shape != (b, *t.shape[1:])):
            raise ValueError(f"TrainBatch.foreground: expected {(b, *t.shape[1:])}; got {tuple(self.foreground.shape)}")
        for name, dtype in (("label_a", torch.int64), ("label_b", torch.int64), ("lam", torch.float32),
                            ("mixed", torch.bool)):
            t = getattr(self, name)
            if t.shape != (b,) or t.dtype != dtype:
                raise ValueError(f"TrainBatch.{name}: expected ({b},) {dtype}; got {tuple(t.shape)} {t.dtype}")
