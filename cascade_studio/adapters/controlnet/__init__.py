"""ControlNet for Stage C: build from a recipe, export in the official layout (what ComfyUI loads for the big
model), import our exports and the published canny / inpainting / super-resolution files, and the control
hints the encode cache stores.

Defaults per base (recipe fields left null): ``c_proj`` = the Stage C width, ``proj_blocks`` = the preset's
(big: [0, 4, 8, 12, 51, 55, 59, 63]), bottleneck ``effnet`` (``large`` for super-resolution). On the tiny preset
the full EfficientNetV2-S backbone would dwarf the 64-wide Stage C, so the tiny default is ``effnet_tiny`` (the
tiny compressor's architecture as backbone; the ``simple`` bottleneck keeps only c_in channels, too few to carry a
canny control). With ``simple`` the adapter feeds it a hint area-downsampled to 4x the latent grid
(``hint_size``); the cached hint stays at image resolution either way.

The folder is the whole method: ``config.py`` (its recipe section and catalog record, torch-free) and
``method.py`` (the torch side). The torch side's names are reachable from the package too, imported on first
use so that reading a recipe never imports torch.
"""
from __future__ import annotations

from ..._lazy import forward_to

__getattr__ = forward_to(__name__, "method")
