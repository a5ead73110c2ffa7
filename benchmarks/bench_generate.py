"""Stage C generation against diffusers' ``StableCascadePriorPipeline``: the same images, then the time (issue 20.3).

Both stacks get the same Stage C (the LoRA benchmark's tiny and mid configs, ``bench_lora.SIZES``; random weights
built once by ``build_stage_c`` + ``make_learnable`` and renamed into diffusers' ``StableCascadeUNet`` layout by
:func:`studio_to_diffusers`), the same text embeddings (random, given as ``prompt_embeds``/``negative_prompt_embeds``:
no text encoder is loaded: the pipeline gets ``tokenizer=None`` and a stand-in text encoder that only has the
``dtype`` diffusers reads) and the same starting
noise (``latents=``).

What "the same images" can mean. Both are ancestral (DDPM) samplers over the same cosine schedule, but they are
not the same sampler (read from ``cascade_studio/diffusion`` and diffusers' ``DDPMWuerstchenScheduler`` and
prior pipeline, diffusers 0.42):

1. time grid: ours walks logSNR(t) of the cosine schedule at ``linspace(1, 0, 21)`` *shifted by 2* (logSNR - 2 log 2,
   the official Stage C setting); diffusers walks the unshifted schedule at the same t;
2. noise level given to the model: ours ``r = noise_condition(logSNR)`` (= t except where the variance clamp
   [1e-4, 0.9999] acts: 0.9936 at t = 1); diffusers ``r = t`` (1.0 at the first step);
3. guidance: ours ``lerp(uncond, cond, 4)`` then rescaled towards the conditional std with rho 0.7 (the official
   GDF default); diffusers the plain ``lerp``;
4. last step: ours returns the last step's x0 prediction (as the official pipeline decodes); diffusers the DDPM
   posterior mean at t = 0 (alpha_bar 0.9999), without noise;
5. step noise: fresh N(0, 1) every step from each stack's own generator.

So the published settings give *different* images by design (a different schedule), and the comparison is made on
what can be aligned: (a) one denoiser call on identical inputs; (b) the whole 20-step, cfg-4 ancestral sampler with
ours at shift 1 and rho 0, diffusers' scheduler given our ``r`` grid (a subclass that only overrides
``set_timesteps``) and a generator in the state ours draws step noise from, so both draw the same step noise; the
trajectories are compared after every step. The last step differs by construction (4.), and is reported apart.
Then both are timed at their published settings (median; the two stacks alternate).

    python benchmarks/bench_generate.py [--sizes tiny,mid] [--reps 5] [--mid-reps 1] [--threads 1]
                                        [--mid-threads 0] [--aligned-sizes tiny]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import SIZES, diffusers_stage_c  # noqa: E402 - the sibling module: the LoRA benchmark's configs
from results import write_section  # noqa: E402

STEPS, CFG = 20, 4.0
TARGET = 0.8  # our time / diffusers' time
_ATTENTION = {".attention.attn.to_q.": ".attention.to_q.", ".attention.attn.to_k.": ".attention.to_k.",
              ".attention.attn.to_v.": ".attention.to_v.", ".attention.attn.out_proj.": ".attention.to_out.0."}


def studio_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Stage C ``state_dict`` under diffusers' ``StableCascadeUNet`` (prior) names: the attention projections
    lose the ``.attn`` level and ``out_proj`` is ``to_out.0``; every other key is the same."""
    out = {}
    for key, tensor in state_dict.items():
        for ours, theirs in _ATTENTION.items():
            if ours in key:
                key = key.replace(ours, theirs)
                break
        out[key] = tensor
    return out


