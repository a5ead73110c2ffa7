"""train.checkpointing=selective (issue 20 item 2): Stage C blocks under selective activation checkpointing give
the outputs and gradients of no checkpointing (LoRA inside the blocks, an IP-style attention hook with its own
trainable weight, ControlNet features between the blocks, dropout on), keep less than no checkpointing and more
than whole-block checkpointing, and the recipe switch refuses a pair that contradicts
``train.gradient_checkpointing``. The compiled path is in tests/test_compile.py; the planner's prediction for the
mode in tests/test_plan.py."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from cascade_studio.adapters.base import AdaptedStageC
from cascade_studio.adapters.lora import LoraAdapter, LoraSpec
from cascade_studio.config import RecipeError, load_recipe
from cascade_studio.models import build_stage_c, get_preset
from cascade_studio.models.checkpointing import SELECTIVE_POLICY, policy_fn
from cascade_studio.trainers.components import make_random_base_learnable
from cascade_studio.trainers.plan import measure_peak_tensor_bytes
from cascade_studio.trainers.steps import diffusion_training_loss, step_generator
from tests.test_lora import randomize, tiny_inputs
from tests.tiny_train import TINY_LORA, assert_same_training, train_tiny_lora



def tiny_model(dropout: float = 0.1) -> tuple[AdaptedStageC, LoraAdapter]:
    """The tiny Stage C in training mode with dropout in every block, and a LoRA with dropout and a random B."""
    torch.manual_seed(0)
    stage_c = make_random_base_learnable(build_stage_c(**dict(get_preset("tiny").stage_c, dropout=dropout)), seed=0)
    model = AdaptedStageC(stage_c.train().requires_grad_(False))
    adapter = LoraAdapter(LoraSpec(rank=4, alpha=4.0, dropout=dropout), name="style")
    model.add_adapter(adapter)
    randomize(adapter)
    return model, adapter


class IPStyleHook(nn.Module):
    """An attention hook with a trainable weight, like the IP-Adapter's image branch: ``tanh(q @ w)``."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(head_dim, head_dim, generator=torch.Generator().manual_seed(4)) * 0.2)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return torch.tanh(q @ self.weight)


def forward_backward(model, hook: IPStyleHook, mode: str, autocast: bool = False):
    """Output, LoRA gradients, the hook weight's gradient and the ControlNet features' gradients of one step."""
    model.stage_c.checkpointing = mode
    model.zero_grad(set_to_none=True)
    hook.weight.grad = None
    inputs = tiny_inputs(batch=2, seed=5)
    g = torch.Generator().manual_seed(6)
    cnet = [torch.randn(2, 64, 8, 8, generator=g).mul_(0.1).requires_grad_() if i % 2 == 0 else None
            for i in range(model.stage_c.resblock_count())]
    attns = [m for m in model.stage_c.modules() if hasattr(m, "add_attention_hook")]
    handles = [attn.add_attention_hook(hook) for attn in attns]
    try:
        torch.manual_seed(11)  # the same dropout masks in every mode
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**inputs, cnet=cnet)
        out.float().square().mean().backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = [p.grad.clone() for p in model.trainable_parameters()] + [hook.weight.grad.clone()]
    grads += [c.grad.clone() for c in cnet if c is not None]
    return out.detach().float(), grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_selective_gives_the_outputs_and_gradients_of_no_checkpointing(autocast):
    model, _ = tiny_model()
    [head_dim] = {m.to_q.out_features // m.nhead for m in model.stage_c.modules() if hasattr(m, "add_attention_hook")}
    hook = IPStyleHook(head_dim)
    out_ref, grads_ref = forward_backward(model, hook, "none", autocast)
    assert all(g.abs().max() > 0 for g in grads_ref), "a gradient is zero: the check would prove nothing"
    out, grads = forward_backward(model, hook, "selective", autocast)
    # Recomputation replays the same ops on the same values (RNG restored for dropout): fp32 agrees to 1e-6.
    tolerance = 1e-6 if not autocast else 1e-3
    assert torch.allclose(out, out_ref, rtol=0, atol=tolerance), (out - out_ref).abs().max()
    assert len(grads) == len(grads_ref)
    for i, (g, ref) in enumerate(zip(grads, grads_ref)):
        scale = ref.abs().max().item()
        assert torch.allclose(g, ref, rtol=0, atol=tolerance * max(scale, 1.0)), (i, (g - ref).abs().max().item())


def test_dropout_masks_differ_without_the_restored_rng():
    """The equality above needs the restored RNG: two forward passes with different seeds differ (dropout is on)."""
    model, _ = tiny_model()
    inputs = tiny_inputs(batch=2, seed=5)
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(**inputs))
    assert (outs[0] - outs[1]).abs().max() > 1e-4


