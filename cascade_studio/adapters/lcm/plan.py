"""The LCM-LoRA's part of the memory plan: the LoRA it trains (the LoRA method's plan, reused) plus the
teacher's and the target's forward passes, which run without gradient before the student's forward.

Those passes keep nothing for the backward; while they run, the most they hold is one block's forward working
set at a time, at twice the batch for the teacher (its conditional and unconditional halves run as one batch),
beside their outputs (a few latent-sized tensors, kept until the loss).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...trainers.plan import Layout, PlannedAdapter, Setup, coefficients
from ..lora.plan import plan_adapter as plan_lora
from .config import lora_section

__all__ = ["plan_adapter"]

LATENT_CHANNELS = 16
KEPT_LATENTS = 6  # x_t, the teacher's ε (both halves), x_{t-1}, the target and the guided ε, in fp32


def teacher_transient(layout: Layout, setup: Setup) -> float:
    """Bytes a no-grad forward of the doubled batch holds at its widest block (the block's working set, taken
    as its forward+backward transient coefficients of the calibrated plan: an upper bound for a forward)."""
    coef = coefficients(setup)
    tokens, cond = 2 * setup.tokens, layout.cond_tokens(2 * setup.batch_size)
    widest = 0.0
    for block in layout.blocks:
        if block.kind == "C":
            widest = max(widest, coef.res_peak * block.width * tokens)
        elif block.kind == "A":
            widest = max(widest, (coef.attn_image_frozen + coef.attn_peak) * block.width * tokens
                         + coef.attn_cond_frozen * block.width * cond)
    stream = 2 * coef.stream * (layout.blocks[0].width if layout.blocks else 0) * tokens  # block input and output
    return widest + stream


def plan_adapter(section: Any, layout: Layout, setup: Setup) -> PlannedAdapter:
    """A LoRA of the section's rank and targets, plus the teacher's no-grad passes (``own_forward``) and the
    latents they hand to the loss (``own_saved``)."""
    lora = lora_section(section)
    planned = plan_lora(lora, layout, replace(setup, adapter=lora))
    kept = float(KEPT_LATENTS * LATENT_CHANNELS * setup.tokens * 4)
    return replace(planned, note=f"LCM-LoRA rank {section.rank} + teacher passes (no grad, CFG batch)",
                   own_saved=kept, own_forward=teacher_transient(layout, setup))
