"""Pretrained initialisation (``model.pretrained``, ``model.pretrained_scope``): local weights
into the BCL model before training starts. Nothing is downloaded.

What can be loaded:

* a timm or torchvision state dict of the backbone architecture, as ``.safetensors``
  (``safetensors.torch.load_file``) or a ``torch.save`` file (``.pth`` / ``.pt`` / ``.bin``,
  read with ``weights_only=True``; a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper and a
  ``module.`` prefix are unwrapped) — into the backbone; the file's classifier (``fc.*``,
  ``head.*``) has no place in a backbone built without one and is reported as unexpected;
* a fastlt ``best.pt`` / ``last.pt``, checkpoint directory or run directory
  (``fastlt.training.checkpoint.load_weights``) — its ``backbone.*`` tensors with scope ``backbone``,
  or the whole model (classifier and both heads too) with scope ``all``.

Loading is strict where it matters: a tensor whose shape differs (a classifier of another C,
another depth) is an error that names the tensor and both shapes; a tensor the model needs
but the file lacks is an error (BatchNorm's ``num_batches_tracked`` counters excepted);
tensors of the file the model has no place for are listed and ignored. Missing and
unexpected keys are reported in one line. Values are copied as they are (cast only between
floating-point types when the file's dtype differs), so a round trip is bit-exact; a bool,
integer or complex tensor where the model holds float weights (or the reverse) is refused,
as a cast would silently make other numbers of it.

:func:`check_pretrained` runs every one of these checks against the model built on the meta
device (no memory, no weights), so that the trainer refuses a file that does not fit before it
writes anything into the run directory.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from fastlt.errors import CheckpointError

__all__ = ["check_pretrained", "check_pretrained_path", "check_tensor_kinds", "load_pretrained", "read_state_dict"]

_WRAPPERS = ("state_dict", "model", "module", "model_state", "model_state_dict", "net")
_SHOW = 4
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def _names(keys, show: int = _SHOW) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
    return f"{len(keys)}: " + ", ".join(keys[:show]) + more


def check_pretrained_path(path: str) -> Path:
    """``model.pretrained`` as a Path that exists; raise CheckpointError saying what to pass otherwise."""
    from fastlt.paths import kind_of

    p = Path(path)
    kind = kind_of(p)
    if kind in ("missing", "a broken link"):
        raise CheckpointError(f"model.pretrained: {p} does not exist. fastlt downloads nothing: save the weights "
                              "to a local file first (e.g. torch.save(timm.create_model(name, pretrained=True)."
                              "state_dict(), 'w.pth') or a .safetensors file), or pass a fastlt best.pt")
    if kind not in ("file", "folder"):
        raise CheckpointError(f"model.pretrained: {p} is {kind}, not a weights file or a run/checkpoint folder")
    if kind == "file" and p.stat().st_size == 0:
        raise CheckpointError(f"model.pretrained: {p} is an empty file (0 bytes): the weights were never written "
                              "to it; save them again, e.g. torch.save(model.state_dict(), path)")
    return p


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor)
                                                       for k, v in obj.items())


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], bool]:
    """(tensors by name, whether the file is fastlt's own BCL weights), read safely from ``path``."""
    from fastlt.training.checkpoint import load_weights
    from fastlt.files import safe_load

    path = check_pretrained_path(str(path))
    if path.is_dir():
        state, _ = load_weights(path)
        return dict(state), True
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), False
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"model.pretrained: cannot read {path} as safetensors: {e}") from None
    if path.suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(f"model.pretrained: {path} has the ending {path.suffix!r}; expected a .safetensors "
                              f"file or a torch.save file ({', '.join(_TORCH_SUFFIXES)})")
    try:
        obj = safe_load(path)
    except CheckpointError as e:  # its advice is for resuming; a pretrained file is saved again instead
        raise CheckpointError("model.pretrained: " + str(e).replace("use an earlier complete checkpoint",
                                                                    "save the weights to it again")) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("meta"), dict):
        return dict(obj["model"]), True  # fastlt best.pt / last.pt
    for key in _WRAPPERS:
        if isinstance(obj, dict) and _is_state_dict(obj.get(key)):
            obj = obj[key]
            break
    if not _is_state_dict(obj):
        what = f"a dict with keys {list(obj)[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"model.pretrained: {path} holds {what}, not a state dict (name -> tensor); save "
                              "the weights with torch.save(model.state_dict(), path)")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj, False


