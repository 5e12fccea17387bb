"""Inputs that are not what they claim (reliability review II, items 4, 5, 9-13): each ends in
fastlt's own one-line error (or a bad image under ``data.on_error``, or a warning where the
input is legal but suspicious), never a traceback, a hang or a silently wrong dataset.

Unit-level wherever the fault is caught below the command line; the command line itself only
where the item is about it. Every docstring says how the fault showed before the change.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import socket
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import error_line, tiny_config, tree_digest

from fastlt.errors import BadImageError, CheckpointError, ConfigError, DataError


def png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h RGB pixels but holds two rows of data: a few hundred bytes."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (w * 3 + 1) * 2)) + chunk(b"IEND", b""))


def png(value: int = 0, size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()



def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def in_thread(fn, timeout: float = 10.0):
    """fn()'s result or exception, failing the test if it has not returned within ``timeout`` s
    (a FIFO opened for reading blocks; the test must not hang with it)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} blocked for more than {timeout} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


@pytest.fixture
def image_list(tmp_path):
    """A list dataset of 2 classes x 3 PNGs; line 2 (class 0) is a 48 KB-class bomb: a PNG
    header claiming 20000 x 20000 pixels."""
    from fastlt.data import LongTailedList

    root = tmp_path / "imgs"
    root.mkdir()
    lines = []
    for c in range(2):
        for i in range(3):
            name = f"c{c}_{i}.png"
            (root / name).write_bytes(png_header(20000, 20000) if (c, i) == (0, 1) else png(40 * c + i))
            lines.append(f"{name} {c}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return LongTailedList(root, tmp_path / "list.txt", 2, require_all_classes=False)


# ---------------------------------------------------------------- item 4: every decode failure, a pixel limit


def test_4_bomb_and_any_decoder_exception_are_bad_images_on_both_backends(image_list, monkeypatch):
    """Before: PIL.DecompressionBombError (not an OSError) escaped every handler — a traceback in
    the validation check, in training even with data.on_error: skip, and in fastlt data."""
    from PIL import Image

    from fastlt.pipelines.common import Substitutes, check_encoded_image, decode_image, load_with_policy
    from fastlt.pipelines.dali_val import ValSource
    from fastlt.pipelines.torch_loader import image_loader
    from fastlt.reports.dataset_report import check_images
    from fastlt.training.preflight import check_val_images

    bomb = image_list.read_bytes(1)
    assert len(bomb) < 1000
    with pytest.raises(ValueError, match=r"claims 400000000 pixels, more than data.max_image_pixels \(67108864\)"):
        check_encoded_image(bomb)
    # The limit is read from the header, ours and not PIL's: a 9000 x 9000 header is under PIL's
    # own bomb limit but over a limit of 8000^2 pixels, which is named.
    with pytest.raises(ValueError, match=r"9000x9000 = 81000000 pixels, more than data.max_image_pixels \(64000000"):
        check_encoded_image(png_header(9000, 9000), 8000 * 8000)
    assert check_encoded_image(png(1)) == (8, 8)

    # torch backend: skip replaces the bomb by another image of class 0, raise names it.
    load = image_loader(image_list, "imagenet", 16, 2**20)
    subst = Substitutes(image_list.labels)
    img, used, skipped = load_with_policy(image_list, 1, (0, 0, 0), "skip", subst, load)
    assert used in (0, 2) and img.size == (8, 8) and len(skipped) == 1 and "c0_1.png" in skipped[0]
    with pytest.raises(BadImageError, match=r"cannot read image .*c0_1\.png .*max_image_pixels") as e:
        load_with_policy(image_list, 1, (0, 0, 0), "raise", Substitutes(image_list.labels), load)
    one_line(e.value)

    # DALI backend's reader (the header check before the DALI decoder sees the bytes).
    source = ValSource(image_list, "imagenet", np.arange(len(image_list)), 2, "skip", max_pixels=2**20)
    assert source._read(0)[1] is True and source._read(1)[1] is False
    with pytest.raises(BadImageError, match=r"validation image .*c0_1\.png.*max_image_pixels"):
        ValSource(image_list, "imagenet", np.arange(6), 2, "raise", max_pixels=2**20)._read(1)

    # The validation check before training, and fastlt data.
    with pytest.raises(BadImageError, match=r"^data.val_list: 1 of 6 validation image\(s\).*c0_1\.png.*max_image"):
        check_val_images(image_list, "raise", max_pixels=2**20, out=io.StringIO())
    bad = check_images(image_list, progress=False, max_pixels=2**20)
    assert [Path(p).name for p, _ in bad] == ["c0_1.png"] and "max_image_pixels" in bad[0][1]

    # Any exception class a decoder raises is a bad image (here: a RuntimeError from convert).
    def broken(self, *a, **k):
        raise RuntimeError("decoder exploded")
    monkeypatch.setattr(Image.Image, "convert", broken)
    with pytest.raises(ValueError, match="cannot decode .*RuntimeError: decoder exploded"):
        decode_image(png(3))
    with pytest.raises(BadImageError, match=r"is bad and no readable image of its class 0 could replace it .*"
                                            r"RuntimeError: decoder exploded"):
        load_with_policy(image_list, 0, (0, 0, 1), "skip", Substitutes(image_list.labels),
                         lambda i: decode_image(image_list.read_bytes(i)))


def test_4_only_the_formats_both_backends_read_are_decoded():
    """Before: PIL opened any format it knows (a GIF decoded on the torch backend but not on
    DALI's; an EPS file named x.jpg would be handed to Ghostscript, a program, to decode)."""
    from PIL import Image

    from fastlt.pipelines.common import decode_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    for data, fmt in ((eps, "EPS"), (gif.getvalue(), "GIF")):
        with pytest.raises(ValueError, match=f"it is in {fmt} format; fastlt reads JPEG, PNG, BMP, TIFF, WEBP"):
            decode_image(data)
    for fmt in ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format=fmt)
        assert decode_image(buf.getvalue()).size == (8, 8)


