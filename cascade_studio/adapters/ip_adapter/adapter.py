"""IP-Adapter for Stage C: image prompts through a decoupled attention branch in every AttnBlock.

Design (STABLE_CASCADE.md sections 2 and 6; no Stage C IP-Adapter existed before this one):

* A frozen image encoder (default OpenCLIP ViT-H/14) gives one embedding ``[D]`` per image prompt.
* ``image_proj`` turns it into ``num_tokens`` (N, default 4) conditioning tokens: Linear(D, N*c_cond) ->
  reshape -> LayerNorm(c_cond). The LayerNorm puts the tokens on the same footing as Stage C's own
  conditioning tokens, which leave ``clip_norm`` layer-normalised.
* In every AttnBlock the tokens go through that block's own frozen ``kv_mapper`` (SiLU -> Linear(c_cond, c)),
  exactly like the native conditioning, then through new projections ``to_k_ip`` / ``to_v_ip`` (Linear c -> c)
  initialised from the block's ``to_k`` / ``to_v``, as the original IP-Adapter initialises its k/v from the
  cross-attention's.
* The block's queries attend to those image keys/values in a *separate* softmax; the result times ``scale`` is
  added to the block's attention output before ``out_proj`` (through the attention hook of ``models.blocks``).

Why a decoupled branch and not only Stage C's native ``clip_img`` input: Stage C's attention is one joint
softmax over its image-patch tokens (self-attention; thousands at 1024 px), 77 text tokens, 4 pooled-text
tokens and 4 ``clip_img`` tokens, so four image tokens get little attention mass, and the published model saw
``clip_img`` on only 10% of its training samples: the native path is weak. A separate softmax with its own k/v
gives the image prompt its own attention budget, controllable by ``scale``; ``scale = 0`` is exactly the base
model. The branch attends to the image-prompt tokens only (not to the patch tokens that Stage C's self-attention
concatenates into its keys/values).

An embedding of all zeros means "no image prompt" (CFG's unconditional half, image dropout in training): such
images are masked out of the branch and a sample without any image gets exactly zero from it.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...devices import host_floats
from ...models.reuse import reuse
from ..base import AdapterMismatchError, check_adapter_tensors

MULTI_IMAGE_MODES = ("average", "concat")
ARCHITECTURE = "stable-cascade-v1-prior/ip-adapter"


class ImageProjection(nn.Module):
    """One image embedding ``[..., D]`` -> ``num_tokens`` tokens ``[..., N, c_cond]`` (Linear, reshape, LayerNorm).

    Submodule names ``proj`` / ``norm`` follow the original IP-Adapter's ``image_proj`` keys.
    """

    def __init__(self, embed_dim: int, c_cond: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.c_cond = c_cond
        self.proj = nn.Linear(embed_dim, num_tokens * c_cond)
        self.norm = nn.LayerNorm(c_cond)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(embeds)
        return self.norm(tokens.reshape(*embeds.shape[:-1], self.num_tokens, self.c_cond))


class IPAttentionProjection(nn.Module):
    """The new key/value projections of one AttnBlock (applied after the block's own ``kv_mapper``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(width, width)
        self.to_v_ip = nn.Linear(width, width)


def find_attention_blocks(stage_c: nn.Module) -> list[nn.Module]:
    """Stage C's AttnBlocks in module order: modules with ``.attention.attn`` holding to_q/to_k/to_v and a
    ``kv_mapper`` (duck-typed, so this package needs nothing from ``models`` but the hook contract)."""
    blocks = []
    for module in stage_c.modules():
        attn = getattr(getattr(module, "attention", None), "attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("to_q", "to_k", "to_v", "add_attention_hook")):
            continue
        if not hasattr(module, "kv_mapper"):
            continue
        blocks.append(module)
    return blocks


def float_weight(linear: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of ``linear`` as a floating-point tensor (detached), dequantized when ``linear``
    is a bitsandbytes layer of a base quantized with ``train.quantize_base`` (``trainers.quantize``).

    Duck-typed, so nothing imports bitsandbytes unless a 4-bit weight is met: a floating weight is returned as
    is; a 4-bit ``Params4bit`` (packed uint8 with a ``quant_state``) goes through bitsandbytes'
    ``dequantize_4bit``; an int8 ``Int8Params`` (LLM.int8 with ``has_fp16_weights=False``) holds the int8 rows
    ``CB`` and their absmax scales ``SCB``, i.e. ``float = CB * SCB[:, None] / 127``. bitsandbytes (0.50) keeps
    ``SCB`` on the weight until the layer's first call and on ``layer.state`` afterwards, so both are looked at.
    """
    weight = linear.weight
    if weight.is_floating_point():
        return weight.detach()
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, quant_state)
    if weight.dtype == torch.int8:
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(linear, "state", None), "SCB", None)
        if scb is None:
            raise TypeError(f"{type(linear).__name__} holds an int8 weight without row scales (SCB on the weight "
                            "or on .state); cannot dequantize it")
        return weight.data.float() * scb.float()[:, None] / 127
    raise TypeError(f"cannot read a float weight from {type(linear).__name__} (weight dtype {weight.dtype}); "
                    "expected nn.Linear or a bitsandbytes Linear8bitLt / Linear4bit")


def _compute_dtype(module: nn.Module, fallback: torch.dtype) -> torch.dtype:
    """The dtype ``module`` computes in: its first floating-point parameter's. On a quantized base the weights
    are int8/uint8 but the biases keep the model dtype, and a weight held only for storage (a bf16-held Linear
    of an fp32 base, ``weight_is_storage_only``) is passed over the same way; ``fallback`` when nothing is left."""
    for layer in module.modules():
        storage_only = getattr(layer, "weight_is_storage_only", False)
        for name, param in layer.named_parameters(recurse=False):
            if param.is_floating_point() and not (storage_only and name == "weight"):
                return param.dtype
    return fallback


def _block_dims(block: nn.Module) -> tuple[int, int]:
    """(width c, c_cond) of one AttnBlock: its query width and the input width of its kv_mapper Linear."""
    linears = [m for m in block.kv_mapper.modules() if isinstance(m, nn.Linear)]
    return int(block.attention.attn.to_q.in_features), int(linears[-1].in_features)


class IPAdapter(nn.Module):
    """An IP-Adapter for one Stage C (see the module docstring for the design).

    Tensors: ``image_proj.{proj,norm}.*`` and ``ip_adapter.{i}.to_{k,v}_ip.{weight,bias}`` with ``i`` the
    AttnBlock's position in module order (registered as ``ip_layers``; renamed on export to the de-facto
    ``ip_adapter.`` prefix).

    ``multi_image`` decides how M image prompts per sample (``ip_image_embeds`` ``[B, M, D]``) combine:
    ``average`` averages the embeddings of the non-empty images before the projection (N tokens, a blend of the
    images); ``concat`` projects each image and concatenates the token sequences (M*N tokens in one softmax, so
    each image keeps its own features and the images compete for attention).
    """

    method = "ip_adapter"
    input_names: tuple[str, ...] = ("ip_image_embeds",)

    def __init__(self, *, embed_dim: int, c_cond: int, width: int, num_blocks: int, num_tokens: int = 4,
                 scale: float = 1.0, multi_image: str = "average", image_encoder: str = "openclip-vit-h-14",
                 name: str = "ip_adapter", info: dict[str, str] | None = None) -> None:
        super().__init__()
        if multi_image not in MULTI_IMAGE_MODES:
            raise ValueError(f"multi_image must be one of {MULTI_IMAGE_MODES}, got {multi_image!r}")
        if min(embed_dim, c_cond, width, num_blocks, num_tokens) < 1:
            raise ValueError("IPAdapter dimensions must all be positive")
        self.name = name
        self.embed_dim, self.c_cond, self.width = int(embed_dim), int(c_cond), int(width)
        self.num_tokens, self.num_blocks = int(num_tokens), int(num_blocks)
        self.image_encoder = image_encoder
        self.multi_image = multi_image
        self.scale = float(scale)
        self.info = dict(info or {})
        self.image_proj = ImageProjection(self.embed_dim, self.c_cond, self.num_tokens)
        self.ip_layers = nn.ModuleList(IPAttentionProjection(self.width) for _ in range(self.num_blocks))
        # Fresh k/v projections copy the base's at attach; loaded or already-attached weights are kept.
        self._fresh = True
        # A plain list, not a registered submodule: the base's blocks must not enter this module's state dict.
        self._blocks: list[nn.Module] = []
        self._base: list[nn.Module] = []
        self._warned_checkpointing = False

    @classmethod
    def for_stage_c(cls, stage_c: nn.Module, *, embed_dim: int, **kwargs: Any) -> "IPAdapter":
        """An adapter sized for ``stage_c`` (width, c_cond and AttnBlock count read from its blocks)."""
        blocks = find_attention_blocks(stage_c)
        if not blocks:
            raise AdapterMismatchError("this Stage C has no attention blocks with attention hooks; an IP-Adapter "
                                       "needs models.blocks.AttnBlock (to_q/to_k/to_v + add_attention_hook)")
        width, c_cond = _block_dims(blocks[0])
        return cls(embed_dim=embed_dim, c_cond=c_cond, width=width, num_blocks=len(blocks), **kwargs)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def attach(self, stage_c: nn.Module) -> None:
        """Check the base fits, initialise fresh k/v projections from the base's; installs nothing permanent
        (hooks exist only inside :meth:`apply`'s context)."""
        blocks = find_attention_blocks(stage_c)
        if len(blocks) != self.num_blocks:
            raise AdapterMismatchError(f"IP-Adapter {self.name!r} has {self.num_blocks} attention layers but this "
                                       f"Stage C has {len(blocks)} AttnBlocks; it was made for another base model")
        for i, block in enumerate(blocks):
            width, c_cond = _block_dims(block)
            if (width, c_cond) != (self.width, self.c_cond):
                raise AdapterMismatchError(
                    f"IP-Adapter {self.name!r} was made for width {self.width} / c_cond {self.c_cond}; AttnBlock "
                    f"{i} of this Stage C has width {width} / c_cond {c_cond}")
        if self._fresh:
            with torch.no_grad():
                for layer, block in zip(self.ip_layers, blocks):
                    attn = block.attention.attn
                    for new, old in ((layer.to_k_ip, attn.to_k), (layer.to_v_ip, attn.to_v)):
                        # On a quantized base (train.quantize_base) to_k/to_v hold packed bitsandbytes weights.
                        new.weight.copy_(float_weight(old).to(new.weight))
                        new.bias.copy_(old.bias.to(new.bias) if old.bias is not None else torch.zeros_like(new.bias))
            self._fresh = False
        self._blocks = blocks
        self._base = [stage_c]

    def detach(self, stage_c: nn.Module) -> None:
        """Forget the base (nothing of the adapter stays in it: hooks only live during calls)."""
        self._blocks = []
        self._base = []

    def set_scale(self, scale: float) -> None:
        """Weight of the image branch (0 = base model exactly, 1 = as trained)."""
        self.scale = float(scale)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.image_proj.parameters()) + list(self.ip_layers.parameters())

    # -- state -----------------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """``image_proj.*`` and ``ip_adapter.{i}.*`` tensors (detached copies)."""
        out = {f"image_proj.{k}": v.detach().clone() for k, v in self.image_proj.state_dict().items()}
        out.update({f"ip_adapter.{k}": v.detach().clone() for k, v in self.ip_layers.state_dict().items()})
        return out

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        check_adapter_tensors(self.adapter_state_dict(), state_dict, "IP-Adapter weights")
        self.image_proj.load_state_dict({k[len("image_proj."):]: v for k, v in state_dict.items()
                                         if k.startswith("image_proj.")})
        self.ip_layers.load_state_dict({k[len("ip_adapter."):]: v for k, v in state_dict.items()
                                        if k.startswith("ip_adapter.")})
        self._fresh = False

    def metadata(self) -> dict[str, str]:
        meta = {
            "modelspec.architecture": ARCHITECTURE,
            "cascade_studio.method": self.method,
            "cascade_studio.image_encoder": self.image_encoder,
            "cascade_studio.image_embed_dim": str(self.embed_dim),
            "cascade_studio.num_tokens": str(self.num_tokens),
            "cascade_studio.attn_blocks": str(self.num_blocks),
            "cascade_studio.base_width": str(self.width),
            "cascade_studio.base_c_cond": str(self.c_cond),
        }
        meta.update(self.info)
        return meta

    # -- per call --------------------------------------------------------------------------------------------
    def image_tokens(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``[B, M, D]`` (or ``[B, D]``) image embeddings to tokens.

        Returns ``(tokens [B, T, c_cond], token_valid [B, T] bool, sample_valid [B] bool)``; T = N for
        ``average`` and M*N for ``concat``. All-zero embeddings are "no image" and are invalid.
        """
        if embeds.dim() == 2:
            embeds = embeds.unsqueeze(1)
        if embeds.dim() != 3 or embeds.shape[-1] != self.embed_dim:
            raise AdapterMismatchError(
                f"ip_image_embeds must be [B, M, {self.embed_dim}] from the {self.image_encoder} image encoder "
                f"this IP-Adapter ({self.name!r}) was trained with; got shape {tuple(embeds.shape)}")
        weight = self.image_proj.proj.weight
        embeds = embeds.to(device=weight.device, dtype=weight.dtype)
        valid = (embeds != 0).any(dim=-1)  # [B, M]
        sample_valid = valid.any(dim=1)
        b, m, _ = embeds.shape
        if self.multi_image == "average":
            count = valid.sum(dim=1, keepdim=True).clamp(min=1).to(embeds.dtype)
            mean = (embeds * valid.unsqueeze(-1).to(embeds.dtype)).sum(dim=1) / count
            tokens = self.image_proj(mean)
            token_valid = sample_valid[:, None].expand(b, self.num_tokens)
        else:
            tokens = self.image_proj(embeds).reshape(b, m * self.num_tokens, self.c_cond)
            token_valid = valid.repeat_interleave(self.num_tokens, dim=1)
        return tokens, token_valid, sample_valid

    def apply(self, inputs: dict[str, Any], stage_c_kwargs: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Compute the image tokens once and return a context holding one attention hook per AttnBlock.

        No ``ip_image_embeds`` input or ``scale == 0``: nothing is hooked, so the call is the base model's exactly.
        No image in the whole batch: the same at inference (grad disabled). With grad enabled (training) the branch
        runs anyway: image dropout can empty a whole micro-batch (always, at batch size 1), and a loss that
        reaches no adapter parameter cannot be backpropagated ("does not require grad") and leaves parameters
        unused on that DDP rank. The branch's result for image-less samples is an exact zero (``torch.where`` in
        the hook), so the output is still the base model's and every parameter gets a zero gradient, not None.
        Training also never reads the masks on the host: each ``bool(tensor)`` would wait for the GPU every step.
        """
        embeds = inputs.get("ip_image_embeds")
        if embeds is None or self.scale == 0:
            return contextlib.nullcontext()
        if not self._blocks:
            raise RuntimeError(f"IP-Adapter {self.name!r} is not attached; add it with AdaptedStageC.add_adapter")
        # The image prompt is the same at every sampling step: its tokens are made once per run (models/reuse).
        tokens, token_valid, sample_valid = reuse(self, "image_tokens", (embeds,), lambda: self.image_tokens(embeds))
        training = torch.is_grad_enabled()
        if not training:
            # One host read at inference: how many samples have no image, and how many tokens are empty.
            samples_without, empty_tokens = reuse(self, "empty", (embeds,), lambda: host_floats(
                (~sample_valid).sum(), (~token_valid).sum()))
            if samples_without == sample_valid.shape[0]:
                return contextlib.nullcontext()
        # Samples without any image would make a softmax over nothing (NaN); let them attend to every token and
        # zero their result afterwards instead. No mask at all when every token is real keeps SDPA's fast path:
        # always so for ``average`` (a sample's tokens are all real or all empty, and empty samples attend to all);
        # for ``concat`` inference checks, training passes the mask unchecked (no host sync).
        if self.multi_image == "average" or (not training and empty_tokens == 0):
            attn_mask = None
        else:
            attn_mask = (token_valid | ~sample_valid[:, None])[:, None, None, :]
        return self._hooked(tokens, attn_mask, sample_valid)

    def _checkpointing_unsafe(self) -> bool:
        """True when Stage C would recompute checkpointed blocks in backward *after* our hooks are gone.

        Non-reentrant checkpointing re-runs each block during backward; without the hook the recomputation saves
        different tensors and torch raises CheckpointError. A base whose ``_call`` re-installs the hooks seen in
        the forward during recomputation says so with ``replays_attention_hooks = True``.
        """
        base = self._base[0] if self._base else None
        return (base is not None and torch.is_grad_enabled() and bool(getattr(base, "gradient_checkpointing", False))
                and not getattr(base, "replays_attention_hooks", False))

    @contextlib.contextmanager
    def _hooked(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None,
                sample_valid: torch.Tensor) -> Iterator[None]:
        handles = []
        base = self._base[0]
        pause_checkpointing = self._checkpointing_unsafe()
        if pause_checkpointing:
            if not self._warned_checkpointing:
                warnings.warn("IP-Adapter: this Stage C cannot replay attention hooks when it recomputes "
                              "checkpointed blocks, so gradient checkpointing is paused during IP-Adapter calls "
                              "(more memory). Fix: models/stage_c.py LevelStack._call should re-install the hooks "
                              "on recomputation and set replays_attention_hooks = True.", stacklevel=3)
                self._warned_checkpointing = True
            base.gradient_checkpointing = False
        try:
            for block, layer in zip(self._blocks, self.ip_layers):
                fn = self._make_hook(block, layer, tokens, attn_mask, sample_valid)
                handles.append(block.attention.attn.add_attention_hook(fn))
            yield
        finally:
            for handle in handles:
                handle.remove()
            if pause_checkpointing:
                base.gradient_checkpointing = True

    def _make_hook(self, block: nn.Module, layer: IPAttentionProjection, tokens: torch.Tensor,
                   attn_mask: torch.Tensor | None, sample_valid: torch.Tensor):
        scale = self.scale

        def hook(q: torch.Tensor) -> torch.Tensor:
            b, nhead, _, head_dim = q.shape
            toks, mask, valid = tokens, attn_mask, sample_valid
            if toks.shape[0] != b:
                if toks.shape[0] != 1:
                    raise ValueError(f"ip_image_embeds has batch {toks.shape[0]} but the Stage C batch is {b}; "
                                     "pass one row per sample (zeros for samples without an image prompt)")
                # One image prompt for the whole batch.
                toks = toks.expand(b, *toks.shape[1:])
                mask = None if mask is None else mask.expand(b, *mask.shape[1:])
                valid = valid.expand(b)
            # The block's frozen conditioning mapper. Its Linear is int8/NF4 on a quantized base, so the tokens
            # go in the mapper's floating compute dtype (bitsandbytes casts internally), never the packed weight's.
            dtype = layer.to_k_ip.weight.dtype

            def keys_values() -> tuple[torch.Tensor, torch.Tensor]:
                kv = block.kv_mapper(toks.to(_compute_dtype(block.kv_mapper, q.dtype))).to(dtype)
                return (layer.to_k_ip(kv).view(b, -1, nhead, head_dim).transpose(1, 2),
                        layer.to_v_ip(kv).view(b, -1, nhead, head_dim).transpose(1, 2))

            # Functions of the image tokens alone: the same at every sampling step (models/reuse).
            k, v = reuse(layer, ("keys_values", b, nhead, q.dtype), (tokens,), keys_values)
            out = F.scaled_dot_product_attention(q.to(dtype), k, v, attn_mask=mask)
            # torch.where (not a multiply) so an empty sample's row is an exact zero whatever the branch held.
            out = torch.where(valid.view(b, 1, 1, 1), out * scale, torch.zeros((), dtype=dtype, device=out.device))
            return out.to(q.dtype)

        return hook
