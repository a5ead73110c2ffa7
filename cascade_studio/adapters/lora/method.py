"""The torch side of the method: create, export, load, sniff and the training/generation inputs (see the
package docstring)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..base import AdaptedStageC, AdapterMismatchError
from ..files import load_adapter_tensors, save_adapter_tensors
from .adapter import LORA_TYPES, TARGET_GROUPS, LoraAdapter, LoraSpec, resolve_target_modules
from .config import METHOD
from .formats import (DORA_SCALE_COMFYUI, DORA_SCALE_KEY, DORA_SCALE_PEFT, base_weight, comfyui_to_peft,
                      official_to_peft, peft_to_comfyui, sniff_format)
from .plan import plan_adapter  # noqa: F401

FORMATS = METHOD.format_names


__all__ = ["LoraAdapter", "LoraSpec", "TARGET_GROUPS", "LORA_TYPES", "resolve_target_modules", 
           "FORMATS", "create_adapter", "export_adapter", "export_tensors", "load_adapter_file", "sniff"]


def create_adapter(cfg: Any, model: AdaptedStageC, context, name: str = "lora") -> LoraAdapter:
    """A fresh LoRA from the recipe's ``adapter.lora`` section, attached to ``model``."""
    adapter = LoraAdapter(LoraSpec.from_config(cfg), name=name, info=_base_info(context))
    model.add_adapter(adapter)
    return adapter


def _base_info(context) -> dict[str, str]:
    if context is None:
        return {}
    return {"cascade_studio.base_model": str(context.preset),
            "cascade_studio.base_fingerprint": str(context.base_fingerprint),
            "cascade_studio.base_width": str(context.width)}


def _per_module(adapter: LoraAdapter) -> tuple[dict[str, float], dict[str, int]]:
    alphas, ranks = {}, {}
    for path, layer in adapter._layers():
        path = path.replace(".base_layer", "")
        ranks[path] = int(layer.r[adapter.name])
        alpha_map = getattr(layer, "lora_alpha", None) or getattr(layer, "alpha")
        alphas[path] = float(alpha_map[adapter.name])
    return alphas, ranks


