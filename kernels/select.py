"""Top-K selection, normalisation, γ and blend of ConCutMix's label (docs/design.md §1, steps 2–5).

The second of the two launches of :mod:`fastlt.kernels.rectify`: ``_select_kernel``, grid
(B,), one program per row of the (B, C) similarity matrix s written by the first launch.

**Threshold search (step 2): radix select.** For s ≥ 0 the int32 view of the fp32 bits is
monotone in the value, so the K-th largest similarity is found digit by digit on its bit
pattern: four passes of 8-bit digits, most significant first. Each pass histograms the digit
of the entries that match the digits found so far (``tl.histogram``, 256 bins), and picks the
largest digit whose suffix count (entries with that digit or a larger one) still reaches the
number of entries left to find; the entries with a larger digit are then known to be above
the threshold and are subtracted. After the fourth pass the digits spell the K-th largest
bit pattern exactly, and what is left to find is the number of entries *equal* to it that
are kept (``need``), so no separate counting pass follows the search. This replaces a
bisection on the bit patterns (up to 31 counting passes plus one to count the entries above
the threshold) with 4 passes. Rows of up to 8192 classes (iNaturalist's 8142 included) are
searched in registers; longer rows are streamed in BLOCK_C tiles at each pass. Any K ≤ C.

**Ties** at the threshold go to the lower class index: a running exclusive prefix count of
the tied entries across tiles keeps the first ``need`` of them — the rule of
``fastlt.method.labels.topk_mask``.

Then, streaming the row in BLOCK_P tiles: the normaliser over the kept entries (L1, or
softmax with temperature; step 3), γ from the class counts of label_a and label_b with
Σ log N_i loaded (precomputed once per run) or summed by the row (step 4), and
ŷ = γ·ŝ + (1 − γ)·y with the area label y built from (label_a, label_b, λ) on the fly
(step 5), written densely and/or as the compact label (K ascending indices, weights, γ).

One row per program, also when B is small: a row's passes depend on each other, so packing
several rows into a program would run them one after another on one SM, while with B rows
on B programs they run side by side (B ≤ a few hundred rows, against 132 SMs on an H100/H200).
It would not remove a launch either.
"""
from __future__ import annotations

import triton.language as tl

from ._jit import cdiv, jit, next_pow2

__all__ = ["select_config"]

_RADIX_BITS = tl.constexpr(8)
_RADIX_BINS = tl.constexpr(256)


@jit
def _radix_step(hist, need, prefix):
    """One digit of the search from its histogram: (digit, need left, prefix with the digit)."""
    bins = tl.arange(0, _RADIX_BINS)
    at_or_above = tl.cumsum(hist, axis=0, reverse=True)  # entries with this digit or a larger one
    digit = tl.max(tl.where(at_or_above >= need, bins, 0), axis=0)
    need = need - tl.sum(tl.where(bins > digit, hist, 0), axis=0)
    return need, prefix * _RADIX_BINS + digit


@jit
def _kept_tile(s_row, cols, pmask, thresh, need, ties_before, s_max, inv_temp, SOFTMAX: tl.constexpr):
    """One tile of a row: which similarities are kept (above the K-th value, or equal to it and
    among the first ``need`` such in index order) and their unnormalised weights (s, or
    exp((s − max)/T) for softmax). Returns (keep, weights, ties seen up to this tile's end)."""
    s = tl.load(s_row + cols, mask=pmask, other=-1.0)
    bits = s.to(tl.int32, bitcast=True)
    tie = (bits == thresh).to(tl.int32)
    keep = (bits > thresh) | ((tie != 0) & (ties_before + tl.cumsum(tie, axis=0) - tie < need))
    if SOFTMAX:
        v = tl.exp((s - s_max) * inv_temp)
    else:
        v = s
    return keep, v, ties_before + tl.sum(tie, axis=0)


