"""The datasets of a config (``data`` section): train, val and test, with errors that name the
config key. Runs before any process group exists, so that a wrong path or class count stops a
run before DeepSpeed starts.
"""
from __future__ import annotations

import fcntl
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastlt.errors import DataError
from fastlt.paths import expect_dir, expect_file, kind_of

from .cifar import cifar_lt
from .folder import ImageFolderLT, read_class_names
from .lists import LongTailedList
from .published import describe, missing_list_hint, root_hint, shipped_entry, shipped_list
from .synthetic import make_synthetic_lt

__all__ = ["Datasets", "build_datasets"]


@dataclass
class Datasets:
    """The datasets of a run and the training class counts N_j (docs/design.md §1)."""

    train: object
    val: object
    test: object | None
    num_classes: int
    class_counts: np.ndarray
    class_names: list[str] | None = None
    """Names of the classes in index order (folder datasets, or data.class_names), else None."""
    notes: list[str] = field(default_factory=list)
    """What the build decided that a user should read (a shipped list used in place of a missing one)."""


def _check_num_classes(cfg, found: int, source: str, problems=None) -> None:
    if cfg.data.num_classes and cfg.data.num_classes != found:
        if problems is not None:  # the caller reports it with the other dataset-dependent problems
            problems.add(DataError(f"data.num_classes is {cfg.data.num_classes}, but {source} has {found} "
                                      f"classes; set data.num_classes={found} (or 0 to take it from the dataset)"))
            return
        raise DataError(f"data.num_classes is {cfg.data.num_classes}, but {source} has {found} classes; "
                        f"set data.num_classes={found} (or 0 to take it from the dataset)")


def _list_dataset(cfg, key: str, *, train: bool, notes: list[str]) -> LongTailedList:
    path = cfg.data.path(key)
    if not path.exists() and (shipped := shipped_list(path.name)) is not None:
        # A published list fastlt ships (fastlt.data.published): the user needs only the images.
        notes.append(f"data.{key}: {path} does not exist; using {describe(shipped_entry(path.name))}, "
                     f"shipped with fastlt ({shipped})")
        path = shipped
    where = missing_list_hint(path.name)
    path = expect_file(path, f"data.{key}: list file", error=DataError,
                       missing=f"data.{key}: list file {path} does not exist (data.root={cfg.data.root!r}); "
                               + (f"{where}, and put it in data.root (or point data.{key} at it)" if where else
                                  f"point data.root at the dataset folder and data.{key} at its list file"))
    try:
        return LongTailedList(cfg.data.root, path, cfg.data.num_classes, require_all_classes=train)
    except ValueError as e:
        raise DataError(f"data.{key}: {e}") from None


def _folder_dataset(cfg, key: str, *, train: bool, class_names: list[str] | None = None) -> ImageFolderLT:
    path = expect_dir(cfg.data.path(key), f"data.{key}: image folder", error=DataError,
                      missing=f"data.{key}: image folder {cfg.data.path(key)} does not exist (data.root="
                              f"{cfg.data.root!r}); point data.root at the dataset and data.{key} at the folder "
                              "with one sub-folder per class")
    try:
        return ImageFolderLT(path, class_names, require_all_classes=train)
    except ValueError as e:
        raise DataError(f"data.{key}: {e}") from None


def _folder_datasets(cfg, need_train: bool, problems) -> Datasets:
    d = cfg.data
    train = _folder_dataset(cfg, "train_dir", train=True)
    _check_num_classes(cfg, train.num_classes, f"the image folder {cfg.data.path('train_dir')}", problems)
    val = _folder_dataset(cfg, "val_dir", train=False, class_names=train.class_names)
    test = _folder_dataset(cfg, "test_dir", train=False, class_names=train.class_names) if d.test_dir else None
    return Datasets(train if need_train else None, val, test, train.num_classes, np.asarray(train.class_counts),
                    list(train.class_names))


def _class_names(cfg, num_classes: int) -> list[str] | None:
    if not cfg.data.class_names:
        return None
    try:
        return read_class_names(cfg.data.path("class_names"), num_classes)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"data.class_names: {e}") from None


