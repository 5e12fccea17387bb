"""The torch DataLoader backend against the pipeline contract (docs/design.md §1 "Views",
"CutMix", §3 pipeline contract) and the bad-input rules (``data.on_error``).

The expected values are written here independently of the library: the deterministic
test mode's views are recomputed with PIL (decode, bilinear resize, /255, normalise); the
pasted box is recovered from the pixels and λ checked against 1 − area/(H·W).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastlt.data import ArrayDataset, LongTailedList, make_synthetic_lt
from fastlt.pipelines import (IMAGENET_MEAN, IMAGENET_STD, TrainPipelineSpec, ValPipelineSpec, build_train_pipeline,
                              build_val_pipeline, select_backend)
from conftest import assert_dataset_checks, assert_same_batches, pasted_box, reference_view
from fastlt.pipelines.common import BadImageError

SIZE = 32


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_lt(tmp_path_factory.mktemp("synth_torch"), num_classes=6, imb_factor=0.2, n_max=24,
                             image_size=48, seed=3, n_val=3)


@pytest.fixture(scope="module")
def train_ds(synth):
    return LongTailedList(synth.root, synth.train_list)


def make(ds, **kw):
    args = dict(dataset=ds, image_size=SIZE, batch_size=4, num_workers=0, seed=7)
    args.update(kw)
    return build_train_pipeline(TrainPipelineSpec(**args), "torch")


def test_shapes_dtypes_and_epoch_length(train_ds):
    p = make(train_ds)
    n = len(train_ds)
    assert p.steps_per_epoch == n // 4
    batches = list(p.epoch(0))
    assert len(batches) == p.steps_per_epoch
    for b in batches:
        b.validate()
        for name in ("image", "view1", "view2"):
            t = getattr(b, name)
            assert t.shape == (4, 3, SIZE, SIZE) and t.dtype == torch.float32
        assert b.label_a.dtype == torch.int64 and b.lam.dtype == torch.float32 and b.mixed.dtype == torch.bool
        assert b.foreground is None
        # Not mixed: label_b is label_a and λ is 1.
        assert torch.equal(b.label_b[~b.mixed], b.label_a[~b.mixed])
        assert torch.all(b.lam[~b.mixed] == 1.0)
        assert torch.all((b.lam[b.mixed] > 0) & (b.lam[b.mixed] <= 1))
    # Background labels over the epoch are the dataset's labels at this rank's indices.
    bg, fg = p.indices(0)
    got = torch.cat([b.label_a for b in batches]).numpy()
    np.testing.assert_array_equal(got, train_ds.labels[bg[:len(got)]])


def test_cifar_recipe_from_arrays():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [10, 6, 3, 1]).astype(np.int64)
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    ds = ArrayDataset(images=images, labels=labels, class_counts=np.bincount(labels), num_classes=4)
    p = make(ds, recipe="cifar", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    b = next(iter(p.epoch(0)))
    b.validate()
    assert b.image.shape == (4, 3, 32, 32)
    # Augmentation off reproduces the arrays exactly (32 px in, 32 px out, no resampling).
    p = make(ds, recipe="cifar", augment=False, cutmix_prob=0.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    b = next(iter(p.epoch(0)))
    bg, _ = p.indices(0)
    expect = (torch.from_numpy(images[bg[:4]]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(b.image, expect)
    torch.testing.assert_close(b.view1, expect)


@pytest.mark.parametrize("per_sample", [False, True])
def test_cutmix_region_is_foreground_and_lambda_is_exact(train_ds, per_sample):
    p = make(train_ds, augment=False, cutmix_prob=1.0, cutmix_per_sample=per_sample,
             extra={"with_foreground": True})
    bg, fg = p.indices(0)
    boxes = []
    for step, b in enumerate(p.epoch(0)):
        assert b.mixed.all()
        for i in range(len(b)):
            pos = step * 4 + i
            # With augmentation off every background view is the resized image, and the
            # foreground view is the resized foreground image.
            ref_bg = reference_view(train_ds.full_path(int(bg[pos])), SIZE)
            ref_fg = reference_view(train_ds.full_path(int(fg[pos])), SIZE)
            torch.testing.assert_close(b.view1[i], ref_bg, atol=1e-5, rtol=0)
            torch.testing.assert_close(b.view2[i], ref_bg, atol=1e-5, rtol=0)
            torch.testing.assert_close(b.foreground[i], ref_fg, atol=1e-5, rtol=0)
            assert b.label_a[i] == train_ds.labels[bg[pos]] and b.label_b[i] == train_ds.labels[fg[pos]]
            if bg[pos] == fg[pos]:  # the foreground sampler drew the background image itself
                assert torch.equal(b.image[i], b.view1[i])
                continue
            box = pasted_box(b.image[i], b.view1[i])
            if box is None:  # a box of zero area (λ0 close to 1) pastes nothing
                assert b.lam[i] == 1.0
                continue
            y0, x0, y1, x1 = box
            inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert torch.equal(b.image[i][:, inside], b.foreground[i][:, inside])
            assert torch.equal(b.image[i][:, ~inside], b.view1[i][:, ~inside])
            lam = np.float32(1.0 - (y1 - y0) * (x1 - x0) / float(SIZE * SIZE))
            assert b.lam[i].item() == lam
            boxes.append((step, box))
    assert len(boxes) >= 5
    if not per_sample:  # one box per batch
        per_step = {}
        for step, box in boxes:
            per_step.setdefault(step, set()).add(box)
        assert all(len(s) == 1 for s in per_step.values())
    else:
        assert len({box for _, box in boxes}) > len({step for step, _ in boxes})


def test_cutmix_probability(train_ds):
    assert not any(b.mixed.any() for b in make(train_ds, augment=False, cutmix_prob=0.0).epoch(0))
    assert all(b.mixed.all() for b in make(train_ds, augment=False, cutmix_prob=1.0).epoch(0))
    # Per batch: every sample of a batch shares the coin.
    for b in make(train_ds, augment=False, cutmix_prob=0.5).epoch(1):
        assert b.mixed.all() or not b.mixed.any()


def test_deterministic_whatever_the_workers(train_ds):
    a = list(make(train_ds, num_workers=0).epoch(2))
    b = list(make(train_ds, num_workers=2).epoch(2))
    assert_same_batches(a, b)
    c = list(make(train_ds, seed=8).epoch(2))
    assert not torch.equal(a[0].image, c[0].image)
    d = list(make(train_ds).epoch(3))
    assert not torch.equal(a[0].view1, d[0].view1)


def test_ranks_get_different_batches(train_ds):
    r0 = make(train_ds, rank=0, world_size=2)
    r1 = make(train_ds, rank=1, world_size=2)
    assert r0.steps_per_epoch == r1.steps_per_epoch == (-(-len(train_ds) // 2)) // 4
    bg0, fg0 = r0.indices(0)
    bg1, fg1 = r1.indices(0)
    # The background shards do not overlap (only wrap-around padding may repeat an index).
    assert len(set(bg0.tolist()) & set(bg1.tolist())) <= 1
    assert not np.array_equal(fg0, fg1)
    b0, b1 = next(iter(r0.epoch(0))), next(iter(r1.epoch(0)))
    assert not torch.equal(b0.view1, b1.view1)


class CountingList:
    """A LongTailedList that counts read_bytes calls (to prove skipped steps are not decoded)."""

    def __init__(self, inner):
        self.inner, self.reads = inner, 0
        self.labels, self.num_classes, self.class_counts = inner.labels, inner.num_classes, inner.class_counts

    def __len__(self):
        return len(self.inner)

    def read_bytes(self, i):
        self.reads += 1
        return self.inner.read_bytes(i)

    def full_path(self, i):
        return self.inner.full_path(i)


def test_start_step_resumes_without_decoding_skipped_steps(train_ds):
    full = list(make(train_ds).epoch(1))
    counting = CountingList(train_ds)
    p = make(counting, cutmix_prob=0.0)
    tail = list(p.epoch(1, start_step=3))
    assert counting.reads == (p.steps_per_epoch - 3) * 4  # only the remaining steps' backgrounds
    ref = list(make(train_ds, cutmix_prob=0.0).epoch(1))
    assert_same_batches(tail, ref[3:])
    assert_same_batches(list(make(train_ds).epoch(1, start_step=2)), full[2:])
    assert list(make(train_ds).epoch(1, start_step=make(train_ds).steps_per_epoch)) == []
    with pytest.raises(ValueError, match="start_step"):
        list(make(train_ds).epoch(1, start_step=10_000))
    with pytest.raises(ValueError, match="start_step"):
        list(make(train_ds).epoch(1, start_step=-1))


@pytest.fixture()
def bad_list(synth, tmp_path):
    """A copy of the synthetic train list where three entries are a corrupt file, a truncated
    JPEG and a missing file, each in a class that has other, readable images."""
    src = LongTailedList(synth.root, synth.train_list)
    root = tmp_path / "bad"
    lines = []
    for i, rel in enumerate(src.paths):
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.full_path(i), dst)
        lines.append(f"{rel} {src.labels[i]}")
    (root / "corrupt.jpg").write_bytes(os.urandom(3000))
    good = (root / src.paths[0]).read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    lines += ["corrupt.jpg 0", "truncated.jpg 1", "missing.jpg 2"]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return LongTailedList(root, root / "train.txt")


@pytest.mark.parametrize("name", ["corrupt.jpg", "truncated.jpg", "missing.jpg"])
def test_bad_input_raise_names_the_file(bad_list, name):
    p = make(bad_list, background_sampler="uniform", batch_size=len(bad_list), on_error="raise", cutmix_prob=0.0)
    # Keep only the bad file of interest so the first error is the one we check.
    others = {"corrupt.jpg", "truncated.jpg", "missing.jpg"} - {name}
    for other in others:
        shutil.copyfile(bad_list.full_path(0), Path(bad_list.root) / other)
    with pytest.raises(BadImageError, match=name):
        list(p.epoch(0))


def test_bad_input_skip_substitutes_same_class(bad_list):
    p = make(bad_list, batch_size=len(bad_list), on_error="skip", cutmix_prob=0.0)
    (batch,) = list(p.epoch(0))
    bg, _ = p.indices(0)
    # Labels are never wrong: each substitute is an image of the same class.
    np.testing.assert_array_equal(batch.label_a.numpy(), bad_list.labels[bg])
    st = p.stats()
    assert st["skipped_images"] == 3
    assert sorted(Path(m.split(" ")[0].rstrip(":")).name for m in st["skipped_files"]) == [
        "corrupt.jpg", "missing.jpg", "truncated.jpg"]
    # Deterministic substitution.
    (again,) = list(make(bad_list, batch_size=len(bad_list), on_error="skip", cutmix_prob=0.0).epoch(0))
    assert torch.equal(batch.image, again.image)


def test_skip_without_any_substitute_raises(tmp_path, synth):
    src = LongTailedList(synth.root, synth.train_list)
    lines = [f"{os.path.join(synth.root, r)} {int(l)}" for r, l in zip(src.paths, src.labels)]
    lines.append(f"{tmp_path / 'gone.jpg'} {src.num_classes}")  # a class whose only image is missing
    (tmp_path / "l.txt").write_text("\n".join(lines) + "\n")
    ds = LongTailedList("/", tmp_path / "l.txt")
    p = make(ds, batch_size=len(ds), on_error="skip", cutmix_prob=0.0)
    with pytest.raises(BadImageError, match="gone.jpg.*no readable image of its class"):
        list(p.epoch(0))


def test_bad_arguments(train_ds):
    # The CIFAR recipe takes files as well as arrays (tests/test_pipelines_cifar_files.py).
    assert_dataset_checks(make, train_ds)
    with pytest.raises(ValueError, match="on_error"):
        make(train_ds, on_error="ignore")
    with pytest.raises(ValueError, match="pipeline.backend"):
        select_backend("tensorflow")
    with pytest.raises(ValueError, match="epoch"):
        next(iter(make(train_ds).epoch(-1)))
    with pytest.raises(ValueError, match="'with_forground' \\(did you mean 'with_foreground'"):
        make(train_ds, extra={"with_forground": True})


def test_explicit_dali_without_dali_raises(monkeypatch):
    import fastlt.pipelines as pipelines

    monkeypatch.setattr(pipelines, "dali_available", lambda: (False, "ImportError: No module named 'nvidia'"))
    with pytest.raises(RuntimeError, match=r"pip install fastlt\[dali-cuda12\]"):
        select_backend("dali")
    assert select_backend("auto") == "torch"
    monkeypatch.setenv("FASTLT_PIPELINE", "torch")
    assert select_backend("auto") == "torch"


def test_val_shards_without_padding_and_centre_crops(synth):
    val = LongTailedList(synth.root, synth.val_list, require_all_classes=False)
    n = len(val)
    seen = []
    for rank in range(4):
        spec = ValPipelineSpec(dataset=val, image_size=SIZE, batch_size=5, rank=rank, world_size=4, num_workers=0)
        p = build_val_pipeline(spec, "torch")
        for _ in range(2):  # iterating again is another pass with the same content
            labels = []
            for images, lab in p:
                assert images.shape[1:] == (3, SIZE, SIZE) and images.dtype == torch.float32
                assert lab.dtype == torch.int64
                labels.append(lab)
            labels = torch.cat(labels)
            np.testing.assert_array_equal(labels.numpy(), val.labels[rank::4])
        seen.append(len(labels))
    assert sum(seen) == n  # every image exactly once over the ranks
    # Resize the shorter side to round(SIZE·256/224) then centre-crop SIZE, written out with PIL.
    images, _ = next(iter(build_val_pipeline(ValPipelineSpec(dataset=val, image_size=SIZE, batch_size=2,
                                                             num_workers=0), "torch")))
    with Image.open(val.full_path(0)) as im:
        im = im.convert("RGB")
        w, h = im.size
        short = round(SIZE * 256 / 224)
        nw, nh = (short, round(h * short / w)) if w <= h else (round(w * short / h), short)
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = int(round((nw - SIZE) / 2.0)), int(round((nh - SIZE) / 2.0))
        arr = np.asarray(im.crop((left, top, left + SIZE, top + SIZE)), np.float32) / 255.0
    ref = torch.from_numpy((arr - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32))
    torch.testing.assert_close(images[0], ref.permute(2, 0, 1), atol=1e-5, rtol=0)


def test_val_skip_leaves_bad_images_out(bad_list):
    p = build_val_pipeline(ValPipelineSpec(dataset=bad_list, image_size=SIZE, batch_size=8, num_workers=0,
                                           on_error="skip"), "torch")
    total = sum(len(lab) for _, lab in p)
    assert total == len(bad_list) - 3 and p.stats()["skipped_images"] == 3
    p = build_val_pipeline(ValPipelineSpec(dataset=bad_list, image_size=SIZE, batch_size=8, num_workers=0), "torch")
    with pytest.raises(BadImageError, match="corrupt.jpg|truncated.jpg|missing.jpg"):
        list(p)