def test_4_max_image_pixels_is_a_config_key():
    """Before: no such key; the limit was PIL's global, whose breach raised the traceback above."""
    from fastlt.config.loader import config_from_dict
    from fastlt.pipelines import train_spec, val_spec

    base = {"data": {"kind": "synthetic", "root": "x"}}
    cfg = config_from_dict({"data": {**base["data"], "max_image_pixels": 4096}})
    assert train_spec(cfg, None, batch_size=2).max_image_pixels == 4096
    assert val_spec(cfg, None).max_image_pixels == 4096
    assert config_from_dict(base).data.max_image_pixels == 8192 * 8192
    with pytest.raises(ConfigError, match="data.max_image_pixels: must be > 0; got 0"):
        config_from_dict({"data": {**base["data"], "max_image_pixels": 0}})


# ---------------------------------------------------------------- item 5: symlink loops


def test_5_symlink_loop_counts_each_real_image_once(tmp_path, caplog):
    """Before: `ln -s . train/a/loop` turned a's 3 images into dozens (os.walk followed the loop
    until ELOOP), making the rarest class the largest; exit 0."""
    from fastlt.data import ImageFolderLT

    train, outside = tmp_path / "train", tmp_path / "elsewhere"
    for c, n in (("a", 3), ("b", 5)):
        (train / c).mkdir(parents=True)
        for i in range(n):
            (train / c / f"{i}.png").write_bytes(png(i))
    outside.mkdir()
    (outside / "o.png").write_bytes(png(9))
    os.symlink(".", train / "a" / "loop")
    os.symlink("../a", train / "a" / "up")
    os.symlink("../b", train / "b" / "back")
    os.symlink("0.png", train / "a" / "again.png")
    os.symlink(outside / "o.png", train / "a" / "ext.png")
    os.symlink("../b", train / "a" / "tob")  # b's images must not also count as a's
    with caplog.at_level(logging.WARNING, logger="fastlt.data"):
        ds = ImageFolderLT(train)
    assert ds.class_counts.tolist() == [4, 5]  # a: 0, 1, 2 and the outside image; again.png is 0.png
    assert ds.paths == ["a/0.png", "a/1.png", "a/2.png", "a/ext.png"] + [f"b/{i}.png" for i in range(5)]
    notes = "\n".join(ds.scan_notes)
    assert "3 symbolic link(s) loop back to a folder above them (not followed)" in notes
    assert "1 image(s) are reached a second time through links (counted once): " in notes and "again.png" in notes
    assert "1 link(s) lead outside the dataset root (followed): " in notes and "ext.png" in notes
    assert "1 link(s) lead into another class's folder (not followed" in notes and "tob" in notes
    assert len(ds.scan_notes) == 4 and all(n in caplog.text for n in ds.scan_notes)


