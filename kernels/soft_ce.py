"""Fused logit-adjusted soft cross-entropy in Triton (docs/design.md §1, "Losses", L_cls).

L = (1/B) Σ_i [ lse_i · Σ_j t_ij − Σ_j t_ij x_ij ],  x = logits + τ·log π (the ``bias``),
which equals −(1/B) Σ_i Σ_j t_ij log softmax(x_i)_j, the spec of
``fastlt.method.losses.reference_soft_cross_entropy`` (Σ_j t_ij is kept rather than assumed 1).
∂L/∂x_ij = g/B · (p_ij · Σ_j t_ij − t_ij),  p = exp(x − lse);  ∂L/∂t_ij = −g/B · (x_ij − lse_i).

One program per row, one launch. The kernel streams the row in BLOCK_C tiles with an online
softmax (running max and rescaled sum), so softmax is never materialised; rows of up to
4096 classes are one tile and are read once. **The gradient is written in the same launch**
(the pattern of Liger-Kernel's fused losses): once lse_i is known the program makes a
second pass over its row and writes ∂L/∂x (and ∂L/∂t when the target requires grad) for
g = 1. The loss is a scalar, so whatever follows it the gradient that reaches the logits is
g·(that gradient) with g = grad_output, a 0-d tensor: the backward only multiplies by it, on
the device (one elementwise op; no host-side test of g, which would be a sync). The logits
and the target are read once per row instead of twice, and the backward launches no Triton
kernel. The stored gradient is scaled in place (no second B×C buffer), so a second backward
through the same graph (``retain_graph=True``) is refused with an error. bf16/fp16 gradients
are rounded twice when g ≠ 1 (stored in the logits' dtype, then scaled), so they may differ
from autograd's (rounded once) by two units in the last place instead of one; keeping them
in fp32 would cost a second elementwise launch (the cast) in every backward. Nothing is
computed for the gradient when no input requires grad.

This module holds the dense target, a (B, C) soft label (``soft_cross_entropy_triton``);
:mod:`fastlt.kernels.soft_ce_compact` the compact ConCutMix label, with the same design.

In eager mode each form runs through an ``autograd.Function`` (low per-call overhead); under
``torch.compile`` through ``torch.library`` custom ops with fake implementations and
registered autograd (whose backward multiplies out of place, as functional graphs require),
which Dynamo can trace without graph breaks.
"""
from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from ._jit import cdiv, jit, next_pow2

__all__ = ["soft_cross_entropy_triton"]


