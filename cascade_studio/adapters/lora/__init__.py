"""LoRA-family adapters on Stage C: build, export (comfyui, peft) and import (comfyui/kohya/OneTrainer, peft,
official positional files).

The folder is the whole method: ``config.py`` (its recipe section and catalog record, torch-free) and
``method.py`` (the torch side). The torch side's names are reachable from the package too, imported on first
use so that reading a recipe never imports torch.
"""
from __future__ import annotations

from ..._lazy import forward_to

__getattr__ = forward_to(__name__, "method")
