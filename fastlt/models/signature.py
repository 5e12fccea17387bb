"""What identifies a model's weights: its signature (what must match for a checkpoint to belong
to it) and a digest of its tensors (used to check that every rank holds the same replica)."""
from __future__ import annotations

import hashlib

import torch

__all__ = ["model_signature", "signature_diff", "weights_digest"]


def model_signature(model: torch.nn.Module, cfg) -> dict:
    """What must match for a checkpoint to belong to this model."""
    shapes = [f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()]
    return {
        "backbone": cfg.model.backbone,
        "num_classes": int(getattr(model, "num_classes", 0)),
        "feat_dim": cfg.model.feat_dim,
        "use_norm": cfg.model.use_norm,
        "hidden_dim": cfg.model.hidden_dim,
        "num_tensors": len(shapes),
        "shapes_sha1": hashlib.sha1("\n".join(shapes).encode()).hexdigest(),
    }


def signature_diff(saved: dict, current: dict) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r}, this config {current.get(k)!r}"
            for k in current if saved.get(k) != current.get(k)]


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names and raw bytes of a module's state dict (parameters and buffers)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
