"""Fused logit-adjusted soft cross-entropy in Triton (ARCHITECTURE §1, "Losses", L_cls).

L = (1/B) Σ_i [ lse_i · Σ_j t_ij − Σ_j t_ij x_ij ],  x = logits + τ·log π (the ``bias``),
which equals −(1/B) Σ_i Σ_j t_ij log softmax(x_i)_j, the spec of
``fastlt.losses.reference_soft_cross_entropy`` (Σ_j t_ij is kept rather than assumed 1).
∂L/∂x_ij = g/B · (p_ij · Σ_j t_ij − t_ij),  p = exp(x − lse);  ∂L/∂t_ij = −g/B · (x_ij − lse_i).

One program per row. The forward streams the row once in BLOCK_C tiles with an online
softmax (running max and rescaled sum), so softmax is never materialised, and saves only
lse_i and Σ_j t_ij per row; the backward streams logits and target once more and writes the
gradients. Two target forms:

* dense: a (B, C) soft label (``soft_cross_entropy_triton``);
* compact: ŷ = γ·scatter(index, weight) + (1−γ)·(λ·onehot(a) + (1−λ)·onehot(b)) given as
  (index (B, K), weight (B, K), γ, label_a, label_b, λ) — the form the rectification kernel
  emits (``soft_cross_entropy_compact_triton``) — so the B×C label never exists. Its
  backward writes the dense part of the gradient in one pass, then, after a block barrier,
  rewrites the K kept positions with their full gradient (indices in a row must be distinct).

In eager mode each form runs through an ``autograd.Function`` (low per-call overhead); under
``torch.compile`` through ``torch.library`` custom ops with fake implementations and
registered autograd, which Dynamo can trace without graph breaks.
"""
from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from ._jit import cdiv, jit, next_pow2

__all__ = ["soft_cross_entropy_compact_triton", "soft_cross_entropy_triton"]


