"""LoRA (and LoHa, LoKr, DoRA) on Stage C through PEFT.

PEFT injects its layers in place, so a LoRA-adapted Stage C is still a Stage C: its forward, ControlNet path and
attention hooks are untouched. Several LoRA adapters can live on one Stage C at once (PEFT adapter names); this
class keeps track of which are enabled and at which multiplier, and unwraps PEFT's layers again when the last
adapter on a module is removed, so the base model's module paths (and official key names) come back exactly.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..base import AdapterMismatchError, check_adapter_tensors

# Named groups of target modules (regular expressions over Stage C module paths, full match).
TARGET_GROUPS: dict[str, str] = {
    "attention": r".*\.attention\.attn\.(to_q|to_k|to_v|out_proj)",
    "kv_mapper": r".*\.kv_mapper\.1",
    "channelwise": r".*\.channelwise\.(0|4)",
    "clip_mappers": r"(clip_txt_mapper|clip_txt_pooled_mapper|clip_img_mapper)",
}
LORA_TYPES = ("lora", "loha", "lokr", "dora")


@dataclass(frozen=True)
class LoraSpec:
    """What to build: mirrors the recipe's ``adapter.lora`` section."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention",)
    type: str = "lora"
    init_weights: bool = True
    # Per-module overrides (exact module path -> value), used when importing files with mixed ranks.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Any) -> "LoraSpec":
        """The spec of a recipe's ``adapter.lora`` section (a ``LoraConfig``)."""
        return cls(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=tuple(cfg.targets), type=cfg.type,
                   init_weights=cfg.init_weights)


def base_module_paths(stage_c: nn.Module) -> list[str]:
    """Paths of Stage C's Linear/Conv modules as in the base model (PEFT's wrapper levels stripped)."""
    paths: list[str] = []
    for name, module in stage_c.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not name:
            continue
        if any(part in name for part in (".lora_", ".hada_", ".lokr_")):
            continue
        name = name.replace(".base_layer", "")
        if name not in paths:
            paths.append(name)
    return paths


def resolve_target_modules(stage_c: nn.Module, targets: Sequence[str]) -> list[str]:
    """Expand target groups and suffixes into the exact module paths of ``stage_c`` (Linear/Conv only)."""
    names = base_module_paths(stage_c)
    chosen: list[str] = []
    unknown: list[str] = []
    for target in targets:
        if target in TARGET_GROUPS:
            pattern = re.compile(TARGET_GROUPS[target])
            hits = [n for n in names if pattern.fullmatch(n)]
        else:
            hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            unknown.append(target)
        chosen.extend(h for h in hits if h not in chosen)
    if unknown:
        raise AdapterMismatchError(
            f"LoRA targets {unknown} match no Linear/Conv module of this Stage C; use one of "
            f"{sorted(TARGET_GROUPS)} or a module-path suffix such as 'attention.attn.to_q'"
        )
    return chosen


def _peft_config(spec: LoraSpec, target_modules: list[str]):
    import peft

    common = dict(target_modules=target_modules, rank_pattern=dict(spec.rank_pattern),
                  alpha_pattern=dict(spec.alpha_pattern))
    if spec.type in ("lora", "dora"):
        return peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                               init_lora_weights=spec.init_weights, use_dora=spec.type == "dora", **common)
    if spec.type == "loha":
        return peft.LoHaConfig(r=spec.rank, alpha=spec.alpha, rank_dropout=spec.dropout,
                               init_weights=spec.init_weights, **common)
    if spec.type == "lokr":
        return peft.LoKrConfig(r=spec.rank, alpha=spec.alpha, rank_dropout=spec.dropout,
                               init_weights=spec.init_weights, **common)
    raise AdapterMismatchError(f"unknown LoRA type {spec.type!r}; use one of {LORA_TYPES}")


