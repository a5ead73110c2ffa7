"""The tiny LoRA recipe end to end (the "LoRA end to end" issue): trains offline through `cascade-studio train`,
lowers the held-out loss, exports files that reproduce the trained model, reuses the encode-once cache, runs
under 2-process DDP, and turns bad recipes and bad data into clear messages.

One full run of the shipped recipe (100 steps, previews off) is shared by the module; the other runs are short.
Resume after a kill is tested in test_resume.py.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cascade_studio.cli import main as cli_main
from cascade_studio.trainers.checkpoints import CheckpointManager
from cascade_studio.trainers.events import read_events
from subprocess_env import child_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "lora.yaml")
DATA = REPO / "datasets" / "tiny-shapes"
CLI = str(Path(sys.executable).with_name("cascade-studio"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shipped tiny recipe, trained by the CLI in a child process (previews off to save time)."""
    workspace = tmp_path_factory.mktemp("e2e")
    result = subprocess.run([CLI, "train", RECIPE, f"workspace={workspace}", "preview.every=0",
                             "export.formats=[comfyui,peft]", "--no-progress"],
                            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = workspace / "runs" / "tiny-lora"
    finished = [e for e in read_events(run_dir) if e["event"] == "finished"]
    assert len(finished) == 1
    return {"workspace": workspace, "run_dir": run_dir, "stdout": result.stdout, "finished": finished[0]}


# ------------------------------------------------------------------------------------------------ the run
@pytest.mark.slow
def test_cli_run_says_where_the_mlflow_run_and_the_adapters_are(trained):
    from cascade_studio.tracking import read_run

    out, run_dir, workspace = trained["stdout"], trained["run_dir"], trained["workspace"]
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    match = re.search(r"MLflow run ([0-9a-f]{32}) at (\S+)", out)
    assert match and match.group(2) == uri, out
    assert f"adapter: {run_dir / 'export' / 'tiny-lora-comfyui.safetensors'}" in out
    assert f"adapter: {run_dir / 'export' / 'tiny-lora-peft'}" in out
    run = read_run(uri, match.group(1))
    assert run["status"] == "FINISHED"
    assert [p["step"] for p in run["metrics"]["loss"]] == list(range(1, 101))
    assert {"adapter/tiny-lora-comfyui.safetensors", "recipe.yaml"} <= set(run["artifacts"])
    assert run["params"]["adapter.lora.rank"] == "8"
    # the studio shows speed and peak memory beside the loss from the run's events: the values MLflow got
    steps = [e for e in read_events(run_dir) if e["event"] == "step"]
    for key, digits in (("it_per_s", 3), ("peak_memory_mb", 1)):
        logged = {p["step"]: p["value"] for p in run["metrics"][key]}
        assert [e[key] for e in steps] == [round(logged[e["step"]], digits) for e in steps] and steps[-1][key] > 0


@pytest.mark.slow
def test_heldout_loss_drops_by_a_fifth(trained):
    """RunResult.heldout_before/after (reported in the finished event): fixed t and noise on the 6 held-out
    images, the untrained adapter against the trained one."""
    before, after = trained["finished"]["heldout_before"], trained["finished"]["heldout_after"]
    assert before > 0 and after <= 0.8 * before, (before, after)
    assert f"held-out loss {before:.4f} -> {after:.4f}" in trained["stdout"]


def fresh_model():
    """A new tiny base exactly as a run builds it, wrapped for adapters, with the context a run uses."""
    from cascade_studio.adapters.base import AdaptedStageC
    from cascade_studio.adapters.registry import AdapterContext
    from cascade_studio.config import load_recipe
    from cascade_studio.trainers.components import BaseModels

    recipe = load_recipe(RECIPE)
    models = BaseModels(recipe.model)
    context = AdapterContext(preset="tiny", base_fingerprint=models.fingerprint(),
                             stage_c_config=dict(models.preset.stage_c))
    return AdaptedStageC(models.stage_c()), context, recipe


def outputs(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    inputs = dict(x=torch.randn(3, 16, 8, 8, generator=g), r=torch.rand(3, generator=g),
                  clip_text=torch.randn(3, 77, 64, generator=g), clip_text_pooled=torch.randn(3, 1, 64, generator=g),
                  clip_img=torch.randn(3, 1, 32, generator=g))
    with torch.no_grad():
        return model.eval()(**inputs)


@pytest.mark.slow
def test_exports_reload_into_a_fresh_model_and_reproduce_the_trained_model(trained):
    from cascade_studio.adapters.lora import create_adapter
    from cascade_studio.adapters.registry import load_adapter

    final = CheckpointManager(trained["run_dir"] / "checkpoints").latest()
    assert final is not None and final.name == "step-00000100"  # the last step is always checkpointed
    trained_model, context, recipe = fresh_model()
    base_out = outputs(trained_model)
    create_adapter(recipe.adapter.lora, trained_model, context).load_adapter_state_dict(
        load_file(str(final / "adapter.safetensors")))
    reference = outputs(trained_model)
    assert (reference - base_out).abs().max() > 1e-3  # the trained adapter changes the output

    export = trained["run_dir"] / "export"
    for path in (export / "tiny-lora-comfyui.safetensors", export / "tiny-lora-peft"):
        model, context, _ = fresh_model()
        assert torch.equal(outputs(model), base_out)
        load_adapter(path, model, context)
        diff = float((outputs(model) - reference).abs().max())
        assert diff <= 1e-5, f"{path.name}: {diff}"


@pytest.mark.slow
def test_exported_files_hold_only_lora_tensors(trained):
    model, _, _ = fresh_model()
    base_keys = set(model.stage_c.state_dict())
    comfy = load_file(str(trained["run_dir"] / "export" / "tiny-lora-comfyui.safetensors"))
    peft = load_file(str(trained["run_dir"] / "export" / "tiny-lora-peft" / "adapter_model.safetensors"))
    assert all(re.fullmatch(r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in comfy), comfy
    assert all(re.search(r"\.lora_[AB]\.weight$", k) for k in peft), list(peft)
    assert not {k.removeprefix("base_model.model.") for k in peft} & base_keys
    # 48 adapted linears (12 attention blocks x q, k, v, out), 49,152 trainable numbers: nothing else
    assert sum(v.numel() for k, v in comfy.items() if not k.endswith(".alpha")) == 49_152
    assert sum(v.numel() for v in peft.values()) == 49_152
    assert sum(k.endswith(".alpha") for k in comfy) == 48


# --------------------------------------------------------------------------------------------- the cache
@pytest.mark.slow
def test_second_run_on_the_same_data_runs_no_encoder(trained, tmp_path, monkeypatch):
    from cascade_studio.run import train
    from cascade_studio.trainers import features

    calls: list[int] = []
    for cls in (features.LatentFeature, features.TextFeature):
        real = cls.encode
        monkeypatch.setattr(cls, "encode", lambda self, batch, _real=real: calls.append(len(batch)) or
                            _real(self, batch))
    short = [f"data.path={DATA}", "preview.every=0", "train.max_steps=1", "train.checkpoint_every=0"]
    # Control: on an empty cache the counted encoders really run (24 images + 24 captions + the empty caption)
    train(RECIPE, [*short, f"workspace={tmp_path}", "name=cold"], progress=False)
    assert sum(calls) == 24 + 24 + 1
    calls.clear()
    result = train(RECIPE, [*short, f"workspace={trained['workspace']}", "name=second"], progress=False)
    assert calls == [] and result.step == 1


# ------------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_process_ddp_run_completes_and_writes_its_adapter_once(tmp_path):
    from cascade_studio.cli import accelerate_command, launch_env

    overrides = [f"data.path={DATA}", f"workspace={tmp_path}", "name=ddp", "train.max_steps=10",
                 "train.checkpoint_every=5", "preview.every=0"]
    command = accelerate_command(RECIPE, overrides, processes=2) + ["--no-progress"]
    assert command[command.index("--num_processes") + 1] == "2" and "--multi_gpu" in command
    assert launch_env(2)["ACCELERATE_USE_CPU"] == "true"  # STACK.md: how two CPU processes get gloo DDP
    env = child_env(ACCELERATE_USE_CPU="true")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("[cascade-studio] run folder:") == 1  # the summary comes from rank 0 only
    run_dir = tmp_path / "runs" / "ddp"
    events = read_events(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds.count("started") == kinds.count("exported") == kinds.count("finished") == 1
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [5, 10]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 11))
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["ddp-comfyui.safetensors"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-00000005",
                                                                          "step-00000010"]
    exported = load_file(str(run_dir / "export" / "ddp-comfyui.safetensors"))
    assert max(float(v.abs().max()) for k, v in exported.items() if "lora_up" in k) > 0  # it trained
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------- bad recipes, bad data
BAD_RECIPE = """\
version: 1
name: broken
modle: {preset: tiny}
adapter: {method: lora, lora: {rank: many}}
data: {path: /nonexistent/images, resolution: 250}
train: {max_steps: -3}
"""


@pytest.mark.parametrize("command", ["validate", "train"])
def test_bad_recipe_through_the_cli_lists_every_problem_and_creates_nothing(tmp_path, command):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(BAD_RECIPE)
    workspace = tmp_path / "ws"
    result = subprocess.run([CLI, command, str(recipe), f"workspace={workspace}"], cwd=tmp_path, env=child_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    for path in ("modle", "adapter.lora.rank", "data.path", "data.resolution", "train.max_steps"):
        assert path in err, (path, err)
    assert "Traceback" not in err
    assert not workspace.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml"]


def make_messy_folder(root: Path, good: int) -> dict[str, str]:
    """``good`` tiny-shapes images with captions plus one file of each bad kind; returns bad name -> reason."""
    root.mkdir(parents=True)
    for source in sorted(DATA.glob("*.png"))[: good * 2]:
        if source.stem.endswith("_control"):
            continue
        (root / source.name).write_bytes(source.read_bytes())
        (root / f"{source.stem}.txt").write_text((DATA / f"{source.stem}.txt").read_text())
    sample = next(p for p in sorted(DATA.glob("*.png")) if not p.stem.endswith("_control")).read_bytes()
    (root / "corrupt.png").write_bytes(bytes(range(256)) * 8)
    (root / "truncated.png").write_bytes(sample[: len(sample) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image at all")
    Image.new("RGB", (640, 640), (0, 90, 200)).save(root / "huge.png")  # over data.max_pixels=300000
    Image.new("CMYK", (256, 256), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)  # converted, not skipped
    return {"corrupt.png": "", "truncated.png": "truncated", "empty.png": "empty file",
            "notes.jpg": "not an image", "huge.png": "max_pixels"}


@pytest.mark.slow
def test_bad_data_files_are_skipped_reported_and_counted(tmp_path, capsys):
    from cascade_studio.tracking import list_runs

    bad = make_messy_folder(tmp_path / "messy", good=6)
    code = cli_main(["train", RECIPE, f"data.path={tmp_path / 'messy'}", "data.max_pixels=300000",
                     f"workspace={tmp_path / 'ws'}", "train.max_steps=2", "preview.every=0", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    for name, reason in bad.items():
        prefix = f"[cascade-studio] skipped {tmp_path / 'messy' / name}:"
        line = next((line for line in out.splitlines() if line.startswith(prefix)), None)
        assert line is not None and reason in line, (name, out)
    assert out.count("[cascade-studio] skipped ") == len(bad)
    run = list_runs(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}", "cascade-studio")[0]
    assert run["metrics"]["skipped_files"] == len(bad)
    assert run["metrics"]["train_samples"] + run["metrics"]["holdout_samples"] == 6 + 1  # good ones + CMYK


def test_a_folder_of_only_bad_files_stops_with_a_clear_error(tmp_path, capsys):
    make_messy_folder(tmp_path / "messy", good=0)
    (tmp_path / "messy" / "cmyk.jpg").unlink()
    (tmp_path / "messy" / "huge.png").unlink()
    code = cli_main(["train", RECIPE, f"data.path={tmp_path / 'messy'}", f"workspace={tmp_path / 'ws'}",
                     "preview.every=0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"No usable images in {tmp_path / 'messy'}: all 4 file(s) were skipped" in err
    assert not (tmp_path / "ws" / "cache").exists()
    assert not (tmp_path / "ws" / "runs" / "tiny-lora" / "checkpoints").exists()
    events = read_events(tmp_path / "ws" / "runs" / "tiny-lora")
    assert events[-1]["event"] == "failed" and "EmptyDatasetError" in events[-1]["error"]