# ---------------------------------------------------------------- item 9: file kinds


def test_9_fifos_sockets_devices_and_folders_are_never_opened(tmp_path):
    """Before: a FIFO named like an image, a list, a config or a CIFAR batch was opened for
    reading and blocked for ever; a folder named as a list gave IsADirectoryError."""
    from fastlt.config.loader import load_config
    from fastlt.data import ImageFolderLT, LongTailedList
    from fastlt.data.cifar import load_batch
    from fastlt.files import safe_load
    from fastlt.paths import NotRegularFileError, read_regular
    from fastlt.models.pretrained import check_pretrained_path

    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    sock_path = tmp_path / "s.txt"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for path, kind in ((fifo, "a FIFO"), (sock_path, "a socket"), (Path("/dev/zero"), "a character device")):
            with pytest.raises(NotRegularFileError, match=kind):
                in_thread(lambda: read_regular(path))
            with pytest.raises(ValueError, match=f"list file {path} is {kind}.*, not a regular file"):
                in_thread(lambda: LongTailedList(tmp_path, path))
            with pytest.raises(ConfigError, match=f"config file {path} is {kind}"):
                in_thread(lambda: load_config(path))
            with pytest.raises(ValueError, match=f"CIFAR batch {path} is {kind}"):
                in_thread(lambda: load_batch(path))
            with pytest.raises(CheckpointError, match=f"checkpoint file {path} is {kind}"):
                in_thread(lambda: safe_load(path))
            with pytest.raises(CheckpointError, match=f"model.pretrained: {path} is {kind}"):
                check_pretrained_path(str(path))
    finally:
        sock.close()
    # An image of a list that is a FIFO is a bad image (OSError) at once, not a hang.
    (tmp_path / "l.txt").write_text("x.jpg 0\n")
    ds = LongTailedList(tmp_path, tmp_path / "l.txt", 1)
    with pytest.raises(OSError, match="a FIFO"):
        in_thread(lambda: ds.read_bytes(0))
    # A folder scan refuses an image-named FIFO up front, naming it.
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "ok.png").write_bytes(png())
    os.mkfifo(tmp_path / "train" / "a" / "p.png")
    with pytest.raises(ValueError, match=r"1 image-named entries are not regular files .*p\.png \(a FIFO"):
        ImageFolderLT(tmp_path / "train")
    # A folder where a file is expected, and a file where a folder is.
    with pytest.raises(ValueError, match=f"list file {tmp_path} is a folder, not a regular file"):
        LongTailedList(tmp_path, tmp_path)
    with pytest.raises(ValueError, match=f"image folder {tmp_path / 'l.txt'} is a regular file, not a folder"):
        ImageFolderLT(tmp_path / "l.txt")


