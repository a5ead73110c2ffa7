"""diffusers' StableCascadeUNet as an independent oracle: same tiny config, the parity weights renamed to the
diffusers layout (attention split into attention.to_q/to_k/to_v/to_out.0 without the .attn level; Stage B's
clip_mapper called clip_txt_pooled_mapper), same outputs. Also checks our diffusers -> official converters on
diffusers' real key names."""

from __future__ import annotations

# diffusers is a test extra; a missing install must fail, not skip.
import diffusers.models.unets.unet_stable_cascade as unet_module
import torch

from cascade_studio.models import (
    build_stage_b,
    build_stage_c,
    convert_diffusers_stage_b_keys,
    convert_diffusers_stage_c_keys,
    load_official_state_dict,
)

C_BLOCK = ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")


def official_to_diffusers(weights: dict, stage_b: bool = False) -> dict:
    """Rename official keys to diffusers' layout (written here, independent of cascade_studio.models.official)."""
    out = {}
    for key, tensor in weights.items():
        if key.endswith(".attention.attn.in_proj_weight") or key.endswith(".attention.attn.in_proj_bias"):
            holder = key.split(".attn.")[0]
            leaf = "weight" if key.endswith("weight") else "bias"
            q, k, v = tensor.chunk(3, dim=0)
            out.update({f"{holder}.to_q.{leaf}": q, f"{holder}.to_k.{leaf}": k, f"{holder}.to_v.{leaf}": v})
        elif ".attention.attn.out_proj." in key:
            out[key.replace(".attention.attn.out_proj.", ".attention.to_out.0.")] = tensor
        elif stage_b and key.startswith("clip_mapper."):
            out["clip_txt_pooled_mapper." + key[len("clip_mapper."):]] = tensor
        else:
            out[key] = tensor
    return out


def diffusers_prior(cfg: dict):
    return unet_module.StableCascadeUNet(
        in_channels=cfg["c_in"], out_channels=cfg["c_out"], timestep_ratio_embedding_dim=cfg["c_r"], patch_size=1,
        conditioning_dim=cfg["c_cond"], block_out_channels=tuple(cfg["c_hidden"]),
        num_attention_heads=tuple(cfg["nhead"]), down_num_layers_per_block=tuple(cfg["blocks"][0]),
        up_num_layers_per_block=tuple(cfg["blocks"][1]), down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(1, 1), block_types_per_layer=(C_BLOCK, C_BLOCK),
        clip_text_in_channels=cfg["c_clip_text"], clip_text_pooled_in_channels=cfg["c_clip_text_pooled"],
        clip_image_in_channels=cfg["c_clip_img"], clip_seq=cfg["c_clip_seq"], dropout=tuple(cfg["dropout"]),
        self_attn=True, timestep_conditioning_type=("sca", "crp"), switch_level=(False,),
    )


def diffusers_decoder(cfg: dict):
    ct_block = ("SDCascadeResBlock", "SDCascadeTimestepBlock")
    return unet_module.StableCascadeUNet(
        in_channels=cfg["c_in"], out_channels=cfg["c_out"], timestep_ratio_embedding_dim=cfg["c_r"],
        patch_size=cfg["patch_size"], conditioning_dim=cfg["c_cond"], block_out_channels=tuple(cfg["c_hidden"]),
        num_attention_heads=tuple(max(h, 0) for h in cfg["nhead"]),
        down_num_layers_per_block=tuple(cfg["blocks"][0]), up_num_layers_per_block=tuple(cfg["blocks"][1]),
        down_blocks_repeat_mappers=tuple(cfg["block_repeat"][0]),
        up_blocks_repeat_mappers=tuple(cfg["block_repeat"][1]),
        block_types_per_layer=(ct_block, ct_block, C_BLOCK, C_BLOCK), clip_text_pooled_in_channels=cfg["c_clip"],
        clip_seq=cfg["c_clip_seq"], effnet_in_channels=cfg["c_effnet"], pixel_mapper_in_channels=cfg["c_pixels"],
        dropout=(0.0, 0.0, 0.1, 0.1), self_attn=True, timestep_conditioning_type=("sca",), switch_level=None,
    )


def _assert_tensors_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@torch.no_grad()
def test_stage_c_matches_diffusers(official_parity):
    weights = official_parity.weights("stage_c")
    peer = diffusers_prior(official_parity.config("stage_c"))
    peer.load_state_dict(official_to_diffusers(weights), strict=True)
    peer.eval()
    ours = build_stage_c(**official_parity.config("stage_c"))
    load_official_state_dict(ours, weights)
    ours.eval()
    g = lambda k: official_parity("stage_c", k)  # noqa: E731
    want = peer(g("x"), g("r"), clip_text_pooled=g("clip_text_pooled"), clip_text=g("clip_text"),
                clip_img=g("clip_img"), return_dict=False)[0]
    got = ours(g("x"), g("r"), g("clip_text"), g("clip_text_pooled"), g("clip_img"))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # sca/crp reach the model the same way in both. diffusers 0.42 tests `cond or zeros`, which only works for
    # one-element tensors, so compare on the first sample.
    g1 = lambda k: g(k)[:1]  # noqa: E731
    assert g1("sca").item() != 0 and g1("crp").item() != 0
    want = peer(g1("x"), g1("r"), clip_text_pooled=g1("clip_text_pooled"), clip_text=g1("clip_text"),
                clip_img=g1("clip_img"), sca=g1("sca"), crp=g1("crp"), return_dict=False)[0]
    got = ours(g1("x"), g1("r"), g1("clip_text"), g1("clip_text_pooled"), g1("clip_img"), sca=g1("sca"), crp=g1("crp"))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, official_parity("stage_c", "out_sca_crp")[:1], atol=1e-4, rtol=0)

@torch.no_grad()
def test_stage_b_matches_diffusers(official_parity):
    weights = official_parity.weights("stage_b")
    peer = diffusers_decoder(official_parity.config("stage_b"))
    peer.load_state_dict(official_to_diffusers(weights, stage_b=True), strict=True)
    peer.eval()
    ours = build_stage_b(**official_parity.config("stage_b"))
    load_official_state_dict(ours, weights)
    ours.eval()
    g = lambda k: official_parity("stage_b", k)  # noqa: E731
    want = peer(g("x"), g("r"), clip_text_pooled=g("clip"), effnet=g("effnet"), pixels=g("pixels"),
                return_dict=False)[0]
    got = ours(g("x"), g("r"), g("effnet"), g("clip"), pixels=g("pixels"))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_converters_turn_diffusers_keys_into_official(official_parity):
    weights = official_parity.weights("stage_c")
    peer = diffusers_prior(official_parity.config("stage_c"))
    peer.load_state_dict(official_to_diffusers(weights), strict=True)
    _assert_tensors_equal(convert_diffusers_stage_c_keys(peer.state_dict()), weights)

    weights_b = official_parity.weights("stage_b")
    peer_b = diffusers_decoder(official_parity.config("stage_b"))
    peer_b.load_state_dict(official_to_diffusers(weights_b, stage_b=True), strict=True)
    _assert_tensors_equal(convert_diffusers_stage_b_keys(peer_b.state_dict()), weights_b)
