"""Fused balanced supervised contrastive loss (BCL's L_BalSCL, docs/design.md §1) in Triton.

The spec is ``fastlt.method.losses.reference_balanced_supcon_loss``. Items x_k (N, D), labels y_k,
anchors a_i = x_{s+i} for i < M (s = ``anchor_start``), l_ik = a_i·x_k / T. For anchor i the
contrast set is every k ≠ s+i; w_ik = 1 / (n_{y_k} − [y_k = y_i]) with n_c the number of
items of class c among all N; P_i = {k ≠ s+i : y_k = y_i}, c_i = |P_i|;

    lse_i  = log Σ_{k≠s+i} w_ik · exp(l_ik)
    loss_i = lse_i − (1/c_i) Σ_{k∈P_i} l_ik,          L = (1/M) Σ_i loss_i
    ∂L/∂l_ik = (1/M) · (w_ik · exp(l_ik − lse_i) − [k ∈ P_i] / c_i)  =: G_ik / M
    ∂L/∂x_k  = g/(M·T) · (Σ_i G_ik a_i  +  [k = s+i] Σ_k' G_ik' x_k')

Three launches for forward + backward; nothing of size M×N is ever stored, every logit tile
lives in registers only:

1. ``_balscl_fwd_kernel`` — grid (S, G): program (j, g) takes split j of the items (whole
   BLOCK_N tiles, S ≤ MAX_SPLITS splits) and group g of the anchors (ANCHOR_GROUP rows). It
   first counts the class size n_{y_k} of each of its items over all N labels (writing them
   out for the backward; groups write identical values), then for each BLOCK_M block of its
   anchors streams its item tiles: the logits tile by ``tl.dot`` over D in BLOCK_D chunks
   (fp32 accumulation), and an online, max-subtracted log-sum-exp of the class-weighted
   denominator, with the sum and count of positive logits. It writes those four per-anchor
   partials of its split: (M, S) each, O(anchors · MAX_SPLITS) memory.
2. ``_balscl_combine_kernel`` — one program: merges the S partials of every anchor into lse_i
   and 1/c_i (kept for the backward) and writes the mean loss, so no reduction op follows.
3. ``_balscl_bwd_kernel`` — grid (⌈N/BLOCK_R⌉, ⌈D/BLOCK_DO⌉): program (r, d) writes columns d
   of ∂L/∂x for BLOCK_R item rows. It recomputes, tile by tile, the logits of its rows against
   every anchor (rows as contrast items: Σ_i G_ik a_i) and, if some of its rows are anchors,
   against every item (rows as anchors: Σ_k' G_ik' x_k'), both into one accumulator, so each
   gradient row is written once, by one program, without atomics: deterministic. The upstream
   gradient g is read from the device.

The backward recomputes the logits rather than having the forward write the gradient (the
pattern of ``fastlt.kernels.soft_ce``): ∂L/∂x_k sums over every anchor, which a forward
program (one anchor block, one item split) cannot finish without atomics, and lse_i is only
known once every split is merged; writing it in the forward would need the same extra
launch plus an (N, D) gradient held from forward to backward. Recomputing costs D/BLOCK_DO
extra logit products in the backward, on programs that run side by side.

Items are used in their dtype (fp32, bf16 or fp16; others are computed in fp32): bf16/fp16
tiles feed the tensor cores directly and G is rounded to that dtype for the gradient product
(as flash attention does), fp32 uses 3xTF32 (TF32 if torch's fp32 matmul precision allows
it). Labels outside [0, C) make the loss NaN on CUDA, where checking them would cost a sync.

Eager calls run through an ``autograd.Function``; under ``torch.compile`` the ``fastlt::``
custom ops with fake implementations and registered autograd are used.
"""
from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from fastlt.method.parts import resolve_supcon_args

from ._jit import cdiv, fp32_dot_precision, jit, next_pow2, upcast_dot

__all__ = ["balanced_supcon_loss_triton"]

MAX_SPLITS = 32  # item splits of the forward: bounds the partials at 4·M·32 floats
ANCHOR_GROUP = 128  # anchors per forward program (in BLOCK_M blocks)


