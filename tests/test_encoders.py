"""Encoders: tokenisation ids, what Stage C is fed (pre-final-LN hidden states, pooled at the end token), CLIP
preprocessing, the effnet compressor's layout and geometry, identities and the real architectures' sizes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch

from cascade_studio.models.effnet import IMAGENET_MEAN, IMAGENET_STD, EffnetEncoder
from cascade_studio.models.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    TextEncoder,
    build_effnet,
    build_image_encoder,
    build_ip_image_encoder,
    build_text_encoder,
    text_encoder_config,
    tokenize,
)
from cascade_studio.models.presets import PRESETS

from reference_paths import REFERENCE_DIR  # noqa: E402

REFERENCE = REFERENCE_DIR / "official_state_dict_keys.json"


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    torch.manual_seed(0)
    return build_text_encoder("tiny")


def test_tokenizer_ids_match_clip_bpe():
    ids, mask = tokenize(["a photo of a cat", ""])
    assert ids.shape == (2, 77)
    # Known CLIP BPE ids: sot, "a", "photo", "of", "a", "cat", eot, then zero padding.
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert ids[1, :3].tolist() == [49406, 49407, 0]
    assert mask[0].sum() == 7 and mask[1].sum() == 2
    assert mask[0, :7].all() and not mask[0, 7:].any()


def test_tokenizer_truncates_to_77_ending_with_eot():
    ids, mask = tokenize([" ".join(["cat"] * 200)])
    assert ids.shape == (1, 77)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert (ids[0, 1:-1] == 2368).all()
    assert mask.all()


def test_tokenize_rejects_a_bare_string():
    with pytest.raises(TypeError, match="list"):
        tokenize("a cat")


def test_hidden_is_before_final_layer_norm_and_pooled_is_text_embeds(text_encoder):
    prompts = ["a photo of a cat", "a dog"]
    hidden, pooled = text_encoder.encode(prompts)
    assert hidden.shape == (2, 77, 64) and pooled.shape == (2, 1, 64)
    ids, mask = tokenize(prompts)
    model = text_encoder.model
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        final = model.text_model.final_layer_norm(hidden)
    torch.testing.assert_close(final, out.last_hidden_state)
    assert not torch.allclose(hidden, out.last_hidden_state, atol=1e-3)  # really the pre-LN tensor
    torch.testing.assert_close(pooled[:, 0], out.text_embeds)
    # Pooling must pick the end token (index 6 and 3 here), projected.
    expected = model.text_projection(final[torch.arange(2), torch.tensor([6, 3])])
    torch.testing.assert_close(pooled[:, 0], expected)


@pytest.mark.parametrize("eos_token_id", [1, 2])
def test_pooling_uses_end_token_whatever_the_config_says(eos_token_id):
    """Configs from other exports carry other eos ids (2 in older transformers exports; 1 would make transformers
    pool at position 0 with open_clip ids); the wrapper must pool at open_clip's end token 49407."""
    from transformers import CLIPTextModelWithProjection

    config = text_encoder_config("tiny", eos_token_id=eos_token_id)
    torch.manual_seed(1)
    model = CLIPTextModelWithProjection(config)
    encoder = TextEncoder(model)
    hidden, pooled = encoder.encode(["a photo of a cat"])
    with torch.no_grad():
        final = model.text_model.final_layer_norm(hidden)
        expected = model.text_projection(final[:, 6])
    torch.testing.assert_close(pooled[:, 0], expected)


def test_empty_caption_gives_a_distinct_unconditional_embedding(text_encoder):
    hidden, pooled = text_encoder.encode([""])
    again, _ = text_encoder.encode([""])
    cat, cat_pooled = text_encoder.encode(["a cat"])
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()
    torch.testing.assert_close(hidden, again)
    assert not torch.allclose(pooled, cat_pooled)


def test_prompts_do_not_leak_across_the_batch(text_encoder):
    alone, alone_pooled = text_encoder.encode(["a red bicycle"])
    batch, batch_pooled = text_encoder.encode(["a red bicycle", "an extremely long and different caption " * 5])
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch_pooled[:1], alone_pooled, atol=1e-5, rtol=1e-5)


def test_encoders_are_frozen_and_stay_in_eval(text_encoder):
    image_encoder = build_image_encoder("tiny")
    effnet = build_effnet("tiny")
    for encoder in (text_encoder, image_encoder, effnet):
        assert not any(p.requires_grad for p in encoder.parameters())
        encoder.train()
        assert not any(m.training for m in encoder.modules())
    hidden, _ = text_encoder.encode(["x"])
    assert hidden.grad_fn is None


def test_image_preprocessing_center_crops_and_normalises():
    encoder = build_image_encoder("tiny")  # 32 px
    # A 32x96 image: resizing the short side to 32 changes nothing, so the crop must be columns 32..63.
    ramp = torch.linspace(0, 1, 96).view(1, 1, 1, 96).expand(1, 3, 32, 96).contiguous()
    pixels = encoder.preprocess(ramp)
    assert pixels.shape == (1, 3, 32, 32)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, (ramp[..., 32:64] - mean) / std, atol=1e-5, rtol=1e-5)
    # A constant image of any size stays constant through the bicubic resize.
    grey = torch.full((2, 3, 80, 50), 0.25)
    torch.testing.assert_close(encoder.preprocess(grey), ((0.25 - mean) / std).expand(2, 3, 32, 32))


