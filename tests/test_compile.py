"""train.compile: Stage C compiled block by block gives the eager model's outputs and gradients (1e-5), with LoRA
layers inside the blocks, ControlNet features between them, attention hooks (IP-Adapter) and checkpointing.

Compiling is slow on a CPU the first time (tens of seconds of C++ builds, cached under /tmp afterwards), so the
module is marked slow; one compiled model serves every in-process case.
"""
from __future__ import annotations

import copy

import pytest
import torch

from cascade_studio.adapters.base import AdaptedStageC
from cascade_studio.adapters.lora import LoraAdapter, LoraSpec
from cascade_studio.devices import compiles_blocks
from tests.test_lora import randomize, tiny_inputs, tiny_stage_c
from tests.tiny_train import assert_same_training, train_tiny_lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models():
    eager = AdaptedStageC(tiny_stage_c())
    adapter = LoraAdapter(LoraSpec(rank=4, alpha=4), name="style")
    eager.add_adapter(adapter)
    randomize(adapter)  # B is zero at init: give the LoRA a real contribution and real gradients for A
    compiled = copy.deepcopy(eager)
    count = compiled.stage_c.compile_blocks()
    assert count == sum(len(level) for level in list(compiled.stage_c.down_blocks) + list(compiled.stage_c.up_blocks))
    return eager, compiled


def _lora_grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.trainable_parameters()]


def _forward_backward(model, inputs, **extra) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **extra)
    (out.square().mean()).backward()
    return out.detach(), _lora_grads(model)


def _assert_close(a, b, what: str) -> None:
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"{what}: max diff {(a - b).abs().max().item():.3g}"


def test_compiled_blocks_match_eager_outputs_and_gradients(models):
    eager, compiled = models
    inputs = tiny_inputs(batch=2, seed=5)
    out_e, grads_e = _forward_backward(eager, inputs)
    out_c, grads_c = _forward_backward(compiled, inputs)
    _assert_close(out_c, out_e, "output")
    assert any(g.abs().max() > 0 for g in grads_e)
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e)):
        _assert_close(gc, ge, f"LoRA gradient {i}")


def test_compiled_blocks_with_controlnet_features_and_checkpointing(models):
    eager, compiled = models
    inputs = tiny_inputs(batch=2, seed=6)
    g = torch.Generator().manual_seed(7)
    n = eager.stage_c.resblock_count()
    cnet = [torch.randn(2, 64, 8, 8, generator=g) * 0.1 if i % 2 == 0 else None for i in range(n)]
    for model in (eager, compiled):
        model.stage_c.gradient_checkpointing = True
    try:
        out_e, grads_e = _forward_backward(eager, inputs, cnet=cnet)
        out_c, grads_c = _forward_backward(compiled, inputs, cnet=cnet)
    finally:
        for model in (eager, compiled):
            model.stage_c.gradient_checkpointing = False
    _assert_close(out_c, out_e, "output with cnet + checkpointing")
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e)):
        _assert_close(gc, ge, f"LoRA gradient {i} with cnet + checkpointing")


def test_compiled_blocks_under_selective_checkpointing(models):
    """train.checkpointing=selective with compiled blocks: the checkpoint runs inside the compiled region, except
    for an attention block with hooks (they run outside compiled graphs), which runs eagerly under selective
    checkpointing; both kinds in one forward, with ControlNet features, against the eager model unchecked."""
    eager, compiled = models
    inputs = tiny_inputs(batch=2, seed=9)
    g = torch.Generator().manual_seed(10)
    cnet = [torch.randn(2, 64, 8, 8, generator=g) * 0.1 if i % 2 == 0 else None
            for i in range(eager.stage_c.resblock_count())]

    def run(model):
        first_attention = next(m for m in model.stage_c.modules() if hasattr(m, "add_attention_hook"))
        handle = first_attention.add_attention_hook(lambda q: torch.tanh(q) * 0.5)
        try:
            return _forward_backward(model, inputs, cnet=cnet)
        finally:
            handle.remove()

    out_e, grads_e = run(eager)
    compiled.stage_c.checkpointing = "selective"
    try:
        out_c, grads_c = run(compiled)
    finally:
        compiled.stage_c.checkpointing = "none"
    _assert_close(out_c, out_e, "output with selective checkpointing")
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e)):
        _assert_close(gc, ge, f"LoRA gradient {i} with selective checkpointing")


