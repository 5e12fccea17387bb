"""fastlt.method.cutmix and the per-step CutMix decisions against docs/design.md §1 "CutMix": the box is the reference's rand_bbox,
side 2·⌊⌊H·r⌋/2⌋ with r = √(1 − λ0) around a uniform centre, clipped to the image; λ comes from
the clipped box. (tests/test_cutmix_reference.py checks the λ distribution against an
independent copy of the reference's rule.)
"""
import copy

import numpy as np
import pytest

from fastlt.method.cutmix import area_lambda, sample_box
from fastlt.pipelines.common import cutmix_boxes


def _paste_count(box, h, w) -> int:
    """How many pixels a paste of ``box`` replaces in an h × w image (done on an actual array)."""
    canvas = np.zeros((h, w), dtype=np.int64)
    y0, x0, y1, x1 = box
    canvas[y0:y1, x0:x1] = 1
    return int(canvas.sum())


def test_unclipped_box_side_is_twice_half_the_floor_of_side_times_cut_ratio():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(3000):
        h, w = int(rng.integers(8, 300)), int(rng.integers(8, 300))
        lam0 = copy.deepcopy(rng).beta(1.0, 1.0)  # the draw sample_box is about to make
        r = np.sqrt(1.0 - lam0)
        y0, x0, y1, x1 = sample_box(h, w, 1.0, rng)
        cut_h, cut_w = 2 * (int(h * r) // 2), 2 * (int(w * r) // 2)  # rand_bbox: cx ± ⌊cut_w/2⌋
        if 0 < y0 and y1 < h and 0 < x0 and x1 < w:  # not clipped on any side
            assert (y1 - y0, x1 - x0) == (cut_h, cut_w)
            checked += 1
        else:  # clipping only ever shrinks the box, inside the image
            assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
            assert y1 - y0 <= cut_h and x1 - x0 <= cut_w
    assert checked > 300


def test_clipped_boxes_lose_exactly_what_falls_outside():
    # λ0 near 0 gives a box almost the image's size: its centre is uniform, so most boxes clip.
    rng = np.random.default_rng(1)
    clipped = 0
    for _ in range(500):
        h, w = 40, 56
        y0, x0, y1, x1 = sample_box(h, w, 0.2, rng)  # Beta(0.2, 0.2): many big and many tiny boxes
        lam = area_lambda((y0, x0, y1, x1), h, w)
        # λ is the share of the canvas that keeps the background after an actual paste.
        assert lam == pytest.approx(1 - _paste_count((y0, x0, y1, x1), h, w) / (h * w))
        clipped += y0 == 0 or x0 == 0 or y1 == h or x1 == w
    assert clipped > 100


def test_box_centres_cover_the_whole_image():
    rng = np.random.default_rng(2)
    boxes = [sample_box(32, 32, 1.0, rng) for _ in range(4000)]
    touches = {"top": any(b.y0 == 0 for b in boxes), "left": any(b.x0 == 0 for b in boxes),
               "bottom": any(b.y1 == 32 for b in boxes), "right": any(b.x1 == 32 for b in boxes)}
    assert all(touches.values()), touches
    # E[box area] over Beta(1, 1) is 1/2 of the image before clipping; clipping takes some away.
    frac = np.mean([_paste_count(b, 32, 32) / 32 ** 2 for b in boxes])
    assert 0.25 < frac < 0.5


def test_per_batch_decision_is_one_coin_and_one_box_per_step():
    mixed_steps = 0
    for step in range(60):
        boxes, lam, applied = cutmix_boxes(0, 0, step, range(step * 16, step * 16 + 16), 24, 24, prob=0.5,
                                           per_sample=False)
        assert applied.all() or not applied.any()
        if applied.any():
            mixed_steps += 1
            assert (boxes == boxes[0]).all() and np.unique(lam).size == 1
            assert lam[0] == pytest.approx(1 - _paste_count(tuple(boxes[0]), 24, 24) / 24 ** 2)
        else:
            assert (lam == 1).all() and (boxes == 0).all()
        # Every rank's share of the global step sees the same coin and box.
        half = cutmix_boxes(0, 0, step, range(step * 16 + 8, step * 16 + 16), 24, 24, prob=0.5, per_sample=False)
        assert (half[0] == boxes[8:]).all() and (half[2] == applied[8:]).all()
    assert 15 < mixed_steps < 45  # cutmix_prob 0.5


def test_per_sample_decisions_and_one_sample_lookup_agree():
    positions = range(160, 192)  # global step 5 of 32 samples
    boxes, lam, applied = cutmix_boxes(3, 1, 5, positions, 24, 24, prob=0.5, per_sample=True)
    assert 4 < int(applied.sum()) < 28
    assert (lam[~applied] == 1).all()
    for i, p in enumerate(positions):  # what a per-sample source computes for one sample alone
        b1, l1, a1 = cutmix_boxes(3, 1, 5, [p], 24, 24, prob=0.5, per_sample=True)
        assert (b1[0] == boxes[i]).all() and l1[0] == lam[i] and a1[0] == applied[i]
        if applied[i]:
            assert lam[i] == pytest.approx(1 - _paste_count(tuple(boxes[i]), 24, 24) / 24 ** 2)


def test_bad_input():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        sample_box(4, 4, 0.0)
    with pytest.raises(ValueError, match="image size must be positive"):
        sample_box(0, 4)
    with pytest.raises(ValueError, match="not inside"):
        area_lambda((0, 0, 5, 5), 4, 4)
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        sample_box(4, 4, 1.0, object())
