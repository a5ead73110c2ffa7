"""LoRA-family adapters on Stage C: build, export (comfyui, peft) and import (comfyui/kohya/OneTrainer, peft,
official positional files).

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
