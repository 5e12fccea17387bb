"""Long-tailed datasets: list files, CIFAR-LT and a synthetic long-tailed image set.

Three sources feed the samplers (``fastlt.sampling``) and the pipelines
(``fastlt.pipelines``); each exposes ``labels`` (int64), ``class_counts`` (the N_j of
ARCHITECTURE §1) and ``num_classes``:

- :class:`LongTailedList` reads the ImageNet-LT / iNaturalist 2018 / Places-LT list format
  (``relative/path.jpg label`` per line) and hands out encoded image bytes, which the
  DALI pipelines decode on the GPU (nvJPEG) or the torch loader decodes with PIL.
- :func:`cifar_lt` builds CIFAR-10-LT / CIFAR-100-LT from the standard python pickle batches
  with the exponential or step profile of ARCHITECTURE §2.
- :func:`make_synthetic_lt` writes a small long-tailed JPEG dataset with real class signal
  (shape × colour on textured backgrounds), in the same list format: the embedded default
  for the demo, the tests and the pipeline benchmarks, since nothing here downloads data.

Imbalance convention (used by :func:`long_tail_counts`, :func:`cifar_lt` and
:func:`make_synthetic_lt`): ``imb_factor`` is the ratio n_min / n_max ≤ 1, as in the
LDAM-DRW / BCL code (``imb_factor=0.01`` is "IF 100" in the papers' tables). Class c keeps
⌊n_max · imb_factor^(c/(C−1))⌋ images, which is ARCHITECTURE §2's ⌊n_max · IF^(−c/(C−1))⌋
with IF = 1/imb_factor.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "ArrayDataset",
    "LongTailedList",
    "SyntheticLT",
    "cifar_lt",
    "long_tail_counts",
    "make_synthetic_lt",
]

IMB_TYPES = ("exp", "step")

# How many offending entries an error message lists before it just gives the count.
_SHOW_FIRST = 5


# --------------------------------------------------------------------------------------
# Long-tail profile (ARCHITECTURE §2)
# --------------------------------------------------------------------------------------


def long_tail_counts(n_max: int, num_classes: int, imb_factor: float, imb_type: str = "exp") -> np.ndarray:
    """Per-class image counts of a long-tailed profile (ARCHITECTURE §2), as int64.

    ``exp``: class c keeps ⌊n_max · imb_factor^(c/(C−1))⌋; ``step``: the first ⌊C/2⌋ classes
    keep n_max, the others ⌊n_max · imb_factor⌋. ``imb_factor`` = n_min / n_max ∈ (0, 1].
    Counts are clamped to at least 1 so that no class vanishes; for the published factors
    (≥ 0.01 with n_max ≥ 500) the clamp never triggers and the counts are the reference ones.
    """
    n_max = _check_positive_int("n_max", n_max)
    num_classes = _check_positive_int("num_classes", num_classes)
    imb_factor = _check_imb_factor(imb_factor)
    if imb_type not in IMB_TYPES:
        raise ValueError(f"imb_type must be one of {IMB_TYPES}, got {imb_type!r}")
    if imb_type == "exp":
        if num_classes == 1:
            counts = [n_max]
        else:
            # Same float expression as the reference code, so the floors agree bit for bit.
            counts = [int(n_max * imb_factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    else:
        half = num_classes // 2
        counts = [n_max] * half + [int(n_max * imb_factor)] * (num_classes - half)
    return np.maximum(np.asarray(counts, dtype=np.int64), 1)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_imb_factor(imb_factor) -> float:
    try:
        f = float(imb_factor)
    except (TypeError, ValueError):
        raise ValueError(f"imb_factor must be a number in (0, 1], got {imb_factor!r}") from None
    if f > 1.0:
        raise ValueError(
            f"imb_factor is the ratio n_min/n_max and must be in (0, 1], got {imb_factor!r}; "
            f"for an imbalance factor (IF) of {imb_factor:g} pass imb_factor={1.0 / f:g}"
        )
    if not f > 0.0:  # also rejects nan
        raise ValueError(f"imb_factor must be in (0, 1] (n_min/n_max), got {imb_factor!r}")
    return f


def _bincount(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes).astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------
# List files (ImageNet-LT / iNaturalist 2018 / Places-LT)
# --------------------------------------------------------------------------------------


class LongTailedList:
    """A dataset given by a list file of ``relative/path.jpg label`` lines.

    Each line is split on its LAST run of whitespace, so paths containing spaces survive;
    blank lines are ignored. Line numbers in messages are 1-based lines of the file.

    Args:
        root: directory the relative paths are resolved against.
        list_file: the list file.
        num_classes: number of classes; inferred as max label + 1 when None.
        check_files: check up front that every image exists (see :meth:`check_files`).
        require_all_classes: every class in [0, num_classes) must have at least one image
            (training lists); pass False for val/test lists.

    Attributes: ``root`` (Path), ``list_file`` (Path), ``paths`` (list of relative str),
    ``labels`` (int64 array), ``num_classes`` (int), ``class_counts`` (int64, length C).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        list_file: str | os.PathLike,
        num_classes: int | None = None,
        *,
        check_files: bool = False,
        require_all_classes: bool = True,
    ) -> None:
        self.root = Path(root)
        self.list_file = Path(list_file)
        if num_classes is not None:
            num_classes = _check_positive_int("num_classes", num_classes)
        try:
            text = self.list_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"list file {self.list_file} does not exist") from None
        except UnicodeDecodeError as e:
            line = e.object[: e.start].count(b"\n") + 1
            raise ValueError(f"{self.list_file}: line {line} is not valid UTF-8 ({e.reason})") from None

        # Parse with whole-list operations (str methods in comprehensions, one numpy
        # conversion of the labels): the 437k-line iNaturalist list takes well under 1 s.
        lines = text.splitlines()
        stripped = [ln.strip() for ln in lines]
        keep = [i for i, s in enumerate(stripped) if s]
        if not keep:
            raise ValueError(f"{self.list_file}: no entries (the file is empty or only blank lines)")
        # 1-based line numbers of the entries, kept for error messages.
        self._line_numbers = np.asarray(keep, dtype=np.int64) + 1
        parts = [stripped[i].rsplit(None, 1) for i in keep]
        bad = [k for k, p in enumerate(parts) if len(p) != 2]
        if bad:
            k = bad[0]
            raise ValueError(
                f"{self.list_file}: line {self._line_numbers[k]} is malformed: expected "
                f"'<relative/path.jpg> <integer label>', got {lines[keep[k]]!r}"
                + (f" ({len(bad)} malformed lines in all)" if len(bad) > 1 else "")
            )
        self.paths: list[str] = [p[0] for p in parts]
        self.labels = self._parse_labels([p[1] for p in parts])

        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0:
            k = int(np.argmax(self.labels < 0))
            raise ValueError(
                f"{self.list_file}: line {self._line_numbers[k]} has label {self.labels[k]}; "
                f"labels must be in [0, num_classes)"
            )
        if num_classes is None:
            num_classes = hi + 1
        elif hi >= num_classes:
            k = int(np.argmax(self.labels >= num_classes))
            raise ValueError(
                f"{self.list_file}: line {self._line_numbers[k]} has label {self.labels[k]}, but "
                f"num_classes is {num_classes} (labels must be in [0, {num_classes})); "
                f"pass the dataset's number of classes or fix the list"
            )
        self.num_classes: int = num_classes
        self.class_counts = _bincount(self.labels, num_classes)
        if require_all_classes:
            empty = np.flatnonzero(self.class_counts == 0)
            if empty.size:
                raise ValueError(
                    f"{self.list_file}: {empty.size} of {num_classes} classes have no image "
                    f"(first: {empty[:_SHOW_FIRST].tolist()}); every class in [0, {num_classes}) "
                    f"needs a training image. Fix num_classes or the list, or pass "
                    f"require_all_classes=False for a val/test list"
                )
        if check_files:
            self.check_files()

    def _parse_labels(self, tokens: list[str]) -> np.ndarray:
        try:
            return np.array([int(t) for t in tokens], dtype=np.int64)
        except (ValueError, OverflowError):
            pass
        # Slow path only to locate the culprit for the message.
        for k, t in enumerate(tokens):
            try:
                v = int(t)
                np.int64(v)
            except (ValueError, OverflowError):
                raise ValueError(
                    f"{self.list_file}: line {self._line_numbers[k]} has label {t!r}, which is not "
                    f"an integer (int64); expected '<relative/path.jpg> <integer label>'"
                ) from None
        raise AssertionError("unreachable: a label failed to parse but none was found")

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (
            f"LongTailedList({str(self.list_file)!r}, n={len(self)}, num_classes={self.num_classes}, "
            f"counts max/min={int(self.class_counts.max())}/{int(self.class_counts.min())})"
        )

    def _index(self, i: int) -> int:
        n = len(self.paths)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.list_file} with {n} entries")
        return int(i) % n

    def line_number(self, i: int) -> int:
        """1-based line of the list file that entry ``i`` comes from."""
        return int(self._line_numbers[self._index(i)])

    def full_path(self, i: int) -> str:
        """Path of image ``i`` (root joined with its relative path), as a str."""
        return os.path.join(self.root, self.paths[self._index(i)])

    def read_bytes(self, i: int) -> bytes:
        """The encoded (e.g. JPEG) bytes of image ``i``."""
        i = self._index(i)
        path = self.full_path(i)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image {path} does not exist (line {self._line_numbers[i]} of {self.list_file}); "
                f"check root={str(self.root)!r} or the list"
            ) from None

    def check_files(self) -> None:
        """Raise FileNotFoundError naming how many images are missing and the first few.

        Lists each image directory once instead of stat-ing every file: on network file
        systems one listing per directory is much cheaper than one stat per image.
        """
        listing: dict[str, set[str] | None] = {}
        missing: list[int] = []
        for k, rel in enumerate(self.paths):
            full = os.path.join(self.root, rel)
            d, name = os.path.split(full)
            names = listing.get(d, False)
            if names is False:
                try:
                    names = set(os.listdir(d))
                except (FileNotFoundError, NotADirectoryError):
                    names = None
                listing[d] = names
            if names is None or name not in names:
                missing.append(k)
        if missing:
            first = ", ".join(
                f"{os.path.join(self.root, self.paths[k])} (line {self._line_numbers[k]})"
                for k in missing[:_SHOW_FIRST]
            )
            raise FileNotFoundError(
                f"{len(missing)} of {len(self)} images listed in {self.list_file} are missing "
                f"under root {self.root}; first: {first}"
            )


