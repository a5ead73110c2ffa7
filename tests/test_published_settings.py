"""The published recipes' training settings, transplanted onto the tiny model, run end to end on the CPU.

The tiny recipes train fp32 at batch 4 without dropouts; users run the shipped real-size recipes: bf16 autocast on
a bf16 base, batch 1 with gradient accumulation, caption/image dropouts, offset noise, 8-bit optimizers,
gradient checkpointing, previews and a held-out split. Everything of a published recipe is kept here except what
only the real weights can serve (the preset and its weights, the 768 px resolution, the ViT image encoder) and
the length of the run; a held-out split is added where the recipe has none, and one more step is trained with
``--resume`` (STYLE.md habit 14; issue 23 found crashes in exactly these settings).
"""
from __future__ import annotations

import pytest
import torch
import yaml

from cascade_studio.adapters import catalog
from recipe_transplant import PUBLISHED, REPO, recipe_id, transplant
from safetensors.torch import load_file

from cascade_studio.run import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One workspace for the module: one MLflow store, and the content-keyed cache shared by the recipes."""
    return tmp_path_factory.mktemp("published")


def test_every_method_has_published_recipes():
    methods = {yaml.safe_load(p.read_text())["adapter"]["method"] for p in PUBLISHED}
    assert methods == set(catalog.BUILTIN_METHODS)
    settings = [yaml.safe_load(p.read_text()) for p in PUBLISHED]
    # the settings this file exists for are really in the published recipes
    assert all(s["model"]["dtype"] == "bf16" and s["train"]["mixed_precision"] == "bf16" for s in settings)
    assert all(s["train"]["batch_size"] == 1 for s in settings)
    assert any(s["train"].get("offset_noise") for s in settings)


@pytest.mark.parametrize("recipe", PUBLISHED, ids=[recipe_id(p) for p in PUBLISHED])
def test_published_settings_train_resume_and_export_on_the_tiny_model(recipe, workspace, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository
    name = f"name={recipe_id(recipe).replace('/', '-')}"
    result = train(recipe, transplant(recipe, workspace, max_images=8) + [name], progress=False)
    assert result.step == 2
    assert result.heldout_before is not None and result.heldout_after is not None
    assert all(map(torch.isfinite, map(torch.tensor, (result.heldout_before, result.heldout_after))))
    assert len(list((result.run_dir / "previews").glob("step-*.png"))) == 2
    assert result.exports, "the run exported nothing"
    for path in result.exports:
        target = path / "adapter_model.safetensors" if path.is_dir() else path
        tensors = load_file(str(target))
        assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values()), target

    resumed = train(recipe, transplant(recipe, workspace, steps=3, max_images=8) + [name], resume=True,
                    progress=False)
    assert resumed.step == 3 and resumed.run_dir == result.run_dir
    assert resumed.exports
    checkpoints = sorted((result.run_dir / "checkpoints").glob("step-*"))
    assert checkpoints[-1].name.endswith("3")


# Quantized base (QLoRA-style), which the memory guide recommends for small GPUs: each method once, both modes.
# (The IP-Adapter on an NF4 base is checked at module level in test_gpu_ready_ip_quant.py.)
QUANTIZED = [("lora/stage-c-lite-style", "nf4"), ("controlnet/stage-c-lite-canny", "int8"),
             ("ip_adapter/stage-c-lite", "int8")]


@pytest.mark.parametrize("name,mode", QUANTIZED, ids=[f"{n}-{m}" for n, m in QUANTIZED])
def test_published_settings_train_on_a_quantized_tiny_base(name, mode, workspace, monkeypatch):
    from cascade_studio.trainers.quantize import QuantizationUnsupportedError, check_quantization_supported

    try:
        check_quantization_supported(mode, "cpu", torch.bfloat16)
    except QuantizationUnsupportedError as exc:
        pytest.skip(f"bitsandbytes cannot train {mode} on this CPU: {exc}")
    monkeypatch.chdir(REPO)
    recipe = REPO / "recipes" / f"{name}.yaml"
    result = train(recipe, transplant(recipe, workspace, max_images=8) + [f"train.quantize_base={mode}",
                                                                          f"name={name.replace('/', '-')}-{mode}"],
                   progress=False)
    assert result.step == 2 and result.exports
    assert result.heldout_after is not None and torch.isfinite(torch.tensor(result.heldout_after))
