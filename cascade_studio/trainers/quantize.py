"""Quantize the frozen Stage C's Linear layers with bitsandbytes (QLoRA-style: int8 or NF4 base, fp32 adapter), or
hold them in bf16 (``bf16``: no bitsandbytes; see :class:`Bf16StoredLinear`).

Only the frozen base is quantized; adapter weights stay in fp32 and train through the quantized layers. PEFT has
LoRA layers made for bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` (they dequantize for merge/unmerge and cast
inputs correctly); it picks them when the model carries ``is_loaded_in_8bit`` / ``is_loaded_in_4bit`` (the
attributes transformers sets), so :func:`quantize_frozen_linears` sets those too. Quantize **before** attaching
adapters.

Device support differs by bitsandbytes release and device: :func:`check_quantization_supported` runs a tiny
forward and backward through a quantized layer on the target device and turns any failure into one clear error
that names the recipe switch, so a run fails at its start rather than after the data cache is built.
"""
from __future__ import annotations

import copy
import logging
import re
from typing import Iterable

import torch
from torch import nn

MODES = ("none", "bf16", "int8", "nf4")
# Kept in the model dtype: the TimestepBlock mappers (r -> scale/shift of every block) and the CLIP mappers
# (the conditioning tokens every attention reads). Together about 2% of the big Stage C's parameters, and every
# block's output depends on them, so their rounding error would reach everything.
DEFAULT_SKIP = (r"(.+\.)?mapper(_\w+)?", r"clip_(txt|txt_pooled|img)_mapper")
# How many layers quantize_frozen_linears replaces between two torch.cuda.empty_cache() calls (each call costs a
# device sync; the big Stage C has about 900 Linears).
EMPTY_CACHE_EVERY = 32
# bitsandbytes' blockwise 4-bit layout: one absmax per 64 weights (QLoRA's NF4 default), double-quantized.
NF4_BLOCKSIZE = 64


class _CastWeightLinear(torch.autograd.Function):
    """``linear(x, weight, bias)`` with the frozen ``weight`` cast to ``x``'s dtype inside the node: the backward
    pass keeps the stored (bf16) weight and casts it again, so no full-precision copy outlives the call.

    The weight is held as a plain reference, not through ``save_for_backward``: it is a frozen parameter that lives
    anyway, and a saved tensor would count as an activation for activation checkpointing, whose recomputation
    then could not stop early (it ran a ResBlock's last, contracting Linear again only to "recover" its weight:
    +15% FLOPs per step at the mid size under ``selective``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        return nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        return (grad @ ctx.weight.to(grad.dtype) if ctx.needs_input_grad[0] else None), None, None


class Bf16StoredLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is held in bf16 while the matmul runs in the input's dtype.

    ``train.quantize_base: bf16`` on an fp32 model: the frozen base takes half the memory and computes in fp32,
    exactly as the fp32 model would with bf16-rounded weights (the precision of the published ``*_bf16`` files:
    lossless on those). Under autocast the weight is used as autocast uses any weight (it casts it to the autocast
    dtype). A subclass of ``nn.Linear``, so PEFT wraps it with its ordinary LoRA layer; the bias keeps the model
    dtype. A trainable weight would need a weight gradient this layer does not compute: it is refused.
    """

    weight_is_storage_only = True  # the dtype it computes in is its input's (read by ip_adapter._compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError("Bf16StoredLinear holds a frozen weight; a trainable weight needs nn.Linear")
        if torch.is_autocast_enabled(x.device.type):
            return nn.functional.linear(x, self.weight, self.bias)
        if x.dtype == self.weight.dtype:
            return nn.functional.linear(x, self.weight, None if self.bias is None else self.bias.to(x.dtype))
        return _CastWeightLinear.apply(x, self.weight, self.bias)


def _bf16_linear(linear: nn.Linear) -> nn.Module:
    """A :class:`Bf16StoredLinear` copy of ``linear`` on the same device, frozen, in its train/eval mode."""
    has_bias = linear.bias is not None
    new = Bf16StoredLinear(linear.in_features, linear.out_features, bias=has_bias, device="meta")
    new.weight = nn.Parameter(linear.weight.data.to(torch.bfloat16), requires_grad=False)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    new.train(linear.training)
    return new


class QuantizationUnsupportedError(RuntimeError):
    """The requested ``train.quantize_base`` mode does not work with this bitsandbytes on this device."""


def _import_bnb(mode: str):
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a core dependency
        raise QuantizationUnsupportedError(
            f"train.quantize_base={mode} needs bitsandbytes: pip install bitsandbytes (or set "
            "train.quantize_base: none)") from exc
    return bnb


