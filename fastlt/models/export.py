"""``fastlt export``: a trained BCL model's backbone and classifier as timm-loadable safetensors.

A fastlt weights file (``best.pt`` / ``last.pt``, a checkpoint or run directory) holds the whole
BCL model: ``backbone.*`` (a timm model built with ``num_classes=0``), the classifier ``fc``,
and the two heads used only in training. Export writes, into one folder:

* ``backbone.safetensors`` — the backbone's state dict, loadable strictly into
  ``timm.create_model(name, num_classes=0)``;
* ``model.safetensors`` — backbone plus the classifier under timm's own classifier name
  (``fc`` for ResNets, ``head`` for ViTs), loadable strictly into
  ``timm.create_model(name, num_classes=C)``;
* ``export.json`` — the timm name, C, the keyword arguments and what the classifier is.

The cosine classifier (``model.use_norm``) computes 30 · normalize(h) · normalize(W); a plain
timm Linear cannot normalise its input, so it is exported as weight 30 · normalize(W)ᵀ with zero
bias: its logits are fastlt's times ‖h‖ per sample, a positive factor, so predictions and the
ranking of classes are identical (the probabilities are not). Both files are checked by loading
them into the timm model before they are published.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from fastlt.errors import CheckpointError, OutputError
from fastlt.models.bcl import NORMED_LINEAR_SCALE

__all__ = ["export_timm"]


def _split(state: dict) -> tuple[dict, dict]:
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    fc = {k[len("fc."):]: v for k, v in state.items() if k.startswith("fc.")}
    if not backbone or "weight" not in fc:
        raise CheckpointError("the weights hold no backbone.* / fc.weight tensors: not a fastlt BCL model")
    return backbone, fc


def _classifier(fc: dict, use_norm: bool, num_features: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    w = fc["weight"].float()
    if use_norm:  # NormedLinear keeps W as (h, C)
        if w.shape[0] != num_features:
            raise CheckpointError(f"classifier weight {tuple(w.shape)} does not fit a backbone of {num_features} "
                                  "features")
        weight = NORMED_LINEAR_SCALE * F.normalize(w, dim=0).t().contiguous()
        return weight, torch.zeros(weight.shape[0]), ("cosine classifier exported as a Linear: logits are fastlt's "
                                                      "times ||h|| per sample (same predictions and class ranking)")
    return w.contiguous(), fc.get("bias", torch.zeros(w.shape[0])).float(), "plain Linear classifier, exact"


def export_timm(weights: str | os.PathLike, out_dir: str | os.PathLike, *, backbone_kwargs: dict | None = None
                ) -> list[Path]:
    """Write the export of ``weights`` into ``out_dir`` (see the module docstring); returns the files."""
    import timm
    from safetensors.torch import save_file

    from fastlt.files import check_writable_dir, write_text_atomic
    from fastlt.training.checkpoint import load_weights

    state, meta = load_weights(weights)
    sig = meta.get("signature") or {}
    name = sig.get("backbone") or meta.get("backbone")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{weights}: its meta names no backbone, so the timm model to export to is unknown")
    if not timm.is_model(name):
        raise CheckpointError(f"{weights}: backbone {name!r} is not a timm model (resnet32 is fastlt's own CIFAR "
                              "ResNet); its weights are already in the file as a torch state dict")
    backbone, fc = _split(state)
    kwargs = dict(backbone_kwargs or {})
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    try:
        net.load_state_dict(backbone, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: its backbone does not load into timm's {name} with {kwargs or 'defaults'} "
                              f"(pass the run's config with --config if it set model.backbone_kwargs): "
                              f"{' '.join(str(e).split())}") from None
    use_norm = bool(sig.get("use_norm", fc["weight"].shape[0] == net.num_features))
    weight, bias, what = _classifier(fc, use_norm, net.num_features)
    num_classes = weight.shape[0]
    full = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    head = full.default_cfg.get("classifier", "fc")
    model_state = {**backbone, f"{head}.weight": weight, f"{head}.bias": bias}
    full.load_state_dict(model_state, strict=True)  # what a user will do; it must not fail

    out = Path(out_dir)
    check_writable_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for fname, tensors in (("backbone.safetensors", backbone), ("model.safetensors", model_state)):
        path, tmp = out / fname, out / f".{fname}.tmp-{os.getpid()}"
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"--out {out}: cannot write {fname}: {e.strerror or e}") from None
        files.append(path)
    info = {"timm_model": name, "num_classes": num_classes, "kwargs": kwargs, "classifier": head,
            "classifier_note": what, "source": str(weights), "epoch": meta.get("epoch"),
            "load": f"timm.create_model({name!r}, num_classes={num_classes}"
                    + "".join(f", {k}={v!r}" for k, v in kwargs.items())
                    + "); model.load_state_dict(safetensors.torch.load_file('model.safetensors'))"}
    write_text_atomic(out / "export.json", json.dumps(info, indent=1))
    files.append(out / "export.json")
    return files
