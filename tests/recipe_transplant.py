"""Shortened copies of the shipped recipes for tests: the published real-size recipes moved onto the tiny model
with every training setting kept, and the tiny/toy recipes cut to a few steps."""
from __future__ import annotations

from pathlib import Path

import yaml

from cascade_studio.adapters import catalog

REPO = Path(__file__).resolve().parents[1]
# The published recipes live in one folder per method, named as the method (recipes/lora, recipes/lcm, ...).
PUBLISHED = sorted(p for group in catalog.BUILTIN_METHODS for p in (REPO / "recipes" / group).glob("*.yaml"))
TINY = sorted((REPO / "recipes" / "tiny").glob("*.yaml"))
TOY = sorted((REPO / "recipes" / "toy").glob("*.yaml"))
SHIPPED = PUBLISHED + TINY + TOY


def recipe_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def transplant(recipe: Path, workspace: Path, *, steps: int = 2, max_images: int | None = None) -> list[str]:
    """Overrides that shorten ``recipe`` to ``steps`` steps with a checkpoint and a preview at each, a held-out
    split, and (for a published recipe) move it onto the tiny model.

    A published recipe keeps everything but what only the real weights can serve: the preset and its weights,
    the 768 px resolution (256 px gives the tiny model its 8x8 latents) and the ViT image encoder of the
    IP-Adapter (the tiny one has the tiny preset's 32-dim embeddings). Precision, batch size, accumulation,
    dropouts, offset noise, optimizer, checkpointing and export formats stay as published.
    """
    raw = yaml.safe_load(recipe.read_text())
    overrides = [f"workspace={workspace}", f"train.max_steps={steps}", "train.checkpoint_every=1",
                 "preview.every=1", "preview.steps=2", "preview.seeds=[0]"]
    if recipe in PUBLISHED:
        overrides += ["model.preset=tiny", "model.repo_id=null", "model.variant=null", "data.resolution=256"]
        if raw["adapter"]["method"] == "ip_adapter":
            overrides.append("adapter.ip_adapter.image_encoder=tiny")
    if not raw.get("data", {}).get("holdout_fraction"):
        overrides.append("data.holdout_fraction=0.25")
    if raw.get("schedule", {}).get("warmup_steps"):
        overrides.append(f"schedule.warmup_steps={steps - 1}")  # warmup must end before the shortened run does
    if max_images:
        overrides.append(f"data.max_images={max_images}")
    return overrides
