"""Optimizer state to and from safetensors (no pickles anywhere in a checkpoint).

An optimizer's ``state_dict()`` is a nested structure of tensors and plain values. Tensors go into a safetensors
file under flattened dotted names (``state.<param index>.<name>[.<nested name>]``); everything else (param
groups, scalar steps) goes into the file's JSON metadata. 8-bit optimizer states round-trip unchanged:
bitsandbytes nests its uint8 buffers, absmax and qmap under ``__bnb_optimizer_quant_state__`` and shares one
qmap tensor between all parameters, which is stored once (``aliases`` in the metadata).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..devices import to_host
from .atomic import atomic_save_safetensors


def _flatten(prefix: str, value: Any, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    """Nested dicts become dotted names; bitsandbytes keeps its 8-bit buffers in a nested dict
    (``__bnb_optimizer_quant_state__``), so a flat pass would turn them into JSON lists."""
    if torch.is_tensor(value):
        tensors[prefix] = to_host(value).contiguous()
    elif isinstance(value, dict):
        if not value:
            scalars[prefix] = {}
        for name, item in value.items():
            if "." in str(name):
                raise ValueError(f"optimizer state name {name!r} contains a dot; it cannot be saved")
            _flatten(f"{prefix}.{name}", item, tensors, scalars)
    elif isinstance(value, (list, tuple)) and any(torch.is_tensor(v) for v in value):
        raise ValueError(f"optimizer state {prefix} is a sequence of tensors, which this checkpoint format does not "
                         "store; use one of the optimizers the recipe schema lists")
    else:
        scalars[prefix] = value


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, state in sd["state"].items():
        _flatten(f"state.{index}", state, tensors, scalars)
    # bitsandbytes gives every parameter the same quantization map tensor (qmap1/qmap2). safetensors refuses
    # shared storage, so each shared tensor is stored once and the other names point at it.
    aliases: dict[str, str] = {}
    first_of: dict[tuple, str] = {}
    for key in list(tensors):
        tensor = tensors[key]
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and identity in first_of:
            aliases[key] = first_of[identity]
            del tensors[key]
        else:
            first_of[identity] = key
    meta = {"param_groups": json.dumps(sd["param_groups"], default=_plain),
            "scalars": json.dumps(scalars, default=_plain), "aliases": json.dumps(aliases),
            "format": "cascade-studio-optimizer-v1"}
    atomic_save_safetensors(tensors, Path(path), metadata=meta)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)


def _insert(state: dict[int, dict[str, Any]], key: str, value: Any) -> None:
    _, index, *names = key.split(".")
    node = state.setdefault(int(index), {})
    for name in names[:-1]:
        node = node.setdefault(name, {})
    node[names[-1]] = value


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "cascade-studio-optimizer-v1":
        raise ValueError(f"{path}: not an optimizer state written by cascade-studio")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _insert(state, key, value)
    for key, target in json.loads(meta.get("aliases", "{}")).items():
        _insert(state, key, tensors[target])
    for key, value in json.loads(meta["scalars"]).items():
        _insert(state, key, value)
    groups = json.loads(meta["param_groups"])
    current = optimizer.state_dict()["param_groups"]
    if len(groups) != len(current) or any(len(g["params"]) != len(c["params"]) for g, c in zip(groups, current)):
        raise ValueError(f"{path}: the optimizer state is for {sum(len(g['params']) for g in groups)} parameters "
                         f"in {len(groups)} group(s), this adapter has {sum(len(c['params']) for c in current)}; "
                         "it was saved by a different adapter configuration (resume with the recipe it was "
                         "trained with)")
    for group, live in zip(groups, current):
        for k, v in live.items():
            # keep tuple-typed hyperparameters (betas) as tuples
            if isinstance(v, tuple) and isinstance(group.get(k), list):
                group[k] = tuple(group[k])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
