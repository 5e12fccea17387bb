"""Core-library benchmarks: fastlt's PyTorch paths against what a user would otherwise run,
the published implementation's own code, on whatever device runs them (CPU in CI machines).

* rectify_labels (norm expansion, no B×C×D tensor) vs the published code's dense B×C×D
  broadcast (tests/spec_formulas.py's ``dense_rectify_labels``) at B=256, C=1000, D=1024.
* BalancedSupConLoss vs the published BCL ``BalSCL`` (bench/published_baseline.py's
  ``PublishedBalSCL``: vectorised, with its per-element Python list for the class weights)
  at B=128, C=1000, D=128. The spec's loop over anchors and items
  (``loop_balanced_supcon``) is a correctness reference only, checked at a small shape: no
  user would run it, so it is not a speed baseline.
"""
import pytest
import torch
import torch.nn.functional as F

from fastlt.method.labels import reference_rectify_labels
from fastlt.method.losses import BalancedSupConLoss
from published_baseline import PublishedBalSCL
from spec_formulas import dense_rectify_labels, loop_balanced_supcon

B, C, D = 256, 1000, 1024


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second OpenMP thread waits on a
    descheduled peer and swamps millisecond operations; both sides of each ratio run alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def label_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(z=torch.randn(B, D, generator=g), centers=torch.randn(C, D, generator=g),
                label_a=torch.randint(0, C, (B,), generator=g), label_b=torch.randint(0, C, (B,), generator=g),
                lam=torch.rand(B, generator=g), class_counts=torch.randint(5, 1280, (C,), generator=g))


@pytest.mark.benchmark(group="rectify_cpu_B256_C1000_D1024")
def test_rectify_dense_baseline(benchmark, label_inputs):
    out = benchmark.pedantic(dense_rectify_labels, kwargs=dict(**label_inputs, topk=30, omega=200 / 255),
                             rounds=3, iterations=1)
    assert out.shape == (B, C)


@pytest.mark.benchmark(group="rectify_cpu_B256_C1000_D1024")
def test_rectify_torch(benchmark, label_inputs):
    out = benchmark(reference_rectify_labels, **label_inputs, topk=30, omega=200 / 255)
    want = dense_rectify_labels(**label_inputs, topk=30, omega=200 / 255)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def bcl_inputs():
    g = torch.Generator().manual_seed(1)
    b, d = 128, 128
    return (F.normalize(torch.randn(C, d, generator=g), dim=1), F.normalize(torch.randn(b, 2, d, generator=g), dim=2),
            torch.randint(0, C, (b,), generator=g))


def _published_balscl(centers, features, labels):
    return PublishedBalSCL(torch.ones(C).tolist(), 0.07)(centers, features, labels)


@pytest.mark.benchmark(group="balscl_cpu_B128_C1000")
def test_balscl_published_baseline(benchmark, bcl_inputs):
    out = benchmark.pedantic(_published_balscl, args=bcl_inputs, rounds=30, iterations=1, warmup_rounds=1)
    assert torch.isfinite(out)


@pytest.mark.benchmark(group="balscl_cpu_B128_C1000")
def test_balscl_vectorised(benchmark, bcl_inputs):
    loss = BalancedSupConLoss(torch.ones(C), 0.07)
    out = benchmark(loss, *bcl_inputs)
    # Same loss as the published code on the same inputs (fp32 sums over 2B + C = 1256 items,
    # reduced in different orders: relative differences of a few 1e-7).
    torch.testing.assert_close(out, _published_balscl(*bcl_inputs), atol=1e-5, rtol=1e-5)


def test_balscl_loop_reference_agrees():
    """The spec's loop is the correctness reference of both timed losses (at B=8, C=12: the
    loop is O(B·(B + C)) Python-level dot products)."""
    g = torch.Generator().manual_seed(2)
    c, b, d = 12, 8, 16
    inputs = (F.normalize(torch.randn(c, d, generator=g), dim=1), F.normalize(torch.randn(b, 2, d, generator=g), dim=2),
              torch.randint(0, c, (b,), generator=g))
    want = loop_balanced_supcon(*inputs, 0.07)
    torch.testing.assert_close(BalancedSupConLoss(torch.ones(c), 0.07)(*inputs), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(PublishedBalSCL([1.0] * c, 0.07)(*inputs), want, atol=1e-5, rtol=1e-5)
