"""The published split lists (fastlt.data.published): the shipped copies match their recorded
line counts and checksums, ship in the wheel, stand in for a missing list, and ``fastlt data``
says which split a user's list is."""
from __future__ import annotations

import ast
import gzip
import hashlib
from pathlib import Path

import pytest

from fastlt.config.loader import load_config
from fastlt.config.recipes import resolve_config
from fastlt.data.build import build_datasets
from fastlt.data.published import PUBLISHED, identify, shipped_dir, shipped_list
from fastlt.errors import DataError
from fastlt.reports.dataset_report import load_target

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("entry", [p for p in PUBLISHED if p.shipped], ids=lambda p: p.file)
def test_shipped_lists_match_their_records(entry):
    path = shipped_list(entry.file)
    assert path is not None and path.parent == shipped_dir()
    text = gzip.decompress(path.read_bytes())
    assert hashlib.sha256(text).hexdigest() == entry.sha256
    assert text.count(b"\n") == entry.lines and text.endswith(b"\n")
    labels = {int(line.rsplit(None, 1)[1]) for line in text.decode().splitlines()}
    assert labels == set(range(entry.num_classes))


def test_every_shipped_file_is_package_data_with_its_licence():
    shipped = sorted(p.name for p in shipped_dir().iterdir())
    assert shipped == sorted([f"{p.file}.gz" for p in PUBLISHED if p.shipped] + ["LICENSE"])
    assert "Facebook" in (shipped_dir() / "LICENSE").read_text()  # the BSD notice the licence asks to keep
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    kw = {k.arg: k.value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"
          for k in n.keywords}
    assert set(ast.literal_eval(kw["package_data"])["fastlt.data"]) == {"splits/*.txt.gz", "splits/LICENSE"}


def test_identify_names_the_split_or_the_difference(tmp_path):
    val = gzip.decompress(shipped_list("ImageNet_LT_val.txt").read_bytes())
    copy = tmp_path / "my_val.txt"  # any name: the checksum decides
    copy.write_bytes(val)
    entry, line = identify(copy)
    assert entry.file == "ImageNet_LT_val.txt" and "ImageNet-LT val" in line and "(verified)" in line
    cut = tmp_path / "ImageNet_LT_val.txt"
    cut.write_bytes(b"\n".join(val.split(b"\n")[:10]) + b"\n")
    entry, line = identify(cut)
    assert entry is None and "10 lines, published 20000" in line and "not the published split" in line
    # A training list fastlt has no copy of: recognised by name and line count, its checksum printed.
    train = tmp_path / "ImageNet_LT_train.txt"
    train.write_text("".join(f"train/n{i % 1000}/{i}.JPEG {i % 1000}\n" for i in range(115846)))
    entry, line = identify(train)
    assert entry.split == "train" and "no checksum" in line and hashlib.sha256(train.read_bytes()).hexdigest() in line


def _imagenet_cfg(root: Path):
    return load_config(resolve_config("imagenet_lt_resnext50_90ep"), [f"data.root={root}"])


def test_missing_published_list_uses_the_shipped_one(tmp_path):
    # Only the training list and the images are the user's; val and test are fastlt's copies.
    (tmp_path / "ImageNet_LT_train.txt").write_text("".join(f"train/c{c}/{k}.JPEG {c}\n"
                                                            for c in range(1000) for k in range(2)))
    data = build_datasets(_imagenet_cfg(tmp_path))
    assert len(data.train) == 2000 and len(data.val) == 20000 and len(data.test) == 50000
    assert data.val.list_file == shipped_list("ImageNet_LT_val.txt") and data.val.root == tmp_path
    assert [n.split(";")[1].strip().split(",")[0] for n in data.notes] == [
        "using the published ImageNet-LT val list", "using the published ImageNet-LT test list"]


def test_missing_unshipped_list_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"ImageNet_LT_train.txt is the published ImageNet-LT train list "
                                        r"\(115846 lines\); get it from https://github.com/facebookresearch/"
                                        r"classifier-balancing"):
        build_datasets(_imagenet_cfg(tmp_path))
    cfg = load_config(resolve_config("inat18_resnet50_100ep"), [f"data.root={tmp_path / 'absent'}"])
    with pytest.raises(DataError) as e:
        build_datasets(cfg)
    assert "iNaturalist 2018: the folder holding train_val2018/" in str(e.value)
    assert "ImageNet" not in str(e.value)


def test_fastlt_data_reports_which_split_each_list_is(tmp_path):
    (tmp_path / "ImageNet_LT_train.txt").write_text("".join(f"train/c{c}/0.JPEG {c}\n" for c in range(1000)))
    t = load_target("imagenet_lt_resnext50_90ep", overrides=[f"data.root={tmp_path}"])
    assert any("using the published ImageNet-LT val list" in c for c in t.checks)
    assert any(c.startswith("val list ") and "ImageNet-LT val list: 20000 lines" in c and "(verified)" in c
               for c in t.checks)
    assert any(c.startswith("train list ") and "1000 lines where the published one has 115846" in c for c in t.checks)
    with pytest.raises(DataError, match="give the folder of its images with --root"):
        load_target("Places_LT_val.txt")
    t = load_target("Places_LT_val.txt", root=str(tmp_path))
    assert len(t.train) == 7300 and "Places-LT val list" in t.checks[0]
