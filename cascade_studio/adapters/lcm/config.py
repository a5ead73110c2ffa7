"""The LCM-LoRA method's recipe section (``adapter.lcm``) and its catalog record. Imports no torch.

Defaults are the papers' where they exist (Luo et al. 2023, "Latent Consistency Models" and "LCM-LoRA"; the
reference LCM-LoRA training scripts): LoRA rank 64, a DDIM solver over skipping steps k = 20 of N = 1000
timesteps (a 50-step grid), the student's own weights as the target (no EMA), L2 loss, 4 sampling steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config.fields import setting
from ..catalog import ExportFormat, Method, register
from ..lora.config import LORA_TARGET_GROUPS, LoraConfig
from ..lora.config import check as check_lora_targets

LOSSES = ("l2", "huber")


@dataclass(frozen=True)
class LcmConfig:
    """A latent-consistency LoRA distilled from the frozen base Stage C (its guided sampler is the teacher)."""

    rank: int = setting(64, "Rank of the LoRA the consistency model is distilled into (LCM-LoRA: 64).", minimum=1,
                        example=64)
    alpha: float = setting(64.0, "Scale numerator: the update is multiplied by alpha/rank.", minimum=0,
                           min_exclusive=True, example=64.0)
    targets: tuple[str, ...] = setting(("attention",), "Layers to adapt, as for a LoRA: attention (= to_q, to_k, "
                                       "to_v, out_proj), kv_mapper, channelwise, clip_mappers, or a module name "
                                       "suffix.", choices=tuple(LORA_TARGET_GROUPS), open_choices=True,
                                       example=["attention"])
    timesteps: int = setting(1000, "N: the fine time grid the skipping steps are counted on (the papers' 1000 "
                             "DDPM timesteps); t in [0, 1] is split into N equal steps.", minimum=2, example=1000)
    skip: int = setting(20, "k: the teacher's one DDIM step goes from grid time n*k/N to (n-1)*k/N, so the "
                        "student learns on N/k times (LCM: k = 20, a 50-step grid). Must divide timesteps.",
                        minimum=1, example=20)
    guidance_min: float = setting(2.0, "Smallest classifier-free guidance scale of the teacher, drawn per "
                                  "example (Stage C's convention: lerp(uncond, cond, scale), published 4).",
                                  minimum=1, example=2.0)
    guidance_max: float = setting(8.0, "Largest teacher guidance scale; equal to guidance_min for one fixed "
                                  "scale.", minimum=1, example=8.0)
    guidance_rescale: float = setting(0.7, "Rescale of the teacher's guided prediction towards the conditional "
                                      "one's std (rho; 0.7 is the published sampling setting).", minimum=0,
                                      maximum=1, example=0.7)
    loss: str = setting("l2", "Consistency loss: l2 (mean squared error) or huber (pseudo-Huber with "
                        "huber_c).", choices=LOSSES)
    huber_c: float = setting(0.001, "The pseudo-Huber loss's c (LCM scripts: 0.001).", minimum=0,
                             min_exclusive=True, example=0.001)
    inference_steps: int = setting(4, "The sampling step count the exported file recommends (metadata; use "
                                   "generate --sampler lcm --steps N).", minimum=1, maximum=50, example=4)


def lora_section(section: LcmConfig) -> LoraConfig:
    """The plain LoRA the distillation trains (the LoRA method's own section, so its code serves unchanged)."""
    return LoraConfig(rank=section.rank, alpha=section.alpha, dropout=0.0, targets=tuple(section.targets),
                      type="lora", init_weights=True)


def check(section: LcmConfig, recipe: Any, ok, add) -> None:
    """The skip divides the grid, the guidance range is a range, and the LoRA targets are as for a LoRA."""
    if ok("adapter.lcm.timesteps", "adapter.lcm.skip") and section.timesteps % section.skip:
        add("adapter.lcm.skip", section.skip, f"must divide adapter.lcm.timesteps ({section.timesteps})",
            "e.g. timesteps 1000 with skip 20 (a 50-step grid)")
    if ok("adapter.lcm.guidance_min", "adapter.lcm.guidance_max") and section.guidance_min > section.guidance_max:
        add("adapter.lcm.guidance_max", section.guidance_max,
            f"must be at least adapter.lcm.guidance_min ({section.guidance_min})", "e.g. guidance_max: 8.0")

    def rename(path: str) -> str:
        return path.replace("adapter.lora.", "adapter.lcm.")

    check_lora_targets(section, recipe, lambda *paths: ok(*map(rename, paths)),
                       lambda path, *rest: add(rename(path), *rest))


METHOD = register(Method(
    name="lcm", label="LCM-LoRA",
    doc="latent consistency distillation into a LoRA: 2-8 unguided steps with the lcm sampler",
    config=LcmConfig,
    formats=(ExportFormat("comfyui", "one .safetensors LoRA file with kohya-style keys, as a LoRA's; its metadata "
                          "says it is an LCM-LoRA and the sampler and steps it is for"),),
    implementation="cascade_studio.adapters.lcm.method", aliases=("lcm_lora",), short="lcm",
    weight_name="multiplier", weight_prefix="x", check=check, kind_of=("lora",)))
