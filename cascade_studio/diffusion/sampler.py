"""DDIM / DDPM sampling with classifier-free guidance, as the official GDF sampler does it.

The loop walks t from `t_start` to 0 in `steps` equal steps. At each step the model predicts ε; with guidance
the conditional and unconditional inputs run as ONE batch (half the number of forward calls), the two halves
are combined with `lerp(uncond, cond, cfg)` and rescaled towards the conditional prediction's standard
deviation with `rho` (Lin et al. 2023, "Common diffusion noise schedules are flawed", section 3.4), then a
DDIM step with stochasticity `eta` moves x to the next t (eta = 1 is the official default, "DDPM").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from cascade_studio.diffusion.schedule import logsnr as schedule_logsnr
from cascade_studio.diffusion.schedule import noise_condition, vp_scalers

__all__ = ["sample", "start_state", "sample_ddim", "sample_ddpm", "batch_cfg_inputs", "ddim_step", "guide_eps"]

# Guards the std ratio of the rho rescale against an all-constant prediction (the official code adds 1e-9 too).
_STD_EPS = 1e-9


def _concat_pair(key: str, cond: Any, uncond: Any) -> Any:
    """Join one conditional and one unconditional model input along the batch dimension."""
    if isinstance(cond, torch.Tensor) or isinstance(uncond, torch.Tensor):
        if cond is None:
            # A missing branch input is "no contribution": zeros are exact for additive inputs (ControlNet).
            cond = torch.zeros_like(uncond)
        if uncond is None:
            uncond = torch.zeros_like(cond)
        if not (isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor)):
            raise TypeError(
                f"CFG input {key!r}: one branch is a tensor and the other a {type(uncond).__name__}/"
                f"{type(cond).__name__}; pass tensors (or None) in both cond and uncond."
            )
        if cond.shape[1:] != uncond.shape[1:]:
            raise ValueError(
                f"CFG input {key!r}: cond shape {tuple(cond.shape)} and uncond shape {tuple(uncond.shape)} differ "
                "beyond the batch dimension; build the unconditional input with the same shape (e.g. zeros_like)."
            )
        return torch.cat([cond, uncond.to(device=cond.device, dtype=cond.dtype)], dim=0)
    if isinstance(cond, (list, tuple)) and isinstance(uncond, (list, tuple)):
        if len(cond) != len(uncond):
            raise ValueError(
                f"CFG input {key!r}: cond has {len(cond)} elements and uncond {len(uncond)}; they must match."
            )
        joined = [_concat_pair(f"{key}[{i}]", c, u) for i, (c, u) in enumerate(zip(cond, uncond))]
        return type(cond)(joined) if isinstance(cond, tuple) else joined
    if isinstance(cond, Mapping) and isinstance(uncond, Mapping):
        return batch_cfg_inputs(cond, uncond, _prefix=f"{key}.")
    if cond is uncond:
        return cond
    try:
        same = bool(cond == uncond)
    except Exception:  # noqa: BLE001 - objects whose == is not a plain bool (arrays) count as different
        same = False
    if not same:
        raise ValueError(
            f"CFG input {key!r} is neither a tensor nor a list of tensors and differs between cond ({cond!r}) "
            f"and uncond ({uncond!r}); non-tensor inputs are passed once, so give both the same value."
        )
    return cond


def batch_cfg_inputs(
    cond: Mapping[str, Any], uncond: Mapping[str, Any], _prefix: str = ""
) -> dict[str, Any]:
    """Merge conditional and unconditional model inputs into one batch: cond first, then uncond.

    Tensors are concatenated along dim 0; lists (such as a ControlNet `cnet` list) element-wise, keeping None
    where both are None and using zeros where only one side is None; non-tensor values must be equal and are
    passed once. A key present on one side only is an error, since the halves would no longer match.
    """
    missing = set(cond) ^ set(uncond)
    if missing:
        raise ValueError(
            f"CFG inputs differ in keys {sorted(_prefix + k for k in missing)}; give the unconditional inputs "
            "the same keys as the conditional ones (zeros or empty-caption embeddings)."
        )
    return {key: _concat_pair(_prefix + key, cond[key], uncond[key]) for key in cond}


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """float32 N(0,1) drawn on the generator's own device, so a CPU generator gives the same numbers
    whichever device the latents live on (seeds reproduce across CPU and GPU)."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(device)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    logsnr_now: torch.Tensor,
    logsnr_next: torch.Tensor,
    eta: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from logSNR `logsnr_now` to `logsnr_next` ([B] each); returns `(x_next, x0)`.

    `x' = a'·x0 + sqrt(b'² - σ²)·ε + σ·N` with `σ = eta·sqrt(b'²/b²)·sqrt(1 - a²/a'²)` (Song et al. 2021, eq. 12
    in VP form). eta = 0 is deterministic DDIM, eta = 1 is ancestral DDPM.
    """
    a, b = (_per_sample(v, x) for v in vp_scalers(logsnr_now))
    a_next, b_next = (_per_sample(v, x) for v in vp_scalers(logsnr_next))
    x0 = (x - b * eps) / a
    if eta > 0:
        sigma = eta * (b_next**2 / b**2).sqrt() * (1 - a**2 / a_next**2).clamp(min=0).sqrt()
        fresh = _randn(x.shape, generator, x.device)
        x_next = a_next * x0 + (b_next**2 - sigma**2).clamp(min=0).sqrt() * eps + sigma * fresh
    else:
        x_next = a_next * x0 + b_next * eps
    return x_next, x0


def guide_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, cfg: float | torch.Tensor, rho: float,
              per_sample: bool = False) -> torch.Tensor:
    """Classifier-free guidance: ``lerp(uncond, cond, cfg)``, then rescaled towards the conditional prediction's
    standard deviation with ``rho`` (0 = plain CFG).

    The sampler takes the standard deviation over the whole batch, as the official code does; ``per_sample``
    takes it per sample (training, where every sample has its own guidance scale). ``cfg`` may be a per-sample
    tensor [B].
    """
    if isinstance(cfg, torch.Tensor) and cfg.dim() > 0:
        cfg = _per_sample(cfg.to(eps_cond), eps_cond)
    eps = eps_uncond + (eps_cond - eps_uncond) * cfg if isinstance(cfg, torch.Tensor) else \
        torch.lerp(eps_uncond, eps_cond, cfg)
    if rho > 0:
        if per_sample:
            dims = tuple(range(1, eps.dim()))
            ratio = eps_cond.std(dim=dims, keepdim=True) / (eps.std(dim=dims, keepdim=True) + _STD_EPS)
        else:
            ratio = eps_cond.std() / (eps.std() + _STD_EPS)
        eps = rho * (eps * ratio) + (1 - rho) * eps
    return eps


def _first_device(inputs: Mapping[str, Any] | None) -> torch.device | None:
    for value in (inputs or {}).values():
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return item.device
    return None


def start_state(
    shape: tuple[int, ...] | torch.Size,
    times: torch.Tensor,
    shift: float,
    cond: Mapping[str, Any],
    steps: int,
    x_init: torch.Tensor | None,
    t_start: float,
    generator: torch.Generator | None,
    noise: torch.Tensor | None,
    device: torch.device | str | None,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.device | str]:
    """What every sampler starts from: ``(x, logSNR grid of times, batch, device)``.

    ``x`` is the starting noise (``noise``, else drawn from ``generator``), or ``x_init`` noised to ``times[0]``
    (img2img). The device is the caller's, else that of the noise, ``x_init`` or the first conditioning tensor.
    """
    if steps < 1:
        raise ValueError(f"sample: steps must be at least 1, got {steps}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"sample: t_start must be in (0, 1], got {t_start}")
    shape = tuple(x_init.shape) if x_init is not None else tuple(shape)
    if device is None:
        for candidate in (noise, x_init):
            if candidate is not None:
                device = candidate.device
                break
        else:
            device = _first_device(cond) or torch.device("cpu")
    batch = shape[0]

    if noise is None:
        noise = _randn(shape, generator, device)
    noise = noise.to(device=device, dtype=torch.float32)
    if tuple(noise.shape) != shape:
        raise ValueError(f"sample: noise has shape {tuple(noise.shape)} but the latents are {shape}")

    # The official sampler computes the whole logSNR grid once, then takes (i, i+1) pairs.
    grid = schedule_logsnr(times, shift=shift).to(device)

    if x_init is not None:
        a0, b0 = vp_scalers(grid[0].expand(batch))
        x_init = x_init.to(device=device, dtype=torch.float32)
        x = _per_sample(a0, x_init) * x_init + _per_sample(b0, x_init) * noise
    else:
        x = noise.clone()
    return x, grid, batch, device


def sample(
    model: Callable[..., torch.Tensor],
    shape: tuple[int, ...] | torch.Size,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    steps: int,
    cfg: float,
    rho: float,
    shift: float,
    eta: float,
    x_init: torch.Tensor | None = None,
    t_start: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    return_x0: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample latents of `shape` with `model(x, r, **inputs) -> ε`, walking t from `t_start` to 0.

    - `cond` / `uncond`: dicts of model inputs. With `cfg != 1` and `uncond` given, both run in one batch
      (see `batch_cfg_inputs`); otherwise only `cond` runs.
    - `rho`: rescale of the guided prediction towards the conditional std (0 = plain CFG).
    - `shift`: schedule shift (Stage C 2, Stage B 1). `eta`: 0 DDIM, 1 DDPM (official default).
    - `x_init` + `t_start < 1`: img2img; `x_init` is noised to `t_start` first with `noise` (or fresh noise
      from `generator`).
    - `noise`: the starting noise (pure noise when there is no `x_init`); lets callers share noise.
    - `callback(step, total, x)` is called after every step. `return_x0`: return the last step's clean
      prediction instead of x at t = 0 (the official pipeline decodes x0).
    Everything runs in float32; wrap the model if it needs another dtype.
    """
    times = torch.linspace(t_start, 0.0, steps + 1)
    x, grid, batch, device = start_state(shape, times, shift, cond, steps, x_init, t_start, generator, noise, device)

    guided = uncond is not None and cfg != 1
    inputs = batch_cfg_inputs(cond, uncond) if guided else dict(cond)

    x0 = x
    for i in range(steps):
        lsnr_now = grid[i].expand(batch)
        r = noise_condition(lsnr_now)
        if guided:
            both = model(torch.cat([x, x], dim=0), r.repeat(2), **inputs).float()
            eps = guide_eps(*both.chunk(2), cfg, rho)
        else:
            eps = model(x, r, **inputs).float()
        x, x0 = ddim_step(x, eps, lsnr_now, grid[i + 1].expand(batch), eta, generator)
        if callback is not None:
            callback(i + 1, steps, x)
    return x0 if return_x0 else x


def sample_ddpm(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``sample`` with eta = 1 (ancestral, "DDPM"): the official default, registered as ``ddpm``."""
    return sample(*args, eta=1.0, **kwargs)


def sample_ddim(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``sample`` with eta = 0 (deterministic DDIM), registered as ``ddim``."""
    return sample(*args, eta=0.0, **kwargs)
