"""Model presets (big / lite / tiny) and the builders that take official constructor keywords.

``big`` and ``lite`` are the published configurations (STABLE_CASCADE.md sections 2, 4, 6). ``tiny`` is a
CPU-sized model for tests and tiny recipes; its dimensions are fixed in DESIGN.md because the encoders, data cache
and adapters must agree on them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from .controlnet import ControlNet
from .previewer import Previewer
from .stage_a import StageA
from .stage_b import StageB
from .stage_c import StageC


@dataclass(frozen=True)
class CascadePreset:
    """Constructor kwargs of every stage plus ControlNet and resolution defaults for one model size."""

    name: str
    stage_c: dict[str, Any]
    stage_b: dict[str, Any]
    stage_a: dict[str, Any] = field(default_factory=dict)
    previewer: dict[str, Any] = field(default_factory=dict)
    controlnet_c_proj: int = 2048
    controlnet_proj_blocks: tuple[int, ...] = (0, 4, 8, 12, 51, 55, 59, 63)
    controlnet_bottleneck_mode: str = "effnet"
    train_resolution: int = 768
    generate_resolution: int = 1024


_STAGE_B_LITE = dict(
    c_hidden=[320, 576, 1152, 1152],
    nhead=[-1, 9, 18, 18],
    blocks=[[2, 4, 14, 4], [4, 14, 4, 2]],
    block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]],
)

PRESETS: dict[str, CascadePreset] = {
    "big": CascadePreset(
        name="big",
        stage_c={},  # StageC defaults are the 3.6B model
        stage_b={},  # StageB defaults are the "3B" (1.5B parameter) model
        # The published big ControlNets inject at ResBlocks [0,4,8,12] and [51,55,59,63] of 64.
        controlnet_c_proj=2048,
        controlnet_proj_blocks=(0, 4, 8, 12, 51, 55, 59, 63),
    ),
    "lite": CascadePreset(
        name="lite",
        stage_c=dict(c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]]),
        stage_b=_STAGE_B_LITE,
        # No published lite ControlNet exists; mirror big's pattern (four early, four late) over 32 ResBlocks.
        controlnet_c_proj=1536,
        controlnet_proj_blocks=(0, 2, 4, 6, 25, 27, 29, 31),
    ),
    "tiny": CascadePreset(
        name="tiny",
        stage_c=dict(
            c_cond=64, c_hidden=[64, 64], nhead=[2, 2], blocks=[[2, 4], [4, 2]],
            c_clip_text=64, c_clip_text_pooled=64, c_clip_img=32,
        ),
        # Like the parity config, but pooled text must match the tiny text encoder (64).
        stage_b=dict(
            c_cond=32, c_hidden=[16, 32, 32, 32], nhead=[-1, -1, 2, 2],
            blocks=[[1, 1, 2, 1], [1, 2, 1, 1]], block_repeat=[[1, 1, 1, 1], [2, 2, 1, 1]], c_clip=64,
        ),
        stage_a=dict(levels=2, bottleneck_blocks=2, c_hidden=32, c_latent=4, codebook_size=16),
        previewer=dict(c_hidden=32),
        # Tiny Stage C has 12 ResBlocks (2+4 down, 4+2 up): two early, two late.
        controlnet_c_proj=64,
        controlnet_proj_blocks=(0, 2, 9, 11),
        train_resolution=256,
        # 320 px -> ceil(320 / 42.67) = 8x8 Stage C latents, the grid the tiny compressor trains at (256 / 32)
        generate_resolution=320,
    ),
}


def get_preset(name: str) -> CascadePreset:
    """A private copy of preset ``name`` (its kwargs dicts can be edited without touching ``PRESETS``)."""
    if name not in PRESETS:
        raise KeyError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return copy.deepcopy(PRESETS[name])


def build_stage_c(**kwargs: Any) -> nn.Module:
    """Stage C from official constructor keywords (no kwargs = big)."""
    return StageC(**kwargs)


def build_stage_b(**kwargs: Any) -> nn.Module:
    """Stage B from official constructor keywords (no kwargs = big)."""
    return StageB(**kwargs)


def build_stage_a(**kwargs: Any) -> nn.Module:
    """Stage A from official constructor keywords (no kwargs = the published VQGAN)."""
    return StageA(**kwargs)


def build_previewer(**kwargs: Any) -> nn.Module:
    """Previewer from official constructor keywords (no kwargs = the published previewer)."""
    return Previewer(**kwargs)


def build_controlnet(
    c_in: int, c_proj: int, proj_blocks: Sequence[int], bottleneck_mode: str = "effnet"
) -> nn.Module:
    """ControlNet with the official layout (effnet: canny c_in 1, inpainting c_in 4; large: super-resolution)."""
    return ControlNet(c_in=c_in, c_proj=c_proj, proj_blocks=proj_blocks, bottleneck_mode=bottleneck_mode)
