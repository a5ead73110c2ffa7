"""A real training step measured against the memory planner (``plan.py``): the tests' +-25% check and
``benchmarks/bench_plan.py``'s table run the same measurement. CPU only: live tensor bytes, not a device's peak."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import catalog
from ..adapters.base import AdaptedStageC
from ..adapters.controlnet.config import ControlNetConfig
from ..adapters.ip_adapter.config import IPAdapterConfig
from ..adapters.lcm.config import LcmConfig
from ..config.schema import OptimizerConfig
from ..adapters.lora.config import LoraConfig
from ..models import build_stage_c, get_preset
from ..models.random_init import make_learnable
from . import plan as planner
from .optim import build_optimizer
from .quantize import quantize_frozen_linears
from .steps import diffusion_training_loss, step_generator

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TINY = dict(get_preset("tiny").stage_c)
SIZES = {
    "tiny": TINY,  # the size the per-block coefficients' whole-model behaviour was first checked on
    "c128": dict(TINY, c_hidden=[128, 128], c_cond=128, nhead=[4, 4], blocks=[[1, 3], [3, 1]]),
    "c256": dict(TINY, c_hidden=[256, 256], c_cond=256, nhead=[4, 4], blocks=[[1, 2], [2, 1]]),
}
# The checked cases, (size or method, model dtype, autocast, checkpointing): a LoRA on three widths ...
LORA_CASES = [(size, "fp32", "no", ckpt) for size in SIZES for ckpt in ("none", "blocks", "selective")] + \
    [("tiny", "bf16", "bf16", "blocks"), ("c256", "bf16", "bf16", "none"), ("c256", "bf16", "bf16", "selective")]
# ... and tiny sections of the other methods (no dropout: every step runs the same branch; the tiny ControlNet
# backbone) on the tiny Stage C, each with its (model dtype, autocast, checkpointing) cases. Named by their method
# (from the catalog) and a variant.
_FP32, _BF16 = ("fp32", "no"), ("bf16", "bf16")
_METHOD_CHECKS = [
    ("", ControlNetConfig(control="canny", bottleneck="effnet_tiny", backbone_init="random"),
     [(*_FP32, "none"), (*_BF16, "blocks"), (*_FP32, "selective")]),
    ("frozen-backbone", ControlNetConfig(control="inpainting", bottleneck="effnet_tiny", backbone_init="random",
                                         freeze_backbone=True), [(*_FP32, "blocks"), (*_BF16, "blocks")]),
    ("", IPAdapterConfig(image_encoder="tiny", drop_image=0.0, drop_text=0.0, drop_both=0.0),
     [(*_FP32, "none"), (*_FP32, "blocks"), (*_FP32, "selective"), (*_BF16, "none")]),
    ("", LcmConfig(rank=8, alpha=8.0), [(*_FP32, "none"), (*_FP32, "blocks"), (*_BF16, "none")]),
]


def _check_name(variant: str, section: Any) -> str:
    method = planner.Setup(adapter=section, stage_c=TINY).method
    return f"{method}-{variant}" if variant else method


METHOD_SECTIONS = {_check_name(variant, section): section for variant, section, _ in _METHOD_CHECKS}
METHOD_CASES = [(_check_name(variant, section), *case) for variant, section, cases in _METHOD_CHECKS for case in cases]


def lora_case_setup(size: str, dtype: str, mixed: str, ckpt: str) -> planner.Setup:
    return planner.Setup(adapter=LoraConfig(rank=8, alpha=8.0), stage_c=SIZES[size], preset=size, batch_size=2,
                         latent_h=8, latent_w=8, dtype=dtype, mixed_precision=mixed, checkpointing=ckpt,
                         optimizer="adamw", device="cpu")


def method_case_setup(name: str, dtype: str, mixed: str, ckpt: str) -> planner.Setup:
    return planner.Setup(adapter=METHOD_SECTIONS[name], stage_c=TINY, preset="tiny", batch_size=2, latent_h=8,
                         latent_w=8, dtype=dtype, mixed_precision=mixed, checkpointing=ckpt, optimizer="adamw",
                         device="cpu")


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_training_step(setup: planner.Setup) -> tuple[int, int]:
    """(resident bytes before a step, peak live bytes above them during forward+backward+optimizer step).

    The adapter is the one a run builds (its method's ``create_adapter`` from ``setup.adapter``) and its inputs
    go through its method's ``training_inputs``, as in training."""
    torch.manual_seed(0)
    stage_c = make_learnable(build_stage_c(**setup.stage_c)).to(DTYPES[setup.dtype]).eval().requires_grad_(False)
    quantize_frozen_linears(stage_c, setup.quantize_base)  # before the adapter, as a run does
    stage_c.checkpointing = setup.checkpointing
    model = AdaptedStageC(stage_c)
    method = catalog.get(setup.method)
    adapter = method.hook("create_adapter")(setup.adapter, model, None)
    optimizer = build_optimizer(model.trainable_parameters(), OptimizerConfig(name=setup.optimizer, lr=1e-3))
    b, c_text, c_img = setup.batch_size, setup.stage_c["c_clip_text"], setup.stage_c["c_clip_img"]
    batch = {"latents": torch.randn(b, 16, setup.latent_h, setup.latent_w), "clip_text": torch.randn(b, 77, c_text),
             "clip_text_pooled": torch.randn(b, 1, c_text), "clip_img": torch.randn(b, 1, c_img)}
    batch.update(method_batch(setup, adapter))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if setup.mixed_precision == "bf16" \
        else contextlib.nullcontext

    loss_step = method.hook("training_loss") or diffusion_training_loss  # the method's objective, as the run

    def step():
        with autocast():
            loss = loss_step(model, batch, c_clip_img=c_img, caption_dropout=0.0, shift=1.0, offset=0.0,
                             generator=step_generator(0, 0), method_inputs=method.hook("training_inputs"),
                             method_cfg=setup.adapter)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on, as during training
    resident = _storage_bytes(list(model.parameters()) + list(model.buffers()) + [
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)])
    peak, _ = planner.measure_peak_tensor_bytes(step)
    return resident, peak


