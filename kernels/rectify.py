"""Fused Triton kernels for ConCutMix's rectified label (ARCHITECTURE §1, steps 1–5).

Two launches, no B×C×D tensor and no B×C temporary besides one (B, C) fp32 buffer — the
dense output itself, or, for the compact form, a scratch buffer freed on return:

1. ``_similarity_kernel`` — grid (⌈B/BLOCK_B⌉, ⌈C/BLOCK_C⌉). Each program accumulates a
   BLOCK_B×BLOCK_C tile of z·cᵀ with ``tl.dot`` over D in BLOCK_D chunks (fp32 accumulation
   whatever the input dtype), the squared norms ‖z‖², ‖c_j‖² from the same loaded chunks, and
   writes s = rsqrt(max(‖z‖² + ‖c_j‖² − 2 z·c_j, 1e-12)) (step 1) into the output buffer,
   which serves as scratch.
2. ``_select_kernel`` — grid (B,). One program per row finds the K-th largest similarity
   exactly by bisection on the fp32 bit patterns (for s ≥ 0 the int32 view of the bits is
   monotone in the value), which works for any K ≤ C and any C: a row of up to 8192 classes
   is searched in registers, longer rows are streamed in BLOCK_C tiles at every step, and K
   may exceed a tile either way. Ties at the threshold are broken towards the lower
   class index with a running exclusive prefix count of the tied entries across tiles, the
   rule of ``fastlt.labels.reference_rectify_labels`` (step 2). It then normalises over the
   kept entries (L1, or softmax with temperature; step 3), computes γ from the class counts
   of label_a and label_b (step 4) and writes ŷ = γ·ŝ + (1 − γ)·y with the area label y
   built from (label_a, label_b, λ) on the fly (step 5). Optionally it also writes the compact
   label: the K kept class indices (ascending), their weights ŝ and γ.

In eager mode the entry points launch the kernels directly (a custom op's Python overhead
per call is comparable to the kernels' run time at these sizes); under ``torch.compile`` they
go through ``torch.library`` custom ops with fake implementations, so Dynamo traces them
without graph breaks. Invalid labels (outside [0, C)) cannot
be checked on CUDA without a host sync; there they make the row NaN instead of reading out
of bounds. CPU tensors (interpreter) are checked and raise ``ValueError``.
"""
from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from fastlt.labels import validate_rectify_args

from ._jit import INTERPRETED, cdiv, jit, next_pow2

__all__ = ["rectify_labels_compact_triton", "rectify_labels_triton"]

_MIN_SQ_DIST = 1e-12  # same clamp as fastlt.labels (a sample on a center stays finite)
_INT32_MAX = tl.constexpr(2147483647)


