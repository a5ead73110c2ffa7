"""Predict a training run's peak accelerator memory before loading anything, and say which switches make it fit.

The planner knows Stage C and the run's settings; what the adapter adds it learns from the adapter's method, like
everything else about a method (``adapters/catalog.py``): the method's torch side may define a hook
``plan_adapter(section, layout, setup) -> PlannedAdapter`` (the built-in ones live in
``adapters/<method>/plan.py``) that turns the recipe's ``adapter.<method>`` section into trainable tensor sizes,
the Stage C paths it touches, the activations it keeps inside Stage C's blocks and in its own network, a note for
the printout and, optionally, a switch that makes it smaller (a LoRA's rank). A method without the hook is refused
by name ("the planner does not model <label> recipes yet").

Parts of the peak (each printed by ``cascade-studio plan``):

* **frozen weights**: Stage C's parameters in ``model.dtype``, or bf16 / bitsandbytes int8 / NF4 for the
  Linears ``train.quantize_base`` converts (bf16 ones compute in fp32: activations as for an fp32 model).
  Counted on the meta device: the 3.6B model "builds" in a fraction of a second and allocates nothing.
* **adapter weights**, **gradients**: the adapter's trainable tensors, fp32 (adapters stay fp32 on a bf16 base),
  plus the resident tensors of the adapter that do not train (a frozen ControlNet backbone, BatchNorm statistics).
  The hooks count them exactly: analytically for LoRA/LoHa, otherwise by building the adapter on the meta device.
* **optimizer state**: AdamW 8 bytes per parameter; bitsandbytes' 8-bit AdamW 2 bytes plus one fp32 absmax per
  256-value block per state (tensors under ``optim.MIN_8BIT_SIZE`` values keep 32-bit state).
* **activations**: what autograd keeps for the backward pass at the recipe's batch and latent size, plus the
  largest transient while one block runs its backward. Analytic per block, in bytes per element of one
  ``[tokens x width]`` tensor (tokens = batch x h x w; cond tokens = batch x (77 text + 4 pooled + 4 image)):
  a ResBlock keeps ``res`` (fp32: 40 bytes = ten such tensors: conv and LayerNorm inputs, the 4x-wide Linear
  output and GELU output); an attention block keeps ``attn_image`` per image token and ``attn_cond`` per cond
  token when the adapter wraps its q/k/v/out projections (keys, values and the inputs of those layers; LoRA),
  else the smaller ``attn_image_frozen`` / ``attn_cond_frozen``; TimestepBlocks keep nothing large. On top, what
  the adapter's hook says it keeps per block (LoRA: the rank-wide A outputs; IP-Adapter: its branch's attention
  output) and in its own network (ControlNet: traced on the meta device; its backward runs after Stage C's).
  Blocks that run before the first block the adapter touches need no gradient and keep nothing. Attention is
  assumed to run in SDPA's flash or memory-efficient kernels (no ``tokens x tokens`` matrix is kept), which is
  what Stage C's ``F.scaled_dot_product_attention`` gets on CUDA and on CPU without dropout. With whole-block
  checkpointing (``train.checkpointing: blocks``) each block keeps only its input, and one block at a time holds
  its full activations during its backward. With ``selective`` each block the policy table
  (``models/checkpointing.py`` ``SELECTIVE_POLICY``) checkpoints keeps its input plus the outputs of the op
  classes the table saves for its kind (counted from :data:`OP_OUTPUTS`, in the compute dtype) and what the adapter
  keeps in it; a kind the table leaves alone (TimestepBlock) keeps what it keeps without checkpointing. The coefficients per precision (``CALIBRATION``) were measured on CPU by
  ``benchmarks/calibrate_plan.py`` on single blocks; ``tests/test_plan.py`` checks the whole-model prediction
  against measured peaks: LoRA at three sizes, ControlNet and IP-Adapter at the tiny size.
* **workspace / CUDA context**: the CUDA context and cuBLAS/cuDNN workspaces (a fixed ~0.5 GiB) plus 10% of the
  activations for the caching allocator's fragmentation. Zero when planning for the CPU.

Measuring on the CPU (:func:`measure_peak_tensor_bytes`): the peak of live tensor bytes comes from
``torch.profiler``'s memory events, which record every allocation and free of the CPU allocator (including
temporaries inside kernels) with its size and time; the running sum of those events peaks where the live bytes
peak. RSS would also count the allocator's cached pages and the libraries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

GiB = 2**30
DEFAULT_GPU_GIB = 24.0  # the card `cascade-studio plan` and the studio plan for unless told otherwise
BYTES = {"fp32": 4, "bf16": 2}
COND_TOKENS_TEXT = 77
LATENT_STRIDE = 32  # the effnet compressor: 768 px -> 24x24 latents at every preset
CUDA_CONTEXT_BYTES = 512 * 2**20
FRAGMENTATION = 0.10
NF4_BLOCK = 64  # weights per absmax (quantize.NF4_BLOCKSIZE)
NF4_NESTED_BLOCK = 256  # absmax values per second-level fp32 absmax (double quantization)
OPTIMIZER_8BIT_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state


@dataclass(frozen=True)
class Coefficients:
    """Bytes per element of one ``[tokens x width]`` tensor kept (or transiently needed) per block.

    ``res``: a ResBlock's saved activations; ``res_peak``: its forward+backward peak above what was live before
    (saved activations, its output, the gradient it produces and the GELU/GRN gradient temporaries);
    ``attn_image`` / ``attn_cond``: an attention block's saved activations over image tokens / over keys and
    values (image + cond tokens) with adapter layers on q/k/v/out that keep their inputs (LoRA);
    ``attn_image_frozen`` / ``attn_cond_frozen``: the same without them (a grad-needing but frozen block);
    ``attn_peak``: its backward transient above its saved activations;
    ``stream``: the residual stream's element size (block inputs kept under checkpointing);
    ``weight_copy``: each grad-needing block also keeps a bf16 copy of its frozen Linear weights.
    """

    res: float
    res_peak: float
    attn_image: float
    attn_cond: float
    attn_peak: float
    stream: float
    attn_image_frozen: float
    attn_cond_frozen: float
    weight_copy: bool = False


# Measured with benchmarks/calibrate_plan.py (CPU, torch 2.14, single blocks with LoRA rank 8 on q/k/v/out,
# widths 128 and 256: the coefficients agree across widths to 1%, attn_peak to 15%). Keys: (model.dtype,
# train.mixed_precision). On a bf16 base without autocast PEFT casts each LoRA input to fp32 and keeps that copy
# (attn_image/attn_cond grow). Autocast over an fp32 base keeps the bf16 cast of every frozen weight used after the
# first LoRA for the backward pass (weight_copy): in effect a second, bf16 copy of the model. The frozen attention
# coefficients (no LoRA in the block) were added by the same script later; re-running it reproduced every other
# value to 0.1. ``res`` and ``res_peak`` re-measured when GELU and GRN became one autograd node that keeps only
# GELU's input (models/blocks.py gelu_grn): res 40.2 -> 24.2 in fp32, 20.1 -> 12.1 in bf16. Attention re-measured when
# the keys and values of the image tokens and of the cond tokens were projected apart (the concatenated input is no
# longer kept): fp32 attn_image 28.1 -> 24.1, the attn_peak values of the bf16 settings 1.8-3.4 lower.
CALIBRATION: dict[tuple[str, str], Coefficients] = {
    ("fp32", "no"): Coefficients(res=24.2, res_peak=72.5, attn_image=24.1, attn_cond=12.0, attn_peak=22.6, stream=4,
                                 attn_image_frozen=20.1, attn_cond_frozen=8.0),
    ("bf16", "no"): Coefficients(res=12.1, res_peak=52.2, attn_image=26.1, attn_cond=12.0, attn_peak=14.7, stream=2,
                                 attn_image_frozen=10.1, attn_cond_frozen=4.0),
    ("bf16", "bf16"): Coefficients(res=12.1, res_peak=52.2, attn_image=18.4, attn_cond=8.0, attn_peak=13.3, stream=2,
                                   attn_image_frozen=10.1, attn_cond_frozen=4.0),
    ("fp32", "bf16"): Coefficients(res=12.2, res_peak=69.5, attn_image=19.6, attn_cond=8.0, attn_peak=12.7, stream=4,
                                   attn_image_frozen=11.4, attn_cond_frozen=4.0, weight_copy=True),
}


# ----------------------------------------------------------------------------------------------- model layout
@dataclass(frozen=True)
class Block:
    kind: str  # "C" ResBlock, "T" TimestepBlock, "A" AttnBlock
    path: str
    width: int
    c_skip: int = 0


@dataclass(frozen=True)
class Layout:
    """What the estimate needs from a Stage C: parameter counts and the blocks in call order."""

    blocks: tuple[Block, ...]
    linears: dict[str, tuple[int, int, bool]]  # path -> (in_features, out_features, has_bias)
    n_params: int
    c_cond: int
    c_clip_seq: int
    n_switches: int  # LN + 1x1 conv level switches between levels (down and up)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def cond_tokens(self, batch: int) -> int:
        """Conditioning tokens of a batch: 77 text + the pooled-text and image tokens (``c_clip_seq`` each)."""
        return batch * (COND_TOKENS_TEXT + 2 * self.c_clip_seq)


def stage_c_layout(stage_c_kwargs: dict[str, Any]) -> Layout:
    """Build Stage C on the meta device (no memory, well under a second for the 3.6B model) and read its layout."""
    import torch
    from torch import nn

    from ..models import build_stage_c
    from ..models.blocks import AttnBlock, ResBlock

    with torch.device("meta"):
        model = build_stage_c(**stage_c_kwargs)
    blocks: list[Block] = []
    for side in ("down_blocks", "up_blocks"):
        for li, level in enumerate(getattr(model, side)):
            for bi, block in enumerate(level):
                path = f"{side}.{li}.{bi}"
                if isinstance(block, ResBlock):
                    width = block.depthwise.in_channels
                    blocks.append(Block("C", path, width, block.channelwise[0].in_features - width))
                elif isinstance(block, AttnBlock):
                    blocks.append(Block("A", path, block.attention.attn.to_q.in_features))
                else:
                    blocks.append(Block("T", path, blocks[-1].width if blocks else 0))
    linears = {name: (m.in_features, m.out_features, m.bias is not None)
               for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    n_params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    switches = list(model.down_downscalers) + list(model.up_upscalers)
    n_switches = sum(1 for m in switches if not isinstance(m, nn.Identity))
    return Layout(tuple(blocks), linears, n_params, c_cond=model.clip_txt_mapper.out_features,
                  c_clip_seq=model.c_clip_seq, n_switches=n_switches)


# --------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setup:
    """The recipe settings that decide memory (everything else is irrelevant to the estimate).

    ``adapter`` is the recipe's section of its method (``adapter.<method>``, e.g. a ``LoraConfig``); ``method``
    the catalog name of that method, found from the section's class when not given. What the adapter adds to the
    plan comes from its method's ``plan_adapter`` hook (see :class:`PlannedAdapter`).
    """

    adapter: Any
    method: str = ""
    stage_c: dict[str, Any] = field(default_factory=dict)
    preset: str = "big"
    batch_size: int = 1
    grad_accum: int = 1
    latent_h: int = 24
    latent_w: int = 24
    dtype: str = "bf16"
    mixed_precision: str = "bf16"
    checkpointing: str = "none"  # none, blocks or selective (models/checkpointing.py)
    quantize_base: str = "none"
    optimizer: str = "adamw8bit"
    device: str = "cuda"
    global_batch: bool = False  # the recipe sets train.global_batch: a smaller batch keeps it by itself

    def __post_init__(self) -> None:
        if not self.method:
            object.__setattr__(self, "method", _method_of_section(self.adapter).name)

    @property
    def tokens(self) -> int:
        """Image tokens of one batch (batch x latent height x latent width)."""
        return self.batch_size * self.latent_h * self.latent_w

    @property
    def record(self) -> Any:
        """The catalog record of the method (``catalog.Method``)."""
        from ..adapters import catalog

        return catalog.get(self.method)

    @classmethod
    def from_recipe(cls, recipe: Any, device: str = "cuda") -> "Setup":
        from ..adapters import catalog
        from ..config.schema import accumulation
        from ..models import get_preset

        preset = recipe.model.preset
        side = recipe.data.resolution // LATENT_STRIDE
        return cls(adapter=catalog.method_section(recipe), method=catalog.recipe_method(recipe).name,
                   stage_c=dict(get_preset(preset).stage_c), preset=preset,
                   batch_size=recipe.train.batch_size, grad_accum=accumulation(recipe.train, 1), latent_h=side,
                   latent_w=side, dtype=recipe.model.dtype, mixed_precision=recipe.train.mixed_precision,
                   checkpointing=recipe.train.checkpointing_mode,
                   quantize_base=recipe.train.quantize_base, optimizer=recipe.optimizer.name, device=device,
                   global_batch=recipe.train.global_batch is not None)


def _method_of_section(section: Any) -> Any:
    from ..adapters import catalog

    for method in catalog.methods():
        if isinstance(section, method.config):
            return method
    raise ValueError(f"{type(section).__name__} is no registered adapter method's recipe section; pass the "
                     "recipe's adapter.<method> section (e.g. the catalog record's config class)")


# --------------------------------------------------------------------------------------- the method's part
@dataclass(frozen=True)
class PlannedAdapter:
    """What one adapter adds to the plan, as its method's ``plan_adapter(section, layout, setup)`` hook says.

    ``trainable``: element counts of its trainable tensors, each held in fp32 with an fp32 gradient and the
    optimizer's state; ``frozen_bytes``: its resident tensors that do not train (a frozen ControlNet backbone,
    BatchNorm statistics). ``touches``: the Stage C module or block paths whose output it changes: blocks before
    the first of them need no gradient and keep nothing. ``keeps_attention_inputs``: its layers wrap the
    attention projections, so every grad-needing attention block keeps their inputs (the calibrated
    ``attn_image`` / ``attn_cond``; otherwise ``attn_image_frozen`` / ``attn_cond_frozen``). ``block_saved``:
    bytes it keeps for the backward pass inside a block (block path -> bytes) on top of the block's own.
    ``own_saved``: bytes its own network keeps for the backward outside Stage C (never checkpointed);
    ``own_forward``: its transient above that while its own forward runs, before Stage C's; ``own_peak``: its
    transient above ``own_saved`` while its own backward runs, after Stage C's. ``note`` describes it
    in the printout; ``smaller`` is an optional switch that shrinks it (for a LoRA: halve the rank).
    """

    trainable: tuple[int, ...]
    touches: tuple[str, ...]
    note: str
    frozen_bytes: int = 0
    keeps_attention_inputs: bool = False
    block_saved: dict[str, float] = field(default_factory=dict)
    own_saved: float = 0.0
    own_forward: float = 0.0
    own_peak: float = 0.0
    smaller: "Switch | None" = None

    @property
    def n_trainable(self) -> int:
        return sum(self.trainable)


def plan_adapter(layout: Layout, setup: Setup) -> PlannedAdapter:
    """The adapter's part of the plan, from its method's ``plan_adapter`` hook."""
    record = setup.record
    hook = record.hook("plan_adapter")
    if hook is None:
        raise ValueError(f"the planner does not model {record.label} recipes yet (the {record.label} method has no "
                         "plan_adapter hook); its frozen base, adapter weights and optimizer state are printed when "
                         "its run starts")
    return hook(setup.adapter, layout, setup)


def coefficients(setup: Setup) -> Coefficients:
    """The calibrated per-block coefficients of ``setup``'s precision (model dtype x autocast)."""
    return CALIBRATION[(setup.dtype, setup.mixed_precision)]


