"""``fastlt data PATH-or-config``: what a long-tailed dataset looks like before anything trains
on it — the first thing to run on a new dataset.

The target is an image folder (``root/train/<class>/...`` with optional ``val/`` and
``test/``, or ``root/<class>/...``), a list file (``relative/path.jpg label`` lines, paths
relative to ``--root``, default the list's folder) or a config / recipe name (its datasets, as
training would build them). The report:

* the training class histogram as text (classes per 1-2-5 bin of images per class) and as a
  PNG (``class_histogram.png``: log-scale counts, many / medium / few bands, fastlt.reports.plots);
* images, classes, largest and smallest classes, imbalance factor (max / min images per class),
  classes and images per shot group (many > 100, medium 20–100, few < 20 training images);
* a header check of every image file of every split (PIL parses the header; a JPEG must end
  with its end-of-image marker; ``decode=True`` decodes the pixels too), with a progress bar
  on a terminal, and the unreadable files with the reason;
* ``class_counts.csv`` (index, name, images, group), ``report.txt``, ``unreadable.txt``.
"""
from __future__ import annotations

import csv
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastlt.errors import DataError
from fastlt.pipelines.spec import DEFAULT_MAX_IMAGE_PIXELS
from fastlt.reports.metrics import DEFAULT_SHOTS, Shots, shot_group
from fastlt.reports.plots import plot_class_histogram

_BYTESIO = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>")

__all__ = ["DatasetTarget", "check_images", "histogram_lines", "load_target", "write_report"]


