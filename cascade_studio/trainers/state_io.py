"""Optimizer state to and from safetensors (no pickles anywhere in a checkpoint).

An optimizer's ``state_dict()`` is a nested structure of tensors and plain values. Tensors go into a safetensors
file under flattened names (``state.<param index>.<name>``); everything else (param groups, scalar steps) goes
into the file's JSON metadata. 8-bit optimizer states (uint8 buffers plus absmax/qmap) round-trip unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_save_safetensors


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            key = f"state.{index}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    meta = {"param_groups": json.dumps(sd["param_groups"], default=_plain), "scalars": json.dumps(scalars, default=_plain),
            "format": "cascade-studio-optimizer-v1"}
    atomic_save_safetensors(tensors, Path(path), metadata=meta)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "cascade-studio-optimizer-v1":
        raise ValueError(f"{path}: not an optimizer state written by cascade-studio")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(meta["scalars"]).items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    groups = json.loads(meta["param_groups"])
    current = optimizer.state_dict()["param_groups"]
    for group, live in zip(groups, current):
        for k, v in live.items():
            # keep tuple-typed hyperparameters (betas) as tuples
            if isinstance(v, tuple) and isinstance(group.get(k), list):
                group[k] = tuple(group[k])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
