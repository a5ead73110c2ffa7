"""The command lines the studio runs (cascade_studio/ui/commands.py): argument lists only, validated recipes,
paths confined to the workspace."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cascade_studio.config import RecipeError
from cascade_studio.ui.commands import (CLI, Column, CompareRequest, TrainRequest, compare_argv,
                                        default_run_name, export_argv, new_comparison_dir, parse_seeds,
                                        train_command)
from cascade_studio.ui.paths import PathNotAllowed
from cascade_studio.ui.workspace import REPO_ROOT, Workspace

TINY_LORA = str(REPO_ROOT / "recipes" / "tiny" / "lora.yaml")


@pytest.fixture()
def ws(tmp_path: Path) -> Workspace:
    workspace = Workspace(tmp_path / "ws")
    (workspace.runs_dir / "r1" / "checkpoints" / "step-00000004").mkdir(parents=True)
    (workspace.runs_dir / "r1" / "checkpoints" / "step-00000004" / "COMPLETE").write_text("{}")  # a complete one
    (workspace.runs_dir / "r1" / "export").mkdir()
    (workspace.runs_dir / "r1" / "export" / "r1-comfyui.safetensors").write_bytes(b"x")
    return workspace


def test_train_command_is_accelerate_launch_of_the_recipe_with_workspace_and_name(ws: Workspace) -> None:
    request = TrainRequest(TINY_LORA, "true", ("train.max_steps=5",))
    argv, env = train_command(request, ws)
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    tail = argv[argv.index("cascade_studio.train") - 1:]
    # the run name "true" is quoted so YAML keeps it a string; the workspace is the studio's
    assert tail == ["-m", "cascade_studio.train", TINY_LORA, "train.max_steps=5", f'workspace="{ws.root}"',
                    'name="true"', "--no-progress"]
    assert "--num_processes" in argv and argv[argv.index("--num_processes") + 1] == "1"
    assert isinstance(env, dict)


def test_train_request_refuses_what_the_studio_must_not_launch(ws: Workspace) -> None:
    with pytest.raises(RecipeError) as err:  # every recipe problem at once
        TrainRequest(TINY_LORA, "ok", ("train.max_steps=0", "optimizer.lr=-1")).validate(ws)
    assert {p.path for p in err.value.problems} == {"train.max_steps", "optimizer.lr"}
    with pytest.raises(ValueError, match="set by the studio"):
        TrainRequest(TINY_LORA, "ok", (f"workspace={ws.root.parent / 'elsewhere'}",)).validate(ws)
    with pytest.raises(ValueError, match="="):
        TrainRequest(TINY_LORA, "ok", ("rm -rf /",)).validate(ws)
    with pytest.raises(ValueError, match="letters, digits"):
        TrainRequest(TINY_LORA, "../escape", ()).validate(ws)
    with pytest.raises(ValueError, match="already has checkpoints"):
        TrainRequest(TINY_LORA, "r1", ()).validate(ws)
    with pytest.raises(PathNotAllowed):
        TrainRequest(str(REPO_ROOT / "pyproject.toml"), "ok", ()).validate(ws)
    TrainRequest(TINY_LORA, "ok", ("train.max_steps=5",)).validate(ws)  # and a good one passes


def test_default_run_name_avoids_existing_runs_and_active_jobs(ws: Workspace) -> None:
    assert default_run_name(ws, "fresh") == "fresh"
    assert default_run_name(ws, "r1") == "r1-2"
    assert default_run_name(ws, "r1", taken=["r1-2"]) == "r1-3"


def test_compare_argv_lists_columns_prompts_and_seeds_exactly(ws: Workspace) -> None:
    run = str(ws.runs_dir / "r1")
    adapter = str(ws.runs_dir / "r1" / "export" / "r1-comfyui.safetensors")
    request = CompareRequest(
        columns=(Column("base"), Column("run", run), Column("ckpt", run, step=4, weight=0.5),
                 Column("file", adapter, weight=0.8)),
        prompts=("a red circle", "-no option injection"), seeds=(0, 3), preset="tiny", decoder="previewer",
        steps=12, mlflow=True, out=str(ws.comparisons_dir / "c1"))
    assert compare_argv(request, ws) == [
        *CLI, "compare", "--columns", "base", f"run:{run}", f"ckpt:{run}@4@0.5", f"{adapter}@0.8",
        "--prompt=a red circle", "--prompt=-no option injection", "--seeds", "0", "3",
        "--out", str(ws.comparisons_dir / "c1"), "--preset", "tiny", "--decoder", "previewer",
        "--workspace", str(ws.root), "--tracking-uri", ws.tracking_uri(), "--no-progress", "--steps", "12",
        "--mlflow"]
    # the request survives the job file (JSON) unchanged
    assert CompareRequest.from_args(request.to_args()) == request


def test_compare_request_reports_every_problem(ws: Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    request = CompareRequest(columns=(Column("file", str(outside)), Column("ckpt", "runs/../../x", step=1),
                                      Column("run", str(ws.runs_dir / "missing"))),
                             prompts=(), seeds=(), steps=0, out=str(tmp_path / "not-the-workspace"))
    problems = request.problems(ws)
    assert len(problems) == 7, problems
    assert any("outside" in p for p in problems) and any("'..'" in p for p in problems)
    assert any("does not exist" in p for p in problems) and any("prompt" in p for p in problems)
    with pytest.raises(ValueError):
        compare_argv(request, ws)


def test_parse_seeds() -> None:
    assert parse_seeds("0, 1 2") == (0, 1, 2)
    with pytest.raises(ValueError, match="whole numbers"):
        parse_seeds("zero")


def test_export_argv_is_confined_to_the_workspace(ws: Workspace, tmp_path: Path) -> None:
    run = ws.runs_dir / "r1"
    assert export_argv(ws, run, "peft", run / "export" / "p") == [
        *CLI, "export", str(run.resolve()), "--format", "peft", "--out", str((run / "export" / "p").resolve())]
    with pytest.raises(PathNotAllowed):
        export_argv(ws, run, "comfyui", tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match="unknown export format"):
        export_argv(ws, run, "pickle", run / "export" / "x")


def test_comparison_folders_never_collide(ws: Workspace) -> None:
    first = new_comparison_dir(ws, now=0.0)
    assert first.parent == ws.comparisons_dir and not first.exists()
    first.mkdir(parents=True)
    second = new_comparison_dir(ws, now=0.0)
    assert second.name == f"{first.name}-2"
    assert new_comparison_dir(ws, now=0.0, taken=[str(second)]).name == f"{first.name}-3"


def test_a_launch_with_a_shipped_accelerate_config_runs_it_and_refuses_one_that_needs_editing(ws: Workspace) -> None:
    """The Launch page's "Launch with": a shipped config is passed to accelerate (its own process count unless
    the form asks for more), over gloo on a machine without CUDA; multi-node.yaml needs per-machine edits, so the
    studio refuses it and says what to run instead; an unknown name is refused."""
    from cascade_studio.launch import has_cuda, shipped_configs

    argv, env = train_command(TrainRequest(TINY_LORA, "two", launch="cpu-2proc"), ws)
    assert argv[argv.index("--config_file") + 1] == str(shipped_configs()["cpu-2proc"])
    assert "--num_processes" not in argv  # the file's count
    assert (env.get("ACCELERATE_USE_CPU") == "true") is not has_cuda()
    argv, _ = train_command(TrainRequest(TINY_LORA, "four", processes=4, launch="fsdp"), ws)
    assert argv[argv.index("--config_file") + 1] == str(shipped_configs()["fsdp"])
    assert argv[argv.index("--num_processes") + 1] == "4"
    assert TrainRequest.from_args(TrainRequest(TINY_LORA, "x", launch="fsdp").to_args()).launch == "fsdp"
    with pytest.raises(ValueError, match="2 machines.*--accelerate-config FILE RECIPE. on every machine"):
        TrainRequest(TINY_LORA, "many", launch="multi-node").validate(ws)
    with pytest.raises(ValueError, match="unknown launch 'deepspeed'"):
        TrainRequest(TINY_LORA, "ds", launch="deepspeed").validate(ws)