# ---------------------------------------------------------------------------------------------------- estimate
@dataclass
class MemoryPlan:
    """Predicted peak in bytes, part by part (insertion order = print order)."""

    setup: Setup
    parts: dict[str, int]
    notes: dict[str, str]
    n_params: int
    n_trainable: int
    adapter: PlannedAdapter

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def peak_without_workspace(self) -> int:
        """The tensor bytes alone (what a CPU measurement sees)."""
        return self.peak - self.parts.get("workspace/CUDA context", 0)


def frozen_weight_bytes(layout: Layout, setup: Setup) -> int:
    """Stage C parameters in the model dtype, the quantized Linears in bitsandbytes' int8/NF4 layouts."""
    import re

    from .quantize import DEFAULT_SKIP

    element = BYTES[setup.dtype]
    if setup.quantize_base == "none":
        return layout.n_params * element
    skip = [re.compile(p) for p in DEFAULT_SKIP]
    total = layout.n_params * element
    for name, (fan_in, fan_out, _) in layout.linears.items():
        if any(p.fullmatch(name) for p in skip):
            continue
        weights = fan_in * fan_out
        if setup.quantize_base == "bf16":
            quantized = 2 * weights
        elif setup.quantize_base == "int8":
            quantized = weights + 4 * fan_out  # int8 values + one fp32 scale per output row
        else:
            blocks = math.ceil(weights / NF4_BLOCK)
            quantized = weights // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK)  # 4-bit + nested absmax
        total += quantized - weights * element
    return total


