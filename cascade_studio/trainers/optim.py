"""Optimizers and learning-rate schedules named by recipes.

Both builders take the recipe's own sections (``recipe.optimizer``, ``recipe.schedule``) and read every value
from them: the defaults live in :mod:`cascade_studio.config.schema` only.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..config.schema import OptimizerConfig, ScheduleConfig, describe_fields

# The names the schema accepts (its `choices`), so a name is listed in one place.
OPTIMIZERS = next(d.choices for d in describe_fields(OptimizerConfig) if d.path == "name")
SCHEDULES = next(d.choices for d in describe_fields(ScheduleConfig) if d.path == "name")
# bitsandbytes keeps 32-bit state for tensors under `min_8bit_size` elements (4096 by default). Adapter
# matrices of real models are far larger; lowering the bar keeps tiny CPU runs on the same 8-bit code path.
MIN_8BIT_SIZE = 256


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The recipe's ``optimizer`` section -> a torch optimizer over ``params`` (adapter parameters only)."""
    if not isinstance(cfg, OptimizerConfig):
        raise TypeError(f"build_optimizer takes the recipe's optimizer section (OptimizerConfig), not "
                        f"{type(cfg).__name__}: pass recipe.optimizer, or OptimizerConfig(name=..., lr=...)")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the adapter attached nothing to train")
    name, lr, weight_decay, eps = cfg.name, float(cfg.lr), float(cfg.weight_decay), float(cfg.eps)
    betas = tuple(float(b) for b in cfg.betas)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name in ("adamw8bit", "lion8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # pragma: no cover - bitsandbytes is a core dependency
            raise RuntimeError(f"optimizer {name} needs bitsandbytes: pip install bitsandbytes "
                               "(or set optimizer.name: adamw)") from exc
        if name == "adamw8bit":
            return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       min_8bit_size=MIN_8BIT_SIZE)
        return bnb.optim.Lion8bit(params, lr=lr, betas=betas, weight_decay=weight_decay,
                                  min_8bit_size=MIN_8BIT_SIZE)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (the recipe's), not Adafactor's relative step size.
        return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def lr_multiplier(step: int, total_steps: int, name: str, warmup_steps: int) -> float:
    """Multiplier on the base learning rate at ``step`` (0-based): linear warmup, then the schedule."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
    """The recipe's ``schedule`` section -> a LambdaLR over ``total_steps`` (``train.max_steps``)."""
    if not isinstance(cfg, ScheduleConfig):
        raise TypeError(f"build_scheduler takes the recipe's schedule section (ScheduleConfig), not "
                        f"{type(cfg).__name__}: pass recipe.schedule, or ScheduleConfig(name=..., warmup_steps=...)")
    name, warmup = cfg.name, int(cfg.warmup_steps)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, name, warmup))


def optimizer_state_is_8bit(optimizer: torch.optim.Optimizer) -> bool:
    """True when every optimizer state buffer with moments is stored as uint8 (8-bit optimizers)."""
    found = False
    for state in optimizer.state.values():
        for key in ("state1", "state2"):
            if key in state and torch.is_tensor(state[key]):
                found = True
                if state[key].dtype != torch.uint8:
                    return False
    return found
