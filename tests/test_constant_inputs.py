"""A sampling run computes what depends only on its constant inputs once (models/reuse.py): the conditioning
tokens, every attention block's kv_mapper, a ControlNet's residuals and an IP-Adapter's image keys and values.
The images are bit for bit the ones computed step by step; training, changed inputs and calls outside a run
recompute."""
from __future__ import annotations

import contextlib

import torch

from cascade_studio.adapters import controlnet as cn
from cascade_studio.adapters.base import AdaptedStageC
from cascade_studio.adapters.controlnet.config import ControlNetConfig
from cascade_studio.adapters.ip_adapter import IPAdapter
from cascade_studio.adapters.registry import AdapterContext
from cascade_studio.inference import pipeline
from cascade_studio.inference.pipeline import GenerateSettings, TextEmbeddings, sample_stage_c
from cascade_studio.models.blocks import AttnBlock
from cascade_studio.models.presets import get_preset
from cascade_studio.models.reuse import reuse, reusing_constant_inputs
from test_ip_adapter import EMBED, make_base, one_thread  # noqa: F401 - the same tiny base; one_thread is a fixture

STEPS = 3


def _text(batch: int = 2) -> TextEmbeddings:
    g = torch.Generator().manual_seed(5)
    return TextEmbeddings(torch.randn(batch, 77, 64, generator=g), torch.randn(batch, 1, 64, generator=g),
                          torch.randn(batch, 77, 64, generator=g), torch.randn(batch, 1, 64, generator=g))


def _settings(dtype: str = "fp32") -> GenerateSettings:
    return GenerateSettings(prompt="a", width=256, height=256, steps_c=STEPS, steps_b=2, seed=3, dtype=dtype,
                            batch=2)


def _counter(modules) -> list[int]:
    count = [0]
    for module in modules:
        module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def _sample_both_ways(monkeypatch, model, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    reused = sample_stage_c(model, _text(), kwargs.pop("settings", _settings()), **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "reusing_constant_inputs", contextlib.nullcontext)
        stepwise = sample_stage_c(model, _text(), _settings(), **kwargs)
    return reused, stepwise


def test_conditioning_and_kv_mappers_run_once_per_run_and_images_are_identical(monkeypatch):
    stage_c = make_base()
    blocks = [m for m in stage_c.modules() if isinstance(m, AttnBlock)]
    mappers = _counter(b.kv_mapper for b in blocks)
    norms = _counter([stage_c.clip_norm])
    calls = _counter([stage_c])
    keys: list[int] = []  # the token count of every key projection
    for block in blocks:
        block.attention.attn.to_k.register_forward_hook(lambda _m, args, _out: keys.append(args[0].shape[1]))
    reused = sample_stage_c(stage_c, _text(), _settings())
    assert (calls[0], norms[0], mappers[0]) == (STEPS, 1, len(blocks))  # one batched CFG call per step
    # The image tokens' keys at every step, the conditioning tokens' once per block
    image_tokens = reused.shape[-2] * reused.shape[-1]
    assert (keys.count(image_tokens), len(keys) - keys.count(image_tokens)) == (STEPS * len(blocks), len(blocks))
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "reusing_constant_inputs", contextlib.nullcontext)
        stepwise = sample_stage_c(stage_c, _text(), _settings())
    assert (norms[0], mappers[0]) == (1 + STEPS, len(blocks) * (1 + STEPS))
    assert torch.equal(reused, stepwise)
    # The next run starts afresh: its own conditioning, not the last run's.
    other = sample_stage_c(stage_c, _text(batch=2).__class__(*(t * 0.5 for t in vars(_text()).values())),
                           _settings())
    assert norms[0] == 2 + STEPS and not torch.equal(other, reused)


def test_bf16_runs_reuse_too(monkeypatch):
    stage_c = make_base().to(torch.bfloat16)
    norms = _counter([stage_c.clip_norm])
    sample_stage_c(stage_c, _text(), _settings("bf16"))
    assert norms[0] == 1  # the inputs are cast once, so every step passes the same tensors


def test_controlnet_residuals_are_computed_once_per_run(monkeypatch):
    model = AdaptedStageC(make_base())
    context = AdapterContext(preset="tiny", base_fingerprint="t", stage_c_config=get_preset("tiny").stage_c)
    adapter = cn.create_adapter(ControlNetConfig(control="canny"), model, context)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    adapter.eval()
    runs = _counter([adapter.controlnet])
    hint = torch.rand(2, 1, 256, 256, generator=g)
    reused, stepwise = _sample_both_ways(monkeypatch, model, extra_cond={"control": hint})
    assert runs[0] == 1 + STEPS
    assert torch.equal(reused, stepwise)
    base = sample_stage_c(model.stage_c, _text(), _settings())
    assert (reused - base).abs().max() > 1e-3  # the residuals did reach the samples
    # A new strength is a new result, not the old one.
    adapter.set_strength(0.5)
    half = sample_stage_c(model, _text(), _settings(), extra_cond={"control": hint})
    assert runs[0] == 2 + STEPS and not torch.equal(half, reused)


def test_ip_adapter_image_keys_and_values_are_computed_once_per_run(monkeypatch):
    base = make_base()
    model = AdaptedStageC(base)
    torch.manual_seed(0)
    adapter = IPAdapter.for_stage_c(base, embed_dim=EMBED, image_encoder="tiny")
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    model.add_adapter(adapter)
    projections = _counter(layer.to_k_ip for layer in adapter.ip_layers)
    embeds = torch.randn(2, 1, EMBED, generator=torch.Generator().manual_seed(2))
    kwargs = {"extra_cond": {"ip_image_embeds": embeds}, "extra_uncond": {"ip_image_embeds": torch.zeros_like(embeds)}}
    reused, stepwise = _sample_both_ways(monkeypatch, model, **kwargs)
    layers = len(adapter.ip_layers)
    assert projections[0] == layers * (1 + STEPS)
    assert torch.equal(reused, stepwise)
    assert (reused - sample_stage_c(base, _text(), _settings())).abs().max() > 1e-4


def test_reuse_needs_the_same_unchanged_tensors_no_grad_and_a_run():
    owner = object()
    calls = []

    def compute(t):
        calls.append(1)
        return t * 2

    x = torch.ones(3)
    assert torch.equal(reuse(owner, "f", (x,), lambda: compute(x)), 2 * x) and len(calls) == 1  # no run: computed
    reuse(owner, "f", (x,), lambda: compute(x))
    assert len(calls) == 2
    with torch.no_grad(), reusing_constant_inputs():
        first = reuse(owner, "f", (x,), lambda: compute(x))
        assert reuse(owner, "f", (x,), lambda: compute(x)) is first and len(calls) == 3
        x.add_(1)  # changed in place: recomputed
        assert torch.equal(reuse(owner, "f", (x,), lambda: compute(x)), torch.full((3,), 4.0)) and len(calls) == 4
        y = x.clone()  # equal values, another tensor: recomputed
        reuse(owner, "f", (y,), lambda: compute(y))
        assert len(calls) == 5
        reuse(owner, "g", (y,), lambda: compute(y))  # another name: its own entry
        assert len(calls) == 6
        with torch.enable_grad():  # training: never reused
            reuse(owner, "g", (y,), lambda: compute(y))
        assert len(calls) == 7
    with torch.no_grad():
        reuse(owner, "g", (y,), lambda: compute(y))  # the run is over: nothing kept
    assert len(calls) == 8