def test_9_config_data_paths_are_checked_for_their_kind(tmp_path):
    """Before: data.train_list naming a folder or a FIFO got past the is_file check's message
    ("does not exist") or blocked."""
    from fastlt.config.loader import config_from_dict
    from fastlt.data.build import build_datasets

    (tmp_path / "lists").mkdir()
    os.mkfifo(tmp_path / "val.txt")
    cfg = config_from_dict({"data": {"kind": "list", "root": str(tmp_path), "train_list": "lists",
                                     "val_list": "val.txt", "num_classes": 2}})
    with pytest.raises(DataError, match="data.train_list: list file .*lists is a folder, not a regular file"):
        build_datasets(cfg)
    with pytest.raises(DataError, match="data.val_list: list file .*val.txt is a FIFO"):
        in_thread(lambda: build_datasets(cfg, need_train=False))
    (tmp_path / "cache").write_text("")  # before: make_synthetic_lt's ValueError traceback
    cfg = config_from_dict({"data": {"kind": "synthetic", "root": str(tmp_path / "cache")}})
    with pytest.raises(DataError, match="data.root: the synthetic dataset's cache .*cache is a regular file, not a folder"):
        build_datasets(cfg)


# ---------------------------------------------------------------- item 10: CIFAR batches validated


def _bomb_pickle(n: int) -> bytes:
    """protocol 2: builtins.bytearray(n) — 42 bytes asking for n."""
    return (b"\x80\x02c__builtin__\nbytearray\nq\x00\x8a\x06" + n.to_bytes(6, "little") + b"\x85q\x01Rq\x02.")


_GOOD = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize("name, content, message", [
    ("float pixels", {b"data": _GOOD.astype(np.float32), b"labels": [0, 1]},
     r"field 'data' must be a uint8 array of shape \(N, 3072\).*got float32 \(2, 3072\)"),
    ("int16 pixels", {b"data": _GOOD.astype(np.int16), b"labels": [0, 1]}, r"got int16 \(2, 3072\)"),
    ("wrong shape", {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"got uint8 \(2, 1024\)"),
    ("list pixels", {b"data": [[0] * 3072] * 2, b"labels": [0, 1]}, r"field 'data' .*; got list"),
    ("float labels", {b"data": _GOOD, b"labels": [0.0, 1.5]}, r"field 'labels' must be a list of integer .*holding 0.0 \(float\)"),
    ("bool labels", {b"data": _GOOD, b"labels": [True, 1]}, r"field 'labels' .*True \(bool\)"),
    ("float label array", {b"data": _GOOD, b"labels": np.array([0.0, 1.0])}, r"field 'labels' .*float64"),
    ("labels out of range", {b"data": _GOOD, b"labels": [0, 10]}, r"labels in \[0, 10\], outside \[0, 10\)"),
    ("count mismatch", {b"data": _GOOD, b"labels": [0]}, r"'data' holds 2 images but field 'labels' 1 labels"),
    ("object array", {b"data": np.array([None, 1], dtype=object), b"labels": [0]}, r"refused numpy dtype '\|O'"),
    ("no data", {b"labels": [0]}, r"no 'data' field; fields: \['labels'\]"),
    ("bytearray bomb", _bomb_pickle(2**40), r"refused bytearray\(1099511627776\): more than the file's 42 bytes"),
    ("bytearray8 bomb", b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b"abc.",
     r"expected 1099511627776 bytes in a bytearray8, but only 4 remain"),
    ("array bomb", b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\x00\x00\x40\x85U\x01b\x87R.",
     r"refused an array of shape \(1073741824,\): more than the file's"),
])
def test_10_cifar_batches_are_validated_not_cast(tmp_path, name, content, message):
    """Before: float/int16 pixels were wrapped into uint8 and trained on, float labels truncated,
    and a 42-byte pickle could ask for 2^40 bytes (bytearray(n), an object array, a counted
    opcode: MemoryError tracebacks, or gigabytes allocated)."""
    from fastlt.data.cifar import _load_cifar_batch

    path = tmp_path / "data_batch_1"
    path.write_bytes(content if isinstance(content, bytes) else pickle.dumps(content, protocol=2))
    with pytest.raises(ValueError, match=message) as e:
        _load_cifar_batch(path, "labels", 10)
    assert one_line(e.value).startswith(str(path))


def test_10_the_official_layouts_still_load(tmp_path):
    from fastlt.data.cifar import _load_cifar_batch

    for proto, labels in ((2, [3, 1]), (5, np.array([3, 1], np.int64))):
        path = tmp_path / f"b{proto}"
        path.write_bytes(pickle.dumps({b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072),
                                       b"labels": labels}, protocol=proto))
        images, got = _load_cifar_batch(path, "labels", 10)
        assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and got.tolist() == [3, 1]


