"""Predict a LoRA run's peak accelerator memory before loading anything, and say which switches make it fit.

Parts of the peak (each printed by ``cascade-studio plan``):

* **frozen weights**: Stage C's parameters in ``model.dtype``, or bitsandbytes int8/NF4 for the quantized
  Linears (``train.quantize_base``). Counted on the meta device: the 3.6B model "builds" in a fraction of a
  second and allocates nothing.
* **adapter weights**, **gradients**: LoRA matrices, fp32 (the adapter keeps them fp32 on a bf16 base).
* **optimizer state**: AdamW 8 bytes per parameter; bitsandbytes' 8-bit AdamW 2 bytes plus one fp32 absmax per
  256-value block per state (tensors under ``optim.MIN_8BIT_SIZE`` values keep 32-bit state).
* **activations**: what autograd keeps for the backward pass at the recipe's batch and latent size, plus the
  largest transient while one block runs its backward. Analytic per block, in bytes per element of one
  ``[tokens x width]`` tensor (tokens = batch x h x w; cond tokens = batch x (77 text + 4 pooled + 4 image)):
  a ResBlock keeps ``res`` (fp32: 40 bytes = ten such tensors: conv and LayerNorm inputs, the 4x-wide Linear
  output and GELU output), an attention block with LoRA on q/k/v/out keeps ``attn_image`` per image token and
  ``attn_cond`` per cond token (keys, values and the LoRA inputs over them) plus the LoRA-A outputs,
  TimestepBlocks keep nothing large. Blocks that run before the first LoRA need no gradient and keep nothing. Attention is assumed to run in SDPA's flash or
  memory-efficient kernels (no ``tokens x tokens`` matrix is kept), which is what Stage C's
  ``F.scaled_dot_product_attention`` gets on CUDA and on CPU without dropout. With gradient checkpointing each
  block keeps only its input, and one block at a time holds its full activations during its backward.
  The coefficients per precision (``CALIBRATION``) were measured on CPU by ``benchmarks/calibrate_plan.py`` on
  single blocks; ``tests/test_plan.py`` checks the whole-model prediction against measured peaks of three sizes.
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
    values (image + cond tokens); ``attn_peak``: its backward transient above its saved activations;
    ``stream``: the residual stream's element size (block inputs kept under checkpointing);
    ``weight_copy``: each grad-needing block also keeps a bf16 copy of its frozen Linear weights.
    """

    res: float
    res_peak: float
    attn_image: float
    attn_cond: float
    attn_peak: float
    stream: float
    weight_copy: bool = False


