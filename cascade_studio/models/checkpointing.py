"""Activation checkpointing of Stage C (and B) blocks: none, whole blocks, or selective.

``blocks`` keeps only each block's input and recomputes the whole block in the backward pass (the matmuls too).
``selective`` is selective activation checkpointing (SAC, ``torch.utils.checkpoint`` with
``create_selective_checkpoint_contexts``): inside a checkpointed block the outputs of the expensive ops (the op
classes the block's policy names in :data:`SELECTIVE_POLICY`) are kept, and everything else (layer norms, GELU,
SiLU, GRN's norm/mul/add, the depthwise conv, dropout, casts, elementwise ops) is recomputed in backward. The
cheap ops cost a few operations per element, a matmul of contraction ``k`` costs ``k`` multiply-adds per output
element: recomputing the first is nearly free, recomputing the second is what makes ``blocks`` slow.

:data:`SELECTIVE_POLICY` is the one table of what ``selective`` keeps per block kind (``C`` ResBlock, ``A``
AttnBlock, ``T`` TimestepBlock: the letters of ``level_config``); the memory planner (``trainers/plan.py``) reads
the same table to predict what the mode keeps. Two kinds of matmul are not kept (:func:`_matmul_kept`):

* a low-rank up-projection (a LoRA's ``lora_B``: contraction at most 1/:data:`LOW_RANK_RATIO` of its output
  width): its output is as wide as the base layer's and costs ``rank`` multiply-adds per element, so it is
  recomputed from the rank-wide ``lora_A`` output;
* a contracting one (output narrower than its contraction: a ResBlock's 4c -> c ``channelwise.4``, a LoRA's
  ``lora_A``): in Stage C's blocks no backward formula reads such an output (``channelwise.4`` feeds the residual
  add), so keeping it only held memory, and the recomputation stops before reaching it (checkpointing's early
  stop: it ends once every tensor the backward needs is back). ``lora_A``'s rank-wide output costs ``width``
  multiply-adds per element to recompute, the ``1/rank`` share of its base layer's.

The table and :data:`MODES` import no torch (the recipe schema reads the modes); the mechanics do, on use.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

MODES = ("none", "blocks", "selective")
RECOMPILE_LIMIT = 64  # graph variants of the compiled selective region (see compiled_selective_call)
LOW_RANK_RATIO = 8  # a matmul with contraction <= output width / 8 is recomputed (LoRA B; see module docstring)


@dataclass(frozen=True)
class BlockPolicy:
    """What ``selective`` does with one block kind.

    ``checkpoint``: run the block under ``torch.utils.checkpoint`` at all (a TimestepBlock's ``x * (1 + a) + b``
    keeps nothing large for backward, so checkpointing it would only add its input to what is kept);
    ``save``: the op classes (:data:`OP_CLASSES`) whose outputs are kept; every other op is recomputed.
    """

    checkpoint: bool
    save: tuple[str, ...] = ()
    why: str = ""


SELECTIVE_POLICY: dict[str, BlockPolicy] = {
    "C": BlockPolicy(True, ("matmul",), "keep the 4c-wide channelwise.0 output (GELU and GRN's backward reads it); "
                     "recompute the depthwise conv (kernel_size^2 multiply-adds per element), LayerNorm, GELU, GRN "
                     "and dropout; channelwise.4's output is read by no backward formula"),
    "A": BlockPolicy(True, ("matmul", "attention"), "keep q/k/v/kv_mapper/out_proj and the attention output; "
                     "recompute LayerNorm, SiLU and the self-attention concatenation"),
    "T": BlockPolicy(False, (), "not checkpointed: it keeps nothing large, checkpointing would keep its input"),
}

# Op classes a policy can name, as aten overload packets (names looked up on use; missing ones are skipped).
OP_CLASSES: dict[str, tuple[str, ...]] = {
    "matmul": ("mm", "addmm", "bmm", "baddbmm"),
    "attention": ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"),
    "conv": ("convolution",),
}


def block_kind(block: Any) -> str:
    """The ``level_config`` letter of a Stage C/B block instance."""
    from .blocks import AttnBlock, ResBlock, TimestepBlock

    for cls, kind in ((ResBlock, "C"), (AttnBlock, "A"), (TimestepBlock, "T")):
        if isinstance(block, cls):
            return kind
    raise TypeError(f"{type(block).__name__} is no Stage C block kind (ResBlock, AttnBlock, TimestepBlock)")


@functools.lru_cache(maxsize=None)
def _packets(classes: tuple[str, ...]) -> frozenset:
    import torch

    names = [name for cls in classes for name in OP_CLASSES[cls]]
    return frozenset(getattr(torch.ops.aten, name) for name in names if hasattr(torch.ops.aten, name))


def _matmul_kept(op: Any, args: tuple) -> bool:
    """Whether ``selective`` keeps a matmul's output: not when it is low-rank (contraction at most
    1/LOW_RANK_RATIO of its output width: a LoRA up-projection) or contracting (output narrower than its
    contraction); see the module docstring."""
    import torch

    aten = torch.ops.aten
    if op.overloadpacket in (aten.addmm, aten.baddbmm):
        args = args[1:]  # addmm(bias, a, b)
    contraction, width = args[0].shape[-1], args[1].shape[-1]
    return width // LOW_RANK_RATIO < contraction <= width


@functools.lru_cache(maxsize=None)
def policy_fn(kind: str, keep_random: bool = False) -> Callable[..., Any]:
    """The SAC policy of a block kind: MUST_SAVE for the outputs of the op classes its table row names.

    Random ops (dropout) are recomputed in eager mode, where checkpointing restores the RNG state; a compiled
    region cannot recompute them (inductor refuses RNG ops in recompute regions), so ``keep_random`` keeps them.
    """
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    saved = _packets(SELECTIVE_POLICY[kind].save)
    matmuls = _packets(("matmul",))

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        packet = getattr(op, "overloadpacket", None)
        if packet in saved and (packet not in matmuls or _matmul_kept(op, args)):
            return CheckpointPolicy.MUST_SAVE
        if keep_random and torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpoint_contexts(mode: str, kind: str, recompute_extra: Callable[[], Any] | None = None
                        ) -> Callable[[], tuple[Any, Any]]:
    """The ``context_fn`` for ``torch.utils.checkpoint`` of one block call: ``(forward ctx, recompute ctx)``.

    ``recompute_extra`` makes one more context entered while the block is recomputed (the attention-hook replay).
    Under ``selective`` both passes also run without autocast's cast cache: the recomputation must dispatch the
    same ops as the forward (SAC matches them by count), and a weight used in several blocks (a shared hook's) is
    cast once per autocast region when cached: in the forward only by its first block, in every recomputation.
    """
    def context_fn() -> tuple[Any, Any]:
        if mode != "selective":
            forward: Any = contextlib.nullcontext()
            recompute: Any = contextlib.nullcontext()
            return forward, (recompute_extra() if recompute_extra else recompute)
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        forward, recompute = create_selective_checkpoint_contexts(policy_fn(kind))
        extra = recompute_extra() if recompute_extra else contextlib.nullcontext()
        return _together(forward, _uncached_autocast()), _together(recompute, _uncached_autocast(), extra)

    return context_fn


@contextlib.contextmanager
def _together(*contexts: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


@contextlib.contextmanager
def _uncached_autocast() -> Iterator[None]:
    """The autocast in effect (per device type), with its weight-cast cache off."""
    import torch

    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, dtype=torch.get_autocast_dtype(device),
                                                   cache_enabled=False))
        yield


@functools.lru_cache(maxsize=None)
def compiled_selective_call(kind: str, options: tuple = ()) -> Callable[..., Any]:
    """``fn(block, *args)``: the block's (eager) forward under selective checkpointing, compiled as one region.

    For blocks compiled by ``compile_blocks``: the checkpoint must sit inside the compiled region, where the
    compiler reads the policy from the traced ops and recomputes in its own backward graph. Around an already
    compiled block, the eager SAC dispatch mode would cache the compiled kernels' reused output buffers, which
    torch refuses ("Tensor cached during selective activation checkpoint has been mutated"). One compiled function
    per block kind: blocks of a kind share their graphs, as with ``compile_blocks``. The kinds share one code
    object, whose variants (kind, skip input or not, input needing a gradient or not, train/eval, shapes) exceed
    dynamo's default 8 recompilations: the call raises the limit to :data:`RECOMPILE_LIMIT` and fails loudly when
    even that is hit (dynamo's fallback would run the region eagerly around compiled inner frames, which torch
    refuses as above).
    """
    import torch
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    context_fn = functools.partial(create_selective_checkpoint_contexts, policy_fn(kind, keep_random=True))

    def run(block: Any, *args: Any) -> Any:
        return checkpoint(block.forward, *args, use_reentrant=False, context_fn=context_fn)

    compiled = torch.compile(run, **dict(options))

    def call(block: Any, *args: Any) -> Any:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            return compiled(block, *args)

    return call


def checkpoints(mode: str, kind: str) -> bool:
    """Whether ``mode`` runs a block of ``kind`` under ``torch.utils.checkpoint``."""
    if mode not in MODES:
        raise ValueError(f"unknown checkpointing mode {mode!r}; use one of {', '.join(MODES)}")
    return mode == "blocks" or (mode == "selective" and SELECTIVE_POLICY[kind].checkpoint)
