"""Files that are never half-written and never run code when read.

* :func:`write_text_atomic`, :func:`torch_save_atomic` — write to a temporary sibling, then
  ``os.replace``: readers see the old or the new content, never a mix;
* :func:`safe_load` — ``torch.load`` with ``weights_only=True``; the only non-tensor classes
  allowed are the few DeepSpeed bookkeeping types of :func:`deepspeed_safe_globals`;
* :func:`install_safe_checkpoint_engine` — the same two rules for every file DeepSpeed's
  engine reads or writes.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

from fastlt.errors import CheckpointError

__all__ = ["deepspeed_safe_globals", "install_safe_checkpoint_engine", "safe_load", "torch_save_atomic",
           "write_text_atomic"]




def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def torch_save_atomic(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes that appear in its checkpoints (loss scaler, ZeRO stage enum,
    fragment addresses); nothing else beyond tensors and plain containers is unpickled."""
    out = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler",
                           ("LossScaler", "DynamicLossScaler", "LossScaleProfile", "LossScaleConfig")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        out.extend(getattr(mod, n) for n in names if hasattr(mod, n))
    return out


def safe_load(path: str | os.PathLike, map_location="cpu"):
    """``torch.load`` with ``weights_only=True`` and only DeepSpeed's bookkeeping classes allowed."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} does not exist") from None
        except Exception as e:  # UnpicklingError for anything outside the allowlist, or a corrupt file
            raise CheckpointError(f"cannot load {path} safely: {type(e).__name__}: {str(e).splitlines()[0]}. "
                                  "fastlt only loads tensors and plain containers from checkpoints") from None


def install_safe_checkpoint_engine(engine) -> None:
    """Make every DeepSpeed checkpoint read/write of ``engine`` safe (weights_only) and atomic."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """TorchCheckpointEngine with atomic saves and ``weights_only=True`` loads."""

        def save(self, state_dict, path: str):
            torch_save_atomic(state_dict, path)

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                           "fastlt expects the default TorchCheckpointEngine (no 'checkpoint' section in the "
                           "DeepSpeed config)")
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