def optimizer_state_bytes(sizes: Sequence[int], name: str) -> int:
    from .optim import MIN_8BIT_SIZE

    total = 0
    for n in sizes:
        if name in ("adamw8bit", "lion8bit") and n >= MIN_8BIT_SIZE:
            states = 2 if name == "adamw8bit" else 1
            total += states * (n + 4 * math.ceil(n / OPTIMIZER_8BIT_BLOCK))
        elif name == "lion8bit":
            total += 4 * n
        elif name == "adafactor":
            side = int(math.sqrt(n))  # factored second moment: about one row and one column per matrix
            total += 4 * 2 * side
        else:
            total += 8 * n + 4  # two fp32 moments, plus torch's fp32 step counter per tensor
    return total


def activation_bytes(layout: Layout, setup: Setup, planned: PlannedAdapter | None = None) -> int:
    """Peak activation bytes of one forward+backward (see the module docstring for the model)."""
    planned = planned or plan_adapter(layout, setup)
    coef = coefficients(setup)
    tokens = setup.tokens
    cond = layout.cond_tokens(setup.batch_size)
    first = _first_grad_block(layout, planned.touches)

    saved: list[float] = []  # per block: bytes kept for backward when not checkpointing
    peak_extra: list[float] = []  # per block: transient above its saved bytes during its own backward
    for index, block in enumerate(layout.blocks):
        if index < first:
            saved.append(0.0)
            peak_extra.append(0.0)
            continue
        c = block.width
        copies = 0.0
        if coef.weight_copy:
            copies = 2.0 * sum(i * o for name, (i, o, _) in layout.linears.items() if name.startswith(block.path + "."))
        extra = planned.block_saved.get(block.path, 0.0)
        if block.kind == "C":
            # The skip concatenation widens the first Linear's input: part of it is kept like the image path.
            saved.append(coef.res * c * tokens * (1 + block.c_skip / (4 * c)) + extra + copies)
            peak_extra.append((coef.res_peak - coef.res) * c * tokens)
        elif block.kind == "A":
            a_image, a_cond = ((coef.attn_image, coef.attn_cond) if planned.keeps_attention_inputs
                               else (coef.attn_image_frozen, coef.attn_cond_frozen))
            saved.append(a_image * c * tokens + a_cond * c * cond + extra + copies)
            peak_extra.append(coef.attn_peak * c * tokens)
        else:
            saved.append(extra + copies)
            peak_extra.append(0.0)
    width = layout.blocks[0].width if layout.blocks else 0
    # The loss (x0, noise, x_t, prediction and their fp32 copies), the conditioning tokens and each level switch
    # (LayerNorm input + its fp32 conv input).
    misc = 8 * 16 * tokens * 4 + 2 * cond * layout.c_cond * coef.stream
    misc += layout.n_switches * (coef.stream + 4) * width * tokens
    if setup.checkpointing == "none":
        head = 2 * coef.stream * width * tokens  # the output head's LayerNorm and conv inputs
        return _with_own_network(sum(saved) + max(peak_extra, default=0.0) + misc + head, misc, planned)
    # Checkpointing keeps what each grad-needing block keeps between its forward and its backward (``blocks``: its
    # input; ``selective``: see kept_by_checkpoint). The backward runs the blocks last to first: while block k
    # recomputes its activations and runs its own backward (its standalone forward+backward peak, whose output and
    # input gradient stand for the incoming and outgoing gradients), what blocks 0..k-1 keep is still held and
    # what those after k (and the output head) kept is already freed.
    worst = 0.0
    kept = 0.0
    for index, (block, s_k, p_k) in enumerate(zip(layout.blocks, saved, peak_extra)):
        if index < first:
            continue
        block_input = coef.stream * block.width * tokens
        worst = max(worst, kept + block_input + s_k + p_k)
        kept += kept_by_checkpoint(block, setup, tokens, cond, s_k, planned.block_saved.get(block.path, 0.0))
    return _with_own_network(worst + misc, misc, planned)


