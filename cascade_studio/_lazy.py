"""Package ``__getattr__`` functions that import a submodule on first use of one of its names (PEP 562).

Used where a package must stay cheap to import: recipes, the CLI and the studio read ``config`` and the preset
table without importing torch, and a method package's torch side loads only when something trains or generates.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` giving each name of ``exports[module]`` from ``package.module``."""
    owner = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in owner:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{owner[name]}"), name)

    return __getattr__


def forward_to(package: str, module: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` giving every public name of ``package.module``."""

    def __getattr__(name: str) -> Any:
        try:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
