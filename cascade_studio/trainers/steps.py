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
                            method_inputs: Callable | None = None, method_cfg: Any = None) -> torch.Tensor:
    """One batch's P2-weighted ε loss (a scalar).

    Precision (docs/DESIGN.md, "Precision"): the latents, the noise, the noise level ``r`` and every conditioning
    input stay float32 here, as at inference; Stage C casts its own inputs to its weights' dtype (and builds the
    sinusoidal embedding of ``r`` in float32), each adapter casts its own inputs to its own weights' dtype. A
    bf16 ``r`` would scramble the embedding's high frequencies (it is multiplied by 10000 first).
    """
    x0 = batch["latents"].float()
    b = x0.shape[0]
    # Random draws use the step's CPU generator (so a seed means the same noise on every device), then move.
    t = sample_t(b, generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    if offset > 0:
        noise = offset_noise(noise, offset, generator=generator)
    x_t, lsnr = add_noise(x0, t, noise, shift=shift)
    r = noise_condition(lsnr).float()
    inputs = base_inputs(batch, c_clip_img, caption_dropout, generator)
    if method_inputs is not None:
        inputs = method_inputs(batch, inputs, method_cfg, generator)
    pred = model(x_t, r, **inputs)
    return diffusion_loss(pred.float(), noise, lsnr.float())


# What the loop calls for one micro-batch's loss: ``diffusion_training_loss`` or a method's own ``training_loss``
# hook, with the same keyword arguments (``c_clip_img, caption_dropout, shift, offset, generator, method_inputs,
# method_cfg``) and a scalar result. A method with its own objective (LCM distillation) supplies the hook.
LossStep = Callable[..., torch.Tensor]


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of a collated batch on ``device`` (non-blocking from pinned memory)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def model_device(model: Any) -> torch.device:
    """Where ``model`` computes: the device of its first parameter (CPU for a parameterless callable)."""
    parameters = getattr(model, "parameters", None)
    for tensor in (parameters() if callable(parameters) else ()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def heldout_loss(model: Callable, batches: list[dict[str, Any]], *, c_clip_img: int, shift: float, seed: int,
                 repeats: int = 4, method_inputs: Callable | None = None, method_cfg: Any = None,
                 loss_step: LossStep = diffusion_training_loss) -> float:
    """Mean training loss (``loss_step``: the diffusion loss unless the method has its own) over ``batches`` with
    fixed t and noise (comparable across adapters and steps).

    ``shift`` and ``seed`` are the run's (``train.shift``, ``train.seed``): no default of their own here.

    No caption dropout and no condition dropout: the held-out number measures the conditioned model. Batches
    may live on the host; each is moved to the model's device here. One host read for the whole evaluation.
    """
    from ..devices import host_floats

    device = model_device(model)
    total = torch.zeros((), dtype=torch.float32, device=device)
    count = 0
    for rep in range(repeats):
        for i, batch in enumerate(batches):
            g = step_generator(seed, i, stream=rep + 1)
            loss = loss_step(model, batch_to_device(batch, device), c_clip_img=c_clip_img,
                                           caption_dropout=0.0, shift=shift, offset=0.0, generator=g,
                                           method_inputs=_no_dropout(method_inputs), method_cfg=method_cfg)
            n = batch["latents"].shape[0]
            total = total + loss.float() * n
            count += n
    return host_floats(total)[0] / max(1, count)


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
