"""Resumable checkpoints and model weights (docs/design.md §3 "Distributed": model, optimizer,
scheduler, sampler and RNG state, so that a resumed run continues the same sample sequence).

Layout of a run directory::

    run_dir/checkpoints/epoch0003_step000000/   one DeepSpeed checkpoint (all ranks' shards)
        mp_rank_00_model_states.pt              module + client state (epoch, step, schedule, best, ...)
        zero_pp_rank_*_optim_states.pt          ZeRO optimizer shards (stages 1-2)
        rng_rank00000.pt ...                    per-rank RNG states
        meta.json                               written last: position, model signature, world size
    run_dir/checkpoints/latest                  the tag of the newest complete checkpoint
    run_dir/best.pt, run_dir/last.pt            model weights only (best validation, end of training)

A tag is the position training resumes from: ``epoch0003_step000000`` = start of epoch 3.

Never a half-written checkpoint: DeepSpeed writes into ``<tag>.partial``; only when every rank
has finished is it renamed to ``<tag>`` (a directory rename is atomic) and then ``latest`` is
replaced (temp file + ``os.replace``). A crash or Ctrl-C at any moment leaves ``latest``
pointing at a complete checkpoint. Every file DeepSpeed writes also goes through temp file +
``os.replace``. With ``async_save`` (``run.async_checkpoint``) the files are written by a
background thread (``fastlt.training.async_checkpoint``) and the rename and ``latest`` wait
for :meth:`CheckpointManager.wait`, under the same rules.

Never a non-finite checkpoint: the trainer asks :func:`nonfinite_state` before every save, so
pruning (``keep_last``) only ever deletes finite checkpoints in favour of finite ones.

Checked before use: :meth:`CheckpointManager.verify` reads ``meta.json`` and looks at every
file of a checkpoint (present, not truncated) before DeepSpeed starts, and names the newest
earlier checkpoint that is intact when one is not.

Safe loading: every ``torch.load`` here and inside DeepSpeed (``fastlt.files``) uses
``weights_only=True``; the only non-tensor classes allowed are the few DeepSpeed bookkeeping
types listed in ``fastlt.files.deepspeed_safe_globals``. A checkpoint can therefore not run
code when it is loaded.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from fastlt.models.signature import signature_diff, model_signature, weights_digest
from fastlt.training.async_checkpoint import AsyncSaves
from fastlt.training.distributed import barrier
from fastlt.errors import CheckpointError, OutputError
from fastlt.files import safe_load, torch_save_atomic, write_text_atomic
from fastlt.training.checkpoint_format import (DS_MODEL_FILE as _DS_MODEL_FILE, LATEST, META, intact, parse_tag as
                                               _parse_tag, read_meta, read_pointer, tag_for)

__all__ = ["CheckpointManager", "load_weights", "model_signature", "nonfinite_state", "read_meta", "save_weights",
           "tag_for", "weights_digest"]

# --------------------------------------------------------------------------------------
# Finiteness: never save a diverged state
# --------------------------------------------------------------------------------------


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """The tensors of the torch optimizer inside DeepSpeed's wrappers: its parameters (the fp32
    master copies under ZeRO / bf16 mode) and its state (momentum)."""
    seen = set()
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        return []
    out = [p for group in optimizer.param_groups for p in group["params"]]
    out += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def nonfinite_state(engine) -> int:
    """How many of the engine's floating-point tensors (weights, buffers, optimizer parameters and
    state) hold a nan or inf. One reduction per device and one host sync: call it at epoch ends,
    before a checkpoint, never per step."""
    tensors = [t for t in (*engine.module.parameters(), *engine.module.buffers(),
                           *_optimizer_tensors(getattr(engine, "optimizer", None))) if t.is_floating_point()]
    by_device: dict = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.detach())
    return sum(int(torch.stack([~torch.isfinite(t).all() for t in ts]).sum())  # host sync
               for ts in by_device.values())


# --------------------------------------------------------------------------------------
# Model signature: refuse to resume another model's checkpoint with a clear message
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# RNG state (per rank)
# --------------------------------------------------------------------------------------


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------


class CheckpointManager(AsyncSaves):
    """Save, find, load and prune the resumable checkpoints of one run (see the module docstring).

    All ranks call :meth:`save` and :meth:`load` together; the file-system bookkeeping (rename,
    ``latest``, pruning) is done by global rank 0, plus local rank 0 of other nodes when the
    checkpoint directory is not shared between nodes.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, *, keep_last: int = 2, rank: int = 0, local_rank: int = 0,
                 world_size: int = 1, async_save: bool = False):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1; got {keep_last}")
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.async_save = async_save
        self._writer = None  # the BackgroundWriter of async_save, made on first use
        self._pending: tuple[str, Path, Path] | None = None  # (tag, partial, final) being written

    # -- finding ---------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The newest complete checkpoint (from the ``latest`` pointer), or None when there is
        none. A pointer that is not the tag of a complete checkpoint in this folder (a path, a
        ``..``, random bytes), or no pointer beside complete checkpoints, is a damaged pointer:
        CheckpointError naming the newest intact checkpoint (it is never followed)."""
        tag, why = read_pointer(self.dir)
        if tag is not None:
            return self.dir / tag
        done = self.complete()
        if why is None and not done:
            return None
        why = why or "it is missing, but the folder holds complete checkpoints"
        newest = next((p for p in reversed(done) if self._ok(p, self.world_size)), None)
        fix = (f"the newest intact checkpoint is {newest}: resume it with --resume {newest}" if newest is not None
               else "no intact checkpoint is left: start a new run (another run.name)")
        raise CheckpointError(f"{self.dir / LATEST} is a damaged pointer ({why}); {fix}")

    @staticmethod
    def _intact(path: Path, world_size: int | None) -> tuple[dict, list[str]]:
        return intact(path, world_size)

    def verify(self, path: Path, *, world_size: int | None = None) -> tuple[dict, list[str]]:
        """Check checkpoint ``path`` without loading it: meta.json parses, DeepSpeed's model file
        and every optimizer shard are present and not truncated. Returns (meta, names of missing
        per-rank RNG files); raises CheckpointError naming the damaged file and the newest
        earlier checkpoint of the same folder that is intact."""
        path = Path(path)
        try:
            return self._intact(path, world_size)
        except CheckpointError as e:
            prev = next((c for c in reversed(CheckpointManager(path.parent).complete())
                         if _parse_tag(c.name) < (_parse_tag(path.name) or (0, 0)) and self._ok(c, world_size)), None)
            fix = (f"resume from the previous complete checkpoint with --resume {prev}" if prev is not None
                   else "no earlier intact checkpoint exists: start a new run (another run.name)")
            raise CheckpointError(f"{e}; it cannot be resumed. {fix}") from None

    def _ok(self, path: Path, world_size: int | None) -> bool:
        try:
            self._intact(path, world_size)
        except CheckpointError:
            return False
        return True

    def complete(self) -> list[Path]:
        """Complete checkpoints in position order (oldest first)."""
        if not self.dir.is_dir():
            return []
        found = [(pos, p) for p in self.dir.iterdir()
                 if (pos := _parse_tag(p.name)) is not None and not p.is_symlink() and (p / META).is_file()]
        return [p for _, p in sorted(found)]

    @staticmethod
    def resolve(resume: str, run_dir: str | os.PathLike) -> Path | None:
        """``--resume auto`` -> latest checkpoint of run_dir (None if there is none);
        ``--resume PATH`` -> a checkpoint directory, or a run/checkpoints directory's latest."""
        run_dir = Path(run_dir)
        if resume == "auto":
            return CheckpointManager(run_dir / "checkpoints").latest()
        path = Path(resume)
        if (path / META).is_file():
            return path
        for base in (path, path / "checkpoints"):  # whatever `latest` is, latest() judges it
            if os.path.lexists(base / LATEST) or CheckpointManager(base).complete():
                return CheckpointManager(base).latest()
        if path.name.endswith(".partial"):
            raise CheckpointError(f"{path} is an incomplete checkpoint (its writing was interrupted); "
                                  "resume from a complete one, e.g. --resume auto")
        if not path.exists():
            raise CheckpointError(f"--resume {resume}: {path} does not exist; pass a checkpoint directory "
                                  "(run_dir/checkpoints/epochNNNN_stepNNNNNN), a run directory, or 'auto'")
        raise CheckpointError(f"--resume {resume}: {path} is not a fastlt checkpoint (no {META}) and holds no "
                              f"'{LATEST}' pointer; pass a checkpoint directory, a run directory, or 'auto'")

    # -- saving ----------------------------------------------------------------------

    def save(self, engine, epoch: int, step: int, client_state: dict, meta: dict, *, on_saved=None) -> Path:
        """Write the checkpoint that resumes at (epoch, step); returns its directory. ``on_saved(path,
        epoch, step)`` is called (on every rank) once a checkpoint is complete and ``latest`` points at it.

        With ``async_save`` this returns once the state is copied to host memory; the checkpoint is
        complete only after :meth:`wait` (which this call makes first for the previous one)."""
        self.wait(on_saved)
        tag = tag_for(epoch, step)
        final, partial = self.dir / tag, self.dir / f"{tag}.partial"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if partial.exists():  # left over by a crash during an earlier save
                shutil.rmtree(partial)
        barrier()
        writer = self._writer_of(engine) if self.async_save else None
        save, save_text = (writer.submit, writer.submit_text) if writer else (torch_save_atomic, write_text_atomic)
        if writer is not None:
            self._pending = (tag, partial, final)  # from here a failure's abandon() lets its writes end
        try:
            if writer is not None:
                engine.checkpoint_engine.writer = writer
            try:
                engine.save_checkpoint(str(self.dir), tag=partial.name, client_state=client_state, save_latest=False)
            finally:
                if writer is not None:
                    engine.checkpoint_engine.writer = None
            save(_rng_state(), partial / f"rng_rank{self.rank:05d}.pt")
            if self.rank == 0:  # last in this rank's queue
                info = dict(meta, tag=tag, epoch=epoch, step=step, world_size=self.world_size, time=time.time())
                save_text(partial / META, json.dumps(info, indent=1))
        except OutputError as e:  # a full disk, a read-only folder: free what was written, keep the rest
            if writer is not None:  # nothing of it is still being written when its folder goes
                self._pending, _ = None, writer.wait()
            raise self._not_written(e, tag, partial) from None
        if writer is not None:
            return final
        self._complete(partial, final, tag, on_saved)
        return final

    def _kept(self) -> str:
        last = read_pointer(self.dir)[0]
        return (f"the last complete checkpoint {self.dir / last} is untouched" if last
                else "no earlier checkpoint exists")

    def _not_written(self, e: OutputError, tag: str, partial: Path) -> OutputError:
        shutil.rmtree(partial, ignore_errors=True)
        return OutputError(f"{e}. Checkpoint {tag} was not written (its partial files were removed) and "
                           f"{self._kept()}; make room (or move run.output_dir to another disk), then continue "
                           "with --resume auto")

    def _complete(self, partial: Path, final: Path, tag: str, on_saved) -> None:
        """Every rank has written its files: publish ``partial`` as ``final``, then ``latest``."""
        barrier()
        if self.rank == 0:
            self._publish(partial, final)
        barrier()
        if self.rank != 0 and self.local_rank == 0 and partial.exists():
            # A node-local checkpoint directory (not shared with rank 0's node).
            self._publish(partial, final)
        if self.local_rank == 0:
            write_text_atomic(self.dir / LATEST, tag)
            self.prune()
        barrier()
        if on_saved is not None:
            on_saved(final, *_parse_tag(tag))

    @staticmethod
    def _publish(partial: Path, final: Path) -> None:
        trash = None
        if final.exists():  # re-running from an older checkpoint over newer ones
            trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:6]}")
            os.rename(final, trash)
        os.rename(partial, final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints (never the latest)."""
        keep = read_pointer(self.dir)[0]
        done = self.complete()
        for path in done[: max(0, len(done) - self.keep_last)]:
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------

    def check_compatible(self, path: Path, meta: dict, signature: dict, *, zero_stage: int = 0) -> None:
        """CheckpointError unless checkpoint ``path`` (its ``meta``) fits this model and world size."""
        diff = signature_diff(meta.get("signature", {}), signature)
        if diff:
            raise CheckpointError(f"checkpoint {path} belongs to a different model ({'; '.join(diff)}). Resume it "
                                  "with the config it was trained with (config.yaml in its run directory), or "
                                  "start a new run with another run.name")
        # ZeRO-1 and 2 share one shard format; ZeRO-0 keeps the whole optimizer state in the model file.
        saved = meta.get("zero_stage", 1 if any(Path(path).glob("zero_pp_rank_*_optim_states.pt")) else 0)
        if (saved > 0) != (zero_stage > 0):
            raise CheckpointError(f"checkpoint {path} holds its optimizer state "
                                  + ("in ZeRO shards" if saved else "unpartitioned (ZeRO-0)")
                                  + f"; this config has deepspeed.zero_stage={zero_stage}, which reads it "
                                  + ("unpartitioned" if not zero_stage else "from ZeRO shards")
                                  + f". Resume it with --set deepspeed.zero_stage={saved}")
        written = meta.get("world_size")
        if zero_stage > 0 and (isinstance(written, bool) or not isinstance(written, int) or written < 1):
            raise CheckpointError(f"checkpoint {path} is damaged: its meta file records no valid number of ranks "
                                  f"(world_size {written!r}), which a ZeRO checkpoint needs to be read; use an "
                                  "earlier complete checkpoint")
        # ZeRO shards of another world size are re-partitioned by DeepSpeed's universal checkpoint
        # (fastlt.training.universal) when they are loaded.

    def load(self, engine, path: str | os.PathLike, signature: dict, *, zero_stage: int = 0,
             log=print) -> tuple[dict, dict]:
        """Restore engine (module, optimizer) and this rank's RNG from ``path``; ZeRO shards of
        another world size through DeepSpeed's universal checkpoint (converted once, saying so
        with ``log``).

        Returns (client_state["fastlt"], meta). Raises CheckpointError, before touching the
        engine, when the checkpoint is incomplete or belongs to another model.
        """
        from fastlt.training.universal import load_resharded, needs_resharding

        path = Path(path)
        meta = read_meta(path)
        self.check_compatible(path, meta, signature, zero_stage=zero_stage)
        if needs_resharding(meta, self.world_size, zero_stage):
            load_path, client = load_resharded(engine, path, rank=self.rank, local_rank=self.local_rank,
                                               written=int(meta["world_size"]), world_size=self.world_size, log=log)
        else:
            load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                                       load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None or client is None or "fastlt" not in client:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
        rng_file = path / f"rng_rank{self.rank:05d}.pt"
        if rng_file.is_file():
            _set_rng_state(safe_load(rng_file))
        return client["fastlt"], meta


# --------------------------------------------------------------------------------------
# Model weights (best.pt / last.pt) for evaluation and deployment
# --------------------------------------------------------------------------------------


def save_weights(path: str | os.PathLike, module: torch.nn.Module, meta: dict) -> None:
    """Model weights only (no optimizer), atomically; call on rank 0."""
    torch_save_atomic({"model": module.state_dict(), "meta": meta}, path)


def load_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state_dict, meta) from a weights file (best.pt / last.pt), a checkpoint directory, or
    a run directory (its latest checkpoint), all loaded with weights_only=True."""
    path = Path(path)
    if path.is_file() and path.name == LATEST and not path.suffix:  # checkpoints/latest: the pointer, not weights
        path = path.parent
    if path.is_file():
        obj = safe_load(path)
        if not isinstance(obj, dict) or "model" not in obj:
            raise CheckpointError(f"{path} is not a fastlt weights file (expected keys 'model' and 'meta')")
        return obj["model"], obj.get("meta", {})
    if path.is_dir():
        if not (path / META).is_file():
            if not any((base / LATEST).is_file() for base in (path, path / "checkpoints")):
                raise CheckpointError(f"checkpoint {path}: a folder that is neither a checkpoint (no {META}) nor a "
                                      f"run directory (no checkpoints/{LATEST}); pass best.pt / last.pt of a run "
                                      "directory, a checkpoint directory or a run directory")
            latest = CheckpointManager.resolve(str(path), path)
            if latest is None:
                raise CheckpointError(f"{path} holds no checkpoint")
            path = latest
        meta = read_meta(path)
        obj = safe_load(path / _DS_MODEL_FILE)
        return obj["module"], meta
    what = "is not a regular file" if path.exists() else "does not exist"  # e.g. a FIFO: never opened
    raise CheckpointError(f"checkpoint {path} {what}; pass best.pt / last.pt of a run directory, "
                          "a checkpoint directory or a run directory")
