"""Decorate fastlt's Triton kernels in the same mode as triton's own standard library.

Imported only by the kernel modules (it imports triton). ``triton.jit`` reads
``TRITON_INTERPRET`` at decoration time, while ``tl.sum``, ``tl.max``, ``tl.cumsum``... were
decorated when ``triton.language`` was first imported. If the variable changed in between,
a kernel decorated by ``triton.jit`` would run in one mode and call library functions built
for the other, and fail with an obscure error. :func:`jit` follows the library's mode, and
``fastlt.kernels.dispatch`` refuses CPU tensors unless that mode is the interpreter.
"""
from __future__ import annotations

import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .dispatch import interpreter_active

__all__ = ["jit", "INTERPRETED"]

INTERPRETED = interpreter_active()


def jit(fn):
    """``triton.jit`` in the mode triton's standard library was built for."""
    return InterpretedFunction(fn) if INTERPRETED else JITFunction(fn)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)
