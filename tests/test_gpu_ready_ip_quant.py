"""Issue 23: the IP-Adapter at batch size 1 with its image dropped, the IP-Adapter on an int8/NF4 base, and the
peak memory of quantizing the base (each original Linear must be freeable as soon as it is replaced).

All on a tiny Stage C with small random weights (as in tests/test_ip_adapter.py), on the CPU.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from cascade_studio.adapters import ip_adapter as ipa
from cascade_studio.adapters.ip_adapter.adapter import find_attention_blocks
from cascade_studio.adapters.ip_adapter.config import IPAdapterConfig
from cascade_studio.trainers import quantize
from cascade_studio.trainers.quantize import (QuantizationUnsupportedError, check_quantization_supported,
                                              quantize_frozen_linears)
from cascade_studio.trainers.steps import diffusion_training_loss
from test_ip_adapter import EMBED, adapted, embeds, make_base, make_inputs, perturb  # the same tiny base and inputs

def supported(mode: str) -> None:
    """Skip (naming the reason) only when bitsandbytes cannot run ``mode`` on this CPU."""
    try:
        check_quantization_supported(mode, "cpu")
    except QuantizationUnsupportedError as exc:
        pytest.skip(f"train.quantize_base={mode} is unsupported here: {exc}")


# ------------------------------------------------------------------------ 1. batch of 1 with the image dropped
def test_training_step_with_every_image_dropped_gives_every_parameter_a_zero_gradient():
    """Image dropout can empty a whole micro-batch (always at batch size 1). The loss must still reach every
    adapter parameter (zero gradients, not None: backward works and DDP sees no unused parameter), while the
    prediction stays the base model's bit for bit."""
    model, adapter = adapted(base=make_base())
    perturb(adapter)
    g = torch.Generator().manual_seed(4)
    batch = {"latents": torch.randn(1, 16, 4, 4, generator=g), "clip_text": torch.randn(1, 77, 64, generator=g),
             "clip_text_pooled": torch.randn(1, 64, generator=g), "ip_image_embeds": torch.randn(1, 1, EMBED)}
    seen: dict[str, torch.Tensor] = {}

    def recording_model(x, r, **inputs):
        seen["embeds"] = inputs["ip_image_embeds"]
        with torch.no_grad():
            seen["base"] = model.stage_c(x, r, **{k: v for k, v in inputs.items() if k != "ip_image_embeds"})
        seen["pred"] = model(x, r, **inputs)
        return seen["pred"]

    loss = diffusion_training_loss(recording_model, batch, c_clip_img=EMBED, caption_dropout=0.0, shift=1.0,
                                   offset=0.0, generator=torch.Generator().manual_seed(0),
                                   method_inputs=ipa.training_inputs,
                                   method_cfg=IPAdapterConfig(drop_image=1.0, drop_text=0.0, drop_both=0.0))
    assert seen["embeds"].abs().sum() == 0  # the image really was dropped
    loss.backward()
    params = adapter.trainable_parameters()
    assert all(p.grad is not None for p in params)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)  # an image-less sample teaches nothing
    assert all(p.grad is None for p in model.stage_c.parameters())
    assert torch.equal(seen["pred"].detach(), seen["base"])


def test_inference_still_skips_the_branch_when_no_sample_has_an_image():
    model, adapter = adapted(base=make_base())
    with torch.no_grad():
        context = adapter.apply({"ip_image_embeds": torch.zeros(2, 1, EMBED)}, {})
    assert isinstance(context, contextlib.nullcontext)


@pytest.mark.parametrize("multi_image", ["average", "concat"])
def test_training_apply_does_not_read_the_image_mask_on_the_host(monkeypatch, multi_image):
    """``bool(mask.any())`` waits for the GPU every step; in training the branch runs anyway, so it is not
    needed. Any tensor -> Python bool/number conversion inside ``apply`` fails this test."""
    model, adapter = adapted(base=make_base(), multi_image=multi_image)
    e = embeds(images=2)
    e[0, 1] = 0  # one empty image among real ones: concat needs a token mask
    real_apply = adapter.apply

    def host_read(self, *args, **kwargs):
        raise AssertionError("IPAdapter.apply read a tensor on the host (a GPU->host sync) in training")

    def guarded_apply(inputs, kwargs):
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "__bool__", host_read)
            patch.setattr(torch.Tensor, "item", host_read)
            return real_apply(inputs, kwargs)

    adapter.apply = guarded_apply
    out = model(**make_inputs(), ip_image_embeds=e)
    out.square().mean().backward()
    assert all(p.grad is not None for p in adapter.trainable_parameters())


