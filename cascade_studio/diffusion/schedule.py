"""Stable Cascade's diffusion schedule, noising and loss weighting (the official "GDF" maths).

Every function here is a pure tensor function; the formulas are those of STABLE_CASCADE.md section 3 and the
`gdf.*` tensors of the reference parity file check them to 1e-5:

- cosine schedule (s = 0.008) with the variance clamped to [1e-4, 0.9999], expressed as logSNR;
  `shift` moves logSNR by `2·log(1/shift)` and is then clamped back into the unshifted limits;
- variance-preserving scalers `a = sqrt(sigmoid(logSNR))`, `b = sqrt(1 - a²)`;
- noise condition `r` (what the model sees instead of t): the inverse of the cosine schedule;
- ε target and the P2 loss weight `1 / (1 + exp(logSNR))`.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "COSINE_S",
    "VAR_CLAMP",
    "logsnr",
    "logsnr_limits",
    "vp_scalers",
    "noise_condition",
    "p2_weight",
    "LOSS_WEIGHTS",
    "loss_weight",
    "sample_t",
    "add_noise",
    "offset_noise",
    "diffusion_loss",
]

# Offset of the cosine schedule (Nichol & Dhariwal 2021), as used by the official CosineSchedule.
COSINE_S = 0.008
# The official schedule clamps the signal variance so that logSNR stays finite at t = 0 and t = 1.
VAR_CLAMP = (1e-4, 0.9999)
# Training draws t from (1 - U[0,1)) + 0.001 so that t = 0 (a noise-free input) is never trained on.
T_MIN = 0.001


def _min_var(device: torch.device | None = None) -> torch.Tensor:
    """cos²((s/(1+s))·π/2): the schedule's value at t = 0, used to normalise var(0) to 1."""
    s = torch.tensor(COSINE_S, dtype=torch.float32, device=device)
    return torch.cos(s / (1 + s) * math.pi * 0.5) ** 2


def _cosine_logsnr(t: torch.Tensor) -> torch.Tensor:
    """Unshifted, unclamped-in-logSNR cosine schedule (variance clamped as the official code does)."""
    s = torch.tensor(COSINE_S, dtype=torch.float32, device=t.device)
    var = torch.cos((s + t) / (1 + s) * math.pi * 0.5).clamp(0, 1) ** 2 / _min_var(t.device)
    var = var.clamp(*VAR_CLAMP)
    return torch.log(var / (1 - var))


def logsnr_limits() -> tuple[float, float]:
    """(min, max) logSNR of the unshifted schedule: its values at t = 1 and t = 0.

    Shifted schedules are clamped into this range, so a large shift saturates at the ends instead of
    producing a logSNR the model never saw.
    """
    ends = _cosine_logsnr(torch.tensor([1.0, 0.0], dtype=torch.float32))
    return float(ends[0]), float(ends[1])


def logsnr(t: torch.Tensor | float, shift: float = 1.0) -> torch.Tensor:
    """Log signal-to-noise ratio of the cosine schedule at time(s) `t` in [0, 1] (t = 1 is pure noise).

    `shift` > 1 moves every t towards noise (logSNR decreases by 2·log(shift)); Stage C samples with shift 2.
    The result is clamped to the unshifted schedule's limits, as the official schedule does.
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    if not t.is_floating_point():
        t = t.float()
    out = _cosine_logsnr(t.clamp(0, 1))
    if shift != 1:
        out = out + 2 * math.log(1 / shift)
    low, high = logsnr_limits()
    return out.clamp(low, high)


def vp_scalers(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance-preserving scalers `(a, b)` with `x_t = a·x0 + b·ε` and `a² + b² = 1`."""
    a_squared = torch.sigmoid(logsnr)
    return a_squared.sqrt(), (1 - a_squared).sqrt()


def noise_condition(logsnr: torch.Tensor) -> torch.Tensor:
    """The noise level `r` fed to the model: the cosine schedule inverted (r ≈ t at shift 1), in [0, 1]."""
    s = torch.tensor(COSINE_S, dtype=logsnr.dtype, device=logsnr.device)
    var = torch.sigmoid(logsnr)
    r = torch.acos((var * _min_var(logsnr.device).to(logsnr.dtype)).sqrt()) / (math.pi * 0.5) * (1 + s) - s
    return r.clamp(0, 1)


