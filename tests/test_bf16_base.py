"""``train.quantize_base: bf16`` (issue 20, the memory mode): an fp32 model whose frozen Linears are held in bf16.

The matmuls still run in fp32, so a training step is the fp32 model's step with bf16-rounded Linear weights, bit
for bit (the published ``*_bf16`` files are exactly such weights); the frozen base takes about half the memory,
and no fp32 copy of a weight outlives its call (the backward pass casts the stored weight again). Every adapter
method trains on it through the user's command, with the whole-block checkpointing the memory mode pairs it with.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cascade_studio.config import RecipeError, load_recipe
from cascade_studio.trainers.plan import measure_peak_tensor_bytes
from cascade_studio.trainers.quantize import Bf16StoredLinear, quantize_frozen_linears, quantized_bytes
from recipe_transplant import REPO, transplant
from tests.test_memory_savings import loss_of, tiny_base, tiny_batch, with_lora
from tests.tiny_train import TINY_LORA


def stored_and_rounded(base: nn.Module) -> tuple[nn.Module, nn.Module, list[str]]:
    """``base`` with bf16-held Linears, and an fp32 copy whose same Linears hold the bf16-rounded weights."""
    stored, rounded = copy.deepcopy(base), copy.deepcopy(base)
    done = quantize_frozen_linears(stored, "bf16")
    for name in done:
        layer = rounded.get_submodule(name)
        layer.weight.data = layer.weight.data.to(torch.bfloat16).float()
    return stored, rounded, done


def step_of(stage_c: nn.Module, mode: str, lora_type: str, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    stage_c.checkpointing = mode
    model, adapter = with_lora(stage_c, type=lora_type, targets=("attention", "channelwise"))
    # The same adapter weights in both models (PEFT rounds a fresh adapter's initial values to its base layer's
    # dtype before the studio makes them fp32, as on a bf16 model; the step itself is what is compared).
    g = torch.Generator().manual_seed(3)
    for p in adapter.trainable_parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_of(model, tiny_batch())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in adapter.trainable_parameters()]


@pytest.mark.parametrize("mode,lora_type,autocast", [("none", "lora", False), ("blocks", "lora", False),
                                                     ("selective", "dora", False), ("none", "lora", True)])
def test_a_step_is_the_fp32_step_with_rounded_weights_bit_for_bit(mode, lora_type, autocast):
    stored, rounded, done = stored_and_rounded(tiny_base())
    # every block Linear is held in bf16; the timestep and CLIP mappers stay in the model dtype (as for int8/NF4)
    assert type(stored.get_submodule("down_blocks.0.0.channelwise.0")) is Bf16StoredLinear
    assert stored.get_submodule("down_blocks.0.0.channelwise.0").weight.dtype == torch.bfloat16
    assert type(stored.get_submodule("clip_txt_mapper")) is nn.Linear and len(done) > 50
    loss, grads = step_of(stored, mode, lora_type, autocast)
    loss_ref, grads_ref = step_of(rounded, mode, lora_type, autocast)
    assert torch.equal(loss, loss_ref)
    assert all(g.dtype == torch.float32 for g in grads) and all(g.abs().max() > 0 for g in grads_ref)
    for g, ref in zip(grads, grads_ref, strict=True):
        assert torch.equal(g, ref), (g - ref).abs().max()
    # Against the unrounded fp32 base: in fp32 the rounding is a real change (so the equality above is not
    # vacuous); under bf16 autocast every weight is rounded anyway, so the bf16-held base is the fp32 one there.
    # (The loss alone can round to the same float: with DoRA the rounding moved it by less than one ulp.)
    loss_fp32, grads_fp32 = step_of(tiny_base(), mode, lora_type, autocast)
    same = torch.equal(loss_fp32, loss_ref) and all(torch.equal(g, ref) for g, ref in zip(grads_fp32, grads_ref))
    assert same == autocast


def test_the_base_takes_half_the_memory_and_a_step_keeps_no_fp32_weight_copy():
    base = tiny_base()
    stored, rounded, done = stored_and_rounded(base)
    converted = sum(rounded.get_submodule(name).weight.numel() for name in done)
    assert quantized_bytes(rounded) - quantized_bytes(stored) == 2 * converted

    def step_peak(stage_c: nn.Module) -> int:
        model, _ = with_lora(stage_c)
        batch = tiny_batch(side=16)
        loss_of(model, batch).backward()  # warm-up: lazy initialisations stay out of the measurement
        return measure_peak_tensor_bytes(lambda: loss_of(model, batch, step=1).backward())[0]

    largest = max(rounded.get_submodule(name).weight.numel() for name in done) * 4
    # Transient fp32 casts come and go one layer at a time; keeping them for the backward pass would add
    # about 4 x `converted` bytes (the whole base again in fp32).
    peak, peak_fp32 = step_peak(stored), step_peak(rounded)
    assert peak <= peak_fp32 + 2 * largest < peak_fp32 + converted, (peak, peak_fp32, largest, converted)


def test_a_trainable_weight_is_refused_and_a_bf16_model_gains_nothing():
    layer = quantize_frozen_linears(nn.Sequential(nn.Linear(8, 8)).requires_grad_(False), "bf16", skip=())
    assert layer == ["0"]
    trainable = Bf16StoredLinear(8, 8)
    with pytest.raises(RuntimeError, match="frozen weight"):
        trainable(torch.ones(1, 8))
    with pytest.raises(ValueError, match="keep model.dtype: fp32"):
        quantize_frozen_linears(nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16).requires_grad_(False), "bf16",
                                skip=())
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY_LORA, ("model.dtype=bf16", "train.quantize_base=bf16"))
    [problem] = info.value.problems
    assert problem.path == "train.quantize_base" and "model.dtype is bf16" in problem.message
    assert "remove train.quantize_base" in problem.hint


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lora", "controlnet-canny", "ip-adapter", "lcm"])
def test_every_method_trains_on_a_bf16_base_with_checkpointing(recipe, tmp_path, monkeypatch):
    from cascade_studio.run import train

    monkeypatch.chdir(REPO)
    path = REPO / "recipes" / "tiny" / f"{recipe}.yaml"
    assert load_recipe(path).model.dtype == "fp32"
    result = train(path, transplant(path, tmp_path, max_images=8) + [
        "train.quantize_base=bf16", "train.checkpointing=blocks", "tracking.enabled=false"], progress=False)
    assert result.step == 2 and result.exports
    assert result.heldout_after is not None and torch.isfinite(torch.tensor(result.heldout_after))


@pytest.mark.parametrize("ckpt", ["none", "selective"])
def test_the_plan_counts_the_bf16_base_exactly_and_its_activations_as_fp32(ckpt):
    from dataclasses import replace

    from cascade_studio.trainers.plan_check import check_plan, lora_case_setup

    setup = replace(lora_case_setup("c128", "fp32", "no", ckpt), quantize_base="bf16")
    check = check_plan(setup)
    assert check.predicted_resident == check.resident  # the bf16 Linears and the fp32 rest, counted exactly
    assert 0.75 <= check.activation_ratio <= 1.25 and 0.75 <= check.total_ratio <= 1.25, \
        (check.total_ratio, check.activation_ratio)
    fp32 = check_plan(lora_case_setup("c128", "fp32", "no", ckpt))
    assert check.resident < 0.7 * fp32.resident  # the mappers stay fp32; the LoRA and its AdamW state too


def test_an_ip_adapter_on_a_bf16_base_trains_as_on_the_rounded_fp32_base():
    """The IP-Adapter reads the base's to_k/to_v (its fresh k/v projections start from them) and runs each block's
    frozen kv_mapper on the image tokens: in fp32 on the bf16-held base too, as on the rounded fp32 one."""
    from test_ip_adapter import adapted, embeds, make_base, make_inputs

    stored, rounded, _ = stored_and_rounded(make_base().requires_grad_(False))
    results = []
    for base in (stored, rounded):
        model, adapter = adapted(base=base)
        assert all(p.dtype == torch.float32 for p in adapter.trainable_parameters())
        out = model(**make_inputs(), ip_image_embeds=embeds())
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in adapter.trainable_parameters()]))
    (out, grads), (out_ref, grads_ref) = results
    assert torch.equal(out, out_ref)
    assert all(torch.equal(g, ref) for g, ref in zip(grads, grads_ref, strict=True))
    assert all(ref.abs().max() > 0 for ref in grads_ref)
