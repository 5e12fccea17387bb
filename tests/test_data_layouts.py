"""Dataset layouts (fastlt.data.folder: ``data.kind: folder``, ``data.class_names``) and
``fastlt data`` (fastlt.reports.dataset_report).

The synthetic set of make_synthetic_lt is laid out as ``root/train/<class>/<i>.jpg`` with a
list file ``train.txt`` written class by class: the folder reader and the list reader see the
same files, so the same seed must give the same batches on both backends, including the
samplers and ``on_error: skip`` with a corrupt file present in both.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, assert_same_batches, child_env

from fastlt.data import ImageFolderLT, LongTailedList, make_synthetic_lt
from fastlt.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def lt(tmp_path_factory):
    """A synthetic set (7 classes, 48 → 6 images) with one corrupt JPEG added to class 3, in the
    folder and in the list (at the place a class-by-class sorted list has it)."""
    made = make_synthetic_lt(tmp_path_factory.mktemp("layouts") / "lt", num_classes=7, imb_factor=0.125, n_max=48,
                             image_size=24, seed=3, n_val=3)
    (made.root / "train" / "003" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    lines = made.train_list.read_text().splitlines()
    last3 = max(i for i, ln in enumerate(lines) if ln.endswith(" 3"))
    lines.insert(last3 + 1, "train/003/zz_corrupt.jpg 3")
    with_bad = made.root / "train_with_bad.txt"
    with_bad.write_text("\n".join(lines) + "\n")
    return made, with_bad


def test_folder_reads_the_same_images_as_the_list(lt):
    made, listed = lt
    folder = ImageFolderLT(made.root / "train")
    lst = LongTailedList(made.root, listed)
    assert folder.class_names == [f"{c:03d}" for c in range(7)]
    assert len(folder) == len(lst) == int(made.class_counts.sum()) + 1
    assert [folder.full_path(i) for i in range(len(folder))] == [lst.full_path(i) for i in range(len(lst))]
    assert np.array_equal(folder.labels, lst.labels) and np.array_equal(folder.class_counts, lst.class_counts)
    assert folder.read_bytes(5) == lst.read_bytes(5)
    # A validation folder is indexed with the training folder's names.
    val = ImageFolderLT(made.root / "val", folder.class_names, require_all_classes=False)
    assert np.array_equal(val.class_counts, np.full(7, 3))


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_folder_and_list_give_identical_batches(lt, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from fastlt.pipelines import TrainPipelineSpec, build_train_pipeline

    made, listed = lt

    def batches(ds):
        # The uniform background stream visits every image once per epoch, so the corrupt file is
        # met (and replaced under on_error: skip) in both.
        spec = TrainPipelineSpec(dataset=ds, image_size=16, batch_size=16, num_workers=0 if backend == "torch" else 1,
                                 seed=7, randaugment=False, background_sampler="uniform", foreground_sampler="reverse",
                                 cutmix_prob=0.7, on_error="skip")
        p = build_train_pipeline(spec, backend)
        try:
            return list(p.epoch(1)), p.stats()
        finally:
            p.close()

    a, stats_a = batches(ImageFolderLT(made.root / "train"))
    b, stats_b = batches(LongTailedList(made.root, listed))
    assert len(a) == (int(made.class_counts.sum()) + 1) // 16
    assert_same_batches(a, b)
    assert stats_a["skipped_images"] == stats_b["skipped_images"] >= 1
    assert "zz_corrupt.jpg" in " ".join(stats_a["skipped_files"])


def _cfg(root: Path, **data):
    from fastlt.config.loader import config_from_dict

    return config_from_dict({"data": {"kind": "folder", "root": str(root), **data}})


def test_folder_config_builds_datasets_and_names_classes(lt, tmp_path):
    from fastlt.data.build import build_datasets

    made, _ = lt
    data = build_datasets(_cfg(made.root))
    assert data.num_classes == 7 and data.class_names == [f"{c:03d}" for c in range(7)]
    assert len(data.val) == 21 and data.test is None
    with pytest.raises(DataError, match=r"data.num_classes is 9, but the image folder .* has 7 classes"):
        build_datasets(_cfg(made.root, num_classes=9))
    with pytest.raises(DataError, match=r"data.val_dir: image folder .*nope does not exist"):
        build_datasets(_cfg(made.root, val_dir="nope"))
    # A validation class that the training folder lacks.
    odd = tmp_path / "odd"
    shutil.copytree(made.root / "train", odd / "train")
    shutil.copytree(made.root / "val", odd / "val")
    (odd / "val" / "zebra").mkdir()
    with pytest.raises(DataError, match=r"data.val_dir: .*class folder\(s\) \['zebra'\] that the training folder"):
        build_datasets(_cfg(odd))
    # Images straight under the root, without class folders.
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    shutil.copy(made.root / "train" / "000" / "00000.jpg", flat / "a.jpg")
    with pytest.raises(DataError, match="no class sub-folders; it holds 1 images directly"):
        build_datasets(_cfg(flat.parent))
    with pytest.raises(ConfigError, match="data.class_names: only list datasets"):
        _cfg(made.root, class_names="names.txt")


def test_class_names_file_for_a_list_dataset(lt, tmp_path):
    from fastlt.config.loader import config_from_dict
    from fastlt.data.build import build_datasets

    made, _ = lt
    names = ["circle", "square", "star", "cross", "ring", "moon", "arrow"]
    good = tmp_path / "names.txt"
    good.write_text("\n".join(names) + "\n")
    base = {"kind": "list", "root": str(made.root), "train_list": "train.txt", "val_list": "val.txt", "num_classes": 7}
    data = build_datasets(config_from_dict({"data": {**base, "class_names": str(good)}}))
    assert data.class_names == names
    short = tmp_path / "short.txt"
    short.write_text("\n".join(names[:5]))
    with pytest.raises(DataError, match=r"data.class_names: .*short.txt names 5 classes, but the dataset has 7"):
        build_datasets(config_from_dict({"data": {**base, "class_names": str(short)}}))
    blank = tmp_path / "blank.txt"
    blank.write_text("a\n\nb\n")
    with pytest.raises(DataError, match="line 2 is blank"):
        build_datasets(config_from_dict({"data": {**base, "class_names": str(blank)}}))


# --------------------------------------------------------------------------------------
# fastlt data
# --------------------------------------------------------------------------------------


def _fastlt(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "fastlt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=child_env())


def test_data_command_counts_classes_and_finds_the_bad_files(lt, tmp_path):
    made, _ = lt
    root = tmp_path / "ds"
    shutil.copytree(made.root / "train", root / "train")
    shutil.copytree(made.root / "val", root / "val")
    good = root / "train" / "001" / "00000.jpg"
    (root / "train" / "001" / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    (root / "val" / "002" / "empty.jpg").write_bytes(b"")
    proc = _fastlt("data", root, "--out", tmp_path / "report")
    assert proc.returncode == 1, proc.stderr  # unreadable files were found
    out = proc.stdout
    counts = list(made.class_counts)
    counts[1] += 1  # the truncated file is listed under class 001
    counts[3] += 1  # and the corrupt one under 003
    n = sum(counts)
    assert f"{n} training images in 7 classes" in out
    assert f"max {max(counts)}, median {float(np.median(counts)):g}, min {min(counts)}" in out
    assert f"imbalance factor {max(counts) / min(counts):.1f} (max / min)" in out
    few = [c for c in counts if c < 20]
    medium = [c for c in counts if 20 <= c <= 100]
    assert f"few-shot    (  < 20 images): {len(few):>5} classes, {sum(few):>7} images" in out
    assert f"medium-shot (20-100 images): {len(medium):>5} classes, {sum(medium):>7} images" in out
    assert "val: 22 images in 7 classes" in out
    assert f"header check (train {n}, val 22 files): 3 unreadable:" in out
    assert "train/003/zz_corrupt.jpg: not a readable image" in out
    assert "train/001/truncated.jpg: truncated JPEG" in out or "train/001/truncated.jpg: not a readable" in out
    assert "val/002/empty.jpg: the file is empty" in out
    report = tmp_path / "report"
    bad = (report / "unreadable.txt").read_text().splitlines()
    assert len(bad) == 3
    rows = (report / "class_counts.csv").read_text().splitlines()
    assert rows[0] == "index,name,train_images,group"
    assert rows[2] == f"1,001,{counts[1]},{'medium' if counts[1] >= 20 else 'few'}"
    with Image.open(report / "class_histogram.png") as im:
        from fastlt.reports.plots import SIZES

        assert im.size == SIZES["class_histogram.png"]
        assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 20  # a drawn plot, not a blank canvas


def test_data_command_on_a_list_file_and_a_config(lt, tmp_path):
    made, _ = lt
    proc = _fastlt("data", made.train_list, "--out", tmp_path / "list")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{int(made.class_counts.sum())} training images in 7 classes" in proc.stdout
    assert "0 unreadable" in proc.stdout
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{kind: folder, root: {made.root}}}\nrun: {{name: mine}}\n")
    proc = _fastlt("data", cfg, "--no-check", "--out", tmp_path / "cfg")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("dataset mine: config") and "header check: skipped" in proc.stdout
    assert f"{int(made.class_counts.sum()) + 1} training images in 7 classes" in proc.stdout
    proc = _fastlt("data", tmp_path / "no-such-thing")
    assert proc.returncode == 2 and "no such file, and no shipped recipe of that name" in proc.stderr