def p2_weight(logsnr: torch.Tensor) -> torch.Tensor:
    """P2 loss weight `1 / (1 + exp(logSNR))` (k = 1, gamma = 1): down-weights the nearly clean steps."""
    return 1 / (1 + torch.exp(logsnr))


# Weightings of the per-sample ε MSE. "p2" is the official one. "debiased" is 1/sqrt(SNR) (SNR clamped to at most
# 1000), the "debiased estimation" weighting of Yu et al. 2024: it gives the noisy steps, where the layout of an
# image is decided, more of the loss than P2 does. "v" is 1 + 1/SNR (capped at V_MAX_WEIGHT): the ε loss
# rescaled to the loss of a v-prediction (Salimans & Ho 2022), which values getting the clean image right at
# every noise level alike; what a global property (a colour, a layout) adds is then no longer hidden in the
# noisy steps, where ε barely depends on it.
LOSS_WEIGHTS = ("p2", "debiased", "v")
DEBIASED_MAX_SNR = 1000.0
V_MAX_WEIGHT = 100.0


def loss_weight(logsnr: torch.Tensor, kind: str = "p2") -> torch.Tensor:
    """Per-sample weight of the ε loss at `logsnr` for weighting `kind` (one of LOSS_WEIGHTS)."""
    if kind == "p2":
        return p2_weight(logsnr)
    if kind == "debiased":
        return torch.exp(-0.5 * logsnr.clamp(max=math.log(DEBIASED_MAX_SNR)))
    if kind == "v":
        return (1 + torch.exp(-logsnr)).clamp(max=V_MAX_WEIGHT)
    raise ValueError(f"unknown loss weighting {kind!r}; use one of {', '.join(LOSS_WEIGHTS)}")


def sample_t(
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times `(1 - U[0,1)) + 0.001` clamped to [0.001, 1], shape [batch_size], float32."""
    u = torch.rand(batch_size, generator=generator, device=device)
    return ((1 - u) + T_MIN).clamp(T_MIN, 1.0)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-sample vector [B] so it broadcasts against a [B, ...] tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def add_noise(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, shift: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise clean latents `x0` [B, ...] to times `t` [B]; returns `(x_t, logsnr [B])`."""
    lsnr = logsnr(t.to(x0.device), shift=shift)
    a, b = vp_scalers(lsnr)
    x_t = _per_sample(a, x0).to(x0.dtype) * x0 + _per_sample(b, x0).to(x0.dtype) * noise
    return x_t, lsnr


def offset_noise(
    noise: torch.Tensor, offset: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add `offset·N(0,1)` shared over the spatial dims, one value per (batch, channel).

    Offset noise lets the model change the mean brightness of an image; the official ControlNet recipes for
    inpainting and super-resolution train with offset 0.1.
    """
    if offset == 0:
        return noise
    shape = (*noise.shape[:2], *([1] * (noise.dim() - 2)))
    # Drawn where the generator lives (a CPU generator cannot draw on a GPU), then moved to the noise.
    where = generator.device if generator is not None else noise.device
    extra = torch.randn(shape, generator=generator, device=where, dtype=torch.float32)
    return noise + offset * extra.to(device=noise.device, dtype=noise.dtype)


def diffusion_loss(
    pred_eps: torch.Tensor,
    target_eps: torch.Tensor,
    logsnr: torch.Tensor,
    reduction: str = "mean",
    weighting: str = "p2",
) -> torch.Tensor:
    """Weighted ε-prediction loss: per-sample MSE over all non-batch dims times `loss_weight(logsnr, weighting)`
    (default P2, the official weighting).

    `reduction='mean'` returns the batch mean (a scalar); `'none'` returns the weighted per-sample losses [B].
    The MSE is computed in float32 so bf16 predictions do not lose the small differences late in training.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"diffusion_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    diff = pred_eps.float() - target_eps.float()
    per_sample = diff.pow(2).flatten(1).mean(dim=1)
    weighted = per_sample * loss_weight(logsnr.float().to(per_sample.device), weighting).view(-1)
    return weighted.mean() if reduction == "mean" else weighted
