"""CIFAR-10-LT / CIFAR-100-LT (docs/design.md §2) from the standard python pickle batches, and the
in-memory array dataset they load into. Nothing is downloaded.

The batches are pickles, and a plain ``pickle.load`` runs whatever code a crafted file names.
:func:`load_batch` unpickles with an allowlist of exactly what CIFAR batches hold — dicts,
lists, bytes, str, ints and numpy arrays as numpy pickles them — and refuses anything else
before it is called.
"""
from __future__ import annotations

import builtins
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .profile import IMB_TYPES, bincount, check_imb_factor, long_tail_counts

__all__ = ["ArrayDataset", "CIFAR_NAMES", "cifar_lt", "load_batch"]


@dataclass
class ArrayDataset:
    """An in-memory image dataset: ``images`` uint8 (N, H, W, 3) HWC, ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    class_counts: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_CIFAR = {
    # name: (folder, train files, test files, label key, classes, archive)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "fine_labels",
        100,
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


def _latin1_encode(text, encoding="latin1", errors="strict"):
    # Python 3 pickles bytes (protocol < 3) as _codecs.encode(str, "latin1"); allow only that codec.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _numpy_globals() -> dict:
    """What numpy's pickles of arrays name, found from numpy itself (the module moved from
    numpy.core to numpy._core in numpy 2; old files name the old place)."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.int64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = reconstruct
        out[(f"{mod}.multiarray", "scalar")] = scalar
        out[(f"{mod}.numeric", "_frombuffer")] = frombuffer
    return out


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only the types a CIFAR python batch holds (see the module docstring)."""

    _allowed = {**_numpy_globals(), ("_codecs", "encode"): _latin1_encode,
                **{(mod, name): getattr(builtins, name) for mod in ("builtins", "__builtin__")
                   for name in ("dict", "list", "bytes", "str", "int", "bytearray")}}

    def find_class(self, module: str, name: str):
        found = self._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds only dicts, lists, "
                                         "bytes, str, ints and numpy arrays")
        return found


def load_batch(path: str | os.PathLike) -> dict:
    """One CIFAR python batch (a dict; bytes keys for the official files), unpickled with the
    allowlist of :class:`_BatchUnpickler`; ValueError naming the file for anything else."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: {e}; the file is not a CIFAR python batch (nothing in it was run)") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{path}: not a CIFAR python batch (damaged or another format: {type(e).__name__}: {e})"
                         ) from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (a {type(batch).__name__}, not a dict)")
    return batch


def _load_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = load_batch(path)
    # The official batches have bytes keys under encoding="bytes"; accept str keys too
    # (files re-pickled from Python 3 dictionaries).
    def get(key: str):
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
        raise ValueError(f"{path}: not a CIFAR python batch (no {key!r} key; keys: {list(batch)[:6]})")

    data = np.asarray(get("data"), dtype=np.uint8)
    labels = np.asarray(get(label_key), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected 'data' of shape (N, 3072) and N labels, got {data.shape} and {labels.shape}"
        )
    # Rows are R plane, G plane, B plane of 32×32 each: CHW → HWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def cifar_lt(
    root: str | os.PathLike,
    name: str,
    imb_factor: float,
    imb_type: str = "exp",
    train: bool = True,
    seed: int = 10,
) -> ArrayDataset:
    """CIFAR-10-LT / CIFAR-100-LT from the python pickle batches under ``root`` (no download).

    ``name`` is "cifar10" (``root/cifar-10-batches-py/data_batch_1..5, test_batch``) or
    "cifar100" (``root/cifar-100-python/train, test``). The train split keeps
    :func:`long_tail_counts`\\ (n_max, C, imb_factor, imb_type) images per class, n_max being
    the per-class count on disk (5000 / 500; the smallest class if they differ).
    ``imb_factor`` = n_min/n_max (0.01 for IF 100), see the module docstring.

    Which images are kept: a seeded shuffle of each class's indices, taking the first N_c —
    exactly the ``IMBALANCECIFAR`` selection of LDAM-DRW, BCL and ConCutMix
    (``np.random.seed(seed)`` then one ``shuffle`` per class in class order): ``seed=10``
    reproduces ConCutMix's subsets (``data.cifar_subset_seed``, its default), ``seed=0`` BCL's.
    Kept images are ordered by class. ``train=False`` returns the whole balanced test split
    in file order (``imb_factor`` and ``imb_type`` are then only validated).
    """
    if name not in _CIFAR:
        raise ValueError(f"name must be one of {sorted(_CIFAR)}, got {name!r}")
    imb_factor = check_imb_factor(imb_factor)
    if imb_type not in IMB_TYPES:
        raise ValueError(f"imb_type must be one of {IMB_TYPES}, got {imb_type!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    folder, train_files, test_files, label_key, num_classes, url = _CIFAR[name]
    base = Path(root) / folder
    files = train_files if train else test_files
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        archive = url.rsplit("/", 1)[1]
        raise FileNotFoundError(
            f"{name} not found: {base} lacks {', '.join(missing)}. fastlt does not download "
            f"data; download {url} and extract it into {Path(root)} "
            f"(tar -xzf {archive} -C {Path(root)}), which creates {folder}/ with "
            f"{', '.join(train_files + test_files)}"
        )
    parts = [_load_cifar_batch(base / f, label_key) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{base}: labels outside [0, {num_classes}) — is this really {name}?")
    if not train:
        return ArrayDataset(np.ascontiguousarray(images), labels, bincount(labels, num_classes), num_classes)

    on_disk = bincount(labels, num_classes)
    if on_disk.min() == 0:
        raise ValueError(f"{base}: class {int(np.argmin(on_disk))} has no training image")
    counts = long_tail_counts(int(on_disk.min()), num_classes, imb_factor, imb_type)
    # Legacy RandomState on purpose: its stream is frozen across numpy versions and matches
    # the reference's np.random.seed + np.random.shuffle, so the kept images are the same.
    rs = np.random.RandomState(int(seed))
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        rs.shuffle(idx)
        keep.append(idx[: counts[c]])
    keep_idx = np.concatenate(keep)
    return ArrayDataset(
        np.ascontiguousarray(images[keep_idx]), labels[keep_idx], counts.copy(), num_classes
    )


#: The CIFAR variants ``data.cifar`` accepts.
CIFAR_NAMES = tuple(_CIFAR)
