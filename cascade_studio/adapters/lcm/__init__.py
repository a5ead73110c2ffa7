"""LCM-LoRA: latent consistency distillation of the frozen Stage C into a LoRA (Luo et al. 2023), so that the
``lcm`` sampler draws in 2-8 unguided steps what the base draws in 20 guided ones.

The folder is the whole method: ``config.py`` (its recipe section and catalog record, torch-free), ``method.py``
(the torch side: the adapter is the LoRA method's own, reused by import, and so is its ComfyUI file format),
``objective.py`` (the distillation loss, the method's ``training_loss`` hook) and ``plan.py`` (its memory plan).
"""
from __future__ import annotations

from ..._lazy import forward_to

__getattr__ = forward_to(__name__, "method")
