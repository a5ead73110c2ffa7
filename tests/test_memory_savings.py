"""Each memory saving is a recipe switch that works and changes nothing it should not:

* gradient checkpointing per Stage C block: same outputs and LoRA gradients, far less activation memory;
* bf16 frozen weights: every base parameter bf16, adapter fp32, and no fp32 copy of the base left alive;
* 8-bit AdamW: uint8 state, and 30 steps of training track plain AdamW;
* encoders are gone (weak references dead) once the encode-once cache is built;
* bitsandbytes int8 / NF4 frozen Linears (QLoRA-style): PEFT's bitsandbytes LoRA layers attach, train, leave the
  base untouched, and the outputs stay close to the unquantized model.
"""
from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cascade_studio.adapters.lora.config import LoraConfig
from cascade_studio.adapters.base import AdaptedStageC
from cascade_studio.adapters.lora import LoraAdapter, LoraSpec
from cascade_studio.config.schema import ModelConfig, OptimizerConfig
from cascade_studio.models.random_init import build_random
from cascade_studio.trainers import plan as planner
from cascade_studio.trainers.optim import build_optimizer, optimizer_state_is_8bit
from cascade_studio.trainers.quantize import (QuantizationUnsupportedError, check_quantization_supported,
                                              quantize_frozen_linears, quantized_bytes)
from cascade_studio.trainers.steps import diffusion_training_loss, heldout_loss, step_generator

REPO = Path(__file__).resolve().parents[1]


def tiny_base() -> nn.Module:
    """The tiny random base every tiny recipe trains on (non-zero output and timestep layers: it can learn)."""
    return build_random("stage_c", "tiny").eval().requires_grad_(False)


def tiny_batch(batch: int = 2, side: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(batch, 16, side, side, generator=g),
            "clip_text": torch.randn(batch, 77, 64, generator=g),
            "clip_text_pooled": torch.randn(batch, 1, 64, generator=g),
            "clip_img": torch.randn(batch, 1, 32, generator=g)}


def with_lora(stage_c: nn.Module, seed: int = 0, **spec) -> tuple[AdaptedStageC, LoraAdapter]:
    torch.manual_seed(seed)
    model = AdaptedStageC(stage_c)
    # init_weights=False: lora_B is random too, so gradients reach lora_A (a zero B would hide half the check).
    adapter = LoraAdapter(LoraSpec(**{"rank": 4, "alpha": 4.0, "init_weights": False, **spec}))
    model.add_adapter(adapter)
    return model, adapter


def loss_of(model, batch, step: int = 0) -> torch.Tensor:
    return diffusion_training_loss(model, batch, c_clip_img=32, caption_dropout=0.0, shift=1.0, offset=0.0,
                                   generator=step_generator(0, step))


# ------------------------------------------------------------------------------------- gradient checkpointing
def test_checkpointing_keeps_outputs_and_lora_grads_and_saves_memory():
    results = {}
    for ckpt in (False, True):
        model, adapter = with_lora(tiny_base())
        model.gradient_checkpointing = ckpt
        batch = tiny_batch()

        def step():
            loss = loss_of(model, batch)
            loss.backward()
            results[ckpt] = (loss.detach(), [p.grad.clone() for p in adapter.trainable_parameters()])

        peak, _ = planner.measure_peak_tensor_bytes(step)
        results[ckpt] = results[ckpt] + (peak,)
    (loss_a, grads_a, peak_a), (loss_b, grads_b, peak_b) = results[False], results[True]
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert len(grads_a) == len(grads_b) == 4 * 2 * 12  # q/k/v/out x (A, B) x 12 attention blocks
    assert all(g.abs().sum() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert peak_b < 0.5 * peak_a  # measured: about a quarter


def test_checkpointing_output_identical_in_eval_and_no_grad():
    model, _ = with_lora(tiny_base())
    batch = tiny_batch()
    with torch.no_grad():
        plain = loss_of(model, batch)
        model.gradient_checkpointing = True
        checkpointed = loss_of(model, batch)
    assert torch.equal(plain, checkpointed)  # no grad: checkpointing is not even entered


# ---------------------------------------------------------------------------------------- bf16 frozen weights
def test_bf16_base_holds_no_fp32_copy_and_trains_fp32_adapter():
    from cascade_studio.adapters.lora import create_adapter
    from cascade_studio.trainers.components import BaseModels

    built = {}

    def build():
        models = BaseModels(ModelConfig(preset="tiny", dtype="bf16"))
        model = AdaptedStageC(models.stage_c())
        built["model"] = model
        built["adapter"] = create_adapter(LoraConfig(rank=8, alpha=8.0), model, None)

    _, live_after = planner.measure_peak_tensor_bytes(build)
    model, adapter = built["model"], built["adapter"]
    adapter_ids = {id(p) for p in adapter.trainable_parameters()}
    base = [p for p in model.parameters() if id(p) not in adapter_ids]
    assert base and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    assert adapter_ids and all(p.dtype == torch.float32 and p.requires_grad for p in adapter.trainable_parameters())
    n_lora = sum(p.numel() for p in adapter.trainable_parameters())
    expected = planner.plan_memory(planner.Setup(adapter=LoraConfig(rank=8, alpha=8.0), stage_c=dict(planner_stage_c()),
                                                 dtype="bf16", device="cpu"))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert param_bytes == expected.parts["frozen weights"] + expected.parts["adapter weights"] == \
        2 * sum(p.numel() for p in base) + 4 * n_lora
    # Everything still alive from the build is the bf16 base plus the fp32 adapter (an fp32 copy of the base
    # would add 4 bytes per base parameter, doubling this); 64 KiB covers RNG states and small bookkeeping.
    assert abs(live_after - param_bytes) < 64 * 1024

    loss = loss_of(model, tiny_batch())  # fp32 inputs: the bf16 Stage C casts its own
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in base)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.trainable_parameters())


