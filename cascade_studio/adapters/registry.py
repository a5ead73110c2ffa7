"""Adapter files and the torch side of the catalog's methods.

Which methods exist is the catalog's business (:mod:`.catalog`); this module finds the method of a file and loads
it. Every method's torch side exposes the same functions: ``create_adapter``, ``export_adapter``,
``load_adapter_file`` and ``sniff`` (plus optional hooks such as ``training_inputs``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from . import catalog
from .base import AdaptedStageC, Adapter, AdapterMismatchError


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
    """The torch side of the method ``name`` (ValueError naming the registered methods if there is none)."""
    return catalog.get(name).load()


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
    keys, metadata = read_adapter_header(path)
    method = metadata.get("cascade_studio.method")
    if method in catalog.names():
        return method
    for record in catalog.methods():
        if record.load().sniff(keys, metadata):
            return record.name
    known = ", ".join(record.label for record in catalog.methods())
    raise AdapterMismatchError(f"{path}: not an adapter file this studio knows ({known}; first keys: {keys[:3]})")


def load_adapter(path: str | Path, model: AdaptedStageC, context: AdapterContext, name: str | None = None,
                 force: bool = False, **options: Any) -> Adapter:
    """Load any adapter file onto ``model`` (method detected), checked against the base first.

    A file that records the fingerprint of the base it was trained on (``models.identity``) loads only on a base
    with the same fingerprint; ``force`` loads it anyway (shapes are still checked by the method)."""
    method = detect_method(path)
    if not force:
        check_base(path, context)
    return get_method(method).load_adapter_file(Path(path), model, context, name=name or adapter_name(path),
                                                **options)


def check_base(path: str | Path, context: AdapterContext) -> None:
    """Refuse an adapter trained on another base (by the weights' fingerprints), naming both bases."""
    from ..models.identity import comparable

    _, metadata = read_adapter_header(path)
    trained_on = metadata.get("cascade_studio.base_fingerprint")
    if not comparable(trained_on, context.base_fingerprint) or trained_on == context.base_fingerprint:
        return
    file_base = metadata.get("cascade_studio.base_model", "another base")
    raise AdapterMismatchError(
        f"{path} was trained on {file_base} (base fingerprint {trained_on}), but this base is {context.preset} "
        f"(fingerprint {context.base_fingerprint}): its weights differ, so the adapter would not do what it learned "
        "(--force loads it anyway)")


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
