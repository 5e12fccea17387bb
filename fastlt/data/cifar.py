"""CIFAR-10-LT / CIFAR-100-LT (docs/design.md §2) from the standard python pickle batches, and the
in-memory array dataset they load into. Nothing is downloaded.

The batches are pickles, and a plain ``pickle.load`` runs whatever code a crafted file names.
:func:`load_batch` unpickles with an allowlist of exactly what CIFAR batches hold — dicts,
lists, bytes, str, ints and numpy arrays of plain numbers as numpy pickles them — and refuses
anything else before it is called; nothing it builds is larger than the file (a 48-byte pickle
can otherwise ask for 2^40 bytes). The batch is then validated, not cast: 'data' uint8
(N, 3072) and N integer labels in [0, C), or an error naming the file and the field.
"""
from __future__ import annotations

import builtins
import io
import os
import pickle
import pickletools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastlt.paths import expect_file, kind_of, read_regular

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


def _numpy_globals(limit: int) -> dict:
    """What numpy's pickles of arrays name, found from numpy itself (the module moved from
    numpy.core to numpy._core in numpy 2; old files name the old place), each bounded: no array
    of more than ``limit`` bytes is allocated and no dtype but plain numbers is made (an object
    dtype would let a short file ask for an array of any size)."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.int64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]

    def dtype(*args):
        dt = np.dtype(*args)
        if dt.kind not in "biuf" or dt.fields is not None or dt.subdtype is not None:
            raise pickle.UnpicklingError(f"refused numpy dtype {dt.str!r}: a CIFAR batch holds plain numbers only")
        return dt

    def bounded_reconstruct(subtype, shape, dt):
        n = 1
        for k in shape if isinstance(shape, tuple) else (shape,):
            if not isinstance(k, int) or k < 0:
                raise pickle.UnpicklingError(f"refused an array of shape {shape!r}")
            n *= k
        if subtype is not np.ndarray or n > limit:
            raise pickle.UnpicklingError(f"refused an array of shape {shape!r}: more than the file's {limit} bytes")
        return reconstruct(subtype, shape, dt)

    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): dtype}
    for mod in ("numpy.core", "numpy._core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = bounded_reconstruct
        out[(f"{mod}.multiarray", "scalar")] = scalar
        out[(f"{mod}.numeric", "_frombuffer")] = frombuffer
    return out


def _sized(cls, limit: int):
    """``bytes`` / ``bytearray`` that refuse to make more than ``limit`` bytes out of nothing
    (``bytearray(2**40)`` from a 48-byte pickle)."""
    def make(*args):
        if args and isinstance(args[0], int) and not 0 <= args[0] <= limit:
            raise pickle.UnpicklingError(f"refused {cls.__name__}({args[0]}): more than the file's {limit} bytes")
        return cls(*args)
    return make


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only the types a CIFAR python batch holds (see the module docstring), making
    nothing larger than the file (``limit``, its size in bytes)."""

    def __init__(self, file, limit: int, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = {**_numpy_globals(limit), ("_codecs", "encode"): _latin1_encode,
                         **{(mod, name): getattr(builtins, name) for mod in ("builtins", "__builtin__")
                            for name in ("dict", "list", "str", "int")},
                         **{(mod, cls.__name__): _sized(cls, limit) for mod in ("builtins", "__builtin__")
                            for cls in (bytes, bytearray)}}

    def find_class(self, module: str, name: str):
        found = self._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds only dicts, lists, "
                                         "bytes, str, ints and numpy arrays")
        return found


def _check_opcodes(raw: bytes) -> None:
    """Walk the pickle's opcodes without building anything: a length field that claims more
    bytes than the file holds (which the C unpickler would allocate before reading), an unknown
    opcode or a cut-off file is refused here."""
    for _ in pickletools.genops(io.BytesIO(raw)):
        pass


def load_batch(path: str | os.PathLike) -> dict:
    """One CIFAR python batch (a dict; bytes keys for the official files), unpickled with the
    allowlist of :class:`_BatchUnpickler`; ValueError naming the file for anything else. Only a
    regular file is opened, and no allocation is larger than the file."""
    expect_file(path, "CIFAR batch", error=ValueError, missing_error=FileNotFoundError)
    try:
        raw = read_regular(path)
    except OSError as e:
        raise ValueError(f"CIFAR batch {path} cannot be read: {e.strerror or e}") from None
    try:
        _check_opcodes(raw)
        batch = _BatchUnpickler(io.BytesIO(raw), max(len(raw), 1), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: {e}; the file is not a CIFAR python batch (nothing in it was run)") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged pickle makes the unpickler raise (even SystemError)
        raise ValueError(f"{path}: not a CIFAR python batch (damaged or another format: {type(e).__name__}: {e})"
                         ) from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (a {type(batch).__name__}, not a dict)")
    return batch


def _field(batch: dict, path: Path, key: str):
    # The official batches have bytes keys under encoding="bytes"; accept str keys too
    # (files re-pickled from Python 3 dictionaries).
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    keys = [k.decode(errors="replace") if isinstance(k, bytes) else repr(k) for k in list(batch)[:6]]
    raise ValueError(f"{path}: not a CIFAR python batch (no {key!r} field; fields: {keys})")


def _load_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3), labels int64 (N,)) of one batch, validated, never cast: the
    'data' field must be a uint8 array (N, 3072) and the labels N integers in [0, num_classes)."""
    batch = load_batch(path)
    data = _field(batch, path, "data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__)
        raise ValueError(f"{path}: field 'data' must be a uint8 array of shape (N, 3072) (32x32 RGB rows, as "
                         f"the official batches hold them); got {got}. Use the original batch, not a converted one")
    raw_labels = _field(batch, path, label_key)
    if isinstance(raw_labels, np.ndarray):
        ok = raw_labels.ndim == 1 and raw_labels.dtype.kind in "iu"
        got = f"{raw_labels.dtype} {raw_labels.shape}"
    elif isinstance(raw_labels, list):
        bad = next((x for x in raw_labels if isinstance(x, bool) or not isinstance(x, (int, np.integer))), None)
        ok = bad is None
        got = f"a list holding {bad!r} ({type(bad).__name__})"
    else:
        ok, got = False, type(raw_labels).__name__
    if not ok:
        raise ValueError(f"{path}: field {label_key!r} must be a list of integer class indices; got {got}")
    if len(raw_labels) != data.shape[0]:
        raise ValueError(f"{path}: field 'data' holds {data.shape[0]} images but field {label_key!r} "
                         f"{len(raw_labels)} labels")
    if len(raw_labels) and (min(raw_labels) < 0 or max(raw_labels) >= num_classes):
        lo, hi = int(min(raw_labels)), int(max(raw_labels))
        raise ValueError(f"{path}: field {label_key!r} holds labels in [{lo}, {hi}], outside [0, {num_classes}) — "
                         "is this really the right CIFAR variant (data.cifar)?")
    labels = np.asarray(raw_labels, dtype=np.int64)
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
    missing = [f for f in train_files + test_files if kind_of(base / f) == "missing"]
    if missing:
        archive = url.rsplit("/", 1)[1]
        raise FileNotFoundError(
            f"{name} not found: {base} lacks {', '.join(missing)}. fastlt does not download "
            f"data; download {url} and extract it into {Path(root)} "
            f"(tar -xzf {archive} -C {Path(root)}), which creates {folder}/ with "
            f"{', '.join(train_files + test_files)}"
        )
    parts = [_load_cifar_batch(base / f, label_key, num_classes) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
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