# ------------------------------------------------------------------------ 2. IP-Adapter on a quantized base
def test_float_weight_dequantizes_plain_and_bitsandbytes_linears():
    from cascade_studio.adapters.ip_adapter.adapter import float_weight

    reference = nn.Sequential(nn.Linear(64, 64)).requires_grad_(False)
    assert float_weight(reference[0]) is reference[0].weight or torch.equal(float_weight(reference[0]),
                                                                            reference[0].weight)
    for mode, tol in (("int8", 0.02), ("nf4", 0.15)):
        try:
            check_quantization_supported(mode, "cpu")
        except QuantizationUnsupportedError:
            continue
        layer = copy.deepcopy(reference)
        quantize_frozen_linears(layer, mode, skip=())
        before = float_weight(layer[0])
        assert before.is_floating_point() and before.shape == reference[0].weight.shape
        assert (before - reference[0].weight).norm() / reference[0].weight.norm() < tol
        with torch.no_grad():
            layer(torch.randn(2, 64))  # int8: the row scales move from the weight to the layer's state
        assert torch.equal(float_weight(layer[0]), before)


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("nf4", 0.15)])
def test_ip_adapter_attaches_and_trains_on_a_quantized_base(mode, tol):
    supported(mode)
    base = make_base()
    reference = copy.deepcopy(base)
    quantize_frozen_linears(base, mode)
    blocks = find_attention_blocks(base)
    # What the adapter must cope with: its k/v source and the block's kv_mapper are bitsandbytes layers.
    assert type(blocks[0].attention.attn.to_k) is not nn.Linear
    assert not any(p.is_floating_point() for p in blocks[0].kv_mapper[-1].parameters() if p.dim() == 2)
    model, adapter = adapted(base=base)
    # Fresh k/v projections: the base's weights up to quantization error (biases are not quantized).
    for layer, block in zip(adapter.ip_layers, find_attention_blocks(reference)):
        attn = block.attention.attn
        for new, old in ((layer.to_k_ip, attn.to_k), (layer.to_v_ip, attn.to_v)):
            assert new.weight.dtype == torch.float32
            error = float((new.weight.detach() - old.weight).norm() / old.weight.norm())
            assert error < tol, f"{mode}: fresh IP k/v weight is {error:.3f} away from the base's"
            assert torch.equal(new.bias, old.bias)
    inp, e = make_inputs(), embeds()
    with torch.no_grad():
        base_out = base(**inp)
    out = model(**inp, ip_image_embeds=e)
    assert torch.isfinite(out).all() and (out.detach() - base_out).abs().max() > 1e-3
    out.square().mean().backward()
    params = adapter.trainable_parameters()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert all(p.grad.abs().sum() > 0 for p in params)
    adapter.set_scale(0.0)
    with torch.no_grad():
        assert torch.equal(model(**inp, ip_image_embeds=e), base_out)


# ------------------------------------------------------------------------ 3. peak memory of quantizing
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantize_frees_each_original_linear_before_quantizing_the_next(monkeypatch, mode):
    """While layer k is quantized, layers < k must already be collectable; holding them all until the end makes
    the peak the full-precision base plus its quantized copy."""
    supported(mode)
    base = make_base()
    refs = {name: weakref.ref(m) for name, m in base.named_modules() if type(m) is nn.Linear}
    order: list[str] = []
    alive_at_call: list[list[str]] = []
    real = quantize._quantized_linear

    def spy(linear, *args, **kwargs):
        if len(order) % 8 == 7:  # a full collection per layer would take most of a minute; every 8th is enough
            gc.collect()
            alive_at_call.append([n for n in order if refs[n]() is not None])
        else:
            alive_at_call.append([])
        order.append(next(n for n, r in refs.items() if r() is linear))
        return real(linear, *args, **kwargs)

    monkeypatch.setattr(quantize, "_quantized_linear", spy)
    done = quantize_frozen_linears(base, mode)
    assert order == done and len(done) > 10
    leaks = [(order[k], alive) for k, alive in enumerate(alive_at_call) if alive]
    assert not leaks, (f"quantizing {leaks[0][0]}: {len(leaks[0][1])} already replaced Linears are still alive "
                       f"(e.g. {leaks[0][1][:3]})")
    gc.collect()
    assert all(refs[n]() is None for n in done)
