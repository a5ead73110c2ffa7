"""Stage B, the latent decoder diffusion model (STABLE_CASCADE.md section 4). Frozen in this project: only
used to turn Stage C latents into Stage A latents. Shares the level stack with Stage C."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import LayerNorm2d, TimestepBlock
from .stage_c import LevelStack


def _mapper(c_in: int, c_out: int) -> nn.Sequential:
    """effnet/pixels mapper: Conv1x1(c_in, 4*c_out) -> GELU -> Conv1x1(4*c_out, c_out) -> LN2d."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out * 4, kernel_size=1),
        nn.GELU(),
        nn.Conv2d(c_out * 4, c_out, kernel_size=1),
        LayerNorm2d(c_out),
    )


class StageB(LevelStack):
    """The Stable Cascade decoder. Constructor keywords and defaults are the official ones (the "3B" model)."""

    def __init__(
        self,
        c_in: int = 4,
        c_out: int = 4,
        c_r: int = 64,
        patch_size: int = 2,
        c_cond: int = 1280,
        c_hidden: Sequence[int] = (320, 640, 1280, 1280),
        nhead: Sequence[int] = (-1, -1, 20, 20),
        blocks: Sequence[Sequence[int]] = ((2, 6, 28, 6), (6, 28, 6, 2)),
        block_repeat: Sequence[Sequence[int]] | None = ((1, 1, 1, 1), (3, 3, 2, 2)),
        level_config: Sequence[str] = ("CT", "CT", "CTA", "CTA"),
        c_clip: int = 1280,
        c_clip_seq: int = 4,
        c_effnet: int = 16,
        c_pixels: int = 3,
        kernel_size: int = 3,
        dropout: float | Sequence[float] = (0.0, 0.0, 0.1, 0.1),
        self_attn: bool | Sequence[bool] = True,
        t_conds: Sequence[str] = ("sca",),
    ) -> None:
        super().__init__()
        self.c_clip_seq = c_clip_seq
        self.effnet_mapper = _mapper(c_effnet, c_hidden[0])
        self.pixels_mapper = _mapper(c_pixels, c_hidden[0])
        self.clip_mapper = nn.Linear(c_clip, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2d(c_in * patch_size**2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0]),
        )
        # switch_level=None: Stage B changes resolution between levels with k2 s2 (transposed) convs.
        self._build_levels(
            c_hidden=c_hidden, nhead=nhead, blocks=blocks, block_repeat=block_repeat, level_config=level_config,
            c_cond=c_cond, c_r=c_r, kernel_size=kernel_size, dropout=dropout, self_attn=self_attn,
            t_conds=t_conds, switch_level=None,
        )
        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0]),
            nn.Conv2d(c_hidden[0], c_out * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )
        if not self._is_meta():
            self._init_weights()

    def _init_weights(self) -> None:
        """Official fresh-model init; unlike Stage C only each TimestepBlock's main ``mapper`` is zeroed."""
        self._init_level_weights()
        with torch.no_grad():
            nn.init.normal_(self.clip_mapper.weight, std=0.02)
            for mapper in (self.effnet_mapper, self.pixels_mapper):
                nn.init.normal_(mapper[0].weight, std=0.02)
                nn.init.normal_(mapper[2].weight, std=0.02)
            nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)
            nn.init.zeros_(self.clf[1].weight)
            for level in list(self.down_blocks) + list(self.up_blocks):
                for block in level:
                    if isinstance(block, TimestepBlock):
                        nn.init.zeros_(block.mapper.weight)

    def gen_c_embeddings(self, clip: torch.Tensor) -> torch.Tensor:
        """Pooled CLIP text [B,1,C] (or [B,C]) -> ``c_clip_seq`` tokens per input, then LayerNorm."""
        if clip.dim() == 2:
            clip = clip.unsqueeze(1)
        tokens = self.clip_mapper(clip).view(clip.shape[0], clip.shape[1] * self.c_clip_seq, -1)
        return self.clip_norm(tokens)

    def forward(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        effnet: torch.Tensor,
        clip: torch.Tensor,
        pixels: torch.Tensor | None = None,
        sca: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict noise for Stage A latents ``x`` [B,4,H,W] given Stage C latents ``effnet`` [B,16,h,w], pooled
        text ``clip`` [B,1,C] and optional low-res ``pixels`` [B,3,h',w'] (zeros 8x8 when absent)."""
        dtype = self.embedding[1].weight.dtype
        x = x.to(dtype)
        if pixels is None:
            pixels = x.new_zeros(x.shape[0], 3, 8, 8)
        r_embed = self._timestep_embedding(r, {"sca": sca}).to(dtype)
        clip_tokens = self.gen_c_embeddings(clip.to(dtype))
        h = self.embedding(x)
        # As official: effnet is resized before its mapper, pixels after theirs.
        h = h + self.effnet_mapper(
            F.interpolate(effnet.to(dtype), size=h.shape[-2:], mode="bilinear", align_corners=True)
        )
        h = h + F.interpolate(
            self.pixels_mapper(pixels.to(dtype)), size=h.shape[-2:], mode="bilinear", align_corners=True
        )
        level_outputs = self._down_encode(h, r_embed, clip_tokens, self._cnet_feeder(None))
        h = self._up_decode(level_outputs, r_embed, clip_tokens, self._cnet_feeder(None))
        return self.clf(h)
