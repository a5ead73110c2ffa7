"""The dummy method's torch side: create, export, load, sniff and the generation hook."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cascade_studio.adapters.base import AdapterMismatchError
from cascade_studio.adapters.files import load_adapter_tensors, save_adapter_tensors

from .config import METHOD

KEY = "dummy_bias.bias"


class DummyBias(nn.Module):
    method = METHOD.name
    input_names: tuple[str, ...] = ()

    def __init__(self, channels: int, name: str = "dummy_bias", scale: float = 1.0) -> None:
        super().__init__()
        self.name, self.scale = name, scale
        self.bias = nn.Parameter(torch.zeros(channels))
        self._handle = None
        self._on = True

    def attach(self, stage_c: nn.Module) -> None:
        self._handle = stage_c.register_forward_hook(self._add)

    def _add(self, module, args, output):
        if not self._on:
            return output
        return output + self.scale * self.bias.to(output.dtype).view(1, -1, 1, 1)

    def detach(self, stage_c: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def set_enabled(self, enabled: bool) -> None:
        self._on = enabled

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.bias]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {KEY: self.bias.detach().float().cpu()}

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if set(state_dict) != {KEY} or state_dict[KEY].shape != self.bias.shape:
            raise AdapterMismatchError(f"a dummy bias needs exactly {KEY} of shape {tuple(self.bias.shape)}")
        with torch.no_grad():
            self.bias.copy_(state_dict[KEY].float())

    def metadata(self) -> dict[str, str]:
        return {"cascade_studio.method": METHOD.name, "cascade_studio.channels": str(self.bias.numel())}

    def apply(self, inputs: dict, stage_c_kwargs: dict) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _channels(model: Any) -> int:
    return int(model.stage_c.clf[1].out_channels)


def create_adapter(cfg: Any, model: Any, context: Any, name: str = "dummy_bias") -> DummyBias:
    adapter = DummyBias(_channels(model), name=name, scale=cfg.scale)
    model.add_adapter(adapter)
    return adapter


def export_tensors(tensors: dict, metadata: dict, fmt: str, out: Path) -> Path:
    dtype = torch.float16 if fmt == "bias_fp16" else torch.float32
    return save_adapter_tensors({k: v.to(dtype) for k, v in tensors.items()}, Path(out),
                                dict(metadata, **{"cascade_studio.format": fmt}))


def export_adapter(adapter: DummyBias, out: Any, fmt: str, extra_metadata: dict | None = None) -> Path:
    return export_tensors(adapter.adapter_state_dict(), dict(adapter.metadata(), **(extra_metadata or {})), fmt,
                          Path(out))


def sniff(keys: list[str], metadata: dict) -> bool:
    return KEY in keys


def load_adapter_file(path: Any, model: Any, context: Any = None, name: str | None = None, scale: float = 1.0,
                      **_: Any) -> DummyBias:
    tensors, _meta = load_adapter_tensors(path)
    adapter = DummyBias(_channels(model), name=name or "dummy_bias", scale=scale)
    adapter.load_adapter_state_dict(tensors)
    model.add_adapter(adapter)
    return adapter


def generation_load(resolved: Any, scratch: Path, state: dict) -> tuple[Path, dict, None]:
    return Path(resolved.path), {"scale": resolved.weight}, None
