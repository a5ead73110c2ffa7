"""The closed registry of adapter methods.

Recipes name a method (``lora``, ``controlnet``, ``ip_adapter``); the method's package is found here, never by
an import path written in a recipe (config is data, not code). Each method package exposes the same four
functions: ``create_adapter``, ``export_adapter``, ``load_adapter_file`` and ``sniff``.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .base import AdaptedStageC, Adapter, AdapterMismatchError

METHODS: dict[str, str] = {
    "lora": "cascade_studio.adapters.lora",
    "controlnet": "cascade_studio.adapters.controlnet",
    "ip_adapter": "cascade_studio.adapters.ip_adapter",
}


@dataclass
class AdapterContext:
    """What an adapter needs to know about the base it attaches to."""

    preset: str = "tiny"
    base_fingerprint: str = "unknown"
    stage_c_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.stage_c_config.get("c_hidden", [0])[0])


def get_method(name: str) -> ModuleType:
    if name not in METHODS:
        raise ValueError(f"unknown adapter method {name!r}; choose one of {sorted(METHODS)}")
    return importlib.import_module(METHODS[name])


def read_adapter_header(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata of a safetensors adapter file (or a PEFT folder), without loading tensors."""
    from .files import read_safetensors_header

    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", {}) or {}
    return list(header), dict(metadata)


def detect_method(path: str | Path) -> str:
    """Which method made an adapter file: from its metadata, else from its tensor names."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").exists():
        return "lora"
    keys, metadata = read_adapter_header(path)
    method = metadata.get("cascade_studio.method")
    if method in METHODS:
        return method
    for name in METHODS:
        if get_method(name).sniff(keys, metadata):
            return name
    raise AdapterMismatchError(
        f"{path}: not a LoRA, ControlNet or IP-Adapter file this studio knows (first keys: {keys[:3]})")


def load_adapter(path: str | Path, model: AdaptedStageC, context: AdapterContext, name: str | None = None,
                 **options: Any) -> Adapter:
    """Load any adapter file onto ``model`` (method detected), checked against the base first."""
    method = detect_method(path)
    return get_method(method).load_adapter_file(Path(path), model, context, name=name or adapter_name(path),
                                                **options)


def adapter_name(path: str | Path) -> str:
    """A safe adapter name from a file name (module registries refuse dots and names like ``half``)."""
    import re

    import torch

    name = re.sub(r"\W", "_", Path(path).stem)
    if not name or name[0].isdigit() or hasattr(torch.nn.Module, name):
        name = f"adapter_{name}"
    return name


def metadata_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
