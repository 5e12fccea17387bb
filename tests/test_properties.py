"""Property-based tests of the input readers (hypothesis): for any generated input, the config
loader, the list and folder readers and the CIFAR reader either accept it or raise fastlt's own
one-line error (:class:`~fastlt.errors.FastltError`) — never another exception, never a hang.

Each example runs under hypothesis's deadline and in a thread joined with a timeout, so a read
that blocks (a FIFO opened for reading, an exponential walk) fails the test instead of hanging
it. Inputs are small; the whole file runs in well under a minute on one core.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from fastlt.errors import FastltError  # noqa: E402

#: Per example: well above what an accepted input costs here (a few ms to ~100 ms), far below a hang.
#: FASTLT_PROPERTY_EXAMPLES=N searches N random examples per test instead of the fixed 60.
_DEEP = int(os.environ.get("FASTLT_PROPERTY_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_DEEP or 60, deadline=3000, suppress_health_check=[HealthCheck.too_slow],
                    database=None, derandomize=not _DEEP)


def accepts_or_one_line(fn, timeout: float = 10.0):
    """fn()'s value, or None where it raised a FastltError of one line; any other exception, or
    no return within ``timeout`` seconds, fails the example."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - judged below
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"no answer within {timeout} s (a hang)"
    err = out.get("error")
    if err is None:
        return out.get("value")
    if not isinstance(err, FastltError):
        raise AssertionError(f"not fastlt's own error: {type(err).__name__}: {err}") from err
    assert "\n" not in str(err) and str(err).strip(), repr(str(err))
    return None


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="fastlt-props-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- the config loader

_KEYS = ["model", "data", "optim", "run", "method", "deepspeed", "pipeline", "base", "lr", "epochs", "kind",
         "root", "name", "extra", "synthetic", "batch_size", "image_size", "topk", "milestones", "backbone_kwargs",
         "num_classes", "on_error", "max_image_pixels", "seed", "x"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["synthetic", "list", "cifar", "folder", "..", "1e39"]))
_trees = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                       st.dictionaries(st.sampled_from(_KEYS), kids, max_size=4)),
                      max_leaves=20)
_yaml_bits = st.sampled_from(["&a ", "*a", "[", "]", "{", "}", ": ", "\n  ", "- ", "<<: *a\n", "!!binary ", "\t",
                              "%YAML 1.1\n", "---\n", "? ", "'", '"', "\\ud800", "2001-02-30", "\xef\xbb\xbf", "\x00"])


@SETTINGS
@given(tree=_trees, overrides=st.lists(st.tuples(st.sampled_from(_KEYS + ["optim.lr", "run", "data.root"]),
                                                 st.text(max_size=10)), max_size=3))
def test_config_loader_accepts_or_refuses_structured_input(scratch, tree, overrides):
    from fastlt.config.loader import load_config

    path = scratch / "c.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    accepts_or_one_line(lambda: load_config(path, [f"{k}={v}" for k, v in overrides]))


@SETTINGS
@given(parts=st.lists(st.one_of(_yaml_bits, st.text(max_size=8), st.sampled_from(_KEYS)), max_size=30),
       raw=st.binary(max_size=40))
def test_config_loader_accepts_or_refuses_any_text_and_bytes(scratch, parts, raw):
    from fastlt.config.loader import load_config

    path = scratch / "t.yaml"
    path.write_bytes("".join(parts).encode("utf-8", "surrogatepass") + raw)
    accepts_or_one_line(lambda: load_config(path))


# ---------------------------------------------------------------- the list reader

_list_lines = st.lists(st.one_of(
    st.tuples(st.sampled_from(["a.png", "b.png", "c.png", "missing.png", "sub/x.png", "../a.png", "a b.png",
                               "n" * 300 + ".png", "d" * 300 + "/x.png", "fifo.png/x.png"]),
              st.one_of(st.integers(-3, 5).map(str), st.sampled_from(["1.5", "x", "9" * 30, "", "0 0"]))
              ).map(" ".join),
    st.text(max_size=20)), max_size=8)


