"""fastlt.method.labels against the literal B×C×D formulation of docs/design.md §1 (tests/spec_formulas.py)."""
import math

import pytest
import torch

from fastlt.method.labels import area_label, confidence, rectify_labels
from spec_formulas import dense_rectify_labels


def _inputs(b, c, d, seed, lam=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g).to(dtype)
    centers = torch.randn(c, d, generator=g).to(dtype)
    label_a = torch.randint(0, c, (b,), generator=g)
    label_b = torch.randint(0, c, (b,), generator=g)
    lam_t = torch.rand(b, generator=g) if lam is None else torch.full((b,), float(lam))
    counts = torch.randint(1, 500, (c,), generator=g)
    return z, centers, label_a, label_b, lam_t, counts


def _compare(got, want, atol=1e-5, rtol=1e-4):
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        pytest.fail(f"{int(bad.sum())} of {bad.numel()} elements differ; first at {idx}: "
                    f"got {[got[i, j].item() for i, j in idx]} want {[want[i, j].item() for i, j in idx]}")


# Shapes: tiny C with K > C (K clipped to C), K = 1, mid C with the ImageNet K = 30, and K = C exactly.
@pytest.mark.parametrize("b,c,d,k", [(1, 3, 8, 30), (7, 10, 16, 1), (16, 100, 32, 30), (5, 12, 4, 12),
                                     (33, 57, 64, 3)])
@pytest.mark.parametrize("normalize", ["l1", "softmax"])
def test_matches_dense_formulation(b, c, d, k, normalize):
    z, centers, a, bb, lam, counts = _inputs(b, c, d, seed=b * 1000 + c)
    kw = dict(topk=k, omega=200 / 255, normalize=normalize, temperature=0.5)
    got = rectify_labels(z, centers, a, bb, lam, counts, **kw)
    want = dense_rectify_labels(z, centers, a, bb, lam, counts, **kw)
    assert got.dtype == torch.float32 and got.shape == (b, c)
    _compare(got, want)
    torch.testing.assert_close(got.sum(1), torch.ones(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_lambda_extremes_use_one_class(lam):
    """λ = 1 keeps only the background class in y, λ = 0 only the foreground class."""
    z, centers, a, bb, lam_t, counts = _inputs(6, 20, 8, seed=3, lam=lam)
    kw = dict(topk=5, omega=1628 / 255)
    got = rectify_labels(z, centers, a, bb, lam_t, counts, **kw)
    _compare(got, dense_rectify_labels(z, centers, a, bb, lam_t, counts, **kw))
    kept = a if lam == 1.0 else bb
    gamma = 1628 / 255 * torch.log(counts[kept].double()) / torch.log(counts.double()).sum()
    # ŷ at the kept class is at least (1 − γ): the area label is one-hot there.
    assert torch.all(got[torch.arange(6), kept] >= (1 - gamma).float() - 1e-6)


def test_ties_break_towards_lower_class_index():
    # Centers 2, 5 and 7 are identical copies, so their similarities tie exactly; with K = 2
    # and z closest to that copy, classes 2 and 5 must be kept and 7 dropped.
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(9, 16, generator=g) * 5
    centers[5] = centers[2]
    centers[7] = centers[2]
    z = centers[2:3].repeat(4, 1) + 0.01 * torch.randn(4, 16, generator=g)
    a = torch.tensor([0, 1, 3, 4])
    lam = torch.full((4,), 0.6)
    counts = torch.arange(10, 19)
    kw = dict(topk=2, omega=2.0)
    got = rectify_labels(z, centers, a, a, lam, counts, **kw)
    _compare(got, dense_rectify_labels(z, centers, a, a, lam, counts, **kw))
    y = area_label(a, a, lam, 9)
    s_hat_part = got - (1 - confidence(y, counts, 2.0)).unsqueeze(1) * y
    assert torch.all(s_hat_part[:, 2] > 0) and torch.all(s_hat_part[:, 5] > 0)
    torch.testing.assert_close(s_hat_part[:, 7], torch.zeros(4), atol=1e-7, rtol=0)


def test_same_classes_give_onehot_area_label():
    y = area_label(torch.tensor([3]), torch.tensor([3]), torch.tensor([0.3]), 5)
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]]))


def test_confidence_matches_formula_and_is_small_with_published_omega():
    counts = torch.tensor([1280, 300, 40, 5] + [20] * 996)
    y = area_label(torch.tensor([0]), torch.tensor([3]), torch.tensor([0.75]), 1000)
    gamma = confidence(y, counts, 200 / 255).item()
    want = 200 / 255 * math.log(0.75 * 1280 + 0.25 * 5) / sum(math.log(n) for n in counts.tolist())
    assert gamma == pytest.approx(want, rel=1e-6)
    assert 1e-4 < gamma < 1e-2  # docs/design.md §1: γ is of the order of 1e-3 with the published ω


def test_no_gradient_flows_and_low_precision_inputs():
    z, centers, a, bb, lam, counts = _inputs(4, 10, 8, seed=1)
    z.requires_grad_(True)
    centers.requires_grad_(True)
    out = rectify_labels(z, centers, a, bb, lam, counts, topk=3, omega=1.0)
    assert not out.requires_grad
    for dtype in (torch.bfloat16, torch.float16):
        got = rectify_labels(z.detach().to(dtype), centers.detach().to(dtype), a, bb, lam, counts, topk=3,
                             omega=1.0)
        assert got.dtype == torch.float32
        want = dense_rectify_labels(z.detach().to(dtype), centers.detach().to(dtype), a, bb, lam, counts, topk=3,
                                    omega=1.0)
        _compare(got, want, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("change,match", [
    (dict(topk=0), "topk must be a positive int"),
    (dict(normalize="l2"), "normalize must be one of"),
    (dict(normalize="softmax", temperature=0.0), "temperature must be > 0"),
])
def test_bad_options_raise(change, match):
    z, centers, a, bb, lam, counts = _inputs(2, 5, 4, seed=0)
    kw = dict(topk=2, omega=1.0) | change
    with pytest.raises(ValueError, match=match):
        rectify_labels(z, centers, a, bb, lam, counts, **kw)


def test_bad_shapes_raise():
    z, centers, a, bb, lam, counts = _inputs(2, 5, 4, seed=0)
    with pytest.raises(ValueError, match="D=4 but centers have D=3"):
        rectify_labels(z, centers[:, :3], a, bb, lam, counts, topk=2, omega=1.0)
    with pytest.raises(ValueError, match="class_counts must have one entry per center"):
        rectify_labels(z, centers, a, bb, lam, counts[:4], topk=2, omega=1.0)
    with pytest.raises(ValueError, match="lam must have shape"):
        rectify_labels(z, centers, a, bb, lam[:1], counts, topk=2, omega=1.0)
