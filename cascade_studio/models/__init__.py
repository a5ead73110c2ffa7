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
from .effnet import EffnetEncoder, build_effnet
from .encoders import (ImageEncoder, OpenClipImageEncoder, TextEncoder, build_image_encoder, build_ip_image_encoder,
                       build_text_encoder, tokenize)
from .loading import (WeightsError, detect_family, infer_config, load_controlnet, load_effnet, load_image_encoder,
                      load_ip_image_encoder, load_previewer, load_stage_a, load_stage_b, load_stage_c,
                      load_text_encoder, weights_fingerprint)
from .previewer import Previewer
from .stage_a import StageA
from .stage_b import StageB
from .stage_c import StageC

__all__ = [
    "EffnetEncoder", "ImageEncoder", "OpenClipImageEncoder", "TextEncoder", "WeightsError", "build_effnet",
    "build_image_encoder", "build_ip_image_encoder", "build_text_encoder", "detect_family", "infer_config",
    "load_controlnet", "load_effnet", "load_image_encoder", "load_ip_image_encoder", "load_previewer",
    "load_stage_a", "load_stage_b", "load_stage_c", "load_text_encoder", "tokenize", "weights_fingerprint",
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