def _refuse_adapters(module: nn.Module) -> None:
    for name, child in module.named_modules():
        if any(part.startswith(("lora_", "hada_", "lokr_")) for part in name.split(".")) or \
                hasattr(child, "base_layer"):
            raise ValueError(f"{name or 'the model'} already carries an adapter: quantize the frozen base before "
                             "attaching adapters, so PEFT wraps the quantized layers")


_FLAT_INT8_CLASS: type | None = None


def _flat_int8_class(bnb) -> type:
    """``Linear8bitLt`` that hands bitsandbytes 2-D inputs.

    bitsandbytes 0.50's CPU int8 kernel takes row maxima over ``dim=1``, so the 4-D BHWC inputs of a ResBlock's
    ``channelwise`` layers fail (or would be scaled per wrong row). Flattening the leading dimensions is exact.
    A subclass (not a wrapper) keeps PEFT's ``isinstance(..., bnb.nn.Linear8bitLt)`` dispatch working.
    """
    global _FLAT_INT8_CLASS
    if _FLAT_INT8_CLASS is None:
        class FlatLinear8bitLt(bnb.nn.Linear8bitLt):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if x.dim() <= 2:
                    return super().forward(x)
                lead = x.shape[:-1]
                return super().forward(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)

        _FLAT_INT8_CLASS = FlatLinear8bitLt
    return _FLAT_INT8_CLASS


def _quantized_linear(linear: nn.Linear, mode: str, bnb, compute_dtype: torch.dtype | None) -> nn.Module:
    """A bitsandbytes copy of ``linear`` on the same device, frozen, in eval/train mode like the original."""
    device = linear.weight.device
    dtype = compute_dtype or linear.weight.dtype
    has_bias = linear.bias is not None
    # Built on meta: the constructors would otherwise allocate a full-precision weight only to replace it.
    if mode == "int8":
        new = _flat_int8_class(bnb)(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=0.0, device="meta")
        # Int8Params quantizes when moved off the CPU *from* the CPU (bitsandbytes 0.50); a CPU source makes that
        # true on every device. On a CPU model .cpu() is the same storage, so nothing is copied there.
        new.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False,
                                       has_fp16_weights=False).to(device)
    elif mode == "nf4":
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                                quant_type="nf4", compress_statistics=True, device="meta")
        new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                       blocksize=NF4_BLOCKSIZE, compress_statistics=True, module=new).to(device)
        # bitsandbytes 0.50 repacks a 4-bit weight for its AVX512-bf16 CPU kernel on the first eval-mode call
        # without grad (a held-out loss, a preview); the repacked weight then fails in every later call that needs
        # grad ("a view of a leaf Variable ... in-place"). The frozen base runs in eval mode during training, so
        # that path would be hit: keep the training layout.
        new.support_avx512bf16_for_cpu = False
    else:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {MODES}")
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    new.train(linear.training)
    return new


