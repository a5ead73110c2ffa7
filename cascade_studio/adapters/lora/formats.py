"""LoRA file formats: ComfyUI/kohya (the default export), PEFT, and the official positional files (import only).

ComfyUI's rule for Stage C (STABLE_CASCADE.md section 6): keys are ``lora_unet_`` + the module path with dots
replaced by underscores, where module paths use ComfyUI's in-memory names. This studio's Stage C uses exactly
those names (``attention.attn.to_q`` ...), so the mapping is the identity on paths.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from ..base import AdapterMismatchError
from .adapter import LoraSpec, base_module_paths

COMFY_PREFIXES = ("lora_unet_", "lora_prior_unet_")
EXPORT_PREFIX = "lora_unet_"
# diffusers-style attention names that some trainers write; ComfyUI would ignore them, we map them.
_DIFFUSERS_ALIASES = (
    (re.compile(r"_attention_to_(q|k|v)$"), r"_attention_attn_to_\1"),
    (re.compile(r"_attention_to_out_0$"), r"_attention_attn_out_proj"),
)
_LORA_SUFFIXES = {
    "lora_down.weight": "lora_A.weight",
    "lora_up.weight": "lora_B.weight",
}
_LYCORIS_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def comfy_key(module_path: str) -> str:
    return EXPORT_PREFIX + module_path.replace(".", "_")


# -- DoRA ------------------------------------------------------------------------------------------------------
# PEFT's DoRA (what trains here): W' = m * (W + dW) / ||W + dW||, norms per output row, dW = alpha/rank * up @ down.
# ComfyUI (comfy/weight_adapter/base.py weight_decompose, for a dora_scale of one value per output row):
# W' = (W + dW) * dora_scale / (||W|| + eps), normalised by the ORIGINAL weight's row norms. So a file written with
# dora_scale = m * ||W|| / ||W + dW|| makes ComfyUI compute exactly PEFT's W' (up to its eps, 1e-7 relative for
# fp32 weights). That needs the base weights at export; such files say so in their metadata.
DORA_SCALE_KEY = "cascade_studio.dora_scale"
DORA_SCALE_COMFYUI = "comfyui-original-norm"  # dora_scale = m * ||W|| / ||W + dW|| (ComfyUI reproduces PEFT)
DORA_SCALE_PEFT = "peft-magnitude"  # dora_scale = m (written without the base weights: ComfyUI output differs)


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen base weight of a (possibly PEFT-wrapped, possibly quantized) Linear, as floats."""
    from ..ip_adapter.adapter import float_weight  # the one dequantizing reader of a quantized base's weights

    layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return float_weight(layer)


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.float().reshape(weight.shape[0], -1).norm(dim=1)


