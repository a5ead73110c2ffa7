"""The Previewer: a small conv net that shows Stage C latents as a rough RGB image (x8 upsampling) without
running Stage B and A (STABLE_CASCADE.md section 1). Layer order follows the official ``blocks.<i>`` keys:
four stages of (conv, GELU, BatchNorm); conv3x3 refinements between three x2 transposed convs; a 1x1 head."""

from __future__ import annotations

import torch
from torch import nn


def _conv_gelu_bn(conv: nn.Module, c_out: int) -> list[nn.Module]:
    return [conv, nn.GELU(), nn.BatchNorm2d(c_out)]


class Previewer(nn.Module):
    """Stage C latents [B,c_in,h,w] -> RGB [B,c_out,8h,8w]. Official keywords and defaults."""

    def __init__(self, c_in: int = 16, c_hidden: int = 512, c_out: int = 3) -> None:
        super().__init__()
        c2, c4 = c_hidden // 2, c_hidden // 4
        layers: list[nn.Module] = []
        layers += _conv_gelu_bn(nn.Conv2d(c_in, c_hidden, kernel_size=1), c_hidden)
        layers += _conv_gelu_bn(nn.Conv2d(c_hidden, c_hidden, kernel_size=3, padding=1), c_hidden)
        layers += _conv_gelu_bn(nn.ConvTranspose2d(c_hidden, c2, kernel_size=2, stride=2), c2)
        layers += _conv_gelu_bn(nn.Conv2d(c2, c2, kernel_size=3, padding=1), c2)
        layers += _conv_gelu_bn(nn.ConvTranspose2d(c2, c4, kernel_size=2, stride=2), c4)
        layers += _conv_gelu_bn(nn.Conv2d(c4, c4, kernel_size=3, padding=1), c4)
        layers += _conv_gelu_bn(nn.ConvTranspose2d(c4, c4, kernel_size=2, stride=2), c4)
        layers += _conv_gelu_bn(nn.Conv2d(c4, c4, kernel_size=3, padding=1), c4)
        layers.append(nn.Conv2d(c4, c_out, kernel_size=1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preview image (roughly in [0, 1]; clamp before display)."""
        return self.blocks(x.to(self.blocks[0].weight.dtype))
