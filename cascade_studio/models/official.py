"""Translate between our in-memory parameter names and the official Stable Cascade file layout.

Our attention keeps separate ``to_q``/``to_k``/``to_v`` Linears; official files (and ``official_state_dict_keys
.json``) hold torch's fused ``in_proj_weight`` [3c, c] / ``in_proj_bias`` [3c] with q, k, v stacked in that
order. Everything else is named identically. Diffusers-format files split attention differently
(``attention.to_q`` ... ``attention.to_out.0``, no ``.attn`` level) and call Stage B's ``clip_mapper``
``clip_txt_pooled_mapper``; the converters below turn them into official names.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
from torch import nn

_QKV = ("to_q", "to_k", "to_v")
_FUSED = {"weight": "in_proj_weight", "bias": "in_proj_bias"}
_SHOW = 5  # how many keys an error message names before summarising


class StateDictMismatchError(ValueError):
    """Weights that do not fit a module. ``missing``/``unexpected`` are official key names; ``mismatched`` holds
    ``(key, shape in file, shape expected)``."""

    def __init__(
        self,
        target: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        parts = []
        if missing:
            parts.append(f"{_count(missing, 'missing key')}: {_first(missing)}")
        if unexpected:
            parts.append(f"{_count(unexpected, 'unexpected key')}: {_first(unexpected)}")
        if mismatched:
            shown = [f"{k} (file {list(got)} vs model {list(want)})" for k, got, want in mismatched]
            parts.append(f"{_count(mismatched, 'shape mismatch', 'es')}: {_first(shown)}")
        super().__init__(f"Weights do not fit {target}. " + "; ".join(parts) + ". " + _hint(unexpected, mismatched))


def _count(items: list, noun: str, plural: str = "s") -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else plural}"


def _first(items: list[str]) -> str:
    more = len(items) - _SHOW
    return ", ".join(items[:_SHOW]) + (f", ... and {more} more" if more > 0 else "")


def _hint(unexpected: list[str], mismatched: list) -> str:
    if any(".attention.to_q." in k or ".to_out.0." in k for k in unexpected):
        return ("These look like diffusers-format names; convert them first with convert_diffusers_stage_c_keys "
                "or convert_diffusers_stage_b_keys.")
    if unexpected and all(k.split(".", 1)[0] in ("model", "module", "_orig_mod") for k in unexpected):
        return "The keys carry a wrapper prefix (model./module./_orig_mod.); strip it before loading."
    if mismatched:
        return "Check that the file is the same model size as the preset (e.g. big vs lite) and the right stage."
    return "Check that the file holds this stage (Stage C, B, A, previewer, ControlNet) in the official layout."


def official_key_plan(keys: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(official key, our keys) in module order; attention q/k/v collapse into one fused official key."""
    keys = list(keys)
    present = set(keys)
    plan: list[tuple[str, list[str]]] = []
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        holder, _, layer = prefix.rpartition(".")
        if layer in _QKV and leaf in _FUSED:
            base = f"{holder}." if holder else ""  # a bare Attention module has no holder prefix
            group = [f"{base}{name}.{leaf}" for name in _QKV]
            if all(k in present for k in group):
                if layer == "to_q":
                    plan.append((f"{base}{_FUSED[leaf]}", group))
                continue
        plan.append((key, [key]))
    return plan


def _official_shape(shapes: list[torch.Size]) -> tuple[int, ...]:
    if len(shapes) == 1:
        return tuple(shapes[0])
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def official_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights under official names (attention fused). Works on meta-device modules."""
    own = module.state_dict()
    return {
        official: own[ours[0]] if len(ours) == 1 else torch.cat([own[k] for k in ours], dim=0)
        for official, ours in official_key_plan(own.keys())
    }


def load_official_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], assign: bool = False
) -> nn.Module:
    """Load official-layout weights into ``module`` (strict) and return it.

    Fused attention is split into q/k/v. With ``assign=True`` the tensors are taken as they are (dtype and
    device included), which is how a meta-device model gets real weights. BatchNorm ``num_batches_tracked``
    counters may be absent (some exporters drop them; they do nothing in eval mode). Anything else missing,
    extra or of the wrong shape raises :class:`StateDictMismatchError` naming the keys.
    """
    own = module.state_dict()
    plan = official_key_plan(own.keys())
    # Fused shapes are computed, not materialised: a 3.6B model must not be copied just to check a file.
    expected = {official: _official_shape([own[k].shape for k in ours]) for official, ours in plan}
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, tuple(state_dict[k].shape), shape)
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != shape
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(type(module).__name__, missing, unexpected, mismatched)

    ours_sd: dict[str, torch.Tensor] = {}
    for official, ours in plan:
        if official not in state_dict:  # an absent BatchNorm counter: start it at zero
            ours_sd[ours[0]] = torch.zeros((), dtype=torch.long)
            continue
        tensor = state_dict[official]
        if len(ours) == 1:
            ours_sd[ours[0]] = tensor
        else:
            parts = tensor.split([own[k].shape[0] for k in ours], dim=0)
            if assign:
                # Assigned views would share one storage, which safetensors refuses to save; own the memory.
                parts = tuple(part.clone() for part in parts)
            ours_sd.update(zip(ours, parts))
    module.load_state_dict(ours_sd, strict=True, assign=assign)
    return module


_DIFFUSERS_ATTN = re.compile(r"^(?P<holder>.*\.attention)\.(?P<layer>to_q|to_k|to_v|to_out\.0)\.(?P<leaf>weight|bias)$")


def _convert_diffusers(state_dict: Mapping[str, torch.Tensor], renames: Mapping[str, str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _DIFFUSERS_ATTN.match(key)
        if match is None:
            for old, new in renames.items():
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            out[key] = tensor
            continue
        holder, layer, leaf = match["holder"], match["layer"], match["leaf"]
        if layer == "to_out.0":
            out[f"{holder}.attn.out_proj.{leaf}"] = tensor
            continue
        fused_key = f"{holder}.attn.{_FUSED[leaf]}"
        if fused_key in out:
            continue  # already fused when its first part was met
        parts = [f"{holder}.{name}.{leaf}" for name in _QKV]
        absent = [p for p in parts if p not in state_dict]
        if absent:
            raise StateDictMismatchError("a fused attention", absent, [], [])
        out[fused_key] = torch.cat([state_dict[p] for p in parts], dim=0)
    return out


def convert_diffusers_stage_c_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``StableCascadeUNet`` prior weights -> official Stage C names (attention fused)."""
    return _convert_diffusers(state_dict, {})


def convert_diffusers_stage_b_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``StableCascadeUNet`` decoder weights -> official Stage B names (attention fused,
    ``clip_txt_pooled_mapper`` -> ``clip_mapper``)."""
    return _convert_diffusers(state_dict, {"clip_txt_pooled_mapper.": "clip_mapper."})
