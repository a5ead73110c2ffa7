"""Stage C, the text-conditional prior (STABLE_CASCADE.md section 2), and the level stack it shares with Stage B.

The level stack is the official "down levels then up levels" layout: ``down_blocks[L]`` holds the blocks of
level L (C, T, A repeated), ``up_blocks[0]`` is the deepest level, and the first ResBlock of every shallower up
level takes the matching down-path output as ``skip``. Module names and registration order follow the official
code so ``official.py`` can map published weights by name.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, UpDownBlock2d
from .checkpointing import block_kind, checkpoint_contexts, checkpoints, compiled_selective_call
from .reuse import reuse


class LevelStack(nn.Module):
    """Shared machinery of Stage C and Stage B: block construction, the down/up passes, ControlNet injection,
    gradient checkpointing and the parts of the official initialisation both stages share."""

    checkpointing: str  # "none", "blocks" or "selective" (see checkpointing.py)
    # Checkpointed attention blocks replay the attention hooks of their forward call (see _replay_hooks).
    replays_attention_hooks = True

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether any checkpointing is on; setting True means whole blocks (``checkpointing = "blocks"``)."""
        return self.checkpointing != "none"

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.checkpointing = "blocks" if value else "none"

    def _build_levels(
        self,
        *,
        c_hidden: Sequence[int],
        nhead: Sequence[int],
        blocks: Sequence[Sequence[int]],
        block_repeat: Sequence[Sequence[int]] | None,
        level_config: Sequence[str],
        c_cond: int,
        c_r: int,
        kernel_size: int,
        dropout: float | Sequence[float],
        self_attn: bool | Sequence[bool],
        t_conds: Sequence[str],
        switch_level: Sequence[bool] | None,
    ) -> None:
        n_levels = len(c_hidden)
        dropout = list(dropout) if isinstance(dropout, (list, tuple)) else [dropout] * n_levels
        self_attn = list(self_attn) if isinstance(self_attn, (list, tuple)) else [self_attn] * n_levels
        self.c_r = c_r
        self.t_conds = list(t_conds)
        self.blocks_config = [list(b) for b in blocks]
        self.checkpointing = "none"

        def make_block(kind: str, level: int, c_skip: int = 0) -> nn.Module:
            c = c_hidden[level]
            if kind == "C":
                return ResBlock(c, c_skip, kernel_size=kernel_size, dropout=dropout[level])
            if kind == "A":
                return AttnBlock(c, c_cond, nhead[level], self_attn=self_attn[level], dropout=dropout[level])
            if kind == "T":
                return TimestepBlock(c, c_r, conds=self.t_conds)
            raise ValueError(f"Unknown block type {kind!r} in level_config; use only 'C', 'T' and 'A'.")

        self.down_blocks = nn.ModuleList()
        self.down_downscalers = nn.ModuleList()
        self.down_repeat_mappers = nn.ModuleList()
        for i in range(n_levels):
            if i > 0:
                conv: nn.Module = (
                    UpDownBlock2d(c_hidden[i - 1], c_hidden[i], mode="down", enabled=switch_level[i - 1])
                    if switch_level is not None
                    else nn.Conv2d(c_hidden[i - 1], c_hidden[i], kernel_size=2, stride=2)
                )
                self.down_downscalers.append(nn.Sequential(LayerNorm2d(c_hidden[i - 1]), conv))
            else:
                self.down_downscalers.append(nn.Identity())
            self.down_blocks.append(
                nn.ModuleList(make_block(kind, i) for _ in range(blocks[0][i]) for kind in level_config[i])
            )
            if block_repeat is not None:
                self.down_repeat_mappers.append(
                    nn.ModuleList(nn.Conv2d(c_hidden[i], c_hidden[i], 1) for _ in range(block_repeat[0][i] - 1))
                )

        self.up_blocks = nn.ModuleList()
        self.up_upscalers = nn.ModuleList()
        self.up_repeat_mappers = nn.ModuleList()
        for i in reversed(range(n_levels)):
            if i > 0:
                conv = (
                    UpDownBlock2d(c_hidden[i], c_hidden[i - 1], mode="up", enabled=switch_level[i - 1])
                    if switch_level is not None
                    else nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], kernel_size=2, stride=2)
                )
                self.up_upscalers.append(nn.Sequential(LayerNorm2d(c_hidden[i]), conv))
            else:
                self.up_upscalers.append(nn.Identity())
            level_blocks = nn.ModuleList()
            for j in range(blocks[1][::-1][i]):
                for k, kind in enumerate(level_config[i]):
                    # Only the first block of a non-deepest up level concatenates the down-path skip.
                    c_skip = c_hidden[i] if i < n_levels - 1 and j == k == 0 else 0
                    level_blocks.append(make_block(kind, i, c_skip))
            self.up_blocks.append(level_blocks)
            if block_repeat is not None:
                self.up_repeat_mappers.append(
                    nn.ModuleList(
                        nn.Conv2d(c_hidden[i], c_hidden[i], 1) for _ in range(block_repeat[1][::-1][i] - 1)
                    )
                )
        if block_repeat is None:
            # Keep zip() in the passes working: no repeat mappers means every level runs once.
            self.down_repeat_mappers.extend(nn.ModuleList() for _ in range(n_levels))
            self.up_repeat_mappers.extend(nn.ModuleList() for _ in range(n_levels))

    # ----------------------------------------------------------------------------------------- initialisation
    def _is_meta(self) -> bool:
        return any(p.is_meta for p in self.parameters())

    def _init_level_weights(self) -> None:
        """Official general init: xavier weights / zero biases on Conv2d and Linear, attention q/k/v drawn as
        torch's fused in_proj (xavier over [3c, c]), ResBlock outputs scaled by sqrt(1/sum(blocks[0]))."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, AttnBlock):
                attn = m.attention.attn
                c = attn.to_q.in_features
                bound = math.sqrt(6.0 / (c + 3 * c))
                for lin in (attn.to_q, attn.to_k, attn.to_v):
                    nn.init.uniform_(lin.weight, -bound, bound)
        scale = math.sqrt(1.0 / sum(self.blocks_config[0]))
        with torch.no_grad():
            for level in list(self.down_blocks) + list(self.up_blocks):
                for block in level:
                    if isinstance(block, ResBlock):
                        block.channelwise[-1].weight.mul_(scale)

    # ------------------------------------------------------------------------------------------- forward parts
    def gen_r_embedding(self, r: torch.Tensor, max_positions: int = 10000) -> torch.Tensor:
        """Sinusoidal embedding of a noise level r in [0, 1]:
        ``[sin, cos]`` of ``r*10000 * exp(-k ln(10000)/(c_r/2-1))`` for k < c_r/2."""
        r = r.float() * max_positions
        half = self.c_r // 2
        step = -math.log(max_positions) / (half - 1)
        freqs = torch.arange(half, device=r.device, dtype=torch.float32).mul(step).exp()
        emb = r[:, None] * freqs[None, :]
        emb = torch.cat([emb.sin(), emb.cos()], dim=1)
        if self.c_r % 2 == 1:
            emb = F.pad(emb, (0, 1))
        return emb

    def _timestep_embedding(self, r: torch.Tensor, conds: dict[str, torch.Tensor | None]) -> torch.Tensor:
        parts = [self.gen_r_embedding(r)]
        for name in self.t_conds:
            value = conds.get(name)
            parts.append(self.gen_r_embedding(torch.zeros_like(r) if value is None else value))
        return torch.cat(parts, dim=1)

    def resblock_count(self) -> int:
        """How many ResBlock calls one forward makes (down path then up path, repeats included): the length of
        the ``cnet`` list that covers every injection point."""
        count = 0
        for levels, repmaps in ((self.down_blocks, self.down_repeat_mappers), (self.up_blocks, self.up_repeat_mappers)):
            for level, repmap in zip(levels, repmaps):
                count += sum(isinstance(b, ResBlock) for b in level) * (len(repmap) + 1)
        return count

    def compile_blocks(self, **options: Any) -> int:
        """Compile every down/up block on its own (regional ``torch.compile``); returns how many.

        Blocks of one kind share their code, so the compiler builds one graph per kind and shape instead of one
        for the whole network: seconds to compile instead of minutes, and what runs between blocks (ControlNet
        injection, checkpointing, adapters' hooks) stays eager Python. LoRA layers inside a block are traced
        with it; attention hooks run outside the compiled graph (``blocks._apply_attention_hooks``).
        """
        count = 0
        self._compile_options = options  # selective checkpointing compiles its region with the same options
        for level in list(self.down_blocks) + list(self.up_blocks):
            for block in level:
                block.compile(**options)
                count += 1
        return count

    def _call(self, block: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        kind = block_kind(block)
        if not (torch.is_grad_enabled() and checkpoints(self.checkpointing, kind)):
            return block(*args)
        # Non-reentrant checkpointing restores the RNG state, so dropout masks match the first pass.
        replay = None
        if isinstance(block, AttnBlock) and block.attention.attn.attention_hooks:
            # Attention hooks (IP-Adapter) live only during one forward call; the recomputation in backward
            # runs after the call returned, so it must see the hooks the forward saw.
            replay = functools.partial(_replay_hooks, block, list(block.attention.attn.attention_hooks))
        compiled = getattr(block, "_compiled_call_impl", None) is not None
        if self.checkpointing == "selective" and compiled:
            if replay is None:
                return compiled_selective_call(kind, tuple(sorted(getattr(self, "_compile_options", {}).items())))(block, *args)
            # The hooks run outside compiled graphs (blocks._apply_attention_hooks), which a compiled checkpoint
            # region cannot contain: this block call runs its eager forward under eager selective checkpointing.
            block = block.forward
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=checkpoint_contexts(self.checkpointing, kind, replay))

    def _run_block(
        self,
        block: nn.Module,
        x: torch.Tensor,
        r_embed: torch.Tensor,
        clip: torch.Tensor,
        next_cnet: Callable[[], torch.Tensor | None],
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(block, ResBlock):
            control = next_cnet()
            if control is not None:
                x = x + F.interpolate(
                    control.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=True
                )
            return self._call(block, x, skip)
        if isinstance(block, AttnBlock):
            return self._call(block, x, clip)
        if isinstance(block, TimestepBlock):
            return self._call(block, x, r_embed)
        return self._call(block, x)

    def _down_encode(
        self, x: torch.Tensor, r_embed: torch.Tensor, clip: torch.Tensor, next_cnet: Callable[[], torch.Tensor | None]
    ) -> list[torch.Tensor]:
        level_outputs: list[torch.Tensor] = []
        for level, downscaler, repmap in zip(self.down_blocks, self.down_downscalers, self.down_repeat_mappers):
            x = downscaler(x)
            for rep in range(len(repmap) + 1):
                for block in level:
                    x = self._run_block(block, x, r_embed, clip, next_cnet)
                if rep < len(repmap):
                    x = repmap[rep](x)
            level_outputs.insert(0, x)
        return level_outputs

    def _up_decode(
        self,
        level_outputs: list[torch.Tensor],
        r_embed: torch.Tensor,
        clip: torch.Tensor,
        next_cnet: Callable[[], torch.Tensor | None],
    ) -> torch.Tensor:
        x = level_outputs[0]
        for i, (level, upscaler, repmap) in enumerate(zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)):
            for rep in range(len(repmap) + 1):
                for k, block in enumerate(level):
                    skip = level_outputs[i] if k == 0 and i > 0 and isinstance(block, ResBlock) else None
                    if skip is not None and x.shape[-2:] != skip.shape[-2:]:
                        # Odd latent sizes: the transposed conv overshoots; snap back to the skip grid as official.
                        x = F.interpolate(x.float(), skip.shape[-2:], mode="bilinear", align_corners=True)
                        x = x.to(skip.dtype)
                    x = self._run_block(block, x, r_embed, clip, next_cnet, skip)
                if rep < len(repmap):
                    x = repmap[rep](x)
            x = upscaler(x)
        return x

    @staticmethod
    def _cnet_feeder(cnet: Sequence[torch.Tensor | None] | None) -> Callable[[], torch.Tensor | None]:
        """One entry per ResBlock call, in call order; a short list means no control for the rest."""
        items: Iterator[torch.Tensor | None] = iter(cnet if cnet is not None else ())
        return lambda: next(items, None)


class StageC(LevelStack):
    """The Stable Cascade prior. Constructor keywords and defaults are the official ones (the 3.6B model)."""

    def __init__(
        self,
        c_in: int = 16,
        c_out: int = 16,
        c_r: int = 64,
        patch_size: int = 1,
        c_cond: int = 2048,
        c_hidden: Sequence[int] = (2048, 2048),
        nhead: Sequence[int] = (32, 32),
        blocks: Sequence[Sequence[int]] = ((8, 24), (24, 8)),
        block_repeat: Sequence[Sequence[int]] | None = ((1, 1), (1, 1)),
        level_config: Sequence[str] = ("CTA", "CTA"),
        c_clip_text: int = 1280,
        c_clip_text_pooled: int = 1280,
        c_clip_img: int = 768,
        c_clip_seq: int = 4,
        kernel_size: int = 3,
        dropout: float | Sequence[float] = (0.1, 0.1),
        self_attn: bool | Sequence[bool] = True,
        t_conds: Sequence[str] = ("sca", "crp"),
        switch_level: Sequence[bool] | None = (False,),
    ) -> None:
        super().__init__()
        self.c_clip_seq = c_clip_seq
        self.clip_txt_mapper = nn.Linear(c_clip_text, c_cond)
        self.clip_txt_pooled_mapper = nn.Linear(c_clip_text_pooled, c_cond * c_clip_seq)
        self.clip_img_mapper = nn.Linear(c_clip_img, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2d(c_in * patch_size**2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0]),
        )
        self._build_levels(
            c_hidden=c_hidden, nhead=nhead, blocks=blocks, block_repeat=block_repeat, level_config=level_config,
            c_cond=c_cond, c_r=c_r, kernel_size=kernel_size, dropout=dropout, self_attn=self_attn,
            t_conds=t_conds, switch_level=switch_level,
        )
        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0]),
            nn.Conv2d(c_hidden[0], c_out * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )
        if not self._is_meta():  # meta models get weights assigned later; init would be wasted work
            self._init_weights()

    def _init_weights(self) -> None:
        """The official fresh-model init. Its zeroed output conv and TimestepBlocks mean a fresh model outputs a
        constant and passes no gradient upstream (STABLE_CASCADE.md section 2)."""
        self._init_level_weights()
        with torch.no_grad():
            for mapper in (self.clip_txt_mapper, self.clip_txt_pooled_mapper, self.clip_img_mapper):
                nn.init.normal_(mapper.weight, std=0.02)
            nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)
            nn.init.zeros_(self.clf[1].weight)
            for level in list(self.down_blocks) + list(self.up_blocks):
                for block in level:
                    if isinstance(block, TimestepBlock):
                        for layer in block.modules():
                            if isinstance(layer, nn.Linear):
                                nn.init.zeros_(layer.weight)

    def gen_c_embeddings(
        self, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor, clip_img: torch.Tensor
    ) -> torch.Tensor:
        """Conditioning tokens: text tokens ++ 4 pooled-text tokens ++ 4 tokens per image, then LayerNorm."""
        if clip_text_pooled.dim() == 2:
            clip_text_pooled = clip_text_pooled.unsqueeze(1)
        if clip_img.dim() == 2:
            clip_img = clip_img.unsqueeze(1)
        b = clip_text.shape[0]
        txt = self.clip_txt_mapper(clip_text)
        pooled = self.clip_txt_pooled_mapper(clip_text_pooled).view(b, clip_text_pooled.shape[1] * self.c_clip_seq, -1)
        img = self.clip_img_mapper(clip_img).view(b, clip_img.shape[1] * self.c_clip_seq, -1)
        return self.clip_norm(torch.cat([txt, pooled, img], dim=1))

    def forward(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        clip_text: torch.Tensor,
        clip_text_pooled: torch.Tensor,
        clip_img: torch.Tensor,
        cnet: Sequence[torch.Tensor | None] | None = None,
        sca: torch.Tensor | None = None,
        crp: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict noise for latents ``x`` [B,16,h,w] at noise level ``r`` [B].

        ``clip_text`` [B,77,C], ``clip_text_pooled`` [B,1,C], ``clip_img`` [B,N,D] (N images, zeros = none);
        ``cnet`` is indexed by ResBlock call order (None = no control there); ``sca``/``crp`` default to zeros.
        """
        dtype = self.embedding[1].weight.dtype
        r_embed = self._timestep_embedding(r, {"sca": sca, "crp": crp}).to(dtype)
        clip = reuse(self, "clip", (clip_text, clip_text_pooled, clip_img), lambda: self.gen_c_embeddings(
            clip_text.to(dtype), clip_text_pooled.to(dtype), clip_img.to(dtype)))
        h = self.embedding(x.to(dtype))
        next_cnet = self._cnet_feeder(cnet)
        level_outputs = self._down_encode(h, r_embed, clip, next_cnet)
        h = self._up_decode(level_outputs, r_embed, clip, next_cnet)
        return self.clf(h)


@contextlib.contextmanager
def _replay_hooks(block: AttnBlock, hooks: list) -> Iterator[None]:
    """Install ``hooks`` on ``block`` while checkpointing recomputes it, then restore what was there."""
    attn = block.attention.attn
    saved = list(attn.attention_hooks)
    attn.attention_hooks[:] = hooks
    try:
        yield
    finally:
        attn.attention_hooks[:] = saved