@jit
def _soft_ce_kernel(x_ptr, t_ptr, bias_ptr, loss_ptr, gx_ptr, gt_ptr, C, inv_b, stride_xb, stride_tb, stride_gxb,
                    stride_gtb, HAS_BIAS: tl.constexpr, WRITE_GX: tl.constexpr, WRITE_GT: tl.constexpr,
                    BLOCK_C: tl.constexpr, NUM_TILES: tl.constexpr):
    """Per-row loss for a dense target, and its gradients for an upstream gradient of 1.

    Pointers: x_ptr (B, C) logits fp32/bf16/fp16; t_ptr (B, C) target, any float dtype;
    bias_ptr (C,) fp32 (read if HAS_BIAS); loss_ptr (B,) fp32 per-row losses (their mean is
    L); gx_ptr (B, C) ∂L/∂x in the logits' dtype (written if WRITE_GX); gt_ptr (B, C) ∂L/∂t
    in the target's dtype (written if WRITE_GT).
    Scalars: C; inv_b = 1/B; stride_xb, stride_tb, stride_gxb, stride_gtb, row strides (unit
    stride along C). Constexprs: HAS_BIAS, WRITE_GX, WRITE_GT; BLOCK_C, the row tile;
    NUM_TILES = ⌈C / BLOCK_C⌉ (1: the row is loaded once and kept in registers).
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    if NUM_TILES == 1:
        cmask = offs < C
        x = tl.load(x_ptr + row * stride_xb + offs, mask=cmask, other=-float("inf")).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + offs, mask=cmask, other=0.0)
        tt = tl.load(t_ptr + row * stride_tb + offs, mask=cmask, other=0.0).to(tl.float32)
        m = tl.max(x, axis=0)
        lse = m + tl.log(tl.sum(tl.exp(x - m), axis=0))
        tx = tl.sum(tt * tl.where(cmask, x, 0.0), axis=0)  # padding is -inf in x, 0 in tt
        ts = tl.sum(tt, axis=0)
        log_p = x - lse
        if WRITE_GX:
            gx = inv_b * (tl.exp(log_p) * ts - tt)
            tl.store(gx_ptr + row * stride_gxb + offs, gx.to(gx_ptr.dtype.element_ty), mask=cmask)
        if WRITE_GT:
            tl.store(gt_ptr + row * stride_gtb + offs, (-inv_b * log_p).to(gt_ptr.dtype.element_ty), mask=cmask)
    else:
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
            tx += tl.sum(tt * tl.where(cmask, x, 0.0), axis=0)
            ts += tl.sum(tt, axis=0)
        lse = m + tl.log(l)
        if WRITE_GX or WRITE_GT:
            for t in range(NUM_TILES):
                cols = t * BLOCK_C + offs
                cmask = cols < C
                x = tl.load(x_ptr + row * stride_xb + cols, mask=cmask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    x += tl.load(bias_ptr + cols, mask=cmask, other=0.0)
                log_p = x - lse
                if WRITE_GX:
                    tt = tl.load(t_ptr + row * stride_tb + cols, mask=cmask, other=0.0).to(tl.float32)
                    gx = inv_b * (tl.exp(log_p) * ts - tt)
                    tl.store(gx_ptr + row * stride_gxb + cols, gx.to(gx_ptr.dtype.element_ty), mask=cmask)
                if WRITE_GT:
                    tl.store(gt_ptr + row * stride_gtb + cols, (-inv_b * log_p).to(gt_ptr.dtype.element_ty),
                             mask=cmask)
    tl.store(loss_ptr + row, lse * ts - tx)


def _row_config(c: int) -> dict:
    block = min(next_pow2(c), 4096)
    return dict(BLOCK_C=block, NUM_TILES=cdiv(c, block), num_warps=4 if block <= 1024 else 8)


def _k_config(k: int) -> dict:
    block = min(next_pow2(max(k, 1)), 1024)
    return dict(BLOCK_K=block, NUM_K_TILES=cdiv(max(k, 1), block))


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _grad_buffer(like: Tensor, write: bool) -> Tensor:
    return torch.empty_like(like, memory_format=torch.contiguous_format) if write else like.new_empty((0,))


def _take_grads(ctx, what: str):
    """The gradients the forward wrote, handed to the (single) backward that scales them."""
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(f"{what}: the Triton kernel writes the gradient in the forward pass and the backward "
                           "scales it in place, so it can run only once per forward (retain_graph=True and a second "
                           "backward is not supported). Run the forward again, or set FASTLT_KERNELS=torch.")
    ctx.grads = None
    return grads


# ---------------------------------------------------------------------------- dense target
#
# Two entry points share the launcher: in eager mode an ``autograd.Function`` (its Python
# overhead per call is well below a custom op's, which matters at these sub-millisecond
# sizes), under ``torch.compile`` the ``fastlt::soft_ce`` custom op, which Dynamo can put in
# a graph through its fake implementation.

def _dense(logits: Tensor, target: Tensor, bias: Tensor | None, write_gx: bool,
           write_gt: bool) -> tuple[Tensor, Tensor, Tensor]:
    b, c = logits.shape
    loss_rows = torch.empty(b, device=logits.device, dtype=torch.float32)
    gx = _grad_buffer(logits, write_gx)
    gt = _grad_buffer(target, write_gt)
    if b > 0:
        _soft_ce_kernel[(b,)](logits, target, bias if bias is not None else logits, loss_rows,
                              gx if write_gx else logits, gt if write_gt else target, c, 1.0 / b, logits.stride(0),
                              target.stride(0), gx.stride(0) if write_gx else 0, gt.stride(0) if write_gt else 0,
                              HAS_BIAS=bias is not None, WRITE_GX=write_gx, WRITE_GT=write_gt, **_row_config(c))
    # Mean over the batch from per-row losses: deterministic, unlike an atomic accumulation.
    return loss_rows.mean(), gx, gt


def _scaled(grad: Tensor, gx: Tensor | None, gt: Tensor | None, needs, bias: Tensor | None, in_place: bool):
    """(∂/∂logits, ∂/∂target, ∂/∂bias) from the gradients written for g = 1 and g = ``grad``."""
    need_x, need_t, need_bias = needs[:3]
    g = grad.to(torch.float32)
    if gx is not None and (need_x or need_bias):
        gx = gx.mul_(g) if in_place else gx * g
    if gt is not None and need_t:
        gt = gt.mul_(g) if in_place else gt * g
    grad_bias = gx.float().sum(0).to(bias.dtype) if need_bias else None
    return (gx if need_x else None), (gt if need_t else None), grad_bias


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, bias):
        need_x, need_t, need_bias = ctx.needs_input_grad
        loss, gx, gt = _dense(logits, target, bias, need_x or need_bias, need_t)
        ctx.grads = (gx, gt)
        ctx.bias = bias if need_bias else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gx, gt = _take_grads(ctx, "soft_cross_entropy")
        return _scaled(grad_loss, gx, gt, ctx.needs_input_grad, ctx.bias, in_place=True)


@torch.library.custom_op("fastlt::soft_ce", mutates_args=())
def _soft_ce_op(logits: Tensor, target: Tensor, bias: Tensor | None, write_gx: bool,
                write_gt: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _dense(logits, target, bias, write_gx, write_gt)


@_soft_ce_op.register_fake
def _(logits, target, bias, write_gx, write_gt):
    return logits.new_empty((), dtype=torch.float32), _grad_buffer(logits, write_gx), _grad_buffer(target, write_gt)


def _soft_ce_setup_context(ctx, inputs, output):
    _, gx, gt = output
    ctx.save_for_backward(gx, gt, inputs[2])
    ctx.mark_non_differentiable(gx, gt)


def _soft_ce_autograd_backward(ctx, grad_loss, _grad_gx, _grad_gt):
    gx, gt, bias = ctx.saved_tensors
    # Out of place: graphs traced by AOTAutograd are functional.
    return _scaled(grad_loss, gx, gt, ctx.needs_input_grad, bias, in_place=False) + (None, None)


torch.library.register_autograd("fastlt::soft_ce", _soft_ce_autograd_backward, setup_context=_soft_ce_setup_context)


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


def _needs_grad(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def soft_cross_entropy_triton(logits: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
    """−(1/B) Σ_i Σ_j target_ij · log softmax(logits_i + bias)_j from the fused kernel.

    Same contract as ``fastlt.method.losses.reference_soft_cross_entropy``: fp32 loss, gradients to
    logits (in their dtype), target and bias when they require them (written by the forward
    launch, scaled by the backward).
    """
    logits = _check_logits(logits, "soft_cross_entropy")
    if target.shape != logits.shape:
        raise ValueError(f"soft_cross_entropy: target must have the logits' shape {tuple(logits.shape)}; "
                         f"got {tuple(target.shape)}")
    if not target.is_floating_point():
        raise ValueError(f"soft_cross_entropy: target must be a float soft label; got {target.dtype}")
    bias_in = bias
    bias = _check_bias(bias, logits, "soft_cross_entropy")
    target = _rows_contiguous(target)
    if torch.compiler.is_compiling():
        write_gx = _needs_grad(logits) or _needs_grad(bias_in)
        return _soft_ce_op(logits, target, bias, write_gx, _needs_grad(target))[0]
    return _SoftCrossEntropy.apply(logits, target, bias)
