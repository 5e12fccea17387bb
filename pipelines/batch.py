"""The pipeline contract (ARCHITECTURE §3): one typed training batch whatever the backend.

Every backend (DALI on GPU, DALI on CPU, torch DataLoader) yields :class:`TrainBatch`
objects for a :class:`~fastlt.pipelines.spec.TrainPipelineSpec`; the trainer depends on
nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["TrainBatch"]


@dataclass
class TrainBatch:
    """One training step's data, per rank.

    Attributes:
        image: (B, 3, H, W) float classification input, normalised; CutMix already applied
            where ``mixed`` is set.
        view1, view2: (B, 3, H, W) the two contrastive ("sim") views of the background images.
        label_a: (B,) int64 background class.
        label_b: (B,) int64 foreground class (equal to ``label_a`` where not mixed).
        lam: (B,) float32 weight of ``label_a`` in the area label, 1 − box area/(H·W)
            (1.0 where not mixed).
        mixed: (B,) bool, whether a CutMix box was pasted into the sample.
        foreground: diagnostic only, None unless the spec asks for it
            (``extra["with_foreground"]``): (B, 3, H, W) the foreground view 0 before pasting,
            so tests can check the pasted region pixel for pixel.
    """

    image: Tensor
    view1: Tensor
    view2: Tensor
    label_a: Tensor
    label_b: Tensor
    lam: Tensor
    mixed: Tensor
    foreground: Tensor | None = None

    def __len__(self) -> int:
        return self.label_a.shape[0]

    def to(self, device, non_blocking: bool = True, memory_format: torch.memory_format | None = None) -> "TrainBatch":
        """Move every tensor to ``device``; image tensors optionally to ``memory_format``."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None:
                out[f.name] = None
                continue
            t = t.to(device, non_blocking=non_blocking)
            if memory_format is not None and t.dim() == 4:
                t = t.contiguous(memory_format=memory_format)
            out[f.name] = t
        return TrainBatch(**out)

    def validate(self) -> None:
        """Raise ValueError if the tensors do not fit the contract (used by tests and backends)."""
        b = len(self)
        for name in ("image", "view1", "view2") + (("foreground",) if self.foreground is not None else ()):
            t = getattr(self, name)
            if t.dim() != 4 or t.shape[0] != b or t.shape[1] != 3 or not t.is_floating_point():
                raise ValueError(f"TrainBatch.{name}: expected float (B={b}, 3, H, W); got {tuple(t.shape)} {t.dtype}")
        for name, dtype in (("label_a", torch.int64), ("label_b", torch.int64), ("lam", torch.float32),
                            ("mixed", torch.bool)):
            t = getattr(self, name)
            if t.shape != (b,) or t.dtype != dtype:
                raise ValueError(f"TrainBatch.{name}: expected ({b},) {dtype}; got {tuple(t.shape)} {t.dtype}")