# ---------------------------------------------------------------- item 11: configs


def test_11_bare_sections_and_section_overrides(tmp_path):
    """Before: `optim:` with nothing under it in a child recipe, or --set run=null, reset the whole
    section to its defaults without a word (lr 0.05 -> 0.1); --set optim={...} replaced it too."""
    from fastlt.config.loader import load_config

    (tmp_path / "base.yaml").write_text("data: {kind: synthetic, root: x}\noptim: {lr: 0.05, epochs: 7}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n")
    with pytest.raises(ConfigError, match=r"^optim: the section is empty \(a bare 'optim:' line, or --set optim=null"):
        load_config(tmp_path / "child.yaml")
    with pytest.raises(ConfigError, match=r"^run: the section is empty"):
        load_config(tmp_path / "base.yaml", ["run=null"])
    with pytest.raises(ConfigError, match=r"^data.synthetic: the section is empty"):
        load_config(tmp_path / "base.yaml", ["data.synthetic=null"])
    cfg = load_config(tmp_path / "base.yaml", ["optim={lr: 0.2}", "run={}"])
    assert (cfg.optim.lr, cfg.optim.epochs) == (0.2, 7)  # merged key by key: epochs kept


@pytest.mark.parametrize("text, message", [
    ("model:\n  backbone_kwargs: &a {x: *a}\n", "a YAML alias refers to the collection that contains it"),
    ("deepspeed:\n  extra: &a [*a]\n", "a YAML alias refers to the collection that contains it"),
    ("deepspeed:\n  extra:\n    a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)),
     "the YAML expands to more than 100000 values"),
    ("run: " + "[" * 400 + "]" * 400 + "\n", "nested too deeply|nested more than 64 levels"),
    ("run: {name: 2001-02-30}\n", "a value cannot be read"),
])
def test_11_yaml_aliases_and_odd_documents_are_one_line(tmp_path, text, message):
    """Before: a recursive alias raised RecursionError; an alias bomb in a free-form field ran for
    ever in the nan/inf walk (exponential); an impossible date gave a ValueError traceback."""
    from fastlt.config.loader import load_config

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        in_thread(lambda: load_config(path), timeout=20)
    one_line(e.value)


def test_11_encodings_of_configs_and_lists(tmp_path):
    """Before: a Latin-1 config gave a UnicodeDecodeError traceback; a byte-order mark in a list
    file became part of the first path ('.../\\ufefftrain/... does not exist', after training started)."""
    from fastlt.config.loader import load_config
    from fastlt.data import LongTailedList

    (tmp_path / "latin.yaml").write_bytes(b"data: {kind: synthetic, root: x}\nrun:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin.yaml: line 3 is not UTF-8 .*save the file as UTF-8"):
        load_config(tmp_path / "latin.yaml")
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfdata: {kind: synthetic, root: x}\nrun: {name: r}\n")
    assert load_config(tmp_path / "bom.yaml").run.name == "r"
    (tmp_path / "a.jpg").write_bytes(png())
    (tmp_path / "l.txt").write_bytes(b"\xef\xbb\xbfa.jpg 0\n")
    ds = LongTailedList(tmp_path, tmp_path / "l.txt", check_files=True)
    assert ds.paths == ["a.jpg"]


# ---------------------------------------------------------------- item 12: paths, numbers, command-line values