# Outputs of each op class inside one block (models/blocks.py), as (per image token, per cond token) counts of
# block-wide tensors: what ``selective`` keeps when the block kind's policy (models/checkpointing.py
# SELECTIVE_POLICY) names the class. ResBlock: channelwise.0 (4c; channelwise.4's contracting output is not kept),
# the depthwise conv; AttnBlock (self-attention: keys and values cover image and cond tokens): to_q, to_k, to_v and
# out_proj over image tokens, kv_mapper, to_k and to_v over cond tokens, the attention output. A LoRA's A and B
# outputs are recomputed (checkpointing._matmul_kept); its rank-wide A outputs, the adapter's ``block_saved``, are
# still counted (rank / width of a kept output: a slight overestimate).
OP_OUTPUTS: dict[str, dict[str, tuple[float, float]]] = {
    "C": {"matmul": (4, 0), "conv": (1, 0)},
    "A": {"matmul": (4, 3), "attention": (1, 0)},
    "T": {},
}


def kept_by_checkpoint(block: Block, setup: Setup, tokens: int, cond: int, saved: float, extra: float) -> float:
    """Bytes a grad-needing block keeps from its forward to its backward under ``setup.checkpointing``.

    ``blocks``: its input. ``selective``: a block its policy checkpoints keeps its input, the outputs of the op
    classes the policy saves (in the compute dtype: bf16 under autocast) and what the adapter keeps in it
    (``extra``); a block its policy leaves alone keeps what it keeps without checkpointing (``saved``).
    """
    from ..models.checkpointing import SELECTIVE_POLICY

    coef = coefficients(setup)
    block_input = coef.stream * block.width * tokens
    if setup.checkpointing == "blocks":
        return block_input
    policy = SELECTIVE_POLICY[block.kind]
    if not policy.checkpoint:
        return saved
    compute = 2 if setup.mixed_precision == "bf16" else BYTES[setup.dtype]
    outputs = OP_OUTPUTS[block.kind]
    per_image = sum(outputs.get(op, (0, 0))[0] for op in policy.save)
    per_cond = sum(outputs.get(op, (0, 0))[1] for op in policy.save)
    return block_input + compute * block.width * (per_image * tokens + per_cond * cond) + extra