def planner_stage_c() -> dict:
    from cascade_studio.models import get_preset

    return get_preset("tiny").stage_c


# --------------------------------------------------------------------------------------------- 8-bit AdamW
def _train(optimizer_name: str, steps: int = 30) -> tuple[list[float], torch.optim.Optimizer]:
    model, adapter = with_lora(tiny_base(), seed=3, init_weights=True)
    optimizer = build_optimizer(adapter.trainable_parameters(), OptimizerConfig(name=optimizer_name, lr=5e-3))
    batch = tiny_batch(batch=2, seed=1)
    # fixed t and noise
    evaluate = lambda: heldout_loss(model, [batch], c_clip_img=32, shift=1.0, seed=1234, repeats=2)  # noqa: E731
    curve = [evaluate()]
    for step in range(steps):
        loss_of(model, batch, step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 9:
            curve.append(evaluate())
    return curve, optimizer


def test_adamw8bit_uses_uint8_state_and_tracks_adamw():
    curve32, _ = _train("adamw")
    curve8, optimizer8 = _train("adamw8bit")
    assert optimizer_state_is_8bit(optimizer8)
    assert all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8
               for s in optimizer8.state.values())
    assert curve32[0] == curve8[0]  # same start
    drop32, drop8 = curve32[0] - curve32[-1], curve8[0] - curve8[-1]
    assert drop32 > 0 and drop8 > 0  # both improve the fixed-noise loss on the batch they train on
    # Tolerance: 8-bit Adam stores both moments with blockwise dynamic 8-bit quantization (~1% relative error per
    # value), so each update differs from AdamW's by about 1% and the loss drop over 30 steps by about as much;
    # 5% of the drop leaves room for that to accumulate (measured: the curves agree to 0.1% of the drop). A
    # broken state (wrong scale, stale absmax, state never updated) changes the drop by far more.
    assert abs(curve8[-1] - curve32[-1]) <= 0.05 * drop32, (curve32, curve8)
    assert all(abs(a - b) <= 0.05 * drop32 for a, b in zip(curve32, curve8))


