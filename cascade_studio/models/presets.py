"""Model presets (big / lite / tiny / toy) and the builders that take official constructor keywords.

``big`` and ``lite`` are the published configurations (STABLE_CASCADE.md sections 2, 4, 6); their weights are the
published files. ``tiny`` is a CPU-sized model for tests and tiny recipes with a seeded random init; its dimensions
are fixed in DESIGN.md because the encoders, data cache and adapters must agree on them. ``toy`` is the tiny
architecture with the small weights shipped in ``assets/toy`` (trained on toy-shapes). ``weights`` says which, and
is the one place that decides it (``inference.pipeline.CascadeComponents`` builds every caller's models from it).

The table imports no torch (recipes, the CLI and the studio read the preset names); the builders do, on use.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

WEIGHTS = ("published", "random", "shipped")


@dataclass(frozen=True)
class CascadePreset:
    """Constructor kwargs of every stage plus ControlNet and resolution defaults for one model size."""

    name: str
    weights: str  # published (files the user brings), random (seeded init, built in) or shipped (assets/<name>)
    stage_c: dict[str, Any]
    stage_b: dict[str, Any]
    stage_a: dict[str, Any] = field(default_factory=dict)
    previewer: dict[str, Any] = field(default_factory=dict)
    controlnet_c_proj: int = 2048
    controlnet_proj_blocks: tuple[int, ...] = (0, 4, 8, 12, 51, 55, 59, 63)
    controlnet_bottleneck_mode: str = "effnet"
    train_resolution: int = 768
    generate_resolution: int = 1024
    architecture: str = ""  # the preset whose encoders and compressor this one builds ("" = its own name)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"preset {self.name}: weights must be one of {WEIGHTS}, got {self.weights!r}")
        if not self.architecture:
            object.__setattr__(self, "architecture", self.name)

    @property
    def built_in(self) -> bool:
        """Runs without any weight file (random or shipped weights): the CPU presets."""
        return self.weights != "published"


_STAGE_B_LITE = dict(
    c_hidden=[320, 576, 1152, 1152],
    nhead=[-1, 9, 18, 18],
    blocks=[[2, 4, 14, 4], [4, 14, 4, 2]],
    block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]],
)

PRESETS: dict[str, CascadePreset] = {
    "big": CascadePreset(
        name="big",
        weights="published",
        stage_c={},  # StageC defaults are the 3.6B model
        stage_b={},  # StageB defaults are the "3B" (1.5B parameter) model
        # The published big ControlNets inject at ResBlocks [0,4,8,12] and [51,55,59,63] of 64.
        controlnet_c_proj=2048,
        controlnet_proj_blocks=(0, 4, 8, 12, 51, 55, 59, 63),
    ),
    "lite": CascadePreset(
        name="lite",
        weights="published",
        stage_c=dict(c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]]),
        stage_b=_STAGE_B_LITE,
        # No published lite ControlNet exists; mirror big's pattern (four early, four late) over 32 ResBlocks.
        controlnet_c_proj=1536,
        controlnet_proj_blocks=(0, 2, 4, 6, 25, 27, 29, 31),
    ),
    "tiny": CascadePreset(
        name="tiny",
        weights="random",
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


# The toy cascade: the tiny architecture (its dimensions are tiny's by construction) with shipped weights.
PRESETS["toy"] = dataclasses.replace(PRESETS["tiny"], name="toy", weights="shipped", architecture="tiny")


def get_preset(name: str) -> CascadePreset:
    """A private copy of preset ``name`` (its kwargs dicts can be edited without touching ``PRESETS``)."""
    if name not in PRESETS:
        raise KeyError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return copy.deepcopy(PRESETS[name])


def build_stage_c(**kwargs: Any) -> Any:
    """Stage C from official constructor keywords (no kwargs = big)."""
    from .stage_c import StageC

    return StageC(**kwargs)


def build_stage_b(**kwargs: Any) -> Any:
    """Stage B from official constructor keywords (no kwargs = big)."""
    from .stage_b import StageB

    return StageB(**kwargs)


def build_stage_a(**kwargs: Any) -> Any:
    """Stage A from official constructor keywords (no kwargs = the published VQGAN)."""
    from .stage_a import StageA

    return StageA(**kwargs)


def build_previewer(**kwargs: Any) -> Any:
    """Previewer from official constructor keywords (no kwargs = the published previewer)."""
    from .previewer import Previewer

    return Previewer(**kwargs)


def build_controlnet(
    c_in: int, c_proj: int, proj_blocks: Sequence[int], bottleneck_mode: str = "effnet"
) -> Any:
    """ControlNet with the official layout (effnet: canny c_in 1, inpainting c_in 4; large: super-resolution)."""
    from .controlnet import ControlNet

    return ControlNet(c_in=c_in, c_proj=c_proj, proj_blocks=proj_blocks, bottleneck_mode=bottleneck_mode)
