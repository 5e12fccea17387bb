"""The DALI pipelines in CPU mode (DALI ``device_id=None``) against the pipeline contract:
shapes and dtypes; with augmentation off the pasted region is the foreground and the rest
the background, λ = 1 − box area/(H·W) exactly; the background stream covers each index
once per epoch and the foreground classes are uniform (chi-square); same seed, same
batches (also across DALI thread/worker counts and a resumed epoch), different ranks,
different batches; corrupt, truncated and missing files under ``raise`` and ``skip``; the
validation pipeline; and a short DALI-fed training run that lowers the loss.

Expected values are computed here independently (PIL for pixels, the spec's formulas for
λ and the class histograms). GPU (``mixed`` nvJPEG) cases skip without CUDA.
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

pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install nvidia-dali-cuda130)")

from scipy.stats import chisquare  # noqa: E402

from fastlt.data import ArrayDataset, LongTailedList, make_synthetic_lt  # noqa: E402
from fastlt.pipelines import (IMAGENET_MEAN, IMAGENET_STD, TrainPipelineSpec, ValPipelineSpec,  # noqa: E402
                              build_train_pipeline, build_val_pipeline, select_backend)
from conftest import assert_dataset_checks, loss_before_and_after_training, assert_same_batches, pasted_box, reference_view
from fastlt.pipelines.common import BadImageError  # noqa: E402

SIZE = 32
B = 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_lt(tmp_path_factory.mktemp("synth_dali"), num_classes=6, imb_factor=0.2, n_max=24,
                             image_size=48, seed=5, n_val=3)


@pytest.fixture(scope="module")
def train_ds(synth):
    return LongTailedList(synth.root, synth.train_list)


def make(ds, **kw):
    args = dict(dataset=ds, image_size=SIZE, batch_size=B, num_workers=2, seed=11, randaugment=False)
    args.update(kw)
    return build_train_pipeline(TrainPipelineSpec(**args), "dali")


def run_epoch(p, epoch=0, start_step=0):
    return list(p.epoch(epoch, start_step))


def test_backend_is_dali_when_installed(monkeypatch):
    monkeypatch.delenv("FASTLT_PIPELINE", raising=False)
    assert select_backend("auto") == "dali"  # this module runs only where DALI imports
    assert select_backend("dali") == "dali" and select_backend("torch") == "torch"
    monkeypatch.setenv("FASTLT_PIPELINE", "torch")  # the environment overrides auto only
    assert select_backend("auto") == "torch" and select_backend("dali") == "dali"


@pytest.fixture(scope="module")
def full_recipe(train_ds):
    """The full ImageNet-style recipe (RandAugment n=2 m=10 on view 0 and the foreground)."""
    p = make(train_ds, randaugment=True, cutmix_prob=0.5)
    epochs = [run_epoch(p, 0), run_epoch(p, 1)]
    yield p, epochs
    p.close()


def test_full_recipe_shapes_dtypes_and_epochs(full_recipe, train_ds):
    p, (e0, e1) = full_recipe
    assert p.steps_per_epoch == len(train_ds) // B
    assert len(e0) == len(e1) == p.steps_per_epoch
    for b in e0 + e1:
        b.validate()
        for name in ("image", "view1", "view2"):
            t = getattr(b, name)
            assert t.shape == (B, 3, SIZE, SIZE) and t.dtype == torch.float32 and t.device.type == "cpu"
            assert torch.isfinite(t).all()
        assert torch.equal(b.label_b[~b.mixed], b.label_a[~b.mixed])
        assert torch.all(b.lam[~b.mixed] == 1.0) and torch.all((b.lam[b.mixed] > 0) & (b.lam[b.mixed] <= 1))
    # The views of one image differ (independent random crops) and epochs differ.
    assert not torch.equal(e0[0].view1, e0[0].view2)
    assert not torch.equal(e0[0].image, e1[0].image)
    # Epoch 1 followed epoch 0 on the same DALI pipeline (no rebuild), labels follow the stream.
    assert p.builds == 1
    bg, _ = p.indices(1)
    np.testing.assert_array_equal(torch.cat([b.label_a for b in e1]).numpy(), train_ds.labels[bg[:len(e1) * B]])


def test_full_recipe_is_deterministic_and_resumable(full_recipe, train_ds):
    p, (e0, _) = full_recipe
    # Another pipeline with other DALI thread / reader-process counts gives the same batches:
    # every random parameter is keyed by (seed, epoch, rank, sample), none comes from DALI.
    q = make(train_ds, randaugment=True, cutmix_prob=0.5, num_workers=1, extra={"py_num_workers": 2})
    try:
        assert_same_batches(run_epoch(q, 0), e0)
        # Resume mid-epoch on a rebuilt pipeline: the rest of the epoch is identical.
        assert_same_batches(run_epoch(q, 0, start_step=2), e0[2:])
        assert q.builds == 2
    finally:
        q.close()


def test_ranks_and_seeds_differ(train_ds):
    r0, r1, s2 = (make(train_ds, rank=0, world_size=2), make(train_ds, rank=1, world_size=2),
                  make(train_ds, rank=0, world_size=2, seed=12))
    try:
        b0, b1, b2 = (next(iter(p.epoch(0))) for p in (r0, r1, s2))
        assert not torch.equal(b0.view1, b1.view1) and not torch.equal(b0.view1, b2.view1)
        bg0, fg0 = r0.indices(0)
        bg1, fg1 = r1.indices(0)
        assert len(set(bg0.tolist()) & set(bg1.tolist())) <= 1  # disjoint shards up to wrap-around padding
        assert not np.array_equal(fg0, fg1)
    finally:
        for p in (r0, r1, s2):
            p.close()


@pytest.mark.parametrize("per_sample", [False, True])
def test_cutmix_region_is_foreground_and_lambda_is_exact(train_ds, per_sample):
    p = make(train_ds, augment=False, cutmix_prob=1.0, cutmix_per_sample=per_sample, extra={"with_foreground": True})
    try:
        batches = run_epoch(p, 0)
        bg, fg = p.indices(0)
    finally:
        p.close()
    boxes = []
    for step, b in enumerate(batches):
        assert b.mixed.all()
        for i in range(B):
            pos = step * B + i
            # With augmentation off, views 1/2 are the background resized (DALI's resampling is
            # not PIL's: close, not equal) and the foreground view is the foreground resized.
            assert torch.equal(b.view1[i], b.view2[i])
            assert (b.view1[i] - reference_view(train_ds.full_path(int(bg[pos])), SIZE)).abs().mean() < 0.02
            assert (b.foreground[i] - reference_view(train_ds.full_path(int(fg[pos])), SIZE)).abs().mean() < 0.02
            assert b.label_a[i] == train_ds.labels[bg[pos]] and b.label_b[i] == train_ds.labels[fg[pos]]
            if bg[pos] == fg[pos]:
                assert torch.equal(b.image[i], b.view1[i])
                continue
            box = pasted_box(b.image[i], b.view1[i])
            if box is None:
                assert b.lam[i] == 1.0
                continue
            y0, x0, y1, x1 = box
            inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert torch.equal(b.image[i][:, inside], b.foreground[i][:, inside])
            assert torch.equal(b.image[i][:, ~inside], b.view1[i][:, ~inside])
            assert b.lam[i].item() == np.float32(1.0 - (y1 - y0) * (x1 - x0) / float(SIZE * SIZE))
            boxes.append((step, box))
    assert len(boxes) >= 5
    per_step = {}
    for step, box in boxes:
        per_step.setdefault(step, set()).add(box)
    if per_sample:
        assert any(len(s) > 1 for s in per_step.values())
    else:
        assert all(len(s) == 1 for s in per_step.values())


def test_same_streams_and_cutmix_as_the_torch_backend(train_ds):
    spec = dict(dataset=train_ds, image_size=SIZE, batch_size=B, num_workers=0, seed=3, augment=False,
                cutmix_prob=0.5)
    d = build_train_pipeline(TrainPipelineSpec(**spec), "dali")
    t = build_train_pipeline(TrainPipelineSpec(**spec), "torch")
    try:
        dali_epoch, torch_epoch = run_epoch(d, 2), run_epoch(t, 2)
        # Both yield the whole epoch (drop_last: len(train_ds) // B steps), or zip would hide one ending early.
        assert len(dali_epoch) == len(torch_epoch) == len(train_ds) // B > 0
        for x, y in zip(dali_epoch, torch_epoch):
            for name in ("label_a", "label_b", "lam", "mixed"):
                assert torch.equal(getattr(x, name), getattr(y, name)), name
            assert (x.image - y.image).abs().mean() < 0.02
    finally:
        d.close()


@pytest.fixture(scope="module")
def tiny_arrays():
    """2,000 8×8 'CIFAR-like' images over 10 long-tailed classes (many draws, cheap pixels)."""
    rng = np.random.default_rng(0)
    counts = np.array([600, 400, 300, 200, 150, 120, 100, 60, 40, 30])
    labels = np.repeat(np.arange(10), counts).astype(np.int64)
    images = rng.integers(0, 256, size=(len(labels), 8, 8, 3), dtype=np.uint8)
    return ArrayDataset(images=images, labels=labels, class_counts=counts, num_classes=10)


def test_background_covers_each_image_once_and_foreground_is_balanced(tiny_arrays):
    p = make(tiny_arrays, recipe="cifar", image_size=8, batch_size=100, augment=False, cutmix_prob=1.0,
             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    try:
        batches = run_epoch(p, 0)
        bg, _ = p.indices(0)
    finally:
        p.close()
    assert len(batches) == 20
    label_a = torch.cat([b.label_a for b in batches]).numpy()
    label_b = torch.cat([b.label_b for b in batches]).numpy()
    # Uniform background stream: every image exactly once, so the classes come in their counts.
    assert sorted(bg.tolist()) == list(range(len(tiny_arrays)))
    np.testing.assert_array_equal(np.bincount(label_a, minlength=10), tiny_arrays.class_counts)
    # The images are the arrays themselves (8 px in, 8 px out, no resampling) in stream order.
    images = torch.cat([b.view1 for b in batches])
    expect = (torch.from_numpy(tiny_arrays.images[bg]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(images, expect)
    # Balanced foreground stream: classes uniform (chi-square against 1/C each).
    hist = np.bincount(label_b, minlength=10)
    assert chisquare(hist).pvalue > 1e-3, hist


def test_cifar_recipe_with_autoaugment_and_blur(tiny_arrays):
    rng = np.random.default_rng(1)
    labels = tiny_arrays.labels[::20]
    ds = ArrayDataset(images=rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels=labels,
                      class_counts=np.bincount(labels, minlength=10), num_classes=10)
    p = make(ds, recipe="cifar", randaugment=True, batch_size=20, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    try:
        batches = run_epoch(p, 0)
    finally:
        p.close()
    assert len(batches) == len(ds) // 20
    for b in batches:
        b.validate()
        assert b.image.shape == (20, 3, 32, 32)
    # The pad-crop view keeps whole source rows/columns somewhere; the views are not the input.
    b = batches[0]
    assert not torch.equal(b.view1, b.view2)


def test_start_step_resumes_exactly_and_does_not_rebuild_between_epochs(train_ds):
    p = make(train_ds, cutmix_prob=0.5)
    try:
        e0 = run_epoch(p, 0)
        assert_same_batches(run_epoch(p, 0, start_step=3), e0[3:])  # not the continuation: rebuilt
        assert p.builds == 2
        e1 = run_epoch(p, 1)  # the continuation: same pipeline
        assert p.builds == 2
        assert run_epoch(p, 1, start_step=p.steps_per_epoch) == []
        with pytest.raises(ValueError, match="start_step"):
            run_epoch(p, 1, start_step=p.steps_per_epoch + 1)
        # Abandoning an epoch half-way is safe: the next epoch is still exact.
        it = p.epoch(2)
        next(it)
        it.close()
        assert_same_batches(run_epoch(p, 1), e1)
    finally:
        p.close()


@pytest.fixture()
def bad_list(synth, tmp_path):
    """The synthetic list plus a corrupt file, a truncated JPEG and a missing file, each in a
    class that has readable images too."""
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
    for other in {"corrupt.jpg", "truncated.jpg", "missing.jpg"} - {name}:
        shutil.copyfile(bad_list.full_path(0), Path(bad_list.root) / other)
    p = make(bad_list, batch_size=len(bad_list), augment=False, cutmix_prob=0.0)
    try:
        with pytest.raises(BadImageError, match=name):
            run_epoch(p, 0)
    finally:
        p.close()


def test_bad_input_skip_substitutes_same_class_and_counts(bad_list):
    p = make(bad_list, batch_size=len(bad_list), on_error="skip", cutmix_prob=0.0)
    try:
        (batch,) = run_epoch(p, 0)
        bg, _ = p.indices(0)
        st = p.stats()
    finally:
        p.close()
    np.testing.assert_array_equal(batch.label_a.numpy(), bad_list.labels[bg])
    assert st["skipped_images"] == 3
    assert sorted(Path(n.split(" ")[0]).name for n in st["skipped_files"]) == [
        "corrupt.jpg", "missing.jpg", "truncated.jpg"]


@pytest.fixture()
def undecodable_list(synth, tmp_path):
    """A PNG cut short: its header parses (so the reader passes it on), but the decoder fails
    inside the DALI graph, where the file name is no longer known."""
    src = LongTailedList(synth.root, synth.train_list)
    buf = io.BytesIO()
    with Image.open(src.full_path(0)) as im:
        im.convert("RGB").save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:200])
    lines = [f"{src.full_path(i)} {int(src.labels[i])}" for i in range(len(src))] + [f"{tmp_path / 'cut.png'} 0"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return LongTailedList("/", tmp_path / "list.txt")


def test_decoder_failure_is_traced_to_the_file(undecodable_list):
    ds = undecodable_list
    p = make(ds, batch_size=len(ds) // 2, augment=False, cutmix_prob=0.0)
    try:
        with pytest.raises(BadImageError, match="cut.png"):
            run_epoch(p, 0)
    finally:
        p.close()
    p = make(ds, batch_size=len(ds) // 2, augment=False, cutmix_prob=0.0, on_error="skip")
    try:
        batches = run_epoch(p, 0)
        bg, _ = p.indices(0)
        st = p.stats()
    finally:
        p.close()
    assert len(batches) == 2
    np.testing.assert_array_equal(torch.cat([b.label_a for b in batches]).numpy(), ds.labels[bg])
    used = (len(ds) - 1) in bg.tolist()  # bg holds whole batches only
    # The decoder failure made the pipeline trace the file and rebuild once at the failing step.
    assert st["skipped_images"] == int(used) and p.builds == 1 + int(used)


def test_val_shards_without_padding_and_centre_crops(synth):
    val = LongTailedList(synth.root, synth.val_list, require_all_classes=False)
    counts = []
    for rank in range(3):
        p = build_val_pipeline(ValPipelineSpec(dataset=val, image_size=SIZE, batch_size=4, rank=rank, world_size=3),
                               "dali")
        try:
            passes = []
            for _ in range(2):  # iterating again is another identical pass
                got = [(x, y) for x, y in p]
                for x, y in got:
                    assert x.shape[1:] == (3, SIZE, SIZE) and x.dtype == torch.float32 and y.dtype == torch.int64
                passes.append(got)
            assert len(passes[0]) == len(passes[1]) > 0
            assert all(torch.equal(a[0], b[0]) for a, b in zip(*passes))
            labels = torch.cat([y for _, y in passes[0]]).numpy()
            np.testing.assert_array_equal(labels, val.labels[rank::3])
            counts.append(len(labels))
        finally:
            p.close()
    assert sum(counts) == len(val)
    # Shorter side to round(SIZE·256/224), centre crop SIZE — written out with PIL.
    p = build_val_pipeline(ValPipelineSpec(dataset=val, image_size=SIZE, batch_size=2), "dali")
    try:
        images, _ = next(iter(p))
    finally:
        p.close()
    with Image.open(val.full_path(0)) as im:
        im = im.convert("RGB")
        w, h = im.size
        short = round(SIZE * 256 / 224)
        nw, nh = (short, round(h * short / w)) if w <= h else (round(w * short / h), short)
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - SIZE) // 2, (nh - SIZE) // 2
        arr = np.asarray(im.crop((left, top, left + SIZE, top + SIZE)), np.float32) / 255.0
    ref = (arr - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    assert (images[0] - torch.from_numpy(ref).permute(2, 0, 1)).abs().mean() < 0.03


def test_val_bad_input(bad_list):
    p = build_val_pipeline(ValPipelineSpec(dataset=bad_list, image_size=SIZE, batch_size=8, on_error="skip"), "dali")
    try:
        total = sum(len(y) for _, y in p)
        assert total == len(bad_list) - 3 and p.stats()["skipped_images"] == 3
    finally:
        p.close()
    p = build_val_pipeline(ValPipelineSpec(dataset=bad_list, image_size=SIZE, batch_size=8), "dali")
    try:
        with pytest.raises(BadImageError, match="corrupt.jpg|truncated.jpg|missing.jpg"):
            list(p)
    finally:
        p.close()


def test_bad_arguments(train_ds):
    # The CIFAR recipe takes files as well as arrays (tests/test_pipelines_cifar_files.py).
    assert_dataset_checks(make, train_ds)
    with pytest.raises(ValueError, match="py_start_method must be 'fork' or 'spawn'"):
        make(train_ds, extra={"py_start_method": "forkserver"})
    with pytest.raises(ValueError, match="did you mean 'py_num_workers'"):
        make(train_ds, extra={"py_num_worker": 2})
    p = make(train_ds)
    try:
        with pytest.raises(ValueError, match="epoch"):
            run_epoch(p, -1)
    finally:
        p.close()


def test_short_dali_fed_training_run_lowers_the_loss(synth, train_ds):
    """A ResNet-32 BCL model fed by the DALI pipeline with augmentation learns
    (conftest.loss_before_and_after_training): the loss on epoch 0's batches falls by a fifth
    over 8 epochs."""
    p = make(train_ds, batch_size=16, cutmix_prob=0.5)
    before, after = loss_before_and_after_training(p, train_ds)
    print(f"loss on epoch 0's batches: {before:.3f} before, {after:.3f} after 8 epochs")
    assert after < 0.8 * before, (before, after)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed (nvJPEG) decoding needs a CUDA GPU; none here")
def test_gpu_mixed_decode_produces_cuda_batches(train_ds):
    p = make(train_ds, randaugment=True, device="cuda")
    try:
        b = next(iter(p.epoch(0)))
        b.validate()
        assert b.image.device.type == "cuda" and b.label_a.device.type == "cuda"
    finally:
        p.close()
