"""A synthetic long-tailed JPEG dataset with real class signal (shape × colour on textured
backgrounds), in the list format: the embedded default for the demo, the tests and the
pipeline benchmarks, since nothing here downloads data.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fastlt.paths import read_regular

from .profile import check_positive_int, long_tail_counts

__all__ = ["MAX_SYNTHETIC_CLASSES", "SyntheticLT", "make_synthetic_lt"]

_MANIFEST = "manifest.json"
_GENERATOR = "fastlt.data.make_synthetic_lt"
# Bump when the image recipe changes, so that caches made by older code regenerate.
_SYNTH_VERSION = 2
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
    # c = 12a + b → (shape b, colour (b + 5a) mod 12): unique for c < 144 (5 is prime to 12),
    # the first 12 classes differ in both shape and colour, and classes 12-23 repeat shapes 0-11
    # at hues 150° away. A step of one colour (30°) made those pairs differ by less than the
    # contrastive views' hue jitter (±0.1 = ±36°, fastlt.pipelines.transforms): a view of one
    # class could look like an image of the other (version 1 of the data).
    b, a = c % len(_SHAPES), c // len(_SHAPES)
    return b, (b + 5 * a) % _N_COLOURS


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
        manifest = json.loads(read_regular(out_dir / _MANIFEST).decode("utf-8"))  # a FIFO there is no manifest
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
    num_classes = check_positive_int("num_classes", num_classes)
    if num_classes > MAX_SYNTHETIC_CLASSES:
        raise ValueError(
            f"num_classes must be at most {MAX_SYNTHETIC_CLASSES} (12 shapes × 12 colours), got {num_classes}"
        )
    n_max = check_positive_int("n_max", n_max)
    n_val = check_positive_int("n_val", n_val)
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
