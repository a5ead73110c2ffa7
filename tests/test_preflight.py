"""Weights checked before a run starts (issue 17, item 9): ``validate`` reports what ``train`` would fail on
10-15 s later (weights not in the offline hub cache, an ``init_from`` ControlNet of another width), and ``train``
refuses it before it creates an MLflow run or writes anything. Headers only: nothing is loaded."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cascade_studio.cli import main as cli_main
from cascade_studio.config import RecipeError
from cascade_studio.run import train

REPO = Path(__file__).resolve().parents[1]
LITE_LORA = REPO / "recipes" / "lora" / "stage-c-lite-style.yaml"
BIG_CANNY = REPO / "recipes" / "controlnet" / "stage-c-big-canny.yaml"


@pytest.fixture
def empty_offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(REPO)
    return cache


def test_validate_reports_weights_missing_from_the_offline_hub_cache(tmp_path, empty_offline_cache, capsys):
    code = cli_main(["validate", str(LITE_LORA), f"workspace={tmp_path / 'ws'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.repo_id" in err and "stabilityai/stable-cascade" in err
    assert "hf download stabilityai/stable-cascade stage_c_lite_bf16.safetensors" in err
    assert "huggingface-cli" not in err


def test_train_refuses_missing_weights_before_creating_a_run(tmp_path, empty_offline_cache):
    workspace = tmp_path / "ws"
    with pytest.raises(RecipeError) as error:
        train(LITE_LORA, [f"workspace={workspace}"], progress=False)
    assert "model.repo_id" in str(error.value)
    assert not workspace.exists()  # no MLflow store, no run folder, no recipe.yaml


def _controlnet_header_file(path: Path, c_proj: int) -> Path:
    """A ControlNet file whose header has the official layout's names and a width of ``c_proj`` (small tensors:
    only the header is read)."""
    save_file({"backbone.0.0.weight": torch.zeros(8, 1, 3, 3), "projections.0.0.weight": torch.zeros(32, 32, 1, 1),
               "projections.0.2.weight": torch.zeros(c_proj, 32, 1, 1)}, str(path))
    return path


def test_init_from_of_another_width_is_reported_up_front(tmp_path, empty_offline_cache, capsys):
    lite_width = _controlnet_header_file(tmp_path / "lite-canny.safetensors", 1536)
    overrides = [f"workspace={tmp_path / 'ws'}", f"adapter.controlnet.init_from={lite_width}",
                 "adapter.controlnet.proj_blocks=[0]"]
    assert cli_main(["validate", str(BIG_CANNY), *overrides]) == 2
    err = capsys.readouterr().err
    assert "adapter.controlnet.init_from" in err and "width 1536" in err and "width 2048" in err
    with pytest.raises(RecipeError, match="width 1536"):
        train(BIG_CANNY, overrides, progress=False)
    assert not (tmp_path / "ws").exists()


def test_tiny_recipes_need_no_weights_check(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli_main(["validate", str(REPO / "recipes" / "tiny" / "lora.yaml"), f"workspace={tmp_path}"]) == 0
    assert "OK" in capsys.readouterr().out


def _fill_cache(cache: Path, tmp_path: Path) -> Path:
    """Stand-ins (tiny weights, official names) of the files a lite run reads, in an offline hub cache layout."""
    import shutil

    from cascade_studio.inference.pipeline import CascadeComponents
    from cascade_studio.models.official import official_state_dict

    snapshot = cache / "models--stabilityai--stable-cascade" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    tiny = CascadeComponents("tiny", device="cpu")
    for name, file in (("stage_c", "stage_c_lite_bf16.safetensors"), ("previewer", "previewer.safetensors")):
        save_file({k: v.contiguous() for k, v in official_state_dict(tiny.load(name)).items()}, str(snapshot / file))
    save_file({k: v.contiguous() for k, v in tiny.load("effnet").state_dict().items()},
              str(snapshot / "effnet_encoder.safetensors"))
    tiny.load("text_encoder").model.save_pretrained(tmp_path / "text_encoder")
    shutil.copytree(tmp_path / "text_encoder", snapshot / "text_encoder")
    return snapshot


def test_everything_in_the_cache_passes(tmp_path, empty_offline_cache, capsys):
    """A fake offline hub cache holding stand-ins of the files a lite LoRA run reads: validate says OK."""
    _fill_cache(empty_offline_cache, tmp_path)
    code = cli_main(["validate", str(LITE_LORA), f"workspace={tmp_path / 'ws'}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "OK" in captured.out


def test_ip_adapter_encoder_missing_from_the_repo_is_reported_up_front(tmp_path, empty_offline_cache, capsys):
    """The IP-Adapter's ViT-H encoder falls back to model.repo_id, which does not hold it: said before the run,
    naming the model the encoder needs."""
    _fill_cache(empty_offline_cache, tmp_path)
    recipe = REPO / "recipes" / "ip_adapter" / "stage-c-lite.yaml"
    code = cli_main(["validate", str(recipe), f"workspace={tmp_path / 'ws'}",
                     "adapter.ip_adapter.image_encoder=openclip-vit-h-14"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.repo_id" in err and "ViT-H-14" in err and "snapshots" not in err
