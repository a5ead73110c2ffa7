"""Diffusion maths against the official GDF reference tensors, plus sampler and loss invariants."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade_studio.diffusion import (
    add_noise,
    batch_cfg_inputs,
    diffusion_loss,
    logsnr,
    logsnr_limits,
    noise_condition,
    offset_noise,
    p2_weight,
    sample,
    sample_t,
    vp_scalers,
)

from reference_paths import REFERENCE_DIR  # noqa: E402

PARITY = REFERENCE_DIR / "official_parity.safetensors"


@pytest.fixture(scope="module")
def gdf() -> dict[str, torch.Tensor]:
    if not PARITY.exists():
        pytest.fail(f"reference file missing: {PARITY}")
    return {k: v for k, v in load_file(str(PARITY)).items() if k.startswith("gdf.")}


# ---------------------------------------------------------------- parity with the official GDF


@pytest.mark.parametrize("shift", [1, 2])
def test_schedule_matches_official(gdf: dict[str, torch.Tensor], shift: int) -> None:
    t = gdf[f"gdf.shift{shift}.t"]
    lsnr = logsnr(t, shift=shift)
    a, b = vp_scalers(lsnr)
    ours = {"logsnr": lsnr, "a": a, "b": b, "noise_cond": noise_condition(lsnr), "p2_weight": p2_weight(lsnr)}
    for name, value in ours.items():
        torch.testing.assert_close(value, gdf[f"gdf.shift{shift}.{name}"], atol=1e-5, rtol=1e-5, msg=name)


def test_deterministic_sample_matches_official(gdf: dict[str, torch.Tensor]) -> None:
    def model(x: torch.Tensor, r: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return 0.3 * x + 0.1 * r.view(-1, 1, 1, 1) + cond.view(-1, 1, 1, 1)

    cond = gdf["gdf.sample.cond"]
    noise = gdf["gdf.sample.x_init"]
    out = sample(model, noise.shape, {"cond": cond}, {"cond": torch.zeros_like(cond)}, steps=6, cfg=4.0,
                 rho=0.7, shift=2.0, eta=0.0, noise=noise)
    # Values reach ~300, where one float32 ulp is 3e-5: compare relatively at 1e-5.
    torch.testing.assert_close(out, gdf["gdf.sample.x_final"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- schedule properties


def test_shift_clamps_to_unshifted_limits() -> None:
    low, high = logsnr_limits()
    # float32 "1 - 0.9999" is off by ~2e-5 relative, hence rel 1e-4.
    assert high == pytest.approx(math.log(0.9999 / 0.0001), rel=1e-4)
    assert low == pytest.approx(-high, rel=1e-4)
    # shift 2 lowers logSNR by 2·log 2 everywhere it is not clamped ...
    mid = torch.tensor([0.3, 0.6])
    torch.testing.assert_close(logsnr(mid, 2.0), logsnr(mid) - 2 * math.log(2))
    # ... but never goes below the t = 1 limit, and a huge shift saturates there.
    assert logsnr(torch.tensor(1.0), 2.0).item() == pytest.approx(low)
    assert logsnr(torch.tensor(0.5), 1e6).item() == pytest.approx(low)


def test_noise_condition_inverts_schedule() -> None:
    t = torch.linspace(0.05, 0.95, 19)
    torch.testing.assert_close(noise_condition(logsnr(t)), t, atol=1e-4, rtol=0)


def test_sample_t_range_and_reproducibility() -> None:
    t = sample_t(10_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0.001 and t.max() <= 1.0
    assert 0.45 < t.mean().item() < 0.55
    again = sample_t(10_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_add_noise_is_variance_preserving() -> None:
    x0 = torch.randn(4, 16, 8, 8)
    noise = torch.randn(4, 16, 8, 8)
    t = torch.tensor([0.001, 0.3, 0.7, 1.0])
    x_t, lsnr = add_noise(x0, t, noise, shift=2.0)
    a, b = vp_scalers(lsnr)
    torch.testing.assert_close(a**2 + b**2, torch.ones(4))
    torch.testing.assert_close(x_t[1], a[1] * x0[1] + b[1] * noise[1])
    # At t = 1 the latent is almost pure noise.
    assert (x_t[3] - noise[3]).abs().max() < 0.05


def test_offset_noise_is_constant_per_channel() -> None:
    noise = torch.zeros(2, 3, 5, 5)
    out = offset_noise(noise, 0.1, generator=torch.Generator().manual_seed(0))
    flat = out.flatten(2)
    assert torch.equal(flat.amax(-1), flat.amin(-1))  # one value per (B, C)
    assert flat[:, :, 0].abs().max() > 0
    assert flat[:, :, 0].abs().max() < 1.0  # scaled by 0.1
    assert offset_noise(noise, 0.0) is noise


def test_diffusion_loss_weighting() -> None:
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    lsnr = torch.tensor([0.0, math.log(3.0)])
    # MSEs 1 and 4; P2 weights 1/(1+1) = 0.5 and 1/(1+3) = 0.25.
    per_sample = diffusion_loss(pred, target, lsnr, reduction="none")
    torch.testing.assert_close(per_sample, torch.tensor([0.5, 1.0]))
    assert diffusion_loss(pred, target, lsnr).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="reduction"):
        diffusion_loss(pred, target, lsnr, reduction="sum")


# ---------------------------------------------------------------- sampler invariants


def _model(x: torch.Tensor, r: torch.Tensor, text: torch.Tensor, **_: object) -> torch.Tensor:
    """A model whose ε depends on x, r and a per-sample conditioning tensor in a non-trivial way."""
    return torch.tanh(0.5 * x + r.view(-1, 1, 1, 1) * text.view(-1, 1, 1, 1) + 0.2 * text.view(-1, 1, 1, 1) ** 2)


def _inputs(batch: int = 2) -> tuple[dict, dict]:
    return {"text": torch.linspace(0.5, 1.5, batch)}, {"text": torch.zeros(batch)}


def _run(**overrides: object) -> torch.Tensor:
    cond, uncond = _inputs()
    kwargs: dict = dict(model=_model, shape=(2, 4, 3, 3), cond=cond, uncond=uncond, steps=5, cfg=3.0, rho=0.7,
                        shift=2.0, eta=0.0, noise=torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)))
    kwargs.update(overrides)
    return sample(**kwargs)


def test_cfg_one_equals_conditional_only() -> None:
    cond, _ = _inputs()
    cond_only = _run(uncond=None)
    assert torch.equal(_run(cfg=1.0), cond_only)
    # Guiding towards an identical "unconditional" branch must also give the conditional result; this runs
    # the batched path, so it checks that the two halves are split back in the right order.
    torch.testing.assert_close(_run(uncond=dict(cond), cfg=4.0), cond_only, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_run(), cond_only, atol=1e-3)


def test_rho_zero_is_plain_cfg_lerp() -> None:
    cond, uncond = _inputs()
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    cfg = 3.0
    out = sample(_model, noise.shape, cond, uncond, steps=1, cfg=cfg, rho=0.0, shift=1.0, eta=0.0, noise=noise,
                 return_x0=True)
    lsnr = logsnr(torch.tensor(1.0)).expand(2)
    r = noise_condition(lsnr)
    eps = _model(noise, r, **uncond) + cfg * (_model(noise, r, **cond) - _model(noise, r, **uncond))
    a, b = vp_scalers(lsnr)
    expected = (noise - b.view(-1, 1, 1, 1) * eps) / a.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    # rho > 0 must change the result (the rescale is active).
    rescaled = sample(_model, noise.shape, cond, uncond, steps=1, cfg=cfg, rho=0.7, shift=1.0, eta=0.0,
                      noise=noise, return_x0=True)
    assert not torch.allclose(rescaled, out, atol=1e-3)


def test_eta_zero_is_deterministic_without_generator() -> None:
    cond, uncond = _inputs()
    noise = torch.randn(2, 4, 3, 3)
    runs = [sample(_model, noise.shape, cond, uncond, 4, 3.0, 0.7, 2.0, 0.0, noise=noise) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_eta_one_reproduces_with_same_seed() -> None:
    cond, uncond = _inputs()

    def run(seed: int) -> torch.Tensor:
        return sample(_model, (2, 4, 3, 3), cond, uncond, 4, 3.0, 0.7, 2.0, 1.0,
                      generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))
    # With the same starting noise, eta = 1 injects fresh noise on the way, so it differs from eta = 0.
    noise = torch.randn(2, 4, 3, 3)
    ddim = sample(_model, noise.shape, cond, uncond, 4, 3.0, 0.7, 2.0, 0.0, noise=noise)
    ddpm = sample(_model, noise.shape, cond, uncond, 4, 3.0, 0.7, 2.0, 1.0, noise=noise,
                  generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(ddim, ddpm, atol=1e-3)


def test_img2img_stays_closer_to_init() -> None:
    x_init = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))

    def distance(t_start: float) -> float:
        out = _run(x_init=x_init, t_start=t_start, eta=1.0, noise=None, generator=torch.Generator().manual_seed(4))
        return (out - x_init).pow(2).mean().item()

    assert distance(0.3) < distance(1.0)
    with pytest.raises(ValueError, match="t_start"):
        _run(t_start=0.0)


def test_callback_reports_every_step() -> None:
    seen: list[tuple[int, int]] = []
    _run(steps=3, callback=lambda step, total, x: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_list_inputs_with_none_are_batched() -> None:
    hint = torch.ones(2, 4, 3, 3)
    cond = {"text": torch.tensor([1.0, 2.0]), "cnet": [None, hint, None], "mode": "x"}
    uncond = {"text": torch.tensor([0.0, 0.0]), "cnet": [None, None, 2 * hint], "mode": "x"}
    merged = batch_cfg_inputs(cond, uncond)
    assert merged["mode"] == "x"
    assert merged["cnet"][0] is None
    torch.testing.assert_close(merged["cnet"][1], torch.cat([hint, torch.zeros_like(hint)]))
    torch.testing.assert_close(merged["cnet"][2], torch.cat([torch.zeros_like(hint), 2 * hint]))
    torch.testing.assert_close(merged["text"], torch.tensor([1.0, 2.0, 0.0, 0.0]))

    calls: list[dict] = []

    def model(x: torch.Tensor, r: torch.Tensor, text: torch.Tensor, cnet: list, mode: str) -> torch.Tensor:
        calls.append({"x": x.shape[0], "r": r.shape[0], "cnet": [c if c is None else c.shape[0] for c in cnet]})
        extra = sum(c for c in cnet if c is not None)
        return 0.1 * x + text.view(-1, 1, 1, 1) + extra

    sample(model, (2, 4, 3, 3), cond, uncond, steps=2, cfg=2.0, rho=0.0, shift=1.0, eta=0.0)
    assert calls == [{"x": 4, "r": 4, "cnet": [None, 4, 4]}] * 2  # one batched call per step

    with pytest.raises(ValueError, match="mode"):
        batch_cfg_inputs({"mode": "a"}, {"mode": "b"})
    with pytest.raises(ValueError, match="keys"):
        batch_cfg_inputs({"text": torch.zeros(1)}, {})


def test_loss_weightings_follow_their_formulas():
    from cascade_studio.diffusion import LOSS_WEIGHTS, diffusion_loss, loss_weight, p2_weight

    lsnr = torch.tensor([-8.0, -2.0, 0.0, 3.0, 9.0])
    snr = lsnr.exp()
    assert torch.allclose(loss_weight(lsnr, "p2"), p2_weight(lsnr))
    # debiased: 1/sqrt(SNR), with SNR clamped to 1000 (the last entry, e^9 > 1000)
    assert torch.allclose(loss_weight(lsnr, "debiased")[:4], snr[:4].rsqrt())
    assert loss_weight(lsnr, "debiased")[4].item() == pytest.approx(1000 ** -0.5)
    # v: 1 + 1/SNR, capped at 100 (the first entry, 1 + e^8)
    assert loss_weight(lsnr, "v")[0].item() == pytest.approx(100.0)
    assert torch.allclose(loss_weight(lsnr, "v")[1:], 1 + 1 / snr[1:])
    pred, target = torch.randn(5, 4, 2, 2), torch.randn(5, 4, 2, 2)
    mse = (pred - target).pow(2).flatten(1).mean(1)
    for kind in LOSS_WEIGHTS:
        expected = (mse * loss_weight(lsnr, kind)).mean()
        assert diffusion_loss(pred, target, lsnr, weighting=kind).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weight(lsnr, "snr")


# ---------------------------------------------------------------- the sampler registry


def test_named_samplers_are_the_eta_samplers_exactly_and_unknown_names_list_the_known_ones() -> None:
    from cascade_studio.diffusion import DEFAULT_SAMPLER, get_sampler, sample_with, sampler_names

    def model(x, r, cond):
        return 0.3 * x + 0.1 * r.view(-1, 1, 1, 1) + cond.view(-1, 1, 1, 1)

    cond, uncond = {"cond": torch.tensor([0.5, -0.2])}, {"cond": torch.zeros(2)}
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(7))
    for name, eta in (("ddpm", 1.0), ("ddim", 0.0)):
        def run(fn, **extra):
            return fn(model, noise.shape, cond, uncond, 5, 4.0, 0.7, 2.0, noise=noise,
                      generator=torch.Generator().manual_seed(3), **extra)
        assert torch.equal(run(functools.partial(sample_with, name)), run(sample, eta=eta)), name
    assert DEFAULT_SAMPLER == "ddpm" and {"ddpm", "ddim"} <= set(sampler_names())
    with pytest.raises(ValueError, match="unknown sampler 'dpm'; choose one of ddpm, ddim"):
        get_sampler("dpm")


# ---------------------------------------------------------------- the LCM sampler


def test_consistency_scalings_hold_the_boundary_and_hand_over_to_the_prediction() -> None:
    from cascade_studio.diffusion import consistency_scalings

    c_skip, c_out = consistency_scalings(torch.tensor([0.0, 0.001, 0.01, 0.5, 1.0]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x exactly
    assert torch.all(c_skip[1:] < 0.003) and torch.all(c_out[2:] > 0.9999)
    assert torch.all(c_skip[1:] ** 2 + c_out[1:] ** 2 <= 1 + 1e-6)


def test_lcm_sampler_lands_on_the_clean_latent_an_exact_model_points_to_in_one_call_per_step() -> None:
    """A model whose ε is exact for one clean latent x0* (it recovers a, b from the noise level r): every step's
    consistency output is x0*, whatever the step count; each step is one unguided call of the cond batch only."""
    from cascade_studio.diffusion import sample_with, sampler_names, get_sampler

    target = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(11))
    calls = []

    def model(x, r, cond):
        calls.append(x.shape[0])
        a, b = vp_scalers(logsnr(r))  # noise_condition inverts the unshifted schedule: r -> t -> logSNR
        a, b = a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)
        return (x - a * target) / b

    assert "lcm" in sampler_names() and not get_sampler("lcm").guided
    for steps in (1, 4):
        calls.clear()
        out = sample_with("lcm", model, target.shape, {"cond": torch.ones(2)}, {"cond": torch.zeros(2)}, steps,
                          4.0, 0.7, 2.0, generator=torch.Generator().manual_seed(0),
                          noise=torch.randn(target.shape, generator=torch.Generator().manual_seed(1)))
        assert calls == [2] * steps  # no CFG pass: the batch is never doubled
        torch.testing.assert_close(out, target, atol=2e-3, rtol=1e-3)


def test_lcm_sampler_renoises_between_steps_from_its_generator() -> None:
    from cascade_studio.diffusion import sample_lcm

    def model(x, r, cond):  # a poor model: its x0 depends on the noise it sees
        return 0.5 * x

    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    runs = [sample_lcm(model, noise.shape, {"cond": torch.ones(1)}, None, 4, 1.0, 0.0, 2.0, noise=noise,
                       generator=torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
