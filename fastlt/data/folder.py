"""Image-folder datasets (``data.kind: folder``): one sub-folder per class, the class index
given by the sorted folder names, as torchvision's ``ImageFolder``::

    root/train/<class name>/<image>.jpg      (data.train_dir, default "train")
    root/val/<class name>/<image>.jpg        (data.val_dir, default "val")

:class:`ImageFolderLT` presents the interface of :class:`~fastlt.data.LongTailedList`
(``root``, ``paths``, ``labels``, ``num_classes``, ``class_counts``, ``full_path(i)``,
``read_bytes(i)``), so the samplers, the bad-input policy and both pipeline backends treat
the two formats alike. Images are ordered by class, then by file name within the class,
which is the order of a list file written class by class in sorted order: the same files in
the same order give the same batches for the same seed.

Class names come from the folder names (a validation folder is indexed with the training
folder's names); list datasets can name their classes with a ``data.class_names`` file
(:func:`read_class_names`). :func:`write_class_map` saves the mapping into a run directory.
Nothing here imports torch.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from fastlt.paths import expect_dir, expect_file, kind_of, read_regular

from .profile import bincount, check_index

__all__ = ["CLASS_MAP_FILE", "IMAGE_EXTENSIONS", "ImageFolderLT", "class_label", "read_class_map",
           "read_class_names", "write_class_map"]

#: File endings taken as images (what PIL and DALI's decoders read), compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: The class-index -> name mapping written into a run directory.
CLASS_MAP_FILE = "classes.json"
_SHOW_FIRST = 5
_LOG = logging.getLogger("fastlt.data")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class ImageFolderLT:
    """A dataset laid out as ``root/<class name>/<image>`` (see the module docstring).

    Args:
        root: the folder that holds one sub-folder per class.
        class_names: the classes in index order; None = the sorted sub-folder names. Pass the
            training set's names for a validation folder, so the indices agree; a folder that
            is not among them is an error.
        num_classes: expected number of classes (checked against the folders); None = any.
        require_all_classes: every class needs at least one image (training folders).

    Attributes: ``root`` (Path), ``paths`` (relative str ``class/file``), ``labels`` (int64),
    ``num_classes``, ``class_counts`` (int64, length C), ``class_names`` (list of str).
    """

    def __init__(self, root: str | os.PathLike, class_names: list[str] | None = None,
                 num_classes: int | None = None, *, require_all_classes: bool = True) -> None:
        self.root = Path(root)
        expect_dir(self.root, "image folder", error=ValueError, missing_error=FileNotFoundError,
                   missing=f"image folder {self.root} does not exist (expected one sub-folder per class)")
        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        loose = sorted(e.name for e in os.scandir(self.root) if e.is_file() and _is_image(e.name))
        if not folders:
            hint = (f"; it holds {len(loose)} images directly (first: {loose[0]}): put each class's images in a "
                    "sub-folder named after the class") if loose else ""
            raise ValueError(f"image folder {self.root} has no class sub-folders{hint}")
        if class_names is None:
            class_names = folders
        else:
            known = set(class_names)
            unknown = [f for f in folders if f not in known]
            if unknown:
                raise ValueError(f"image folder {self.root} has class folder(s) {unknown[:_SHOW_FIRST]} that the "
                                 f"training folder does not have ({len(class_names)} classes there); rename or "
                                 "remove them so both splits name the same classes")
        self.class_names: list[str] = list(class_names)
        if num_classes is not None and num_classes != len(self.class_names):
            raise ValueError(f"image folder {self.root} has {len(self.class_names)} classes, but num_classes is "
                             f"{num_classes}; pass num_classes={len(self.class_names)} or None")
        self.num_classes = len(self.class_names)
        index = {name: i for i, name in enumerate(self.class_names)}
        paths, labels = [], []
        scan = _Scan(self.root)
        for name in sorted(folders, key=index.__getitem__):
            files = _walk_images(self.root / name, scan)
            paths.extend(f"{name}/{f}" for f in files)
            labels.extend([index[name]] * len(files))
        if scan.special:
            raise ValueError(f"image folder {self.root}: {len(scan.special)} image-named entries are not regular files "
                             f"(first: {', '.join(scan.special[:_SHOW_FIRST])}); fastlt never opens those (reading a "
                             "FIFO blocks for ever): remove them or replace them by the image files")
        #: What the scan reported besides images (loops, images reached twice, links leaving the root).
        self.scan_notes: list[str] = [f"image folder {self.root}: {n}" for n in scan.notes()]
        for note in self.scan_notes:
            _LOG.warning(note)
        if not paths:
            raise ValueError(f"image folder {self.root}: the class folders hold no images "
                             f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.paths: list[str] = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_counts = bincount(self.labels, self.num_classes)
        if require_all_classes:
            empty = np.flatnonzero(self.class_counts == 0)
            if empty.size:
                names = [self.class_names[i] for i in empty[:_SHOW_FIRST]]
                raise ValueError(f"image folder {self.root}: {empty.size} of {self.num_classes} classes have no "
                                 f"image (first: {names}); every training class needs one — add images or "
                                 "remove the empty folders")

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (f"ImageFolderLT({str(self.root)!r}, n={len(self)}, num_classes={self.num_classes}, "
                f"counts max/min={int(self.class_counts.max())}/{int(self.class_counts.min())})")

    def _index(self, i: int) -> int:
        return check_index(i, len(self.paths), f"{self.root} with {len(self.paths)} images")

    def full_path(self, i: int) -> str:
        """Path of image ``i`` (root joined with ``class/file``), as a str."""
        return os.path.join(self.root, self.paths[self._index(i)])

    def read_bytes(self, i: int) -> bytes:
        """The encoded (e.g. JPEG) bytes of image ``i``."""
        path = self.full_path(i)
        try:
            return read_regular(path)  # a FIFO or device named like an image is refused, never read
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} does not exist any more (it was listed when {self.root} "
                                    "was scanned)") from None


class _Scan:
    """What a folder scan met besides images: symbolic links that loop back to a folder above
    them, images reached twice (through links; counted once), links leading out of the dataset
    root (followed), and image-named entries that are not regular files (FIFOs, sockets, devices:
    refused, as reading one can block for ever)."""

    def __init__(self, root: Path):
        self.root_real = os.path.realpath(root)
        self.seen_dirs: set[str] = set()
        self.seen_files: dict[str, str] = {}
        self.loops: list[str] = []
        self.twice: list[str] = []
        self.outside: list[str] = []
        self.crossing: list[str] = []
        self.special: list[str] = []

    def inside(self, real: str, top: str | None = None) -> bool:
        """Whether the real path ``real`` is ``top`` (default: the dataset root) or under it."""
        top = self.root_real if top is None else top
        return real == top or real.startswith(top.rstrip(os.sep) + os.sep)

    def notes(self) -> list[str]:
        """One line per kind of finding, with the count and the first few."""
        out = []
        for items, what in ((self.loops, "symbolic link(s) loop back to a folder above them (not followed)"),
                            (self.twice, "image(s) are reached a second time through links (counted once)"),
                            (self.crossing, "link(s) lead into another class's folder (not followed: the images "
                                            "would take this class's label)"),
                            (self.outside, "link(s) lead outside the dataset root (followed)")):
            if items:
                out.append(f"{len(items)} {what}: {', '.join(items[:_SHOW_FIRST])}"
                           + (f" (+{len(items) - _SHOW_FIRST} more)" if len(items) > _SHOW_FIRST else ""))
        return out


def _walk_images(folder: Path, scan: _Scan | None = None) -> list[str]:
    """Image files under ``folder`` (nested folders included), relative to it, with '/' separators,
    sorted. Symbolic links are followed, but each real folder is entered once and each real file
    taken once (the first in path order): a link back to a folder above it would otherwise
    multiply the class. A link into another class's folder of the same dataset is not followed
    (its images would be counted under two labels). What the scan met besides images is
    recorded in ``scan``."""
    scan = scan or _Scan(folder)
    out = []
    top = os.path.realpath(folder)
    stack: list[tuple[str, str, frozenset]] = [(os.fspath(folder), "", frozenset())]
    while stack:
        path, rel, above = stack.pop()
        real = os.path.realpath(path)
        if real in above or (rel and scan.inside(top, real)):  # back to a folder above it (or the root)
            scan.loops.append(f"{path} -> {real}")
            continue
        if rel and scan.inside(real) and not scan.inside(real, top):
            scan.crossing.append(f"{path} -> {real}")
            continue
        if real in scan.seen_dirs:
            scan.twice.append(f"the folder {path} (= {real}, already scanned)")
            continue
        scan.seen_dirs.add(real)
        if os.path.islink(path) and not scan.inside(real):
            scan.outside.append(f"{path} -> {real}")
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue  # a folder that cannot be listed holds nothing to train on; the class check reports it
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            name = e.name if not rel else f"{rel}/{e.name}"
            if e.is_dir():
                subdirs.append((e.path, name, above | {real}))
            elif _is_image(e.name):
                if e.is_symlink() and not os.path.exists(e.path):
                    out.append(name)  # a broken link: read as a missing image, under data.on_error
                    continue
                if not e.is_file():
                    scan.special.append(f"{e.path} ({kind_of(e.path)})")
                    continue
                freal = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
                if e.is_symlink() and scan.inside(freal) and not scan.inside(freal, top):
                    scan.crossing.append(f"{e.path} -> {freal}")
                    continue
                if freal in scan.seen_files:
                    scan.twice.append(f"{e.path} (= {scan.seen_files[freal]})")
                    continue
                scan.seen_files[freal] = e.path
                if e.is_symlink() and not scan.inside(freal):
                    scan.outside.append(f"{e.path} -> {freal}")
                out.append(name)
        stack.extend(reversed(subdirs))
    return sorted(out)


def read_class_names(path: str | os.PathLike, num_classes: int) -> list[str]:
    """Class names from a text file, one per line in index order (line 1 = class 0).

    Blank lines are not allowed (they would shift every later index); the number of names
    must equal ``num_classes``.
    """
    path = expect_file(path, "class-name file", error=ValueError, missing_error=FileNotFoundError)
    try:
        lines = read_regular(path).decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not valid UTF-8 ({e.reason})") from None
    except OSError as e:
        raise ValueError(f"class-name file {path} cannot be read: {e.strerror or e}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [ln.strip() for ln in lines]
    blank = [i + 1 for i, n in enumerate(names) if not n]
    if blank:
        raise ValueError(f"{path}: line {blank[0]} is blank; the file holds one class name per line, line k naming "
                         "class k-1, so blank lines would shift the names")
    if len(names) != num_classes:
        raise ValueError(f"{path} names {len(names)} classes, but the dataset has {num_classes}; "
                         "give one name per class, in index order")
    return names


def write_class_map(path: str | os.PathLike, names: list[str], counts) -> None:
    """Write ``[{"index", "name", "train_images"}, ...]`` as JSON (atomically)."""
    path = Path(path)
    rows = [{"index": i, "name": n, "train_images": int(c)} for i, (n, c) in enumerate(zip(names, counts))]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def read_class_map(run_dir: str | os.PathLike) -> list[str] | None:
    """The class names saved in a run directory by :func:`write_class_map`, or None."""
    path = Path(run_dir) / CLASS_MAP_FILE
    if not path.is_file():  # False for a FIFO or a device too: never opened
        return None
    try:
        return [str(row["name"]) for row in json.loads(read_regular(path).decode("utf-8"))]
    except (OSError, ValueError, TypeError, KeyError):  # a damaged map: the classes are shown by index
        return None


def class_label(names: list[str] | None, i: int) -> str:
    """How to name class ``i`` to a person: its name when known, else 'class i'."""
    return names[i] if names is not None and 0 <= i < len(names) else f"class {i}"
