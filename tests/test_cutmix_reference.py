"""CutMix's box and λ equal the reference's rule (``rand_bbox`` in ConCutMix's main.py):
λ0 ~ Beta(1, 1), r = √(1 − λ0), centre uniform over the pixels, box ``cx ± cut // 2`` with
``cut = int(S · r)``, clipped; λ = 1 − clipped area / S².

Three checks at 32 px (CIFAR) and 224 px (ImageNet-size):

* draw for draw: ``sample_box`` fed the same random numbers as an independent transcription of
  the rule returns the same box;
* the exact distribution of λ under the rule (enumerated: P(cut = c) = ((c+1)² − c²)/S² for
  Beta(1, 1), then every centre) against many ``sample_box`` draws — the mean area label and
  the Kolmogorov–Smirnov distance; at 32 px the mean also rules out the old box side ⌊S·r⌋;
* every box that is not clipped has even sides (the old rule gave odd sides half the time);
* both pipeline backends take their boxes from ``cutmix_boxes``, which draws with ``sample_box``.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from fastlt.method.cutmix import area_lambda, sample_box
from fastlt.pipelines import common


def _reference_box(size: int, lam0: float, c_row: int, c_col: int):
    """rand_bbox of the reference, transcribed: (rows, cols) = (size[2], size[3]); the first
    centre draw is the row's. Returns (y0, x0, y1, x1)."""
    cut = int(size * np.sqrt(1.0 - lam0))
    r0, r1 = np.clip(c_row - cut // 2, 0, size), np.clip(c_row + cut // 2, 0, size)
    c0, c1 = np.clip(c_col - cut // 2, 0, size), np.clip(c_col + cut // 2, 0, size)
    return int(r0), int(c0), int(r1), int(c1)


def _exact_lambda_pmf(size: int, even_side: bool):
    """(λ values, probabilities) of the area label under Beta(1, 1), enumerated exactly.
    ``even_side``: the reference's side 2·⌊cut/2⌋; otherwise the old side ``cut``."""
    pmf = np.zeros(size * size + 1)
    centres = np.arange(size)
    for cut in range(size):  # cut = size needs λ0 = 0 exactly: probability 0
        p_cut = ((cut + 1) ** 2 - cut ** 2) / size ** 2
        lo = centres - cut // 2
        hi = centres + cut // 2 if even_side else lo + cut
        length = np.minimum(hi, size) - np.maximum(lo, 0)  # clipped side for every centre
        area = np.outer(length, length).ravel()  # row and column centres are independent
        pmf += p_cut * np.bincount(area, minlength=size * size + 1) / size ** 2
    return 1.0 - np.arange(size * size + 1) / size ** 2, pmf


@pytest.mark.parametrize("size", [32, 224])
def test_sample_box_is_the_reference_rule_draw_for_draw(size):
    rng = np.random.default_rng(size)
    for _ in range(3000):
        twin = copy.deepcopy(rng)  # the same three numbers sample_box is about to draw
        lam0, c_row, c_col = twin.beta(1.0, 1.0), int(twin.integers(size)), int(twin.integers(size))
        assert tuple(sample_box(size, size, 1.0, rng)) == _reference_box(size, lam0, c_row, c_col)


@pytest.mark.parametrize("size, draws", [(32, 100_000), (224, 40_000)])
def test_lambda_distribution_is_the_reference_rules(size, draws):
    values, pmf = _exact_lambda_pmf(size, even_side=True)
    exact_mean = float((values * pmf).sum())
    rng = np.random.default_rng(11)
    lam = np.array([area_lambda(sample_box(size, size, 1.0, rng), size, size) for _ in range(draws)])
    # The sample mean of `draws` i.i.d. λ has standard error σ/√draws; 4.5 standard errors is a
    # bound a correct rule exceeds with probability < 1e-5 (the draws are seeded: deterministic).
    sigma = float(np.sqrt((pmf * (values - exact_mean) ** 2).sum()))
    tol = 4.5 * sigma / np.sqrt(draws)
    assert abs(lam.mean() - exact_mean) < tol, (lam.mean(), exact_mean, tol)
    # Kolmogorov–Smirnov distance to the exact CDF; 1.95/√n is the 0.1 % critical value.
    order = np.argsort(values)
    cdf = np.cumsum(pmf[order])
    emp = np.searchsorted(np.sort(lam), values[order], side="right") / draws
    assert np.abs(emp - cdf).max() < 1.95 / np.sqrt(draws)
    if size == 32:
        # The two rules' exact means differ by 0.011 at 32 px (0.7007 vs 0.6898), over 10 standard
        # errors at 100k draws: the old side ⌊S·r⌋ is rejected by the same test.
        old_values, old_pmf = _exact_lambda_pmf(size, even_side=False)
        old_mean = float((old_values * old_pmf).sum())
        assert exact_mean == pytest.approx(0.70075, abs=5e-5) and old_mean == pytest.approx(0.68977, abs=5e-5)
        assert abs(lam.mean() - old_mean) > 2 * tol


@pytest.mark.parametrize("size", [32, 224])
def test_unclipped_boxes_have_even_sides(size):
    rng = np.random.default_rng(5)
    unclipped = 0
    for _ in range(4000):
        y0, x0, y1, x1 = sample_box(size, size, 1.0, rng)
        if 0 < y0 and y1 < size and 0 < x0 and x1 < size:
            unclipped += 1
            assert (y1 - y0) % 2 == 0 and (x1 - x0) % 2 == 0 and y1 - y0 == x1 - x0
        assert area_lambda((y0, x0, y1, x1), size, size) == 1 - (y1 - y0) * (x1 - x0) / size ** 2
    assert unclipped > 400


def test_the_pipelines_draw_their_boxes_with_sample_box(monkeypatch):
    # cutmix_boxes (what the torch loader and the DALI sources call) must not hold a copy of
    # the rule: replacing sample_box there changes its boxes.
    boxes, _, _ = common.cutmix_boxes(0, 0, 0, range(8), 32, 32, prob=1.0, per_sample=True)
    monkeypatch.setattr(common, "sample_box", lambda h, w, alpha, rng: (0, 0, 2, 2))
    swapped, lam, _ = common.cutmix_boxes(0, 0, 0, range(8), 32, 32, prob=1.0, per_sample=True)
    assert (swapped == [0, 0, 2, 2]).all() and not (boxes == swapped).all()
    assert np.allclose(lam, 1 - 4 / 32 ** 2)
    import fastlt.pipelines.dali_sources as dali_sources
    import fastlt.pipelines.torch_loader as torch_loader
    assert torch_loader.cutmix_boxes is common.cutmix_boxes and dali_sources.cutmix_boxes is common.cutmix_boxes
