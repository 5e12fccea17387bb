"""Decorate fastlt's Triton kernels in the same mode as triton's own standard library.

Imported only by the kernel modules (it imports triton). ``triton.jit`` reads
``TRITON_INTERPRET`` at decoration time, while ``tl.sum``, ``tl.max``, ``tl.cumsum``... were
decorated when ``triton.language`` was first imported. If the variable changed in between,
a kernel decorated by ``triton.jit`` would run in one mode and call library functions built
for the other, and fail with an obscure error. :func:`jit` follows the library's mode, and
``fastlt.kernels.dispatch`` refuses CPU tensors unless that mode is the interpreter.

While a ``torch.profiler`` window is open, every launch of a fastlt kernel is recorded as a
``triton::<kernel name>`` range, so that profiler traces (and
``fastlt.kernels.testing.count_launches``) see the launches on the CPU too, where the
interpreter runs them; outside a profiler window the launch path is unchanged but for one
flag test.
"""
from __future__ import annotations

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .dispatch import interpreter_active

__all__ = ["INTERPRETED", "LAUNCH_RANGE_PREFIX", "fp32_dot_precision", "jit", "upcast_dot"]

INTERPRETED = interpreter_active()
LAUNCH_RANGE_PREFIX = "triton::"


class _RecordedLaunch:
    """Mixin for the two triton function classes: a profiler range around each launch."""

    def run(self, *args, **kwargs):
        # A module-level bool of torch's profiler: cheap enough for every launch.
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.profiler.record_function(LAUNCH_RANGE_PREFIX + self.__name__):
                return super().run(*args, **kwargs)
        return super().run(*args, **kwargs)


class _Interpreted(_RecordedLaunch, InterpretedFunction):
    pass


class _Compiled(_RecordedLaunch, JITFunction):
    pass


def jit(fn):
    """``triton.jit`` in the mode triton's standard library was built for."""
    return _Interpreted(fn) if INTERPRETED else _Compiled(fn)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)


def fp32_dot_precision() -> str:
    """``tl.dot``'s input precision for fp32 operands, following torch's fp32 matmul setting.

    Plain TF32 only if the user allowed it for torch's own matmuls; otherwise ("highest",
    torch's default) 3xTF32, which splits each operand into a TF32 head and tail and keeps
    close to fp32 accuracy (about 2^-22 relative) on tensor cores, instead of the much slower
    FMA path of "ieee".
    """
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether kernels must feed ``tl.dot`` fp32 copies of their ``dtype`` tiles.

    Triton 3.8's interpreter returns wrong values for tl.dot on bfloat16 operands (compiled
    kernels are fine). bf16 → fp32 is exact and so are bf16 products in fp32, so feeding it
    fp32 tiles gives the result the GPU computes, up to summation order.
    """
    return INTERPRETED and dtype == torch.bfloat16