def _with_own_network(stage_c: float, misc: float, planned: PlannedAdapter) -> int:
    """Add the adapter's own network (a ControlNet): its saved activations live through Stage C's whole backward;
    its forward runs before Stage C's and its backward after it (its nodes were recorded first), each beside only
    the loss part and its own saved tensors."""
    if not (planned.own_saved or planned.own_forward or planned.own_peak):
        return int(stage_c)
    own = planned.own_saved + max(planned.own_forward, planned.own_peak)
    return int(max(stage_c + planned.own_saved, misc + own))


def _first_grad_block(layout: Layout, touches: Sequence[str]) -> int:
    """Index of the first block whose output depends on the adapter (earlier blocks need no gradient)."""
    for index, block in enumerate(layout.blocks):
        if any(t == block.path or t.startswith(block.path + ".") for t in touches):
            return index
    return 0  # paths outside the blocks (the clip mappers) feed every block


def plan_memory(setup: Setup, layout: Layout | None = None) -> MemoryPlan:
    """The predicted peak of one training step of ``setup`` (see the module docstring)."""
    layout = layout or stage_c_layout(setup.stage_c)
    planned = plan_adapter(layout, setup)
    n_trainable = planned.n_trainable
    activations = activation_bytes(layout, setup, planned)
    quant = {"none": setup.dtype, "bf16": f"bf16 Linears (fp32 matmuls), rest {setup.dtype}",
             "int8": f"int8 Linears, rest {setup.dtype}",
             "nf4": f"NF4 Linears, rest {setup.dtype}"}[setup.quantize_base]
    parts = {
        "frozen weights": frozen_weight_bytes(layout, setup),
        "adapter weights": 4 * n_trainable + planned.frozen_bytes,
        "gradients": 4 * n_trainable,
        "optimizer state": optimizer_state_bytes(planned.trainable, setup.optimizer),
        "activations": activations,
    }
    notes = {
        "frozen weights": (f"{layout.n_params / 1e9:.2f}B" if layout.n_params >= 1e9
                           else f"{layout.n_params / 1e6:.2f}M") + f" params, {quant}",
        "adapter weights": f"{n_trainable / 1e6:.2f}M params, fp32 ({planned.note})",
        "gradients": "fp32, adapter only",
        "optimizer state": setup.optimizer,
        "activations": (f"batch {setup.batch_size}, {setup.latent_h}x{setup.latent_w} latents, "
                        f"{'bf16 autocast' if setup.mixed_precision == 'bf16' else setup.dtype}, "
                        f"{'no' if setup.checkpointing == 'none' else setup.checkpointing} checkpointing"),
    }
    if setup.device == "cuda":
        parts["workspace/CUDA context"] = int(CUDA_CONTEXT_BYTES + FRAGMENTATION * activations)
        notes["workspace/CUDA context"] = "context + cuBLAS/cuDNN workspace + 10% allocator fragmentation"
    return MemoryPlan(setup, parts, notes, layout.n_params, n_trainable, planned)


