"""The torch side of the LCM-LoRA method: the adapter, its files and its generation hooks are the LoRA
method's, reused by import; what is its own is the training objective (``objective.py``), the metadata that
says what the file is for, and the memory plan."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...diffusion.samplers import get_sampler
from ..base import AdaptedStageC
from ..lora import method as lora_method
from ..lora.adapter import LoraAdapter, LoraSpec
from .config import METHOD, lora_section
from .objective import training_loss  # noqa: F401  (the method's training_loss hook)
from .plan import plan_adapter  # noqa: F401

__all__ = ["create_adapter", "export_adapter", "export_tensors", "load_adapter_file", "sniff", "lcm_metadata",
           "SAMPLER", "generation_load", "generation_finish", "describe_spec"]

# The sampler an LCM-LoRA is drawn with (diffusion/lcm.py), recorded in every file.
SAMPLER = get_sampler("lcm").name
KIND_KEY = "cascade_studio.lcm"


def lcm_metadata(section: Any) -> dict[str, str]:
    """What an LCM-LoRA file says about itself besides being a LoRA: that it is one, the sampler and step count it
    is for, and how it was distilled."""
    return {
        "cascade_studio.method": METHOD.name,
        KIND_KEY: "LCM-LoRA: latent consistency distillation of this base Stage C (Luo et al. 2023)",
        "cascade_studio.lcm.sampler": SAMPLER,
        "cascade_studio.lcm.steps": str(section.inference_steps),
        "cascade_studio.lcm.grid_steps": str(section.timesteps // section.skip),
        "cascade_studio.lcm.guidance": f"{section.guidance_min:g}-{section.guidance_max:g}",
        "modelspec.description": f"LCM-LoRA: sample with the {SAMPLER} sampler, {section.inference_steps} steps, "
                                 "no classifier-free guidance",
    }


def create_adapter(cfg: Any, model: AdaptedStageC, context, name: str = METHOD.name) -> LoraAdapter:
    """A fresh LoRA (the LoRA method's adapter) from the recipe's ``adapter.lcm`` section, attached to ``model``;
    its metadata says it is an LCM-LoRA."""
    info = {**lora_method._base_info(context), **lcm_metadata(cfg)}
    adapter = LoraAdapter(LoraSpec.from_config(lora_section(cfg)), name=name, info=info)
    adapter.method = METHOD.name
    model.add_adapter(adapter)
    return adapter


def export_adapter(adapter: LoraAdapter, out: str | Path, fmt: str = "comfyui",
                   extra_metadata: dict[str, str] | None = None) -> Path:
    """The LoRA method's export (the same ComfyUI file), with the LCM metadata the adapter carries."""
    METHOD.export_format(fmt)
    return lora_method.export_adapter(adapter, out, fmt, extra_metadata)


def export_tensors(tensors: dict, metadata: dict[str, str], fmt: str, out: Path) -> Path:
    """A checkpoint's tensors as ``fmt`` (``cascade-studio export``), as the LoRA method converts them."""
    METHOD.export_format(fmt)
    return lora_method.export_tensors(tensors, metadata, fmt, out)


def sniff(keys: list[str], metadata: dict[str, str]) -> bool:
    """An LCM-LoRA file says so in its metadata; its tensors alone are a LoRA's."""
    return KIND_KEY in metadata


def load_adapter_file(path: Path, model: AdaptedStageC, context=None, name: str | None = None,
                      multiplier: float = 1.0, **options: Any) -> LoraAdapter:
    """Load an LCM-LoRA file as the LoRA it is (any multiplier; it combines with other LoRAs)."""
    adapter = lora_method.load_adapter_file(path, model, context, name=name, multiplier=multiplier, **options)
    adapter.method = METHOD.name
    return adapter


# Generation: a checkpoint's PEFT-layout tensors are converted to the ComfyUI file first, as for a LoRA.
generation_load = lora_method.generation_load
generation_finish = lora_method.generation_finish  # --merge-lora folds an LCM-LoRA in like any LoRA
describe_spec = lora_method.describe_spec
