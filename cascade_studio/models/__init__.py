"""Stable Cascade architectures with the official key layout, presets and weight-name translation.

Names are imported on first use: the preset table (``presets``) is read by recipes, the CLI and the studio
without importing torch.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "effnet": ("EffnetEncoder", "build_effnet",),
    "encoders": (
        "ImageEncoder", "OpenClipImageEncoder", "TextEncoder", "build_image_encoder", "build_ip_image_encoder",
        "build_text_encoder", "tokenize",
    ),
    "loading": (
        "WeightsError", "detect_family", "infer_config", "load_controlnet", "load_effnet", "load_image_encoder",
        "load_ip_image_encoder", "load_previewer", "load_stage_a", "load_stage_b", "load_stage_c",
        "load_text_encoder", "weights_fingerprint",
    ),
    "blocks": ("Attention", "AttnBlock", "GlobalResponseNorm", "LayerNorm2d", "ResBlock", "TimestepBlock",),
    "presets": (
        "CascadePreset", "PRESETS", "build_controlnet", "build_previewer", "build_stage_a", "build_stage_b",
        "build_stage_c", "get_preset",
    ),
    "controlnet": ("ControlNet",),
    "previewer": ("Previewer",),
    "stage_a": ("StageA",),
    "stage_b": ("StageB",),
    "stage_c": ("StageC",),
    "official": (
        "StateDictMismatchError", "convert_diffusers_stage_b_keys", "convert_diffusers_stage_c_keys",
        "load_official_state_dict", "official_state_dict",
    ),
}
__all__ = [name for names in _EXPORTS.values() for name in names]


__getattr__ = lazy_exports(__name__, _EXPORTS)
