"""fastlt.data: list files (real ImageNet-LT / Places-LT / iNat18 splits and bad input),
CIFAR-LT profiles of docs/design.md §2 on fake batches, and the synthetic long-tailed set."""
from __future__ import annotations

import collections
import gzip
import json
import math
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from fastlt.data import synthetic as fdata
from fastlt.data import LongTailedList, cifar_lt, long_tail_counts, make_synthetic_lt

from conftest import FAKE_CIFAR


def spec_counts(n_max, num_classes, imb_factor, imb_type):
    """docs/design.md §2 as written: ⌊n_max · IF^(−c/(C−1))⌋ with IF = 1/imb_factor (exp);
    n_max for the first half, n_max/IF for the rest (step); at least one image."""
    IF = 1.0 / imb_factor
    if imb_type == "exp":
        raw = [math.floor(n_max * IF ** (-c / (num_classes - 1))) for c in range(num_classes)]
    else:
        raw = [n_max if c < num_classes // 2 else math.floor(n_max / IF) for c in range(num_classes)]
    return np.maximum(np.array(raw), 1)


def write_list(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- real split lists


def test_places_lt_train_counts(places_train, splits_dir):
    d = places_train
    assert len(d) == 62500 and d.labels.dtype == np.int64 and len(d.paths) == 62500
    assert d.num_classes == 365 and d.class_counts.shape == (365,)
    assert d.class_counts.sum() == len(d)
    assert d.class_counts.max() == 4980 and d.class_counts.min() == 5
    # Shot groups of docs/design.md §1 (many > 100, medium 20..100, few < 20).
    c = d.class_counts
    assert (c > 100).sum() == 131 and ((c >= 20) & (c <= 100)).sum() == 163 and (c < 20).sum() == 71
    # Independent count with plain Python.
    lines = gzip.decompress((splits_dir / "Places_LT_train.txt.gz").read_bytes()).decode().split("\n")
    counter = collections.Counter(int(ln.split(" ")[-1]) for ln in lines if ln.strip())
    assert [counter[j] for j in range(365)] == c.tolist()
    assert d.paths[0] == "train/airfield/00004851.jpg" and d.labels[0] == 0
    assert d.paths[-1] == "train/zen_garden/00000151.jpg" and d.labels[-1] == 364


@pytest.mark.parametrize(
    "name, n, classes, per_class",
    [("Places_LT_val.txt.gz", 7300, 365, 20), ("Places_LT_test.txt.gz", 36500, 365, 100),
     ("ImageNet_LT_val.txt.gz", 20000, 1000, 20), ("ImageNet_LT_test.txt.gz", 50000, 1000, 50),
     ("iNaturalist18_val.txt.gz", 24426, 8142, 3)],
)
def test_balanced_eval_lists(splits_dir, name, n, classes, per_class):
    d = LongTailedList(splits_dir, splits_dir / name, num_classes=classes, require_all_classes=False)
    assert len(d) == n and d.num_classes == classes
    assert (d.class_counts == per_class).all()


# ---------------------------------------------------------------- list format


def test_format_spaces_blank_lines_crlf_tabs(tmp_path):
    f = write_list(tmp_path / "l.txt",
                   "a/img one.jpg 0\r\n\r\n  \n b/two.jpg\t1  \nc/with  two spaces.jpg 2\n\n")
    d = LongTailedList(tmp_path, f)
    assert d.paths == ["a/img one.jpg", "b/two.jpg", "c/with  two spaces.jpg"]
    assert d.labels.tolist() == [0, 1, 2] and d.class_counts.tolist() == [1, 1, 1]
    assert [d.line_number(i) for i in range(3)] == [1, 4, 5]
    assert d.full_path(0) == os.path.join(tmp_path, "a/img one.jpg")


@pytest.mark.parametrize(
    "text, kwargs, needles",
    [
        ("a.jpg 0\nb.jpg 1\nlonely_token\n", {}, ["line 3", "malformed", "lonely_token"]),
        ("a.jpg 0\n\nb.jpg one\n", {}, ["line 3", "'one'", "not an integer"]),
        ("a.jpg 0\nb.jpg 1.5\n", {}, ["line 2", "'1.5'", "not an integer"]),
        ("a.jpg 0\nb.jpg 1\nc.jpg 5\n", {"num_classes": 5}, ["line 3", "label 5", "num_classes is 5"]),
        ("a.jpg 0\nb.jpg -1\n", {}, ["line 2", "label -1"]),
        ("a.jpg 0\nb.jpg 1\nc.jpg 3\n", {"num_classes": 5}, ["2 of 5 classes have no image", "[2, 4]",
                                                            "require_all_classes=False"]),
        ("a.jpg 0\nc.jpg 2\n", {}, ["1 of 3 classes", "[1]"]),
        ("\n  \n", {}, ["no entries"]),
    ],
    ids=["malformed", "non-integer", "float-label", "out-of-range", "negative", "missing-classes",
         "missing-class-inferred", "empty"],
)
def test_bad_lists_name_file_and_line(tmp_path, text, kwargs, needles):
    f = write_list(tmp_path / "bad_list.txt", text)
    with pytest.raises(ValueError) as e:
        LongTailedList(tmp_path, f, **kwargs)
    msg = str(e.value)
    assert "bad_list.txt" in msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_classes_allowed_for_eval_lists(tmp_path):
    f = write_list(tmp_path / "val.txt", "a.jpg 0\nb.jpg 1\nc.jpg 3\n")
    d = LongTailedList(tmp_path, f, num_classes=5, require_all_classes=False)
    assert d.class_counts.tolist() == [1, 1, 0, 1, 0] and d.num_classes == 5


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        LongTailedList(tmp_path, tmp_path / "nope.txt")
    f = write_list(tmp_path / "l.txt", "a.jpg 0\n")
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        LongTailedList(tmp_path, f, num_classes=0)


# ---------------------------------------------------------------- image files


@pytest.fixture
def small_tree(tmp_path):
    root = tmp_path / "root"
    for i, rel in enumerate(["c0/a.jpg", "c0/b b.jpg", "c1/c.jpg", "c2/d.jpg", "c2/e.jpg"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(bytes([i]) * (10 + i))
    f = write_list(tmp_path / "train.txt", "c0/a.jpg 0\nc0/b b.jpg 0\n\nc1/c.jpg 1\nc2/d.jpg 2\nc2/e.jpg 2\n")
    return root, f


def test_read_bytes_and_full_path(small_tree):
    root, f = small_tree
    d = LongTailedList(root, f, check_files=True)
    assert d.read_bytes(1) == bytes([1]) * 11
    assert d.read_bytes(-1) == bytes([4]) * 14
    assert d.full_path(2) == os.path.join(root, "c1/c.jpg")
    with pytest.raises(IndexError):
        d.read_bytes(5)


def test_missing_file_on_demand_names_path_list_and_line(small_tree):
    root, f = small_tree
    (root / "c1/c.jpg").unlink()
    d = LongTailedList(root, f)  # not checked up front: constructing succeeds
    assert d.read_bytes(0) == bytes([0]) * 10
    with pytest.raises(FileNotFoundError) as e:
        d.read_bytes(2)
    msg = str(e.value)
    assert os.path.join(root, "c1/c.jpg") in msg and "line 4" in msg and str(f) in msg


def test_missing_files_up_front(small_tree):
    root, f = small_tree
    (root / "c1/c.jpg").unlink()
    for p in (root / "c2").iterdir():  # a whole missing directory
        p.unlink()
    (root / "c2").rmdir()
    with pytest.raises(FileNotFoundError) as e:
        LongTailedList(root, f, check_files=True)
    msg = str(e.value)
    assert "3 of 5 images" in msg and str(f) in msg
    assert "c1/c.jpg (line 4)" in msg and "c2/d.jpg (line 5)" in msg and "c2/e.jpg (line 6)" in msg
    d = LongTailedList(root, f)
    with pytest.raises(FileNotFoundError, match="3 of 5"):
        d.check_files()


# ---------------------------------------------------------------- CIFAR-LT


def test_published_cifar_lt_sizes():
    # Training-set sizes reported for CIFAR-10/100-LT (LDAM-DRW, BCL) at IF 100 / 50 / 10.
    assert [long_tail_counts(5000, 10, f).sum() for f in (0.01, 0.02, 0.1)] == [12406, 13996, 20431]
    assert [long_tail_counts(500, 100, f).sum() for f in (0.01, 0.02, 0.1)] == [10847, 12608, 19573]
    for n_max, c in ((5000, 10), (500, 100)):
        for f in (0.01, 0.02, 0.1):
            for kind in ("exp", "step"):
                assert long_tail_counts(n_max, c, f, kind).tolist() == spec_counts(n_max, c, f, kind).tolist()


def _kept_index(images):
    # Pixel (0, 0): R = index // 256, G = index % 256 (see conftest._fake_cifar_arrays).
    return images[:, 0, 0, 0].astype(np.int64) * 256 + images[:, 0, 0, 1]


def _file_labels(root, name):
    if name == "cifar10":
        files = [root / "cifar-10-batches-py" / f"data_batch_{i}" for i in range(1, 6)]
        key = b"labels"
    else:
        files = [root / "cifar-100-python" / "train"]
        key = b"fine_labels"
    out = []
    for p in files:
        with open(p, "rb") as fh:
            out += pickle.load(fh, encoding="bytes")[key]
    return np.array(out)


def _reference_selection(file_labels, counts, seed):
    # LDAM-DRW / BCL IMBALANCECIFAR: np.random.seed(seed), then per class in order
    # shuffle that class's indices and keep the first N_c.
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        kept = []
        for c, n in enumerate(counts):
            idx = np.where(file_labels == c)[0]
            np.random.shuffle(idx)
            kept.append(idx[:n])
    finally:
        np.random.set_state(state)
    return np.concatenate(kept)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("imb_type, imb_factor", [("exp", 0.1), ("exp", 0.2), ("step", 0.1), ("step", 0.5)])
def test_cifar_lt_train_profile(fake_cifar_root, name, imb_type, imb_factor):
    num_classes, per_class, _ = FAKE_CIFAR[name]
    ds = cifar_lt(fake_cifar_root, name, imb_factor, imb_type=imb_type, train=True, seed=0)
    expected = spec_counts(per_class, num_classes, imb_factor, imb_type)
    assert ds.num_classes == num_classes
    assert ds.class_counts.tolist() == expected.tolist()
    assert np.bincount(ds.labels, minlength=num_classes).tolist() == expected.tolist()
    assert len(ds) == expected.sum() and ds.labels.dtype == np.int64
    assert ds.images.dtype == np.uint8 and ds.images.shape == (expected.sum(), 32, 32, 3)
    assert (ds.images[..., 2] == 7).all()  # B plane lands in channel 2: HWC order is right
    kept = _kept_index(ds.images)
    file_labels = _file_labels(fake_cifar_root, name)
    assert (file_labels[kept] == ds.labels).all()
    assert kept.tolist() == _reference_selection(file_labels, expected, 0).tolist()


def test_cifar_lt_seed_changes_selection_not_counts(fake_cifar_root):
    a = cifar_lt(fake_cifar_root, "cifar10", 0.1, seed=0)
    b = cifar_lt(fake_cifar_root, "cifar10", 0.1, seed=0)
    c = cifar_lt(fake_cifar_root, "cifar10", 0.1, seed=1)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.class_counts, c.class_counts)
    assert not np.array_equal(_kept_index(a.images), _kept_index(c.images))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_test_split_is_whole_and_balanced(fake_cifar_root, name):
    num_classes, _, per_class = FAKE_CIFAR[name]
    ds = cifar_lt(fake_cifar_root, name, 0.01, train=False)
    assert len(ds) == num_classes * per_class
    assert (ds.class_counts == per_class).all()
    assert _kept_index(ds.images).tolist() == list(range(len(ds)))  # whole split, file order


def test_cifar_missing_folder_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        cifar_lt(tmp_path, "cifar100", 0.01)
    msg = str(e.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
    assert str(tmp_path) in msg and "cifar-100-python" in msg and "tar -xzf" in msg
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cifar-10-python.tar.gz"):
        cifar_lt(tmp_path, "cifar10", 0.01)


def test_cifar_bad_arguments(fake_cifar_root):
    with pytest.raises(ValueError, match="imb_factor=0.01"):
        cifar_lt(fake_cifar_root, "cifar10", 100)
    with pytest.raises(ValueError, match="cifar10"):
        cifar_lt(fake_cifar_root, "cifar1000", 0.01)
    with pytest.raises(ValueError, match="imb_type"):
        cifar_lt(fake_cifar_root, "cifar10", 0.01, imb_type="linear")
    with pytest.raises(ValueError, match="imb_factor"):
        cifar_lt(fake_cifar_root, "cifar10", 0.0)


# ---------------------------------------------------------------- synthetic long-tailed set


def test_synthetic_files_lists_and_counts(synthetic_lt):
    s = synthetic_lt
    expected = spec_counts(60, 10, 0.1, "exp")
    assert s.num_classes == 10 and s.class_counts.tolist() == expected.tolist()
    assert expected[0] == 60 and expected[-1] == 6  # long-tailed as requested
    train = LongTailedList(s.root, s.train_list, num_classes=10, check_files=True)
    val = LongTailedList(s.root, s.val_list, num_classes=10, check_files=True)
    assert train.class_counts.tolist() == expected.tolist()
    assert (val.class_counts == 10).all()
    with Image.open(train.full_path(0)) as im:
        assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"
    assert train.read_bytes(-1)[:2] == b"\xff\xd8"  # JPEG SOI marker


def _features(lst):
    """Per image: a hue histogram of the saturated pixels (colour signal) and the saturated
    pixels' mask cropped to its bounding box and resized to 8×8 (shape signal, invariant to
    position and scale)."""
    hue, shape = [], []
    for i in range(len(lst)):
        with Image.open(lst.full_path(i)) as im:
            hsv = np.asarray(im.convert("HSV"), dtype=np.int64)
        mask = (hsv[..., 1] > 150) & (hsv[..., 2] > 100)
        h = np.bincount(hsv[..., 0][mask] * 24 // 256, minlength=24).astype(float)
        hue.append(h / max(h.sum(), 1.0))
        ys, xs = np.nonzero(mask)
        crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1] if ys.size else mask
        small = Image.fromarray(crop.astype(np.uint8) * 255).resize((8, 8), Image.BILINEAR)
        shape.append(np.asarray(small, dtype=float).ravel() / 255.0)
    return np.array(hue), np.array(shape)


def _ncm_accuracy(x_train, y_train, x_val, y_val, num_classes):
    means = np.stack([x_train[y_train == c].mean(0) for c in range(num_classes)])
    pred = np.argmin(((x_val[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    return (pred == y_val).mean()


def test_synthetic_classes_are_separable(synthetic_lt):
    # Nearest-class-mean classifiers on hand-made features must beat chance (0.10) by a
    # wide margin, separately on colour and on shape: both carry class signal.
    s = synthetic_lt
    train = LongTailedList(s.root, s.train_list)
    val = LongTailedList(s.root, s.val_list)
    (hue_t, shape_t), (hue_v, shape_v) = _features(train), _features(val)
    acc_colour = _ncm_accuracy(hue_t, train.labels, hue_v, val.labels, s.num_classes)
    acc_shape = _ncm_accuracy(shape_t, train.labels, shape_v, val.labels, s.num_classes)
    assert acc_colour > 0.8, f"colour nearest-class-mean accuracy {acc_colour:.2f} (chance 0.10)"
    assert acc_shape > 0.4, f"shape nearest-class-mean accuracy {acc_shape:.2f} (chance 0.10)"


def test_synthetic_rectangular_and_deterministic(tmp_path):
    kw = dict(num_classes=3, imb_factor=0.5, n_max=4, image_size=(24, 40), seed=3, n_val=2)
    a = make_synthetic_lt(tmp_path / "a", **kw)
    b = make_synthetic_lt(tmp_path / "b", **kw)
    lst = LongTailedList(a.root, a.train_list)
    with Image.open(lst.full_path(0)) as im:
        assert im.size == (40, 24)  # PIL reports (width, height)
    assert a.class_counts.tolist() == [4, 2, 2]
    for i in range(len(lst)):
        rel = lst.paths[i]
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes()


def test_synthetic_many_classes(tmp_path):
    s = make_synthetic_lt(tmp_path / "c100", num_classes=100, imb_factor=0.01, n_max=3, image_size=16, n_val=1)
    assert s.class_counts.tolist() == spec_counts(3, 100, 0.01, "exp").tolist()
    assert LongTailedList(s.root, s.train_list, num_classes=100).class_counts.min() == 1


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_synthetic_cache_reuse_and_regeneration(tmp_path):
    kw = dict(num_classes=4, imb_factor=0.5, n_max=6, image_size=16, n_val=2)
    out = tmp_path / "ds"
    s = make_synthetic_lt(out, **kw)
    before = _mtimes(out)
    assert (out / "manifest.json").is_file() and len(before) == s.class_counts.sum() + 4 * 2 + 3
    again = make_synthetic_lt(out, **kw)
    assert _mtimes(out) == before  # nothing rewritten
    assert again.class_counts.tolist() == s.class_counts.tolist()

    changed = make_synthetic_lt(out, **{**kw, "seed": 1})
    assert json.loads((out / "manifest.json").read_text())["params"]["seed"] == 1
    assert (out / "train/000/00000.jpg").read_bytes() != b"" and _mtimes(out) != before
    assert changed.class_counts.tolist() == s.class_counts.tolist()

    # A deleted image makes the cache not intact: regenerate.
    (out / "train/001/00000.jpg").unlink()
    make_synthetic_lt(out, **{**kw, "seed": 1})
    assert (out / "train/001/00000.jpg").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_synthetic_interrupted_generation_leaves_no_cache(tmp_path, monkeypatch):
    kw = dict(num_classes=3, imb_factor=0.5, n_max=4, image_size=16, n_val=2)
    out = tmp_path / "ds"
    make_synthetic_lt(out, **kw)
    old = _mtimes(out)
    real_render = fdata._render
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # train written, val not yet
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(fdata, "_render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_lt(out, **{**kw, "seed": 5})
    assert _mtimes(out) == old  # the previous complete dataset is untouched
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_lt(tmp_path / "fresh", **kw)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no half dataset, no temp dir


def test_synthetic_refuses_foreign_directory_and_bad_args(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a fastlt synthetic dataset"):
        make_synthetic_lt(foreign, num_classes=2, n_max=2, image_size=16, n_val=1)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="at most 144"):
        make_synthetic_lt(tmp_path / "x", num_classes=145)
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_lt(tmp_path / "x", image_size=(32, 32, 3))
    with pytest.raises(ValueError, match="imb_factor=0.1"):
        make_synthetic_lt(tmp_path / "x", imb_factor=10)
    with pytest.raises(ValueError, match="imb_type"):
        make_synthetic_lt(tmp_path / "x", imb_type="linear")
    assert not (tmp_path / "x").exists()


def test_cifar_subset_is_concutmix_s_seed_10_and_independent_of_run_seed(fake_cifar_root):
    """data.cifar_subset_seed (default 10, ConCutMix's dataset/cifar.py) picks the kept images;
    run.seed, which seeds everything else, does not change them."""
    from fastlt.config.loader import config_from_dict
    from fastlt.data.build import build_datasets

    def subset(run_seed=0, **data):
        cfg = config_from_dict({"data": {"kind": "cifar", "root": str(fake_cifar_root), "cifar": "cifar10",
                                         "imb_factor": 0.1, "augment_recipe": "cifar", "image_size": 32, **data},
                                "run": {"seed": run_seed}})
        return _kept_index(build_datasets(cfg).train.images)

    default = subset()
    file_labels = _file_labels(fake_cifar_root, "cifar10")
    counts = spec_counts(FAKE_CIFAR["cifar10"][1], 10, 0.1, "exp")
    assert default.tolist() == _reference_selection(file_labels, counts, 10).tolist()
    assert subset(run_seed=123).tolist() == default.tolist()
    assert subset(cifar_subset_seed=0).tolist() == _reference_selection(file_labels, counts, 0).tolist()
    assert subset(cifar_subset_seed=0).tolist() != default.tolist()
