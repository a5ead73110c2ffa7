"""Every shipped tiny recipe runs end to end (STYLE.md habit 6), shortened to a few steps."""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from cascade_studio.run import train

REPO = Path(__file__).resolve().parents[1]
TINY = sorted((REPO / "recipes" / "tiny").glob("*.yaml"))

pytestmark = pytest.mark.slow


def test_there_are_tiny_recipes():
    assert {p.stem for p in TINY} >= {"lora", "controlnet-canny", "controlnet-image", "ip-adapter"}


@pytest.mark.parametrize("recipe", TINY, ids=[p.stem for p in TINY])
def test_tiny_recipe_runs_and_exports(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository
    result = train(recipe, [f"workspace={tmp_path}", "train.max_steps=3", "preview.every=2",
                            "train.checkpoint_every=2"], progress=False)
    assert result.step == 3
    assert result.exports, "the run exported nothing"
    for path in result.exports:
        target = path / "adapter_model.safetensors" if path.is_dir() else path
        with safe_open(str(target), framework="pt") as f:
            assert f.metadata()["cascade_studio.method"] in ("lora", "controlnet", "ip_adapter")
            assert len(list(f.keys())) > 0
    # a preview grid was written and a resumable checkpoint exists
    assert list((result.run_dir / "previews").glob("step-*.png"))
    assert list((result.run_dir / "checkpoints").glob("step-*"))
