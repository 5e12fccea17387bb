"""fastlt.method.losses against docs/design.md §1 "Losses", written out in the tests."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastlt.method.labels import area_label
from fastlt.method.losses import BalancedSupConLoss, LogitAdjustedCrossEntropy
from spec_formulas import loop_balanced_supcon


def _normed(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# B = 1 (only the two views and the center are positives), repeated classes, classes absent from the batch.
@pytest.mark.parametrize("b,c,d,temp", [(1, 3, 4, 0.1), (6, 4, 8, 0.07), (10, 15, 16, 0.1)])
def test_bcl_matches_loop_over_anchors(b, c, d, temp):
    centers = _normed(c, d, seed=1)
    feats = _normed(b, 2, d, seed=2)
    labels = torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(3))
    got = BalancedSupConLoss(torch.ones(c), temp)(centers, feats, labels)
    want = loop_balanced_supcon(centers, feats, labels, temp)
    assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-9)


def test_bcl_gradients_match_loop_and_are_finite():
    centers = _normed(5, 8, seed=4).requires_grad_(True)
    feats = _normed(6, 2, 8, seed=5).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 3, 3, 3])
    loss = BalancedSupConLoss(torch.ones(5), 0.1)(centers, feats, labels)
    g_c, g_f = torch.autograd.grad(loss, (centers, feats))
    ref = loop_balanced_supcon(centers, feats, labels, 0.1)
    r_c, r_f = torch.autograd.grad(ref, (centers, feats))
    assert torch.isfinite(g_c).all() and torch.isfinite(g_f).all()
    torch.testing.assert_close(g_c, r_c)
    torch.testing.assert_close(g_f, r_f)


def test_bcl_low_temperature_stays_finite():
    centers = _normed(4, 8, seed=6, dtype=torch.float32)
    feats = _normed(8, 2, 8, seed=7, dtype=torch.float32)
    loss = BalancedSupConLoss(torch.ones(4), 0.01)(centers, feats, torch.arange(8) % 4)
    assert torch.isfinite(loss)


def test_bcl_bad_input():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        BalancedSupConLoss(torch.ones(3), 0.0)
    loss = BalancedSupConLoss(torch.ones(3), 0.1)
    with pytest.raises(ValueError, match=r"features must be \(B, 2, D\)"):
        loss(_normed(3, 4), _normed(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"centers must be \(3, 4\)"):
        loss(_normed(2, 4), _normed(5, 2, 4), torch.zeros(5, dtype=torch.long))


def test_la_ce_hard_target_is_ce_of_adjusted_logits():
    counts = torch.tensor([500, 50, 5])
    tau = 0.99
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2, 1, 2])
    got = LogitAdjustedCrossEntropy(counts, tau)(logits, target)
    prior = counts.double() / counts.sum()
    adjusted = logits.double() + tau * torch.log(prior)
    want = -sum(adjusted[i, target[i]] - torch.logsumexp(adjusted[i], 0) for i in range(4)) / 4
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_la_ce_soft_target_and_area_label_equivalence():
    """Soft CE on the area label equals λ·CE(a) + (1−λ)·CE(b) (the warm-up loss of §1)."""
    counts = torch.tensor([300, 120, 40, 9, 2])
    loss = LogitAdjustedCrossEntropy(counts, 1.0)
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    a = torch.tensor([0, 1, 2, 3, 4, 0])
    b = torch.tensor([4, 3, 2, 1, 0, 0])
    lam = torch.tensor([0.1, 0.5, 0.9, 1.0, 0.0, 0.3])
    # The area label written out: λ on class a, 1 − λ on class b (both on a when a == b).
    y = torch.zeros(6, 5)
    for i in range(6):
        y[i, a[i]] += lam[i]
        y[i, b[i]] += 1 - lam[i]
    torch.testing.assert_close(area_label(a, b, lam, 5), y)
    soft = loss(logits, y)
    adj = logits + torch.log(counts / counts.sum())
    per = lam * F.cross_entropy(adj, a, reduction="none") + (1 - lam) * F.cross_entropy(adj, b, reduction="none")
    torch.testing.assert_close(soft, per.mean())
    (g,) = torch.autograd.grad(soft, logits)
    assert torch.isfinite(g).all()
    # d/dx of soft CE is (softmax(x + τ log π) − y) / B
    torch.testing.assert_close(g, (torch.softmax(adj, 1) - y).detach() / 6)


def test_la_ce_rejects_bad_input():
    with pytest.raises(ValueError, match="classes \\[1\\] have none"):
        LogitAdjustedCrossEntropy([10, 0, 3], 1.0)
    loss = LogitAdjustedCrossEntropy([10, 5, 3], 1.0)
    with pytest.raises(ValueError, match=r"logits must be \(B, 3\)"):
        loss(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target must be class indices"):
        loss(torch.randn(2, 3), torch.rand(2, 4))


def test_la_ce_tau_zero_is_plain_ce():
    logits = torch.randn(3, 4)
    target = torch.tensor([0, 3, 1])
    got = LogitAdjustedCrossEntropy([100, 10, 5, 1], 0.0)(logits, target)
    assert got.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    assert math.isfinite(got.item())
