"""The CIFAR view recipe (pad-crop + flip + the reference's CIFAR10Policy for view 0; sim views
with PIL's Gaussian blur) on encoded image files, on both backends: a list of 32 px JPEGs, files
of another size (resized to the view size first), an image-folder dataset, and a ``kind: list``
config with ``augment_recipe: cifar`` from the config to the batches.

Expected pixels are computed here with PIL (decode, bilinear resize where the size differs,
/255, normalise). Both backends must draw the same indices, CutMix boxes, λ and labels; each is
deterministic whatever its worker count and resumes exactly at a step; bad files follow
``on_error`` as under the imagenet recipe; and a small model trained on the batches lowers its
loss on fixed batches.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastlt.data import LongTailedList, make_synthetic_lt
from fastlt.pipelines import (CIFAR_MEAN, CIFAR_STD, TrainPipelineSpec, ValPipelineSpec, build_train_pipeline,
                              build_val_pipeline, dali_available)
from fastlt.pipelines.common import BadImageError
from conftest import loss_before_and_after_training, assert_same_batches, reference_view

needs_dali = pytest.mark.skipif(not dali_available()[0],
                                reason="DALI is not installed (pip install nvidia-dali-cuda130)")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]
SIZE = 32
B = 8


@pytest.fixture(scope="module")
def jpegs32(tmp_path_factory):
    """A small long-tailed set of 32 px JPEGs (6 classes, 24 → 5 images)."""
    return make_synthetic_lt(tmp_path_factory.mktemp("cifar_files") / "lt32", num_classes=6, imb_factor=0.2,
                             n_max=24, image_size=SIZE, seed=2, n_val=3)


@pytest.fixture(scope="module")
def train32(jpegs32):
    return LongTailedList(jpegs32.root, jpegs32.train_list)


def make(ds, backend, **kw):
    args = dict(dataset=ds, recipe="cifar", image_size=SIZE, batch_size=B, num_workers=1, seed=4,
                mean=CIFAR_MEAN, std=CIFAR_STD)
    args.update(kw)
    return build_train_pipeline(TrainPipelineSpec(**args), backend)


def epoch_of(p, epoch=0, start_step=0):
    try:
        return list(p.epoch(epoch, start_step))
    finally:
        p.close()


def grey_levels(a, b):
    """|a − b| of two normalised image tensors in grey levels (0–255) of the source image."""
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255
    return (a - b).abs() * std


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source_size", [SIZE, 48])
def test_views_are_the_files_pixels_resized_to_the_view_size(tmp_path, backend, source_size):
    """Augmentation off: every view is the decoded file, resized to 32 × 32 where it is not."""
    syn = make_synthetic_lt(tmp_path / "lt", num_classes=3, imb_factor=1.0, n_max=8, image_size=source_size,
                            seed=1, n_val=1)
    ds = LongTailedList(syn.root, syn.train_list)
    p = make(ds, backend, augment=False, cutmix_prob=0.0)
    bg, _ = p.indices(0)
    batches = epoch_of(p)
    got = torch.cat([b.image for b in batches])
    expect = torch.stack([reference_view(ds.full_path(int(i)), SIZE, CIFAR_MEAN, CIFAR_STD) for i in bg[:len(got)]])
    assert got.shape == (len(got), 3, SIZE, SIZE)
    for b in batches:
        assert torch.equal(b.view1, b.image) and torch.equal(b.view2, b.image)
    diff = grey_levels(got, expect)
    if backend == "torch":  # PIL decode and PIL resize, as the reference computes them
        torch.testing.assert_close(got, expect)
    elif source_size == SIZE:  # DALI's decoder; the resize to the same size passes the pixels through
        assert diff.max() <= 1.01, diff.max()
    else:  # DALI's antialiased linear resize against PIL's bilinear one: [max 5, mean 0.18 measured]
        assert diff.max() <= 8 and diff.mean() < 0.4, (diff.max(), diff.mean())


@needs_dali
@pytest.mark.parametrize("per_sample", [False, True])
def test_both_backends_draw_the_same_samples_boxes_and_lambda(train32, per_sample):
    """Full recipe (CIFAR10Policy, blur, CutMix): valid batches, and the torch and DALI backends
    agree on every index, label, box decision and λ."""
    kw = dict(randaugment=True, cutmix_prob=0.5, cutmix_per_sample=per_sample)
    t, d = make(train32, "torch", **kw), make(train32, "dali", **kw)
    np.testing.assert_array_equal(t.indices(1)[0], d.indices(1)[0])
    np.testing.assert_array_equal(t.indices(1)[1], d.indices(1)[1])
    tb, db = epoch_of(t, 1), epoch_of(d, 1)
    assert len(tb) == len(db) == len(train32) // B
    for x, y in zip(tb, db):
        x.validate()
        y.validate()
        assert y.images.shape == (3 * B, 3, SIZE, SIZE)
        for name in ("label_a", "label_b", "lam", "mixed"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        # The two contrastive views are augmented independently.
        assert not torch.equal(y.view1, y.view2) and not torch.equal(x.view1, x.view2)
    assert any(bool(b.mixed.any()) for b in db) and not all(bool(b.mixed.all()) for b in db)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_across_workers_and_resumes_exactly(train32, backend):
    kw = dict(randaugment=True, cutmix_prob=0.5)
    whole = epoch_of(make(train32, backend, num_workers=1, **kw), 1)
    again = epoch_of(make(train32, backend, num_workers=2, **kw), 1)
    assert_same_batches(whole, again)
    assert_same_batches(epoch_of(make(train32, backend, **kw), 1, start_step=3), whole[3:])


@pytest.fixture()
def bad_list(train32, tmp_path):
    """The 32 px list plus a corrupt file, a truncated JPEG and a missing file, each in a class
    that has readable images too."""
    lines = [f"{train32.full_path(i)} {int(train32.labels[i])}" for i in range(len(train32))]
    (tmp_path / "corrupt.jpg").write_bytes(os.urandom(3000))
    good = Path(train32.full_path(0)).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    lines += [f"{tmp_path / n} {c}" for c, n in enumerate(("corrupt.jpg", "truncated.jpg", "missing.jpg"))]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    return LongTailedList("/", tmp_path / "train.txt")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_follow_on_error(bad_list, backend):
    n = len(bad_list)
    with pytest.raises(BadImageError, match=r"(corrupt|truncated|missing)\.jpg.*data\.on_error: skip"):
        epoch_of(make(bad_list, backend, batch_size=n, cutmix_prob=0.0))
    p = make(bad_list, backend, batch_size=n, cutmix_prob=0.0, on_error="skip")
    bg, _ = p.indices(0)
    (batch,) = list(p.epoch(0))
    st = p.stats()
    p.close()
    batch.validate()
    np.testing.assert_array_equal(batch.label_a.numpy(), bad_list.labels[bg])  # substitutes of the same class
    assert sorted(Path(m.split(" ")[0].rstrip(":")).name for m in st["skipped_files"]) == [
        "corrupt.jpg", "missing.jpg", "truncated.jpg"]


@needs_dali
def test_dali_decoder_failure_is_traced_to_the_file(train32, tmp_path):
    """A PNG cut short passes the header check and fails in DALI's decoder: traced back to the
    file with PIL, then reported (raise) or replaced on a rebuilt pipeline (skip)."""
    buf = io.BytesIO()
    with Image.open(train32.full_path(0)) as im:
        im.convert("RGB").save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:200])
    lines = [f"{train32.full_path(i)} {int(train32.labels[i])}" for i in range(len(train32))]
    (tmp_path / "list.txt").write_text("\n".join(lines + [f"{tmp_path / 'cut.png'} 0"]) + "\n")
    ds = LongTailedList("/", tmp_path / "list.txt")
    with pytest.raises(BadImageError, match="cut.png"):
        epoch_of(make(ds, "dali", batch_size=len(ds), augment=False, cutmix_prob=0.0))
    p = make(ds, "dali", batch_size=len(ds), augment=False, cutmix_prob=0.0, on_error="skip")
    (batch,) = list(p.epoch(0))
    st, builds = p.stats(), p.builds
    p.close()
    np.testing.assert_array_equal(batch.label_a.numpy(), ds.labels[p.indices(0)[0]])
    assert st["skipped_images"] == 1 and builds == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_pipeline_reads_files_under_the_cifar_recipe(jpegs32, backend):
    val = LongTailedList(jpegs32.root, jpegs32.val_list, require_all_classes=False)
    spec = ValPipelineSpec(dataset=val, recipe="cifar", image_size=SIZE, batch_size=7, num_workers=1,
                           mean=CIFAR_MEAN, std=CIFAR_STD)
    pipe = build_val_pipeline(spec, backend)
    try:
        images, labels = (torch.cat(t) for t in zip(*list(pipe)))
    finally:
        pipe.close()
    expect = torch.stack([reference_view(val.full_path(i), SIZE, CIFAR_MEAN, CIFAR_STD) for i in range(len(val))])
    np.testing.assert_array_equal(labels.numpy(), val.labels)
    assert grey_levels(images, expect).max() <= 1.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_cifar_recipe_trains_on_32px_jpegs(train32, backend):
    """The CIFAR recipe's batches from JPEG files train a ResNet-32 BCL model (the loop of
    test_pipelines_dali, conftest.loss_before_and_after_training): the loss on epoch 0's batches
    falls by a fifth over 8 epochs."""
    p = make(train32, backend, batch_size=16, randaugment=True, cutmix_prob=0.5)
    before, after = loss_before_and_after_training(p, train32)
    print(f"{backend}: loss on epoch 0's batches {before:.3f} before, {after:.3f} after 8 epochs")
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_config_with_the_cifar_recipe_runs_from_config_to_batches(jpegs32, backend):
    """``data.kind: list`` + ``augment_recipe: cifar`` is a valid config, and its datasets feed both
    pipelines (the path the trainer takes)."""
    from fastlt.config.loader import config_from_dict
    from fastlt.data.build import build_datasets
    from fastlt.pipelines import train_spec, val_spec

    cfg = config_from_dict({"data": {"kind": "list", "root": str(jpegs32.root), "train_list": str(jpegs32.train_list),
                                     "val_list": str(jpegs32.val_list), "num_classes": 6, "augment_recipe": "cifar",
                                     "image_size": SIZE, "normalization": "cifar", "eval_batch_size": 6},
                            "pipeline": {"backend": backend, "num_workers": 1}})
    data = build_datasets(cfg)
    train = build_train_pipeline(train_spec(cfg, data.train, batch_size=B), backend)
    try:
        batch = next(iter(train.epoch(0)))
    finally:
        train.close()
    batch.validate()
    assert batch.images.shape == (3 * B, 3, SIZE, SIZE)
    val = build_val_pipeline(val_spec(cfg, data.val), backend)
    try:
        images, labels = next(iter(val))
    finally:
        val.close()
    assert images.shape == (6, 3, SIZE, SIZE) and labels.shape == (6,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_folder_gives_the_batches_of_the_equivalent_list(train32, tmp_path, backend):
    """An ImageFolder-style dataset (``fastlt.data.folder.ImageFolderLT``, same interface as the
    list) of the same files in the same order gives the same CIFAR-recipe batches."""
    folder = pytest.importorskip("fastlt.data.folder", reason="fastlt.data.folder (data.kind: folder) is not here")
    for i in range(len(train32)):
        dst = tmp_path / "train" / f"class{int(train32.labels[i]):02d}" / Path(train32.paths[i]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(train32.full_path(i), dst)
    ds = folder.ImageFolderLT(tmp_path / "train")
    (tmp_path / "same.txt").write_text("".join(f"{p} {int(y)}\n" for p, y in zip(ds.paths, ds.labels)))
    listed = LongTailedList(tmp_path / "train", tmp_path / "same.txt")
    kw = dict(randaugment=True, cutmix_prob=0.5)
    assert_same_batches(epoch_of(make(ds, backend, **kw)), epoch_of(make(listed, backend, **kw)))