# ------------------------------------------------------------------------------ encoders gone after the cache
def test_encoders_are_freed_after_the_cache_phase(tmp_path, monkeypatch):
    from cascade_studio import run
    from cascade_studio.adapters.registry import AdapterContext, get_method
    from cascade_studio.config import load_recipe
    from cascade_studio.trainers.components import BaseModels

    monkeypatch.chdir(REPO)
    recipe = load_recipe("recipes/tiny/lora.yaml", [f"cache.dir={tmp_path / 'cache'}", "data.max_images=4",
                                                    "data.holdout_fraction=0.25", f"workspace={tmp_path}"])
    models = BaseModels(recipe.model)
    refs = {name: weakref.ref(getter()) for name, getter in
            (("text_encoder", models.text_encoder), ("effnet", models.effnet))}
    accelerator = SimpleNamespace(is_main_process=True, main_process_first=lambda: _nullcontext(), num_processes=1)
    context = AdapterContext(preset="tiny", stage_c_config=dict(models.preset.stage_c))
    train_set, holdout, extras, skipped, preview = run._prepare_data(
        recipe, models, get_method("lora"), recipe.adapter.lora, context, accelerator, tmp_path / "run", False)
    gc.collect()
    assert {name: ref() is None for name, ref in refs.items()} == {"text_encoder": True, "effnet": True}
    assert len(train_set) == 3 and train_set[0]["latents"].shape == (16, 8, 8)  # the cache still serves
    assert preview is not None  # preview prompts were encoded before the text encoder went


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------ bitsandbytes quantization
def _weight_error(module: nn.Module) -> float:
    """Relative RMS error of the quantized Linear weights themselves (dequantized vs original)."""
    import bitsandbytes as bnb

    err = ref = 0.0
    for _, layer in module.named_modules():
        if isinstance(layer, bnb.nn.Linear8bitLt):
            scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB  # moves on first call
            w = layer.weight.data.float() * scb.float()[:, None] / 127
        elif isinstance(layer, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        else:
            continue
        original = layer._original_weight
        err += float((w - original).square().sum())
        ref += float(original.square().sum())
    return (err / ref) ** 0.5


@pytest.mark.parametrize("mode,layer_type", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_quantized_base_trains_lora_and_stays_close(mode, layer_type):
    import bitsandbytes as bnb
    import peft

    check_quantization_supported(mode, "cpu")
    base = tiny_base()
    quantized = copy.deepcopy(base)
    originals = {name: m.weight.detach().clone() for name, m in quantized.named_modules() if type(m) is nn.Linear}
    done = quantize_frozen_linears(quantized, mode)
    for name in done:
        quantized.get_submodule(name)._original_weight = originals[name]
    # Every block Linear is quantized; the timestep and CLIP mappers stay in full precision.
    assert "down_blocks.0.2.attention.attn.to_q" in done and "down_blocks.0.0.channelwise.0" in done
    assert type(quantized.get_submodule("down_blocks.0.1.mapper")) is nn.Linear
    assert type(quantized.get_submodule("clip_txt_mapper")) is nn.Linear
    assert quantized_bytes(quantized) < (0.55 if mode == "int8" else 0.45) * quantized_bytes(base)

    batch = tiny_batch()
    with torch.no_grad():
        reference = loss_of(AdaptedStageC(base), batch)  # scalar losses are too coarse; compare predictions too
        g = torch.Generator().manual_seed(5)
        args = (torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, generator=g), batch["clip_text"],
                batch["clip_text_pooled"], batch["clip_img"])
        out_ref, out_q = base(*args), quantized(*args)
    error = float((out_q - out_ref).norm() / out_ref.norm())
    # Tolerance: quantization noise of independent layers adds up along the residual stream rather than
    # compounding, so the output's relative error stays of the order of the per-layer error. NF4 quantizes only
    # the weights (matmul in the model dtype): up to 2x the weights' own relative error. LLM.int8 also quantizes
    # each activation row with the same absmax/127 scheme (through fp16), a second error of similar size: up to
    # 4x. Measured: NF4 9% weights -> 9% outputs, int8 0.4% -> 0.9%. A wrong scale or layout is off by ~100%.
    weight_error = _weight_error(quantized)
    assert 0 < error < (4 if mode == "int8" else 2) * weight_error, (error, weight_error)
    assert weight_error < (0.02 if mode == "int8" else 0.15)

    model, adapter = with_lora(quantized, init_weights=True)
    to_q = quantized.get_submodule("down_blocks.0.2.attention.attn.to_q")
    assert isinstance(to_q, getattr(peft.tuners.lora.bnb, layer_type))  # PEFT's bitsandbytes-aware LoRA layer
    with torch.no_grad():
        assert torch.equal(quantized(*args), out_q)  # a fresh LoRA (B = 0) changes no output
        # eval, no grad: the path that used to repack
        heldout_loss(model, [batch], c_clip_img=32, shift=1.0, seed=1234, repeats=1)
    frozen = {k: v.clone() for k, v in quantized.state_dict().items() if "lora_" not in k}
    optimizer = build_optimizer(adapter.trainable_parameters(), OptimizerConfig(name="adamw", lr=1e-2))
    loss = loss_of(model, batch)
    loss.backward()
    grads = [p.grad for p in adapter.trainable_parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    optimizer.step()
    after = {k: v for k, v in quantized.state_dict().items() if "lora_" not in k}
    assert frozen.keys() == after.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert abs(loss.item() - reference.item()) < 0.5 * reference.item()
    assert isinstance(quantized.get_submodule("down_blocks.0.0.channelwise.0"), bnb.nn.Linear8bitLt
                      if mode == "int8" else bnb.nn.Linear4bit)


def test_quantize_refuses_an_adapted_model_and_unknown_modes():
    model, _ = with_lora(tiny_base())
    with pytest.raises(ValueError, match="quantize the frozen base before attaching adapters"):
        quantize_frozen_linears(model.stage_c, "nf4")
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quantize_frozen_linears(tiny_base(), "int4")
    assert quantize_frozen_linears(tiny_base(), "none") == []


def test_unsupported_device_fails_with_a_clear_recipe_message():
    # The meta device has no bitsandbytes kernels: the probe must turn that into the recipe-level error.
    with pytest.raises(QuantizationUnsupportedError, match=r"(?s)train.quantize_base=nf4 does not work on meta.*"
                                                           r"set train.quantize_base: none"):
        check_quantization_supported("nf4", "meta")
    check_quantization_supported("none", "meta")  # nothing to check