@jit
def _select_kernel(s_ptr, out_ptr, la_ptr, lb_ptr, lam_ptr, counts_ptr, logsum_ptr,
                   idx_ptr, w_ptr, gamma_ptr,
                   C, K, stride_sb, stride_ob, omega, inv_temp,
                   SOFTMAX: tl.constexpr, WRITE_DENSE: tl.constexpr, WRITE_COMPACT: tl.constexpr,
                   HAS_LOG_SUM: tl.constexpr,
                   BLOCK_C: tl.constexpr, NUM_TILES: tl.constexpr, BLOCK_P: tl.constexpr,
                   NUM_P_TILES: tl.constexpr):
    """Top-K (lower index wins ties), normalisation, γ and the blend, one row per program.

    Pointers: s_ptr (B, C) fp32 similarities, all ≥ 0 (may alias out_ptr: every tile is read
    before it is overwritten in the last pass); out_ptr (B, C) fp32 dense ŷ (used if
    WRITE_DENSE); la_ptr, lb_ptr (B,) int64 label_a / label_b; lam_ptr (B,) fp32 λ;
    counts_ptr (C,) N_j, int32/int64/fp32/fp64; logsum_ptr (1,) fp64 Σ log N_i (read if
    HAS_LOG_SUM); idx_ptr (B, K) int64, w_ptr (B, K) fp32, gamma_ptr (B,) fp32: the compact
    label (used if WRITE_COMPACT). Scalars: C, K (1 ≤ K ≤ C); stride_sb, stride_ob the row
    strides (unit stride along C); omega = ω; inv_temp = 1/T.
    Constexprs: SOFTMAX (else L1); WRITE_DENSE, WRITE_COMPACT; HAS_LOG_SUM (else each row sums
    the C logs itself); BLOCK_C, the tile of a row in the threshold search; NUM_TILES =
    ⌈C / BLOCK_C⌉ (1: the row is searched in registers); BLOCK_P, NUM_P_TILES, the same for
    the passes after the search.
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    offs = tl.arange(0, BLOCK_C)

    # Radix select of the K-th largest bit pattern, 8 bits per pass from the top. `need` is
    # the number of entries still to find at or below the digits chosen so far.
    need = K
    prefix = 0
    if NUM_TILES == 1:
        # The row fits one tile: it stays in registers for the four passes.
        cmask = offs < C
        row_bits = tl.load(s_row + offs, mask=cmask, other=-1.0).to(tl.int32, bitcast=True)
        s_max = tl.max(row_bits, axis=0).to(tl.float32, bitcast=True)  # padding's bits are negative
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            digit = (row_bits >> shift) & (_RADIX_BINS - 1)
            if p == 0:
                cand = cmask
            else:
                cand = cmask & ((row_bits >> (shift + _RADIX_BITS)) == prefix)
            need, prefix = _radix_step(tl.histogram(digit, _RADIX_BINS, mask=cand), need, prefix)
    else:
        # Longer rows are streamed tile by tile at each pass; the row maximum (for a stable
        # softmax) comes with the first pass.
        s_max_bits = -1
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros((_RADIX_BINS,), dtype=tl.int32)
            for t in range(NUM_TILES):
                cols = t * BLOCK_C + offs
                cmask = cols < C
                bits = tl.load(s_row + cols, mask=cmask, other=-1.0).to(tl.int32, bitcast=True)
                digit = (bits >> shift) & (_RADIX_BINS - 1)
                if p == 0:
                    cand = cmask
                    s_max_bits = tl.maximum(s_max_bits, tl.max(bits, axis=0))
                else:
                    cand = cmask & ((bits >> (shift + _RADIX_BITS)) == prefix)
                hist += tl.histogram(digit, _RADIX_BINS, mask=cand)
            need, prefix = _radix_step(hist, need, prefix)
        s_max = s_max_bits.to(tl.float32, bitcast=True)
    thresh = prefix  # bit pattern of the K-th largest similarity; `need` of its ties are kept

    # The passes below stream the row in BLOCK_P tiles (narrower than a register-resident
    # row), which keeps their register use low.
    offs_p = tl.arange(0, BLOCK_P)

    # Normaliser over the kept entries.
    total = 0.0
    ties_before = 0
    for t in range(NUM_P_TILES):
        cols = t * BLOCK_P + offs_p
        pmask = cols < C
        keep, v, ties_before = _kept_tile(s_row, cols, pmask, thresh, need, ties_before, s_max, inv_temp, SOFTMAX)
        total += tl.sum(tl.where(keep, v, 0.0), axis=0)

    # γ = ω·log(λ·N_a + (1−λ)·N_b) / Σ log N_i, in fp64 like the reference. Σ log N_i is
    # computed once per run by the caller (fastlt.method.labels.sum_log_counts); without it every row
    # sums the C logs itself. Labels outside [0, C) are not read (masked loads); they make γ
    # NaN, which poisons the row visibly.
    if HAS_LOG_SUM:
        log_sum = tl.load(logsum_ptr).to(tl.float64)
    else:
        log_sum = tl.zeros([], dtype=tl.float64)
        for t in range(NUM_P_TILES):
            cols = t * BLOCK_P + offs_p
            n = tl.load(counts_ptr + cols, mask=cols < C, other=1).to(tl.float64)
            log_sum += tl.sum(tl.log(n), axis=0)
    a = tl.load(la_ptr + row)
    b = tl.load(lb_ptr + row)
    lam = tl.load(lam_ptr + row)
    one_minus = 1.0 - lam
    valid = (a >= 0) & (a < C) & (b >= 0) & (b < C)
    n_a = tl.load(counts_ptr + a, mask=valid, other=1).to(tl.float64)
    n_b = tl.load(counts_ptr + b, mask=valid, other=1).to(tl.float64)
    mixed = lam.to(tl.float64) * n_a + one_minus.to(tl.float64) * n_b
    mixed = tl.where(valid, mixed, -1.0)  # log(-1) = NaN
    gamma = (omega * tl.log(mixed) / log_sum).to(tl.float32)
    if WRITE_COMPACT:
        tl.store(gamma_ptr + row, gamma)

    ties_before = 0
    kept_before = 0
    for t in range(NUM_P_TILES):
        cols = t * BLOCK_P + offs_p
        pmask = cols < C
        keep, v, ties_before = _kept_tile(s_row, cols, pmask, thresh, need, ties_before, s_max, inv_temp, SOFTMAX)
        w = tl.where(keep, v / total, 0.0)
        if WRITE_DENSE:
            y = tl.where(cols == a, lam, 0.0) + tl.where(cols == b, one_minus, 0.0)
            tl.store(out_ptr + row * stride_ob + cols, gamma * w + (1.0 - gamma) * y, mask=pmask)
        if WRITE_COMPACT:
            keep_i = keep.to(tl.int32)
            pos = kept_before + tl.cumsum(keep_i, axis=0) - keep_i
            tl.store(idx_ptr + row * K + pos, cols.to(tl.int64), mask=keep)
            tl.store(w_ptr + row * K + pos, w, mask=keep)
            kept_before += tl.sum(keep_i, axis=0)


def select_config(c: int, block_c: int | None) -> dict:
    """Row tiles of the selection kernel: the whole row up to 8192 classes (iNaturalist's 8142
    included) so that the search runs in registers (≤ 16 values per thread at 16 warps),
    2048-wide streamed tiles beyond; the passes after the search use tiles of ≤ 2048.
    ``block_c`` (tests) forces the search tile, so that small rows span several tiles."""
    block = block_c if block_c is not None else (next_pow2(c) if c <= 8192 else 2048)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    block_p = min(block, 2048)
    return dict(BLOCK_C=block, NUM_TILES=cdiv(c, block), BLOCK_P=block_p, NUM_P_TILES=cdiv(c, block_p),
                num_warps=num_warps)


def launch_select(s, out, label_a, label_b, lam, counts, log_sum, idx, w, gamma, k, omega, inv_temp, softmax,
                  write_dense, write_compact, block_c=None) -> None:
    """Launch ``_select_kernel`` over the B rows of ``s`` (arguments as its docstring)."""
    b, c = s.shape
    _select_kernel[(b,)](s, out, label_a, label_b, lam, counts, log_sum if log_sum is not None else counts, idx, w,
                         gamma, c, k, s.stride(0), out.stride(0), omega, inv_temp, SOFTMAX=softmax,
                         WRITE_DENSE=write_dense, WRITE_COMPACT=write_compact, HAS_LOG_SUM=log_sum is not None,
                         **select_config(c, block_c))
