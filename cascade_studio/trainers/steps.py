"""The diffusion loss step shared by every adapter method, and held-out evaluation.

The published Stage C objective (STABLE_CASCADE.md section 3): noise the cached latents at a random t, predict
ε, weight the per-sample MSE by P2. Each adapter method adds its own inputs through ``training_inputs``
(ControlNet: the hint; IP-Adapter: image embeddings and its condition dropout) — that is the whole difference
between the methods' loss steps.

Randomness comes from generators seeded by (seed, step, rank), not from a running global RNG: a resumed run
draws exactly the noise the uninterrupted run would have drawn at the same step.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..diffusion import add_noise, diffusion_loss, noise_condition, offset_noise, sample_t

TEXT_KEYS = ("clip_text", "clip_text_pooled")


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    g = torch.Generator()
    # Large odd multipliers keep (seed, step, rank, stream) tuples from colliding.
    g.manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729 + stream * 15_485_863) % (2**63))
    return g


def base_inputs(batch: dict[str, Any], c_clip_img: int, caption_dropout: float,
                generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Stage C conditioning from a cached batch, with caption dropout (empty-caption features)."""
    clip_text = batch["clip_text"]
    pooled = batch["clip_text_pooled"]
    if pooled.dim() == 2:
        pooled = pooled.unsqueeze(1)
    if caption_dropout > 0 and "null_clip_text" in batch:
        drop = torch.rand(clip_text.shape[0], generator=generator) < caption_dropout
        if drop.any():
            mask = drop.to(clip_text.device)
            clip_text = torch.where(mask.view(-1, 1, 1), batch["null_clip_text"].to(clip_text), clip_text)
            null_pooled = batch["null_clip_text_pooled"].to(pooled)
            if null_pooled.dim() == 2:
                null_pooled = null_pooled.unsqueeze(1)
            pooled = torch.where(mask.view(-1, 1, 1), null_pooled, pooled)
    clip_img = batch.get("clip_img")
    if clip_img is None:
        # Zeros mean "no image" to the published model (STABLE_CASCADE.md section 2).
        clip_img = torch.zeros(clip_text.shape[0], 1, c_clip_img, device=clip_text.device, dtype=clip_text.dtype)
    return {"clip_text": clip_text, "clip_text_pooled": pooled, "clip_img": clip_img}


def diffusion_training_loss(model: Callable, batch: dict[str, Any], *, c_clip_img: int, caption_dropout: float,
                            shift: float, offset: float, generator: torch.Generator,
                            method_inputs: Callable | None = None, method_cfg: Any = None,
                            dtype: torch.dtype | None = None) -> torch.Tensor:
    """One batch's P2-weighted ε loss (a scalar)."""
    x0 = batch["latents"]
    if dtype is not None:
        x0 = x0.to(dtype)
    b = x0.shape[0]
    t = sample_t(b, generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
    if offset > 0:
        noise = offset_noise(noise, offset, generator=generator)
    x_t, lsnr = add_noise(x0, t, noise, shift=shift)
    r = noise_condition(lsnr)
    inputs = base_inputs(batch, c_clip_img, caption_dropout, generator)
    if method_inputs is not None:
        inputs = method_inputs(batch, inputs, method_cfg, generator)
    if dtype is not None:
        inputs = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    pred = model(x_t, r.to(x_t.dtype), **inputs)
    return diffusion_loss(pred.float(), noise.float(), lsnr.float())


@torch.no_grad()
def heldout_loss(model: Callable, batches: list[dict[str, Any]], *, c_clip_img: int, shift: float = 1.0,
                 seed: int = 1234, repeats: int = 4, method_inputs: Callable | None = None,
                 method_cfg: Any = None, dtype: torch.dtype | None = None) -> float:
    """Mean diffusion loss over ``batches`` with fixed t and noise (comparable across adapters and steps).

    No caption dropout and no condition dropout: the held-out number measures the conditioned model.
    """
    total, count = 0.0, 0
    for rep in range(repeats):
        for i, batch in enumerate(batches):
            g = step_generator(seed, i, stream=rep + 1)
            loss = diffusion_training_loss(model, batch, c_clip_img=c_clip_img, caption_dropout=0.0, shift=shift,
                                           offset=0.0, generator=g, method_inputs=_no_dropout(method_inputs),
                                           method_cfg=method_cfg, dtype=dtype)
            total += float(loss) * batch["latents"].shape[0]
            count += batch["latents"].shape[0]
    return total / max(1, count)


def _no_dropout(method_inputs: Callable | None) -> Callable | None:
    if method_inputs is None:
        return None

    def call(batch, inputs, cfg, generator):
        return method_inputs(batch, inputs, cfg, generator, train=False) if _accepts_train(method_inputs) \
            else method_inputs(batch, inputs, cfg, None)
    return call


def _accepts_train(fn: Callable) -> bool:
    import inspect

    try:
        return "train" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