# Measured with benchmarks/calibrate_plan.py (CPU, torch 2.14, single blocks with LoRA rank 8 on q/k/v/out,
# widths 128 and 256: the coefficients agree across widths to 1%, attn_peak to 15%). Keys: (model.dtype,
# train.mixed_precision). On a bf16 base without autocast PEFT casts each LoRA input to fp32 and keeps that copy
# (attn_image/attn_cond grow). Autocast over an fp32 base keeps the bf16 cast of every frozen weight used after the
# first LoRA for the backward pass (weight_copy): in effect a second, bf16 copy of the model.
CALIBRATION: dict[tuple[str, str], Coefficients] = {
    ("fp32", "no"): Coefficients(res=40.2, res_peak=104.2, attn_image=28.1, attn_cond=12.0, attn_peak=22.6, stream=4),
    ("bf16", "no"): Coefficients(res=20.1, res_peak=52.1, attn_image=26.1, attn_cond=12.0, attn_peak=17.3, stream=2),
    ("bf16", "bf16"): Coefficients(res=20.1, res_peak=52.1, attn_image=18.4, attn_cond=8.0, attn_peak=15.0, stream=2),
    ("fp32", "bf16"): Coefficients(res=20.1, res_peak=69.1, attn_image=19.6, attn_cond=8.0, attn_peak=16.1, stream=4,
                                   weight_copy=True),
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
    """The recipe settings that decide memory (everything else is irrelevant to the estimate)."""

    stage_c: dict[str, Any] = field(default_factory=dict)
    preset: str = "big"
    batch_size: int = 1
    grad_accum: int = 1
    latent_h: int = 24
    latent_w: int = 24
    dtype: str = "bf16"
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    quantize_base: str = "none"
    optimizer: str = "adamw8bit"
    rank: int = 16
    lora_type: str = "lora"
    targets: tuple[str, ...] = ("attention",)
    device: str = "cuda"

    @classmethod
    def from_recipe(cls, recipe: Any, device: str = "cuda") -> "Setup":
        from ..models import get_preset

        if recipe.adapter.method != "lora":
            raise ValueError(f"the planner models LoRA recipes; adapter.method={recipe.adapter.method} is not "
                             "modelled yet (its own network's activations are not in the estimate)")
        preset = recipe.model.preset
        side = recipe.data.resolution // LATENT_STRIDE
        lora = recipe.adapter.lora
        return cls(stage_c=dict(get_preset("tiny" if preset == "toy" else preset).stage_c), preset=preset,
                   batch_size=recipe.train.batch_size, grad_accum=recipe.train.grad_accum, latent_h=side,
                   latent_w=side, dtype=recipe.model.dtype, mixed_precision=recipe.train.mixed_precision,
                   gradient_checkpointing=recipe.train.gradient_checkpointing,
                   quantize_base=recipe.train.quantize_base, optimizer=recipe.optimizer.name, rank=lora.rank,
                   lora_type=lora.type, targets=tuple(lora.targets), device=device)


# ---------------------------------------------------------------------------------------------------- estimate
@dataclass
class MemoryPlan:
    """Predicted peak in bytes, part by part (insertion order = print order)."""

    setup: Setup
    parts: dict[str, int]
    notes: dict[str, str]
    n_params: int
    n_trainable: int

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def peak_without_workspace(self) -> int:
        """The tensor bytes alone (what a CPU measurement sees)."""
        return self.peak - self.parts.get("workspace/CUDA context", 0)


def lora_tensor_sizes(layout: Layout, setup: Setup) -> list[int]:
    """Element counts of every trainable LoRA tensor (analytic for lora/loha; PEFT on meta for dora/lokr)."""
    from ..adapters.lora.adapter import resolve_target_modules

    targets = _target_paths(layout, setup)
    if setup.lora_type == "lora":
        return [n for t in targets for n in (setup.rank * layout.linears[t][0], setup.rank * layout.linears[t][1])]
    if setup.lora_type == "loha":
        return [n for t in targets for n in (setup.rank * layout.linears[t][0], setup.rank * layout.linears[t][1])
                for _ in range(2)]
    import torch

    from ..adapters.lora import LoraAdapter, LoraSpec
    from ..models import build_stage_c

    with torch.device("meta"):
        model = build_stage_c(**setup.stage_c)
    model.requires_grad_(False)
    adapter = LoraAdapter(LoraSpec(rank=setup.rank, type=setup.lora_type, targets=setup.targets),
                          target_modules=resolve_target_modules(model, setup.targets))
    adapter.attach(model)
    return [p.numel() for p in adapter.trainable_parameters()]


def _target_paths(layout: Layout, setup: Setup) -> list[str]:
    import re

    from ..adapters.lora.adapter import TARGET_GROUPS

    chosen: list[str] = []
    for target in setup.targets:
        pattern = re.compile(TARGET_GROUPS[target]) if target in TARGET_GROUPS else None
        for name in layout.linears:
            hit = pattern.fullmatch(name) if pattern else (name == target or name.endswith("." + target))
            if hit and name not in chosen:
                chosen.append(name)
    if not chosen:
        raise ValueError(f"LoRA targets {list(setup.targets)} match no Linear of this Stage C")
    return chosen


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
        if setup.quantize_base == "int8":
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


def activation_bytes(layout: Layout, setup: Setup) -> int:
    """Peak activation bytes of one forward+backward (see the module docstring for the model)."""
    coef = CALIBRATION[(setup.dtype, setup.mixed_precision)]
    batch = setup.batch_size
    tokens = batch * setup.latent_h * setup.latent_w
    cond = batch * (COND_TOKENS_TEXT + 2 * layout.c_clip_seq)
    targets = _target_paths(layout, setup)
    lora_element = 2 if setup.mixed_precision == "bf16" else 4
    first = _first_grad_block(layout, targets)

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
        if block.kind == "C":
            # The skip concatenation widens the first Linear's input: part of it is kept like the image path.
            saved.append(coef.res * c * tokens * (1 + block.c_skip / (4 * c)) + copies)
            peak_extra.append((coef.res_peak - coef.res) * c * tokens)
        elif block.kind == "A":
            lora_rows = sum(setup.rank for t in targets if t.startswith(block.path + "."))
            saved.append(coef.attn_image * c * tokens + coef.attn_cond * c * cond
                         + lora_element * lora_rows * (tokens + cond / 2) + copies)
            peak_extra.append(coef.attn_peak * c * tokens)
        else:
            saved.append(copies)
            peak_extra.append(0.0)
    width = layout.blocks[0].width if layout.blocks else 0
    # The loss (x0, noise, x_t, prediction and their fp32 copies), the conditioning tokens and each level switch
    # (LayerNorm input + its fp32 conv input).
    misc = 8 * 16 * tokens * 4 + 2 * cond * layout.c_cond * coef.stream
    misc += layout.n_switches * (coef.stream + 4) * width * tokens
    if not setup.gradient_checkpointing:
        head = 2 * coef.stream * width * tokens  # the output head's LayerNorm and conv inputs
        return int(sum(saved) + max(peak_extra, default=0.0) + misc + head)
    # Checkpointing keeps every grad-needing block's input. The backward runs the blocks last to first: while
    # block k recomputes its activations and runs its own backward (its standalone forward+backward peak, whose
    # output and input gradient stand for the incoming and outgoing gradients), the inputs of blocks 0..k are
    # still held and those after k (and the output head's) are already freed.
    worst = 0.0
    kept = 0.0
    for index, (block, s_k, p_k) in enumerate(zip(layout.blocks, saved, peak_extra)):
        if index < first:
            continue
        kept += coef.stream * block.width * tokens
        worst = max(worst, kept + s_k + p_k)
    return int(worst + misc)


def _first_grad_block(layout: Layout, targets: Sequence[str]) -> int:
    """Index of the first block whose output depends on a LoRA (earlier blocks need no gradient)."""
    for index, block in enumerate(layout.blocks):
        if any(t.startswith(block.path + ".") for t in targets):
            return index
    return 0  # targets outside the blocks (clip mappers) feed every attention block


def plan_memory(setup: Setup, layout: Layout | None = None) -> MemoryPlan:
    """The predicted peak of one training step of ``setup`` (see the module docstring)."""
    layout = layout or stage_c_layout(setup.stage_c)
    sizes = lora_tensor_sizes(layout, setup)
    n_trainable = sum(sizes)
    activations = activation_bytes(layout, setup)
    quant = {"none": setup.dtype, "int8": f"int8 Linears, rest {setup.dtype}",
             "nf4": f"NF4 Linears, rest {setup.dtype}"}[setup.quantize_base]
    parts = {
        "frozen weights": frozen_weight_bytes(layout, setup),
        "adapter weights": 4 * n_trainable,
        "gradients": 4 * n_trainable,
        "optimizer state": optimizer_state_bytes(sizes, setup.optimizer),
        "activations": activations,
    }
    notes = {
        "frozen weights": (f"{layout.n_params / 1e9:.2f}B" if layout.n_params >= 1e9
                           else f"{layout.n_params / 1e6:.2f}M") + f" params, {quant}",
        "adapter weights": f"{n_trainable / 1e6:.2f}M params, fp32 ({setup.lora_type} rank {setup.rank})",
        "gradients": "fp32, adapter only",
        "optimizer state": setup.optimizer,
        "activations": (f"batch {setup.batch_size}, {setup.latent_h}x{setup.latent_w} latents, "
                        f"{'bf16 autocast' if setup.mixed_precision == 'bf16' else setup.dtype}, "
                        f"{'checkpointing' if setup.gradient_checkpointing else 'no checkpointing'}"),
    }
    if setup.device == "cuda":
        parts["workspace/CUDA context"] = int(CUDA_CONTEXT_BYTES + FRAGMENTATION * activations)
        notes["workspace/CUDA context"] = "context + cuBLAS/cuDNN workspace + 10% allocator fragmentation"
    return MemoryPlan(setup, parts, notes, layout.n_params, n_trainable)


# ------------------------------------------------------------------------------------------------- suggestions
@dataclass(frozen=True)
class Switch:
    override: str  # what to add to the command line / recipe
    cost: str
    apply: Callable[[Setup], Setup | None]  # None = already on / not applicable


def _halve_rank(s: Setup) -> Setup | None:
    return replace(s, rank=s.rank // 2) if s.rank > 4 else None


SWITCHES: tuple[Switch, ...] = (
    Switch("train.gradient_checkpointing=true", "about 30% slower steps",
           lambda s: None if s.gradient_checkpointing else replace(s, gradient_checkpointing=True)),
    Switch("optimizer.name=adamw8bit", "none measurable (8-bit Adam state)",
           lambda s: None if s.optimizer in ("adamw8bit", "lion8bit", "adafactor")
           else replace(s, optimizer="adamw8bit")),
    Switch("model.dtype=bf16 train.mixed_precision=bf16", "bf16 rounding of the frozen base",
           lambda s: None if (s.dtype, s.mixed_precision) == ("bf16", "bf16")
           else replace(s, dtype="bf16", mixed_precision="bf16")),
    Switch("train.batch_size=1 train.grad_accum={accum}", "same effective batch, more steps per update",
           lambda s: None if s.batch_size == 1 else replace(s, batch_size=1, grad_accum=s.batch_size * s.grad_accum)),
    Switch("train.quantize_base=int8", "int8 rounding of the frozen Linears (~1% output change), slower matmuls",
           lambda s: None if s.quantize_base != "none" else replace(s, quantize_base="int8")),
    Switch("train.quantize_base=nf4", "NF4 rounding of the frozen Linears (QLoRA; ~10% output change)",
           lambda s: None if s.quantize_base == "nf4" else replace(s, quantize_base="nf4")),
    Switch("adapter.lora.rank={rank}", "less adapter capacity", _halve_rank),
)


@dataclass
class Advice:
    fits: bool
    applied: list[tuple[str, str, int]]  # (override, cost, predicted peak after applying it)
    final: MemoryPlan


def suggest(setup: Setup, budget: int, layout: Layout | None = None) -> Advice:
    """Apply the switches cheapest first, cumulatively, until the plan fits ``budget`` bytes (or none is left).

    A switch that would save less than 1% of the peak is not worth its cost and is passed over.
    """
    layout = layout or stage_c_layout(setup.stage_c)
    plan = plan_memory(setup, layout)
    applied: list[tuple[str, str, int]] = []
    for switch in SWITCHES:
        while plan.peak > budget:
            changed = switch.apply(setup)
            if changed is None:
                break
            candidate = plan_memory(changed, layout)
            if plan.peak - candidate.peak < 0.01 * plan.peak:
                break
            setup, plan = changed, candidate
            text = switch.override.format(accum=setup.grad_accum, rank=setup.rank)
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
    lines = [f"Memory plan{(' for ' + title) if title else ''}: LoRA on the {s.preset} Stage C, "
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
    IP-Adapter) exactly; activations come on top (``cascade-studio plan`` models them for LoRA)."""

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
                           quantize_base: str = "none", gradient_checkpointing: bool = True) -> tuple[str, bool]:
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
    if not gradient_checkpointing:
        switches.append("train.gradient_checkpointing=true")
    advice = "; ".join(switches) if switches else "a smaller preset or a GPU with more memory"
    return (f"{line}: too little is left for activations, so this run will likely run out of memory. "
            f"Try: {advice}"), True
