"""The selection kernel (fastlt.kernels.select) on hand-made similarity rows, docs/design.md §1 step 2.

The radix select finds the K-th largest similarity digit by digit on its fp32 bit pattern
(four 8-bit passes): rows built from their bit patterns drive each pass — the top three bytes
equal (the fourth pass decides), values spread over the whole range (the first decides), few
values per byte (each pass narrows the candidates) — in registers and streamed over tiles. The
kept classes must be exactly those of ``fastlt.method.labels.topk_mask`` (ties to the lower index)
and of the independent spec (tests/spec_formulas.py: a stable sort, l1 weights and γ in fp64).
The whole label against the reference is in tests/test_kernels_rectify.py.
"""
from fastlt.kernels.testing import prepare_interpreter

prepare_interpreter()  # before anything imports triton (a no-op here: tests/conftest.py called it first)

import pytest  # noqa: E402
import torch  # noqa: E402

from fastlt.kernels.testing import (describe_mismatch, kernel_device,  # noqa: E402
                                    skip_reason_in_process)
from fastlt.method.labels import topk_mask  # noqa: E402
from spec_formulas import spec_confidence, spec_topk_l1  # noqa: E402

DEVICE = kernel_device()
_SKIP = skip_reason_in_process()
needs_kernels = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


# Against the spec's fp64 weights s_j / Σ_kept s and γ: the kernel sums the K kept fp32
# similarities in fp32 (typically a relative error of √K·2^-24, 1.9e-6 at K = 999; K·2^-24 in
# the worst case) and divides once. Measured over every case below with TRITON_INTERPRET=1
# (2026-12-03): weights max |Δ| 8.1e-9, max relative 1.4e-7 (over the non-zero weights); γ max
# relative 4.7e-8 (the fp32 rounding of 1/C). The bound is 12x / 70x that, and 5x the typical
# error of the fp32 sum at K = 999, room for a GPU's summation order.
SPEC_TOL = dict(atol=1e-7, rtol=1e-5)


def _check(got, want, what, tol=None):
    msg = describe_mismatch(got, want, what=what, **(tol or dict(atol=1e-6, rtol=1e-5)))
    if msg:
        pytest.fail(msg)


def _bit_pattern_rows(pattern, b, c, seed):
    """Similarity rows (≥ 0) built from their fp32 bit patterns, to drive the radix select
    through each of its four 8-bit digits."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "low_byte":  # the top three bytes equal, many exact ties: the 4th pass decides
        bits = 0x3F800000 + torch.randint(0, 256, (b, c), generator=g)
    elif pattern == "spread":  # floats from 0 to ~1e35 (their sum stays finite): the 1st pass decides
        bits = torch.randint(0, 0x7A000000, (b, c), generator=g)
        bits[:, :3] = 0
    elif pattern == "nested":  # few values per byte: each pass narrows the candidates
        bytes_ = [torch.randint(0, 3, (b, c), generator=g) * step + off for step, off in
                  ((20, 60), (40, 0), (40, 7), (40, 100))]  # top byte ≤ 100: positive floats
        bits = (bytes_[0] << 24) | (bytes_[1] << 16) | (bytes_[2] << 8) | bytes_[3]
    else:
        raise ValueError(pattern)
    return bits.to(torch.int32).view(torch.float32)


# (bit pattern, C, K, search tile): rows in registers (None) or streamed over tiles (128).
RADIX_CASES = [
    ("low_byte", 1000, 30, None),
    ("low_byte", 1000, 30, 128),
    ("spread", 1000, 1, None),
    ("spread", 1000, 999, 128),
    ("nested", 1000, 30, None),
    ("nested", 300, 150, 64),
]


@needs_kernels
@pytest.mark.parametrize("pattern,c,k,block", RADIX_CASES)
def test_radix_select_keeps_exactly_the_top_k(pattern, c, k, block):
    """The selection kernel on hand-made similarity rows keeps exactly the classes of
    fastlt.method.labels.topk_mask (the K largest, ties to the lower index)."""
    from fastlt.kernels.select import launch_select

    b = 5
    s = _bit_pattern_rows(pattern, b, c, seed=c + k).to(DEVICE)
    assert bool((s >= 0).all()) and bool(s.isfinite().all())
    idx = torch.empty(b, k, dtype=torch.int64, device=DEVICE)
    w = torch.empty(b, k, device=DEVICE)
    gamma = torch.empty(b, device=DEVICE)
    zeros = torch.zeros(b, dtype=torch.int64, device=DEVICE)
    lam, counts = torch.ones(b, device=DEVICE), torch.full((c,), 2.0, device=DEVICE)
    launch_select(s, s, zeros, zeros, lam, counts, None, idx, w, gamma, k, 1.0, 1.0, False, False, True, block)
    # The independent spec: the kept classes of a stable descending sort, their fp64 l1 weights
    # and γ = ω·log N_a / Σ log N_i (here 1/C: every class of count 2, ω = 1).
    spec_idx, spec_w = spec_topk_l1(s.cpu(), k)
    spec_rows = torch.nonzero((idx.cpu() != spec_idx).any(1)).flatten().tolist()
    assert not spec_rows, f"kept classes differ from the spec's stable sort in rows {spec_rows}"
    _check(w.cpu().double(), spec_w, f"weights {pattern} vs spec", SPEC_TOL)
    _check(gamma.cpu().double(), spec_confidence(zeros.cpu(), zeros.cpu(), lam.cpu(), counts.cpu(), 1.0),
           f"γ {pattern} vs spec", SPEC_TOL)
    keep = topk_mask(s, k)
    want = torch.nonzero(keep)[:, 1].view(b, k)
    bad_rows = torch.nonzero((idx != want).any(1)).flatten().tolist()
    assert not bad_rows, f"kept classes differ from topk_mask's in rows {bad_rows}"
    _check(w, s.gather(1, want) / s.gather(1, want).sum(1, keepdim=True), f"weights {pattern}")
