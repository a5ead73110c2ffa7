"""Building blocks shared by Stage C and Stage B (STABLE_CASCADE.md section 2).

Parameter names follow the official Stable Cascade layout so published weights load by name, with one
deliberate difference: attention keeps four separate ``nn.Linear`` layers (``to_q``, ``to_k``, ``to_v``,
``out_proj``; ComfyUI's in-memory names) instead of torch's fused ``in_proj_weight``. ``official.py`` fuses and
splits them at the file boundary. Separate layers let LoRA/PEFT target q, k, v individually and keep the
forward on ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .reuse import reuse

AttentionHook = Callable[[torch.Tensor], torch.Tensor]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a BCHW tensor (no affine, eps 1e-6 unless told otherwise)."""

    def __init__(self, num_channels: int, elementwise_affine: bool = False, eps: float = 1e-6) -> None:
        super().__init__(num_channels, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on BHWC tensors: ``gamma * (x * Nx) + beta + x``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same function in two passes over x instead of six: the L2 norm over H and W as a sum of squares (a
        # reduction over the middle dims of BHWC ran 5x slower through vector_norm on the CPU), and
        # gamma*(x*nx) + beta + x as x*(gamma*nx + 1) + beta, whose factor is per (sample, channel): 11% of a
        # mid-size Stage C forward. Equal to the official form to float rounding; the clamp keeps the gradient of an
        # all-zero channel at 0 (the norm's subgradient there), not inf * 0.
        _, nx = _grn_norms(x)
        return torch.addcmul(self.beta, x, self.gamma * nx + 1)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or the dtype itself when that is wider (float64 in gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _grn_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GRN's per (sample, channel) L2 norm over H and W (at least float32) and its ratio to the channel mean (x's dtype)."""
    gx32 = (x * x).sum(dim=(1, 2), keepdim=True, dtype=_wide(x.dtype)).clamp_min(1e-30).sqrt()
    gx = gx32.to(x.dtype)
    return gx32, gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)


class _GeluGrn(torch.autograd.Function):
    """``GRN(GELU(h))`` keeping only ``h`` and GRN's per-channel norms for the backward pass.

    As separate modules autograd keeps GELU's input and GRN's input, two tensors of the block's widest activation
    (4c channels), in every ResBlock: 22% of what a mid-size Stage C step keeps. Here GELU is recomputed from
    ``h`` in the backward pass (one elementwise pass), and GRN's backward is written out, its reductions in
    float32 (or wider):

    ``y = a * f + beta`` with ``a = gelu(h)``, ``f = gamma * nx + 1``, ``nx = gx / (mean_c gx + eps)``,
    ``gx = ||a||`` over H, W; so ``dL/df = sum_hw g * a``, ``dnx = dL/df * gamma``,
    ``dgx = dnx / m - sum_c(dnx * gx) / (C m^2)`` and ``da = g * f + a * dgx / gx`` (0 where ``gx`` is clamped: the
    norm's subgradient at an all-zero channel).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        a = F.gelu(h)
        gx32, nx = _grn_norms(a)
        ctx.save_for_backward(h, gamma, gx32, nx)
        return torch.addcmul(beta, a, gamma * nx + 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, gamma, gx32, nx = ctx.saved_tensors
        wide = gx32.dtype
        a = F.gelu(h)
        f = gamma * nx + 1
        grad_gamma = grad_beta = None
        if ctx.needs_input_grad[2]:
            grad_beta = grad.sum(dim=(0, 1, 2), keepdim=True, dtype=wide).to(gamma.dtype)
        df = (grad * a).sum(dim=(1, 2), keepdim=True, dtype=wide)  # [B, 1, 1, C]
        nx32 = nx.to(wide)
        if ctx.needs_input_grad[1]:
            grad_gamma = (df * nx32).sum(dim=0, keepdim=True).to(gamma.dtype)
        grad_h = None
        if ctx.needs_input_grad[0]:
            m = gx32.to(nx.dtype).mean(dim=-1, keepdim=True).to(wide) + 1e-6
            dnx = df * gamma.to(wide)
            dgx = dnx / m - (dnx * gx32).sum(dim=-1, keepdim=True) / (m * m * gx32.shape[-1])
            k = torch.where(gx32 > 1e-15, dgx / gx32, torch.zeros_like(dgx))
            grad_a = (grad * f).addcmul_(a, k.to(grad.dtype))  # in place: one block-wide temporary fewer
            del a
            grad_h = torch.ops.aten.gelu_backward(grad_a.to(h.dtype), h)
        return grad_h, grad_gamma, grad_beta


def gelu_grn(h: torch.Tensor, grn: GlobalResponseNorm) -> torch.Tensor:
    """``grn(F.gelu(h))`` as one autograd node that keeps only ``h`` (see :class:`_GeluGrn`)."""
    return _GeluGrn.apply(h, grn.gamma, grn.beta)


class ResBlock(nn.Module):
    """``x + channelwise(cat(LN2d(depthwise(x)), skip))``; the MLP runs in BHWC."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        # Index positions matter: the official keys are channelwise.0 / .2.gamma / .2.beta / .4.
        self.channelwise = nn.Sequential(
            nn.Linear(c + c_skip, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        residual = x
        x = self.norm(self.depthwise(x))
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        x = self._channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + residual

    def _channelwise(self, x: torch.Tensor) -> torch.Tensor:
        """``self.channelwise(x)`` with GELU and GRN as one node (:func:`gelu_grn`: the 4c-wide activation is
        kept once, not three times); any other activation module runs as it is."""
        first, act, grn, dropout, last = self.channelwise
        if type(act) is nn.GELU and act.approximate == "none" and isinstance(grn, GlobalResponseNorm):
            return last(dropout(gelu_grn(first(x), grn)))
        return self.channelwise(x)


class TimestepBlock(nn.Module):
    """Scale-and-shift by the timestep embedding: ``x * (1 + a) + b``, summed over ``mapper`` and one
    ``mapper_<cond>`` per extra condition (the embedding holds one chunk per mapper)."""

    def __init__(self, c: int, c_timestep: int, conds: list[str] | tuple[str, ...] = ("sca",)) -> None:
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2)
        self.conds = list(conds)
        for name in self.conds:
            setattr(self, f"mapper_{name}", nn.Linear(c_timestep, c * 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        chunks = t.chunk(len(self.conds) + 1, dim=1)
        a, b = self.mapper(chunks[0])[:, :, None, None].chunk(2, dim=1)
        for i, name in enumerate(self.conds):
            ac, bc = getattr(self, f"mapper_{name}")(chunks[i + 1])[:, :, None, None].chunk(2, dim=1)
            a, b = a + ac, b + bc
        return torch.addcmul(b, x, 1 + a)  # x * (1 + a) + b in one pass over x


class AttentionHookHandle:
    """Returned by :meth:`Attention.add_attention_hook`; ``remove()`` detaches the hook (idempotent)."""

    def __init__(self, hooks: list[AttentionHook], fn: AttentionHook) -> None:
        self._hooks = hooks
        self._fn = fn

    def remove(self) -> None:
        """Detach the hook; calling it twice is harmless."""
        for i, hook in enumerate(self._hooks):
            if hook is self._fn:
                del self._hooks[i]
                return


@torch.compiler.disable
def _apply_attention_hooks(out: torch.Tensor, q: torch.Tensor, hooks: list[AttentionHook]) -> torch.Tensor:
    """Add every hook's contribution. Kept out of compiled graphs: the IP-Adapter makes fresh hooks for every
    forward call, which would otherwise recompile the block each time."""
    for hook in hooks:
        out = out + hook(q)
    return out


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (numerically torch's MultiheadAttention).

    Attention hooks (DESIGN.md): each hook gets the head-split queries ``[B, nhead, L, head_dim]`` and returns a
    tensor of that shape which is added to the attention output before ``out_proj``. They live in a plain list,
    not as submodules, so the state dict never sees them.
    """

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        if c % nhead != 0:
            raise ValueError(f"Attention width {c} is not divisible by nhead={nhead}; pick nhead dividing c_hidden.")
        self.nhead = nhead
        self.dropout = dropout
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)
        self.attention_hooks: list[AttentionHook] = []

    def add_attention_hook(self, fn: AttentionHook) -> AttentionHookHandle:
        """Register ``fn(q) -> delta`` (see class docstring); returns a handle with ``.remove()``."""
        self.attention_hooks.append(fn)
        return AttentionHookHandle(self.attention_hooks, fn)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.nhead, c // self.nhead).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, self_attn: bool = False) -> torch.Tensor:
        """``x`` [B, L, C] queries, ``kv`` [B, S, C] keys/values -> [B, L, C]; with ``self_attn`` the keys and
        values are ``cat([x, kv])``, L + S of them.

        ``kv`` (the conditioning tokens) is the same at every sampling step, so its key and value projections
        are computed once per sampling run (models/reuse); with ``self_attn`` only the queries' own rows are
        projected at every step. The projections are row-wise, so projecting the two parts apart is
        projecting their concatenation; the sampled image is the same with or without the reuse.
        """
        q_proj = self.to_q(x)
        k, v = reuse(self, "kv", (kv,), lambda: (self.to_k(kv), self.to_v(kv)))
        if self_attn:
            k, v = torch.cat([self.to_k(x), k], dim=1), torch.cat([self.to_v(x), v], dim=1)
        q, k, v = self._split_heads(q_proj), self._split_heads(k), self._split_heads(v)
        # MultiheadAttention's dropout acts on the attention weights; SDPA's dropout_p is the same thing.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        if self.attention_hooks:
            out = _apply_attention_hooks(out, q, self.attention_hooks)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class Attention2D(nn.Module):
    """Flattens a BCHW image to tokens, optionally prepends them to the kv tokens (self-attention), attends."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = Attention(c, nhead, dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, self_attn: bool = False) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1)
        out = self.attn(tokens, kv, self_attn=self_attn)
        return out.permute(0, 2, 1).reshape(b, c, h, w)


class AttnBlock(nn.Module):
    """``x + attention(LN2d(x), kv_mapper(clip))`` with kv_mapper = SiLU -> Linear(c_cond, c)."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = reuse(self, "kv", (kv,), lambda: self.kv_mapper(kv))  # the same at every sampling step
        return x + self.attention(self.norm(x), kv, self_attn=self.self_attn)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    # torch.autocast rejects device types without autocast support (e.g. 'meta'); nothing to turn off there.
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class UpDownBlock2d(nn.Module):
    """Stage C's level switch: a 1x1 conv plus an optional bilinear x2 / x0.5 resize.

    The official block casts its input to float32 before every step; we run the conv in float32 too
    (weights included, autocast off) and hand the result back in the input dtype so bf16 models keep working.
    """

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool = True) -> None:
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"UpDownBlock2d mode must be 'up' or 'down', got {mode!r}.")
        resize: nn.Module = (
            nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
            if enabled
            else nn.Identity()
        )
        mapping = nn.Conv2d(c_in, c_out, kernel_size=1)
        # Order decides the key: down -> blocks.0 is the conv, up -> blocks.1 is the conv.
        self.blocks = nn.ModuleList([resize, mapping] if mode == "up" else [mapping, resize])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        with _autocast_off(x.device.type):
            for block in self.blocks:
                if isinstance(block, nn.Conv2d):
                    bias = None if block.bias is None else block.bias.float()
                    x = F.conv2d(x, block.weight.float(), bias)
                else:
                    x = block(x)
        return x.to(dtype)
