"""Stage A, the VQGAN between pixels and 4-channel latents at 1/4 resolution (STABLE_CASCADE.md sections 1, 4).

Frozen here. ``encode`` gives the unquantized latent divided by ``scale_factor``; ``decode`` multiplies by it
and skips quantization, as the published pipeline does.
"""

from __future__ import annotations

import torch
from torch import nn


class StageAResBlock(nn.Module):
    """Stage A's own residual block: LN -> replicate-pad depthwise 3x3, and LN -> MLP, each modulated by
    learned scalars ``gammas`` (scale, shift, gate for each of the two branches)."""

    def __init__(self, c: int, c_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    @staticmethod
    def _norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = self._norm(x, self.norm1) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self._norm(x, self.norm2) * (1 + g[3]) + g[4]
        return x + self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer; only its ``codebook`` weight matters for published files."""

    def __init__(self, embedding_size: int, k: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(k, embedding_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize BCHW latents; returns (quantized latents, indices [B,H,W])."""
        b, c, h, w = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(-1, c)
        indices = torch.cdist(flat, self.codebook.weight.to(flat.dtype)).argmin(dim=1)
        quantized = self.codebook(indices).to(x.dtype).view(b, h, w, c).permute(0, 3, 1, 2)
        return quantized, indices.view(b, h, w)


class StageA(nn.Module):
    """VQGAN with the official constructor keywords (defaults = the published 18.4M model)."""

    def __init__(
        self,
        levels: int = 2,
        bottleneck_blocks: int = 12,
        c_hidden: int = 384,
        c_latent: int = 4,
        codebook_size: int = 8192,
        scale_factor: float = 0.43,
    ) -> None:
        super().__init__()
        self.c_latent = c_latent
        self.scale_factor = scale_factor
        c_levels = [c_hidden // (2**i) for i in reversed(range(levels))]

        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down: list[nn.Module] = []
        for i in range(levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(StageAResBlock(c_levels[i], c_levels[i] * 4))
        # The BatchNorm standardises the latents (mean 0, std 1 over the training set).
        down.append(
            nn.Sequential(nn.Conv2d(c_levels[-1], c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(c_latent))
        )
        self.down_blocks = nn.Sequential(*down)

        self.vquantizer = VectorQuantizer(c_latent, k=codebook_size)

        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(c_latent, c_levels[-1], kernel_size=1))]
        for i in range(levels):
            c = c_levels[levels - 1 - i]
            for _ in range(bottleneck_blocks if i == 0 else 1):
                up.append(StageAResBlock(c, c * 4))
            if i < levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

        if not any(p.is_meta for p in self.parameters()):
            self._init_weights()

    def _init_weights(self) -> None:
        """Official init: xavier/zero on the ResBlocks' conv and linear layers, codebook U(-1/k, 1/k)."""
        for block in self.modules():
            if isinstance(block, StageAResBlock):
                for m in block.modules():
                    if isinstance(m, (nn.Conv2d, nn.Linear)):
                        nn.init.xavier_uniform_(m.weight)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
        k = self.vquantizer.codebook.num_embeddings
        nn.init.uniform_(self.vquantizer.codebook.weight, -1.0 / k, 1.0 / k)

    def encode(self, image: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """RGB ``image`` [B,3,H,W] in [0,1] -> latent [B,c_latent,H/4,W/4] divided by ``scale_factor``.

        ``quantize=True`` snaps the latent to the nearest codebook entries first (not used by the pipeline)."""
        x = self.down_blocks(self.in_block(image))
        if quantize:
            x, _ = self.vquantizer(x)
        return x / self.scale_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent [B,c_latent,h,w] (as produced by Stage B or :meth:`encode`) -> RGB [B,3,4h,4w], no quantization."""
        x = self.up_blocks(latent * self.scale_factor)
        return self.out_block(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(image))``."""
        return self.decode(self.encode(image))
