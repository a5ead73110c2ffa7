"""The IP-Adapter's part of the memory plan (``cascade-studio plan``, ``trainers/plan.py``).

``plan_adapter(section, layout, setup)`` is the method's planner hook. The IP-Adapter the recipe's
``adapter.ip_adapter`` section asks for is built on the meta device (the image encoder's embedding width from its
meta build, Stage C's width, c_cond and attention blocks from the layout), so its trainable parameters are
counted exactly. Its activations, per attention block (the branch of ``adapter._make_hook``), for ``T`` image
tokens, ``N`` image-prompt tokens and width ``c``:

* the branch's attention output ``[T x c]``, its log-sum-exp (SDPA keeps both for its backward) and the copies
  of the block's queries the branch attends with: :data:`BRANCH_BYTES` bytes per element of ``[T x c]``, measured
  per precision (an fp32 base keeps the output and reuses the queries; a bf16 base without autocast keeps fp32
  copies of both; under autocast SDPA keeps bf16 casts, and the scaled output too);
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

# Bytes the branch keeps per element of one [image tokens x c] tensor, log-sum-exp included, keyed by
# (model.dtype, train.mixed_precision): saved-tensor hooks around the attention hooks of a tiny-preset training
# step (storages the block had not already saved), less the prompt-token part below.
BRANCH_BYTES = {("fp32", "no"): 4.2, ("bf16", "no"): 8.0, ("bf16", "bf16"): 5.6, ("fp32", "bf16"): 6.9}


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
    per_element = BRANCH_BYTES[(setup.dtype, setup.mixed_precision)]
    kept: dict[str, float] = {}
    for block in attention:
        c = block.width
        kept[block.path] = float(per_element * c * tokens + 4 * prompt * (layout.c_cond + 3 * c))
    own = 4 * batch * (adapter.embed_dim + 2 * section.num_tokens * layout.c_cond)
    return PlannedAdapter(
        trainable=tuple(p.numel() for p in adapter.trainable_parameters()),
        touches=tuple(f"{b.path}.attention.attn" for b in attention),
        note=f"{section.num_tokens} image tokens from {section.image_encoder} ({adapter.embed_dim}-dim)",
        block_saved=kept, own_saved=float(own))