def quantize_frozen_linears(stage_c: nn.Module, mode: str, skip: Iterable[str] = DEFAULT_SKIP,
                            compute_dtype: torch.dtype | None = None) -> list[str]:
    """Replace every frozen ``nn.Linear`` of ``stage_c`` whose path does not fully match a ``skip`` pattern by
    a bitsandbytes ``Linear8bitLt`` (``int8``), an NF4 ``Linear4bit`` (``nf4``) or a :class:`Bf16StoredLinear`
    (``bf16``: only on a model held in fp32; a bf16 model has nothing to gain), in place.

    ``compute_dtype`` is the 4-bit layers' matmul dtype (default: each layer's weight dtype, i.e. the model's).
    Returns the quantized module paths; ``mode='none'`` changes nothing. Linears with trainable parameters are
    left alone. Raises ``ValueError`` if an adapter is already attached.
    """
    if mode == "none":
        return []
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {MODES}")
    bnb = None if mode == "bf16" else _import_bnb(mode)
    _refuse_adapters(stage_c)
    patterns = [re.compile(p) for p in skip]
    # Names only, then one layer at a time: a list of the modules themselves would keep every replaced
    # full-precision Linear alive until the end, so the peak would be the whole base plus its quantized copy.
    # Holding nothing but the layer being replaced lets each original be freed right after its replacement.
    # Exact type: bitsandbytes layers subclass nn.Linear and are already quantized.
    names = [name for name, module in stage_c.named_modules()
             if type(module) is nn.Linear and not any(p.fullmatch(name) for p in patterns)
             and not any(p.requires_grad for p in module.parameters())]
    done: list[str] = []
    any_cuda = False
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = stage_c.get_submodule(parent_name) if parent_name else stage_c
        original = getattr(parent, child)
        any_cuda |= original.weight.device.type == "cuda"
        if mode == "bf16" and original.weight.dtype != torch.float32:
            raise ValueError(f"train.quantize_base=bf16 holds fp32 Linear weights in bf16, and {name} is already "
                             f"{original.weight.dtype}: keep model.dtype: fp32 with it, or set quantize_base: none")
        setattr(parent, child, _bf16_linear(original) if mode == "bf16"
                else _quantized_linear(original, mode, bnb, compute_dtype))
        del original  # the last reference: the full-precision weight is freed here
        done.append(name)
        # Freed blocks stay in PyTorch's cache; hand them back now and then so bitsandbytes and other processes
        # see the lower footprint during the conversion, not only after it.
        if any_cuda and torch.cuda.is_available() and len(done) % EMPTY_CACHE_EVERY == 0:
            torch.cuda.empty_cache()
    if any_cuda and torch.cuda.is_available():
        torch.cuda.empty_cache()
    # PEFT reads these to choose its bitsandbytes LoRA layers (peft LoraModel._create_and_replace).
    stage_c.is_loaded_in_8bit = mode == "int8"
    stage_c.is_loaded_in_4bit = mode == "nf4"
    stage_c.quantize_base = mode
    if mode == "int8":
        _silence_int8_cast_notice()
    return done


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _silence_int8_cast_notice() -> None:
    """LLM.int8 quantizes every fp32/bf16 input through fp16 by design and bitsandbytes logs that on *every*
    call (thousands of lines per step); the cast is expected here, so that one message is dropped."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in logger.filters):
        logger.addFilter(_DropInt8CastNotice())


def check_quantization_supported(mode: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
    """Raise :class:`QuantizationUnsupportedError` unless ``mode`` trains on ``device`` in ``dtype``.

    The check is a real forward and backward through one quantized Linear (with a LoRA-like trainable input),
    compared with the unquantized layer: an import error, a missing kernel or a wrong result all fail it.
    """
    if mode in ("none", "bf16"):  # bf16: a dtype cast, which every device has
        return
    if mode not in MODES:
        raise QuantizationUnsupportedError(f"train.quantize_base={mode!r} is not a mode; use one of {MODES}")
    bnb = _import_bnb(mode)
    device = torch.device(device)
    other = {"int8": "nf4", "nf4": "int8"}[mode]
    advice = (f"set train.quantize_base: none (or try {other}), or train on a CUDA GPU where bitsandbytes "
              "supports both")
    generator = torch.Generator().manual_seed(0)
    try:
        reference = nn.Linear(128, 128)
        with torch.no_grad():
            reference.weight.copy_(torch.randn(128, 128, generator=generator) / 128**0.5)
        probe = nn.Sequential(copy.deepcopy(reference)).to(device, dtype).requires_grad_(False)
        reference = reference.to(device, dtype).requires_grad_(False)
        quantize_frozen_linears(probe, mode, skip=())
        # 4-D like a ResBlock's channelwise input (BHWC): kernels that only handle 2-D inputs fail here.
        x = torch.randn(2, 3, 3, 128, generator=generator).to(device, dtype).requires_grad_(True)
        out = probe(x)
        out.float().square().sum().backward()
        expected = reference(x.detach())
        error = float((out.detach().float() - expected.float()).norm() / expected.float().norm())
    except Exception as exc:  # any failure inside bitsandbytes means "unsupported here"
        raise QuantizationUnsupportedError(
            f"train.quantize_base={mode} does not work on {device} with bitsandbytes {bnb.__version__} "
            f"({type(exc).__name__}: {exc}); {advice}") from exc
    # NF4 keeps 16 levels per 64 weights: about 10% relative error on one layer; int8 about 1%.
    if not (x.grad is not None and torch.isfinite(x.grad).all() and error < 0.3):
        raise QuantizationUnsupportedError(
            f"train.quantize_base={mode} gives wrong results on {device} with bitsandbytes {bnb.__version__} "
            f"(relative error {error:.3f} on a probe layer); {advice}")


def quantized_bytes(stage_c: nn.Module) -> int:
    """Bytes held by ``stage_c``'s parameters and buffers, counting bitsandbytes' quantization statistics (int8
    row scales, which move from the weight to the layer's state on the first call, and NF4 absmax values)."""
    total = 0
    seen: set[int] = set()
    for tensor in list(stage_c.parameters()) + list(stage_c.buffers()):
        key = id(tensor) if tensor.is_meta else tensor.data_ptr()  # meta tensors all share data_ptr 0
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    for module in stage_c.modules():
        weight = getattr(module, "weight", None)
        scb = getattr(weight, "SCB", None)
        if scb is None and getattr(module, "state", None) is not None:
            scb = getattr(module.state, "SCB", None)
        if torch.is_tensor(scb):
            total += scb.numel() * scb.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "state2", None) is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total