def build_pair(cfg: dict):
    """(our Stage C, diffusers' StableCascadeUNet) with the same random weights, both eval and frozen."""
    from cascade_studio.models import build_stage_c
    from cascade_studio.models.random_init import make_learnable

    from cascade_studio.models.blocks import GlobalResponseNorm

    ours = make_learnable(build_stage_c(**cfg)).eval().requires_grad_(False)
    with torch.no_grad():  # the official init zeroes GRN's gamma and beta (GRN = identity): give them values, so
        for module in ours.modules():  # the denoiser check covers GRN as a trained model runs it
            if isinstance(module, GlobalResponseNorm):
                module.gamma.normal_(0, 0.5)
                module.beta.normal_(0, 0.1)
    theirs = diffusers_stage_c(cfg)
    theirs.load_state_dict(studio_to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs.eval().requires_grad_(False)


def inputs_for(cfg: dict, side: int, batch: int = 1, seed: int = 0):
    """Random text embeddings (cond and the negative prompt's) and the pixel size whose latents are side x side."""
    from cascade_studio.inference.pipeline import TextEmbeddings

    g = torch.Generator().manual_seed(seed)
    width, pooled = cfg.get("c_clip_text", 1280), cfg.get("c_clip_text_pooled", 1280)
    text = TextEmbeddings(torch.randn(batch, 77, width, generator=g), torch.randn(batch, 1, pooled, generator=g),
                          torch.randn(batch, 77, width, generator=g), torch.randn(batch, 1, pooled, generator=g))
    return text, side * 128 // 3  # 1024 px -> 24 latents, as stage_c_latent_size rounds


def aligned_timesteps(steps: int) -> torch.Tensor:
    """The noise levels ``r`` our sampler feeds the model at shift 1, then 0 (diffusers' grid with our ``r``)."""
    from cascade_studio.diffusion.schedule import logsnr, noise_condition

    r = noise_condition(logsnr(torch.linspace(1.0, 0.0, steps + 1)[:-1]))
    return torch.cat([r, torch.zeros(1)])


class NoTextEncoder(torch.nn.Module):
    """The pipeline's text encoder when embeddings are given: never called; diffusers only reads its ``dtype`` and ``device``."""

    dtype, device = torch.float32, torch.device("cpu")

    def forward(self, *args, **kwargs):
        raise RuntimeError("the benchmark passes prompt embeddings; the text encoder must not run")


def diffusers_pipeline(prior, aligned: bool = False):
    from diffusers import DDPMWuerstchenScheduler, StableCascadePriorPipeline

    class AlignedScheduler(DDPMWuerstchenScheduler):
        def set_timesteps(self, num_inference_steps=None, timesteps=None, device=None):
            self.timesteps = aligned_timesteps(num_inference_steps).to(device)

    scheduler = AlignedScheduler() if aligned else DDPMWuerstchenScheduler()
    pipe = StableCascadePriorPipeline(tokenizer=None, text_encoder=NoTextEncoder(), prior=prior, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(pipe, text, size: int, noise: torch.Tensor, generator=None, on_step=None,
                  steps: int = STEPS) -> torch.Tensor:
    callback = None
    if on_step is not None:
        def callback(_pipe, _i, _t, tensors):
            on_step(tensors["latents"].clone())
            return {}
    with torch.no_grad():
        return pipe(prompt_embeds=text.hidden, prompt_embeds_pooled=text.pooled,
                    negative_prompt_embeds=text.uncond_hidden, negative_prompt_embeds_pooled=text.uncond_pooled,
                    height=size, width=size, num_inference_steps=steps, guidance_scale=CFG, latents=noise.clone(),
                    generator=generator, callback_on_step_end=callback).image_embeddings


class Recording(torch.nn.Module):
    """Stage C that keeps the latents it is called on (the conditional half of the CFG batch): call i sees the
    sampler's x after step i - 1, so the calls trace the trajectory without touching the sampler."""

    def __init__(self, stage_c: torch.nn.Module) -> None:
        super().__init__()
        self.stage_c, self.seen = stage_c, []

    def forward(self, x, r, *args, **kwargs):
        self.seen.append(x[: x.shape[0] // 2].clone())
        return self.stage_c(x, r, *args, **kwargs)


def run_ours(stage_c, text, settings, noise: torch.Tensor) -> torch.Tensor:
    from cascade_studio.inference.pipeline import sample_stage_c

    return sample_stage_c(stage_c, text, settings, noise=noise)


@torch.no_grad()
def denoiser_difference(ours, theirs, text, noise: torch.Tensor, r: float = 0.7) -> float:
    """Max |ours - diffusers| of one CFG-batch denoiser call on identical inputs."""
    x = torch.cat([noise, noise])
    rr = torch.full((x.shape[0],), r)
    clip_text = torch.cat([text.hidden, text.uncond_hidden])
    pooled = torch.cat([text.pooled, text.uncond_pooled])
    clip_img = torch.zeros(x.shape[0], 1, theirs.config.clip_image_in_channels)
    a = ours(x, rr, clip_text, pooled, clip_img)
    b = theirs(x, rr, clip_text_pooled=pooled, clip_text=clip_text, clip_img=clip_img, return_dict=False)[0]
    return float((a - b).abs().max())


class ModelClock:
    """Forward hooks that add up the time spent inside a module's calls (to split a run into model and sampler)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds, self._start = 0.0, 0.0
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._leave)

    def _enter(self, *_args) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_args) -> None:
        self.seconds += time.perf_counter() - self._start


def compare(size: str, reps: int, aligned_sampler: bool, threads: int, seed: int = 0) -> dict:
    from cascade_studio.inference import pipeline as P

    torch.set_num_threads(threads)
    cfg, _, side, _, _ = SIZES[size]
    torch.manual_seed(seed)
    ours, theirs = build_pair(cfg)
    text, pixels = inputs_for(cfg, side, seed=seed)
    shape = (1, 16, *P.stage_c_latent_size(pixels, pixels))
    noise = P.initial_noise(shape, seed)
    row = {"size": size, "config": f"c {cfg['c_hidden'][0]}, blocks {cfg['blocks']}, {side}x{side} latents, batch 1",
           "denoiser_max_abs": denoiser_difference(ours, theirs, text, noise), "trajectory_max_abs": float("nan"),
           "latent_std": float("nan"), "last_step_max_abs": float("nan")}

    if aligned_sampler:  # ours at shift 1, rho 0; diffusers with our r grid and our step-noise generator
        aligned = P.GenerateSettings(prompt="x", seed=seed, width=pixels, height=pixels, dtype="fp32", shift_c=1.0,
                                     rho=0.0, steps_c=STEPS, cfg_c=CFG)
        recording, their_steps = Recording(ours), []
        ours_x0 = run_ours(recording, text, aligned, noise)
        generator = P._generator(seed, P._STREAM_STAGE_C_STEPS)  # the stream our sampler draws step noise from
        their_final = run_diffusers(diffusers_pipeline(theirs, aligned=True), text, pixels, noise, generator,
                                    on_step=their_steps.append)
        # recording.seen[i] is x after step i (seen[0] is the starting noise); diffusers reports after every step
        per_step = [float((a - b).abs().max()) for a, b in zip(recording.seen[1:], their_steps)]
        row.update(trajectory_max_abs=max(per_step), latent_std=float(their_steps[-2].std()),
                   last_step_max_abs=float((ours_x0 - their_final).abs().max()))

    # Timing at each stack's published settings, alternating, median; model time split off by forward hooks.
    published = P.GenerateSettings(prompt="x", seed=seed, width=pixels, height=pixels, dtype="fp32")
    pipe = diffusers_pipeline(theirs)
    run_ours(ours, text, P.GenerateSettings(prompt="x", seed=seed, width=pixels, height=pixels, dtype="fp32",
                                            steps_c=2), noise)  # warm-up: lazy kernels, allocator
    run_diffusers(pipe, text, pixels, noise, steps=2)  # 2 steps: the same shapes and kernels as 20
    clocks = {"ours": ModelClock(ours), "diffusers": ModelClock(theirs)}
    runs = {"ours": lambda: run_ours(ours, text, published, noise), "diffusers": lambda: run_diffusers(
        pipe, text, pixels, noise)}
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "diffusers": []}
    for rep in range(reps):
        for name in (("ours", "diffusers") if rep % 2 == 0 else ("diffusers", "ours")):
            clocks[name].seconds = 0.0
            start = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - start, clocks[name].seconds))
    for name, pairs in times.items():
        row[f"{name}_s"] = statistics.median(total for total, _ in pairs)
        row[f"{name}_outside_s"] = statistics.median(total - model for total, model in pairs)
    row.update(reps=reps, threads=torch.get_num_threads(), ratio=row["ours_s"] / row["diffusers_s"])
    return row


def render(rows: list[dict], about: str, command: str) -> str:
    """The ``generate`` section of RESULTS.md: the agreement table, the time table and the target per row."""
    lines = ["## Generation: Stage C sampler vs diffusers' StableCascadePriorPipeline (bench_generate.py)", "",
             f"Machine: {about}. Command: `{command}`.",
             "Same random Stage C weights in both stacks (our keys renamed to diffusers' layout), same text "
             "embeddings and starting noise, batch 1, fp32. The published settings are not the same sampler in the "
             "two stacks (ours: the official shift 2 and CFG rescale rho 0.7, x0 returned; diffusers: unshifted "
             "schedule, plain CFG, posterior mean returned; see the script's docstring), so agreement is checked on "
             "what can be aligned: one denoiser call on identical inputs, and the 20-step cfg-4 ancestral sampler "
             "with ours at shift 1 / rho 0 and diffusers given our noise levels and our step-noise generator "
             "(every step's latents compared; the last step differs by construction).", "",
             "| size | config | denoiser call max abs diff | steps 1-19 max abs diff (latent std) | "
             "final output max abs diff |", "|---|---|---|---|---|"]
    for row in rows:
        aligned = "not run (--aligned-sizes)" if row["trajectory_max_abs"] != row["trajectory_max_abs"] else \
            f"{row['trajectory_max_abs']:.1e} ({row['latent_std']:.2f})"
        last = "-" if row["last_step_max_abs"] != row["last_step_max_abs"] else f"{row['last_step_max_abs']:.1e}"
        lines.append(f"| {row['size']} | {row['config']} | {row['denoiser_max_abs']:.1e} | {aligned} | {last} |")
    lines += ["", "Time at the published settings (20 steps, cfg 4, each stack's own sampler), median of the "
              "alternating runs after a warm-up; 'outside the model' is the run's time minus the time inside the "
              "20 Stage C calls (forward hooks): the sampler, guidance and the pipeline's own work.", "",
              "| size | ours (s) | diffusers (s) | ours / diffusers | ours outside the model (s) | "
              "diffusers outside the model (s) | runs | threads |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['size']} | {row['ours_s']:.3f} | {row['diffusers_s']:.3f} | **{row['ratio']:.2f}** | "
                     f"{row['ours_outside_s']:.3f} | {row['diffusers_outside_s']:.3f} | {row['reps']} | {row['threads']} |")
    met = [r["size"] for r in rows if r["ratio"] <= TARGET]
    lines += ["", f"Target: ours / diffusers <= {TARGET}: met on {', '.join(met) if met else 'no size'}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per stack, tiny")
    parser.add_argument("--mid-reps", type=int, default=1, help="timed runs per stack, mid (~40 s each on 2 cores)")
    parser.add_argument("--aligned-sizes", default="tiny", help="sizes whose aligned 20-step sampler is compared "
                        "step by step (mid adds two more ~40 s generations)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for tiny (1: on a shared 2-core "
                        "machine two threads spin-wait on each other and small kernels run many times slower)")
    parser.add_argument("--mid-threads", type=int, default=0, help="torch threads for mid (0: torch's default, every "
                        "core, as bench_lora's steps run; its matmuls are large enough to share)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    all_cores = torch.get_num_threads()
    about = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"load average at start {os.getloadavg()[0]:.1f}")
    started = time.perf_counter()
    rows = []
    for size in args.sizes.split(","):
        mid = size == "mid"
        row = compare(size, args.mid_reps if mid else args.reps, size in args.aligned_sizes.split(","),
                      (args.mid_threads or all_cores) if mid else args.threads)
        rows.append(row)
        print(row, flush=True)
    about += f", load average at end {os.getloadavg()[0]:.1f}, {(time.perf_counter() - started) / 60:.1f} min"
    command = "python benchmarks/bench_generate.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("sizes", args.sizes), ("reps", args.reps),
                                                      ("mid_reps", args.mid_reps), ("threads", args.threads),
                                                      ("mid_threads", args.mid_threads),
                                                      ("aligned_sizes", args.aligned_sizes))
        if v != parser.get_default(k))
    report = render(rows, about, command)
    write_section("generate", report, Path(args.out) if args.out else Path(__file__).resolve().parent / "RESULTS.md")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
