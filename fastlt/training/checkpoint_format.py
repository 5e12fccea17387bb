"""What a resumable checkpoint must be, checked before anything is loaded from it.

A checkpoint (``fastlt.training.checkpoint`` has the layout) is usable only when every file is
there, complete *and* holds what its name says. :func:`intact` checks, without loading any
weights:

* ``meta.json``: a JSON object whose fields have their types (``epoch``/``step`` non-negative
  integers agreeing with the folder's tag, ``world_size`` >= 1, ``signature`` and ``dataset``
  objects, ...) — :func:`read_meta`;
* ``mp_rank_00_model_states.pt``: a complete archive holding DeepSpeed's ``module`` state dict
  and fastlt's client state at the same position (a ``best.pt`` copied there is not);
* ZeRO optimizer shards: one per rank that wrote it, as many as ``meta.json`` says;
* ``rng_rank*.pt``: the generator states fastlt writes (a torch byte tensor, numpy's MT19937
  key of 624 words, python's state), not other tensors.

A failure is a CheckpointError "damaged", the same as a truncated file, and the caller names
the newest earlier intact checkpoint. The ``latest`` pointer is read by :func:`read_pointer`:
a tag name inside ``checkpoints/`` (``epochNNNN_stepNNNNNN``) and nothing else.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fastlt.errors import CheckpointError
from fastlt.files import damage, deepspeed_safe_globals

__all__ = ["DS_MODEL_FILE", "LATEST", "META", "intact", "parse_tag", "read_meta", "read_pointer", "tag_for"]

LATEST = "latest"
META = "meta.json"
DS_MODEL_FILE = "mp_rank_00_model_states.pt"
TAG_RE = re.compile(r"^epoch(\d{4,})_step(\d{6,})$")
_POINTER_MAX = 64  # bytes: a tag is 21 characters; anything longer is not a pointer
_CLIENT_KEYS = ("epoch", "step", "global_step", "scheduler", "best", "history")


def tag_for(epoch: int, step: int) -> str:
    """The tag of the checkpoint that resumes at (epoch, step)."""
    return f"epoch{epoch:04d}_step{step:06d}"


def parse_tag(tag: str) -> tuple[int, int] | None:
    m = TAG_RE.fullmatch(tag)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _is_int(x, least: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= least


def _meta_problem(meta: dict, folder: str) -> str | None:
    for key in ("epoch", "step"):
        if key in meta and not _is_int(meta[key]):
            return f"'{key}' is {meta[key]!r}, not a non-negative integer"
    for key in ("world_size", "batch_size", "steps_per_epoch", "num_classes"):
        if meta.get(key) is not None and not _is_int(meta[key], 1):
            return f"'{key}' is {meta[key]!r}, not a positive integer"
    if meta.get("zero_stage") is not None and meta["zero_stage"] not in (0, 1, 2, 3):
        return f"'zero_stage' is {meta['zero_stage']!r}, not 0-3"
    for key in ("signature", "dataset", "lineage"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            return f"'{key}' is a {type(meta[key]).__name__}, not an object"
    ds = meta.get("dataset") or {}
    if ds and not (_is_int(ds.get("images")) and isinstance(ds.get("digest"), str)
                   and isinstance(ds.get("class_counts"), list) and all(_is_int(c) for c in ds["class_counts"])):
        return "'dataset' does not hold images, class_counts and digest"
    if "tag" in meta and not isinstance(meta["tag"], str):
        return f"'tag' is {meta['tag']!r}, not a string"
    pos = parse_tag(folder)
    if pos is not None and "epoch" in meta and (meta["epoch"], meta.get("step", 0)) != pos:
        return f"it says epoch {meta['epoch']} step {meta.get('step', 0)}, but the folder is {folder}"
    return None


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of checkpoint ``path``; CheckpointError if it is missing or damaged
    (not JSON, not an object, a field of the wrong type)."""
    meta_file = Path(path) / META
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete fastlt checkpoint (no {META})") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{meta_file} is damaged (not valid JSON: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file} is damaged (expected a JSON object, got {type(meta).__name__})")
    if (why := _meta_problem(meta, Path(path).name)) is not None:
        raise CheckpointError(f"{meta_file} is damaged ({why})")
    return meta


