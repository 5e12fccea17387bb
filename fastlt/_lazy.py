"""Lazy re-exports (PEP 562) for fastlt's packages.

Each package's ``__init__`` names its public API once, as ``{name: submodule}``; a name is
imported from its submodule on first use. This keeps ``import fastlt.config`` (and every
config check) free of torch and DeepSpeed while ``from fastlt.method import rectify_labels``
still works.
"""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[list[str], Callable, Callable]:
    """(``__all__``, ``__getattr__``, ``__dir__``) for ``package``, whose public ``name`` lives in
    ``package.<exports[name]>``."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{exports[name]}", package), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return sorted(exports), __getattr__, __dir__