@dataclass
class DatasetTarget:
    """What ``fastlt data`` looks at: a name, the training set and the other splits to check."""

    name: str
    source: str
    train: object
    class_names: list[str] | None = None
    others: dict = field(default_factory=dict)
    """Further splits to header-check, by name (val, test)."""
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images whose header claims more pixels are unreadable (the config's data.max_image_pixels)."""
    checks: list[str] = field(default_factory=list)
    """Which published split each list file is (fastlt.data.published), and the build's notes."""
    shots: Shots = DEFAULT_SHOTS
    """Shot-group thresholds (a config's run.many_shot / run.few_shot)."""


def _list_checks(datasets) -> list[str]:
    """One line per list file: which published split it is (checksum verified), or how it differs."""
    from fastlt.data.published import file_digest, identify

    lines = []
    for split, ds in datasets:
        if ds is None or not hasattr(ds, "list_file"):
            continue
        _, line = identify(ds.list_file)
        if not line:
            digest, n = file_digest(ds.list_file)
            line = f"not a published split list fastlt knows ({n} lines, sha256 {digest})"
        lines.append(f"{split} list {ds.list_file}: {line}")
    return lines


def load_target(target: str, *, root: str | None = None, num_classes: int | None = None,
                class_names: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DatasetTarget:
    """Resolve ``fastlt data``'s argument (see the module docstring) into its datasets."""
    from fastlt.data import ImageFolderLT, LongTailedList
    from fastlt.data.folder import read_class_names

    from fastlt.data.published import missing_list_hint, root_hint, shipped_list
    from fastlt.paths import kind_of

    path = Path(target)
    if not path.exists() and shipped_list(target) is None and (hint := missing_list_hint(target)):
        raise DataError(f"fastlt data {target}: no such file here; {hint}")  # published, not shipped
    if not path.exists() and (shipped := shipped_list(target)) is not None:
        if root is None:  # the list's own folder is the package: the images are elsewhere
            raise DataError(f"fastlt data {target}: this published list ships with fastlt ({shipped}); give the "
                            f"folder of its images with --root: {root_hint(target).replace('--set data.root=', '--root ')}")
        path = shipped  # a published list by its name: the copy shipped with fastlt
    kind = kind_of(path)
    if kind not in ("file", "folder", "missing"):
        raise DataError(f"fastlt data {target!r}: the target is {kind}; pass an image folder, a list file or a config")
    try:
        if kind == "folder":
            train_dir = path / "train" if (path / "train").is_dir() else path
            train = ImageFolderLT(train_dir)
            others = {s: ImageFolderLT(path / s, train.class_names, require_all_classes=False)
                      for s in ("val", "test") if train_dir != path and (path / s).is_dir()}
            return DatasetTarget(path.resolve().name, f"image folder {train_dir}", train, train.class_names, others)
        if kind == "file" and path.suffix not in (".yaml", ".yml"):
            if root is not None and not Path(root).is_dir():
                raise DataError(f"--root {root} is not a folder; give the folder the list's "
                                f"paths are relative to ({root_hint(target).replace('--set data.root=', '--root ')})")
            ds = LongTailedList(root if root is not None else path.parent, path, num_classes)
            names = read_class_names(class_names, ds.num_classes) if class_names else None
            return DatasetTarget(path.name.removesuffix(".gz").removesuffix(".txt"), f"list file {path} (root {ds.root})",
                                 ds, names, checks=_list_checks([("the", ds)]))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"fastlt data {target}: {e}") from None
    from fastlt.config.loader import load_config
    from fastlt.data.build import build_datasets
    from fastlt.config.recipes import resolve_config

    if kind == "missing" and (path.suffix in (".yaml", ".yml") or path.parent != Path(".")):
        raise DataError(f"fastlt data {target}: no such file, and no shipped recipe of that name; the target is an "
                        "image folder, a list file or a config file (or a shipped recipe's name: fastlt recipes)")
    from fastlt.errors import ConfigError

    try:
        recipe = resolve_config(target, what="fastlt data")
    except ConfigError as e:  # neither a file, a folder nor a recipe: fastlt data has no --config to name
        raise DataError(str(e).replace("Pass a YAML path", "Pass an image folder, a list file, a YAML path")) from None
    cfg = load_config(recipe, list(overrides))
    data = build_datasets(cfg)
    others = {k: v for k, v in (("val", data.val), ("test", data.test)) if v is not None}
    return DatasetTarget(cfg.run.name, f"config {target} (data.kind {cfg.data.kind}, data.root {cfg.data.root})",
                         data.train, data.class_names, others, cfg.data.max_image_pixels,
                         shots=Shots(cfg.run.many_shot, cfg.run.few_shot),
                         checks=[*data.notes, *_list_checks([("train", data.train), *others.items()])])


def _check_one(dataset, i: int, decode: bool, max_pixels: int) -> str | None:
    """None when image i reads, else the reason."""
    from fastlt.pipelines.common import check_encoded_image, decode_image

    try:
        data = dataset.read_bytes(i)
        check_encoded_image(data, max_pixels)
        if decode:
            decode_image(data, max_pixels)
    except ValueError as e:  # check_encoded_image / decode_image say what is wrong (any decoder failure)
        return _BYTESIO.sub("", str(e))
    except (OSError, SyntaxError) as e:
        return f"{type(e).__name__}: {_BYTESIO.sub('', str(e))}"
    return None


def check_images(dataset, *, decode: bool = False, workers: int = 8, progress: bool = True,
                 desc: str = "checking", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[tuple[str, str]]:
    """(path, reason) of every unreadable image of a file-backed dataset (none for arrays)."""
    if not hasattr(dataset, "read_bytes"):
        return []
    from tqdm import tqdm

    bad = []
    n = len(dataset)
    # Threads: the work is file reads (network file systems) and header parsing in C.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=n, desc=desc, unit="img", file=sys.stderr, disable=None if progress else True,
                 leave=False) as bar:
        reasons = pool.map(lambda k: _check_one(dataset, k, decode, max_pixels), range(n), chunksize=64)
        for i, reason in enumerate(reasons):
            if reason is not None:
                bad.append((dataset.full_path(i), reason))
            bar.update(1)
    return bad


def histogram_lines(counts, width: int = 40, shots: Shots = DEFAULT_SHOTS) -> list[str]:
    """Classes per 1-2-5 bin of images per class, as text bars (only the bins from min to max)."""
    counts = np.asarray(counts, dtype=np.int64)
    edges = [1]
    while edges[-1] <= counts.max():
        e = edges[-1]
        edges.append(e * 2 if str(e)[0] in "15" else e * 5 // 2)
    per_bin = [int(((counts >= lo) & (counts < hi)).sum()) for lo, hi in zip(edges, edges[1:])]
    first = next(i for i, c in enumerate(per_bin) if c)
    last = max(i for i, c in enumerate(per_bin) if c)
    top = max(per_bin)
    lines = []
    for i in range(first, last + 1):
        lo, hi = edges[i], edges[i + 1] - 1
        label = f"{lo}" if lo == hi else f"{lo}-{hi}"
        bar = "#" * max(1 if per_bin[i] else 0, round(width * per_bin[i] / top))
        groups = dict.fromkeys((shot_group(lo, shots), shot_group(hi, shots)))
        lines.append(f"  {label:>11} images | {bar:<{width}} {per_bin[i]:>5} classes ({'/'.join(groups)}-shot)")
    return lines


def _summary(t: DatasetTarget, bad: dict[str, list], checked: bool) -> list[str]:
    from fastlt.data.folder import class_label

    counts = np.asarray(t.train.class_counts, dtype=np.int64)
    n, c = int(counts.sum()), counts.size
    order = np.argsort(-counts, kind="stable")
    nonzero = counts[counts > 0]
    imb = float(nonzero.max() / nonzero.min()) if nonzero.size else math.nan

    def name(i):
        return f"{class_label(t.class_names, int(i))} ({int(counts[i])})"

    lines = [f"dataset {t.name}: {t.source}", *(f"  {x}" for x in t.checks), f"  {n} training images in {c} classes"]
    lines.append(f"  images per class: max {int(counts.max())}, median {float(np.median(counts)):g}, "
                 f"min {int(counts.min())}; imbalance factor {imb:.1f} (max / min)")
    many, few = t.shots
    for group, rule in (("many", f"> {many}"), ("medium", f"{few}-{many}"), ("few", f"< {few}")):
        sel = np.array([shot_group(int(x), t.shots) == group for x in counts])
        lines.append(f"  {group + '-shot':<11} ({rule:>6} images): {int(sel.sum()):>5} classes, "
                     f"{int(counts[sel].sum()):>7} images")
    if (counts == 0).any():
        lines.append(f"  {int((counts == 0).sum())} classes have no training image")
    lines.append("  largest classes:  " + ", ".join(name(i) for i in order[:5]))
    lines.append("  smallest classes: " + ", ".join(name(i) for i in order[::-1][:5]))
    for split, ds in t.others.items():
        lines.append(f"  {split}: {len(ds)} images in {int((np.asarray(ds.class_counts) > 0).sum())} classes")
    for split, ds in (("train", t.train), *t.others.items()):  # loops, links leaving the root, repeated lines
        lines += [f"  [{split}] note: {n}" for n in getattr(ds, "scan_notes", [])]
        dups = getattr(ds, "duplicate_lines", [])
        if dups:
            lines.append(f"  [{split}] note: {len(dups)} list line(s) repeat an image already listed (first: line "
                         f"{dups[0][0]} = line {dups[0][1]})")
    lines.append("  histogram (classes per bin of training images per class):")
    lines += histogram_lines(counts, shots=t.shots)
    if not checked:
        lines.append("  header check: skipped (--no-check)")
    elif not any(hasattr(ds, "read_bytes") for ds in (t.train, *t.others.values())):
        lines.append("  header check: in-memory arrays, no image files to check")
    else:
        total = sum(len(v) for v in bad.values())
        split_sizes = ", ".join(f"{s} {len(ds)}" for s, ds in (("train", t.train), *t.others.items()))
        lines.append(f"  header check ({split_sizes} files): {total} unreadable" + (":" if total else ""))
        for split, items in bad.items():
            for path, reason in items[:20]:
                lines.append(f"    [{split}] {path}: {reason}")
            if len(items) > 20:
                lines.append(f"    [{split}] ... and {len(items) - 20} more (see unreadable.txt)")
    return lines


def write_report(t: DatasetTarget, out_dir: str | os.PathLike, *, check: bool = True, decode: bool = False,
                 workers: int = 8, progress: bool = True) -> tuple[str, list[Path], int]:
    """Check, summarise and write the report of ``t`` into ``out_dir``; returns (text, files, unreadable)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad: dict[str, list] = {}
    if check:
        for split, ds in (("train", t.train), *t.others.items()):
            bad[split] = check_images(ds, decode=decode, workers=workers, progress=progress, desc=f"checking {split}",
                                      max_pixels=t.max_pixels)
    text = "\n".join(_summary(t, bad, check))
    counts = np.asarray(t.train.class_counts)
    files = [plot_class_histogram(out / "class_histogram.png", counts,
                                  title=f"{t.name}: {int(counts.sum())} images, {counts.size} classes, imbalance "
                                        f"factor {counts.max() / max(counts.min(), 1):.1f}",
                                  class_names=t.class_names, shots=t.shots)]
    with open(out / "class_counts.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["index", "name", "train_images", "group"])
        for i, c in enumerate(counts):
            w.writerow([i, t.class_names[i] if t.class_names else "", int(c), shot_group(int(c), t.shots)])
    files.append(out / "class_counts.csv")
    (out / "report.txt").write_text(text + "\n", encoding="utf-8")
    files.append(out / "report.txt")
    n_bad = sum(len(v) for v in bad.values())
    if n_bad:
        (out / "unreadable.txt").write_text("".join(f"{p}\t{r}\n" for items in bad.values() for p, r in items),
                                            encoding="utf-8")
        files.append(out / "unreadable.txt")
    return text, files, n_bad