def method_batch(setup: planner.Setup, adapter) -> dict:
    """What the encode-once cache adds to a batch for the method: a ControlNet's hint at the training
    resolution, an IP-Adapter's image embeddings."""
    b = setup.batch_size
    if isinstance(setup.adapter, ControlNetConfig):
        stride = 1 if adapter.spec.control == "sr" else 32  # sr hints are latents, the others images
        return {"control": torch.rand(b, adapter.spec.c_in, setup.latent_h * stride, setup.latent_w * stride)}
    if isinstance(setup.adapter, IPAdapterConfig):
        from cascade_studio.adapters.ip_adapter.method import FEATURE_NAME

        return {FEATURE_NAME: torch.randn(b, 1, adapter.embed_dim)}
    if isinstance(setup.adapter, LcmConfig):  # the empty caption's features, for the teacher's guidance
        c_text = setup.stage_c["c_clip_text"]
        return {"null_clip_text": torch.randn(b, 77, c_text), "null_clip_text_pooled": torch.randn(b, 1, c_text)}
    return {}


@dataclass(frozen=True)
class PlanCheck:
    """The planner's prediction for ``setup`` beside one measured CPU training step (bytes)."""

    predicted_resident: int  # frozen weights + adapter weights + optimizer state
    resident: int
    predicted_peak: int  # tensor bytes alone (no device workspace)
    measured_peak: int  # resident + the live-tensor rise during forward+backward+optimizer step
    predicted_rise: int  # activations + gradients
    measured_rise: int

    @property
    def total_ratio(self) -> float:
        return self.predicted_peak / self.measured_peak

    @property
    def activation_ratio(self) -> float:
        return self.predicted_rise / self.measured_rise


def check_plan(setup: planner.Setup) -> PlanCheck:
    plan = planner.plan_memory(setup)
    resident, peak = measure_training_step(setup)
    return PlanCheck(predicted_resident=plan.parts["frozen weights"] + plan.parts["adapter weights"]
                     + plan.parts["optimizer state"], resident=resident,
                     predicted_peak=plan.peak_without_workspace(), measured_peak=resident + peak,
                     predicted_rise=plan.parts["activations"] + plan.parts["gradients"], measured_rise=peak)