# --------------------------------------------------------------------------------------
# CIFAR-LT (ARCHITECTURE §2)
# --------------------------------------------------------------------------------------


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


def _load_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
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
    seed: int = 0,
) -> ArrayDataset:
    """CIFAR-10-LT / CIFAR-100-LT from the python pickle batches under ``root`` (no download).

    ``name`` is "cifar10" (``root/cifar-10-batches-py/data_batch_1..5, test_batch``) or
    "cifar100" (``root/cifar-100-python/train, test``). The train split keeps
    :func:`long_tail_counts`\\ (n_max, C, imb_factor, imb_type) images per class, n_max being
    the per-class count on disk (5000 / 500; the smallest class if they differ).
    ``imb_factor`` = n_min/n_max (0.01 for IF 100), see the module docstring.

    Which images are kept: a seeded shuffle of each class's indices, taking the first N_c —
    exactly the LDAM-DRW / BCL ``IMBALANCECIFAR`` selection (``np.random.seed(seed)`` then one
    ``shuffle`` per class in class order), so ``seed=0`` reproduces the reference subsets.
    Kept images are ordered by class. ``train=False`` returns the whole balanced test split
    in file order (``imb_factor`` and ``imb_type`` are then only validated).
    """
    if name not in _CIFAR:
        raise ValueError(f"name must be one of {sorted(_CIFAR)}, got {name!r}")
    imb_factor = _check_imb_factor(imb_factor)
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
        return ArrayDataset(np.ascontiguousarray(images), labels, _bincount(labels, num_classes), num_classes)

    on_disk = _bincount(labels, num_classes)
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