def check_tensor_kinds(source: dict[str, Tensor], own: dict[str, Tensor], path, where: str) -> None:
    """CheckpointError unless every tensor of ``source`` that ``own`` also names is of the same
    kind — bool, integer, floating point or complex: a cast within a kind (fp16 -> fp32, an
    int32 counter -> int64) keeps the numbers, a cast across kinds makes other ones."""
    def kind(t: Tensor) -> str:
        return ("bool" if t.dtype == torch.bool else "complex" if t.is_complex() else
                "float" if t.is_floating_point() else "int")

    bad = []
    for k, t in own.items():
        s = source.get(k)
        if s is None or s.dtype == t.dtype:
            continue
        if kind(s) != kind(t):
            bad.append(f"{k} ({str(s.dtype).replace('torch.', '')} in the file, "
                       f"{str(t.dtype).replace('torch.', '')} in the {where})")
    if bad:
        more = f" (+{len(bad) - _SHOW} more)" if len(bad) > _SHOW else ""
        raise CheckpointError(f"{path}: {len(bad)} tensor(s) are of another kind than the {where}'s and would be cast "
                              f"into other numbers: {', '.join(bad[:_SHOW])}{more}. The file does not hold weights "
                              "of this model")


def _load_into(target: nn.Module, source: dict[str, Tensor], path: Path, where: str, *,
               copy: bool = True) -> tuple[int, list[str]]:
    """Copy ``source`` into ``target`` (with ``copy=False`` only check that it fits); returns
    (tensors copied, unexpected names)."""
    own = target.state_dict()
    mismatched = [k for k in own if k in source and tuple(source[k].shape) != tuple(own[k].shape)]
    if mismatched:
        k = mismatched[0]
        others = f" ({len(mismatched) - 1} more tensors differ in shape)" if len(mismatched) > 1 else ""
        raise CheckpointError(f"model.pretrained: tensor {k!r} has shape {tuple(source[k].shape)} in {path} but "
                              f"{tuple(own[k].shape)} in the {where}{others}. The file is for another architecture "
                              "or class count; with a classifier of another C, load the backbone only "
                              "(model.pretrained_scope: backbone)")
    missing = [k for k in own if k not in source and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in source if k not in own]
    if missing:
        hint = (f"; none of its names match (the file starts with {_names(list(source)[:2], 2)}, the {where} with "
                f"{_names(list(own)[:2], 2)}): is it for another backbone?" if not any(k in source for k in own)
                else "")
        raise CheckpointError(f"model.pretrained: {path} does not cover the {where}: missing {_names(missing)}; "
                              f"unexpected {_names(unexpected)}{hint}")
    check_tensor_kinds(source, own, f"model.pretrained: {path}", where)
    wanted = {k: v for k, v in source.items() if k in own}
    if copy:
        target.load_state_dict(wanted, strict=False)
    return len(wanted), unexpected


def check_pretrained(cfg, num_classes: int) -> None:
    """Every check of :func:`load_pretrained` for ``cfg.model.pretrained``, against the config's
    model built on the meta device (no weights allocated): CheckpointError before anything is
    written when the file is missing, empty, unsafe or does not fit."""
    from fastlt.models import build_model

    with torch.device("meta"):
        model = build_model(cfg, num_classes)
    load_pretrained(model, cfg.model.pretrained, cfg.model.pretrained_scope, copy=False)


def load_pretrained(model: nn.Module, path: str | os.PathLike, scope: str = "backbone", *, copy: bool = True) -> str:
    """Load ``path`` into ``model`` (a :class:`~fastlt.models.BCLModel`) and return the one-line report.

    ``scope`` is ``backbone`` (``model.backbone`` only) or ``all`` (the whole model, from fastlt
    weights only). Raises :class:`~fastlt.errors.CheckpointError` for a file that does not fit.
    """
    path = Path(path)
    state, is_fastlt = read_state_dict(path)
    skipped = 0
    if scope == "all":
        if not is_fastlt:
            raise CheckpointError(f"model.pretrained_scope: all needs fastlt weights (best.pt / last.pt of a run); "
                                  f"{path} is a plain state dict (timm / torchvision). Set "
                                  "model.pretrained_scope: backbone to load it into the backbone")
        target, source, where = model, state, "model"
    elif scope == "backbone":
        target, where = model.backbone, f"{getattr(model, 'backbone_name', 'model')} backbone"
        if is_fastlt or any(k.startswith("backbone.") for k in state):
            source = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            skipped = len(state) - len(source)  # the classifier and the heads: not part of the backbone
        else:
            source = state
    else:
        raise CheckpointError(f"model.pretrained_scope must be backbone or all; got {scope!r}")
    n, unexpected = _load_into(target, source, path, where, copy=copy)
    heads = (f"; the file's {skipped} classifier/head tensors are not loaded (model.pretrained_scope: backbone)"
             if skipped else "")
    return (f"pretrained: {n} tensors from {path} into the {where}; missing none; unexpected (ignored) "
            f"{_names(unexpected)}{heads}")
