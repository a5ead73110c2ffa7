"""The Stable Cascade ControlNet (STABLE_CASCADE.md section 6), with the official key layout so the published
canny / inpainting / super-resolution files load.

A backbone turns the control image into features; one projection per injection point maps them to Stage C's
width. ``forward`` returns the list Stage C takes as ``cnet`` (indexed by ResBlock call order, None where
nothing is injected). Strength scaling lives in the adapter layer, not here.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import LayerNorm2d

BOTTLENECK_MODES = ("effnet", "simple", "large", "effnet_tiny")
EFFNET_CHANNELS = 1280


class CNetResBlock(nn.Module):
    """Residual block of the "large" bottleneck: (LN2d with affine -> GELU -> conv3x3) twice."""

    def __init__(self, c: int) -> None:
        super().__init__()
        # The official LayerNorm2d here keeps torch's defaults (affine, eps 1e-5): the keys include .weight/.bias.
        self.blocks = nn.Sequential(
            LayerNorm2d(c, elementwise_affine=True, eps=1e-5),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
            LayerNorm2d(c, elementwise_affine=True, eps=1e-5),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blocks(x)


def _effnet_backbone(c_in: int) -> nn.Module:
    """torchvision EfficientNetV2-S features (1280 ch, stride 32), never with downloaded weights.

    For c_in != 3 the official code swaps the first conv for ``Conv2d(c_in, 24, 3, stride=2, bias=False)``
    *without* padding; the published canny/inpainting weights were trained that way, so we keep it. Extra input
    channels start at zero and the first three reuse the RGB filters, as the official code does.
    """
    try:
        from torchvision.models import efficientnet_v2_s
    except ImportError as exc:  # torchvision is a core dependency, but say what to do if it is missing
        raise ImportError("The effnet ControlNet backbone needs torchvision: pip install torchvision") from exc
    features = efficientnet_v2_s(weights=None).features
    if c_in != 3:
        rgb_weight = features[0][0].weight.detach()
        first = nn.Conv2d(c_in, 24, kernel_size=3, stride=2, bias=False)
        if not first.weight.is_meta:
            with torch.no_grad():
                if c_in > 3:
                    first.weight.zero_()
                    first.weight[:, :3] = rgb_weight[:, :3]
                else:
                    first.weight.copy_(rgb_weight[:, :c_in])
        features[0][0] = first
    return features.eval()


def _effnet_tiny_backbone(c_in: int) -> tuple[nn.Module, int]:
    """The tiny preset's compressor architecture as a ControlNet backbone (stride 32, few channels).

    Not a published layout: the 64-wide tiny Stage C would be dwarfed by EfficientNetV2-S, and the official
    "simple" bottleneck keeps only c_in channels (one for canny), too little to carry a control. Same structure
    as the official effnet mode: torchvision EfficientNet features with the first conv taking c_in channels.
    """
    from .effnet import backbone_out_channels, build_effnet_backbone

    features = build_effnet_backbone("tiny")
    first = features[0][0]
    features[0][0] = nn.Conv2d(c_in, first.out_channels, kernel_size=3, stride=2, padding=1, bias=False)
    return features, backbone_out_channels(features)


class ControlNet(nn.Module):
    """Control image [B,c_in,H,W] -> list of [B,c_proj,h,w] features (or None) of length max(proj_blocks)+1."""

    def __init__(
        self,
        c_in: int = 3,
        c_proj: int = 2048,
        proj_blocks: Sequence[int] = (0, 4, 8, 12, 51, 55, 59, 63),
        bottleneck_mode: str = "effnet",
    ) -> None:
        super().__init__()
        if bottleneck_mode not in BOTTLENECK_MODES:
            raise ValueError(f"Unknown bottleneck_mode {bottleneck_mode!r}; use one of {', '.join(BOTTLENECK_MODES)}.")
        if not proj_blocks:
            raise ValueError("proj_blocks is empty; give the ResBlock indices to inject into, e.g. [0, 4, 8, 12].")
        self.proj_blocks = list(proj_blocks)
        self.bottleneck_mode = bottleneck_mode
        if bottleneck_mode == "effnet":
            embd_channels = EFFNET_CHANNELS
            self.backbone = _effnet_backbone(c_in)
        elif bottleneck_mode == "effnet_tiny":
            self.backbone, embd_channels = _effnet_tiny_backbone(c_in)
        elif bottleneck_mode == "simple":
            embd_channels = c_in
            self.backbone = nn.Sequential(
                nn.Conv2d(c_in, c_in * 4, kernel_size=3, padding=1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(c_in * 4, c_in, kernel_size=3, padding=1),
            )
        else:  # "large": the super-resolution ControlNet (input: effnet latents, 16 channels)
            embd_channels = EFFNET_CHANNELS
            self.backbone = nn.Sequential(
                nn.Conv2d(c_in, 4096 * 4, kernel_size=1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(4096 * 4, 1024, kernel_size=1),
                *[CNetResBlock(1024) for _ in range(8)],
                nn.Conv2d(1024, EFFNET_CHANNELS, kernel_size=1),
            )
        self.projections = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(embd_channels, embd_channels, kernel_size=1, bias=False),
                nn.LeakyReLU(0.2),
                nn.Conv2d(embd_channels, c_proj, kernel_size=1, bias=False),
            )
            for _ in self.proj_blocks
        )
        # Zero output projections: a fresh ControlNet injects exactly nothing.
        for projection in self.projections:
            nn.init.zeros_(projection[-1].weight)

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor | None]:
        """Run the backbone once and every projection; entry i feeds Stage C's i-th ResBlock call."""
        features = self.backbone(hint.to(self.projections[0][0].weight.dtype))
        outputs: list[torch.Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for projection, index in zip(self.projections, self.proj_blocks):
            outputs[index] = projection(features)
        return outputs
