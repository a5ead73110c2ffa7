"""`cascade-studio compare` / `run_compare` on the tiny preset: grid layout, manifests, and the invariants that
make a comparison honest (the base column is `generate`, a fresh adapter is the base, unloading restores the
base, only the adapter differs within a row), plus run:/ckpt: columns and the MLflow link."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cascade_studio.adapters import lora
from cascade_studio.adapters.files import save_adapter_tensors
from cascade_studio.inference.adapters import parse_adapter_spec, resolve_adapter, resolve_adapter_path
from cascade_studio.inference.compare import COMPARED_RUNS_TAG, CompareSettings, run_compare
from cascade_studio.inference.grid import make_grid

# test_generate_cli.py holds the adapter-file builders both CLI test files share; put its folder on the path so
# the import works under every pytest import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_generate_cli import FAST, build_adapter_files, lora_adapter, pixels, run_cli  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [0, 3]
FAST_SETTINGS = dict(width=128, height=128, steps_c=2, steps_b=2, dtype="fp32")


def row_of(prompt: int, seed: int) -> int:
    """Rows are prompt-major: (prompt 0, seed 0), (prompt 0, seed 1), (prompt 1, seed 0), ..."""
    return prompt * len(SEEDS) + seed


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    return build_adapter_files(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def grid(files, tmp_path_factory) -> SimpleNamespace:
    """One comparison holding every column the invariants below need."""
    columns = ["base", f"lora:{files.zero_lora}", f"lora:{files.lora}", f"{files.lora}@0", "base",
               f"lora:{files.lora}+cn:{files.controlnet}@0.8+ip:{files.ip}@0.7"]
    out = tmp_path_factory.mktemp("compare")
    result = run_compare(CompareSettings(columns=columns, prompts=PROMPTS, seeds=SEEDS, out_dir=out,
                                         control=str(files.control), image_prompts=[str(files.image_prompt)],
                                         save_latents=True, progress=False, **FAST_SETTINGS))
    manifest = json.loads(result.manifest_path.read_text())
    latents = load_file(str(out / "latents.safetensors"))
    return SimpleNamespace(result=result, manifest=manifest, latents=latents, out=out, columns=columns)


def cell(grid, row: int, col: int) -> np.ndarray:
    return pixels(grid.result.cells[row][col])


def latent(grid, row: int, col: int) -> torch.Tensor:
    return grid.latents[f"r{row}_c{col}"]


def test_grid_is_rows_by_columns_and_the_manifests_list_them(grid, files):
    rows, cols = len(PROMPTS) * len(SEEDS), len(grid.columns)
    result, manifest = grid.result, grid.manifest
    assert len(result.cells) == rows and all(len(r) == cols for r in result.cells)
    assert all(path.is_file() and Image.open(path).size == (24, 24) for r in result.cells for path in r)
    assert [(r["prompt"], r["seed"]) for r in manifest["rows"]] == [(p, s) for p in PROMPTS for s in SEEDS]
    assert [r["batch_prompts"] for r in manifest["rows"]] == [PROMPTS] * rows  # one call per seed, both prompts
    labels = [c["label"] for c in manifest["columns"]]
    assert labels[0] == labels[4] == "base" and "x0" in labels[3]
    assert labels[5] == "lora style-lora x1 + cn canny-cn strength 0.8 auto:photo.png + ip style-ip scale 0.7 red.png"
    mixed = manifest["columns"][5]["adapters"]
    assert [(a["method"], a["weight"], Path(a["path"]).name) for a in mixed] == [
        ("lora", 1.0, "style-lora.safetensors"), ("controlnet", 0.8, "canny-cn.safetensors"),
        ("ip_adapter", 0.7, "style-ip.safetensors")]
    assert manifest["cells"][cols + 2] == {"row": 1, "col": 2, "file": "cells/r1_c2.png"}
    assert manifest["settings"]["decoder"] == "previewer" and manifest["settings"]["steps_c"] == 2
    with open(result.csv_path, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == rows * cols
    assert table[cols + 2]["file"] == "cells/r1_c2.png" and table[cols + 2]["seed"] == str(SEEDS[1])
    assert table[5]["adapter_settings"] == "lora=1;controlnet=0.8;ip_adapter=0.7"
    # grid.png is exactly the cells laid out by make_grid with the manifest's labels.
    images = [[Image.open(path) for path in r] for r in result.cells]
    expected = make_grid(images, [f"{r['prompt']} | seed {r['seed']}" for r in manifest["rows"]], labels)
    assert np.array_equal(np.asarray(Image.open(result.grid_path).convert("RGB")), np.asarray(expected))


def test_fresh_lora_and_multiplier_zero_equal_the_base_column_exactly(grid):
    for row in range(len(PROMPTS) * len(SEEDS)):
        for col in (1, 3):
            assert torch.equal(latent(grid, row, col), latent(grid, row, 0))
            assert np.array_equal(cell(grid, row, col), cell(grid, row, 0))


def test_a_trained_adapter_changes_every_row(grid):
    for row in range(len(PROMPTS) * len(SEEDS)):
        assert (latent(grid, row, 2) - latent(grid, row, 0)).abs().mean() > 0.05
    assert any(not np.array_equal(cell(grid, row, 2), cell(grid, row, 0)) for row in range(4))


def test_unloading_adapters_restores_the_base_exactly(grid):
    # Column 4 is sampled after three LoRA columns were added to and removed from the same Stage C.
    for row in range(len(PROMPTS) * len(SEEDS)):
        assert torch.equal(latent(grid, row, 4), latent(grid, row, 0))
        assert np.array_equal(cell(grid, row, 4), cell(grid, row, 0))


def test_rows_of_another_seed_start_from_other_noise(grid):
    base = [latent(grid, row, 0) for row in range(4)]
    assert (base[row_of(0, 0)] - base[row_of(0, 1)]).abs().mean() > 0.1  # another seed, another image


def test_base_column_is_generate_pixel_for_pixel(grid, tmp_path, capsys):
    out = tmp_path / "gen.png"
    code, _, err = run_cli(["generate", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", SEEDS[1],
                            "--preview", *FAST, "--out", out], capsys)
    assert code == 0, err
    for prompt in range(2):
        assert np.array_equal(pixels(tmp_path / f"gen-{prompt}.png"), cell(grid, row_of(prompt, 1), 0))


def test_mixed_column_is_generate_with_the_same_adapters(grid, files, tmp_path, capsys):
    out = tmp_path / "mixed.png"
    code, stdout, err = run_cli(
        ["generate", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", SEEDS[0], "--preview", *FAST,
         "--out", out, "--lora", files.lora, "--controlnet", f"{files.controlnet}@0.8", "--control", files.control,
         "--ip-adapter", files.ip, "--ip-scale", "0.7", "--image-prompt", files.image_prompt], capsys)
    assert code == 0, err
    assert "adapter: cn canny-cn strength 0.8" in stdout
    for prompt in range(2):
        assert np.array_equal(pixels(tmp_path / f"mixed-{prompt}.png"), cell(grid, row_of(prompt, 0), 5))
        # The ControlNet and IP-Adapter act on top of the LoRA.
        assert (latent(grid, row_of(prompt, 0), 5) - latent(grid, row_of(prompt, 0), 2)).abs().mean() > 0.01


def test_single_cell_calls_with_the_full_cascade_equal_single_prompt_generate(tmp_path, capsys):
    code, _, err = run_cli(["compare", "--columns", "base", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                            "--seed", "5", "--max-batch", "1", "--decoder", "cascade", *FAST,
                            "--out", tmp_path / "cmp", "--no-progress"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "cmp" / "manifest.json").read_text())
    assert [r["batch_prompts"] for r in manifest["rows"]] == [[PROMPTS[0]], [PROMPTS[1]]]
    code, _, err = run_cli(["generate", "--prompt", PROMPTS[1], "--seed", "5", *FAST, "--out", tmp_path / "g.png"],
                           capsys)
    assert code == 0, err
    compared = pixels(tmp_path / "cmp" / "cells" / "r1_c0.png")
    assert compared.shape == (128, 128, 3)
    assert np.array_equal(pixels(tmp_path / "g.png"), compared)


# ------------------------------------------------------------------------------------------ runs and MLflow
def make_run(workspace: Path, name: str, checkpoints: dict[int, object], exported: object | None,
             run_id: str | None) -> Path:
    """A run folder laid out as run.py writes it: verified checkpoints (PEFT-layout LoRA tensors, as the trainer
    saves them), an export and the events log naming the MLflow run."""
    from cascade_studio.trainers.checkpoints import CheckpointManager, RunState

    run_dir = workspace / "runs" / name
    manager = CheckpointManager(run_dir / "checkpoints", keep=10)
    for step, adapter in checkpoints.items():
        manager.save(step, lambda d, a=adapter: save_adapter_tensors(a.adapter_state_dict(),
                                                                     d / "adapter.safetensors", a.metadata()),
                     RunState(step=step, mlflow_run_id=run_id))
    events = [{"event": "started", "run_dir": str(run_dir), "run_id": run_id}]
    if exported is not None:
        path = lora.export_adapter(exported, run_dir / "export" / f"{name}-comfyui.safetensors")
        events.append({"event": "exported", "paths": [str(path)]})
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    from cascade_studio.tracking import Tracker

    workspace = tmp_path_factory.mktemp("workspace")
    # The MLflow run as run.py opens it: run name = recipe name, the recipe (name, workspace) as params.
    tracker = Tracker.start(uri=None, experiment="cascade-studio", run_name="style", tags={"method": "lora"},
                            workspace=workspace, run_dir=workspace / "runs" / "style")
    tracker.log_params({"name": "style", "workspace": str(workspace)})
    tracker.end()
    step10, step20 = lora_adapter(seed=1), lora_adapter(seed=7)
    run_dir = make_run(workspace, "style", {10: step10, 20: step20}, exported=step20, run_id=tracker.run_id)
    unexported = make_run(workspace, "unfinished", {10: step10}, exported=None, run_id=None)
    return SimpleNamespace(workspace=workspace, run_id=tracker.run_id, run_dir=run_dir, unexported=unexported,
                           uri=tracker.tracking_uri)


def test_run_and_ckpt_specs_resolve_to_the_right_files(runs):
    def path(text: str) -> Path:
        return resolve_adapter_path(parse_adapter_spec(text), runs.workspace)

    ckpt = runs.run_dir / "checkpoints"
    export = runs.run_dir / "export" / "style-comfyui.safetensors"
    assert path(f"run:{runs.run_id}") == export
    assert path(f"run:{runs.run_dir}") == export
    assert path(str(runs.run_dir)) == export  # a bare run folder reads as run:
    assert path(f"run:{runs.unexported}") == runs.unexported / "checkpoints/step-00000010/adapter.safetensors"
    assert path(f"ckpt:{runs.run_dir}@10") == ckpt / "step-00000010" / "adapter.safetensors"
    assert path(f"ckpt:{runs.run_dir}") == ckpt / "step-00000020" / "adapter.safetensors"
    assert path(f"ckpt:{runs.run_id}@10") == ckpt / "step-00000010" / "adapter.safetensors"
    assert path(f"ckpt:{ckpt / 'step-00000010'}") == ckpt / "step-00000010" / "adapter.safetensors"
    resolved = resolve_adapter(parse_adapter_spec(f"ckpt:{runs.run_dir}@10@0.5"), runs.workspace)
    assert (resolved.step, resolved.weight, resolved.mlflow_run_id) == (10, 0.5, runs.run_id)
    assert resolved.label == "lora style step 10 x0.5"
    with pytest.raises(FileNotFoundError, match=r"steps \[10, 20\]"):
        path(f"ckpt:{runs.run_dir}@30")


def test_run_and_checkpoint_columns_compare_and_link_to_mlflow(runs, files, tmp_path, capsys):
    from cascade_studio.tracking import list_runs, read_run

    out = tmp_path / "cmp"
    code, stdout, err = run_cli(
        ["compare", "--columns", f"lora:{files.lora}", f"ckpt:{runs.run_dir}@10", f"run:{runs.run_id}",
         "--prompt", PROMPTS[0], "--seed", "1", *FAST, "--workspace", runs.workspace, "--out", out, "--mlflow",
         "--save-latents", "--no-progress"], capsys)
    assert code == 0, err
    latents = load_file(str(out / "latents.safetensors"))
    # The step-10 checkpoint holds the same weights as the file (stored in PEFT layout, converted on load).
    assert torch.equal(latents["r0_c1"], latents["r0_c0"])
    assert (latents["r0_c2"] - latents["r0_c1"]).abs().mean() > 0.05  # the export is the step-20 weights
    manifest = json.loads((out / "manifest.json").read_text())
    columns = [c["adapters"][0] for c in manifest["columns"]]
    assert [c["mlflow_run_id"] for c in columns] == [None, runs.run_id, runs.run_id]
    assert columns[1]["step"] == 10 and columns[2]["path"].endswith("export/style-comfyui.safetensors")
    compare_runs = list_runs(runs.uri, "compare")
    assert len(compare_runs) == 1 and compare_runs[0]["run_id"] in stdout
    logged = read_run(runs.uri, compare_runs[0]["run_id"])
    assert logged["tags"][COMPARED_RUNS_TAG] == runs.run_id
    assert {"grid.png", "manifest.json", "manifest.csv"} <= set(logged["artifacts"])


def test_a_column_carries_its_own_sampler_steps_and_cfg(files, tmp_path, capsys):
    """`COLUMN::sampler,steps=N,cfg=X` samples that column as `generate --sampler ... --steps N --cfg X` would,
    from the row's shared starting noise; the other columns keep the comparison's settings."""
    out = tmp_path / "cmp"
    columns = ["base", "base::ddim,steps=3", f"lora:{files.lora}::sampler=ddim,steps=3,cfg=2"]
    code, _, err = run_cli(["compare", "--columns", *columns, "--prompt", PROMPTS[0], "--seed", "5", *FAST,
                            "--out", out, "--no-progress", "--save-latents"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["sampler"] == "ddpm" and manifest["settings"]["steps_c"] == 2
    assert [c["sampling"] for c in manifest["columns"]] == [
        {"sampler": "ddpm", "steps_c": 2, "cfg_c": 4.0}, {"sampler": "ddim", "steps_c": 3, "cfg_c": 4.0},
        {"sampler": "ddim", "steps_c": 3, "cfg_c": 2.0}]
    assert [c["label"] for c in manifest["columns"]][:2] == ["base", "base [ddim, 3 steps]"]
    with open(out / "manifest.csv", newline="") as handle:
        assert [(r["sampler"], r["steps_c"], r["cfg_c"]) for r in csv.DictReader(handle)] == [
            ("ddpm", "2", "4.0"), ("ddim", "3", "4.0"), ("ddim", "3", "2.0")]
    for col, flags in ((0, []), (1, ["--sampler", "ddim", "--steps", "3"]),
                       (2, ["--sampler", "ddim", "--steps", "3", "--cfg", "2", "--lora", files.lora])):
        gen = tmp_path / f"gen{col}.png"
        code, _, err = run_cli(["generate", "--prompt", PROMPTS[0], "--seed", "5", "--preview", *FAST, *flags,
                                "--out", gen], capsys)
        assert code == 0, err
        assert np.array_equal(pixels(gen), pixels(out / "cells" / f"r0_c{col}.png")), col
    latents = load_file(str(out / "latents.safetensors"))
    assert (latents["r0_c1"] - latents["r0_c0"]).abs().mean() > 0.01  # the sampler really changed


@pytest.mark.parametrize("column, message", [
    ("base::euler", "sampler='euler' must be one of ddpm, ddim"),
    ("base::steps=0", "steps='0' must be a whole number of at least 1"),
    ("base::eta=1", "unknown setting 'eta'"),
])
def test_bad_column_settings_fail_before_any_model_loads(column, message, tmp_path, capsys):
    code, _, err = run_cli(["compare", "--columns", column, "--prompt", "x", *FAST, "--out", tmp_path / "c",
                            "--no-progress"], capsys)
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "c" / "grid.png").exists()


def test_a_long_label_without_spaces_wraps_inside_its_own_column():
    """A column named by a path or a long run name (no space to wrap at) stays above its own cells: it
    used to run on over the next columns' labels."""
    cell = Image.new("RGB", (64, 64), "gray")
    name = "lora:/home/user/workspace/runs/toy-lora-purple-with-a-long-name/export/toy-lora-purple-comfyui.safetensors"
    grid = np.asarray(make_grid([[cell, cell, cell]], col_labels=[name, "", ""]))
    size, pad = 128, 4  # cells are upscaled to 128 px; PAD between columns
    top = next(y for y in range(grid.shape[0]) if (grid[y, pad:pad + 5] == 128).all())  # first row of the cells
    assert top > 3 * 18, f"the name took {top} px: it should wrap to several lines"
    header_first = grid[:top, :pad + size]
    header_rest = grid[:top, pad + size:]
    assert (header_first < 128).any(), "the label was not drawn"
    assert (header_rest == 255).all(), "the first column's label runs over the next columns"
