"""IP-Adapter on Stage C: build from a recipe, export/import one safetensors file, training inputs (image
embeddings with image/text/both dropout) and the cache feature that encodes training images once.

The architecture and why it is built this way are in :mod:`.adapter`.

The folder is the whole method: ``config.py`` (its recipe section and catalog record, torch-free) and
``method.py`` (the torch side). The torch side's names are reachable from the package too, imported on first
use so that reading a recipe never imports torch.
"""
from __future__ import annotations

from ..._lazy import forward_to

__getattr__ = forward_to(__name__, "method")
