"""The ControlNet's part of the memory plan (``cascade-studio plan``, ``trainers/plan.py``).

``plan_adapter(section, layout, setup)`` is the method's planner hook. The ControlNet the recipe's
``adapter.controlnet`` section asks for is built on the meta device (``spec_from_config``, as a run builds it:
no memory, no weights) and

* its trainable parameters are counted exactly (a frozen backbone's parameters and every buffer are resident
  too, in ``frozen_bytes``);
* its own activations (``own_saved``) are what autograd saves during one forward of it at the recipe's hint size,
  traced on the meta device (unique storages, parameters and buffers excluded): the control image at the
  training resolution (the super-resolution hint: latents at the latent grid), downsized to ``hint_size`` for the
  simple bottleneck as ``prepare_hint`` does. Under bf16 autocast those tensors are counted at 2 bytes
  (autocast's convolutions save their bf16 inputs; meta tensors do not go through autocast themselves);
* its forward runs before Stage C's: its transient there (``own_forward``) is the most it holds while one layer
  runs (what the earlier layers saved, the layer's input and output, plus the inputs its enclosing blocks keep for
  their residual sums) above what the whole forward saves, traced with
  module hooks on the same meta forward (a frozen backbone saves nothing, but still holds those), plus a
  convolution's unfolded input where the kernel needs one (:func:`im2col_bytes`);
* its backward runs after Stage C's (its nodes were recorded first), so its transient (``own_peak``) comes when
  Stage C's activations are gone: the gradients of the residuals plus the largest input/output gradient pair of
  one of its layers;
* Stage C needs gradients from the first ResBlock that receives a residual on (``touches``); its attention
  blocks keep the frozen coefficients (nothing wraps their projections).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ...trainers.plan import Layout, PlannedAdapter, Setup

__all__ = ["plan_adapter", "hint_shape", "build_on_meta"]

HINT_STRIDE = 32  # control images come at the training resolution: 32 pixels per latent cell


def build_on_meta(section: Any, layout: Layout, setup: Setup):
    """The ControlNetAdapter a run would build for ``section`` on this Stage C, on the meta device."""
    import torch

    from .adapter import ControlNetAdapter, check_fits
    from .method import spec_from_config

    width = layout.blocks[0].width
    spec = spec_from_config(section, width, SimpleNamespace(preset=setup.preset))
    check_fits(spec, width, sum(1 for b in layout.blocks if b.kind == "C"))
    with torch.device("meta"):
        adapter = ControlNetAdapter(spec, strength=float(section.strength))
    return adapter


def hint_shape(adapter: Any, setup: Setup) -> tuple[int, int, int, int]:
    """[B, C, H, W] of the hint one training step feeds the ControlNet (after ``prepare_hint``)."""
    spec = adapter.spec
    stride = 1 if spec.control == "sr" else HINT_STRIDE
    h, w = setup.latent_h * stride, setup.latent_w * stride
    if spec.hint_size is not None and min(h, w) > spec.hint_size:
        scale = spec.hint_size / min(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
    return setup.batch_size, spec.c_in, h, w


def unfolds_convolutions(setup: Setup) -> bool:
    """Whether ``setup``'s convolutions run through PyTorch's unfold-and-multiply CPU kernel: bf16 on a CPU without
    oneDNN's bf16 support (no AVX-512), where each one first writes its whole unfolded input (im2col)."""
    import torch

    bf16 = setup.mixed_precision == "bf16" or setup.dtype == "bf16"
    return setup.device == "cpu" and bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def im2col_bytes(conv: Any, output: Any, element: int) -> int:
    """The unfolded input an unfold-and-multiply convolution writes before its matrix product:
    ``C_in/groups * kh * kw`` rows per output pixel (none for a 1x1 convolution with stride 1 and no padding,
    which multiplies its input directly; a grouped one unfolds one group at a time)."""
    kh, kw = conv.kernel_size
    if (kh, kw) == (1, 1) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) in ((0, 0), "valid"):
        return 0
    b, _, h, w = output.shape
    return element * b * (conv.in_channels // conv.groups) * kh * kw * h * w


def _traced_activations(adapter: Any, shape: tuple[int, ...], element: int,
                        unfold: bool = False) -> tuple[list[int], list[int], int]:
    """Element counts of the tensors autograd saves in one forward and of the residuals, and the forward's largest
    transient in bytes above everything it saves: while one layer runs, what the layers before it saved, its input
    and output, the inputs its enclosing modules still hold (a residual block's input, which a frozen backbone has
    although it saves nothing) and, with ``unfold`` (:func:`unfolds_convolutions`), a convolution's unfolded
    input. ``element``: bytes of an activation (2 under bf16 autocast). The hint itself is the batch's (loaded
    before the step, like the latents): only autocast's bf16 cast of it is new, and only the layer that reads it
    holds that cast (or saves it)."""
    import torch

    resident = {t.untyped_storage()._cdata for t in list(adapter.parameters()) + list(adapter.buffers())}
    saved: dict[int, int] = {}
    held: list[list[Any]] = []  # inputs of the modules running now, outermost first
    worst = [0]
    cast = element if element != 4 else 0  # bytes per element of the hint's autocast copy

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in resident and t.is_floating_point():
            saved.setdefault(storage._cdata, storage.nbytes() // t.element_size())
        return t

    def tensors(values) -> list[Any]:
        return [t for t in values if torch.is_tensor(t)]

    def enter(module, inputs):
        held.append(tensors(inputs))

    def leave(module, inputs, output):
        held.pop()
        if list(module.children()):
            return
        live = {key: element * count for key, count in saved.items()}
        for t in [t for level in held for t in level if t is not hint]:
            live[t.untyped_storage()._cdata] = element * t.numel()
        for t in tensors(inputs) + tensors((output,)):
            live[t.untyped_storage()._cdata] = (cast if t is hint else element) * t.numel()
        workspace = im2col_bytes(module, output, element) if unfold and isinstance(module, torch.nn.Conv2d) else 0
        worst[0] = max(worst[0], sum(live.values()) + workspace)

    handles = [h for m in adapter.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    hint = torch.zeros(shape, device="meta")
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            residuals = adapter.residuals(hint)
    finally:
        for handle in handles:
            handle.remove()
    return (list(saved.values()), [r.numel() for r in residuals if r is not None],
            max(0, worst[0] - element * sum(saved.values())))


def plan_adapter(section: Any, layout: Layout, setup: Setup) -> PlannedAdapter:
    """What a ControlNet of ``section`` adds to the plan of ``setup`` (see the module docstring)."""
    adapter = build_on_meta(section, layout, setup)
    trainable = adapter.trainable_parameters()
    ids = {id(p) for p in trainable}
    frozen = sum(t.numel() * t.element_size() for t in list(adapter.parameters()) + list(adapter.buffers())
                 if id(t) not in ids)
    element = 2 if setup.mixed_precision == "bf16" else 4
    saved, residuals, layer_io = _traced_activations(adapter, hint_shape(adapter, setup), element,
                                                     unfolds_convolutions(setup))
    resblocks = [b.path for b in layout.blocks if b.kind == "C"]  # call order = layout order (no repeats)
    spec = adapter.spec
    note = (f"{spec.bottleneck} ControlNet, {spec.control}, {len(spec.proj_blocks)} residuals"
            + (", frozen backbone" if spec.freeze_backbone else ""))
    return PlannedAdapter(
        trainable=tuple(p.numel() for p in trainable), touches=(resblocks[min(spec.proj_blocks)],), note=note,
        frozen_bytes=frozen, own_saved=float(element * sum(saved)), own_forward=float(layer_io),
        own_peak=float(4 * sum(residuals) + 2 * element * max(saved, default=0)))
