"""IP-Adapter on Stage C: build from a recipe, export/import one safetensors file, training inputs (image
embeddings with image/text/both dropout) and the cache feature that encodes training images once.

The architecture and why it is built this way are in :mod:`.adapter`.

The folder is the whole method: ``config.py`` (its recipe section and catalog record, torch-free) and
``method.py`` (the torch side). The torch side's names are reachable from the package too, imported on first
use so that reading a recipe never imports torch.
"""
from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    method = importlib.import_module(f"{__name__}.method")
    try:
        return getattr(method, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
