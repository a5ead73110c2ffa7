"""Training previews: the base column is sampled once per run and reused, and the cost the studio shows for a
recipe (``trainers/preview_cost.py``) is what the previews really spend, counted in Stage C evaluations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_studio.adapters.base import AdaptedStageC
from cascade_studio.adapters.lora import create_adapter
from cascade_studio.adapters.lora.config import LoraConfig
from cascade_studio.adapters.registry import AdapterContext
from cascade_studio.config import load_recipe
from cascade_studio.trainers.components import BaseModels
from cascade_studio.trainers.preview_cost import preview_cost
from cascade_studio.trainers.previews import make_preview_fn, preview_text
from cascade_studio.ui.workspace import REPO_ROOT

# 2 prompts x 1 seed x 3 steps with guidance, a preview every 2 of 6 steps
OVERRIDES = ["preview.steps=3", "preview.seeds=[0]", "preview.every=2", "train.max_steps=6", "train.batch_size=2"]


class Silent:
    def log_image(self, *args, **kwargs) -> None:
        pass

    def emit(self, *args, **kwargs) -> None:
        pass


@pytest.fixture(scope="module")
def setup():
    recipe = load_recipe(REPO_ROOT / "recipes" / "tiny" / "lora.yaml", OVERRIDES)
    models = BaseModels(recipe.model)
    model = AdaptedStageC(models.stage_c().eval().requires_grad_(False))
    torch.manual_seed(0)
    adapter = create_adapter(LoraConfig(rank=2, alpha=2.0, init_weights=False), model,
                             AdapterContext(preset="tiny", stage_c_config={"c_hidden": [64, 64]}))
    text = preview_text(models.text_encoder(), list(recipe.preview.prompts))
    return recipe, models, model, adapter, text


def renderer(setup, run_dir):
    recipe, models, model, adapter, text = setup
    return make_preview_fn(recipe, models, model, adapter, Silent(), Silent(), run_dir, text, None, None, None)


def test_the_base_column_is_sampled_once_per_run_and_equals_a_fresh_one(setup, tmp_path, monkeypatch) -> None:
    recipe, models, model, adapter, _ = setup
    evaluations = {"base": 0, "adapter": 0}  # Stage C samples evaluated (a guided batch counts both halves)
    forward = AdaptedStageC.forward

    def counting(self, x, *args, **kwargs):
        evaluations["adapter" if any(self.enabled.values()) else "base"] += x.shape[0]
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(AdaptedStageC, "forward", counting)
    preview = renderer(setup, tmp_path / "run")
    preview(2)
    first = dict(evaluations)
    with torch.no_grad():  # training moves the adapter: the adapter column changes, the base must not
        for p in adapter.trainable_parameters():
            p.add_(0.5)
    preview(4)
    cost = preview_cost(recipe)
    per_column = len(recipe.preview.prompts) * len(recipe.preview.seeds) * recipe.preview.steps * 2
    assert cost.per_column == per_column == 12
    assert first == {"base": per_column, "adapter": per_column} and sum(first.values()) == cost.first_preview
    assert evaluations == {"base": per_column, "adapter": 2 * per_column}  # base sampled at the first preview only
    assert sum(evaluations.values()) - sum(first.values()) == cost.later_preview
    assert cost.previews == 3 and cost.total == cost.first_preview + 2 * cost.later_preview == 48
    assert cost.training == 6 * 2 * 3

    fresh = renderer(setup, tmp_path / "other")
    fresh(6)
    assert preview.base_images.keys() == fresh.base_images.keys() == {(0, 0), (1, 0)}
    for key, image in preview.base_images.items():
        assert np.array_equal(np.asarray(image), np.asarray(fresh.base_images[key])), key
    assert (tmp_path / "run" / "previews").is_dir() and len(list((tmp_path / "run" / "previews").iterdir())) == 2


def test_guidance_scale_one_halves_the_cost_and_no_previews_cost_nothing() -> None:
    unguided = preview_cost(load_recipe(REPO_ROOT / "recipes" / "tiny" / "lora.yaml", [*OVERRIDES, "preview.cfg=1"]))
    assert unguided.guidance == 1 and unguided.per_column == 6
    consistency = preview_cost(load_recipe(REPO_ROOT / "recipes" / "tiny" / "lora.yaml",
                                           [*OVERRIDES, "preview.sampler=lcm"]))  # an unguided sampler
    assert consistency.guidance == 1 and consistency.per_column == 6
    off = preview_cost(load_recipe(REPO_ROOT / "recipes" / "tiny" / "lora.yaml", [*OVERRIDES, "preview.every=0"]))
    assert off.previews == 0 and off.total == 0 and "cost nothing" in off.describe()