@jit
def _similarity_kernel(z_ptr, c_ptr, s_ptr, B, C, D,
                       stride_zb, stride_zd, stride_cc, stride_cd, stride_sb,
                       MIN_SQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """s[b, j] = 1 / sqrt(max(‖z_b‖² + ‖c_j‖² − 2 z_b·c_j, MIN_SQ)).

    Pointers: z_ptr (B, D) fp32/bf16/fp16; c_ptr (C, D), same dtype as z; s_ptr (B, C) fp32,
    unit stride along C. Strides: stride_zb, stride_zd of z; stride_cc, stride_cd of c;
    stride_sb, the row stride of s. Constexprs: MIN_SQ, the clamp of the squared distance;
    BLOCK_B × BLOCK_C, the output tile (each ≥ 16 for tl.dot); BLOCK_D, the chunk of D per
    step; INPUT_PRECISION, tl.dot's precision for fp32 inputs ("tf32x3" or "tf32"); UPCAST_DOT,
    feed tl.dot fp32 copies of the tiles (interpreter only, see ``_launch``).
    """
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    rmask = rows < B
    cmask = cols < C
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    z_sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
    c_sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        zt = tl.load(z_ptr + rows[:, None] * stride_zb + d[None, :] * stride_zd,
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        # centers loaded transposed, (BLOCK_D, BLOCK_C), so the tile is z·cᵀ directly
        ct = tl.load(c_ptr + cols[None, :] * stride_cc + d[:, None] * stride_cd,
                     mask=dmask[:, None] & cmask[None, :], other=0.0)
        zf = zt.to(tl.float32)
        cf = ct.to(tl.float32)
        if UPCAST_DOT:
            acc = tl.dot(zf, cf, acc, input_precision="ieee")
        else:
            acc = tl.dot(zt, ct, acc, input_precision=INPUT_PRECISION)
        z_sq += tl.sum(zf * zf, axis=1)
        c_sq += tl.sum(cf * cf, axis=0)
    sq = z_sq[:, None] + c_sq[None, :] - 2.0 * acc
    sq = tl.maximum(sq, MIN_SQ)
    s = 1.0 / tl.sqrt(sq)
    tl.store(s_ptr + rows[:, None] * stride_sb + cols[None, :], s, mask=rmask[:, None] & cmask[None, :])


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

    Pointers: s_ptr (B, C) fp32 similarities (may alias out_ptr: every tile is read before it
    is overwritten in the last pass); out_ptr (B, C) fp32 dense ŷ (used if WRITE_DENSE);
    la_ptr, lb_ptr (B,) int64 label_a / label_b; lam_ptr (B,) fp32 λ; counts_ptr (C,) N_j,
    int32/int64/fp32/fp64; logsum_ptr (1,) fp64 Σ log N_i (read if HAS_LOG_SUM); idx_ptr (B, K) int64, w_ptr (B, K) fp32, gamma_ptr (B,) fp32: the
    compact label (used if WRITE_COMPACT). Scalars: C, K (1 ≤ K ≤ C); stride_sb, stride_ob the
    row strides (unit stride along C); omega = ω; inv_temp = 1/T.
    Constexprs: SOFTMAX (else L1); WRITE_DENSE, WRITE_COMPACT; HAS_LOG_SUM (else each row sums
    the C logs itself); BLOCK_C, the tile of a row in
    the threshold search; NUM_TILES = ⌈C / BLOCK_C⌉ (1: the row is searched in registers);
    BLOCK_P, NUM_P_TILES, the same for the passes after the search.
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    offs = tl.arange(0, BLOCK_C)

    # Bracket the K-th largest bit pattern: count(bits >= lo) >= K > count(bits >= hi), then
    # bisect (≤ 31 steps, ~25 for typical rows). Padding loads -1.0, whose bit pattern is a
    # negative int32, below every similarity.
    if NUM_TILES == 1:
        # The row fits one tile (C ≤ 8192 by default): it stays in registers for the search,
        # whose steps then cost no memory traffic.
        cmask = offs < C
        row_bits = tl.load(s_row + offs, mask=cmask, other=-1.0).to(tl.int32, bitcast=True)
        lo = tl.min(tl.where(cmask, row_bits, _INT32_MAX), axis=0)
        hi = tl.max(row_bits, axis=0)
        s_max = hi.to(tl.float32, bitcast=True)  # the row maximum, for a stable softmax
        hi = hi + 1
        if K >= C:  # every entry is kept: the threshold is the minimum, no search needed
            hi = lo + 1
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            take = tl.sum((row_bits >= mid).to(tl.int32), axis=0) >= K
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid)
    else:
        # Longer rows are streamed tile by tile at every step.
        lo = _INT32_MAX
        hi = -1
        for t in range(NUM_TILES):
            cols = t * BLOCK_C + offs
            cmask = cols < C
            bits = tl.load(s_row + cols, mask=cmask, other=-1.0).to(tl.int32, bitcast=True)
            lo = tl.minimum(lo, tl.min(tl.where(cmask, bits, _INT32_MAX), axis=0))
            hi = tl.maximum(hi, tl.max(bits, axis=0))
        s_max = hi.to(tl.float32, bitcast=True)
        hi = hi + 1
        if K >= C:
            hi = lo + 1
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            count = 0
            for t in range(NUM_TILES):
                cols = t * BLOCK_C + offs
                bits = tl.load(s_row + cols, mask=cols < C, other=-1.0).to(tl.int32, bitcast=True)
                count += tl.sum((bits >= mid).to(tl.int32), axis=0)
            take = count >= K
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid)
    thresh = lo  # bit pattern of the K-th largest similarity

    # The passes below stream the row in BLOCK_P tiles (narrower than a register-resident
    # row), which keeps their register use low.
    offs_p = tl.arange(0, BLOCK_P)

    # Entries above the threshold are all kept; `need` of the tied ones, lowest index first.
    n_above = 0
    for t in range(NUM_P_TILES):
        cols = t * BLOCK_P + offs_p
        bits = tl.load(s_row + cols, mask=cols < C, other=-1.0).to(tl.int32, bitcast=True)
        n_above += tl.sum((bits > thresh).to(tl.int32), axis=0)
    need = K - n_above

    # Normaliser over the kept entries.
    total = 0.0
    ties_before = 0
    for t in range(NUM_P_TILES):
        cols = t * BLOCK_P + offs_p
        pmask = cols < C
        keep, v, ties_before = _kept_tile(s_row, cols, pmask, thresh, need, ties_before, s_max, inv_temp, SOFTMAX)
        total += tl.sum(tl.where(keep, v, 0.0), axis=0)

    # γ = ω·log(λ·N_a + (1−λ)·N_b) / Σ log N_i, in fp64 like the reference. Σ log N_i is
    # computed once per run by the caller (fastlt.labels.sum_log_counts); without it every row
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


