"""Diffusion maths of Stable Cascade (official GDF): schedule, noise condition, loss weight, sampler.

Pure tensor functions; nothing here knows about models, adapters or training loops.
"""

from cascade_studio.diffusion.sampler import batch_cfg_inputs, ddim_step, sample
from cascade_studio.diffusion.schedule import (
    add_noise,
    diffusion_loss,
    LOSS_WEIGHTS,
    logsnr,
    logsnr_limits,
    loss_weight,
    noise_condition,
    offset_noise,
    p2_weight,
    sample_t,
    vp_scalers,
)

__all__ = [
    "LOSS_WEIGHTS",
    "add_noise",
    "loss_weight",
    "batch_cfg_inputs",
    "ddim_step",
    "diffusion_loss",
    "logsnr",
    "logsnr_limits",
    "noise_condition",
    "offset_noise",
    "p2_weight",
    "sample",
    "sample_t",
    "vp_scalers",
]
