"""Train the toy cascade's shipped weights (``cascade_studio/assets/toy/``) from scratch on toy-shapes.

Phases, all with this studio's own models and diffusion functions:

1. effnet + previewer as an autoencoder on the 4000-image ``train`` split (image -> 8x8x16 latents -> 64 px).
   The shape's pixels get a larger loss weight, because a plain MSE is dominated by the background and the
   shape's colour (what prompts ask for) came out washed out. Small noise on the latents makes the decoder
   tolerant of imperfect Stage C samples.
2. BatchNorm statistics recomputed over the data (the frozen effnet runs in eval mode), the training set
   encoded once, and the previewer fine-tuned on exactly those eval-mode latents plus the held-out purple
   split's: the decoder must draw colours the prior never saw (only Stage C is kept from purple).
3. The IP-Adapter image encoder (the ``tiny`` open_clip tower) as the image half of a small CLIP, contrastively
   against the captions; a random tower's embedding hardly separates shape colours (nearest-centroid colour
   probe ~33% before, ~98% after), so image prompts could not carry one.
4. Stage C as a text-to-latent prior: epsilon target, P2 weight, cosine schedule (``diffusion.add_noise``,
   ``diffusion_loss``), 10% caption dropout so classifier-free guidance works, an EMA of the weights shipped.
   The text encoder stays at its deterministic random init; each caption is encoded once.
5. Float16 safetensors written to ``cascade_studio/assets/toy/`` and a prompt-following check printed.

The shipped files are three runs, on 2 CPU cores with another job on the second core (1 torch thread):

1. the defaults (19 minutes: render 13 s, autoencoder 2.7 min, encode + previewer 1 min, image encoder 40 s,
   Stage C 3000 steps 14 min);
2. ``--continue-stage-c --previewer-steps 0 --stage-c-steps 3000 --stage-c-lr 5e-4`` (15 minutes): Stage C
   draws small shapes more reliably (of the toy LoRA's 50 purple samples 1 instead of 11 came out empty);
3. ``--continue-stage-c --previewer-steps 600 --stage-c-steps 0 --shape-weight 1`` (2 minutes): the previewer
   fine-tuned with less extra weight on shape pixels. At 8 it painted every uncertain edge pixel in the
   shape's colour, so decoded shapes came out ~1.6x their true area (encode -> decode mask IoU 0.67); at 1
   they are ~1.2x (IoU 0.79) and colours still decode right, which lets the toy ControlNet's placement show.

Seeded, but not bit-identical across machines or thread counts.

Run: ``python scripts/train_toy_base.py [--out DIR] [--stage-c-steps N] [--threads N]``, then the two
continuations above with the same ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PREVIEW = 64  # previewer output side for 8x8 latents


def load_toy_shapes():
    """The generator module (datasets/ is data, not a package, so it is loaded by path)."""
    path = REPO / "datasets" / "make_toy_shapes.py"
    spec = importlib.util.spec_from_file_location("make_toy_shapes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_toy_shapes"] = module
    spec.loader.exec_module(module)
    return module


def log(message: str, start: float) -> None:
    print(f"[{time.time() - start:7.1f}s] {message}", flush=True)


def optimizer_step(optimizer: torch.optim.Optimizer, schedule, loss: torch.Tensor) -> None:
    """One plain training step: backward, update, advance the learning-rate schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()


def shape_weights(masks: torch.Tensor, shape_weight: float) -> torch.Tensor:
    """Per-pixel loss weights: 1 on the background, 1 + shape_weight on the shape."""
    return 1 + shape_weight * masks


