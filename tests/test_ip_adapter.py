"""IP-Adapter on a tiny Stage C: exactness of the "off" states, the decoupled-attention maths, hook lifetime,
training, export/import and the refusal of files made for another base or encoder."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cascade_studio.adapters import ip_adapter as ipa
from cascade_studio.adapters.base import AdaptedStageC, AdapterMismatchError
from cascade_studio.adapters.files import load_adapter_tensors
from cascade_studio.adapters.ip_adapter import IPAdapter
from cascade_studio.adapters.ip_adapter.adapter import find_attention_blocks
from cascade_studio.adapters.registry import AdapterContext, detect_method, load_adapter
from cascade_studio.adapters.ip_adapter.config import IPAdapterConfig
from cascade_studio.models.presets import build_stage_c, get_preset

EMBED = 32  # the tiny image encoder's width
TINY_ATTN_BLOCKS = 12  # blocks [[2, 4], [4, 2]], one AttnBlock each


def make_base(seed: int = 0, **overrides) -> nn.Module:
    """Tiny Stage C with small random weights everywhere: the official init zeroes the output conv and the
    timestep mappers, which would make the output constant and block every gradient."""
    cfg = {**get_preset("tiny").stage_c, **overrides}
    stage_c = build_stage_c(**cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in stage_c.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.weight[0].numel()), generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.02, generator=g)
    return stage_c.eval().requires_grad_(False)


def make_inputs(batch: int = 2, size: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, size, size, generator=g), "r": torch.rand(batch, generator=g),
            "clip_text": torch.randn(batch, 77, 64, generator=g),
            "clip_text_pooled": torch.randn(batch, 1, 64, generator=g),
            "clip_img": torch.zeros(batch, 1, EMBED)}


def embeds(batch: int = 2, images: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, images, EMBED, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: extra threads only contend with each other (and other jobs) on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapted(seed: int = 0, base: nn.Module | None = None, **adapter_kw) -> tuple[AdaptedStageC, IPAdapter]:
    """A seeded base (or ``base``) and a seeded fresh adapter (its image projection draws from the global RNG)."""
    base = make_base(seed) if base is None else base
    model = AdaptedStageC(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = IPAdapter.for_stage_c(base, embed_dim=EMBED, image_encoder="tiny", **adapter_kw)
    model.add_adapter(adapter)
    return model, adapter


def hook_counts(model: AdaptedStageC) -> list[int]:
    return [len(b.attention.attn.attention_hooks) for b in find_attention_blocks(model.stage_c)]


def perturb(adapter: IPAdapter, seed: int = 3) -> None:
    """Move the adapter off its initialisation, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------ exact "off" states
def test_scale_zero_and_zero_embeddings_give_the_base_output_exactly():
    model, adapter = adapted()
    perturb(adapter)
    inp = make_inputs()
    with torch.no_grad():
        base = model.stage_c(**inp)
        adapter.set_scale(0.0)
        assert torch.equal(model(**inp, ip_image_embeds=embeds()), base)
        adapter.set_scale(1.0)
        assert torch.equal(model(**inp, ip_image_embeds=torch.zeros(2, 1, EMBED)), base)
        assert torch.equal(model(**inp), base)  # no image prompt passed at all
        model.set_enabled(adapter.name, False)
        assert torch.equal(model(**inp, ip_image_embeds=embeds()), base)


def test_empty_sample_in_a_batch_is_exactly_base_while_the_other_changes():
    """CFG's unconditional half (zero embeddings) must see the base model, bit for bit."""
    model, adapter = adapted()
    inp = make_inputs()
    e = embeds()
    e[0] = 0
    with torch.no_grad():
        base = model.stage_c(**inp)
        out = model(**inp, ip_image_embeds=e)
    assert torch.equal(out[0], base[0])
    assert (out[1] - base[1]).abs().max() > 1e-3