def _similarity_config(b: int, dtype: torch.dtype) -> dict:
    """Tile sizes for the similarity kernel (tl.dot needs every dimension ≥ 16).

    Chosen so that no variant spills registers on sm_90 (checked with the cubins of
    ``python -m fastlt.kernels.aot``): the 64×128 fp32 accumulator plus the fp32 copies of
    the operand chunks used for the norms need 8 warps. ``dtype`` is kept in the signature for
    per-dtype tuning once GPU measurements exist.
    """
    del dtype
    block_b = 64 if b > 32 else max(16, next_pow2(b))
    return dict(BLOCK_B=block_b, BLOCK_C=128, BLOCK_D=32, num_warps=8 if block_b == 64 else 4, num_stages=3)


def _select_config(c: int, block_c: int | None) -> dict:
    """Row tiles of the selection kernel: the whole row up to 8192 classes (iNaturalist's
    8142 included) so that the search runs in registers (≤ 16 values per thread at 16 warps),
    2048-wide streamed tiles beyond; the passes after the search use tiles of ≤ 2048."""
    block = block_c if block_c is not None else (next_pow2(c) if c <= 8192 else 2048)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    block_p = min(block, 2048)
    return dict(BLOCK_C=block, NUM_TILES=cdiv(c, block), BLOCK_P=block_p, NUM_P_TILES=cdiv(c, block_p),
                num_warps=num_warps)


def _fp32_input_precision() -> str:
    # Follow the user's torch setting for fp32 matmuls: plain TF32 only if they allowed it
    # for torch's own matmuls. Otherwise ("highest", torch's default) 3xTF32, which splits
    # each operand into a TF32 head and tail and keeps close to fp32 accuracy (about 2^-22
    # relative) on tensor cores, instead of the much slower FMA path of "ieee".
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _upcast_dot(dtype: torch.dtype) -> bool:
    # Triton 3.8's interpreter returns wrong values for tl.dot on bfloat16 operands (compiled
    # kernels are fine). bf16 → fp32 is exact and so are bf16 products in fp32, so feeding it
    # fp32 tiles gives the result the GPU computes, up to summation order.
    return INTERPRETED and dtype == torch.bfloat16