def train_autoencoder(effnet: nn.Module, previewer: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                      weights: torch.Tensor, steps: int, batch: int, lr: float, start: float) -> None:
    """Phase 1: effnet and previewer trained together to reproduce the 64 px image."""
    effnet.frozen = False
    effnet.requires_grad_(True).train()
    previewer.requires_grad_(True).train()
    params = list(effnet.parameters()) + list(previewer.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        latents = effnet.encode(images[idx].float() / 255)
        latents = latents + 0.1 * torch.randn(latents.shape, generator=g)
        loss = ((previewer(latents) - targets[idx]) ** 2 * weights[idx]).mean()
        optimizer_step(optimizer, schedule, loss)
        if step % 100 == 0 or step == steps - 1:
            log(f"autoencoder step {step}: weighted mse {loss.item():.4f}", start)
    effnet.frozen = True
    effnet.requires_grad_(False).eval()


@torch.no_grad()
def calibrate_batchnorm(effnet: nn.Module, images: torch.Tensor, count: int, batch: int) -> None:
    """Recompute every BatchNorm's running statistics as a plain average over `count` images.

    Training leaves momentum-averaged statistics of a moving network; the frozen compressor runs in eval
    mode, so its statistics should describe the final weights.
    """
    norms = [m for m in effnet.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    nn.Module.train(effnet, True)
    for i in range(0, count, batch):
        effnet.encode(images[i:i + batch].float() / 255)
    nn.Module.train(effnet, False)
    for norm in norms:
        norm.momentum = 0.1


@torch.no_grad()
def encode_all(effnet: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([effnet.encode(images[i:i + batch].float() / 255) for i in range(0, len(images), batch)])


def finetune_previewer(previewer: nn.Module, latents: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                       steps: int, batch: int, lr: float, start: float) -> None:
    """Phase 2: the decoder adapts to the final, eval-mode latents (and to small sampling errors)."""
    previewer.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(previewer.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        noisy = latents[idx] + 0.1 * torch.randn(latents[idx].shape, generator=g)
        loss = ((previewer(noisy) - targets[idx]) ** 2 * weights[idx]).mean()
        optimizer_step(optimizer, schedule, loss)
        if step % 200 == 0 or step == steps - 1:
            log(f"previewer step {step}: weighted mse {loss.item():.4f}", start)
    previewer.requires_grad_(False).eval()


def train_image_encoder(encoder: nn.Module, images: torch.Tensor, caption_ids: torch.Tensor, pooled: torch.Tensor,
                        steps: int, batch: int, lr: float, start: float) -> nn.Module:
    """Phase 3: the IP-Adapter image encoder (the ``tiny`` open_clip tower) as the image half of a small CLIP.

    Symmetric InfoNCE between its embedding and a linear projection of the frozen text encoder's pooled caption
    embedding (the projection is thrown away afterwards). Two images with the same caption are not counted as
    negatives of each other. What it learns is what the captions name: colour, shape, size, place, background.
    """
    pixels = torch.cat([encoder.preprocess(images[i:i + 256].float() / 255) for i in range(0, len(images), 256)])
    text = pooled.reshape(len(pooled), -1)
    text = text - text.mean(0, keepdim=True)  # the random tower's pooled outputs share one big component
    visual = encoder.visual.requires_grad_(True).train()
    projection = nn.Linear(text.shape[-1], encoder.embed_dim, bias=False)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    optimizer = torch.optim.AdamW([*visual.parameters(), *projection.parameters(), log_scale], lr=lr,
                                  weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(4)
    eye = torch.eye(batch, dtype=torch.bool)
    for step in range(steps):
        idx = torch.randint(0, len(pixels), (batch,), generator=g)
        image_emb = F.normalize(visual(pixels[idx]), dim=-1)
        text_emb = F.normalize(projection(text[caption_ids[idx]]), dim=-1)
        logits = image_emb @ text_emb.T * log_scale.exp().clamp(max=100)
        same = (caption_ids[idx][:, None] == caption_ids[idx][None, :]) & ~eye
        logits = logits.masked_fill(same, float("-inf"))
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer_step(optimizer, schedule, loss)
        if step % 100 == 0 or step == steps - 1:
            log(f"image encoder step {step}: contrastive loss {loss.item():.4f}", start)
    visual.requires_grad_(False).eval()
    return encoder


@torch.no_grad()
def colour_probe(encoder: nn.Module, shapes) -> float:
    """Nearest-centroid colour accuracy of the image embedding: centroids from the control split, scored on test."""
    def embed(split):
        specs = shapes.sample_specs(split)
        images = torch.from_numpy(np.stack([shapes.render(s) for s in specs])).permute(0, 3, 1, 2).float() / 255
        return F.normalize(encoder.encode(images)[:, 0], dim=-1), [s.colour for s in specs]

    (fit, fit_colours), (test, test_colours) = embed("control"), embed("test")
    names = sorted(set(fit_colours))
    centroids = torch.stack([fit[[c == n for c in fit_colours]].mean(0) for n in names])
    guess = (test @ centroids.T).argmax(1)
    return sum(names[int(i)] == c for i, c in zip(guess, test_colours)) / len(test_colours)


@torch.no_grad()
def encode_captions(text_encoder, captions: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, pooled = zip(*(text_encoder.encode(captions[i:i + batch]) for i in range(0, len(captions), batch)))
    return torch.cat(hidden), torch.cat(pooled)


def train_stage_c(stage_c: nn.Module, latents: torch.Tensor, caption_ids: torch.Tensor, hidden: torch.Tensor,
                  pooled: torch.Tensor, empty: int, steps: int, batch: int, lr: float, ema_decay: float,
                  start: float, weighting: str = "p2") -> nn.Module:
    """Phase 4: the text-to-latent prior; returns the EMA copy (what ships)."""
    from cascade_studio.diffusion import add_noise, diffusion_loss, sample_t

    ema = copy.deepcopy(stage_c).requires_grad_(False)
    # eval(): no dropout. Stage C has no BatchNorm, so eval mode changes nothing else; dropout only slows
    # a training run this short.
    stage_c.requires_grad_(True).eval()
    optimizer = torch.optim.AdamW(stage_c.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(3)
    clip_img = torch.zeros(batch, 1, stage_c.clip_img_mapper.in_features)
    running = None
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        ids = caption_ids[idx].clone()
        ids[torch.rand(batch, generator=g) < 0.1] = empty  # caption dropout: the unconditional branch of CFG
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = sample_t(batch, generator=g)
        x_t, lsnr = add_noise(x0, t, noise)
        from cascade_studio.diffusion import noise_condition

        pred = stage_c(x_t, noise_condition(lsnr), hidden[ids], pooled[ids], clip_img)
        loss = diffusion_loss(pred, noise, lsnr, weighting=weighting)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage_c.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: the EMA follows closely at first
        with torch.no_grad():
            for e, p in zip(ema.parameters(), stage_c.parameters()):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"stage c step {step}: loss {running:.4f}", start)
    return ema.eval()


@torch.no_grad()
def check_prompts(stage_c: nn.Module, text_encoder, previewer: nn.Module, shapes, seeds: int = 8) -> float:
    """Share of samples whose dominant colour is the prompted one (the test's measure, on fewer samples)."""
    from cascade_studio.inference.pipeline import GenerateSettings, _to_images, sample_stage_c

    hits = total = 0
    # 320 px: the pipeline's ceil(320 / 42.67) = 8 latents, the 8x8 grid of 256 px training images.
    for colour in shapes.BASE_COLOURS:
        settings = GenerateSettings(prompt=f"a large {colour} circle", batch=seeds, width=320, height=320,
                                    dtype="fp32", seed=0)
        latents = sample_stage_c(stage_c, text_encoder, settings)
        for image in _to_images(previewer(latents)):
            hits += shapes.dominant_colour(np.asarray(image)) == colour
            total += 1
    return hits / total


def image_encoder_phase(args, shapes, specs, images, start, text_encoder=None, captions=None, caption_ids=None,
                        pooled=None) -> None:
    """Train and write the IP-Adapter image encoder (phase 3)."""
    from cascade_studio.models.encoders import build_ip_image_encoder
    from cascade_studio.models.random_init import build_random
    from cascade_studio.models.toy import asset_path, save_component

    if pooled is None:
        text_encoder = build_random("text_encoder", "toy")
        captions = sorted({s.caption for s in specs})
        _, pooled = encode_captions(text_encoder, captions)
        index = {c: i for i, c in enumerate(captions)}
        caption_ids = torch.tensor([index[s.caption] for s in specs])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the toy encoder's starting point is the tiny one's (models.toy)
        encoder = build_ip_image_encoder("toy")
    log(f"image encoder before training: colour probe {colour_probe(encoder, shapes):.0%}", start)
    train_image_encoder(encoder, images, caption_ids, pooled, args.image_encoder_steps, 128, 2e-3, start)
    log(f"image encoder after training: colour probe {colour_probe(encoder, shapes):.0%}", start)
    path = save_component(encoder, args.out / asset_path("ip_image_encoder").name)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "cascade_studio" / "assets" / "toy")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--ae-steps", type=int, default=800)
    parser.add_argument("--previewer-steps", type=int, default=600)
    parser.add_argument("--stage-c-steps", type=int, default=3000)
    parser.add_argument("--continue-stage-c", action="store_true",
                        help="load the effnet, previewer and Stage C from --out and continue from them: the previewer "
                             "phase (--previewer-steps, 0 skips it) and Stage C (--stage-c-steps at --stage-c-lr)")
    parser.add_argument("--image-encoder-steps", type=int, default=1500)
    parser.add_argument("--only-image-encoder", action="store_true",
                        help="train only the IP-Adapter image encoder and write only its file to --out")
    parser.add_argument("--reuse-autoencoder", action="store_true",
                        help="load the effnet and previewer from --out (no autoencoder phase) and train a fresh Stage C")
    parser.add_argument("--stage-c-lr", type=float, default=1e-3)
    parser.add_argument("--shape-weight", type=float, default=8.0,
                        help="extra loss weight of the shape's pixels in the autoencoder and previewer phases")
    parser.add_argument("--loss-weight", default="p2", choices=("p2", "debiased", "v"),
                        help="Stage C loss weighting (cascade_studio.diffusion.loss_weight)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is fastest on a busy 2-core machine (OpenMP oversubscription)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()

    from cascade_studio.models.random_init import build_random
    from cascade_studio.models.toy import asset_path, save_component

    shapes = load_toy_shapes()
    specs = shapes.sample_specs("train")[: args.images]
    images = torch.from_numpy(np.stack([shapes.render(s) for s in specs])).permute(0, 3, 1, 2).contiguous()
    targets = F.interpolate(images.float() / 255, size=PREVIEW, mode="area")
    masks = torch.from_numpy(np.stack([shapes.shape_mask(s, PREVIEW) for s in specs])).float()[:, None]
    weights = shape_weights(masks, args.shape_weight)
    log(f"rendered {len(specs)} images", start)

    if args.only_image_encoder:
        image_encoder_phase(args, shapes, specs, images, start)
        return
    effnet, previewer = build_random("effnet", "toy"), build_random("previewer", "toy")
    stage_c = build_random("stage_c", "toy")
    if args.continue_stage_c or args.reuse_autoencoder:
        from cascade_studio.models.toy import load_state

        reused = (("effnet", effnet), ("previewer", previewer)) + ((("stage_c", stage_c),) if args.continue_stage_c else ())
        for name, module in reused:
            load_state(module, args.out / asset_path(name).name).float().eval()
        latents = encode_all(effnet, images)
    else:
        train_autoencoder(effnet, previewer, images, targets, weights, args.ae_steps, 16, 3e-3, start)
        calibrate_batchnorm(effnet, images, min(1024, len(images)), 64)
        latents = encode_all(effnet, images)
        log(f"encoded: latent mean {latents.mean():.3f} std {latents.std():.3f}", start)
    if not ((args.continue_stage_c or args.reuse_autoencoder) and args.previewer_steps == 0):
        # The decoder must draw colours the prior never saw (an adapter teaches them later), so it also sees
        # the held-out split: only Stage C is kept from purple. The compressor already separates purple from
        # red; a decoder trained on the base colours alone drew purple latents red.
        extra = shapes.sample_specs("purple")
        extra_images = torch.from_numpy(np.stack([shapes.render(s) for s in extra])).permute(0, 3, 1, 2)
        extra_masks = torch.from_numpy(np.stack([shapes.shape_mask(s, PREVIEW) for s in extra])).float()[:, None]
        finetune_previewer(
            previewer, torch.cat([latents, encode_all(effnet, extra_images)]),
            torch.cat([targets, F.interpolate(extra_images.float() / 255, size=PREVIEW, mode="area")]),
            torch.cat([weights, shape_weights(extra_masks, args.shape_weight)]), args.previewer_steps, 32, 1e-3, start)

    text_encoder = build_random("text_encoder", "toy")
    captions = sorted({s.caption for s in specs}) + [""]
    hidden, pooled = encode_captions(text_encoder, captions)
    index = {c: i for i, c in enumerate(captions)}
    caption_ids = torch.tensor([index[s.caption] for s in specs])
    log(f"encoded {len(captions)} distinct captions", start)

    image_encoder_phase(args, shapes, specs, images, start, text_encoder, captions, caption_ids, pooled)

    if args.stage_c_steps > 0:
        stage_c = train_stage_c(stage_c, latents, caption_ids, hidden, pooled, index[""], args.stage_c_steps, 32,
                                args.stage_c_lr, 0.995, start, args.loss_weight)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, module in (("effnet", effnet), ("previewer", previewer), ("stage_c", stage_c)):
        path = save_component(module, args.out / asset_path(name).name)
        log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", start)
    accuracy = check_prompts(stage_c, text_encoder, previewer, shapes)
    log(f"prompted colour is the dominant colour in {accuracy:.0%} of samples", start)


if __name__ == "__main__":
    main()