def test_fresh_adapter_copies_block_kv_and_changes_the_output():
    model, adapter = adapted()
    for layer, block in zip(adapter.ip_layers, find_attention_blocks(model.stage_c)):
        assert torch.equal(layer.to_k_ip.weight, block.attention.attn.to_k.weight)
        assert torch.equal(layer.to_v_ip.bias, block.attention.attn.to_v.bias)
    inp = make_inputs()
    with torch.no_grad():
        diff = (model(**inp, ip_image_embeds=embeds()) - model.stage_c(**inp)).abs().max()
    assert diff > 1e-3


def test_hook_computes_scaled_decoupled_attention_over_image_tokens_only():
    """The value the hook adds, recomputed by hand: softmax(q k_ip^T / sqrt(d)) v_ip * scale, where k_ip/v_ip
    come from the block's kv_mapper applied to the projected image tokens."""
    model, adapter = adapted()
    perturb(adapter)
    adapter.set_scale(0.7)
    block = find_attention_blocks(model.stage_c)[5]
    layer = adapter.ip_layers[5]
    e = embeds()
    q = torch.randn(2, 2, 9, 32)  # [B, nhead, L, head_dim] with c = 64, nhead = 2
    with torch.no_grad(), adapter.apply({"ip_image_embeds": e}, {}):
        got = block.attention.attn.attention_hooks[-1](q)
        tokens = adapter.image_proj.norm(adapter.image_proj.proj(e[:, 0]).view(2, 4, 64))
        kv = F.silu(tokens) @ block.kv_mapper[1].weight.T + block.kv_mapper[1].bias
        k = (kv @ layer.to_k_ip.weight.T + layer.to_k_ip.bias).view(2, 4, 2, 32).transpose(1, 2)
        v = (kv @ layer.to_v_ip.weight.T + layer.to_v_ip.bias).view(2, 4, 2, 32).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)
        expected = 0.7 * weights @ v
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ hook lifetime
def test_hooks_live_only_during_a_call_even_when_it_raises():
    model, adapter = adapted()
    assert hook_counts(model) == [0] * TINY_ATTN_BLOCKS
    with adapter.apply({"ip_image_embeds": embeds()}, {}):
        assert hook_counts(model) == [1] * TINY_ATTN_BLOCKS
    assert hook_counts(model) == [0] * TINY_ATTN_BLOCKS
    inp = make_inputs()
    with torch.no_grad():
        model(**inp, ip_image_embeds=embeds())
    assert hook_counts(model) == [0] * TINY_ATTN_BLOCKS
    inp["x"] = torch.randn(2, 5, 4, 4)  # wrong channel count: Stage C raises inside the hooked call
    with pytest.raises(RuntimeError):
        model(**inp, ip_image_embeds=embeds())
    assert hook_counts(model) == [0] * TINY_ATTN_BLOCKS
    model.remove_adapter(adapter.name)
    assert hook_counts(model) == [0] * TINY_ATTN_BLOCKS


def test_wrong_embedding_width_is_refused_naming_the_encoder():
    model, _ = adapted()
    with pytest.raises(AdapterMismatchError, match="tiny image encoder"):
        model(**make_inputs(), ip_image_embeds=torch.randn(2, 1, 768))