@contextmanager
def _exclusive(lock_path: Path):
    """An exclusive file lock: ranks (or runs) sharing a cache folder generate it once, the
    others wait and then find it complete."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_datasets(cfg, *, need_train: bool = True, problems=None) -> Datasets:
    """The train/val(/test) datasets of the config, with errors that name the config key; a
    method.topk above the number of classes is reported (K is then capped at C).

    ``problems``: a ``fastlt.config.typed.Problems`` that takes a data.num_classes that disagrees
    with the dataset (as a DataError) instead of raising it, so that the caller reports it together with the other
    problems that depend on the dataset (``fastlt.training.preflight``)."""
    data = _build(cfg, need_train, problems)
    if cfg.method.topk > data.num_classes:
        logging.getLogger("fastlt.data").warning(
            f"method.topk={cfg.method.topk} is more than the {data.num_classes} classes of the dataset: the rectified "
            f"label keeps all {data.num_classes} class similarities (K is capped at C); set method.topk<="
            f"{data.num_classes} to say so")
    return data


def _build(cfg, need_train: bool, problems) -> Datasets:
    d = cfg.data
    root = Path(d.root)
    if d.kind == "synthetic":
        s = d.synthetic
        if kind_of(root) != "missing":  # the cache folder is created on first use
            expect_dir(root, "data.root: the synthetic dataset's cache", error=DataError)
        with _exclusive(root.parent / f".{root.name}.lock"):
            try:
                made = make_synthetic_lt(root, num_classes=s.num_classes, imb_factor=s.imb_factor, n_max=s.n_max,
                                         image_size=s.image_size, seed=s.seed, n_val=s.n_val)
            except ValueError as e:  # a folder that holds something else
                raise DataError(f"data.root: {e}") from None
        _check_num_classes(cfg, made.num_classes, "the synthetic dataset (data.synthetic.num_classes)", problems)
        train = LongTailedList(made.root, made.train_list, made.num_classes)
        val = LongTailedList(made.root, made.val_list, made.num_classes, require_all_classes=False)
        return Datasets(train, val, None, made.num_classes, np.asarray(train.class_counts))
    if d.kind == "cifar":
        expect_dir(root, "data.root:", error=DataError,
                   missing=f"data.root: {root} does not exist; it must hold the extracted "
                            f"{'cifar-10-batches-py' if d.cifar == 'cifar10' else 'cifar-100-python'} folder")
        try:
            train = cifar_lt(root, d.cifar, d.imb_factor, d.imb_type, train=True, seed=d.cifar_subset_seed)
            val = cifar_lt(root, d.cifar, d.imb_factor, d.imb_type, train=False, seed=d.cifar_subset_seed)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"data ({d.cifar}): {e}") from None
        _check_num_classes(cfg, train.num_classes, d.cifar, problems)
        return Datasets(train, val, None, train.num_classes, np.asarray(train.class_counts))
    if d.kind == "folder":
        expect_dir(root, "data.root:", error=DataError,
                   missing=f"data.root: {root} does not exist; point it at the folder that holds "
                            f"{d.train_dir}/ and {d.val_dir}/ (one sub-folder per class in each)")
        return _folder_datasets(cfg, need_train, problems)
    # kind == "list"
    expect_dir(root, "data.root:", error=DataError,
               missing=f"data.root: {root} does not exist; point it at {root_hint(d.train_list)}")
    notes: list[str] = []
    train = _list_dataset(cfg, "train_list", train=True, notes=notes) if need_train else None
    val = _list_dataset(cfg, "val_list", train=False, notes=notes)
    test = _list_dataset(cfg, "test_list", train=False, notes=notes) if d.test_list else None
    names = _class_names(cfg, d.num_classes)
    if train is None:
        return Datasets(None, val, test, d.num_classes, np.zeros(d.num_classes, dtype=np.int64), names, notes)
    return Datasets(train, val, test, train.num_classes, np.asarray(train.class_counts), names, notes)
