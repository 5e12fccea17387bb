"""fastlt.cutmix against ARCHITECTURE §1 "CutMix"."""
import numpy as np
import pytest
import torch

from fastlt.cutmix import area_lambda, cutmix, cutmix_batch, sample_box


def test_boxes_are_clipped_and_lambda_is_area_based():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = int(rng.integers(1, 64)), int(rng.integers(1, 64))
        y0, x0, y1, x1 = sample_box(h, w, 1.0, rng)
        assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
        assert area_lambda((y0, x0, y1, x1), h, w) == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (h * w))


def test_box_size_follows_cut_ratio_before_clipping():
    # With the centre far from the borders the box is exactly (⌊H·r⌋, ⌊W·r⌋), r = √(1 − λ0), λ0 ~ U(0, 1):
    # so E[box area / image area] ≈ E[1 − λ0] = 1/2 for big images, minus what clipping removes.
    rng = np.random.default_rng(1)
    fracs = [1 - area_lambda(sample_box(1000, 1000, 1.0, rng), 1000, 1000) for _ in range(4000)]
    # Clipping at the border only shrinks boxes; unclipped the mean would be 0.5.
    assert 0.25 < np.mean(fracs) < 0.5
    assert max(fracs) > 0.8 and min(fracs) < 0.05


def test_sample_box_is_deterministic_per_generator():
    a = [sample_box(32, 48, 1.0, np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_cutmix_pastes_exactly_the_box():
    bg = torch.zeros(2, 3, 8, 10)
    fg = torch.ones(2, 3, 8, 10)
    out = cutmix(bg, fg, (2, 3, 5, 9))
    assert out[..., 2:5, 3:9].eq(1).all()
    assert out.sum().item() == 2 * 3 * 3 * 6
    assert bg.sum().item() == 0  # inputs untouched


def test_cutmix_batch_per_batch_and_per_sample():
    bg = torch.zeros(16, 3, 20, 20)
    fg = torch.ones(16, 3, 20, 20)
    res = cutmix_batch(bg, fg, prob=1.0, generator=np.random.default_rng(3))
    assert res.applied.all() and torch.unique(res.lam).numel() == 1  # one box for the batch
    pasted = res.mixed.mean(dim=(1, 2, 3))
    torch.testing.assert_close(pasted, 1 - res.lam)
    res = cutmix_batch(bg, fg, prob=0.5, per_sample=True, generator=np.random.default_rng(4))
    torch.testing.assert_close(res.mixed.mean(dim=(1, 2, 3)), 1 - res.lam)
    assert 0 < int(res.applied.sum()) < 16
    assert (res.lam[~res.applied] == 1).all()
    res = cutmix_batch(bg, fg, prob=0.0, generator=np.random.default_rng(5))
    assert not res.applied.any() and (res.lam == 1).all() and res.mixed.eq(0).all()


def test_bad_input():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        sample_box(4, 4, 0.0)
    with pytest.raises(ValueError, match="not inside"):
        area_lambda((0, 0, 5, 5), 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        cutmix(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="prob must be in"):
        cutmix_batch(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), prob=1.5)
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        sample_box(4, 4, 1.0, torch.Generator())