# ------------------------------------------------------------------------------------------------- suggestions
@dataclass(frozen=True)
class Switch:
    """A recipe change that lowers the peak. ``override`` is the command-line text, formatted with the setup
    after the change (``accum`` = " train.grad_accum=N" with its grad_accum, or nothing where the recipe's
    train.global_batch keeps the batch by itself; ``method`` its method name, ``adapter`` its section)."""

    override: str  # what to add to the command line / recipe
    cost: str
    apply: Callable[[Setup], Setup | None]  # None = already on / not applicable
    supersedes: str = ""  # earlier advice this one makes moot (overrides starting with it are dropped)

    def text(self, applied: Setup) -> str:
        accum = "" if applied.global_batch else f" train.grad_accum={applied.grad_accum}"
        return self.override.format(accum=accum, method=applied.method, adapter=applied.adapter)


SWITCHES: tuple[Switch, ...] = (
    # Costs measured at the mid config on CPU (benchmarks/bench_checkpointing.py): +22% and +38%.
    Switch("train.checkpointing=selective", "about 20% slower steps (recomputes norms and activations)",
           lambda s: None if s.checkpointing != "none" else replace(s, checkpointing="selective")),
    Switch("train.checkpointing=blocks", "about 40% slower steps (recomputes whole blocks)",
           lambda s: None if s.checkpointing == "blocks" else replace(s, checkpointing="blocks")),
    Switch("optimizer.name=adamw8bit", "none measurable (8-bit Adam state)",
           lambda s: None if s.optimizer in ("adamw8bit", "lion8bit", "adafactor")
           else replace(s, optimizer="adamw8bit")),
    # An fp32 model (the CPU's dtype) keeps computing in fp32 with its frozen Linears held in bf16: half their
    # bytes, each weight cast back per use (bench_lora's studio-memory); the published weights are bf16 already.
    Switch("train.quantize_base=bf16", "bf16 rounding of the frozen Linears (the published weights are bf16), "
           "computed in fp32; a few % slower steps", lambda s: None if (s.quantize_base, s.dtype) != ("none", "fp32")
           else replace(s, quantize_base="bf16")),
    Switch("model.dtype=bf16 train.mixed_precision=bf16", "bf16 rounding of the frozen base",
           lambda s: None if (s.dtype, s.mixed_precision) == ("bf16", "bf16")
           else replace(s, dtype="bf16", mixed_precision="bf16",
                        quantize_base="none" if s.quantize_base == "bf16" else s.quantize_base),
           supersedes="train.quantize_base=bf16"),  # a bf16 model holds its weights in bf16 already
    Switch("train.batch_size=1{accum}", "same effective batch, more steps per update",
           lambda s: None if s.batch_size == 1 else replace(s, batch_size=1, grad_accum=s.batch_size * s.grad_accum)),
    Switch("train.quantize_base=int8", "int8 rounding of the frozen Linears (~1% output change), slower matmuls",
           lambda s: None if s.quantize_base not in ("none", "bf16") else replace(s, quantize_base="int8"),
           supersedes="train.quantize_base="),
    Switch("train.quantize_base=nf4", "NF4 rounding of the frozen Linears (QLoRA; ~10% output change)",
           lambda s: None if s.quantize_base == "nf4" else replace(s, quantize_base="nf4"),
           supersedes="train.quantize_base="),
)  # then the adapter's own switch, if its method has one (PlannedAdapter.smaller)


