"""The IP-Adapter's part of the memory plan (``cascade-studio plan``, ``trainers/plan.py``).

``plan_adapter(section, layout, setup)`` is the method's planner hook. The IP-Adapter the recipe's
``adapter.ip_adapter`` section asks for is built on the meta device (the image encoder's embedding width from its
meta build, Stage C's width, c_cond and attention blocks from the layout), so its trainable parameters are
counted exactly. Its activations, per attention block (the branch of ``adapter._make_hook``), for ``T`` image
tokens, ``N`` image-prompt tokens and width ``c``:

* the branch's attention output ``[T x c]`` and its log-sum-exp (SDPA keeps both for its backward), in the
  adapter's fp32; under bf16 autocast also the fp32 copy of the block's bf16 queries that the branch attends with;
* over the N prompt tokens (a handful): the frozen ``kv_mapper``'s SiLU input, the ``to_k_ip`` / ``to_v_ip``
  input and the keys and values;

and once, the projection's inputs (the embedding and the LayerNorm input). The frozen encoder's embeddings come
from the encode-once cache. Stage C needs gradients from the first attention block on; its attention blocks keep
the frozen coefficients (the branch sits beside their projections, it does not wrap them).
"""
from __future__ import annotations

from typing import Any

from ...trainers.plan import Layout, PlannedAdapter, Setup

__all__ = ["plan_adapter", "build_on_meta"]


def build_on_meta(section: Any, layout: Layout):
    """The IPAdapter a run would build for ``section`` on this Stage C, on the meta device."""
    import torch

    from .adapter import IPAdapter
    from .method import image_embed_dim

    attention = [b for b in layout.blocks if b.kind == "A"]
    if not attention:
        raise ValueError("this Stage C has no attention blocks for an IP-Adapter to attend from")
    with torch.device("meta"):
        return IPAdapter(embed_dim=image_embed_dim(section.image_encoder), c_cond=layout.c_cond,
                         width=attention[0].width, num_blocks=len(attention), num_tokens=section.num_tokens,
                         image_encoder=section.image_encoder)


def plan_adapter(section: Any, layout: Layout, setup: Setup) -> PlannedAdapter:
    """What an IP-Adapter of ``section`` adds to the plan of ``setup`` (see the module docstring)."""
    adapter = build_on_meta(section, layout)
    attention = [b for b in layout.blocks if b.kind == "A"]
    batch, tokens, prompt = setup.batch_size, setup.tokens, setup.batch_size * section.num_tokens
    autocast = setup.mixed_precision == "bf16"
    kept: dict[str, float] = {}
    for block in attention:
        c = block.width
        heads = max(1, c // 64)  # only the log-sum-exp depends on it, at 4 bytes per head and token
        branch = 4 * c * tokens + 4 * heads * tokens + (4 * c * tokens if autocast else 0)
        kept[block.path] = float(branch + 4 * prompt * (layout.c_cond + 3 * c))
    own = 4 * batch * (adapter.embed_dim + 2 * section.num_tokens * layout.c_cond)
    return PlannedAdapter(
        trainable=tuple(p.numel() for p in adapter.trainable_parameters()),
        touches=tuple(f"{b.path}.attention.attn" for b in attention),
        note=f"{section.num_tokens} image tokens from {section.image_encoder} ({adapter.embed_dim}-dim)",
        block_saved=kept, own_saved=float(own))
