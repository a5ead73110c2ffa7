"""The encode-once cache is keyed on the encoders' weight files, not on their loaded weights (issue 17, item 9):
a cached re-run with encoders from files neither loads nor hashes them (the real text encoder is 2.6 GB)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
from safetensors.torch import save_file

from cascade_studio.inference.pipeline import CascadeComponents
from cascade_studio.models import loading
from cascade_studio.run import train

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny" / "lora.yaml"


@pytest.fixture
def encoder_files(tmp_path):
    tiny = CascadeComponents("tiny", device="cpu")
    tiny.load("text_encoder").model.save_pretrained(tmp_path / "text_encoder")
    save_file({k: v.contiguous() for k, v in tiny.load("effnet").state_dict().items()},
              str(tmp_path / "effnet.safetensors"))
    return tmp_path / "text_encoder", tmp_path / "effnet.safetensors"


@pytest.mark.slow
def test_cached_rerun_does_not_load_the_encoders(tmp_path, encoder_files, monkeypatch):
    monkeypatch.chdir(REPO)
    text_encoder, effnet = encoder_files
    loads: list[str] = []
    for name in ("text_encoder", "effnet"):
        real = getattr(loading, f"load_{name}")
        monkeypatch.setattr(loading, f"load_{name}",
                            lambda *a, _real=real, _name=name, **k: loads.append(_name) or _real(*a, **k))
    overrides = [f"workspace={tmp_path / 'ws'}", f"model.text_encoder={text_encoder}", f"model.effnet={effnet}",
                 "preview.every=0", "train.max_steps=1", "train.checkpoint_every=0", "data.max_images=4",
                 "data.holdout_fraction=0"]
    train(RECIPE, [*overrides, "name=first"], progress=False)
    assert sorted(loads) == ["effnet", "text_encoder"]  # the cold cache needs both
    loads.clear()
    result = train(RECIPE, [*overrides, "name=second"], progress=False)
    assert result.step == 1
    assert loads == []  # everything cached: no encoder read from disk, none hashed