def _tuner_layers(stage_c: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in stage_c.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def _registry(stage_c: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-Stage-C bookkeeping of LoRA adapters: name -> {enabled, multiplier} (a plain attribute, not state)."""
    if not hasattr(stage_c, "_cascade_lora_registry"):
        object.__setattr__(stage_c, "_cascade_lora_registry", {})
    return stage_c._cascade_lora_registry  # type: ignore[attr-defined]


def _refresh_active(stage_c: nn.Module) -> None:
    registry = _registry(stage_c)
    for _, layer in _tuner_layers(stage_c):
        present = [n for n in layer._get_available_adapters() if n in registry] if hasattr(
            layer, "_get_available_adapters") else list(registry)
        active = [n for n in present if registry[n]["enabled"]]
        # PEFT's set_adapter also flips requires_grad; keep trainability decided by the adapter instead.
        grads = {id(p): p.requires_grad for p in layer.parameters()}
        layer.set_adapter(active)
        for p in layer.parameters():
            p.requires_grad_(grads[id(p)])


class LoraAdapter:
    """A LoRA-family adapter injected into one Stage C under PEFT adapter name ``name``."""

    method = "lora"
    input_names: tuple[str, ...] = ()

    def __init__(self, spec: LoraSpec, name: str = "lora", target_modules: Iterable[str] | None = None,
                 multiplier: float = 1.0, info: dict[str, str] | None = None):
        if spec.type not in LORA_TYPES:
            raise AdapterMismatchError(f"unknown LoRA type {spec.type!r}; use one of {LORA_TYPES}")
        self.spec = spec
        self.name = name
        self.multiplier = multiplier
        self._explicit_targets = list(target_modules) if target_modules is not None else None
        self.target_modules: list[str] = []
        self.stage_c: nn.Module | None = None
        self.info = dict(info or {})
        self.merged = False

    # -- lifecycle ---------------------------------------------------------------------------------------
    def attach(self, stage_c: nn.Module) -> None:
        import peft

        registry = _registry(stage_c)
        if self.name in registry:
            raise ValueError(f"a LoRA named {self.name!r} is already on this Stage C")
        self.target_modules = self._explicit_targets or resolve_target_modules(stage_c, self.spec.targets)
        config = _peft_config(self.spec, self.target_modules)
        peft.inject_adapter_in_model(config, stage_c, adapter_name=self.name)
        self.stage_c = stage_c
        registry[self.name] = {"enabled": True, "multiplier": 1.0}
        for p in self.trainable_parameters():
            # Adapter weights train in fp32 even on a bf16 base (PEFT casts activations to their dtype).
            p.data = p.data.float()
            p.requires_grad_(True)
        _refresh_active(stage_c)
        if self.multiplier != 1.0:
            self.set_multiplier(self.multiplier)

    def detach(self, stage_c: nn.Module) -> None:
        if self.merged:
            self.unmerge()
        registry = _registry(stage_c)
        for path, layer in list(_tuner_layers(stage_c)):
            if self.name in layer._get_available_adapters():
                layer.delete_adapter(self.name)
            if not layer._get_available_adapters():
                parent_name, _, child = path.rpartition(".")
                parent = stage_c.get_submodule(parent_name) if parent_name else stage_c
                setattr(parent, child, layer.get_base_layer())
        registry.pop(self.name, None)
        _refresh_active(stage_c)
        self.stage_c = None

    def set_enabled(self, enabled: bool) -> None:
        assert self.stage_c is not None, "attach the adapter first"
        _registry(self.stage_c)[self.name]["enabled"] = enabled
        _refresh_active(self.stage_c)

    def set_multiplier(self, multiplier: float) -> None:
        """Scale this LoRA's contribution (1.0 = as trained); ComfyUI calls this the LoRA strength."""
        assert self.stage_c is not None, "attach the adapter first"
        self.multiplier = float(multiplier)
        for _, layer in self._layers():
            if hasattr(layer, "scaling") and self.name in layer.scaling:
                # Recompute from alpha/r rather than multiplying, so repeated calls do not compound.
                r = layer.r[self.name]
                alpha = layer.lora_alpha[self.name] if hasattr(layer, "lora_alpha") else layer.alpha[self.name]
                layer.scaling[self.name] = self.multiplier * alpha / r
            elif hasattr(layer, "scale_layer"):
                raise NotImplementedError(f"multipliers are supported for lora/dora only, not {self.spec.type}")

    def merge(self) -> None:
        """Fold every enabled LoRA on this Stage C into the base weights for speed; undo with :meth:`unmerge`.

        PEFT runs only the base layer once a layer holds merged weights, so merging one LoRA while another stays
        unmerged would silently drop the other: all enabled LoRAs are merged together. Exact up to rounding in
        fp32; in bf16 an unmerge does not restore the base bit for bit.
        """
        assert self.stage_c is not None, "attach the adapter first"
        registry = _registry(self.stage_c)
        enabled = [n for n, entry in registry.items() if entry["enabled"]]
        for _, layer in _tuner_layers(self.stage_c):
            names = [n for n in enabled if n in layer._get_available_adapters() and n not in layer.merged_adapters]
            if names:
                layer.merge(adapter_names=names)
        for name in enabled:
            registry[name]["merged"] = True
        self.merged = True

    def unmerge(self) -> None:
        assert self.stage_c is not None, "attach the adapter first"
        for _, layer in _tuner_layers(self.stage_c):
            if layer.merged_adapters:
                layer.unmerge()
        for entry in _registry(self.stage_c).values():
            entry["merged"] = False
        self.merged = False

    # -- parameters and state ----------------------------------------------------------------------------
    def _layers(self):
        if self.stage_c is None:
            return []
        return [(p, l) for p, l in _tuner_layers(self.stage_c) if self.name in l._get_available_adapters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = []
        for _, layer in self._layers():
            for attr in layer.adapter_layer_names:
                container = getattr(layer, attr, None)
                if container is not None and self.name in container:
                    item = container[self.name]
                    params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT-layout tensors (``<module>.lora_A.weight`` ...) without the adapter name."""
        from peft import get_peft_model_state_dict

        assert self.stage_c is not None, "attach the adapter first"
        sd = get_peft_model_state_dict(self.stage_c, adapter_name=self.name)
        return {k: v.detach().clone() for k, v in sd.items()}

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        assert self.stage_c is not None, "attach the adapter first"
        check_adapter_tensors(self.adapter_state_dict(), state_dict, "LoRA weights for this Stage C")
        result = set_peft_model_state_dict(self.stage_c, state_dict, adapter_name=self.name)
        unexpected_peft = getattr(result, "unexpected_keys", [])
        if unexpected_peft:
            raise AdapterMismatchError(f"PEFT did not place {len(unexpected_peft)} tensors: {unexpected_peft[:3]}")

    def metadata(self) -> dict[str, str]:
        meta = {
            "modelspec.architecture": "stable-cascade-v1-prior/lora",
            "cascade_studio.method": "lora",
            "cascade_studio.lora_type": self.spec.type,
            "cascade_studio.rank": str(self.spec.rank),
            "cascade_studio.alpha": str(self.spec.alpha),
            "cascade_studio.targets": ",".join(self.spec.targets),
            # kohya-style keys that many LoRA browsers read
            "ss_network_dim": str(self.spec.rank),
            "ss_network_alpha": str(self.spec.alpha),
        }
        meta.update(self.info)
        return meta

    def apply(self, inputs: dict[str, Any], stage_c_kwargs: dict[str, Any]):
        # LoRA lives inside Stage C's modules: nothing to add per call.
        return contextlib.nullcontext()