# --------------------------------------------------------------------------------------
# Synthetic long-tailed JPEG dataset
# --------------------------------------------------------------------------------------

_MANIFEST = "manifest.json"
_GENERATOR = "fastlt.data.make_synthetic_lt"
# Bump when the image recipe changes, so that caches made by older code regenerate.
_SYNTH_VERSION = 1
_SHAPES = (
    "circle", "square", "triangle", "plus", "ring", "h-stripes",
    "v-stripes", "diamond", "x-cross", "half-disk", "frame", "checker",
)
_N_COLOURS = 12
MAX_SYNTHETIC_CLASSES = len(_SHAPES) * _N_COLOURS


@dataclass
class SyntheticLT:
    """A synthetic long-tailed dataset on disk; load the lists with :class:`LongTailedList`."""

    root: Path
    train_list: Path
    val_list: Path
    num_classes: int
    class_counts: np.ndarray


def _class_shape_colour(c: int) -> tuple[int, int]:
    # c = 12a + b → (shape b, colour (a + b) mod 12): unique for c < 144, and the first 12
    # classes differ in both shape and colour.
    b, a = c % len(_SHAPES), c // len(_SHAPES)
    return b, (a + b) % _N_COLOURS


def _palette() -> np.ndarray:
    """12 saturated colours, hues 30° apart (HSV → RGB), float32 in [0, 1]."""
    h = np.arange(_N_COLOURS, dtype=np.float64) / _N_COLOURS
    s, v = 0.9, 0.95
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0) % 6.0
    rgb = v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return rgb.astype(np.float32)


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of one shape in local coordinates (u, v) where the shape spans [-1, 1]."""
    au, av = np.abs(u), np.abs(v)
    box = np.maximum(au, av)
    r = np.sqrt(u * u + v * v)
    name = _SHAPES[shape]
    if name == "circle":
        return r <= 1.0
    if name == "square":
        return box <= 0.8
    if name == "triangle":
        return (v <= 0.7) & (au <= (v + 0.9) * 0.6)
    if name == "plus":
        return ((au <= 0.25) & (av <= 0.9)) | ((av <= 0.25) & (au <= 0.9))
    if name == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if name == "h-stripes":
        return (box <= 0.9) & (np.floor((v + 1.0) * 2.5) % 2 == 0)
    if name == "v-stripes":
        return (box <= 0.9) & (np.floor((u + 1.0) * 2.5) % 2 == 0)
    if name == "diamond":
        return au + av <= 1.0
    if name == "x-cross":
        return ((np.abs(u - v) <= 0.3) | (np.abs(u + v) <= 0.3)) & (box <= 0.85)
    if name == "half-disk":
        return (r <= 1.0) & (v >= 0.0)
    if name == "frame":
        return (box <= 0.9) & (box >= 0.55)
    if name == "checker":
        return (box <= 0.9) & ((np.floor((u + 1.0) * 2.2) + np.floor((v + 1.0) * 2.2)) % 2 == 0)
    raise AssertionError(name)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights, align-corners style."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.minimum(pos.astype(np.int64), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _smooth_texture(rng: np.random.Generator, n: int, h: int, w: int, grid: int = 5) -> np.ndarray:
    """Smooth random texture (n, h, w) in [-1, 1]: a grid×grid field upsampled bilinearly.

    Separable interpolation as two plain (non-BLAS) einsums: a BLAS matmul here spawns
    threads that crawl when the cores are shared (parallel tests, DataLoader workers).
    """
    ctrl = rng.uniform(-1.0, 1.0, size=(n, grid, grid)).astype(np.float32)
    rows = np.einsum("hi,nij->nhj", _interp_matrix(h, grid), ctrl)
    return np.einsum("nhj,wj->nhw", rows, _interp_matrix(w, grid))


def _render(classes: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Render one image per entry of ``classes`` as uint8 (n, h, w, 3), vectorised."""
    n = classes.shape[0]
    palette = _palette()
    side = float(min(h, w))
    # Background: a random dull tint (grey level ± a small colour cast) shaded by a smooth
    # random texture (5×5 control points, bilinear), plus pixel noise — varied, not class
    # dependent. The shading is multiplicative so it keeps the tint's low saturation: the
    # saturated class colour stays the foreground's.
    grey = rng.uniform(0.3, 0.7, size=(n, 1, 1, 1)).astype(np.float32)
    tint = grey + rng.uniform(-0.1, 0.1, size=(n, 1, 1, 3)).astype(np.float32)
    img = (_smooth_texture(rng, n, h, w)[..., None] * np.float32(0.35) + np.float32(1.0)) * tint
    # Foreground: the class's shape in the class's colour, random scale/position/rotation.
    radius = rng.uniform(0.18, 0.34, size=n).astype(np.float32) * side
    cy = rng.uniform(radius, h - radius).astype(np.float32)
    cx = rng.uniform(radius, w - radius).astype(np.float32)
    theta = rng.uniform(-0.35, 0.35, size=n).astype(np.float32)  # ±20°: keeps h/v stripes apart
    brightness = rng.uniform(0.8, 1.1, size=(n, 1)).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[None, :, None] + 0.5 - cy[:, None, None]
    xx = np.arange(w, dtype=np.float32)[None, None, :] + 0.5 - cx[:, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    r = radius[:, None, None]
    u = (xx * cos + yy * sin) / r
    v = (yy * cos - xx * sin) / r
    shape_colour = np.array([_class_shape_colour(int(c)) for c in classes]).reshape(n, 2)
    mask = np.zeros((n, h, w), dtype=bool)
    for s in np.unique(shape_colour[:, 0]):
        sel = np.flatnonzero(shape_colour[:, 0] == s)
        mask[sel] = _shape_mask(int(s), u[sel], v[sel])
    fg = (palette[shape_colour[:, 1]] * brightness)[:, None, None, :]
    np.copyto(img, fg, where=mask[..., None])
    # Pixel noise over foreground and background alike: uniform float32 draws (5× cheaper
    # than normal ones), centred and scaled in place to keep one image-sized temporary.
    noise = rng.random(size=img.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(0.16)
    img += noise
    np.clip(img, 0.0, 1.0, out=img)
    img *= np.float32(255.0)
    img += np.float32(0.5)
    return img.astype(np.uint8)


def _manifest_ok(out_dir: Path, params: dict) -> bool:
    """True when ``out_dir`` holds a complete dataset generated with exactly ``params``."""
    try:
        manifest = json.loads((out_dir / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("params") != params:
        return False
    try:
        for split in ("train", "val"):
            if (out_dir / f"{split}.txt").stat().st_size != manifest["list_sizes"][split]:
                return False
            # One listing per class directory: cheap, and catches deleted images.
            n = sum(len(os.listdir(d)) for d in (out_dir / split).iterdir())
            if n != manifest["num_images"][split]:
                return False
    except (OSError, KeyError, TypeError):
        return False
    return True


def _replaceable(out_dir: Path) -> bool:
    """Only an empty directory or one of our datasets (it has a manifest) may be replaced."""
    return not any(out_dir.iterdir()) or (out_dir / _MANIFEST).is_file()


def make_synthetic_lt(
    out_dir: str | os.PathLike,
    num_classes: int = 10,
    imb_factor: float = 0.1,
    n_max: int = 200,
    image_size: int | Sequence[int] = 64,
    seed: int = 0,
    n_val: int = 20,
    imb_type: str = "exp",
    jpeg_quality: int = 90,
) -> SyntheticLT:
    """Write (or reuse) a synthetic long-tailed JPEG dataset under ``out_dir``.

    Class c is a shape (circle, square, triangle, plus, ring, stripes, ...) in a colour
    (12 shapes × 12 hues, up to 144 classes), drawn at a random position, scale and small
    rotation on a textured noisy background, so a small CNN learns it in a few epochs.
    Train counts follow :func:`long_tail_counts`\\ (n_max, num_classes, imb_factor, imb_type);
    val has ``n_val`` images per class. ``image_size`` is an int or (height, width).

    Layout: ``out_dir/{train,val}/<class:03d>/<index:05d>.jpg``, ``train.txt`` and ``val.txt``
    (paths relative to ``out_dir``) and ``manifest.json``. A call whose parameters match an
    intact manifest reuses the files without touching them; otherwise the dataset is
    generated in a temporary sibling directory and renamed into place, so an interrupted
    run never leaves a half dataset that looks cached. An existing ``out_dir`` is replaced
    only if it is empty or holds a previous synthetic dataset (a manifest.json).
    """
    from PIL import Image  # local: only this function needs PIL

    out_dir = Path(out_dir).resolve()
    num_classes = _check_positive_int("num_classes", num_classes)
    if num_classes > MAX_SYNTHETIC_CLASSES:
        raise ValueError(
            f"num_classes must be at most {MAX_SYNTHETIC_CLASSES} (12 shapes × 12 colours), got {num_classes}"
        )
    n_max = _check_positive_int("n_max", n_max)
    n_val = _check_positive_int("n_val", n_val)
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        hw = (int(image_size), int(image_size))
    else:
        try:
            hw = tuple(int(s) for s in image_size)  # type: ignore[union-attr]
        except TypeError:
            hw = ()
    if len(hw) != 2 or min(hw) < 8:
        raise ValueError(f"image_size must be an int or (height, width), each >= 8, got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, (int, np.integer)) or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be an integer in [1, 100], got {jpeg_quality!r}")
    counts = long_tail_counts(n_max, num_classes, imb_factor, imb_type)
    params = {
        "version": _SYNTH_VERSION,
        "num_classes": num_classes,
        "imb_factor": float(imb_factor),
        "n_max": n_max,
        "image_size": list(hw),
        "seed": int(seed),
        "n_val": n_val,
        "imb_type": imb_type,
        "jpeg_quality": int(jpeg_quality),
    }
    result = SyntheticLT(out_dir, out_dir / "train.txt", out_dir / "val.txt", num_classes, counts)
    if _manifest_ok(out_dir, params):
        return result
    if out_dir.exists() and (not out_dir.is_dir() or not _replaceable(out_dir)):
        raise ValueError(
            f"{out_dir} exists and is not a fastlt synthetic dataset (no {_MANIFEST}); refusing to "
            f"overwrite it — pass a new or empty directory"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        h, w = hw
        manifest = {"generator": _GENERATOR, "params": params, "list_sizes": {}, "num_images": {}}
        split_counts = {"train": counts, "val": np.full(num_classes, n_val, dtype=np.int64)}
        for split_id, (split, per_class) in enumerate(split_counts.items()):
            classes = np.repeat(np.arange(num_classes), per_class)
            index_in_class = np.concatenate([np.arange(k) for k in per_class])
            rels = [f"{split}/{c:03d}/{i:05d}.jpg" for c, i in zip(classes.tolist(), index_in_class.tolist())]
            for c in range(num_classes):
                (tmp / split / f"{c:03d}").mkdir(parents=True)
            # Independent streams per split, so val images do not depend on the train counts.
            rng = np.random.default_rng([int(seed), split_id])
            # Chunks of ~1 Mpixel bound the float32 work arrays to ~12 MB whatever the image size.
            chunk = max(1, (1 << 20) // (h * w))
            for start in range(0, classes.size, chunk):
                pixels = _render(classes[start : start + chunk], h, w, rng)
                for k in range(pixels.shape[0]):
                    Image.fromarray(pixels[k]).save(tmp / rels[start + k], format="JPEG", quality=int(jpeg_quality))
            text = "".join(f"{p} {c}\n" for p, c in zip(rels, classes.tolist()))
            (tmp / f"{split}.txt").write_text(text, encoding="utf-8")
            manifest["list_sizes"][split] = len(text.encode("utf-8"))
            manifest["num_images"][split] = len(rels)
        # The manifest is written last: a directory without it is never taken as a cache.
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")

        if out_dir.exists():
            if _manifest_ok(out_dir, params):  # another process finished the same dataset first
                shutil.rmtree(tmp, ignore_errors=True)
                return result
            trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Lost a race with a concurrent call that renamed its copy in between.
            if _manifest_ok(out_dir, params):
                shutil.rmtree(tmp, ignore_errors=True)
                return result
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