@jit
def _soft_ce_fwd_kernel(x_ptr, t_ptr, bias_ptr, loss_ptr, lse_ptr, tsum_ptr, C, stride_xb, stride_tb,
                        HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, NUM_TILES: tl.constexpr):
    """Per-row loss, lse and Σ t for a dense target.

    Pointers: x_ptr (B, C) logits fp32/bf16/fp16; t_ptr (B, C) target, any float dtype;
    bias_ptr (C,) fp32 (read if HAS_BIAS); loss_ptr, lse_ptr, tsum_ptr (B,) fp32 outputs.
    Scalars: C; stride_xb, stride_tb, row strides (unit stride along C).
    Constexprs: HAS_BIAS; BLOCK_C, the row tile; NUM_TILES = ⌈C / BLOCK_C⌉.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    m = -float("inf")
    l = 0.0
    tx = 0.0
    ts = 0.0
    for t in range(NUM_TILES):
        cols = t * BLOCK_C + offs
        cmask = cols < C
        x = tl.load(x_ptr + row * stride_xb + cols, mask=cmask, other=-float("inf")).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        tt = tl.load(t_ptr + row * stride_tb + cols, mask=cmask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        tx += tl.sum(tt * tl.where(cmask, x, 0.0), axis=0)  # padding is -inf in x, 0 in tt
        ts += tl.sum(tt, axis=0)
    lse = m + tl.log(l)
    tl.store(loss_ptr + row, lse * ts - tx)
    tl.store(lse_ptr + row, lse)
    tl.store(tsum_ptr + row, ts)


@jit
def _soft_ce_bwd_kernel(g_ptr, x_ptr, t_ptr, bias_ptr, lse_ptr, tsum_ptr, gx_ptr, gt_ptr, C, inv_b,
                        stride_xb, stride_tb, stride_gxb, stride_gtb,
                        HAS_BIAS: tl.constexpr, WRITE_GT: tl.constexpr, BLOCK_C: tl.constexpr,
                        NUM_TILES: tl.constexpr):
    """∂L/∂x (and ∂L/∂t if WRITE_GT) for a dense target.

    Pointers: g_ptr (1,) fp32 upstream gradient of the mean loss; x_ptr, t_ptr, bias_ptr as
    in the forward; lse_ptr, tsum_ptr (B,) fp32 saved by the forward; gx_ptr (B, C) in the
    logits' dtype; gt_ptr (B, C) in the target's dtype (written if WRITE_GT).
    Scalars: C; inv_b = 1/B; row strides of x, t, gx, gt. Constexprs as in the forward.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    scale = tl.load(g_ptr) * inv_b
    lse = tl.load(lse_ptr + row)
    ts = tl.load(tsum_ptr + row)
    for t in range(NUM_TILES):
        cols = t * BLOCK_C + offs
        cmask = cols < C
        x = tl.load(x_ptr + row * stride_xb + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        tt = tl.load(t_ptr + row * stride_tb + cols, mask=cmask, other=0.0).to(tl.float32)
        log_p = x - lse
        gx = scale * (tl.exp(log_p) * ts - tt)
        tl.store(gx_ptr + row * stride_gxb + cols, gx.to(gx_ptr.dtype.element_ty), mask=cmask)
        if WRITE_GT:
            tl.store(gt_ptr + row * stride_gtb + cols, (-scale * log_p).to(gt_ptr.dtype.element_ty), mask=cmask)


@jit
def _soft_ce_compact_fwd_kernel(x_ptr, bias_ptr, idx_ptr, w_ptr, gamma_ptr, la_ptr, lb_ptr, lam_ptr,
                                loss_ptr, lse_ptr, tsum_ptr, C, K, stride_xb,
                                HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, NUM_TILES: tl.constexpr,
                                BLOCK_K: tl.constexpr, NUM_K_TILES: tl.constexpr):
    """Per-row loss, lse and Σ ŷ for the compact label.

    Pointers: x_ptr (B, C) logits; bias_ptr (C,) fp32; idx_ptr (B, K) int64 distinct class
    indices; w_ptr (B, K) fp32 weights ŝ; gamma_ptr (B,) fp32 γ; la_ptr, lb_ptr (B,) int64;
    lam_ptr (B,) fp32 λ; loss_ptr, lse_ptr, tsum_ptr (B,) fp32 outputs.
    Scalars: C, K; stride_xb, the logits' row stride (unit stride along C).
    Constexprs: HAS_BIAS; BLOCK_C, NUM_TILES as in the dense kernels; BLOCK_K, the chunk of
    the K gathered entries; NUM_K_TILES = ⌈K / BLOCK_K⌉.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xb
    offs = tl.arange(0, BLOCK_C)
    m = -float("inf")
    l = 0.0
    for t in range(NUM_TILES):
        cols = t * BLOCK_C + offs
        cmask = cols < C
        x = tl.load(x_row + cols, mask=cmask, other=-float("inf")).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(l)

    # Σ_j ŷ_j x_j = γ Σ_k w_k x[idx_k] + (1−γ)(λ x_a + (1−λ) x_b), from K + 2 gathered logits.
    gamma = tl.load(gamma_ptr + row)
    lam = tl.load(lam_ptr + row)
    one_minus = 1.0 - lam
    a = tl.load(la_ptr + row)
    b = tl.load(lb_ptr + row)
    # Class indices outside [0, C) are never dereferenced (no host sync to check them on
    # CUDA): they are masked out and make the row's loss NaN instead.
    n_bad = ((a < 0) | (a >= C) | (b < 0) | (b >= C)).to(tl.int32)
    a = tl.where((a >= 0) & (a < C), a, 0)
    b = tl.where((b >= 0) & (b < C), b, 0)
    x_a = tl.load(x_row + a).to(tl.float32)
    x_b = tl.load(x_row + b).to(tl.float32)
    if HAS_BIAS:
        x_a += tl.load(bias_ptr + a)
        x_b += tl.load(bias_ptr + b)
    koffs = tl.arange(0, BLOCK_K)
    wx = 0.0
    ws = 0.0
    for t in range(NUM_K_TILES):
        ks = t * BLOCK_K + koffs
        kmask = ks < K
        idx = tl.load(idx_ptr + row * K + ks, mask=kmask, other=0)
        ok = (idx >= 0) & (idx < C)
        n_bad += tl.sum((kmask & ~ok).to(tl.int32), axis=0)
        kmask = kmask & ok
        w = tl.load(w_ptr + row * K + ks, mask=kmask, other=0.0)
        xk = tl.load(x_row + idx, mask=kmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            xk += tl.load(bias_ptr + idx, mask=kmask, other=0.0)
        wx += tl.sum(w * xk, axis=0)
        ws += tl.sum(w, axis=0)
    tx = gamma * wx + (1.0 - gamma) * (lam * x_a + one_minus * x_b)
    ts = gamma * ws + (1.0 - gamma) * (lam + one_minus)
    loss = tl.where(n_bad == 0, lse * ts - tx, float("nan"))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    tl.store(tsum_ptr + row, ts)


@jit
def _soft_ce_compact_bwd_kernel(g_ptr, x_ptr, bias_ptr, idx_ptr, w_ptr, gamma_ptr, la_ptr, lb_ptr, lam_ptr,
                                lse_ptr, tsum_ptr, gx_ptr, C, K, inv_b, stride_xb, stride_gxb,
                                HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, NUM_TILES: tl.constexpr,
                                BLOCK_K: tl.constexpr, NUM_K_TILES: tl.constexpr):
    """∂L/∂x for the compact label: g/B·(p·Σŷ − (1−γ)·y) densely, then the K kept entries.

    Pointers as in ``_soft_ce_compact_fwd_kernel`` plus g_ptr (1,) fp32 upstream gradient,
    lse_ptr, tsum_ptr (B,) fp32 saved by the forward and gx_ptr (B, C) in the logits' dtype.
    Scalars: C, K, inv_b = 1/B, row strides of x and gx. Constexprs as in the forward.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xb
    gx_row = gx_ptr + row * stride_gxb
    offs = tl.arange(0, BLOCK_C)
    scale = tl.load(g_ptr) * inv_b
    lse = tl.load(lse_ptr + row)
    ts = tl.load(tsum_ptr + row)
    gamma = tl.load(gamma_ptr + row)
    lam = tl.load(lam_ptr + row)
    a = tl.load(la_ptr + row)
    b = tl.load(lb_ptr + row)
    for t in range(NUM_TILES):
        cols = t * BLOCK_C + offs
        cmask = cols < C
        x = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        y = tl.where(cols == a, lam, 0.0) + tl.where(cols == b, 1.0 - lam, 0.0)
        gx = scale * (tl.exp(x - lse) * ts - (1.0 - gamma) * y)
        tl.store(gx_row + cols, gx.to(gx_ptr.dtype.element_ty), mask=cmask)
    # The K kept entries are then rewritten with their full value, recomputed in fp32 so that
    # it is rounded once to the logits' dtype (adding to the stored value would round twice).
    # The barrier orders these stores after the dense pass's stores to the same addresses,
    # which other threads of the block may have made. Indices of a row are distinct.
    tl.debug_barrier()
    koffs = tl.arange(0, BLOCK_K)
    for t in range(NUM_K_TILES):
        ks = t * BLOCK_K + koffs
        kmask = ks < K
        idx = tl.load(idx_ptr + row * K + ks, mask=kmask, other=0)
        kmask = kmask & (idx >= 0) & (idx < C)  # never write outside the row (see forward)
        w = tl.load(w_ptr + row * K + ks, mask=kmask, other=0.0)
        x = tl.load(x_row + idx, mask=kmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + idx, mask=kmask, other=0.0)
        y = tl.where(idx == a, lam, 0.0) + tl.where(idx == b, 1.0 - lam, 0.0)
        gx = scale * (tl.exp(x - lse) * ts - gamma * w - (1.0 - gamma) * y)
        tl.store(gx_row + idx, gx.to(gx_ptr.dtype.element_ty), mask=kmask)


def _row_config(c: int) -> dict:
    block = min(next_pow2(c), 4096)
    return dict(BLOCK_C=block, NUM_TILES=cdiv(c, block), num_warps=4 if block <= 1024 else 8)


def _k_config(k: int) -> dict:
    block = min(next_pow2(max(k, 1)), 1024)
    return dict(BLOCK_K=block, NUM_K_TILES=cdiv(max(k, 1), block))


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------- dense target
#
# Two entry points share the launchers: in eager mode an ``autograd.Function`` (its Python
# overhead per call is well below a custom op's, which matters at these sub-millisecond
# sizes), under ``torch.compile`` the ``fastlt::`` custom ops, which Dynamo can put in a graph
# through their fake implementations.

def _fwd(logits: Tensor, target: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    b, c = logits.shape
    loss_rows = torch.empty(b, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss_rows)
    tsum = torch.empty_like(loss_rows)
    if b > 0:
        _soft_ce_fwd_kernel[(b,)](logits, target, bias if bias is not None else logits, loss_rows, lse, tsum, c,
                                  logits.stride(0), target.stride(0), HAS_BIAS=bias is not None, **_row_config(c))
    # Mean over the batch from per-row losses: deterministic, unlike an atomic accumulation.
    return loss_rows.mean(), lse, tsum


def _bwd(grad: Tensor, logits: Tensor, target: Tensor, bias: Tensor | None, lse: Tensor, tsum: Tensor,
         target_grad: bool) -> tuple[Tensor, Tensor]:
    b, c = logits.shape
    gx = torch.empty_like(logits, memory_format=torch.contiguous_format)
    gt = (torch.empty_like(target, memory_format=torch.contiguous_format) if target_grad
          else target.new_empty((0,)))
    if b > 0:
        _soft_ce_bwd_kernel[(b,)](grad.to(torch.float32).reshape(1), logits, target,
                                  bias if bias is not None else logits, lse, tsum, gx, gt if target_grad else gx,
                                  c, 1.0 / b, logits.stride(0), target.stride(0), gx.stride(0),
                                  gt.stride(0) if target_grad else 0, HAS_BIAS=bias is not None,
                                  WRITE_GT=target_grad, **_row_config(c))
    return gx, gt


def _grads(needs, gx, gt, bias):
    need_x, need_t, need_bias = needs
    grad_bias = gx.float().sum(0).to(bias.dtype) if need_bias else None
    return (gx if need_x else None), (gt if need_t else None), grad_bias


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, bias):
        loss, lse, tsum = _fwd(logits, target, bias)
        ctx.save_for_backward(logits, target, bias, lse, tsum)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, bias, lse, tsum = ctx.saved_tensors
        gx, gt = _bwd(grad_loss, logits, target, bias, lse, tsum, bool(ctx.needs_input_grad[1]))
        return _grads(ctx.needs_input_grad, gx, gt, bias)


@torch.library.custom_op("fastlt::soft_ce_forward", mutates_args=())
def _soft_ce_forward(logits: Tensor, target: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return _fwd(logits, target, bias)


@_soft_ce_forward.register_fake
def _(logits, target, bias):
    b = logits.shape[0]
    f32 = dict(dtype=torch.float32)
    return logits.new_empty((), **f32), logits.new_empty((b,), **f32), logits.new_empty((b,), **f32)


@torch.library.custom_op("fastlt::soft_ce_backward", mutates_args=())
def _soft_ce_backward(grad: Tensor, logits: Tensor, target: Tensor, bias: Tensor | None, lse: Tensor,
                      tsum: Tensor, target_grad: bool) -> tuple[Tensor, Tensor]:
    return _bwd(grad, logits, target, bias, lse, tsum, target_grad)


@_soft_ce_backward.register_fake
def _(grad, logits, target, bias, lse, tsum, target_grad):
    return (torch.empty_like(logits, memory_format=torch.contiguous_format),
            torch.empty_like(target, memory_format=torch.contiguous_format) if target_grad
            else target.new_empty((0,)))


def _soft_ce_setup_context(ctx, inputs, output):
    logits, target, bias = inputs
    _, lse, tsum = output
    ctx.save_for_backward(logits, target, bias, lse, tsum)
    ctx.mark_non_differentiable(lse, tsum)


def _soft_ce_autograd_backward(ctx, grad_loss, _grad_lse, _grad_tsum):
    logits, target, bias, lse, tsum = ctx.saved_tensors
    gx, gt = _soft_ce_backward(grad_loss, logits, target, bias, lse, tsum, bool(ctx.needs_input_grad[1]))
    return _grads(ctx.needs_input_grad, gx, gt, bias)


torch.library.register_autograd("fastlt::soft_ce_forward", _soft_ce_autograd_backward,
                                setup_context=_soft_ce_setup_context)


def _check_bias(bias: Tensor | None, logits: Tensor, what: str) -> Tensor | None:
    if bias is None:
        return None
    if bias.shape != (logits.shape[1],):
        raise ValueError(f"{what}: bias must be ({logits.shape[1]},) to match the logits; got {tuple(bias.shape)}")
    return bias.to(device=logits.device, dtype=torch.float32).contiguous()


def _check_logits(logits: Tensor, what: str) -> Tensor:
    if logits.dim() != 2:
        raise ValueError(f"{what}: logits must be (B, C); got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{what}: logits must be a floating-point tensor; got {logits.dtype}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        # The reference computes in fp32 too; autograd casts the gradient back.
        logits = logits.float()
    return _rows_contiguous(logits)


def soft_cross_entropy_triton(logits: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
    """−(1/B) Σ_i Σ_j target_ij · log softmax(logits_i + bias)_j from the fused kernels.

    Same contract as ``fastlt.losses.reference_soft_cross_entropy``: fp32 loss, gradients to
    logits (in their dtype), target and bias when they require them.
    """
    logits = _check_logits(logits, "soft_cross_entropy")
    if target.shape != logits.shape:
        raise ValueError(f"soft_cross_entropy: target must have the logits' shape {tuple(logits.shape)}; "
                         f"got {tuple(target.shape)}")
    if not target.is_floating_point():
        raise ValueError(f"soft_cross_entropy: target must be a float soft label; got {target.dtype}")
    bias = _check_bias(bias, logits, "soft_cross_entropy")
    target = _rows_contiguous(target)
    if torch.compiler.is_compiling():
        return _soft_ce_forward(logits, target, bias)[0]
    return _SoftCrossEntropy.apply(logits, target, bias)


# -------------------------------------------------------------------------- compact target

def _compact_fwd(logits, bias, index, weight, gamma, label_a, label_b, lam):
    b, c = logits.shape
    k = index.shape[1]
    loss_rows = torch.empty(b, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss_rows)
    tsum = torch.empty_like(loss_rows)
    if b > 0:
        _soft_ce_compact_fwd_kernel[(b,)](logits, bias if bias is not None else logits, index, weight, gamma,
                                          label_a, label_b, lam, loss_rows, lse, tsum, c, k, logits.stride(0),
                                          HAS_BIAS=bias is not None, **_row_config(c), **_k_config(k))
    return loss_rows.mean(), lse, tsum


def _compact_bwd(grad, logits, bias, index, weight, gamma, label_a, label_b, lam, lse, tsum):
    b, c = logits.shape
    k = index.shape[1]
    gx = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if b > 0:
        _soft_ce_compact_bwd_kernel[(b,)](grad.to(torch.float32).reshape(1), logits,
                                          bias if bias is not None else logits, index, weight, gamma, label_a,
                                          label_b, lam, lse, tsum, gx, c, k, 1.0 / b, logits.stride(0),
                                          gx.stride(0), HAS_BIAS=bias is not None, **_row_config(c),
                                          **_k_config(k))
    return gx


def _compact_check_needs(needs) -> None:
    if any(needs[1:]):
        raise RuntimeError("soft_cross_entropy_compact: gradients flow to the logits only; the compact label "
                           "(and the bias) must not require grad. Detach them, or use the dense "
                           "soft_cross_entropy.")


class _SoftCrossEntropyCompact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, index, weight, gamma, label_a, label_b, lam):
        loss, lse, tsum = _compact_fwd(logits, bias, index, weight, gamma, label_a, label_b, lam)
        ctx.save_for_backward(logits, bias, index, weight, gamma, label_a, label_b, lam, lse, tsum)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _compact_check_needs(ctx.needs_input_grad)
        return (_compact_bwd(grad_loss, *ctx.saved_tensors),) + (None,) * 7


@torch.library.custom_op("fastlt::soft_ce_compact_forward", mutates_args=())
def _soft_ce_compact_forward(logits: Tensor, bias: Tensor | None, index: Tensor, weight: Tensor, gamma: Tensor,
                             label_a: Tensor, label_b: Tensor, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _compact_fwd(logits, bias, index, weight, gamma, label_a, label_b, lam)


@_soft_ce_compact_forward.register_fake
def _(logits, bias, index, weight, gamma, label_a, label_b, lam):
    b = logits.shape[0]
    f32 = dict(dtype=torch.float32)
    return logits.new_empty((), **f32), logits.new_empty((b,), **f32), logits.new_empty((b,), **f32)


@torch.library.custom_op("fastlt::soft_ce_compact_backward", mutates_args=())
def _soft_ce_compact_backward(grad: Tensor, logits: Tensor, bias: Tensor | None, index: Tensor, weight: Tensor,
                              gamma: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor, lse: Tensor,
                              tsum: Tensor) -> Tensor:
    return _compact_bwd(grad, logits, bias, index, weight, gamma, label_a, label_b, lam, lse, tsum)


@_soft_ce_compact_backward.register_fake
def _(grad, logits, bias, index, weight, gamma, label_a, label_b, lam, lse, tsum):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _compact_setup_context(ctx, inputs, output):
    _, lse, tsum = output
    ctx.save_for_backward(*inputs, lse, tsum)
    ctx.mark_non_differentiable(lse, tsum)


def _compact_autograd_backward(ctx, grad_loss, _grad_lse, _grad_tsum):
    _compact_check_needs(ctx.needs_input_grad)
    gx = _soft_ce_compact_backward(grad_loss, *ctx.saved_tensors)
    return (gx,) + (None,) * 7


torch.library.register_autograd("fastlt::soft_ce_compact_forward", _compact_autograd_backward,
                                setup_context=_compact_setup_context)


def soft_cross_entropy_compact_triton(logits: Tensor, index: Tensor, weight: Tensor, gamma: Tensor,
                                      label_a: Tensor, label_b: Tensor, lam: Tensor,
                                      bias: Tensor | None = None) -> Tensor:
    """Soft CE against the compact label; inputs already validated by ``fastlt.kernels.compact``."""
    logits = _check_logits(logits, "soft_cross_entropy_compact")
    bias = _check_bias(bias, logits, "soft_cross_entropy_compact")
    dev = logits.device
    args = (logits, bias, index.to(dev, torch.int64).contiguous(), weight.to(dev, torch.float32).contiguous(),
            gamma.to(dev, torch.float32).contiguous(), label_a.to(dev, torch.int64).contiguous(),
            label_b.to(dev, torch.int64).contiguous(), lam.to(dev, torch.float32).contiguous())
    if torch.compiler.is_compiling():
        return _soft_ce_compact_forward(*args)[0]
    return _SoftCrossEntropyCompact.apply(*args)