@jit
def _gram_tile(x_ptr, ra, ma, rb, mb, D, stride_xn, stride_xd, BA: tl.constexpr, BB: tl.constexpr,
               BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """(BA, BB) fp32 tile of x[ra]·x[rb]ᵀ (rows outside the masks ma, mb are zero)."""
    acc = tl.zeros((BA, BB), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        a = tl.load(x_ptr + ra[:, None] * stride_xn + d[None, :] * stride_xd, mask=ma[:, None] & dm[None, :],
                    other=0.0)
        b = tl.load(x_ptr + rb[None, :] * stride_xn + d[:, None] * stride_xd, mask=dm[:, None] & mb[None, :],
                    other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@jit
def _grad_product(g, x_ptr, rows, rmask, dout, omask, stride_xn, stride_xd, acc,
                  INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + g · x[rows, dout] for a (BR, BT) fp32 g; g is rounded to x's dtype unless fp32."""
    v = tl.load(x_ptr + rows[:, None] * stride_xn + dout[None, :] * stride_xd, mask=rmask[:, None] & omask[None, :],
                other=0.0)
    if UPCAST_DOT:  # interpreter, bf16: the GPU's rounding of g, then an fp32 product
        return tl.dot(g.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    if v.dtype == tl.float32:
        return tl.dot(g, v, acc, input_precision=INPUT_PRECISION)
    return tl.dot(g.to(v.dtype), v, acc)


@jit
def _class_sizes(y_ptr, cols, cmask, N, num_classes, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """n_{y_k} for the items ``cols``: how many of the N labels equal y_k (NaN if y_k ∉ [0, C))."""
    y = tl.load(y_ptr + cols, mask=cmask, other=-1)
    n = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        yj = tl.load(y_ptr + js, mask=js < N, other=-1)
        n += tl.sum(((y[:, None] == yj[None, :]) & (js < N)[None, :]).to(tl.int32), axis=1)
    return tl.where((y >= 0) & (y < num_classes), n.to(tl.float32), float("nan"))


@jit
def _balscl_fwd_kernel(x_ptr, y_ptr, cnt_ptr, part_ptr, N, D, anchor_start, M, num_classes, S, tiles_per_split,
                       stride_xn, stride_xd, scale,
                       ANCHOR_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       UPCAST_DOT: tl.constexpr):
    """Per-split partials of the forward for one group of anchors.

    Pointers: x_ptr (N, D) items fp32/bf16/fp16; y_ptr (N,) int64 labels; cnt_ptr (N,) fp32
    class sizes n_{y_k} (written); part_ptr (4, M, S) fp32 partials (written): running max of
    the logits, Σ w·exp(l − max), Σ positive logits, positive count, of each anchor over the
    split's items. Scalars: N, D; anchor_start, M: the anchors are rows [anchor_start,
    anchor_start + M); num_classes; S, the number of splits; tiles_per_split, BLOCK_N tiles
    per split; stride_xn, stride_xd; scale = 1/T. Constexprs: ANCHOR_GROUP, anchors per
    program; BLOCK_M, the anchor block (≥ 16 for tl.dot); BLOCK_N, the item tile; BLOCK_D,
    the chunk of D per dot; BLOCK_J, the label chunk of the class count; INPUT_PRECISION,
    tl.dot's precision for fp32; UPCAST_DOT, fp32 copies of the tiles (interpreter, bf16).
    """
    pid_s = tl.program_id(0)
    pid_g = tl.program_id(1)
    tile0 = pid_s * tiles_per_split
    # Class sizes of this split's items, stored for the loop below and for the backward
    # (every anchor group writes the same values).
    for t in range(tiles_per_split):
        cols = ((tile0 + t) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols < N
        tl.store(cnt_ptr + cols, _class_sizes(y_ptr, cols, cmask, N, num_classes, BLOCK_N, BLOCK_J), mask=cmask)
    tl.debug_barrier()  # the stores above, by any thread of the program, before the loads below

    first = pid_g * ANCHOR_GROUP
    for a0 in range(first, tl.minimum(first + ANCHOR_GROUP, M), BLOCK_M):
        ai = (a0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        amask = ai < M
        arow = anchor_start + ai
        ya = tl.load(y_ptr + arow, mask=amask, other=-1)
        m_i = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
        s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        p_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        c_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in range(tiles_per_split):
            cols = ((tile0 + t) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            cmask = cols < N
            yc = tl.load(y_ptr + cols, mask=cmask, other=-1)
            nc = tl.load(cnt_ptr + cols, mask=cmask, other=1.0)
            logit = _gram_tile(x_ptr, arow, amask, cols, cmask, D, stride_xn, stride_xd, BLOCK_M, BLOCK_N, BLOCK_D,
                               INPUT_PRECISION, UPCAST_DOT) * scale
            same = ya[:, None] == yc[None, :]
            valid = amask[:, None] & cmask[None, :] & (arow[:, None] != cols[None, :])
            w = 1.0 / (nc[None, :] - same.to(tl.float32))
            m_new = tl.maximum(m_i, tl.max(tl.where(valid, logit, -float("inf")), axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # no valid item seen yet
            s_i = s_i * tl.exp(m_i - m_safe) + tl.sum(tl.where(valid, w * tl.exp(logit - m_safe[:, None]), 0.0),
                                                      axis=1)
            m_i = m_new
            pos = valid & same
            p_i += tl.sum(tl.where(pos, logit, 0.0), axis=1)
            c_i += tl.sum(pos.to(tl.float32), axis=1)
        out = part_ptr + ai * S + pid_s
        tl.store(out, m_i, mask=amask)
        tl.store(out + M * S, s_i, mask=amask)
        tl.store(out + 2 * M * S, p_i, mask=amask)
        tl.store(out + 3 * M * S, c_i, mask=amask)


@jit
def _balscl_combine_kernel(part_ptr, lse_ptr, invp_ptr, loss_ptr, M, S, inv_m,
                           BLOCK_A: tl.constexpr, BLOCK_S: tl.constexpr):
    """lse_i and 1/c_i of every anchor from its S partials, and the mean loss (one program).

    Pointers: part_ptr (4, M, S) fp32 from ``_balscl_fwd_kernel``; lse_ptr, invp_ptr (M,) fp32
    (written); loss_ptr (1,) fp32 L (written). Scalars: M, S; inv_m = 1/M. Constexprs:
    BLOCK_A, anchors per step; BLOCK_S ≥ S, a power of two.
    """
    so = tl.arange(0, BLOCK_S)
    smask = so < S
    total = 0.0
    for a0 in range(0, M, BLOCK_A):
        ai = a0 + tl.arange(0, BLOCK_A)
        amask = ai < M
        at = part_ptr + ai[:, None] * S + so[None, :]
        mk = amask[:, None] & smask[None, :]
        mp = tl.load(at, mask=mk, other=-float("inf"))
        sp = tl.load(at + M * S, mask=mk, other=0.0)
        pp = tl.load(at + 2 * M * S, mask=mk, other=0.0)
        cp = tl.load(at + 3 * M * S, mask=mk, other=0.0)
        mx = tl.max(mp, axis=1)
        mx = tl.where(mx == -float("inf"), 0.0, mx)
        lse = mx + tl.log(tl.sum(sp * tl.exp(mp - mx[:, None]), axis=1))
        npos = tl.sum(cp, axis=1)
        loss = lse - tl.sum(pp, axis=1) / npos  # an anchor without positives: 0/0, NaN
        tl.store(lse_ptr + ai, lse, mask=amask)
        tl.store(invp_ptr + ai, 1.0 / npos, mask=amask)
        total += tl.sum(tl.where(amask, loss, 0.0), axis=0)
    tl.store(loss_ptr, total * inv_m)


@jit
def _balscl_bwd_kernel(x_ptr, y_ptr, cnt_ptr, lse_ptr, invp_ptr, g_ptr, gx_ptr, N, D, anchor_start, M,
                       stride_xn, stride_xd, stride_gn, scale, inv_m,
                       BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DO: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """∂L/∂x for BLOCK_R item rows and BLOCK_DO columns.

    Pointers: x_ptr, y_ptr, cnt_ptr as in the forward; lse_ptr, invp_ptr (M,) fp32 from the
    combine kernel; g_ptr (1,) fp32 upstream gradient; gx_ptr (N, D) gradient in x's dtype,
    unit stride along D (written). Scalars: N, D, anchor_start, M; stride_xn, stride_xd;
    stride_gn, gx's row stride; scale = 1/T; inv_m = 1/M. Constexprs: BLOCK_R, the item rows
    of the program (≥ 16); BLOCK_T, the tile of anchors or items streamed against them;
    BLOCK_D, the chunk of D per logit dot; BLOCK_DO, the gradient columns of the program;
    INPUT_PRECISION, UPCAST_DOT as in the forward.
    """
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < N
    yr = tl.load(y_ptr + rows, mask=rmask, other=-1)
    nr = tl.load(cnt_ptr + rows, mask=rmask, other=1.0)
    dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    omask = dout < D
    acc = tl.zeros((BLOCK_R, BLOCK_DO), dtype=tl.float32)

    # The rows as contrast items of every anchor i: Σ_i G_ik a_i.
    for t0 in range(0, M, BLOCK_T):
        ai = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        amask = ai < M
        arow = anchor_start + ai
        ya = tl.load(y_ptr + arow, mask=amask, other=-1)
        lse_a = tl.load(lse_ptr + ai, mask=amask, other=0.0)
        invp_a = tl.load(invp_ptr + ai, mask=amask, other=0.0)
        logit = _gram_tile(x_ptr, rows, rmask, arow, amask, D, stride_xn, stride_xd, BLOCK_R, BLOCK_T, BLOCK_D,
                           INPUT_PRECISION, UPCAST_DOT) * scale
        same = yr[:, None] == ya[None, :]
        valid = rmask[:, None] & amask[None, :] & (rows[:, None] != arow[None, :])
        w = 1.0 / (nr[:, None] - same.to(tl.float32))
        gk = tl.where(valid, w * tl.exp(logit - lse_a[None, :]) - tl.where(same, invp_a[None, :], 0.0), 0.0)
        acc = _grad_product(gk, x_ptr, arow, amask, dout, omask, stride_xn, stride_xd, acc, INPUT_PRECISION,
                            UPCAST_DOT)

    # The rows that are anchors, against every item k': Σ_k' G_ik' x_k'.
    lo = pid_r * BLOCK_R
    if (lo < anchor_start + M) & (lo + BLOCK_R > anchor_start):
        ia = rows - anchor_start
        is_anchor = rmask & (ia >= 0) & (ia < M)
        lse_r = tl.load(lse_ptr + ia, mask=is_anchor, other=0.0)
        invp_r = tl.load(invp_ptr + ia, mask=is_anchor, other=0.0)
        for t0 in range(0, N, BLOCK_T):
            cols = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            cmask = cols < N
            yc = tl.load(y_ptr + cols, mask=cmask, other=-1)
            nc = tl.load(cnt_ptr + cols, mask=cmask, other=1.0)
            logit = _gram_tile(x_ptr, rows, is_anchor, cols, cmask, D, stride_xn, stride_xd, BLOCK_R, BLOCK_T,
                               BLOCK_D, INPUT_PRECISION, UPCAST_DOT) * scale
            same = yr[:, None] == yc[None, :]
            valid = is_anchor[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
            w = 1.0 / (nc[None, :] - same.to(tl.float32))
            ga = tl.where(valid, w * tl.exp(logit - lse_r[:, None]) - tl.where(same, invp_r[:, None], 0.0), 0.0)
            acc = _grad_product(ga, x_ptr, cols, cmask, dout, omask, stride_xn, stride_xd, acc, INPUT_PRECISION,
                                UPCAST_DOT)

    gscale = tl.load(g_ptr) * inv_m * scale
    tl.store(gx_ptr + rows[:, None] * stride_gn + dout[None, :], (acc * gscale).to(gx_ptr.dtype.element_ty),
             mask=rmask[:, None] & omask[None, :])


def forward_config(n: int, m: int, dtype: torch.dtype, max_splits: int = MAX_SPLITS,
                   anchor_group: int = ANCHOR_GROUP) -> dict:
    """Launch geometry of the forward: item splits of whole 64-item tiles (≤ MAX_SPLITS), groups
    of ANCHOR_GROUP anchors in 16-row blocks (small anchor blocks: with 32 samples per GPU
    there are only 64 anchors, and the splits carry the parallelism). Chosen so that no
    variant spills registers on sm_90 (``python -m fastlt.kernels.aot``): fp32 operands go
    through 3xTF32, which needs 8 warps and a 2-stage pipeline."""
    block_n = 64
    tiles = cdiv(n, block_n)
    splits = min(tiles, max_splits)
    fp32 = dtype == torch.float32
    return dict(grid=(splits, cdiv(m, anchor_group)), S=splits, tiles_per_split=cdiv(tiles, splits),
                meta=dict(ANCHOR_GROUP=anchor_group, BLOCK_M=16, BLOCK_N=block_n, BLOCK_D=32, BLOCK_J=32,
                          num_warps=8 if fp32 else 4, num_stages=2))


def backward_config(n: int, d: int, dtype: torch.dtype) -> dict:
    """Launch geometry of the backward: 16 item rows × ≤ 128 gradient columns per program,
    tiles of 64 anchors or items; 8 warps, and one pipeline stage for fp32 (no spills on sm_90)."""
    block_do = min(128, max(16, next_pow2(d)))
    return dict(grid=(cdiv(n, 16), cdiv(d, block_do)),
                meta=dict(BLOCK_R=16, BLOCK_T=64, BLOCK_D=32, BLOCK_DO=block_do, num_warps=8,
                          num_stages=1 if dtype == torch.float32 else 2))


# Test-only overrides of (MAX_SPLITS, ANCHOR_GROUP), so that small inputs reach several tiles
# per split and several anchor groups; None in normal use.
_TEST_GEOMETRY: tuple[int, int] | None = None


def _forward(items: Tensor, labels: Tensor, num_classes: int, temperature: float, anchor_start: int,
             num_anchors: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss 0-d fp32, lse (M,), 1/c (M,), class sizes (N,)) from the two forward launches."""
    n, d = items.shape
    m = num_anchors
    dev = items.device
    cfg = forward_config(n, m, items.dtype, *(_TEST_GEOMETRY or ()))
    cnt = torch.empty(n, device=dev, dtype=torch.float32)
    part = torch.empty(4, m, cfg["S"], device=dev, dtype=torch.float32)
    lse = torch.empty(m, device=dev, dtype=torch.float32)
    invp = torch.empty(m, device=dev, dtype=torch.float32)
    loss = torch.empty(1, device=dev, dtype=torch.float32)
    _balscl_fwd_kernel[cfg["grid"]](items, labels, cnt, part, n, d, anchor_start, m, num_classes, cfg["S"],
                                    cfg["tiles_per_split"], items.stride(0), items.stride(1), 1.0 / temperature,
                                    INPUT_PRECISION=fp32_dot_precision(), UPCAST_DOT=upcast_dot(items.dtype),
                                    **cfg["meta"])
    _balscl_combine_kernel[(1,)](part, lse, invp, loss, m, cfg["S"], 1.0 / m, BLOCK_A=64,
                                 BLOCK_S=max(2, next_pow2(cfg["S"])), num_warps=4)
    return loss.reshape(()), lse, invp, cnt


def _backward(grad: Tensor, items: Tensor, labels: Tensor, cnt: Tensor, lse: Tensor, invp: Tensor,
              temperature: float, anchor_start: int, num_anchors: int) -> Tensor:
    n, d = items.shape
    gx = torch.empty((n, d), device=items.device, dtype=items.dtype)
    cfg = backward_config(n, d, items.dtype)
    _balscl_bwd_kernel[cfg["grid"]](items, labels, cnt, lse, invp, grad.to(torch.float32).reshape(1), gx, n, d,
                                    anchor_start, num_anchors, items.stride(0), items.stride(1), gx.stride(0),
                                    1.0 / temperature, 1.0 / num_anchors, INPUT_PRECISION=fp32_dot_precision(),
                                    UPCAST_DOT=upcast_dot(items.dtype), **cfg["meta"])
    return gx


class _BalancedSupCon(torch.autograd.Function):
    @staticmethod
    def forward(ctx, items, labels, num_classes, temperature, anchor_start, num_anchors):
        loss, lse, invp, cnt = _forward(items, labels, num_classes, temperature, anchor_start, num_anchors)
        ctx.save_for_backward(items, labels, cnt, lse, invp)
        ctx.args = (temperature, anchor_start, num_anchors)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        items, labels, cnt, lse, invp = ctx.saved_tensors
        return (_backward(grad_loss, items, labels, cnt, lse, invp, *ctx.args),) + (None,) * 5


@torch.library.custom_op("fastlt::balscl_forward", mutates_args=())
def _balscl_forward_op(items: Tensor, labels: Tensor, num_classes: int, temperature: float, anchor_start: int,
                       num_anchors: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward(items, labels, num_classes, temperature, anchor_start, num_anchors)


@_balscl_forward_op.register_fake
def _(items, labels, num_classes, temperature, anchor_start, num_anchors):
    f32 = dict(dtype=torch.float32)
    return (items.new_empty((), **f32), items.new_empty((num_anchors,), **f32),
            items.new_empty((num_anchors,), **f32), items.new_empty((items.shape[0],), **f32))


@torch.library.custom_op("fastlt::balscl_backward", mutates_args=())
def _balscl_backward_op(grad: Tensor, items: Tensor, labels: Tensor, cnt: Tensor, lse: Tensor, invp: Tensor,
                        temperature: float, anchor_start: int, num_anchors: int) -> Tensor:
    return _backward(grad, items, labels, cnt, lse, invp, temperature, anchor_start, num_anchors)


@_balscl_backward_op.register_fake
def _(grad, items, labels, cnt, lse, invp, temperature, anchor_start, num_anchors):
    return items.new_empty(items.shape)


def _setup_context(ctx, inputs, output):
    items, labels, _, temperature, anchor_start, num_anchors = inputs
    _, lse, invp, cnt = output
    ctx.save_for_backward(items, labels, cnt, lse, invp)
    ctx.args = (temperature, anchor_start, num_anchors)
    ctx.mark_non_differentiable(lse, invp, cnt)


def _autograd_backward(ctx, grad_loss, _grad_lse, _grad_invp, _grad_cnt):
    items, labels, cnt, lse, invp = ctx.saved_tensors
    return (_balscl_backward_op(grad_loss, items, labels, cnt, lse, invp, *ctx.args),) + (None,) * 5


torch.library.register_autograd("fastlt::balscl_forward", _autograd_backward, setup_context=_setup_context)


def balanced_supcon_loss_triton(items: Tensor, item_labels: Tensor, num_classes: int, temperature: float,
                                anchor_start: int = 0, num_anchors: int | None = None) -> Tensor:
    """``fastlt.method.losses.balanced_supcon_loss`` from the fused kernels (same arguments and result;
    the loss is fp32 whatever the items' dtype, the gradient in the items' dtype)."""
    m = resolve_supcon_args(items, item_labels, num_classes, temperature, anchor_start, num_anchors)
    if items.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        items = items.float()  # fp64 computed in fp32; autograd casts the gradient back
    labels = item_labels.to(torch.int64).contiguous()
    args = (items, labels, int(num_classes), float(temperature), int(anchor_start), int(m))
    if torch.compiler.is_compiling():
        return _balscl_forward_op(*args)[0]
    return _BalancedSupCon.apply(*args)