def export_adapter(adapter: LoraAdapter, out: str | Path, fmt: str = "comfyui",
                   extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``adapter`` as ``fmt``: a single ComfyUI/kohya file, or a PEFT folder."""
    meta = adapter.metadata()
    meta.update(extra_metadata or {})
    peft_sd = adapter.adapter_state_dict()
    out = Path(out)
    if fmt == "comfyui":
        alphas, ranks = _per_module(adapter)
        base_weights = None
        if adapter.spec.type == "dora":  # written so ComfyUI's DoRA rule gives PEFT's weights (formats.py)
            base_weights = {path.replace(".base_layer", ""): base_weight(layer) for path, layer in adapter._layers()}
            meta[DORA_SCALE_KEY] = DORA_SCALE_COMFYUI
        tensors = peft_to_comfyui(peft_sd, adapter.spec, alphas, ranks, base_weights)
        meta["cascade_studio.format"] = "comfyui"
        return save_adapter_tensors(tensors, out if out.suffix == ".safetensors" else out.with_suffix(".safetensors"),
                                    meta)
    if fmt == "peft":
        meta["cascade_studio.format"] = "peft"
        return _write_peft_folder(out, peft_sd, meta, _peft_config_dict(adapter))
    raise ValueError(f"unknown LoRA export format {fmt!r}; choose one of {FORMATS}")


def _peft_config_dict(adapter: LoraAdapter) -> dict:
    return _peft_config_json(adapter.spec, adapter.target_modules)


def _peft_config_json(spec: LoraSpec, modules: Any) -> dict:
    from .adapter import _peft_config

    config = _peft_config(spec, sorted(modules)).to_dict()
    config["target_modules"] = sorted(modules)
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def _write_peft_folder(out: Path, tensors: dict, metadata: dict[str, str], config: dict) -> Path:
    """A PEFT adapter folder (adapter_model.safetensors + adapter_config.json), built beside ``out`` and moved
    into place whole: a reader never sees weights without their config, nor an old folder half replaced."""
    import os
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_adapter_tensors(tensors, staging / "adapter_model.safetensors", metadata)
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def export_tensors(tensors: dict, metadata: dict[str, str], fmt: str, out: Path) -> Path:
    """A training checkpoint's PEFT-layout tensors (settings in ``metadata``) as ``fmt``, without a base model:
    the pure tensor conversion ``cascade-studio export`` runs."""
    from .formats import _split_peft_key

    spec = LoraSpec(rank=int(metadata.get("cascade_studio.rank", 16)),
                    alpha=float(metadata.get("cascade_studio.alpha", 16)),
                    type=metadata.get("cascade_studio.lora_type", "lora"),
                    targets=tuple(filter(None, metadata.get("cascade_studio.targets", "attention").split(","))))
    modules = sorted({_split_peft_key(k)[0] for k in tensors})
    ranks = {}
    for m in modules:
        if f"{m}.lora_A.weight" in tensors:
            ranks[m] = tensors[f"{m}.lora_A.weight"].shape[0]
        elif f"{m}.hada_w1_b" in tensors:
            ranks[m] = tensors[f"{m}.hada_w1_b"].shape[0]
        else:
            ranks[m] = spec.rank
    alphas = {m: spec.alpha for m in modules}
    metadata = dict(metadata, **{"cascade_studio.format": fmt})
    if fmt == "comfyui":
        if spec.type == "dora":
            # No base weights here, and ComfyUI normalises a DoRA by the base weight's norms: say so, in the file too.
            metadata[DORA_SCALE_KEY] = DORA_SCALE_PEFT
            print(f"warning: {out}: this DoRA is exported without the base model, so its dora_scale is PEFT's "
                  "magnitude and ComfyUI (which normalises by the original weight's norm) will give different "
                  "outputs; the comfyui file a training run exports at its end has the base and is exact",
                  file=sys.stderr)
        return save_adapter_tensors(peft_to_comfyui(tensors, spec, alphas, ranks), Path(out), metadata)
    if fmt == "peft":
        return _write_peft_folder(Path(out), tensors, metadata, _peft_config_json(spec, modules))
    raise ValueError(f"unknown LoRA export format {fmt!r}; choose one of {FORMATS}")


def sniff(keys: list[str], metadata: dict[str, str]) -> bool:
    return metadata.get("modelspec.architecture", "").endswith("/lora") or sniff_format(keys) != "unknown"


def load_adapter_file(path: Path, model: AdaptedStageC, context=None, name: str | None = None,
                      multiplier: float = 1.0, **_: Any) -> LoraAdapter:
    """Load a ComfyUI/kohya/OneTrainer file, a PEFT folder or an official positional file onto ``model``."""
    path = Path(path)
    name = name or path.stem
    if path.is_dir():
        tensors, metadata = load_adapter_tensors(path / "adapter_model.safetensors")
        config = json.loads((path / "adapter_config.json").read_text())
        spec, targets, peft_sd = _spec_from_peft_config(config, metadata), list(config["target_modules"]), tensors
    else:
        tensors, metadata = load_adapter_tensors(path)
        fmt = sniff_format(tensors)
        if fmt == "comfyui":
            spec, targets, peft_sd = comfyui_to_peft(tensors, model.stage_c,
                                                     metadata.get(DORA_SCALE_KEY, DORA_SCALE_PEFT))
        elif fmt == "official":
            spec, targets, peft_sd = official_to_peft(tensors, model.stage_c)
        elif fmt == "peft" and metadata.get("cascade_studio.method") == "lora":
            # a training checkpoint's adapter.safetensors: PEFT layout, settings in the metadata
            spec, targets, peft_sd = _spec_from_metadata(tensors, metadata), None, tensors
            targets = list(spec.targets)
        elif fmt == "peft":
            raise AdapterMismatchError(f"{path}: PEFT tensors need their adapter_config.json; pass the folder")
        else:
            raise AdapterMismatchError(f"{path}: no LoRA tensors found (first keys: {list(tensors)[:3]})")
    _check_base(metadata, context, path)
    adapter = LoraAdapter(spec, name=name, target_modules=targets, multiplier=multiplier,
                          info={k: v for k, v in metadata.items() if k.startswith("cascade_studio.base")})
    model.add_adapter(adapter)
    try:
        adapter.load_adapter_state_dict({k: v.float() for k, v in peft_sd.items()})
    except AdapterMismatchError as exc:
        model.remove_adapter(name)
        raise AdapterMismatchError(f"{path}: {exc}") from None
    if multiplier != 1.0:
        adapter.set_multiplier(multiplier)
    return adapter


def _spec_from_metadata(tensors: dict, metadata: dict[str, str]) -> LoraSpec:
    from .formats import _split_peft_key

    modules = sorted({_split_peft_key(k)[0] for k in tensors})
    return LoraSpec(rank=int(metadata.get("cascade_studio.rank", 16)),
                    alpha=float(metadata.get("cascade_studio.alpha", 16.0)),
                    type=metadata.get("cascade_studio.lora_type", "lora"), targets=tuple(modules))


def _spec_from_peft_config(config: dict, metadata: dict[str, str]) -> LoraSpec:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    kind = {"LORA": "dora" if config.get("use_dora") else "lora", "LOHA": "loha", "LOKR": "lokr"}.get(peft_type)
    if kind is None:
        raise AdapterMismatchError(f"unsupported PEFT adapter type {peft_type}")
    alpha = config.get("lora_alpha", config.get("alpha", config.get("r", 8)))
    return LoraSpec(rank=int(config.get("r", 8)), alpha=float(alpha),
                    dropout=float(config.get("lora_dropout", config.get("rank_dropout", 0.0)) or 0.0),
                    targets=tuple(config["target_modules"]), type=kind,
                    rank_pattern=dict(config.get("rank_pattern") or {}),
                    alpha_pattern=dict(config.get("alpha_pattern") or {}))


def _check_base(metadata: dict[str, str], context, path: Path) -> None:
    """Refuse a file whose recorded base width differs from this Stage C's (shapes would catch it later, less
    clearly)."""
    width = metadata.get("cascade_studio.base_width")
    if context is not None and width and context.width and int(width) != context.width:
        raise AdapterMismatchError(
            f"{path}: made for a Stage C of width {width} ({metadata.get('cascade_studio.base_model', '?')}); "
            f"this base has width {context.width} ({context.preset})")


# -- generation ------------------------------------------------------------------------------------------
def generation_load(resolved: Any, scratch: Path, state: dict) -> tuple[Path, dict[str, Any], None]:
    """(file to load, loader options, model input name) for one LoRA of a generation.

    Training checkpoints hold LoRAs in PEFT layout without the adapter_config.json the loader needs; they are
    converted to the ComfyUI layout first (the same pure tensor conversion ``cascade-studio export`` runs)."""
    from ..registry import read_adapter_header

    path = Path(resolved.path)
    if not path.is_dir() and sniff_format(read_adapter_header(path)[0]) == "peft":
        tensors, metadata = load_adapter_tensors(path)
        path = export_tensors(tensors, metadata, "comfyui", Path(scratch) / f"{path.parent.name}.safetensors")
    return path, {"multiplier": resolved.weight}, None


def generation_finish(loaded: list) -> None:
    """Fold the LoRAs into the base weights when a spec asked to merge (``merge`` merges every enabled LoRA)."""
    merging = [entry for entry in loaded if entry.resolved.spec.merge]
    if merging:
        merging[0].adapter.merge()


def describe_spec(spec: Any) -> list[str]:
    """Extra words of a LoRA spec's label."""
    return ["merged"] if spec.merge else []