def test_image_encoder_returns_projected_embeds():
    encoder = build_image_encoder("tiny")
    images = torch.rand(3, 3, 48, 40)
    embeds = encoder.encode(images)
    assert embeds.shape == (3, 1, encoder.embed_dim) == (3, 1, 32)
    with torch.no_grad():
        direct = encoder.model(pixel_values=encoder.preprocess(images)).image_embeds
    torch.testing.assert_close(embeds[:, 0], direct)


def test_tiny_ip_image_encoder_is_open_clip_with_same_contract():
    encoder = build_ip_image_encoder("tiny")
    images = torch.rand(2, 3, 40, 40)
    embeds = encoder.encode(images)
    assert embeds.shape == (2, 1, encoder.embed_dim) == (2, 1, 32)
    with torch.no_grad():
        direct = encoder.visual(encoder.preprocess(images))
    torch.testing.assert_close(embeds[:, 0], direct)


def test_effnet_keys_equal_official_list():
    expected = json.loads(REFERENCE.read_text())
    encoder = build_effnet("big", device="meta")
    got = [[k, list(v.shape)] for k, v in encoder.state_dict().items()]
    assert got == expected["keys"]["effnet_encoder"]
    assert sum(v.numel() for v in encoder.state_dict().values()) == expected["param_counts"]["effnet_encoder"]


def test_tiny_effnet_gives_stage_c_latents_at_stride_32():
    effnet = build_effnet("tiny")
    latents = effnet.encode(torch.rand(2, 3, 256, 256))
    assert latents.shape == (2, 16, 8, 8)
    assert build_effnet("big", device="meta").encode(torch.rand(1, 3, 768, 768, device="meta")).shape == (1, 16, 24, 24)


def test_effnet_encode_applies_imagenet_normalisation():
    torch.manual_seed(0)
    effnet = build_effnet("tiny")
    images = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(effnet.encode(images), effnet((images - mean) / std))
        assert not torch.allclose(effnet.encode(images), effnet(images))


def test_identity_follows_the_weights():
    torch.manual_seed(0)
    first = build_effnet("tiny")
    torch.manual_seed(0)
    twin = build_effnet("tiny")
    assert first.identity == twin.identity
    assert first.identity.startswith("effnet-tiny-c16:")
    before = first.identity
    with torch.no_grad():
        first.mapper[1].running_mean.add_(1e-3)  # a buffer change changes encodings too
    assert first.identity != before
    with torch.no_grad():
        first.mapper[1].running_mean.sub_(1e-3)
        first.backbone[0][0].weight.data[0, 0, 0, 0] += 1.0  # through .data, which bypasses version counters
    assert first.identity != before
    assert twin.to(torch.bfloat16).identity != before  # a different dtype encodes differently


def test_text_and_image_identities_change_with_weights(text_encoder):
    before = text_encoder.identity
    assert before.startswith("clip-text-h64-l2-p64-openclip-bpe77-prefinalln:")
    with torch.no_grad():
        text_encoder.model.text_projection.weight[0, 0] += 1.0
    assert text_encoder.identity != before
    with torch.no_grad():
        text_encoder.model.text_projection.weight[0, 0] -= 1.0
    image_encoder = build_image_encoder("tiny")
    ip = build_ip_image_encoder("tiny")
    assert image_encoder.identity != ip.identity


def test_meta_weights_never_share_an_identity_with_real_ones():
    # the device dry run encodes on the meta device (no values): its cache entries must never serve a real run
    meta = build_effnet("tiny", device="meta").identity
    real = build_effnet("tiny").identity
    assert "meta-" in meta and "meta-" not in real and meta != real


def test_real_architectures_match_published_sizes():
    """Parameter counts as open_clip's model profile lists them (bigG text 694.66M, ViT-L/14 image 303.97M,
    ViT-H-14 image 632.08M, bigG image 1844.91M), built on the meta device so it costs nothing."""
    text = build_text_encoder("big", device="meta")
    assert (text.hidden_size, text.embed_dim) == (1280, 1280)
    assert round(sum(p.numel() for p in text.parameters()) / 1e6, 2) == 694.66
    image = build_image_encoder("lite", device="meta")
    assert image.embed_dim == 768 and image.image_size == 224
    assert round(sum(p.numel() for p in image.parameters()) / 1e6, 2) == 303.97
    for name, dim, millions in [("openclip-vit-h-14", 1024, 632.08), ("clip-vit-bigg-14", 1280, 1844.91)]:
        encoder = build_ip_image_encoder(name, device="meta")
        assert encoder.embed_dim == dim
        assert round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2) == millions
    assert build_ip_image_encoder("clip-vit-l-14", device="meta").embed_dim == 768


@pytest.mark.parametrize("preset", ["big", "lite", "tiny"])
def test_encoder_widths_agree_with_stage_c_presets(preset):
    stage_c = {"c_clip_text": 1280, "c_clip_text_pooled": 1280, "c_clip_img": 768, **PRESETS[preset].stage_c}
    text = build_text_encoder(preset, device="meta")
    image = build_image_encoder(preset, device="meta")
    assert text.hidden_size == stage_c["c_clip_text"]
    assert text.embed_dim == stage_c["c_clip_text_pooled"]
    assert image.embed_dim == stage_c["c_clip_img"]
    assert isinstance(build_effnet(preset, device="meta"), EffnetEncoder)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="big, lite, tiny"):
        build_text_encoder("huge")
    with pytest.raises(ValueError, match="openclip-vit-h-14"):
        build_ip_image_encoder("vit-g")
