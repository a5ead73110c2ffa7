"""Latent consistency models on GDF's schedule: the boundary parameterisation, the distillation grid and the
multistep consistency sampler (Song et al. 2023, "Consistency Models"; Luo et al. 2023, "Latent Consistency
Models" and "LCM-LoRA").

A consistency function maps a noisy latent at time t straight to the clean latent of the ODE trajectory through
it: ``f(x, t) = c_skip(t)·x + c_out(t)·x0(x, t)`` with ``x0 = (x - b·ε)/a`` from the ε-predicting Stage C. The
boundary scalings make ``f(x, 0) = x`` exactly. LCM writes them on the 1000-step DDPM timestep
``τ = 1000·t``, scaled by 10, with σ_data = 0.5: ``c_skip = σ²/((10τ)² + σ²)``, ``c_out = 10τ/sqrt((10τ)² + σ²)``;
GDF's continuous t in [0, 1] maps onto it directly.

The sampler walks ``steps`` equally spaced times from ``t_start`` (1: pure noise) down to ``t_start/steps``; at
each it predicts the clean latent with one unguided Stage C call (the guidance was distilled into the LoRA) and
re-noises it to the next time with fresh noise; the last prediction is the sample.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from cascade_studio.diffusion.sampler import _per_sample, _randn, start_state
from cascade_studio.diffusion.schedule import noise_condition, vp_scalers

__all__ = ["SIGMA_DATA", "TIMESTEP_SCALING", "DDPM_TIMESTEPS", "consistency_scalings", "consistency_x0",
           "sample_lcm", "lcm_times"]

SIGMA_DATA = 0.5          # LCM's boundary condition constants (its reference scripts' defaults)
TIMESTEP_SCALING = 10.0
DDPM_TIMESTEPS = 1000     # the discrete timestep count LCM's constants are written for


def consistency_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` at times ``t`` in [0, 1]: (1, 0) at t = 0, close to (0, 1) anywhere above ~0.01."""
    scaled = t.float() * DDPM_TIMESTEPS * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def consistency_x0(x: torch.Tensor, eps: torch.Tensor, logsnr: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The consistency function's output: ``c_skip(t)·x + c_out(t)·(x - b·ε)/a`` (per sample, [B] each)."""
    a, b = (_per_sample(v, x) for v in vp_scalers(logsnr))
    c_skip, c_out = (_per_sample(v.to(x.device), x) for v in consistency_scalings(t))
    return c_skip * x + c_out * (x - b * eps) / a


def lcm_times(steps: int, t_start: float = 1.0) -> torch.Tensor:
    """The ``steps`` times the sampler evaluates at: ``t_start`` down to ``t_start/steps`` in equal steps (on the
    distillation grid when its size is a multiple of ``steps``), then 0 (the boundary)."""
    return torch.linspace(t_start, 0.0, steps + 1)


def sample_lcm(
    model: Callable[..., torch.Tensor],
    shape: tuple[int, ...] | torch.Size,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    steps: int,
    cfg: float,
    rho: float,
    shift: float,
    x_init: torch.Tensor | None = None,
    t_start: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    return_x0: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling with an LCM(-LoRA) Stage C: one unguided model call per step.

    Arguments as for ``sampler.sample`` (registered as ``lcm``); ``uncond``, ``cfg`` and ``rho`` are ignored: the
    guidance is in the distilled weights. The result is the last step's clean prediction (``return_x0`` makes no
    difference).
    """
    del uncond, cfg, rho, return_x0
    times = lcm_times(steps, t_start)
    x, grid, batch, device = start_state(shape, times, shift, cond, steps, x_init, t_start, generator, noise, device)
    inputs = dict(cond)
    x0 = x
    for i in range(steps):
        lsnr_now = grid[i].expand(batch)
        eps = model(x, noise_condition(lsnr_now), **inputs).float()
        x0 = consistency_x0(x, eps, lsnr_now, times[i].expand(batch).to(x.device))
        if i + 1 < steps:
            a_next, b_next = (_per_sample(v, x) for v in vp_scalers(grid[i + 1].expand(batch)))
            x = a_next * x0 + b_next * _randn(x.shape, generator, x.device)
        else:
            x = x0
        if callback is not None:
            callback(i + 1, steps, x)
    return x0