# ------------------------------------------------------------------------------------------ training
def test_only_adapter_parameters_get_gradients_and_the_base_is_untouched():
    model, adapter = adapted()
    base_before = {k: v.clone() for k, v in model.stage_c.state_dict().items()}
    opt = torch.optim.Adam(adapter.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(**make_inputs(), ip_image_embeds=embeds()).square().mean().backward()
        opt.step()
    params = adapter.trainable_parameters()
    assert len(params) == 4 + 4 * TINY_ATTN_BLOCKS  # proj w/b, norm w/b; to_k_ip/to_v_ip w/b per block
    assert {id(p) for p in params} == {id(p) for p in adapter.parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.stage_c.parameters())
    assert all(torch.equal(v, base_before[k]) for k, v in model.stage_c.state_dict().items())


def test_short_training_learns_an_image_dependent_target():
    """Four fixed image embeddings, same text and latent, four different targets: only the image prompt can
    tell the samples apart, so a falling loss (and a worse loss with images shuffled) shows it is used."""
    model, adapter = adapted()
    g = torch.Generator().manual_seed(5)
    inp = {k: v[:1].expand(4, *v.shape[1:]) for k, v in make_inputs(batch=1).items()}
    e = torch.randn(4, 1, EMBED, generator=g)
    with torch.no_grad():
        base = model.stage_c(**inp)
    target = base + 0.5 * base.std() * torch.randn(base.shape, generator=g)
    opt = torch.optim.Adam(adapter.trainable_parameters(), lr=3e-3)

    def loss(image_embeds):
        return (model(**inp, ip_image_embeds=image_embeds) - target).square().mean()

    with torch.no_grad():
        start = loss(e).item()
    for _ in range(100):
        opt.zero_grad()
        loss(e).backward()
        opt.step()
    with torch.no_grad():
        end, shuffled = loss(e).item(), loss(e.roll(1, dims=0)).item()
    assert end < 0.1 * start
    assert shuffled > 5 * end


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointed blocks are recomputed in backward, after the call's hooks are gone; the adapter must not
    let that break (CheckpointError) or change the gradients, and must leave the flag as it found it."""
    grads = []
    for checkpointing in (False, True):
        model, adapter = adapted()
        model.gradient_checkpointing = checkpointing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "checkpointing paused" notice, when the base cannot replay
            model(**make_inputs(), ip_image_embeds=embeds()).square().mean().backward()
        assert model.gradient_checkpointing is checkpointing
        grads.append(torch.cat([p.grad.flatten() for p in adapter.trainable_parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_training_inputs_dropout_is_one_exclusive_draw():
    n = 20000
    g = torch.Generator().manual_seed(0)
    # Small text shapes keep 20000 samples cheap; the dropout does not care about widths.
    batch = {"ip_image_embeds": torch.randn(n, 1, EMBED, generator=g) + 3.0,
             "null_clip_text": torch.full((1, 3, 4), 7.0), "null_clip_text_pooled": torch.full((1, 4), 7.0)}
    inputs = {"clip_text": torch.ones(n, 3, 4), "clip_text_pooled": torch.ones(n, 1, 4), "clip_img": None}
    cfg = IPAdapterConfig(drop_image=0.05, drop_text=0.1, drop_both=0.15)
    out = ipa.training_inputs(batch, inputs, cfg, torch.Generator().manual_seed(1))
    no_image = (out["ip_image_embeds"] == 0).all(dim=(1, 2))
    null_text = (out["clip_text"] == 7.0).all(dim=(1, 2))
    assert torch.equal(null_text, (out["clip_text_pooled"] == 7.0).all(dim=(1, 2)))
    assert ((out["clip_text"] == 1.0).all(dim=(1, 2)) | null_text).all()  # untouched or fully replaced
    for observed, p in (((no_image & ~null_text).float().mean(), 0.05),
                        ((null_text & ~no_image).float().mean(), 0.10),
                        ((no_image & null_text).float().mean(), 0.15)):
        assert abs(float(observed) - p) < 0.012
    kept = ~no_image
    assert torch.equal(out["ip_image_embeds"][kept], batch["ip_image_embeds"][kept])
    # Held-out evaluation drops nothing; a cache without null-caption features drops text to zeros.
    assert torch.equal(ipa.training_inputs(batch, inputs, cfg, None, train=False)["ip_image_embeds"],
                       batch["ip_image_embeds"])
    del batch["null_clip_text"], batch["null_clip_text_pooled"]
    out = ipa.training_inputs(batch, inputs, IPAdapterConfig(drop_image=0, drop_text=1.0, drop_both=0), g)
    assert out["clip_text"].abs().sum() == 0 and out["clip_text_pooled"].abs().sum() == 0
    with pytest.raises(KeyError, match="image_encoder_feature"):
        ipa.training_inputs({}, inputs, cfg, g)


# ------------------------------------------------------------------------------------------ several images
def test_multi_image_average_and_concat_behave_as_documented():
    inp = make_inputs()
    a, b = embeds(seed=10), embeds(seed=11)
    zero = torch.zeros_like(a)
    avg_model, avg = adapted(multi_image="average")
    cat_model, cat = adapted(multi_image="concat")
    cat.load_adapter_state_dict(avg.adapter_state_dict())
    with torch.no_grad():
        def run(model, e):
            return model(**inp, ip_image_embeds=e)

        single = run(avg_model, a)
        # average: embeddings are averaged (empty slots excluded) before the projection
        assert torch.equal(run(avg_model, torch.cat([a, b], 1)), run(avg_model, (a + b) / 2))
        assert torch.equal(run(avg_model, torch.cat([a, zero], 1)), single)
        # concat: token sequences are joined; duplicates change nothing, order does not matter, empties masked
        torch.testing.assert_close(run(cat_model, a), single, rtol=0, atol=0)
        torch.testing.assert_close(run(cat_model, torch.cat([a, a], 1)), single, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run(cat_model, torch.cat([a, b], 1)), run(cat_model, torch.cat([b, a], 1)),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run(cat_model, torch.cat([zero, a], 1)), single, rtol=1e-5, atol=1e-5)
        assert (run(cat_model, torch.cat([a, b], 1)) - run(avg_model, torch.cat([a, b], 1))).abs().max() > 1e-4


def test_one_image_prompt_row_serves_the_whole_batch():
    model, _ = adapted()
    inp, e = make_inputs(), embeds(batch=1)
    with torch.no_grad():
        # batched matmuls of a broadcast row and of a materialised one may round differently (seen: 2e-6 on AVX512)
        torch.testing.assert_close(model(**inp, ip_image_embeds=e), model(**inp, ip_image_embeds=e.expand(2, 1, -1)),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one row per sample"):
        model(**make_inputs(batch=3), ip_image_embeds=embeds(batch=2))


# ------------------------------------------------------------------------------------------ files
def test_export_then_load_reproduces_outputs_and_holds_only_adapter_tensors(tmp_path):
    context = AdapterContext(preset="tiny", base_fingerprint="abc123", stage_c_config=get_preset("tiny").stage_c)
    model = AdaptedStageC(make_base())
    adapter = ipa.create_adapter(IPAdapterConfig(image_encoder="tiny", num_tokens=2, scale=0.8), model, context)
    perturb(adapter)
    inp, e = make_inputs(), embeds()
    with torch.no_grad():
        expected = model(**inp, ip_image_embeds=e)
    path = ipa.export_adapter(adapter, tmp_path / "style", extra_metadata={"cascade_studio.recipe": "r.yaml"})
    assert path.name == "style.safetensors"
    tensors, meta = load_adapter_tensors(path)
    assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in tensors)
    assert {k for k in tensors if k.startswith("ip_adapter.")} == {
        f"ip_adapter.{i}.{p}.{t}" for i in range(TINY_ATTN_BLOCKS) for p in ("to_k_ip", "to_v_ip")
        for t in ("weight", "bias")}
    assert tensors["image_proj.proj.weight"].shape == (2 * 64, EMBED)
    assert meta["modelspec.architecture"] == "stable-cascade-v1-prior/ip-adapter"
    assert (meta["cascade_studio.image_encoder"], meta["cascade_studio.image_embed_dim"]) == ("tiny", "32")
    assert (meta["cascade_studio.num_tokens"], meta["cascade_studio.attn_blocks"]) == ("2", "12")
    assert (meta["cascade_studio.base_width"], meta["cascade_studio.base_fingerprint"]) == ("64", "abc123")
    assert meta["cascade_studio.recipe"] == "r.yaml"
    assert detect_method(path) == "ip_adapter"

    fresh = AdaptedStageC(make_base())
    loaded = load_adapter(path, fresh, context, scale=0.8)
    assert loaded.name == "style" and loaded.num_tokens == 2
    with torch.no_grad():
        assert torch.equal(fresh(**inp, ip_image_embeds=e), expected)


def test_files_for_another_base_or_encoder_are_refused(tmp_path):
    model, adapter = adapted()
    path = ipa.export_adapter(adapter, tmp_path / "ip.safetensors")
    narrow = AdaptedStageC(make_base(c_hidden=[32, 32], nhead=[2, 2]))
    with pytest.raises(AdapterMismatchError, match=r"ip\.safetensors.*width 64.*width 32"):
        ipa.load_adapter_file(path, narrow, AdapterContext(preset="narrow"))
    shallow = AdaptedStageC(make_base(blocks=[[1, 1], [1, 1]]))
    with pytest.raises(AdapterMismatchError, match=r"ip\.safetensors.*12 attention blocks.*has 4"):
        ipa.load_adapter_file(path, shallow)
    with pytest.raises(AdapterMismatchError, match=r"ip\.safetensors.*image encoder tiny.*clip-vit-l-14"):
        ipa.load_adapter_file(path, AdaptedStageC(make_base()), image_encoder="clip-vit-l-14")
    assert not narrow.enabled and not shallow.enabled  # nothing half-attached


# ------------------------------------------------------------------------------------------ recipe and cache
def test_create_adapter_reads_the_encoder_width_without_building_it():
    assert ipa.image_embed_dim("tiny") == EMBED
    assert ipa.image_embed_dim("openclip-vit-h-14") == 1024  # meta-device build: no ViT-H weights allocated
    model = AdaptedStageC(make_base())
    adapter = ipa.create_adapter(IPAdapterConfig(image_encoder="tiny", num_tokens=3), model, None, name="ip")
    assert model.get_adapter("ip") is adapter
    assert (adapter.embed_dim, adapter.num_tokens, adapter.num_blocks) == (EMBED, 3, TINY_ATTN_BLOCKS)


def test_cache_feature_encodes_images_lazily_and_reproducibly():
    from cascade_studio.data.cache import FeatureEncoder

    feature = ipa.image_encoder_feature(IPAdapterConfig(image_encoder="tiny"))
    assert feature._encoder is None  # nothing built until the cache asks for an identity or an encoding
    assert isinstance(feature, FeatureEncoder) and feature.inputs == "image"
    images = [torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    out = feature.encode(images)["ip_image_embeds"]
    assert out.shape == (3, 1, EMBED) and out.abs().sum() > 0
    again = ipa.image_encoder_feature(IPAdapterConfig(image_encoder="tiny"))
    assert again.identity == feature.identity  # the random tiny encoder is seeded: cache hits across runs
    assert torch.equal(again.encode(images)["ip_image_embeds"], out)

    with pytest.raises(RuntimeError, match="ip_image_encoder_loader"):
        ipa.image_encoder_feature(IPAdapterConfig(image_encoder="openclip-vit-h-14")).encode(images)
    context = AdapterContext(extra={"ip_image_encoder_loader": lambda name: feature.encoder})
    loaded = ipa.image_encoder_feature(IPAdapterConfig(image_encoder="clip-vit-l-14"), context)
    assert torch.equal(loaded.encode(images)["ip_image_embeds"], out)


def test_generation_falls_back_to_the_base_models_image_encoder_as_training_does(tmp_path):
    """No --ip-image-encoder: generation loads the adapter's encoder from the base's weights
    (model.image_encoder, else model.repo_id), as a training run does, instead of refusing."""
    from types import SimpleNamespace

    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    from cascade_studio.inference.adapters import AdapterInputs
    from cascade_studio.inference.pipeline import CascadeComponents, ModelSpec
    from cascade_studio.models.encoders import image_encoder_config

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(image_encoder_config("tiny")).save_pretrained(tmp_path / "base" / "image_encoder")
    adapter_file = tmp_path / "ip.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(1)}, str(adapter_file),
              metadata={"cascade_studio.image_encoder": "clip-vit-l-14"})
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "ref.png")
    resolved = SimpleNamespace(path=str(adapter_file), spec=SimpleNamespace(image_prompts=(str(tmp_path / "ref.png"),)))

    components = CascadeComponents(ModelSpec(preset="tiny", repo_id=str(tmp_path / "base")), device="cpu")
    inputs = AdapterInputs(64, 64, "cpu", None, model_image_encoder=components.spec.source("image_encoder"))
    ipa.method.generation_prepare(resolved, inputs)
    (embeds,) = inputs.cache.values()
    assert embeds.shape == (1, image_encoder_config("tiny").projection_dim)