@SETTINGS
@given(lines=_list_lines, prefix=st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff"]), num_classes=st.integers(0, 4),
       newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_list_reader_accepts_or_refuses(scratch, lines, prefix, num_classes, newline):
    from fastlt.config.loader import config_from_dict
    from fastlt.data.build import build_datasets
    from fastlt.pipelines.common import check_encoded_image

    root = scratch / "list_root"
    if not root.exists():
        root.mkdir()
        for name, data in (("a.png", _png()), ("b.png", b"\x89PNG broken"), ("c.png", b"")):
            (root / name).write_bytes(data)
        os.mkfifo(root / "fifo.png")
    lines = [*lines, "fifo.png 0"] if len(lines) % 3 == 0 else lines
    (scratch / "list.txt").write_bytes(prefix + newline.join(lines).encode("utf-8", "surrogatepass"))

    def build():
        cfg = config_from_dict({"data": {"kind": "list", "root": str(root), "train_list": str(scratch / "list.txt"),
                                         "val_list": str(scratch / "list.txt"), "num_classes": num_classes or 3}})
        data = build_datasets(cfg)
        try:
            data.val.check_files()
        except FileNotFoundError as e:  # its documented answer: how many are missing, the first few
            assert "\n" not in str(e)
        for i in range(len(data.val)):  # every image: bytes that decode, or a bad image (never a hang)
            try:
                check_encoded_image(data.val.read_bytes(i))
            except (OSError, ValueError):
                pass
        return data

    accepts_or_one_line(build)


# ---------------------------------------------------------------- the folder reader

_entry = st.tuples(st.sampled_from(["c0", "c1", "c1/deep", ".hidden", "c 2"]),
                   st.sampled_from(["a.png", "b.JPG", "c.txt", ".d.png", "e.jpeg"]),
                   st.sampled_from(["png", "junk", "empty", "fifo", "loop", "up", "dangling", "outside", "dir"]))


@SETTINGS
@given(entries=st.lists(_entry, max_size=8), loose=st.booleans())
def test_folder_reader_accepts_or_refuses(scratch, entries, loose):
    from fastlt.config.loader import config_from_dict
    from fastlt.data.build import build_datasets

    root = Path(tempfile.mkdtemp(dir=scratch))
    (scratch / "outside.png").write_bytes(_png())
    for split in ("train", "val"):
        (root / split).mkdir()
        for folder, name, what in entries:
            d = root / split / folder
            d.mkdir(parents=True, exist_ok=True)
            p = d / name
            if os.path.lexists(p):
                continue
            {"png": lambda: p.write_bytes(_png()), "junk": lambda: p.write_bytes(b"GIF89a\x00\x01"),
             "empty": lambda: p.write_bytes(b""), "fifo": lambda: os.mkfifo(p), "loop": lambda: os.symlink(".", p),
             "up": lambda: os.symlink("..", p), "dangling": lambda: os.symlink("nowhere", p),
             "outside": lambda: os.symlink(scratch / "outside.png", p), "dir": lambda: p.mkdir()}[what]()
        if loose:
            (root / split / "loose.png").write_bytes(_png())

    def build():
        cfg = config_from_dict({"data": {"kind": "folder", "root": str(root)}})
        data = build_datasets(cfg)
        seen = [os.path.realpath(data.train.full_path(i)) for i in range(len(data.train))]
        seen = [p for p in seen if os.path.exists(p)]  # broken links: missing images, one per link
        assert len(seen) == len(set(seen)), "a real file was counted twice"
        return data

    accepts_or_one_line(build)


# ---------------------------------------------------------------- the CIFAR reader

_arrays = st.builds(lambda dtype, shape: np.zeros(shape, dtype=dtype),
                    st.sampled_from([np.uint8, np.int16, np.float32, np.float64, np.bool_, np.int64]),
                    st.sampled_from([(2, 3072), (3072,), (2, 1024), (0, 3072), (2, 3, 32, 32), (1, 3072)]))
_labels = st.one_of(st.lists(st.one_of(st.integers(-2, 12), st.floats(0, 9), st.booleans(), st.just("1")),
                             max_size=3),
                    st.builds(np.array, st.lists(st.integers(0, 9), max_size=3)), st.none(), st.text(max_size=3))
_batches = st.builds(lambda dk, d, lk, lab: {**({dk: d} if dk else {}), **({lk: lab} if lk else {})},
                     st.sampled_from([b"data", "data", None]),
                     st.one_of(_arrays, st.lists(st.integers(0, 255), max_size=4), st.binary(max_size=8)),
                     st.sampled_from([b"labels", "labels", None]), _labels)


def _valid_cifar(root: Path) -> None:
    """Tiny valid CIFAR-10 batches: 2 images per class in each of the five training files."""
    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True, exist_ok=True)
    labels = list(range(10)) * 2
    data = np.zeros((20, 3072), np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (c10 / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=2))


@SETTINGS
@given(batch=st.one_of(_batches, _trees), protocol=st.integers(2, 5),
       cut=st.one_of(st.none(), st.integers(0, 200)), flips=st.lists(st.tuples(st.integers(0, 400),
                                                                                 st.integers(0, 255)), max_size=3))
def test_cifar_reader_accepts_or_refuses(scratch, batch, protocol, cut, flips):
    from fastlt.config.loader import config_from_dict
    from fastlt.data.build import build_datasets

    root = scratch / "cifar"
    if not root.exists():
        _valid_cifar(root)
    raw = bytearray(pickle.dumps(batch, protocol=protocol))
    for at, value in flips:  # damage: a few bytes changed, and the file cut short
        if at < len(raw):
            raw[at] = value
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(bytes(raw[:cut] if cut is not None else raw))
    cfg = config_from_dict({"data": {"kind": "cifar", "cifar": "cifar10", "root": str(root), "imb_factor": 1.0,
                                     "augment_recipe": "cifar", "image_size": 32}})
    got = accepts_or_one_line(lambda: build_datasets(cfg))
    if got is not None:
        assert got.train.images.dtype == np.uint8 and got.train.images.shape[1:] == (32, 32, 3)
        assert got.train.labels.min() >= 0 and got.train.labels.max() < 10


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(buf, format="PNG")
    return buf.getvalue()