def _prepare(z, centers, label_a, label_b, lam, class_counts, topk, normalize, temperature, log_count_sum):
    class_counts = torch.as_tensor(class_counts, device=z.device)
    validate_rectify_args(z, centers, label_a, label_b, lam, class_counts, topk, normalize, temperature,
                          log_count_sum)
    if z.device != centers.device:
        raise ValueError(f"rectify_labels: z is on {z.device} but centers are on {centers.device}")
    for name, t in (("z", z), ("centers", centers)):
        if not t.is_floating_point():
            raise ValueError(f"rectify_labels: {name} must be a floating-point tensor; got {t.dtype}")
    c = centers.shape[0]
    # On CPU tensors checking costs no host-device sync, so do it (but not while Dynamo
    # traces: the values are not known then).
    if z.device.type == "cpu" and not torch.compiler.is_compiling():
        for name, t in (("label_a", label_a), ("label_b", label_b)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
                raise ValueError(f"rectify_labels: {name} has values in [{int(t.min())}, {int(t.max())}], "
                                 f"outside the {c} classes [0, {c})")
    # Exact upcast of the narrower dtype; anything else (fp64) is computed in fp32, as the
    # reference does.
    dtype = torch.promote_types(z.dtype, centers.dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.float32
    z = z.detach().to(dtype)
    centers = centers.detach().to(dtype)
    counts = class_counts.to(z.device)
    if counts.dtype not in (torch.int32, torch.int64, torch.float32, torch.float64):
        counts = counts.double()
    counts = counts.contiguous()
    if log_count_sum is not None:  # a no-op for the float64 device tensor of sum_log_counts
        log_count_sum = torch.as_tensor(log_count_sum, dtype=torch.float64, device=z.device).reshape(1)
    return (z, centers, label_a.to(z.device, torch.int64).contiguous(), label_b.to(z.device, torch.int64).contiguous(),
            lam.to(z.device, torch.float32).contiguous(), counts, log_count_sum)


def _launch(z, centers, label_a, label_b, lam, counts, log_sum, omega, k, softmax, temperature, write_dense,
            write_compact, block_c_select=None):
    b, d = z.shape
    c = centers.shape[0]
    out = torch.empty(b, c, device=z.device, dtype=torch.float32)
    idx = torch.empty(b, k if write_compact else 0, device=z.device, dtype=torch.int64)
    w = torch.empty(b, k if write_compact else 0, device=z.device, dtype=torch.float32)
    gamma = torch.empty(b if write_compact else 0, device=z.device, dtype=torch.float32)
    if b == 0:
        return out, idx, w, gamma
    sim_cfg = _similarity_config(b, z.dtype)
    grid = (cdiv(b, sim_cfg["BLOCK_B"]), cdiv(c, sim_cfg["BLOCK_C"]))
    _similarity_kernel[grid](z, centers, out, b, c, d, z.stride(0), z.stride(1), centers.stride(0),
                             centers.stride(1), out.stride(0), MIN_SQ=_MIN_SQ_DIST,
                             INPUT_PRECISION=_fp32_input_precision(), UPCAST_DOT=_upcast_dot(z.dtype), **sim_cfg)
    sel_cfg = _select_config(c, block_c_select)
    _select_kernel[(b,)](out, out, label_a, label_b, lam, counts, log_sum if log_sum is not None else counts, idx, w,
                         gamma, c, k, out.stride(0), out.stride(0), omega, 1.0 / temperature, SOFTMAX=softmax,
                         WRITE_DENSE=write_dense, WRITE_COMPACT=write_compact, HAS_LOG_SUM=log_sum is not None,
                         **sel_cfg)
    return out, idx, w, gamma


@torch.library.custom_op("fastlt::rectify_labels", mutates_args=())
def _rectify_op(z: Tensor, centers: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor, counts: Tensor,
                log_sum: Tensor | None, topk: int, omega: float, softmax: bool, temperature: float,
                block_c_select: int) -> Tensor:
    out, _, _, _ = _launch(z, centers, label_a, label_b, lam, counts, log_sum, omega, topk, softmax, temperature,
                           True, False, block_c_select or None)
    return out


@_rectify_op.register_fake
def _(z, centers, label_a, label_b, lam, counts, log_sum, topk, omega, softmax, temperature, block_c_select):
    return z.new_empty((z.shape[0], centers.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastlt::rectify_labels_compact", mutates_args=())
def _rectify_compact_op(z: Tensor, centers: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor,
                        counts: Tensor, log_sum: Tensor | None, topk: int, omega: float, softmax: bool,
                        temperature: float, block_c_select: int) -> tuple[Tensor, Tensor, Tensor]:
    _, idx, w, gamma = _launch(z, centers, label_a, label_b, lam, counts, log_sum, omega, topk, softmax, temperature,
                               False, True, block_c_select or None)
    return idx, w, gamma


@_rectify_compact_op.register_fake
def _(z, centers, label_a, label_b, lam, counts, log_sum, topk, omega, softmax, temperature, block_c_select):
    b = z.shape[0]
    return (z.new_empty((b, topk), dtype=torch.int64), z.new_empty((b, topk), dtype=torch.float32),
            z.new_empty((b,), dtype=torch.float32))


def rectify_labels_triton(z: Tensor, centers: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor,
                          class_counts: Tensor, *, topk: int, omega: float, normalize: str = "l1",
                          temperature: float = 1.0, log_count_sum: Tensor | float | None = None,
                          _block_c_select: int | None = None) -> Tensor:
    """Dense (B, C) float32 ŷ from the fused kernels; same contract as ``reference_rectify_labels``.

    ``log_count_sum``: Σ log N_i (``fastlt.labels.sum_log_counts``), computed once per run;
    None: every row of the selection kernel sums the C logs itself. ``_block_c_select`` (tests
    only) forces the row tile of the selection kernel, to exercise rows spanning several tiles
    at small C.
    """
    z, centers, label_a, label_b, lam, counts, log_sum = _prepare(z, centers, label_a, label_b, lam, class_counts,
                                                                  topk, normalize, temperature, log_count_sum)
    k = min(topk, centers.shape[0])
    if torch.compiler.is_compiling():
        return _rectify_op(z, centers, label_a, label_b, lam, counts, log_sum, k, float(omega),
                           normalize == "softmax", float(temperature), int(_block_c_select or 0))
    return _launch(z, centers, label_a, label_b, lam, counts, log_sum, float(omega), k, normalize == "softmax",
                   float(temperature), True, False, _block_c_select)[0]


def rectify_labels_compact_triton(z: Tensor, centers: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor,
                                  class_counts: Tensor, *, topk: int, omega: float, normalize: str = "l1",
                                  temperature: float = 1.0, log_count_sum: Tensor | float | None = None,
                                  _block_c_select: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(indices (B, K') int64 ascending, weights ŝ (B, K') fp32, γ (B,) fp32) with K' = min(K, C)."""
    z, centers, label_a, label_b, lam, counts, log_sum = _prepare(z, centers, label_a, label_b, lam, class_counts,
                                                                  topk, normalize, temperature, log_count_sum)
    k = min(topk, centers.shape[0])
    if torch.compiler.is_compiling():
        return _rectify_compact_op(z, centers, label_a, label_b, lam, counts, log_sum, k, float(omega),
                                   normalize == "softmax", float(temperature), int(_block_c_select or 0))
    return _launch(z, centers, label_a, label_b, lam, counts, log_sum, float(omega), k, normalize == "softmax",
                   float(temperature), False, True, _block_c_select)[1:]