@dataclass
class Advice:
    fits: bool
    applied: list[tuple[str, str, int]]  # (override, cost, predicted peak after applying it)
    final: MemoryPlan


def suggest(setup: Setup, budget: int, layout: Layout | None = None) -> Advice:
    """Apply the switches cheapest first, cumulatively, until the plan fits ``budget`` bytes (or none is left):
    :data:`SWITCHES`, then the adapter's own (``PlannedAdapter.smaller``, e.g. a smaller LoRA rank).

    A switch that would save less than 1% of the peak is not worth its cost and is passed over.
    """
    layout = layout or stage_c_layout(setup.stage_c)
    plan = plan_memory(setup, layout)
    applied: list[tuple[str, str, int]] = []
    for switch in SWITCHES + ((plan.adapter.smaller,) if plan.adapter.smaller else ()):
        while plan.peak > budget:
            changed = switch.apply(setup)
            if changed is None:
                break
            candidate = plan_memory(changed, layout)
            if plan.peak - candidate.peak < 0.01 * plan.peak:
                break
            setup, plan = changed, candidate
            text = switch.text(setup)
            applied = [item for item in applied if not (switch.supersedes and item[0].startswith(switch.supersedes))]
            if applied and applied[-1][0].split("=")[0] == text.split("=")[0]:
                # rank 16 -> 8 -> 4, or int8 -> nf4: only the last value is the advice
                applied[-1] = (text, switch.cost, plan.peak)
            else:
                applied.append((text, switch.cost, plan.peak))
    return Advice(plan.peak <= budget, applied, plan)


# ------------------------------------------------------------------------------------------------- formatting
def format_plan(plan: MemoryPlan, budget: int | None = None, advice: Advice | None = None,
                title: str = "") -> str:
    """The table ``cascade-studio plan`` prints."""
    s = plan.setup
    lines = [f"Memory plan{(' for ' + title) if title else ''}: {s.record.label} on the {s.preset} Stage C, "
             f"{s.latent_h}x{s.latent_w} latents, batch {s.batch_size} (x{s.grad_accum} accumulation), "
             f"{s.optimizer}, on {s.device}"]
    # One unit per table: MiB for the small presets (tiny, toy), GiB otherwise.
    scale, unit = (GiB, "GiB") if plan.peak >= GiB else (2**20, "MiB")
    for name, value in plan.parts.items():
        lines.append(f"  {name:<24}{value / scale:8.2f} {unit}   {plan.notes.get(name, '')}")
    lines.append(f"  {'-' * 34}")
    lines.append(f"  {'predicted peak':<24}{plan.peak / scale:8.2f} {unit}")
    if budget is None:
        return "\n".join(lines)
    if plan.peak <= budget:
        lines.append(f"Fits in {budget / GiB:.1f} GiB ({(budget - plan.peak) / GiB:.2f} GiB to spare).")
        return "\n".join(lines)
    lines.append(f"Does NOT fit in {budget / GiB:.1f} GiB (over by {(plan.peak - budget) / GiB:.2f} GiB).")
    if advice is not None and advice.applied:
        lines.append("Cheapest switches that make it fit, in order (each adds to the ones above):" if advice.fits
                     else "Even every switch below does not make it fit:")
        for override, cost, peak in advice.applied:
            lines.append(f"  {override:<46} -> {peak / GiB:6.2f} GiB   cost: {cost}")
        if advice.fits:
            lines.append("Add them as overrides, e.g. cascade-studio train <recipe> "
                         + " ".join(o for o, _, _ in advice.applied))
    elif advice is not None:
        lines.append("No switch is left to apply; use a smaller preset, resolution or a larger GPU.")
    return "\n".join(lines)


