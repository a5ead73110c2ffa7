"""Stable Cascade architectures with the official key layout, presets and weight-name translation."""

from .blocks import Attention, AttnBlock, GlobalResponseNorm, LayerNorm2d, ResBlock, TimestepBlock
from .controlnet import ControlNet
from .official import (
    StateDictMismatchError,
    convert_diffusers_stage_b_keys,
    convert_diffusers_stage_c_keys,
    load_official_state_dict,
    official_state_dict,
)
from .presets import (
    PRESETS,
    CascadePreset,
    build_controlnet,
    build_previewer,
    build_stage_a,
    build_stage_b,
    build_stage_c,
    get_preset,
)
from .previewer import Previewer
from .stage_a import StageA
from .stage_b import StageB
from .stage_c import StageC

__all__ = [
    "Attention",
    "AttnBlock",
    "CascadePreset",
    "ControlNet",
    "GlobalResponseNorm",
    "LayerNorm2d",
    "PRESETS",
    "Previewer",
    "ResBlock",
    "StageA",
    "StageB",
    "StageC",
    "StateDictMismatchError",
    "TimestepBlock",
    "build_controlnet",
    "build_previewer",
    "build_stage_a",
    "build_stage_b",
    "build_stage_c",
    "convert_diffusers_stage_b_keys",
    "convert_diffusers_stage_c_keys",
    "get_preset",
    "load_official_state_dict",
    "official_state_dict",
]