@pytest.mark.parametrize("override, message", [
    ('data.root="a\\0b"', r"data.root: 'a\\x00b' contains a NUL character"),
    ('data.root="\\ud800x"', r"data.root: .* an unpaired surrogate"),
    ("data.train_list=" + "n" * 300, r"data.train_list: 'n+'\.\.\. cannot be a path: its part .* is 300 bytes long"),
    ("run.output_dir=" + "/".join(["d" * 200] * 30), r"run.output_dir: .* paths are at most 4096 bytes"),
    ("optim.lr=1e39", r"optim.lr: '1e39' overflows float32"),
    ("method.alpha=-4e38", r"method.alpha: '-4e38' overflows float32"),
    ("method.temperature=1e-40", r"method.temperature: '1e-40' underflows float32"),
    ("data.batch_size=99999999999999999999", r"data.batch_size: 99999999999999999999 does not fit a 64-bit integer"),
])
def test_12_path_text_and_number_overflow_are_config_errors(override, message):
    """Before: a NUL became "ValueError: embedded null byte", a lone surrogate a UnicodeEncodeError
    and a 300-byte name an OSError(ENAMETOOLONG), each as a traceback where the path was first
    used; lr=1e39 turned into inf as float32 after setup (a RuntimeError)."""
    from fastlt.config.loader import load_config

    base = ["data.kind=synthetic", "data.root=x"]
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, base + [override])
    one_line(e.value)


def test_12_a_batch_larger_than_memory_is_refused_with_its_size():
    """Before: image_size=100000 passed the config and failed allocating the first batch."""
    from fastlt.config.loader import config_from_dict
    from fastlt.training.engine import deepspeed_config

    cfg = config_from_dict({"data": {"kind": "synthetic", "root": "x", "image_size": 100000, "batch_size": 256}})
    need = 3 * 128 * 3 * 100000**2 * 4 / 2**40  # 3 views x 128 images x 3 channels x float32
    with pytest.raises(ConfigError, match=rf"data.image_size=100000: one training batch of 128 images per rank \(2 rank"
                                          rf"\(s\)\) in 3 views of 3 × 100000 × 100000 float32 needs {need:.1f} TiB, more"):
        deepspeed_config(cfg, 2)
    deepspeed_config(config_from_dict({"data": {"kind": "synthetic", "root": "x"}}), 1)


def test_12_a_class_count_that_cannot_be_allocated(tmp_path):
    """Before: --num-classes 10^10 (fastlt data) allocated the class counts: a 74.5 GiB
    ArrayMemoryError traceback."""
    from fastlt.config.loader import config_from_dict
    from fastlt.data import LongTailedList

    (tmp_path / "l.txt").write_text("a.png 0\n")
    with pytest.raises(ValueError, match=r"9999999999 of 10000000000 classes have no image \(first: \[1, 2, 3, 4, 5\]"):
        LongTailedList(tmp_path, tmp_path / "l.txt", 10**10)
    with pytest.raises(ConfigError, match=r"data.num_classes: at most 16777216"):
        config_from_dict({"data": {"kind": "synthetic", "root": "x", "num_classes": 10**10}})


@pytest.mark.parametrize("args, message", [
    (["inspect", "--config", "c", "--checkpoint", "p", "--epoch", "-5"], "fastlt inspect: argument --epoch: must be >= 0; got -5"),
    (["inspect", "--config", "c", "--checkpoint", "p", "--samples", "0"], "argument --samples: must be >= 1; got 0"),
    (["profile", "--config", "c", "--steps", "0"], "fastlt profile: argument --steps: must be >= 1; got 0"),
    (["profile", "--config", "c", "--warmup", "-1"], "argument --warmup: must be >= 0; got -1"),
    (["data", "x", "--workers", "0"], "fastlt data: argument --workers: must be >= 1; got 0"),
    (["data", "x", "--num-classes", "ten"], "argument --num-classes: expected an integer, got 'ten'"),
])
def test_12_command_line_values_out_of_range(capsys, args, message):
    """Before: `fastlt inspect --epoch -5` reached the sampler (ValueError traceback); argparse's
    own errors were a usage block, not one line."""
    from fastlt.cli import main

    assert main(args) == 2  # argparse's refusal, returned to an in-process caller as its exit code
    assert message in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["data", "inspect", "profile", "eval"])
