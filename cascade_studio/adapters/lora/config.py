"""The LoRA method's recipe section (``adapter.lora``) and its catalog record. Imports no torch."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ...config.fields import setting
from ..catalog import CommandLine, ExportFormat, Method, register

# Named groups of Stage C Linear layers a LoRA can target. "attention" uses ComfyUI's in-memory names for the
# split attention projections, which is what makes the exported file loadable there (STABLE_CASCADE.md §6).
LORA_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "out_proj"),
    "kv_mapper": ("kv_mapper.1",),
    "channelwise": ("channelwise.0", "channelwise.4"),
    "clip_mappers": ("clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper"),
}


@dataclass(frozen=True)
class LoraConfig:
    """LoRA (and its LoHa/LoKr/DoRA relatives) on Stage C Linear layers."""

    rank: int = setting(16, "Rank of the low-rank update.", minimum=1, example=16)
    alpha: float = setting(16.0, "Scale numerator: the update is multiplied by alpha/rank.", minimum=0,
                           min_exclusive=True, example=16.0)
    dropout: float = setting(0.0, "Dropout on the LoRA input during training (0 disables).", minimum=0,
                             maximum=1, max_exclusive=True, example=0.0)
    targets: tuple[str, ...] = setting(("attention",), "Layers to adapt: attention (= to_q, to_k, to_v, "
                                       "out_proj), kv_mapper, channelwise, clip_mappers, or an explicit module "
                                       "name suffix such as attn.to_q.", choices=tuple(LORA_TARGET_GROUPS),
                                       open_choices=True, example=["attention"])
    type: str = setting("lora", "Adapter flavour: lora, loha (Hadamard product), lokr (Kronecker) or dora "
                        "(weight-decomposed). ComfyUI loads all four.", choices=("lora", "loha", "lokr", "dora"))
    init_weights: bool = setting(True, "Initialise so the fresh adapter changes nothing (up weights zero).")


# An explicit LoRA target is a dotted module-name suffix such as "attn.to_q" or "down_blocks.0.2.attention".
_MODULE_SUFFIX = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")


def check(section: LoraConfig, recipe: Any, ok, add) -> None:
    """Every target is a named group or a module-name suffix, and there is at least one."""
    if not ok("adapter.lora.targets"):
        return
    if not section.targets:
        add("adapter.lora.targets", [], "must list at least one target", "e.g. [attention]")
    for index, target in enumerate(section.targets):
        if target not in LORA_TARGET_GROUPS and not _MODULE_SUFFIX.match(target):
            add(f"adapter.lora.targets[{index}]", target,
                "must be one of " + ", ".join(LORA_TARGET_GROUPS) + " or a module name suffix",
                "e.g. attention or attn.to_q")


def _add_generate(parser: Any) -> None:
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[@MULT]",
                        help="LoRA file (or run:/ckpt: spec) with an optional multiplier; repeatable")
    parser.add_argument("--merge-lora", action="store_true", help="fold the LoRAs into the base weights (faster)")


def _settings(args: Any) -> dict:
    return {"merge": getattr(args, "merge_lora", False)}


def _specs(args: Any, parse) -> list:
    return [parse(text, method="lora", **_settings(args)) for text in getattr(args, "lora", [])]


METHOD = register(Method(
    name="lora", label="LoRA", doc="low-rank updates of Stage C's Linear layers (style, subject)",
    config=LoraConfig,
    formats=(ExportFormat("comfyui", "one .safetensors file with kohya-style keys; ComfyUI, kohya and OneTrainer "
                          "load it"),
             ExportFormat("peft", "a PEFT adapter folder: adapter_model.safetensors + adapter_config.json",
                          folder=True)),
    implementation="cascade_studio.adapters.lora.method", weight_name="multiplier", weight_prefix="x",
    check=check, command_line=CommandLine(add_generate=_add_generate, specs=_specs, settings=_settings)))
