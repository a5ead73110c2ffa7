"""The LoRA family's part of the memory plan (``cascade-studio plan``, ``trainers/plan.py``).

``plan_adapter(section, layout, setup)`` is the method's planner hook: from the recipe's ``adapter.lora`` section
and the Stage C layout it gives the trainable tensor sizes (analytic for lora/loha; PEFT's own layers on the meta
device for dora/lokr, whose shapes depend on PEFT's factorisation), the Linear paths it wraps, what each
attention block keeps on top of the frozen block (the LoRA-A outputs over the image and conditioning tokens) and
the switch that shrinks it (halve the rank, down to 4).

The with-LoRA attention coefficients of the planner (``attn_image`` / ``attn_cond``) were calibrated with LoRA on
q/k/v/out, so the inputs those layers keep are in them; only the rank-wide A outputs are added here.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from ...trainers.plan import Layout, PlannedAdapter, Setup, Switch

__all__ = ["plan_adapter", "target_paths", "tensor_sizes"]

MIN_PLANNED_RANK = 4  # the rank switch stops here: below it a LoRA rarely learns a style


def target_paths(layout: Layout, targets: tuple[str, ...] | list[str]) -> list[str]:
    """The Linear paths of ``layout`` that ``targets`` (groups or module-name suffixes) select, in layout order."""
    from .adapter import TARGET_GROUPS

    chosen: list[str] = []
    for target in targets:
        pattern = re.compile(TARGET_GROUPS[target]) if target in TARGET_GROUPS else None
        for name in layout.linears:
            hit = pattern.fullmatch(name) if pattern else (name == target or name.endswith("." + target))
            if hit and name not in chosen:
                chosen.append(name)
    if not chosen:
        raise ValueError(f"LoRA targets {list(targets)} match no Linear of this Stage C")
    return chosen


def tensor_sizes(section: Any, layout: Layout, setup: Setup, targets: list[str] | None = None) -> list[int]:
    """Element counts of every trainable tensor of the LoRA ``section`` asks for on this Stage C."""
    targets = targets if targets is not None else target_paths(layout, section.targets)
    rank = section.rank
    if section.type == "lora":  # A [rank x in], B [out x rank]
        return [n for t in targets for n in (rank * layout.linears[t][0], rank * layout.linears[t][1])]
    if section.type == "loha":  # two Hadamard factors, each an (in, out) pair at the rank
        return [n for t in targets for n in (rank * layout.linears[t][0], rank * layout.linears[t][1])
                for _ in range(2)]
    import torch

    from ...models import build_stage_c
    from .adapter import LoraAdapter, LoraSpec, resolve_target_modules

    with torch.device("meta"):
        model = build_stage_c(**setup.stage_c)
    model.requires_grad_(False)
    adapter = LoraAdapter(LoraSpec.from_config(section), target_modules=resolve_target_modules(model, section.targets))
    adapter.attach(model)
    return [p.numel() for p in adapter.trainable_parameters()]


def _halve_rank(setup: Setup) -> Setup | None:
    rank = setup.adapter.rank
    return replace(setup, adapter=replace(setup.adapter, rank=rank // 2)) if rank > MIN_PLANNED_RANK else None


SMALLER_RANK = Switch("adapter.{method}.rank={adapter.rank}", "less adapter capacity", _halve_rank)


def plan_adapter(section: Any, layout: Layout, setup: Setup) -> PlannedAdapter:
    """What a LoRA of ``section`` adds to the plan of ``setup`` (see the module docstring)."""
    targets = target_paths(layout, section.targets)
    element = 2 if setup.mixed_precision == "bf16" else 4  # the A outputs follow autocast
    tokens, cond = setup.tokens, layout.cond_tokens(setup.batch_size)
    kept: dict[str, float] = {}
    for block in layout.blocks:
        if block.kind == "A":
            rows = sum(section.rank for t in targets if t.startswith(block.path + "."))
            # the A outputs: q and out over the image tokens, k and v over image + cond tokens
            kept[block.path] = element * rows * (tokens + cond / 2)
    return PlannedAdapter(trainable=tuple(tensor_sizes(section, layout, setup, targets)), touches=tuple(targets),
                          note=f"{section.type} rank {section.rank}", keeps_attention_inputs=True, block_saved=kept,
                          smaller=SMALLER_RANK)