def test_12_out_naming_an_existing_file(tmp_path, capsys, command):
    """Before: data/inspect/profile --out FILE raised FileExistsError from mkdir after the work;
    eval --out FILE overwrote it (runs/A/metrics.json included)."""
    from fastlt.cli import main

    out = tmp_path / "taken"
    out.write_text("keep me")
    rest = {"data": [str(tmp_path)], "inspect": ["--config", "demo", "--checkpoint", "x"],
            "profile": ["--config", "demo"], "eval": ["--config", "demo", "--checkpoint", "x"]}[command]
    assert main([command, *rest, "--out", str(out)]) == 2
    line = error_line(capsys.readouterr().err)
    assert (f"--out {out} already exists and fastlt does not overwrite it" if command == "eval"
            else f"--out {out} is a file, not a folder") in line
    assert out.read_text() == "keep me"


# ---------------------------------------------------------------- item 13: messages that named the wrong thing


def test_13_messages_name_the_right_thing(tmp_path, capsys):
    """Before: a folder dataset's bad val image was blamed on data.val_list; `fastlt data /missing`
    spoke of --config; `base: ..` said "does not exist"; an empty model.pretrained file advised
    "use an earlier complete checkpoint"; a ZeRO meta without its world size said "written by
    None ranks"."""
    from fastlt.cli import main
    from fastlt.config.loader import load_config
    from fastlt.data import ImageFolderLT
    from fastlt.models.pretrained import check_pretrained_path
    from fastlt.training.checkpoint import CheckpointManager
    from fastlt.training.preflight import check_val_images

    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(BadImageError, match=r"^data.val_dir: 1 of 1 validation image"):
        check_val_images(ImageFolderLT(tmp_path / "val"), "raise", out=io.StringIO())

    assert main(["data", str(tmp_path / "missing")]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"fastlt data {tmp_path / 'missing'}: no such file" in line and "--config" not in line

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("base: ..\n")
    with pytest.raises(ConfigError, match=r"'base: \.\.' names .* is a folder, not a regular file"):
        load_config(tmp_path / "sub" / "c.yaml")

    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model.pretrained: .*w.pth is an empty file \(0 bytes\)") as e:
        check_pretrained_path(str(tmp_path / "w.pth"))
    assert "earlier complete checkpoint" not in str(e.value)

    mgr = CheckpointManager(tmp_path / "ck", world_size=2)
    with pytest.raises(CheckpointError, match=r"records no valid number of ranks \(world_size None\)") as e:
        mgr.check_compatible(tmp_path / "ck" / "epoch0001", {"zero_stage": 1}, {}, zero_stage=1)
    assert "None ranks" not in str(e.value)


def test_13_eval_state_dict_mismatch_is_shown_whole(tmp_path, monkeypatch):
    """Before: torch's multi-line "Error(s) in loading state_dict" was cut to its first line,
    which names no tensor."""
    import fastlt.training.checkpoint as ckpt
    from fastlt.config.loader import config_from_dict
    from fastlt.models import build_model
    from fastlt.training.evaluate import load_checkpoint_model

    cfg = config_from_dict(tiny_config(tmp_path, tmp_path))
    state = build_model(cfg, 6).state_dict()
    gone = next(k for k in state if k.endswith("weight"))
    del state[gone]
    state["extra.bias"] = torch.zeros(2)
    monkeypatch.setattr(ckpt, "load_weights", lambda path: (state, {}))
    with pytest.raises(CheckpointError, match=rf"missing 1: {gone}; unexpected 1: extra.bias; shape differs "
                                              r"\(checkpoint vs model\) none") as e:
        load_checkpoint_model(cfg, tmp_path / "best.pt", 6)
    one_line(e.value)


def test_13_kind_changing_casts_are_refused(tmp_path):
    """Before: a bool / int / complex tensor was cast into float weights without a word."""
    from fastlt.config.loader import config_from_dict
    from fastlt.models import build_model
    from fastlt.models.pretrained import load_pretrained

    cfg = config_from_dict(tiny_config(tmp_path, tmp_path))
    model = build_model(cfg, 6)
    for dtype in (torch.bool, torch.int32, torch.complex64):
        state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = state[name].to(dtype)
        torch.save(state, tmp_path / "w.pth")
        with pytest.raises(CheckpointError, match=rf"1 tensor\(s\) are of another kind .*{name} "
                                                  rf"\({str(dtype)[6:]} in the file, float32 in the"):
            load_pretrained(model, tmp_path / "w.pth")
    state[name] = state[name].real.to(torch.float16)  # a precision cast between floats is allowed
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    for k in counters:  # and within integers (a counter saved as int32)
        state[k] = state[k].to(torch.int32)
    assert counters
    torch.save(state, tmp_path / "w.pth")
    assert "pretrained: " in load_pretrained(model, tmp_path / "w.pth")


def test_13_refused_pretrained_leaves_the_run_directory_untouched(tmp_path):
    """Before: the trainer checked only that model.pretrained existed, then started the logger
    (train.log, log.jsonl) and failed on the shapes inside setup."""
    from fastlt.config.loader import config_from_dict
    from fastlt.training.trainer import Trainer

    from fastlt.models import build_model

    out = tmp_path / "runs"
    cfg = tiny_config(tmp_path / "data", out, run={"name": "r"}, model={"pretrained": str(tmp_path / "other.pth")})
    state = build_model(config_from_dict(cfg), 6).backbone.state_dict()
    first = next(k for k, v in state.items() if v.ndim == 4)
    state[first] = torch.zeros(3, 3, 3, 3)  # another architecture's first convolution
    torch.save(state, tmp_path / "other.pth")
    (out / "r").mkdir(parents=True)
    (out / "r" / "notes.txt").write_text("mine")
    before = tree_digest(out)
    with pytest.raises(CheckpointError, match=rf"^model.pretrained: tensor '{first}' has shape \(3, 3, 3, 3\)"):
        Trainer(config_from_dict(cfg))
    assert tree_digest(out) == before


def test_13_duplicate_list_lines_and_topk_above_classes(tmp_path, caplog):
    """Before: a repeated line counted twice in the class counts and samplers, a path listed with
    two labels trained on both, and method.topk > C passed silently."""
    from fastlt.config.loader import config_from_dict
    from fastlt.data import LongTailedList
    from fastlt.data.build import build_datasets

    (tmp_path / "l.txt").write_text("a.jpg 0\nb.jpg 1\na.jpg 0\n")
    with caplog.at_level(logging.WARNING, logger="fastlt.data"):
        ds = LongTailedList(tmp_path, tmp_path / "l.txt")
    assert ds.duplicate_lines == [(3, 1)] and "1 line(s) repeat an image already listed" in caplog.text
    (tmp_path / "m.txt").write_text("a.jpg 0\nb.jpg 1\na.jpg 1\n")
    with pytest.raises(ValueError, match=r"line 3 lists a.jpg with label 1, but line 1 lists it with label 0"):
        LongTailedList(tmp_path, tmp_path / "m.txt")

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png(i))
    (tmp_path / "t.txt").write_text("0.png 0\n1.png 1\n")
    cfg = config_from_dict({"data": {"kind": "list", "root": str(tmp_path / "imgs"), "train_list": str(tmp_path / "t.txt"),
                                     "val_list": str(tmp_path / "t.txt"), "num_classes": 2}, "method": {"topk": 5}})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastlt.data"):
        build_datasets(cfg)
    assert "method.topk=5 is more than the 2 classes of the dataset" in caplog.text
