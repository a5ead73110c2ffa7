"""ControlNet and IP-Adapter learn on a trained base: held-out loss on the tiny dataset, from the shipped recipes.

A random base cannot show this (its outputs carry no information a control could refine), so these runs start
from the pretrained toy base (``preset: toy``), as STABLE_CASCADE.md advises for tests that need learning.
"""
from __future__ import annotations

import pytest
import torch

from cascade_studio.adapters.base import AdaptedStageC
from cascade_studio.adapters.registry import AdapterContext, get_method, load_adapter
from cascade_studio.config import load_recipe
from cascade_studio.data import build_cache, scan_source
from cascade_studio.run import split_holdout, train
from cascade_studio.trainers.components import BaseModels
from cascade_studio.trainers.features import base_feature_encoders
from cascade_studio.trainers.loop import collate
from cascade_studio.trainers.steps import heldout_loss

pytestmark = pytest.mark.slow


def _holdout_batches(recipe, models, context):
    """The run's own held-out split and cached features (the cache is warm: no encoder runs twice)."""
    method = get_method(recipe.adapter.method)
    cfg = getattr(recipe.adapter, recipe.adapter.method)
    records = list(scan_source(recipe.data).records)
    _, holdout = split_holdout(records, recipe.data.holdout_fraction)
    encoders = base_feature_encoders(models) + method.feature_encoders(cfg, context, models)
    cached = build_cache(holdout, encoders, recipe.cache_dir, {"resolution": recipe.data.resolution,
                                                               "crop": recipe.data.crop}, progress=False)
    null = {f"null_{k}": v for k, v in cached.null_features().items()}
    items = [cached[i] for i in range(len(cached))]
    size = recipe.train.batch_size  # the run's grouping, so the fixed per-batch noise matches
    return [collate(items[i:i + size], null) for i in range(0, len(items), size)], method, cfg


def _own_vs_other(recipe_path, overrides, result, key: str) -> tuple[float, float]:
    """Held-out loss of the exported adapter (reloaded from its file) with each sample's own ``key`` condition
    and with another sample's (rolled by one), on the same fixed noise and t: a paired test of "it reads it"."""
    recipe = load_recipe(recipe_path, overrides)
    models = BaseModels(recipe.model)
    context = AdapterContext(preset="toy", stage_c_config={"c_hidden": [64, 64]})
    batches, method, cfg = _holdout_batches(recipe, models, context)
    model = AdaptedStageC(models.stage_c())
    load_adapter(result.exports[0], model, context, name="trained")

    def loss(shuffle: bool) -> float:
        evaluated = []
        for batch in batches:
            batch = dict(batch)
            if shuffle:
                batch[key] = torch.roll(batch[key], 1, dims=0)
            evaluated.append(batch)
        return heldout_loss(model, evaluated, c_clip_img=32, shift=recipe.train.shift, seed=recipe.train.seed,
                            method_inputs=method.training_inputs, method_cfg=cfg)

    right, wrong = loss(False), loss(True)
    assert abs(right - result.heldout_after) < 1e-4  # the reloaded file is the trained adapter
    return right, wrong


def test_controlnet_with_canny_control_beats_the_base_without_control(tmp_path):
    # The toy base already reads shape, colour and size from the caption, so the control has to beat that. The
    # tiny set holds out 6 images: "after <= 0.85x before" held on one CPU (0.81x) and failed on another (0.89x);
    # seeds 0-4 gave 0.76x-0.97x (longer runs overfit the 18 training images). The paired check below is what
    # separates a ControlNet that reads its hint from one that does not: seeds 0-4 and 42 gave 1.24x-1.78x.
    overrides = [f"workspace={tmp_path}", "model.preset=toy", "preview.every=0", "train.checkpoint_every=0",
                 "train.max_steps=300"]
    result = train("recipes/tiny/controlnet-canny.yaml", overrides, progress=False)
    # heldout_before: the same Stage C with a fresh (zero) ControlNet, i.e. without control
    assert result.heldout_after < result.heldout_before, (result.heldout_before, result.heldout_after)

    # every held-out sample given another sample's edges
    right, wrong = _own_vs_other("recipes/tiny/controlnet-canny.yaml", overrides, result, "control")
    assert wrong >= 1.1 * right, (right, wrong)


def test_ip_adapter_learns_and_uses_the_image(tmp_path):
    overrides = [f"workspace={tmp_path}", "model.preset=toy", "preview.every=0", "train.checkpoint_every=0",
                 "train.max_steps=150"]
    result = train("recipes/tiny/ip-adapter.yaml", overrides, progress=False)
    assert result.heldout_after <= 0.85 * result.heldout_before, (result.heldout_before, result.heldout_after)

    # every held-out sample given another sample's image prompt
    right, wrong = _own_vs_other("recipes/tiny/ip-adapter.yaml", overrides, result, "ip_image_embeds")
    assert wrong >= 1.05 * right, (right, wrong)
