"""The latent consistency distillation loss, as the LCM / LCM-LoRA papers define it, on GDF's schedule.

For one batch of cached latents x0 (Luo et al. 2023, Algorithm 1 with a LoRA student, as LCM-LoRA trains it):

1. draw a grid index n in 1..N/k per example: the student's time t_n = n*k/N, the solver's target time
   t_{n-1} = (n-1)*k/N (0 is the boundary), both through the run's schedule shift; noise x0 to t_n;
2. draw the teacher's guidance scale w per example from [guidance_min, guidance_max];
3. teacher = the frozen base (every adapter switched off) with classifier-free guidance: its ε at t_n, guided
   with w and rescaled with rho, makes one DDIM step (eta 0) of the probability-flow ODE to t_{n-1};
4. target = the consistency function of the student itself (LCM-LoRA: no EMA copy) at that point, without
   gradient; prediction = the student's consistency function at (x_{t_n}, t_n);
5. loss = L2 or pseudo-Huber between the two.

Step 3 and 4 run without gradient before the student's own forward; the only graph is the student's.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ...diffusion import add_noise, batch_cfg_inputs, ddim_step, guide_eps, logsnr, noise_condition, offset_noise
from ...diffusion.lcm import consistency_x0

__all__ = ["training_loss", "grid_times"]

TEXT_KEYS = ("clip_text", "clip_text_pooled")


def grid_times(index: torch.Tensor, section: Any) -> torch.Tensor:
    """Time of grid index ``index`` (0..N/k) on the skipping-step grid: ``index*k/N``."""
    return index.float() * section.skip / section.timesteps


@contextlib.contextmanager
def adapters_off(model: Any) -> Iterator[Any]:
    """The frozen base: every adapter of the ``AdaptedStageC`` (unwrapped from DDP) off, then back as it was."""
    adapted = getattr(model, "module", model)
    was = dict(adapted.enabled)
    try:
        for name in was:
            adapted.set_enabled(name, False)
        yield adapted
    finally:
        for name, enabled in was.items():
            adapted.set_enabled(name, enabled)


def _unconditional(batch: dict[str, Any], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's unconditional inputs: the empty caption's features (the encode-once cache stores them with
    every data set) and zero image embeddings."""
    if "null_clip_text" not in batch:
        raise ValueError("LCM distillation needs the empty caption's text features for the teacher's guidance, and "
                         "this batch has none; they come from the encode-once cache (null_clip_text)")
    pooled = batch["null_clip_text_pooled"].to(inputs["clip_text_pooled"])
    if pooled.dim() == 2:
        pooled = pooled.unsqueeze(1)
    return {"clip_text": batch["null_clip_text"].to(inputs["clip_text"]), "clip_text_pooled": pooled,
            "clip_img": torch.zeros_like(inputs["clip_img"])}


def _distance(pred: torch.Tensor, target: torch.Tensor, section: Any) -> torch.Tensor:
    diff = pred.float() - target.float()
    if section.loss == "huber":
        c = section.huber_c
        return (diff.pow(2) + c * c).sqrt().sub(c).mean()
    return diff.pow(2).mean()


def training_loss(model: Callable, batch: dict[str, Any], *, c_clip_img: int, caption_dropout: float, shift: float,
                  offset: float, generator: torch.Generator, method_inputs: Callable | None = None,
                  method_cfg: Any = None) -> torch.Tensor:
    """One batch's consistency distillation loss (the method's ``training_loss`` hook; arguments as for
    ``trainers.steps.diffusion_training_loss``, ``method_cfg`` the recipe's ``adapter.lcm`` section)."""
    from ...trainers.steps import base_inputs

    section = method_cfg
    x0 = batch["latents"].float()
    count, device = x0.shape[0], x0.device
    # Every draw comes from the step's CPU generator, then moves (the same seed gives the same run everywhere).
    index = torch.randint(1, section.timesteps // section.skip + 1, (count,), generator=generator)
    t_now, t_prev = grid_times(index, section).to(device), grid_times(index - 1, section).to(device)
    scale = section.guidance_min + (section.guidance_max - section.guidance_min) * torch.rand(count, generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device)
    if offset > 0:
        noise = offset_noise(noise, offset, generator=generator)
    x_now, lsnr_now = add_noise(x0, t_now, noise, shift=shift)
    lsnr_prev = logsnr(t_prev, shift=shift)
    r_now, r_prev = noise_condition(lsnr_now).float(), noise_condition(lsnr_prev).float()
    cond = base_inputs(batch, c_clip_img, caption_dropout, generator)
    if method_inputs is not None:
        cond = method_inputs(batch, cond, method_cfg, generator)
    with torch.no_grad():
        with adapters_off(model) as teacher:
            both = teacher(torch.cat([x_now, x_now]), r_now.repeat(2),
                           **batch_cfg_inputs(cond, _unconditional(batch, cond))).float()
        eps = guide_eps(*both.chunk(2), scale.to(device), section.guidance_rescale, per_sample=True)
        x_prev, _ = ddim_step(x_now, eps, lsnr_now, lsnr_prev, eta=0.0)
        student = getattr(model, "module", model)  # the target: the student itself, without gradient
        target = consistency_x0(x_prev, student(x_prev, r_prev, **cond).float(), lsnr_prev, t_prev)
    prediction = consistency_x0(x_now, model(x_now, r_now, **cond).float(), lsnr_now, t_now)
    return _distance(prediction, target, section)
