"""Behaviour the rest of the studio relies on: attention hooks, gradient checkpointing, the official fresh
init, exact save/load round trips, ControlNet injection order, and error messages that name the bad keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cascade_studio.models import (
    PRESETS,
    AttnBlock,
    ResBlock,
    StateDictMismatchError,
    TimestepBlock,
    build_controlnet,
    build_previewer,
    build_stage_a,
    build_stage_b,
    build_stage_c,
    load_official_state_dict,
    official_state_dict,
)
from cascade_studio.models.blocks import Attention, UpDownBlock2d


@pytest.fixture()
def stage_c(official_parity):
    """A Stage C with random non-zero weights (a fresh one would output a constant and hide every effect)."""
    model = build_stage_c(**official_parity.config("stage_c"))
    load_official_state_dict(model, official_parity.weights("stage_c"))
    return model.eval()


@pytest.fixture()
def inputs(official_parity):
    return [official_parity("stage_c", k) for k in ("x", "r", "clip_text", "clip_text_pooled", "clip_img")]


def _attns(model: nn.Module) -> list[Attention]:
    return [m.attention.attn for m in model.modules() if isinstance(m, AttnBlock)]


def _resblocks_in_call_order(model) -> list[ResBlock]:
    levels = list(model.down_blocks) + list(model.up_blocks)
    return [b for level in levels for b in level if isinstance(b, ResBlock)]


# ------------------------------------------------------------------------------------------------ attention
@torch.no_grad()
def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    nn.init.normal_(mha.in_proj_bias)
    ours = Attention(32, 4).eval()
    load_official_state_dict(ours, mha.state_dict())  # torch's fused layout is the official one
    x, kv = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    torch.testing.assert_close(ours(x, kv), mha(x, kv, kv, need_weights=False)[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_attention_hooks_zero_nonzero_and_remove(stage_c, inputs):
    base = stage_c(*inputs)
    attns = _attns(stage_c)
    keys_before = list(stage_c.state_dict())
    seen = []

    def zero_hook(q):
        seen.append(tuple(q.shape))
        return torch.zeros_like(q)

    handles = [a.add_attention_hook(zero_hook) for a in attns]
    assert torch.equal(stage_c(*inputs), base)
    assert list(stage_c.state_dict()) == keys_before  # hooks are not parameters or submodules
    # [B, nhead, L, head_dim]: 3x4 latent -> 12 query tokens, c_hidden 32 over 2 heads -> 16.
    assert seen and set(seen) == {(2, 2, 12, 16)}
    assert len(seen) == len(attns)
    for h in handles:
        h.remove()

    handle = attns[0].add_attention_hook(lambda q: torch.full_like(q, 0.1))
    changed = stage_c(*inputs)
    assert (changed - base).abs().max() > 1e-3
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(stage_c(*inputs), base)
    assert all(a.attention_hooks == [] for a in attns)


# -------------------------------------------------------------------------------------- gradient checkpointing
def _forward_backward(model, inputs, checkpointing: bool):
    model.gradient_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    x = inputs[0].clone().requires_grad_(True)
    torch.manual_seed(123)  # train mode: dropout masks must come out the same with recomputation
    out = model(x, *inputs[1:])
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


def test_gradient_checkpointing_same_outputs_and_grads(stage_c, inputs):
    stage_c.train()
    calls = []
    # A pre-hook: recomputation stops early once it has what backward needs, so a post-hook may not fire.
    stage_c.down_blocks[0][0].register_forward_pre_hook(lambda *_: calls.append(1))
    out_ref, xg_ref, grads_ref = _forward_backward(stage_c, inputs, False)
    assert len(calls) == 1
    calls.clear()
    out_ck, xg_ck, grads_ck = _forward_backward(stage_c, inputs, True)
    assert len(calls) == 2  # really checkpointed: the block ran again during backward
    torch.testing.assert_close(out_ck, out_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(xg_ck, xg_ref, atol=1e-5, rtol=0)
    assert grads_ck.keys() == grads_ref.keys() and len(grads_ref) > 100
    for name in grads_ref:
        torch.testing.assert_close(grads_ck[name], grads_ref[name], atol=1e-5, rtol=0, msg=name)
    calls.clear()
    with torch.no_grad():
        stage_c(*inputs)
    assert len(calls) == 1  # no checkpoint machinery without grads


@torch.no_grad()
def test_dropout_acts_in_train_mode_only(stage_c, inputs):
    eval_out = stage_c(*inputs)
    assert torch.equal(stage_c(*inputs), eval_out)
    stage_c.train()
    assert (stage_c(*inputs) - eval_out).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- fresh init
def test_fresh_official_init_outputs_constant_and_passes_no_gradient():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].stage_c
    model = build_stage_c(**cfg).eval()
    for block in model.modules():
        if isinstance(block, TimestepBlock):
            assert all(torch.count_nonzero(m.weight) == 0 for m in block.modules() if isinstance(m, nn.Linear))
    x1 = torch.randn(2, 16, 8, 8, requires_grad=True)
    cond = [torch.rand(2), torch.randn(2, 77, 64), torch.randn(2, 1, 64), torch.randn(2, 1, 32)]
    out1 = model(x1, *cond)
    out2 = model(torch.randn(2, 16, 8, 8) * 5, *cond)
    assert torch.equal(out1, out2)
    assert torch.equal(out1, model.clf[1].bias.view(1, -1, 1, 1).expand_as(out1))
    out1.sum().backward()
    assert torch.count_nonzero(x1.grad) == 0
    # ...while the network itself is not degenerate: the clip mappers got the official std 0.02.
    assert model.clip_img_mapper.weight.std().item() == pytest.approx(0.02, rel=0.2)


# ------------------------------------------------------------------------------------------ save/load round trip
ROUND_TRIP = {
    "stage_c": (build_stage_c, ("x", "r", "clip_text", "clip_text_pooled", "clip_img"), None),
    "stage_b": (build_stage_b, ("x", "r", "effnet", "clip"), None),
    "stage_a": (build_stage_a, ("latent",), "decode"),
    "previewer": (build_previewer, ("x",), None),
    "controlnet": (build_controlnet, ("hint",), None),
}


@torch.no_grad()
@pytest.mark.parametrize("group", list(ROUND_TRIP))
def test_round_trip_reproduces_outputs_exactly(official_parity, group):
    builder, names, method = ROUND_TRIP[group]
    cfg = official_parity.config(group)
    source = load_official_state_dict(builder(**cfg), official_parity.weights(group)).eval()
    saved = {k: v.clone() for k, v in official_state_dict(source).items()}
    with torch.device("meta"):
        target = builder(**cfg)
    load_official_state_dict(target, saved, assign=True)
    target.eval()
    args = [official_parity(group, n) for n in names]
    run = (lambda m: getattr(m, method)(*args)) if method else (lambda m: m(*args))
    a, b = run(source), run(target)
    for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
        assert (x is None and y is None) or torch.equal(x, y)


# ------------------------------------------------------------------------------------------------ errors
def test_mismatch_error_names_missing_unexpected_and_shapes(official_parity):
    weights = dict(official_parity.weights("stage_c"))
    weights.pop("clf.1.weight")
    weights["extra.thing"] = torch.zeros(1)
    weights["down_blocks.0.0.depthwise.weight"] = torch.zeros(7, 1, 3, 3)
    model = build_stage_c(**official_parity.config("stage_c"))
    with pytest.raises(StateDictMismatchError) as info:
        load_official_state_dict(model, weights)
    err = info.value
    assert isinstance(err, ValueError)
    text = str(err)
    assert "StageC" in text and "1 missing key: clf.1.weight" in text
    assert "1 unexpected key: extra.thing" in text
    assert "down_blocks.0.0.depthwise.weight (file [7, 1, 3, 3] vs model [32, 1, 3, 3])" in text
    assert err.missing == ["clf.1.weight"] and err.unexpected == ["extra.thing"]


def test_mismatch_error_summarises_many_keys_and_spots_diffusers_names(official_parity):
    model = build_stage_c(**official_parity.config("stage_c"))
    weights = official_parity.weights("stage_c")
    renamed = {k.replace(".attention.attn.in_proj_weight", ".attention.to_q.weight"): v for k, v in weights.items()}
    with pytest.raises(StateDictMismatchError) as info:
        load_official_state_dict(model, renamed)
    n_attn = sum(isinstance(m, AttnBlock) for m in model.modules())
    text = str(info.value)
    assert f"{n_attn} missing keys" in text and f"and {n_attn - 5} more" in text
    assert "convert_diffusers_stage_c_keys" in text


def test_missing_batchnorm_counters_are_tolerated(official_parity):
    weights = {k: v for k, v in official_parity.weights("previewer").items() if "num_batches_tracked" not in k}
    model = load_official_state_dict(build_previewer(**official_parity.config("previewer")), weights).eval()
    torch.testing.assert_close(model(official_parity("previewer", "x")), official_parity("previewer", "out"))


# ------------------------------------------------------------------------------------------------ ControlNet
@torch.no_grad()
@pytest.mark.parametrize("index", [0, 4, 7, 9])
def test_cnet_entry_i_is_added_before_the_ith_resblock_call(stage_c, inputs, index):
    # float64: activations grow along the stack, and (x + c) - x must recover c without fp32 cancellation.
    stage_c.double()
    inputs = [t.double() for t in inputs]
    blocks = _resblocks_in_call_order(stage_c)
    assert len(blocks) == stage_c.resblock_count() == 10
    captured = []
    hook = blocks[index].register_forward_pre_hook(lambda m, args: captured.append(args[0].clone()))
    stage_c(*inputs)
    control = torch.randn(2, 32, 2, 2, dtype=torch.float64)  # coarser than the 3x4 latent
    stage_c(*inputs, cnet=[None] * index + [control])
    hook.remove()
    resized = nn.functional.interpolate(control, size=(3, 4), mode="bilinear", align_corners=True)
    torch.testing.assert_close(captured[1] - captured[0], resized, atol=1e-9, rtol=0)
    assert torch.equal(resized[..., 0, 0], control[..., 0, 0])  # align_corners keeps the corner values


@torch.no_grad()
def test_cnet_of_nones_or_short_list_changes_nothing(stage_c, inputs):
    base = stage_c(*inputs)
    assert torch.equal(stage_c(*inputs, cnet=[None] * 10), base)
    assert torch.equal(stage_c(*inputs, cnet=[]), base)


@torch.no_grad()
def test_effnet_controlnet_fresh_injects_zeros_with_official_first_conv():
    cnet = build_controlnet(4, 64, [0, 2, 9, 11]).eval()
    first = cnet.backbone[0][0]
    assert first.padding == (0, 0) and first.in_channels == 4  # as the official swap (no padding)
    assert torch.count_nonzero(first.weight[:, 3]) == 0 and torch.count_nonzero(first.weight[:, :3]) > 0
    out = cnet(torch.rand(1, 4, 64, 64))
    assert len(out) == 12 and [i for i, o in enumerate(out) if o is not None] == [0, 2, 9, 11]
    assert out[0].shape == (1, 64, 2, 2) and torch.count_nonzero(out[0]) == 0  # stride 32


# ------------------------------------------------------------------------------------------------ misc
@torch.no_grad()
def test_several_images_give_four_tokens_each(stage_c, official_parity):
    text, pooled = official_parity("stage_c", "clip_text"), official_parity("stage_c", "clip_text_pooled")
    img = official_parity("stage_c", "clip_img")
    two = torch.cat([img, torch.randn_like(img)], dim=1)
    one_tokens = stage_c.gen_c_embeddings(text, pooled, img)
    two_tokens = stage_c.gen_c_embeddings(text, pooled, two)
    assert one_tokens.shape == (2, 77 + 4 + 4, 32) and two_tokens.shape == (2, 77 + 4 + 8, 32)
    torch.testing.assert_close(two_tokens[:, :85], one_tokens)


@torch.no_grad()
def test_scaler_conv_runs_in_float32_for_bf16_models():
    torch.manual_seed(0)
    block = UpDownBlock2d(8, 8, mode="down", enabled=False).to(torch.bfloat16)
    x = torch.randn(1, 8, 4, 4).to(torch.bfloat16)
    want = nn.functional.conv2d(x.float(), block.blocks[0].weight.float(), block.blocks[0].bias.float())
    got = block(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))


@torch.no_grad()
def test_bf16_stage_c_runs_close_to_fp32(stage_c, inputs):
    ref = stage_c(*inputs)
    out = stage_c.to(torch.bfloat16)(*inputs)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


@torch.no_grad()
def test_stage_a_quantized_encode_lands_on_codebook(official_parity):
    model = load_official_state_dict(
        build_stage_a(**official_parity.config("stage_a")), official_parity.weights("stage_a")
    ).eval()
    latent = model.encode(official_parity("stage_a", "image"), quantize=True) * model.scale_factor
    vectors = latent.permute(0, 2, 3, 1).reshape(-1, 4)
    distances = torch.cdist(vectors, model.vquantizer.codebook.weight)
    assert distances.min(dim=1).values.max() < 1e-5


def test_meta_stage_c_forward_gives_shapes_without_memory():
    with torch.device("meta"):
        model = build_stage_c(**PRESETS["tiny"].stage_c)
        out = model(torch.empty(2, 16, 8, 8), torch.empty(2), torch.empty(2, 77, 64), torch.empty(2, 1, 64),
                    torch.empty(2, 1, 32))
    assert out.is_meta and out.shape == (2, 16, 8, 8)


def test_assigned_weights_own_their_memory_and_save(tmp_path, official_parity):
    """assign=True splits fused attention; the parts must not share storage or safetensors refuses to save."""
    from safetensors.torch import load_file, save_file

    with torch.device("meta"):
        model = build_stage_c(**official_parity.config("stage_c"))
    load_official_state_dict(model, official_parity.weights("stage_c"), assign=True)
    assert all(p.requires_grad and not p.is_meta for p in model.parameters())
    save_file(model.state_dict(), str(tmp_path / "stage_c.safetensors"))
    reloaded = load_file(str(tmp_path / "stage_c.safetensors"))
    assert torch.equal(reloaded["down_blocks.0.2.attention.attn.to_k.weight"],
                       official_parity.weights("stage_c")["down_blocks.0.2.attention.attn.in_proj_weight"][32:64])


def _component_digests(preset: str) -> dict[str, str]:
    import hashlib

    from cascade_studio.models.random_init import COMPONENTS, build_random

    digests = {}
    for name in COMPONENTS:
        module = build_random(name, preset)
        h = hashlib.sha256()
        for key, value in sorted(module.state_dict().items()):
            h.update(key.encode() + value.detach().float().numpy().tobytes())
        h.update(bytes(m.training for m in module.modules()))
        digests[name] = h.hexdigest()
    return digests


def test_a_component_built_again_in_a_process_equals_a_first_build():
    """build_random keeps what it built: later builds in the process (and after the caller changed its copy) carry
    the values and train/eval modes of a first build, which a fresh process makes."""
    import json
    import subprocess
    import sys

    from cascade_studio.models.random_init import build_random

    first = build_random("effnet", "tiny")
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)  # the caller's copy; the next build must not see it
    # the same torch threads as this process: the compressor's calibration pass sums in thread-sized chunks
    fresh = subprocess.run([sys.executable, "-c", f"import json, torch; torch.set_num_threads({torch.get_num_threads()}); "
                            "import test_models_invariants as t; print(json.dumps(t._component_digests('tiny')))"],
                           cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
    assert _component_digests("tiny") == _component_digests("tiny") == json.loads(fresh.stdout.splitlines()[-1])


def _random_grn(channels: int, dtype: torch.dtype, seed: int):
    """A GRN with random gamma and beta (the official init zeroes both, which would leave GRN an identity); the
    global RNG is left seeded for the inputs drawn next."""
    from cascade_studio.models.blocks import GlobalResponseNorm

    torch.manual_seed(seed)
    grn = GlobalResponseNorm(channels).to(dtype)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    return grn


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_global_response_norm_is_the_official_formula_in_values_and_gradients(dtype, tol):
    """GRN runs as x*(gamma*nx + 1) + beta over a sum of squares: the official
    ``gamma * (x * Nx) + beta + x`` with ``Gx = ||x||_2 over (H, W)``, including an all-zero channel, whose
    gradient is the norm's subgradient 0 (no inf or NaN)."""
    grn = _random_grn(32, dtype, seed=0)
    x = torch.randn(2, 5, 6, 32).to(dtype)
    x[0, :, :, 3] = 0  # a dead channel
    mine = x.clone().requires_grad_(True)
    theirs = x.clone().float().requires_grad_(True)
    out = grn(mine)
    gx = torch.linalg.vector_norm(theirs, ord=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    expected = grn.gamma.float() * (theirs * nx) + grn.beta.float() + theirs
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    weights = torch.randn(out.shape)
    (out.float() * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.isfinite(mine.grad).all()
    torch.testing.assert_close(mine.grad.float(), theirs.grad, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_gelu_grn_is_the_official_formula_in_values_and_all_gradients(dtype, tol):
    """``gelu_grn`` (one autograd node that keeps only its input) gives GRN(GELU(h)) of the official formula and
    the same gradients for h, gamma and beta, including a channel GELU makes all zero (h very negative)."""
    from cascade_studio.models.blocks import gelu_grn

    grn = _random_grn(24, dtype, seed=1)
    h = torch.randn(3, 4, 5, 24).to(dtype)
    h[1, :, :, 7] = -200.0  # GELU(-200) == 0: a dead channel after the activation
    mine = h.clone().requires_grad_(True)
    out = gelu_grn(mine, grn)
    theirs = h.clone().float().requires_grad_(True)
    gamma = grn.gamma.detach().float().requires_grad_(True)
    beta = grn.beta.detach().float().requires_grad_(True)
    a = torch.nn.functional.gelu(theirs)
    gx = torch.linalg.vector_norm(a, ord=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    expected = gamma * (a * nx) + beta + a
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    weights = torch.randn(out.shape)
    (out.float() * weights).sum().backward()
    (expected * weights).sum().backward()
    for got, want in ((mine.grad, theirs.grad), (grn.gamma.grad, gamma.grad), (grn.beta.grad, beta.grad)):
        assert got is not None and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want, atol=tol * 10, rtol=tol)
    assert mine.grad[1, :, :, 7].abs().max() == 0


def test_fused_gelu_grn_passes_gradcheck_and_runs_inside_resblocks():
    """The written-out backward agrees with finite differences in float64, and a ResBlock with GELU and GRN gives
    the same outputs and gradients as running its channelwise Sequential module by module."""
    from cascade_studio.models.blocks import _GeluGrn

    grn = _random_grn(6, torch.float64, seed=2)
    h = torch.randn(2, 3, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GeluGrn.apply, (h, grn.gamma, grn.beta))

    block = ResBlock(8, c_skip=4)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x, skip = torch.randn(2, 8, 5, 5), torch.randn(2, 4, 5, 5)
    fused = block(x, skip)
    fused.square().sum().backward()
    fused_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    block._channelwise = block.channelwise  # the module-by-module path
    unfused = block(x, skip)
    unfused.square().sum().backward()
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    for name, p in block.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)