def dora_scale_for_comfyui(magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The ``dora_scale`` [out, 1] that makes ComfyUI's rule give PEFT's DoRA weight for base ``weight``."""
    return (magnitude.float() * _row_norms(weight) / _row_norms(weight.float() + delta.float())).reshape(-1, 1)


def magnitude_from_comfyui(dora_scale: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The inverse: PEFT's magnitude vector for a ``dora_scale`` written by :func:`dora_scale_for_comfyui`."""
    return dora_scale.float().reshape(-1) * _row_norms(weight.float() + delta.float()) / _row_norms(weight)


# -- export ---------------------------------------------------------------------------------------------------
def peft_to_comfyui(peft_sd: dict[str, torch.Tensor], spec: LoraSpec,
                    alphas: dict[str, float], ranks: dict[str, int],
                    base_weights: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Convert a PEFT adapter state dict of one adapter into ComfyUI/kohya tensors.

    ``alphas`` and ``ranks`` give the per-module alpha and rank (PEFT's scaling is alpha / rank; ComfyUI's too).
    ``base_weights`` (module path -> the frozen base weight) lets a DoRA's ``dora_scale`` be written so that
    ComfyUI reproduces it exactly (see ``DORA_SCALE_COMFYUI``); without them it is PEFT's magnitude.
    """
    out: dict[str, torch.Tensor] = {}
    by_module: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in peft_sd.items():
        module, _, leaf = _split_peft_key(key)
        by_module[module][leaf] = tensor
    for module, tensors in by_module.items():
        prefix = comfy_key(module)
        alpha = float(alphas[module])
        rank = int(ranks[module])
        if spec.type in ("lora", "dora"):
            out[f"{prefix}.lora_down.weight"] = tensors["lora_A.weight"].contiguous()
            out[f"{prefix}.lora_up.weight"] = tensors["lora_B.weight"].contiguous()
            out[f"{prefix}.alpha"] = torch.tensor(alpha)
            if spec.type == "dora":
                magnitude = next(v for k, v in tensors.items() if k.startswith("lora_magnitude_vector"))
                if base_weights is not None:
                    delta = (alpha / rank) * (tensors["lora_B.weight"].float() @ tensors["lora_A.weight"].float())
                    out[f"{prefix}.dora_scale"] = dora_scale_for_comfyui(magnitude, base_weights[module], delta)
                else:
                    out[f"{prefix}.dora_scale"] = magnitude.reshape(-1, 1).contiguous()
        elif spec.type == "loha":
            for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                out[f"{prefix}.{name}"] = tensors[name].contiguous()
            out[f"{prefix}.alpha"] = torch.tensor(alpha)
        elif spec.type == "lokr":
            # ComfyUI scales LoKr by alpha/dim only when a factor is decomposed, else by 1. Baking PEFT's
            # alpha/rank into w1 (kron is bilinear) and writing no alpha makes both tools agree in every case.
            scale = alpha / rank
            for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
                if name in tensors:
                    t = tensors[name]
                    if name in ("lokr_w1", "lokr_w1_a"):
                        t = t * scale
                    out[f"{prefix}.{name}"] = t.contiguous()
    return out


def _split_peft_key(key: str) -> tuple[str, str, str]:
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".hada_", ".lokr_"):
        i = key.find(marker)
        if i >= 0:
            return key[:i], marker, key[i + 1:]
    raise AdapterMismatchError(f"unexpected PEFT adapter key {key!r}")


# -- import ---------------------------------------------------------------------------------------------------
def comfyui_to_peft(sd: dict[str, torch.Tensor], stage_c: nn.Module,
                    dora_scale: str = DORA_SCALE_PEFT) -> tuple[LoraSpec, list[str], dict]:
    """Parse a ComfyUI/kohya/OneTrainer LoRA file into (spec, target module paths, PEFT state dict).

    ``dora_scale``: how the file's DoRA ``dora_scale`` is meant (its ``cascade_studio.dora_scale`` metadata;
    other tools' files: PEFT's magnitude).

    Keys for modules that this Stage C does not have (e.g. text-encoder LoRA ``lora_te_*``) are refused with
    a list, since silently dropping them would give a different picture than the tool that made the file.
    """
    paths = base_module_paths(stage_c)
    by_comfy = {p.replace(".", "_"): p for p in paths}
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown: list[str] = []
    for key, tensor in sd.items():
        stem, leaf = _split_comfy_key(key)
        if stem is None:
            unknown.append(key)
            continue
        for pattern, repl in _DIFFUSERS_ALIASES:
            stem = pattern.sub(repl, stem)
        module = by_comfy.get(stem)
        if module is None:
            unknown.append(key)
            continue
        grouped[module][leaf] = tensor
    if unknown:
        raise AdapterMismatchError(
            f"{len(unknown)} tensors in this LoRA match no Stage C module (e.g. {unknown[:3]}); it was made for "
            "another model (text-encoder LoRA, Stage B, SDXL?) or another Stage C size"
        )
    if not grouped:
        raise AdapterMismatchError("the file holds no LoRA tensors (expected keys like "
                                   "'lora_unet_down_blocks_0_2_attention_attn_to_q.lora_down.weight')")
    kinds = {_kind(t) for t in grouped.values()}
    if len(kinds) != 1:
        raise AdapterMismatchError(f"mixed LoRA kinds in one file ({sorted(kinds)}) are not supported")
    kind = kinds.pop()
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    peft_sd: dict[str, torch.Tensor] = {}
    for module, tensors in grouped.items():
        if kind in ("lora", "dora"):
            down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
            if down is None or up is None:
                raise AdapterMismatchError(f"{module}: needs both lora_down.weight and lora_up.weight")
            rank = down.shape[0]
            peft_sd[f"{module}.lora_A.weight"] = down
            peft_sd[f"{module}.lora_B.weight"] = up
            if kind == "dora":
                scale = tensors["dora_scale"]
                if dora_scale == DORA_SCALE_COMFYUI:
                    alpha = float(tensors["alpha"].item()) if "alpha" in tensors else float(rank)
                    delta = (alpha / rank) * (up.float() @ down.float())
                    weight = base_weight(stage_c.get_submodule(module))
                    scale = magnitude_from_comfyui(scale, weight, delta).to(scale.dtype)
                peft_sd[f"{module}.lora_magnitude_vector"] = scale.reshape(-1)
        elif kind == "loha":
            rank = tensors["hada_w1_b"].shape[0]
            for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                peft_sd[f"{module}.{name}"] = tensors[name]
        else:  # lokr
            # PEFT keeps w2 whole when rank >= max(w2 dims) / 2, and factorises it below that: pick the
            # rank that reproduces the file's own layout.
            rank = tensors["lokr_w2_a"].shape[1] if "lokr_w2_a" in tensors else max(tensors["lokr_w2"].shape)
            for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
                if name in tensors:
                    peft_sd[f"{module}.{name}"] = tensors[name]
        ranks[module] = int(rank)
        # kohya's convention: a missing alpha means alpha = rank (scale 1)
        alphas[module] = float(tensors["alpha"].item()) if "alpha" in tensors else float(rank)
        if kind == "lokr" and "alpha" not in tensors:
            alphas[module] = float(rank)
    default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    default_alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    spec = LoraSpec(
        rank=default_rank, alpha=default_alpha, type=kind, targets=tuple(grouped),
        rank_pattern={_exact(m): r for m, r in ranks.items() if r != default_rank},
        alpha_pattern={_exact(m): a for m, a in alphas.items() if a != default_alpha},
    )
    return spec, list(grouped), peft_sd


def _exact(module_path: str) -> str:
    # PEFT matches pattern keys as regular expressions against the end of module paths
    return "^" + re.escape(module_path)


def _split_comfy_key(key: str) -> tuple[str | None, str]:
    prefix = next((p for p in COMFY_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None, ""
    rest = key[len(prefix):]
    for leaf in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale") + _LYCORIS_TENSORS:
        if rest.endswith("." + leaf):
            return rest[: -len(leaf) - 1], leaf
    return None, ""


def _kind(tensors: dict[str, torch.Tensor]) -> str:
    if "hada_w1_a" in tensors:
        return "loha"
    if any(k.startswith("lokr_") for k in tensors):
        return "lokr"
    if "dora_scale" in tensors:
        return "dora"
    return "lora"


def official_to_peft(sd: dict[str, torch.Tensor], stage_c: nn.Module) -> tuple[LoraSpec, list[str], dict]:
    """Map the official trainer's positional LoRA (``weights.{i}.lora_down/lora_up``) onto split attention.

    The official LoRA wraps, in module order, every AttnBlock's fused ``in_proj_weight`` then its ``out_proj``,
    with scale alpha/rank where alpha = 1. The fused delta ``up @ down`` ([3c, c]) splits by rows into q, k, v,
    which is exactly three LoRAs sharing ``down`` with ``up`` cut in thirds.
    """
    index: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    pattern = re.compile(r"^weights\.(\d+)\.(lora_down|lora_up)(\.weight)?$")
    for key, tensor in sd.items():
        m = pattern.match(key)
        if not m:
            raise AdapterMismatchError(f"unexpected key {key!r} in an official-format LoRA file")
        index[int(m.group(1))][m.group(2)] = tensor
    attn_blocks = [p.rsplit(".attn.", 1)[0] + ".attn" for p in base_module_paths(stage_c)
                   if p.endswith(".attention.attn.to_q")]
    if len(index) != 2 * len(attn_blocks):
        raise AdapterMismatchError(
            f"the official LoRA file has {len(index)} layers; this Stage C has {len(attn_blocks)} attention "
            f"blocks ({2 * len(attn_blocks)} layers). It was made for a different Stage C (big vs lite?)")
    peft_sd: dict[str, torch.Tensor] = {}
    rank = None
    for b, block in enumerate(attn_blocks):
        in_proj, out_proj = index[2 * b], index[2 * b + 1]
        q_weight = stage_c.get_submodule(block + ".to_q")
        width = (q_weight.base_layer if hasattr(q_weight, "base_layer") else q_weight).weight.shape[1]
        r = in_proj["lora_down"].shape[0]
        rank = rank or r
        if (tuple(in_proj["lora_up"].shape) != (3 * width, r) or tuple(in_proj["lora_down"].shape) != (r, width)
                or tuple(out_proj["lora_up"].shape) != (width, r) or tuple(out_proj["lora_down"].shape) != (r, width)):
            raise AdapterMismatchError(
                f"official LoRA layer {2 * b}/{2 * b + 1} shapes do not fit attention width {width} of {block}")
        up = in_proj["lora_up"]
        for j, proj in enumerate(("to_q", "to_k", "to_v")):
            peft_sd[f"{block}.{proj}.lora_A.weight"] = in_proj["lora_down"].clone()
            peft_sd[f"{block}.{proj}.lora_B.weight"] = up[j * width:(j + 1) * width].clone()
        peft_sd[f"{block}.out_proj.lora_A.weight"] = out_proj["lora_down"]
        peft_sd[f"{block}.out_proj.lora_B.weight"] = out_proj["lora_up"]
    targets = [f"{b}.{p}" for b in attn_blocks for p in ("to_q", "to_k", "to_v", "out_proj")]
    spec = LoraSpec(rank=int(rank), alpha=1.0, type="lora", targets=tuple(targets))
    return spec, targets, peft_sd


def sniff_format(keys: Iterable[str]) -> str:
    """'comfyui', 'peft' or 'official' from the tensor names of a LoRA file."""
    keys = list(keys)
    if any(k.startswith(COMFY_PREFIXES) for k in keys):
        return "comfyui"
    if keys and all(k.startswith("weights.") for k in keys):
        return "official"
    if any(".lora_A." in k or ".hada_w1_a" in k or ".lokr_w" in k for k in keys):
        return "peft"
    return "unknown"