def test_compiled_selective_checkpointing_with_dropout_gives_the_true_gradient(models):
    """LoRA dropout on inside compiled selective regions: the compiler's RNG differs from eager, so the check is the
    gradient's own consistency: its directional derivative equals the finite difference of the loss with the same
    dropout masks (same seed). Masks redrawn in the recomputation would break it."""
    _, compiled = models
    dropouts = [m for name, m in compiled.named_modules() if name.endswith("lora_dropout.style")]
    assert dropouts
    params = list(compiled.trainable_parameters())
    inputs = tiny_inputs(batch=2, seed=12)
    weights = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(13))

    def loss() -> torch.Tensor:
        torch.manual_seed(14)
        return (compiled(**inputs) * weights).sum()

    compiled.train()
    for module in dropouts:
        module.p = 0.3
    compiled.stage_c.checkpointing = "selective"
    try:
        compiled.zero_grad(set_to_none=True)
        loss().backward()
        direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
        analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
        eps = 1e-3
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(eps * d)
            plus = loss().item()
            for p, d in zip(params, direction):
                p.sub_(2 * eps * d)
            minus = loss().item()
            for p, d in zip(params, direction):
                p.add_(eps * d)
    finally:
        compiled.stage_c.checkpointing = "none"
        for module in dropouts:
            module.p = 0.0
        compiled.eval()
        compiled.zero_grad(set_to_none=True)
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-2 and abs(analytic - numeric) < 1e-3 * abs(analytic), (analytic, numeric)


def test_fresh_attention_hooks_every_call_run_and_do_not_recompile(models):
    """The IP-Adapter installs new hook closures on every forward; they must take effect in the compiled model
    and must not make the compiler rebuild the block each call."""
    from torch._dynamo.utils import counters

    eager, compiled = models
    inputs = tiny_inputs(batch=2, seed=8)

    def forward_with_hook(model, scale: float) -> torch.Tensor:
        handles = []
        for module in model.stage_c.modules():
            if hasattr(module, "add_attention_hook"):
                handles.append(module.add_attention_hook(lambda q, s=scale: torch.tanh(q) * s))
        try:
            with torch.no_grad():
                return model(**inputs)
        finally:
            for handle in handles:
                handle.remove()

    with torch.no_grad():
        plain = compiled(**inputs)
    first = forward_with_hook(compiled, 0.5)
    assert (first - plain).abs().max() > 1e-3, "the hook had no effect in the compiled model"
    _assert_close(first, forward_with_hook(eager, 0.5), "hooked output")
    graphs_before = counters["stats"]["unique_graphs"]
    for scale in (0.25, 0.75, 1.0):
        _assert_close(forward_with_hook(compiled, scale), forward_with_hook(eager, scale), f"hook scale {scale}")
    assert counters["stats"]["unique_graphs"] == graphs_before, "new hook closures recompiled the blocks"


def test_auto_compiles_on_cuda_only():
    assert compiles_blocks("auto", "cuda") and not compiles_blocks("auto", "cpu")
    assert compiles_blocks("on", "cpu") and not compiles_blocks("off", "cuda")


def test_train_with_compile_matches_the_eager_run(tmp_path):
    """The user's path: `cascade-studio train ... train.compile=on` trains and gives the eager run's losses."""
    out_c, compiled = train_tiny_lora(tmp_path, "compiled", "train.compile=on")
    out_e, eager = train_tiny_lora(tmp_path, "eager", "train.compile=off")
    assert "Stage C blocks compiled" in out_c and "Stage C blocks compiled" not in out_e
    assert_same_training(compiled, eager)