def training_step_peak(mode: str) -> int:
    """Peak live tensor bytes of one LoRA training step (loss, backward) on the tiny Stage C, no dropout."""
    model, _ = tiny_model(dropout=0.0)
    model.stage_c.checkpointing = mode
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 16, 16, 16, generator=g), "clip_text": torch.randn(2, 77, 64, generator=g),
             "clip_text_pooled": torch.randn(2, 1, 64, generator=g), "clip_img": torch.randn(2, 1, 32, generator=g)}

    def step():
        diffusion_training_loss(model, batch, c_clip_img=32, caption_dropout=0.0, shift=1.0, offset=0.0,
                                generator=step_generator(0, 0)).backward()

    step()  # warm-up: lazy initialisations stay out of the measurement
    return measure_peak_tensor_bytes(step)[0]


def test_selective_keeps_less_than_none_and_more_than_whole_blocks():
    peaks = {mode: training_step_peak(mode) for mode in ("none", "selective", "blocks")}
    # Measured at 16x16 latents, batch 2: about 1.0 : 0.9 : 0.3 (norm inputs recomputed; the widening matmul
    # outputs and every block's input kept; without checkpointing GELU and GRN keep only GELU's input too).
    assert peaks["none"] > peaks["selective"] > peaks["blocks"], peaks
    assert peaks["selective"] < 0.97 * peaks["none"], peaks


def test_the_policy_keeps_matmuls_recomputes_cheap_ops_and_low_rank_up_projections():
    from torch.utils.checkpoint import CheckpointPolicy as P

    aten = torch.ops.aten
    assert set(SELECTIVE_POLICY) == set("CAT") and SELECTIVE_POLICY["T"].checkpoint is False
    policy = policy_fn("C")
    x, w_wide, w_up = torch.ones(8, 64), torch.ones(64, 256), torch.ones(4, 64)
    assert policy(None, aten.mm.default, x, w_wide) == P.MUST_SAVE  # channelwise.0: 64 -> 256
    assert policy(None, aten.mm.default, torch.ones(8, 4), w_up) == P.PREFER_RECOMPUTE  # a rank-4 LoRA B
    # contracting: channelwise.4 (256 -> 64, its output feeds only the residual add) and a LoRA A (64 -> 4)
    assert policy(None, aten.addmm.default, torch.ones(64), torch.ones(8, 256), w_wide.T) == P.PREFER_RECOMPUTE
    assert policy(None, aten.mm.default, x, w_up.T) == P.PREFER_RECOMPUTE
    assert policy(None, aten.mm.default, x, torch.ones(64, 64)) == P.MUST_SAVE  # square: q/k/v/out
    assert policy(None, aten.gelu.default, x) == P.PREFER_RECOMPUTE
    # Dropout: recomputed eagerly (the RNG state is restored); kept inside compiled regions, whose recomputation
    # cannot replay RNG ops (tests/test_compile.py checks the compiled gradients with dropout on).
    assert policy(None, aten.native_dropout.default, x, 0.1, True) == P.PREFER_RECOMPUTE
    assert policy_fn("C", keep_random=True)(None, aten.native_dropout.default, x, 0.1, True) == P.MUST_SAVE


# ------------------------------------------------------------------------------------------------ the recipe
@pytest.mark.parametrize("overrides,mode", [
    ((), "none"),
    (("train.gradient_checkpointing=true",), "blocks"),
    (("train.checkpointing=selective",), "selective"),
    (("train.gradient_checkpointing=true", "train.checkpointing=blocks"), "blocks"),
    (("train.gradient_checkpointing=false", "train.checkpointing=selective"), "selective"),
])
def test_the_mode_in_effect(overrides, mode):
    assert load_recipe(TINY_LORA, overrides).train.checkpointing_mode == mode


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_a_contradicting_pair_is_refused_with_what_to_write(mode):
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY_LORA, ("train.gradient_checkpointing=true", f"train.checkpointing={mode}"))
    [problem] = info.value.problems
    assert problem.path == "train.checkpointing" and problem.value == mode
    assert "contradicts train.gradient_checkpointing: true" in problem.message
    assert "remove train.gradient_checkpointing" in problem.hint


# ---------------------------------------------------------------------------------------- the user's command
@pytest.mark.slow
def test_train_with_selective_checkpointing_matches_the_run_without(tmp_path):
    """`cascade-studio train recipes/tiny/lora.yaml train.checkpointing=selective` trains and exports the adapter
    the run without checkpointing exports."""
    out_s, selective = train_tiny_lora(tmp_path, "selective", "train.compile=off", "train.checkpointing=selective")
    out_n, plain = train_tiny_lora(tmp_path, "plain", "train.compile=off", "train.checkpointing=none")
    assert "train.checkpointing: selective" in out_s and "train.checkpointing:" not in out_n
    assert_same_training(selective, plain)
