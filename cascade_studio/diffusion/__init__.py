"""Diffusion maths of Stable Cascade (official GDF): schedule, noise condition, loss weight, samplers.

Pure tensor functions; nothing here knows about models, adapters or training loops. The names are imported on
first use (``_lazy``), so the torch-free sampler registry (``diffusion.samplers``: names, docs, the default) can
be read by the recipe schema and the command line without importing torch.
"""

from cascade_studio._lazy import lazy_exports

_EXPORTS = {
    "sampler": ("batch_cfg_inputs", "ddim_step", "guide_eps", "sample", "sample_ddim", "sample_ddpm"),
    "schedule": ("add_noise", "diffusion_loss", "LOSS_WEIGHTS", "logsnr", "logsnr_limits", "loss_weight",
                 "noise_condition", "offset_noise", "p2_weight", "sample_t", "vp_scalers"),
    "lcm": ("consistency_scalings", "consistency_x0", "lcm_times", "sample_lcm"),
    "samplers": ("DEFAULT_SAMPLER", "SAMPLERS", "SamplerInfo", "get_sampler", "sample_with", "sampler_names"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