def plan_summary(plan: MemoryPlan, budget: int, advice: Advice | None = None) -> dict[str, Any]:
    """The plan as plain data (``cascade-studio plan --json``; the studio's Launch page reads it): bytes per part,
    the peak, the budget, whether it fits and, when it does not, the switches that would make it fit."""
    return {"recipe_method": plan.setup.method, "preset": plan.setup.preset, "device": plan.setup.device,
            "parts": dict(plan.parts), "peak": plan.peak, "budget": budget, "fits": plan.peak <= budget,
            "switches": [{"override": o, "cost": c, "peak": p} for o, c, p in (advice.applied if advice else [])],
            "switches_fit": bool(advice and advice.fits)}


# ------------------------------------------------------------------------------------------------ measurement
def measure_peak_tensor_bytes(fn: Callable[[], Any]) -> tuple[int, int]:
    """Run ``fn`` and return (peak, end) live CPU tensor bytes relative to its start.

    From ``torch.profiler`` memory events (every CPU allocation/free, kernel temporaries included) summed in
    time order; see the module docstring for why not RSS.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(prof.profiler.kineto_results.events())
                    if e.name() == "[memory]")
    live = peak = 0
    for _, _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


# --------------------------------------------------------------------------------- every method, at run start
@dataclass(frozen=True)
class ResidentMemory:
    """What a run keeps on the accelerator for its whole length, before any activation: the frozen base as
    loaded (quantized layers at their packed size), and per trainable parameter its fp32 weight, its gradient
    and the optimizer's state. Measured on the built modules, so it covers every method (LoRA, ControlNet,
    IP-Adapter) exactly; activations come on top (``cascade-studio plan`` models them for every method whose
    folder has a planner hook)."""

    base: int
    trainable: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.base + self.trainable + self.gradients + self.optimizer


def resident_memory(stage_c: Any, trainable: Sequence[Any], optimizer: str) -> ResidentMemory:
    from .quantize import quantized_bytes

    params = [p for p in trainable]
    weights = sum(p.numel() * p.element_size() for p in params)
    return ResidentMemory(base=quantized_bytes(stage_c), trainable=weights, gradients=weights,
                          optimizer=optimizer_state_bytes([p.numel() for p in params], optimizer))


def resident_memory_report(memory: ResidentMemory, optimizer: str, device_total: int | None,
                           quantize_base: str = "none", checkpointing: str = "blocks") -> tuple[str, bool]:
    """A one-line summary and whether it leaves too little room on a device of ``device_total`` bytes
    (nothing is judged without one, e.g. on the CPU); an over-budget report names the switches that help."""
    line = (f"memory before activations: frozen base {memory.base / GiB:.2f} GiB + adapter weights, gradients and "
            f"{optimizer} state {(memory.total - memory.base) / GiB:.2f} GiB = {memory.total / GiB:.2f} GiB")
    if not device_total:
        return line, False
    line += f" of this device's {device_total / GiB:.1f} GiB"
    # activations, the CUDA context and fragmentation need the rest; below ~15% headroom a run will not fit
    tight = memory.total + CUDA_CONTEXT_BYTES > 0.85 * device_total
    if not tight:
        return line, False
    switches = []
    if optimizer == "adamw":
        eight = memory.optimizer - optimizer_state_bytes([memory.trainable // 4], "adamw8bit")
        switches.append(f"optimizer.name=adamw8bit (saves about {eight / GiB:.1f} GiB)")
    if quantize_base == "none":
        switches.append("train.quantize_base=nf4 (frozen base at about a quarter of its bf16 size)")
    if checkpointing != "blocks":
        switches.append("train.checkpointing=blocks" if checkpointing == "selective"
                        else "train.checkpointing=selective (or =blocks, the least memory)")
    advice = "; ".join(switches) if switches else "a smaller preset or a GPU with more memory"
    return (f"{line}: too little is left for activations, so this run will likely run out of memory. "
            f"Try: {advice}"), True
