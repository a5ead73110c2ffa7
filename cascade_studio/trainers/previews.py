"""Fixed-seed preview grids during training: base vs the current adapter, decoded by the previewer.

Every preview of a run (and of every run with the same recipe prompts and seeds) starts from the same noise, so
grids can be compared across steps and across runs. Text embeddings of the preview prompts are computed once,
before the text encoder is freed. The base column never changes during a run (the base is frozen and the adapter
is switched off for it), so it is sampled at the first preview only and its pictures are reused afterwards: later
previews cost half as much (``preview_cost.py`` counts it; the studio's recipe form shows it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..devices import to_host
from ..run_folder import PREVIEWS_DIR, RunFolder


def preview_text(text_encoder, prompts: list[str]):
    """Text embeddings for every preview prompt (cond + empty-caption uncond), computed once."""
    from ..inference.pipeline import GenerateSettings, encode_prompts

    settings = GenerateSettings(prompt=list(prompts), dtype="fp32")
    return encode_prompts(text_encoder, settings)


def make_preview_fn(recipe, models, model, adapter, tracker, events, run_dir: Path, text, reference: dict | None,
                    method_inputs: Callable | None, method_cfg: Any) -> "PreviewRenderer":
    """A function ``preview(step)`` that renders and logs a grid (rows: prompt x seed; columns: base, adapter)."""
    from ..inference.grid import make_grid
    from ..inference.pipeline import (GenerateSettings, TextEmbeddings, initial_noise, sample_stage_c,
                                      stage_c_latent_size)
    from .steps import _no_dropout

    prompts, seeds = list(recipe.preview.prompts), list(recipe.preview.seeds)
    # Sample at the preset's generation size (1024 px -> 24x24 latents on big/lite, 320 px -> 8x8 on tiny): the
    # latent grid Stage C was trained on, which 42.67 px per latent gives at generation time.
    size = models.preset.generate_resolution
    extra_cond: dict[str, Any] = {}
    extra_uncond: dict[str, Any] = {}
    if reference is not None and method_inputs is not None:
        # The adapter's own inputs (a control hint, an image prompt) from a held-out/training sample.
        extra = _no_dropout(method_inputs)(reference, {}, method_cfg, None)
        extra_cond = {k: v for k, v in extra.items() if k not in ("clip_text", "clip_text_pooled", "clip_img")}
        if "ip_image_embeds" in extra_cond:
            extra_uncond["ip_image_embeds"] = torch.zeros_like(extra_cond["ip_image_embeds"])

    control_image = _control_to_image(extra_cond.get("control"))

    def sample(emb, settings, noise, previewer, enabled: bool):
        model.set_enabled(adapter.name, enabled)
        try:
            latents = sample_stage_c(model, emb, settings, extra_cond=extra_cond, extra_uncond=extra_uncond,
                                     noise=noise)
        finally:
            model.set_enabled(adapter.name, True)
        with torch.no_grad():
            pixels = previewer(latents.to(next(previewer.parameters()).device).float())
        return _to_image(pixels[0])

    renderer = PreviewRenderer()

    def render(step: int) -> None:
        previewer = models.previewer()
        h, w = stage_c_latent_size(size, size)
        rows, labels = [], []
        for p, prompt in enumerate(prompts):
            emb = TextEmbeddings(hidden=text.hidden[p:p + 1], pooled=text.pooled[p:p + 1],
                                 uncond_hidden=text.uncond_hidden[p:p + 1], uncond_pooled=text.uncond_pooled[p:p + 1])
            for seed in seeds:
                settings = GenerateSettings(prompt=prompt, seed=seed, sampler=recipe.preview.sampler,
                                            steps_c=recipe.preview.steps,
                                            cfg_c=recipe.preview.cfg, width=size, height=size, dtype="fp32")
                noise = initial_noise((1, 16, h, w), seed)
                if (p, seed) not in renderer.base_images:  # the first preview: the base never changes afterwards
                    renderer.base_images[(p, seed)] = sample(emb, settings, noise, previewer, enabled=False)
                row = [renderer.base_images[(p, seed)], sample(emb, settings, noise, previewer, enabled=True)]
                if control_image is not None:
                    row.insert(0, control_image)
                rows.append(row)
                labels.append(f"{prompt} (seed {seed})")
        columns = (["control"] if control_image is not None else []) + ["base", f"{adapter.method} @ step {step}"]
        grid = make_grid(rows, labels, columns)
        out = RunFolder(run_dir).preview_path(step)
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        tracker.log_image(grid, f"{PREVIEWS_DIR}/{out.name}")
        events.emit("preview", step=step, path=str(out))

    renderer.render = render
    return renderer


class PreviewRenderer:
    """``preview(step)``; ``base_images[(prompt index, seed)]`` holds the base column, sampled once per run."""

    def __init__(self) -> None:
        self.base_images: dict[tuple[int, int], Any] = {}
        self.render: Callable[[int], None] = lambda step: None

    def __call__(self, step: int) -> None:
        self.render(step)


def _to_image(pixels: torch.Tensor):
    from PIL import Image

    array = to_host((pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0)).numpy()
    return Image.fromarray(array)


def _control_to_image(control: torch.Tensor | None):
    """The control hint as a picture: 1 channel as grey, RGB(+mask) as its first three channels."""
    if control is None or control.dim() != 4 or control.shape[1] not in (1, 3, 4):
        return None
    hint = control[0, :3].float()
    if hint.shape[0] == 1:
        hint = hint.expand(3, -1, -1)
    return _to_image(hint)
