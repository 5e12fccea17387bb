"""ZeRO-1/2 checkpoints resumed at another world size, through DeepSpeed's universal checkpoint.

ZeRO partitions the optimizer state (SGD momentum, the fp32 master weights) over the ranks
that wrote a checkpoint, one ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank; DeepSpeed
reads such shards back only at the same data-parallel world size. Its *universal checkpoint*
is the world-size-free form: ``deepspeed.checkpoint.ds_to_universal`` merges the shards into one
folder per parameter (``zero/<name>/fp32.pt``, ``exp_avg``/momentum ...), and an engine with
``checkpoint.load_universal`` re-partitions them for its own ranks while loading.

:func:`load_resharded` is what :meth:`fastlt.training.checkpoint.CheckpointManager.load` calls
when a ZeRO checkpoint was written by another number of ranks:

1. the conversion runs once, on global rank 0 (and on local rank 0 of a node that does not see
   rank 0's files), into ``<checkpoint>/universal.partial``, renamed to ``<checkpoint>/universal``
   when complete — so it is atomic, kept beside the checkpoint, and a later resume at yet another
   world size reuses it;
2. every rank loads it with DeepSpeed's universal loader; the flag is set only for that load, so
   the checkpoints written afterwards are ordinary ones of the new world size.

DeepSpeed's converter (0.19) knows only Adam's state (``exp_avg``, ``exp_avg_sq``), while its
universal loader restores whatever ``<state>.pt`` files a parameter's folder holds. fastlt's SGD
keeps one state, ``momentum_buffer``: during the conversion the shards are read with it presented
as ``exp_avg`` (and a zero ``exp_avg_sq``), and afterwards each parameter's ``exp_avg.pt`` is renamed
``momentum_buffer.pt`` and the zero file removed. The slicing and merging over the shards, and the
re-partitioning at load time, are DeepSpeed's own.

Every ``torch.load`` inside DeepSpeed's converter and universal loader runs with
``weights_only=True`` and only DeepSpeed's bookkeeping classes allowed (``fastlt.files``), as
all of fastlt's checkpoint reads do: a checkpoint cannot run code when it is converted or loaded.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from argparse import Namespace
from pathlib import Path

from fastlt.errors import CheckpointError

__all__ = ["UNIVERSAL", "convert", "load_resharded", "needs_resharding"]

#: The folder of a checkpoint holding its universal form.
UNIVERSAL = "universal"
_DONE = ".complete"


def needs_resharding(meta: dict, world_size: int, zero_stage: int) -> bool:
    """Whether a checkpoint (its meta.json) holds ZeRO shards of another world size than ``world_size``."""
    written = meta.get("world_size")
    return zero_stage > 0 and int(meta.get("zero_stage", zero_stage)) > 0 and written is not None \
        and int(written) != world_size


#: SGD's state as DeepSpeed's Adam-only converter reads it, and back.
_AS_ADAM, _ZERO_SECOND = "exp_avg", "exp_avg_sq"
_SGD_STATE = "momentum_buffer"


def _sgd_as_adam(obj):
    """A ZeRO optimizer shard with SGD's momentum presented under Adam's names (other files as they are)."""
    import torch

    if not isinstance(obj, dict) or not isinstance(obj.get("optimizer_state_dict"), dict) \
            or "base_optimizer_state" not in obj["optimizer_state_dict"]:
        return obj
    groups = obj["optimizer_state_dict"]["base_optimizer_state"]["state"]
    for state in groups.values():
        if _AS_ADAM not in state:
            flat = obj["optimizer_state_dict"]["single_partition_of_fp32_groups"]
            momentum = state.pop(_SGD_STATE, None)
            ref = momentum if momentum is not None else flat[0]
            state[_AS_ADAM] = momentum if momentum is not None else torch.zeros_like(ref)
            state[_ZERO_SECOND] = torch.zeros_like(ref)
            state["fastlt_had_momentum"] = momentum is not None
    return obj


def _adam_names_back(zero_dir: Path, had_momentum: bool) -> None:
    """Each parameter folder of a converted SGD checkpoint: ``exp_avg.pt`` -> ``momentum_buffer.pt``
    (or removed, for SGD without momentum), the zero ``exp_avg_sq.pt`` removed."""
    for first in zero_dir.rglob(f"{_AS_ADAM}.pt"):
        second = first.with_name(f"{_ZERO_SECOND}.pt")
        if second.is_file():
            second.unlink()
        if had_momentum:
            os.replace(first, first.with_name(f"{_SGD_STATE}.pt"))
        else:
            first.unlink()


@contextlib.contextmanager
def _weights_only_loads(sgd_as_adam: bool = False, seen: list | None = None):
    """``torch.load`` as ``fastlt.files.safe_load`` for the duration (DeepSpeed's converter and
    universal loader call it with ``weights_only=False``); with ``sgd_as_adam``, ZeRO shards are
    read with SGD's state renamed for the converter (``seen`` collects whether momentum existed)."""
    import torch

    from fastlt.files import deepspeed_safe_globals

    original = torch.load

    def load(f, map_location=None, *args, weights_only=None, **kwargs):
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            obj = original(f, map_location, *args, weights_only=True, **kwargs)
        if sgd_as_adam:
            obj = _sgd_as_adam(obj)
            if seen is not None and isinstance(obj, dict) and "optimizer_state_dict" in obj:
                seen.extend(s.get("fastlt_had_momentum", True) for s in
                            obj["optimizer_state_dict"]["base_optimizer_state"]["state"].values())
        return obj

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def convert(path: Path) -> Path:
    """Convert checkpoint ``path`` to its universal form ``path/universal`` (once: an existing
    complete conversion is kept); returns that folder."""
    from deepspeed.checkpoint import ds_to_universal

    target = path / UNIVERSAL
    if (target / _DONE).is_file():
        return target
    partial = path / f"{UNIVERSAL}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a conversion that was interrupted
    args = Namespace(input_folder=str(path), output_folder=str(partial), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    said, momentum = io.StringIO(), []
    try:
        with _weights_only_loads(sgd_as_adam=True, seen=momentum), contextlib.redirect_stdout(said), \
                contextlib.redirect_stderr(said):
            ds_to_universal.main(args)
        _adam_names_back(partial / "zero", had_momentum=all(momentum))
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        tail = " | ".join(said.getvalue().strip().splitlines()[-3:])
        raise CheckpointError(f"checkpoint {path}: DeepSpeed's universal conversion failed ({type(e).__name__}: {e}"
                              f"{'; ' + tail if tail else ''}); resume it with the number of ranks that wrote it "
                              "(its meta.json: world_size)") from None
    (partial / _DONE).write_text("ds_to_universal\n")
    if target.exists():  # an incomplete folder of another attempt
        shutil.rmtree(target)
    os.rename(partial, target)
    return target


def load_resharded(engine, path: Path, *, rank: int, local_rank: int, written: int, world_size: int, log=print):
    """Load ZeRO checkpoint ``path`` (written by ``written`` ranks) into ``engine`` of ``world_size``
    ranks through its universal form (converted here if needed). Returns what
    ``engine.load_checkpoint`` returns."""
    from fastlt.training.distributed import barrier

    target = path / UNIVERSAL
    if rank == 0:
        existed = (target / _DONE).is_file()
        if not existed:
            log(f"checkpoint {path} holds ZeRO shards of {written} rank(s) and this run has {world_size}: converting "
                f"it once to DeepSpeed's universal checkpoint in {target} (kept for later resumes)")
        convert(path)
        if existed:
            log(f"checkpoint {path} holds ZeRO shards of {written} rank(s) and this run has {world_size}: loading "
                f"its universal form {target} (converted before)")
    barrier()
    if rank != 0 and local_rank == 0 and not (target / _DONE).is_file():
        convert(path)  # a node-local checkpoint directory, not shared with rank 0's node
    barrier()
    from deepspeed.utils import logger as ds_logger

    config, level = engine._config, ds_logger.level
    config.load_universal_checkpoint = True
    ds_logger.setLevel(logging.ERROR)  # a "MPU is not provided" warning per parameter and rank
    try:
        with _weights_only_loads():
            return engine.load_checkpoint(str(path), tag=UNIVERSAL, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = False
        ds_logger.setLevel(level)
