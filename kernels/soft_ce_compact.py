"""Fused logit-adjusted soft cross-entropy against the compact ConCutMix label (docs/design.md §1).

The label ŷ = γ·scatter(index, weight) + (1−γ)·(λ·onehot(a) + (1−λ)·onehot(b)) is given as
(index (B, K), weight (B, K), γ, label_a, label_b, λ) — the form the rectification kernel
emits — so the B×C label never exists. Same design as :mod:`fastlt.kernels.soft_ce` (one
program per row, online softmax, the gradient written by the forward launch for an upstream
gradient of 1 and scaled by the backward on the device): the loss needs lse and K + 2
gathered logits, Σ_j ŷ_j x_j = γ Σ_k w_k x[idx_k] + (1−γ)(λ x_a + (1−λ) x_b); the gradient
pass writes the dense part 1/B·(p·Σŷ − (1−γ)·y), then, after a block barrier, rewrites the
K kept positions with their full gradient (indices in a row must be distinct). Gradients
flow to the logits only.
"""
from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from ._jit import jit
from .soft_ce import _check_bias, _check_logits, _grad_buffer, _k_config, _needs_grad, _row_config, _take_grads

__all__ = ["soft_cross_entropy_compact_triton"]


@jit
def _soft_ce_compact_kernel(x_ptr, bias_ptr, idx_ptr, w_ptr, gamma_ptr, la_ptr, lb_ptr, lam_ptr, loss_ptr, gx_ptr,
                            C, K, inv_b, stride_xb, stride_gxb,
                            HAS_BIAS: tl.constexpr, WRITE_GX: tl.constexpr, BLOCK_C: tl.constexpr,
                            NUM_TILES: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K_TILES: tl.constexpr):
    """Per-row loss for the compact label, and ∂L/∂x for an upstream gradient of 1.

    Pointers: x_ptr (B, C) logits; bias_ptr (C,) fp32; idx_ptr (B, K) int64 distinct class
    indices; w_ptr (B, K) fp32 weights ŝ; gamma_ptr (B,) fp32 γ; la_ptr, lb_ptr (B,) int64;
    lam_ptr (B,) fp32 λ; loss_ptr (B,) fp32 per-row losses; gx_ptr (B, C) in the logits'
    dtype (written if WRITE_GX): 1/B·(p·Σŷ − (1−γ)·y) densely, then the K kept entries.
    Scalars: C, K; inv_b = 1/B; stride_xb, stride_gxb, row strides (unit stride along C).
    Constexprs: HAS_BIAS, WRITE_GX; BLOCK_C, NUM_TILES as in the dense kernel; BLOCK_K, the
    chunk of the K gathered entries; NUM_K_TILES = ⌈K / BLOCK_K⌉.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xb
    gx_row = gx_ptr + row * stride_gxb
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
    tl.store(loss_ptr + row, tl.where(n_bad == 0, lse * ts - tx, float("nan")))

    if WRITE_GX:
        for t in range(NUM_TILES):
            cols = t * BLOCK_C + offs
            cmask = cols < C
            x = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + cols, mask=cmask, other=0.0)
            y = tl.where(cols == a, lam, 0.0) + tl.where(cols == b, one_minus, 0.0)
            gx = inv_b * (tl.exp(x - lse) * ts - (1.0 - gamma) * y)
            tl.store(gx_row + cols, gx.to(gx_ptr.dtype.element_ty), mask=cmask)
        # The K kept entries are then rewritten with their full value, recomputed in fp32 so
        # that it is rounded once to the logits' dtype (adding to the stored value would round
        # twice). The barrier orders these stores after the dense pass's stores to the same
        # addresses, which other threads of the block may have made. Indices of a row are
        # distinct.
        tl.debug_barrier()
        for t in range(NUM_K_TILES):
            ks = t * BLOCK_K + koffs
            kmask = ks < K
            idx = tl.load(idx_ptr + row * K + ks, mask=kmask, other=0)
            kmask = kmask & (idx >= 0) & (idx < C)  # never write outside the row (see above)
            w = tl.load(w_ptr + row * K + ks, mask=kmask, other=0.0)
            x = tl.load(x_row + idx, mask=kmask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + idx, mask=kmask, other=0.0)
            y = tl.where(idx == a, lam, 0.0) + tl.where(idx == b, one_minus, 0.0)
            gx = inv_b * (tl.exp(x - lse) * ts - gamma * w - (1.0 - gamma) * y)
            tl.store(gx_row + idx, gx.to(gx_ptr.dtype.element_ty), mask=kmask)


def _compact(logits, bias, index, weight, gamma, label_a, label_b, lam, write_gx: bool):
    b, c = logits.shape
    k = index.shape[1]
    loss_rows = torch.empty(b, device=logits.device, dtype=torch.float32)
    gx = _grad_buffer(logits, write_gx)
    if b > 0:
        _soft_ce_compact_kernel[(b,)](logits, bias if bias is not None else logits, index, weight, gamma, label_a,
                                      label_b, lam, loss_rows, gx if write_gx else logits, c, k, 1.0 / b,
                                      logits.stride(0), gx.stride(0) if write_gx else 0, HAS_BIAS=bias is not None,
                                      WRITE_GX=write_gx, **_row_config(c), **_k_config(k))
    return loss_rows.mean(), gx


class _SoftCrossEntropyCompact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, index, weight, gamma, label_a, label_b, lam):
        loss, gx = _compact(logits, bias, index, weight, gamma, label_a, label_b, lam, ctx.needs_input_grad[0])
        ctx.grads = (gx,)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (gx,) = _take_grads(ctx, "soft_cross_entropy_compact")
        return (gx.mul_(grad_loss.to(torch.float32)),) + (None,) * 7


@torch.library.custom_op("fastlt::soft_ce_compact", mutates_args=())
def _soft_ce_compact_op(logits: Tensor, bias: Tensor | None, index: Tensor, weight: Tensor, gamma: Tensor,
                        label_a: Tensor, label_b: Tensor, lam: Tensor, write_gx: bool) -> tuple[Tensor, Tensor]:
    return _compact(logits, bias, index, weight, gamma, label_a, label_b, lam, write_gx)


@_soft_ce_compact_op.register_fake
def _(logits, bias, index, weight, gamma, label_a, label_b, lam, write_gx):
    return logits.new_empty((), dtype=torch.float32), _grad_buffer(logits, write_gx)


def _compact_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _compact_autograd_backward(ctx, grad_loss, _grad_gx):
    (gx,) = ctx.saved_tensors
    return (gx * grad_loss.to(torch.float32),) + (None,) * 8


torch.library.register_autograd("fastlt::soft_ce_compact", _compact_autograd_backward,
                                setup_context=_compact_setup_context)


def soft_cross_entropy_compact_triton(logits: Tensor, index: Tensor, weight: Tensor, gamma: Tensor,
                                      label_a: Tensor, label_b: Tensor, lam: Tensor,
                                      bias: Tensor | None = None) -> Tensor:
    """Soft CE against the compact label; inputs already validated by ``fastlt.kernels.compact``.

    Gradients flow to the logits only: a label or bias that requires grad is an error.
    """
    if any(_needs_grad(t) for t in (index, weight, gamma, lam, bias)):
        raise RuntimeError("soft_cross_entropy_compact: gradients flow to the logits only; the compact label "
                           "(and the bias) must not require grad. Detach them, or use the dense "
                           "soft_cross_entropy.")
    logits = _check_logits(logits, "soft_cross_entropy_compact")
    bias = _check_bias(bias, logits, "soft_cross_entropy_compact")
    dev = logits.device
    args = (logits, bias, index.to(dev, torch.int64).contiguous(), weight.to(dev, torch.float32).contiguous(),
            gamma.to(dev, torch.float32).contiguous(), label_a.to(dev, torch.int64).contiguous(),
            label_b.to(dev, torch.int64).contiguous(), lam.to(dev, torch.float32).contiguous())
    if torch.compiler.is_compiling():
        return _soft_ce_compact_op(*args, _needs_grad(logits))[0]
    return _SoftCrossEntropyCompact.apply(*args)