def read_pointer(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """(tag, None) for a sound ``latest`` pointer of ``ckpt_dir``; (None, None) when there is
    none; (None, why) when it is damaged: not a small UTF-8 file holding one tag name of a
    complete checkpoint directly inside ``ckpt_dir`` (no path, no ``..``, no link out)."""
    pointer = ckpt_dir / LATEST
    if not os.path.lexists(pointer):
        return None, None
    if pointer.is_symlink() or not pointer.is_file():
        return None, "it is not a regular file"
    try:
        with open(pointer, "rb") as f:
            raw = f.read(_POINTER_MAX + 1)
    except OSError as e:
        return None, f"it cannot be read ({e.strerror})"
    if len(raw) > _POINTER_MAX:
        return None, f"it is {pointer.stat().st_size} bytes long, not a tag name (epochNNNN_stepNNNNNN)"
    try:
        tag = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None, f"it holds bytes that are not a tag name ({raw[:24]!r})"
    if parse_tag(tag) is None:
        return None, f"it holds {tag[:48]!r}, not a tag name (epochNNNN_stepNNNNNN)"
    target = ckpt_dir / tag
    if target.is_symlink() or not (target / META).is_file():
        return None, f"it names {tag}, but {target} is not a complete checkpoint folder (no {META})"
    return tag, None


def _load_structure(path: Path):
    """The pickled structure of a ``torch.save`` file with its tensors memory-mapped, not read."""
    import torch

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _model_problem(obj, meta: dict) -> str | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
        keys = sorted(obj)[:4] if isinstance(obj, dict) else type(obj).__name__
        return f"it holds no DeepSpeed 'module' state (found {keys}; a best.pt / last.pt is not a checkpoint)"
    client = obj.get("fastlt")
    if not isinstance(client, dict) or any(k not in client for k in _CLIENT_KEYS):
        return "it holds no fastlt training state (epoch, step, schedule, history)"
    if not (_is_int(client["epoch"]) and _is_int(client["step"])):
        return f"its position is epoch {client['epoch']!r} step {client['step']!r}"
    if "epoch" in meta and (client["epoch"], client["step"]) != (meta["epoch"], meta.get("step", 0)):
        return (f"it is at epoch {client['epoch']} step {client['step']}, {META} at epoch {meta['epoch']} "
                f"step {meta.get('step', 0)}")
    return None


def _rng_problem(obj) -> str | None:
    import torch

    ok = (isinstance(obj, dict) and isinstance(obj.get("torch"), torch.Tensor) and obj["torch"].dtype == torch.uint8
          and isinstance(obj.get("numpy"), dict) and isinstance(obj["numpy"].get("key"), torch.Tensor)
          and tuple(obj["numpy"]["key"].shape) == (624,) and isinstance(obj.get("python"), (tuple, list))
          and len(obj["python"]) == 3)
    return None if ok else "it does not hold fastlt's random generator states (torch, numpy, python)"


def _load_problem(f: Path, check) -> str | None:
    try:
        obj = _load_structure(f)
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the file is unusable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"it cannot be read ({type(e).__name__}: {first[:200]})"
    return check(obj)


def intact(path: Path, world_size: int | None) -> tuple[dict, list[str]]:
    """(meta, names of missing per-rank RNG files) of checkpoint ``path``; CheckpointError
    naming the file and what is wrong with it (see the module docstring)."""
    meta = read_meta(path)
    ranks = range(int(meta.get("world_size") or world_size or 1))
    shards = sorted(p.name for p in path.glob("zero_pp_rank_*_optim_states.pt"))
    files = [path / DS_MODEL_FILE]
    if shards:  # ZeRO / bf16 mode: a shard per rank
        expected = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks]
        extra = sorted(set(shards) - set(expected))
        if extra:
            raise CheckpointError(f"checkpoint {path} cannot be used: it holds {len(shards)} optimizer shards "
                                  f"({extra[0]} among them) but {META} says {len(ranks)} rank(s) wrote it")
        files += [path / n for n in expected]
    rngs = [path / f"rng_rank{r:05d}.pt" for r in ranks]
    missing_rng = [f.name for f in rngs if not f.is_file()]  # not fatal: see fastlt.training.preflight
    for f in files + [f for f in rngs if f.is_file()]:
        if (why := damage(f)) is not None:
            raise CheckpointError(f"checkpoint {path} cannot be used: {f.name}: {why}")
    checks = [(path / DS_MODEL_FILE, lambda o: _model_problem(o, meta))]
    checks += [(f, _rng_problem) for f in rngs if f.is_file()]
    for f, check in checks:
        if (why := _load_problem(f, check)) is not None:
            raise CheckpointError(f"checkpoint {path} cannot be used: {f.name} is damaged: {why}")
    return meta, missing_rng
