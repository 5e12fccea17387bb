"""Fused Triton kernels for ConCutMix's rectified label (docs/design.md §1, steps 1–5).

Two launches, no B×C×D tensor and no B×C temporary besides one (B, C) fp32 buffer — the
dense output itself, or, for the compact form, a scratch buffer freed on return:

1. ``_similarity_kernel`` — grid (⌈B/BLOCK_B⌉, ⌈C/BLOCK_C⌉). Each program accumulates a
   BLOCK_B×BLOCK_C tile of z·cᵀ with ``tl.dot`` over D in BLOCK_D chunks (fp32 accumulation
   whatever the input dtype), the squared norms ‖z‖², ‖c_j‖² from the same loaded chunks, and
   writes s = rsqrt(max(‖z‖² + ‖c_j‖² − 2 z·c_j, 1e-12)) (step 1) into the output buffer,
   which serves as scratch.
2. ``_select_kernel`` (:mod:`fastlt.kernels.select`) — grid (B,). One program per row finds
   the K-th largest similarity exactly by a radix select on the fp32 bit patterns (four
   8-bit passes), keeps the K largest with ties to the lower class index (step 2),
   normalises them (L1, or softmax with temperature; step 3), computes γ from the class
   counts of label_a and label_b (step 4) and writes ŷ = γ·ŝ + (1 − γ)·y with the area label
   built on the fly (step 5). Optionally it also writes the compact label: the K kept class
   indices (ascending), their weights ŝ and γ.

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

from fastlt.method.parts import validate_rectify_args

from ._jit import cdiv, fp32_dot_precision, jit, next_pow2, upcast_dot
from .select import launch_select

__all__ = ["rectify_labels_compact_triton", "rectify_labels_triton"]

_MIN_SQ_DIST = 1e-12  # same clamp as fastlt.method.labels (a sample on a center stays finite)


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
    feed tl.dot fp32 copies of the tiles (interpreter only, see ``_jit.upcast_dot``).
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
                             INPUT_PRECISION=fp32_dot_precision(), UPCAST_DOT=upcast_dot(z.dtype), **sim_cfg)
    launch_select(out, out, label_a, label_b, lam, counts, log_sum, idx, w, gamma, k, omega, 1.0 / temperature,
                  softmax, write_dense, write_compact, block_c_select)
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

    ``log_count_sum``: Σ log N_i (``fastlt.method.labels.sum_log_counts``), computed once per run;
    None: every row of the selection kernel sums the C logs itself. ``_block_c_select`` (tests
    only) forces the row tile of the selection kernel, to exercise rows spanning several tiles
    at small C.
    """
    return _rectify(z, centers, label_a, label_b, lam, class_counts, topk, omega, normalize, temperature,
                    log_count_sum, _block_c_select, compact=False)


def rectify_labels_compact_triton(z: Tensor, centers: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor,
                                  class_counts: Tensor, *, topk: int, omega: float, normalize: str = "l1",
                                  temperature: float = 1.0, log_count_sum: Tensor | float | None = None,
                                  _block_c_select: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(indices (B, K') int64 ascending, weights ŝ (B, K') fp32, γ (B,) fp32) with K' = min(K, C)."""
    return _rectify(z, centers, label_a, label_b, lam, class_counts, topk, omega, normalize, temperature,
                    log_count_sum, _block_c_select, compact=True)


def _rectify(z, centers, label_a, label_b, lam, class_counts, topk, omega, normalize, temperature, log_count_sum,
             block_c_select, *, compact: bool):
    """Both entry points: checks, then the custom op (under torch.compile) or the launch itself."""
    z, centers, label_a, label_b, lam, counts, log_sum = _prepare(z, centers, label_a, label_b, lam, class_counts,
                                                                  topk, normalize, temperature, log_count_sum)
    k = min(topk, centers.shape[0])
    softmax = normalize == "softmax"
    if torch.compiler.is_compiling():
        op = _rectify_compact_op if compact else _rectify_op
        return op(z, centers, label_a, label_b, lam, counts, log_sum, k, float(omega), softmax, float(temperature),
                  int(block_c_select or 0))
    out = _launch(z, centers, label_a, label_b, lam, counts, log_sum, float(omega), k, softmax, float(temperature),
                  not compact, compact, block_c_select)
    return out[1:] if compact else out[0]
