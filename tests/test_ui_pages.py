"""Every studio page driven offline with Streamlit's AppTest (no browser, no server).

Jobs started from the pages use a stand-in runner (nothing trains); the Runs page reads a real SQLite MLflow
store written here with cascade_studio.tracking; the Export page runs the real ``cascade-studio export``.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from cascade_studio.config.schema import DataConfig
from cascade_studio.config import load_recipe
from cascade_studio.ui import jobs as jobs_module
from cascade_studio.ui.commands import CLI, Column, CompareRequest, compare_argv
from cascade_studio.ui.jobs import JobQueue
from cascade_studio.ui.workspace import REPO_ROOT, Workspace

APP = REPO_ROOT / "cascade_studio" / "ui" / "app.py"
TINY_LORA = REPO_ROOT / "recipes" / "tiny" / "lora.yaml"
TINY = load_recipe(TINY_LORA)  # other values are read from the shipped file, which may be retuned
STAND_IN_RUNNER = r'''
import json, sys, time
from pathlib import Path
from cascade_studio.ui.jobs import write_exit
job_path = Path(sys.argv[1])
args = json.loads(job_path.read_text())["args"]
print("stand-in runner:", json.dumps(args), flush=True)
if args.get("run_name") == "crashes":
    print("Traceback (most recent call last):\nRuntimeError: the trainer fell over", flush=True)
    write_exit(job_path.with_suffix(".exit"), 1, ["stand-in"])
    sys.exit(1)
time.sleep(30)
'''


@pytest.fixture()
def ws(tmp_path: Path, monkeypatch) -> Workspace:
    workspace = Workspace(tmp_path / "ws")
    workspace.root.mkdir()
    monkeypatch.setenv("CASCADE_STUDIO_WORKSPACE", str(workspace.root))
    monkeypatch.setenv("CASCADE_STUDIO_QUEUE_WORKER", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = tmp_path / "stand_in_runner.py"
    runner.write_text(STAND_IN_RUNNER)
    monkeypatch.setattr(jobs_module, "_default_runner", lambda: [sys.executable, str(runner)])
    yield workspace
    for job in JobQueue(workspace).jobs():  # never leave a stand-in runner behind
        if job.status == "running":
            JobQueue(workspace, cancel_grace_s=0).cancel(job.id)


def page(name: str) -> AppTest:
    return AppTest.from_string(f"from cascade_studio.ui.page_{name} import render\nrender()\n",
                               default_timeout=120).run()


def by_key(widgets, suffix: str):
    found = [w for w in widgets if w.key and w.key.endswith(suffix)]
    assert len(found) == 1, (suffix, [w.key for w in widgets])
    return found[0]


def texts(elements) -> str:
    return "\n".join(e.value for e in elements)


# ------------------------------------------------------------------------------------------------ recipes
def test_recipe_form_renders_schema_fields_with_their_docs_as_help(ws: Workspace) -> None:
    at = page("recipes")
    assert not at.exception
    assert at.selectbox(key="recipes_select").value == "shipped: tiny/lora.yaml"
    max_steps = by_key(at.number_input, "-train.max_steps")
    assert max_steps.value == TINY.train.max_steps and max_steps.help.startswith("Optimizer steps to train.")
    assert by_key(at.selectbox, "-model.preset").value == "tiny"
    assert by_key(at.multiselect, "-adapter.lora.targets").value == ["attention"]
    assert float(by_key(at.text_input, "-optimizer.lr").value) == TINY.optimizer.lr
    assert "Stage C sampling steps" in by_key(at.number_input, "-preview.steps").help
    # only the chosen method's section: no ControlNet widgets for a LoRA recipe
    assert not [w for w in at.selectbox if w.key and "adapter.controlnet" in w.key]
    assert "Valid recipe." in texts(at.success)


def test_invalid_edits_show_every_problem_next_to_its_field(ws: Workspace) -> None:
    at = page("recipes")
    by_key(at.number_input, "-train.max_steps").set_value(0)
    by_key(at.text_input, "-optimizer.lr").set_value("fast")
    by_key(at.text_input, "-data.path").set_value("datasets/does-not-exist")
    at.run()
    errors = texts(at.error)
    assert "3 problems" in errors
    for path in ("train.max_steps: got 0", "optimizer.lr: got 'fast'", "data.path: got 'datasets/does-not-exist'"):
        assert path in errors
    save = [b for b in at.button if b.key and b.key.startswith("save-")][0]
    save.click().run()
    assert "Not saved: fix the 3 problem(s)" in texts(at.error)
    assert not ws.recipes_dir.exists()


def test_save_writes_a_new_sanitised_recipe_and_selects_it(ws: Workspace) -> None:
    at = page("recipes")
    by_key(at.number_input, "-train.max_steps").set_value(8)
    by_key(at.text_area, "-preview.prompts").set_value("a green triangle")
    at.run()
    [w for w in at.text_input if w.key and w.key.startswith("saveas-")][0].set_value("My quick LoRA!")
    [b for b in at.button if b.key and b.key.startswith("save-")][0].click().run()
    saved = ws.recipes_dir / "My-quick-LoRA.yaml"
    assert saved.exists(), texts(at.error)
    recipe = load_recipe(saved)
    assert recipe.train.max_steps == 8 and recipe.preview.prompts == ("a green triangle",)
    assert recipe.adapter.lora.rank == TINY.adapter.lora.rank and recipe.data == TINY.data  # untouched values kept
    assert at.selectbox(key="recipes_select").value == "saved: My-quick-LoRA.yaml"
    assert f"Saved {saved}" in texts(at.success)


def test_yaml_view_validates_text_and_saves_it(ws: Workspace) -> None:
    at = page("recipes")
    editor = [t for t in at.text_area if t.key and t.key.startswith("yaml-")][0]
    editor.set_value("version: 1\nname: x\ntrain:\n  max_steps: -1\n  batch_size: 0\n").run()
    errors = texts(at.error)
    assert "train.max_steps" in errors and "train.batch_size" in errors
    text = re.sub(r"max_steps: \d+", "max_steps: 11", TINY_LORA.read_text())
    [t for t in at.text_area if t.key and t.key.startswith("yaml-")][0].set_value(text).run()
    assert "Valid recipe: lora on preset tiny, 11 steps." in texts(at.success)
    [t for t in at.text_input if t.key and t.key.startswith("yaml-saveas-")][0].set_value("../../evil").run()
    [b for b in at.button if b.key and b.key.startswith("yaml-save-")][0].click().run()
    assert load_recipe(ws.recipes_dir / "evil.yaml").train.max_steps == 11
    assert "# Tiny LoRA" in (ws.recipes_dir / "evil.yaml").read_text()  # the text as typed, comments kept


def test_recipe_list_paths_and_save_names_say_one_thing_each(ws: Workspace) -> None:
    from cascade_studio.ui.paths import NAME_RULE, RELATIVE_PATHS_HELP

    at = page("recipes")
    groups = [label.rsplit("/", 1)[0] for label in at.selectbox(key="recipes_select").options]
    runs = [g for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g]
    assert len(runs) == len(set(runs)) and runs[:2] == ["shipped: tiny", "shipped: toy"]  # grouped, CPU ones first
    # where relative paths start: the page and every path setting's tooltip say it with the same words
    assert RELATIVE_PATHS_HELP in texts(at.caption)
    assert RELATIVE_PATHS_HELP in by_key(at.text_input, "-data.path").help
    assert RELATIVE_PATHS_HELP not in by_key(at.text_input, "-optimizer.lr").help
    assert RELATIVE_PATHS_HELP in page("data").text_input(key="data_typed").help  # the Data page's folder box too
    # one default save name in both tabs: the recipe's name for a shipped recipe
    form_name = [w for w in at.text_input if w.key and w.key.startswith("saveas-")][0]
    yaml_name = [w for w in at.text_input if w.key and w.key.startswith("yaml-saveas-")][0]
    assert form_name.value == yaml_name.value == TINY.name and NAME_RULE in form_name.help


def test_recipe_form_shows_what_the_previews_cost_and_warns_when_they_dominate(ws: Workspace) -> None:
    at = page("recipes")
    preview = TINY.preview
    per_column = len(preview.prompts) * len(preview.seeds) * preview.steps * 2  # cfg 4: guided
    previews = TINY.train.max_steps // preview.every
    total = 2 * per_column + (previews - 1) * per_column
    [info] = [i.value for i in at.info if "Preview cost" in i.value]
    assert f"= **{per_column:,}** Stage C evaluations per column" in info
    assert f"{previews} preview(s) over the run: **{total:,}** evaluations" in info
    by_key(at.number_input, "-preview.every").set_value(1)
    by_key(at.number_input, "-preview.steps").set_value(50)
    at.run()
    [warning] = [w.value for w in at.warning if "Preview cost" in w.value]
    assert f"{TINY.train.max_steps} preview(s) over the run" in warning and "lower `preview.steps`" in warning


# --------------------------------------------------------------------------------------------------- data
@pytest.fixture()
def dataset(ws: Workspace) -> Path:
    folder = ws.root / "datasets" / "mini"
    folder.mkdir(parents=True)
    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (64, 48), color).save(folder / f"{i}_{color}.png")
        (folder / f"{i}_{color}.txt").write_text(f"a {color} card")
    (folder / "broken.png").write_bytes(b"not a png at all")
    Image.new("RGB", (8, 8), "white").save(folder / "tiny.png")
    return folder


def test_data_page_previews_images_and_lists_skipped_files_with_reasons(ws: Workspace, dataset: Path) -> None:
    at = page("data")
    assert at.selectbox(key="data_pick").options[0] == "datasets/tiny-shapes"  # the repo's own first
    at.text_input(key="data_typed").set_value(str(dataset)).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {"Usable images": "3", "Skipped files": "2", "Without caption": "0"}
    [skipped] = [d.value for d in at.dataframe if "reason" in d.value.columns]
    assert sorted(Path(p).name for p in skipped["file"]) == ["broken.png", "tiny.png"]
    assert all(reason for reason in skipped["reason"])
    images = at.tabs[0].get("image")  # the Images tab
    assert len(images) == 3
    assert "unknown until the first run" in texts(at.info)


def test_data_page_refuses_paths_outside_the_workspace_and_datasets(ws: Workspace, tmp_path: Path) -> None:
    at = page("data")
    for bad in ("../outside", "/etc", "recipes/tiny", str(tmp_path)):
        at.text_input(key="data_typed").set_value(bad).run()
        assert "Not allowed" in texts(at.error), bad
        assert not at.metric


def test_data_page_shows_cache_status_once_a_run_recorded_its_encoders(ws: Workspace, dataset: Path) -> None:
    import torch

    from cascade_studio.data import build_cache, scan_source

    class CaptionEncoder:
        name, identity, inputs = "fake", "fake-text-v1", "caption"

        def encode(self, batch):
            return {"fake": torch.zeros(len(batch), 2)}

    records = scan_source(DataConfig(source="folder", path=str(dataset))).records
    preprocessing = {"resolution": 256, "crop": "center"}
    build_cache(records[:2], [CaptionEncoder()], ws.root / "cache", preprocessing, progress=False)
    run_dir = ws.runs_dir / "earlier"
    run_dir.mkdir(parents=True)
    (run_dir / "events.jsonl").write_text(json.dumps({
        "event": "cache", "time": 1.0, "encoder_identities": ["fake-text-v1"], "preprocessing": preprocessing,
        "data_path": str(dataset), "cache_dir": str(ws.root / "cache")}) + "\n")
    at = page("data")
    at.text_input(key="data_typed").set_value(str(dataset)).run()
    progress = at.get("progress")
    assert len(progress) == 1 and "2 of 3 images cached for the encoders of run earlier" in progress[0].proto.text


# ------------------------------------------------------------------------------------------------- launch
def test_launch_queues_a_validated_recipe_then_queues_the_next_behind_it(ws: Workspace) -> None:
    at = page("launch")
    assert at.selectbox(key="launch_recipe").value == "shipped: tiny/lora.yaml"
    name = at.text_input(key=f"launch_name-{TINY_LORA}-0")
    assert name.value == "tiny-lora"
    at.text_area(key="launch_overrides").set_value("train.max_steps=4\npreview.every=0").run()
    at.button(key="launch_queue").click().run()
    queue = JobQueue(ws)
    [first] = queue.jobs()
    assert first.status == "running" and first.kind == "train"
    assert first.args == {"recipe": str(TINY_LORA), "run_name": "tiny-lora",
                          "overrides": ["train.max_steps=4", "preview.every=0"], "processes": 1}
    assert first.run_dir == str(ws.runs_dir / "tiny-lora")
    # the next launch gets a fresh run name and waits in the queue (once the form changed: the same form again
    # is the same launch, see test_ui_paths.py)
    assert at.text_input(key=f"launch_name-{TINY_LORA}-1").value == "tiny-lora-2"
    at.text_area(key="launch_overrides").set_value("train.max_steps=4\npreview.every=0\ntrain.seed=1").run()
    at.button(key="launch_queue").click().run()
    first_now, second = JobQueue(ws).jobs()
    assert (first_now.status, second.status, second.args["run_name"]) == ("running", "queued", "tiny-lora-2")
    assert "Queued (1)" in [s.value for s in at.subheader]
    at.button(key=f"cancel-{second.id}").click().run()
    assert [j.id for j in JobQueue(ws).jobs()] == [first.id]
    at.button(key=f"cancel-{first.id}").click().run()
    deadline = time.monotonic() + 20
    while JobQueue(ws).get(first.id).status == "running" and time.monotonic() < deadline:
        JobQueue(ws).pump()
        time.sleep(0.2)
    assert JobQueue(ws).get(first.id).status == "cancelled"


def test_launch_refuses_an_invalid_recipe_and_lists_its_problems(ws: Workspace) -> None:
    at = page("launch")
    at.text_input(key=f"launch_name-{TINY_LORA}-0").set_value("my run_1!").run()
    # the rule in code spans: Markdown shows every character of it and of the names
    assert "The run name `my run_1!` may only use letters, digits, `.`, `-` and `_`; e.g. `my-run_1`" \
        in texts(at.error)
    at.text_input(key=f"launch_name-{TINY_LORA}-0").set_value("tiny-lora").run()
    at.text_area(key="launch_overrides").set_value("train.max_steps=0\nmodel.preset=huge").run()
    errors = texts(at.error)
    assert "2 problem(s)" in errors and "train.max_steps" in errors and "model.preset" in errors
    assert at.button(key="launch_queue").disabled
    at.text_area(key="launch_overrides").set_value("name=elsewhere").run()
    assert "set by the studio" in texts(at.error)


def test_a_crashed_job_shows_as_failed_with_its_log_tail(ws: Workspace) -> None:
    at = page("launch")
    at.text_input(key=f"launch_name-{TINY_LORA}-0").set_value("crashes").run()
    at.button(key="launch_queue").click().run()
    queue = JobQueue(ws)
    deadline = time.monotonic() + 30
    while queue.jobs()[0].status == "running" and time.monotonic() < deadline:
        queue.pump()
        time.sleep(0.2)
    at.run()
    assert not at.exception
    # the clear message first (the exception that ended the log), the traceback folded below it
    assert "**Failed:** RuntimeError: the trainer fell over (exit code 1)" in texts(at.error)
    assert "**train crashes (shipped: tiny/lora.yaml)** · failed :material/error:" in texts(at.markdown)
    [folded] = [e for e in at.expander if e.label == "Traceback and log"]
    log = "\n".join(c.value for c in folded.code)
    assert "Traceback (most recent call last)" in log and "RuntimeError: the trainer fell over" in log


@pytest.mark.slow  # three planner runs in child processes: 12-20 s on two busy cores
def test_the_ready_line_shows_the_overrides_the_memory_plan_and_the_form_resets_after_queue(ws: Workspace) -> None:
    at = page("launch")
    at.text_area(key="launch_overrides").set_value("train.max_steps=4\npreview.seeds=[0, 1]").run()
    ready = texts(at.success)
    assert "with 2 override(s)" in ready and "- `train.max_steps` = `4`" in ready
    assert "- `preview.seeds` = `[0, 1]`" in ready
    assert re.search(r"fits in 0\.\d of 24 GiB", texts(at.info)), texts(at.info)  # tiny: mostly the CUDA context
    # a batch the card cannot hold: the planner's switches, then one click adds them to the overrides
    at.text_area(key="launch_overrides").set_value("train.max_steps=4\ntrain.batch_size=512")
    at.number_input(key="launch_gpu_gb").set_value(1.0).run()
    warning = texts(at.warning)
    assert re.search(r"\*\*\d+\.\d GiB does not fit in 1 GiB\*\*", warning), warning
    assert "- `train.checkpointing=blocks` ->" in warning
    at.button(key="launch_apply_switches").click().run()
    overrides = at.text_area(key="launch_overrides").value.splitlines()
    assert overrides[0] == "train.max_steps=4" and "train.checkpointing=blocks" in overrides
    assert "fits in" in texts(at.info)
    at.button(key="launch_queue").click().run()
    [job] = JobQueue(ws).jobs()
    assert job.args["overrides"] == overrides
    # the form is fresh: no overrides, one process, a new run name; clicking again queues nothing more
    assert at.text_area(key="launch_overrides").value == "" and at.number_input(key="launch_processes").value == 1
    assert at.text_input(key=f"launch_name-{TINY_LORA}-1").value == "tiny-lora-2"
    at.button(key="launch_queue").click().run()
    assert len(JobQueue(ws).jobs()) == 1 and "Already queued from this form" in texts(at.info)


def test_the_running_card_shows_speed_and_peak_memory_beside_the_loss(ws: Workspace) -> None:
    at = page("launch")
    at.button(key="launch_queue").click().run()
    [job] = JobQueue(ws).jobs()
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True)
    step = {"event": "step", "time": time.time(), "step": 3, "max_steps": 10, "loss": 0.25, "lr": 1e-4,
            "eta_seconds": 12.0, "it_per_s": 2.5, "peak_memory_mb": 1536.0}
    (run_dir / "events.jsonl").write_text(json.dumps(step) + "\n")
    at.run()
    [bar] = at.get("progress")
    assert bar.proto.text == "step 3/10 · loss 0.2500 · lr 1.00e-04 · 2.50 it/s · peak memory 1.50 GiB · ETA 0:12"


def test_the_app_tells_the_user_once_when_a_job_ends(ws: Workspace) -> None:
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.switch_page("views/launch.py").run()
    at.text_input(key=f"launch_name-{TINY_LORA}-0").set_value("crashes").run()
    at.button(key="launch_queue").click().run()
    assert "Running: train crashes" in texts(at.sidebar.caption)
    queue = JobQueue(ws)
    deadline = time.monotonic() + 30
    while queue.jobs()[0].status == "running" and time.monotonic() < deadline:
        queue.pump()
        time.sleep(0.2)
    at.switch_page("views/runs.py").run()  # on any page
    [toast] = at.toast
    assert toast.value.startswith("train crashes") and "failed. RuntimeError: the trainer fell over" in toast.value
    assert toast.icon == ":material/error:" and "No job is running." in texts(at.sidebar.caption)
    at.run()
    assert not at.toast  # once per job


# --------------------------------------------------------------------------------------------------- runs
LORA_KEYS = ("down_blocks.0.2.attention.attn.to_q", "down_blocks.0.2.attention.attn.to_k")


def make_run(ws: Workspace, name: str, run_id: str, steps=(2, 4), export: bool = True) -> Path:
    """A run folder as run.py leaves it: recipe, events, verified checkpoints, previews and an export."""
    import torch

    from cascade_studio.adapters.files import save_adapter_tensors
    from cascade_studio.config import dump_recipe_yaml
    from cascade_studio.trainers.checkpoints import CheckpointManager, RunState

    run_dir = ws.runs_dir / name
    (run_dir / "previews").mkdir(parents=True)
    recipe = load_recipe(REPO_ROOT / "recipes" / "tiny" / "lora.yaml", [f"name={name}"])
    (run_dir / "recipe.yaml").write_text(dump_recipe_yaml(recipe))
    tensors = {}
    for module in LORA_KEYS:
        tensors[f"{module}.lora_A.weight"] = torch.randn(2, 64)
        tensors[f"{module}.lora_B.weight"] = torch.randn(64, 2)
    meta = {"cascade_studio.method": "lora", "cascade_studio.rank": "2", "cascade_studio.alpha": "2.0",
            "cascade_studio.targets": "attention", "cascade_studio.lora_type": "lora",
            "cascade_studio.recipe_name": name}
    manager = CheckpointManager(run_dir / "checkpoints", keep=10)
    for step in steps:
        manager.save(step, lambda d: save_adapter_tensors(tensors, d / "adapter.safetensors", meta),
                     RunState(step=step, mlflow_run_id=run_id))
        Image.new("RGB", (32, 32), "red").save(run_dir / "previews" / f"step-{step:06d}.png")
    if export:
        save_adapter_tensors(tensors, run_dir / "export" / f"{name}-comfyui.safetensors", meta)
    (run_dir / "events.jsonl").write_text(json.dumps({"event": "started", "time": 1.0, "run_dir": str(run_dir),
                                                      "run_id": run_id}) + "\n")
    return run_dir


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Two finished runs in a real SQLite MLflow store, written once per module (creating the schema is slow):
    a LoRA (lr 2e-3) and a ControlNet (lr 1e-3)."""
    from cascade_studio.tracking import Tracker

    root = tmp_path_factory.mktemp("mlflow")
    ids = {}
    for name, method, lr, losses in (("lora-a", "lora", 2e-3, [0.9, 0.6, 0.4]),
                                     ("cnet-b", "controlnet", 1e-3, [0.8, 0.7, 0.65])):
        tracker = Tracker.start(uri=None, experiment="cascade-studio", run_name=name,
                                tags={"method": method, "preset": "tiny", "base_model": "tiny"},
                                workspace=root, run_dir=root / "runs" / name)
        tracker.log_params({"optimizer": {"lr": lr}, "train": {"max_steps": 3}, "adapter": {"method": method}})
        for step, loss in enumerate(losses, start=1):
            tracker.log_metrics({"loss": loss, "lr": lr}, step=step)
        tracker.end("FINISHED")
        ids[name] = tracker.run_id
    return root / "mlflow.db", ids


@pytest.fixture()
def tracked_runs(ws: Workspace, mlflow_store) -> dict[str, str]:
    """The module's MLflow store copied into this test's workspace, plus the LoRA run's folder."""
    database, ids = mlflow_store
    shutil.copy(database, ws.root / "mlflow.db")
    make_run(ws, "lora-a", ids["lora-a"])
    return ids


def test_runs_page_lists_filters_overlays_and_diffs_runs(ws: Workspace, tracked_runs: dict[str, str]) -> None:
    at = page("runs")
    table = at.dataframe[0].value
    assert sorted(table["run"]) == ["cnet-b", "lora-a"]
    assert set(table["method"]) == {"lora", "controlnet"} and set(table["status"]) == {"FINISHED"}
    assert dict(zip(table["run"], table["loss"].round(3))) == {"lora-a": 0.4, "cnet-b": 0.65}
    at.multiselect(key="runs_method").set_value(["lora"]).run()
    assert list(at.dataframe[0].value["run"]) == ["lora-a"]
    at.multiselect(key="runs_method").set_value([]).run()
    at.multiselect(key="runs_chosen").set_value(list(tracked_runs.values())).run()
    assert len(at.get("vega_lite_chart")) == 2  # loss and lr overlaid (no held-out loss logged)
    params = at.dataframe[1].value
    assert params.loc["optimizer.lr"].tolist()[:2] in (["0.002", "0.001"], ["0.001", "0.002"])
    assert bool(params.loc["optimizer.lr", "differs"]) and "train.max_steps" not in params.index
    at.checkbox(key="runs_only_diff").uncheck().run()
    assert not bool(at.dataframe[1].value.loc["train.max_steps", "differs"])


def test_runs_page_shows_previews_by_step_and_offers_the_adapter(ws: Workspace, tracked_runs) -> None:
    at = AppTest.from_string("import streamlit as st\nst.query_params['run_id'] = "
                             f"{tracked_runs['lora-a']!r}\nfrom cascade_studio.ui.page_runs import render\n"
                             "render()\n", default_timeout=120).run()
    assert at.multiselect(key="runs_chosen").value == [tracked_runs["lora-a"]]  # preselected from the link
    slider = at.select_slider(key=f"runs_step-{tracked_runs['lora-a']}")
    assert slider.value == 4 and list(slider.options) == ["2", "4"]
    downloads = at.get("download_button")
    assert [d.proto.label for d in downloads] == ["Download lora-a-comfyui.safetensors"]


# ------------------------------------------------------------------------------------------------ compare
def test_compare_page_builds_the_command_and_queues_it(ws: Workspace) -> None:
    run_dir = make_run(ws, "tiny-lora", "f" * 32)
    at = page("compare")
    assert at.checkbox(key="cmp_base").value is True
    at.multiselect(key="cmp_runs").set_value([str(run_dir)])
    at.multiselect(key="cmp_ckpts").set_value([f"{run_dir}@2"])
    at.text_input(key="cmp_seeds").set_value("0 1")
    at.number_input(key="cmp_steps").set_value(6)
    at.run()
    # choosing a run fills in its preview prompts and its preset
    assert at.text_area(key=f"cmp_prompts-{run_dir}").value == "\n".join(TINY.preview.prompts)
    assert at.selectbox(key=f"cmp_preset-{run_dir}").value == "tiny"
    at.button(key="cmp_run").click().run()
    [job] = JobQueue(ws).jobs()
    request = CompareRequest.from_args(job.args)
    assert request.columns == (Column("base"), Column("run", str(run_dir)), Column("ckpt", str(run_dir), step=2))
    argv = compare_argv(request, ws)
    assert argv[:9] == [*CLI, "compare", "--columns", "base", f"run:{run_dir}", f"ckpt:{run_dir}@2",
                        f"--prompt={TINY.preview.prompts[0]}"]
    assert argv[argv.index("--seeds"):argv.index("--seeds") + 3] == ["--seeds", "0", "1"]
    assert argv[argv.index("--steps") + 1] == "6" and Path(request.out).parent == ws.comparisons_dir
    assert "Comparison running" in texts(at.info)


def test_a_compare_column_samples_with_its_own_sampler_and_steps(ws: Workspace) -> None:
    """An LCM-LoRA column at 4 unguided steps beside the base at the grid's 20: the command carries the column's
    own sampling after '::' (inference/compare.py COLUMN_SYNTAX), the base column none."""
    run_dir = make_run(ws, "tiny-lora", "e" * 32)
    at = page("compare")
    at.multiselect(key="cmp_runs").set_value([str(run_dir)]).run()
    [run_sampler] = [s for s in at.selectbox if s.key.startswith("cmp_smp-") and "run" in s.label]
    assert run_sampler.value == "the grid's"
    run_sampler.set_value("lcm").run()
    [own_steps] = [n for n in at.number_input if n.key.startswith("cmp_smp_steps-") and n.key.endswith("-lcm")]
    assert own_steps.value == 4  # an unguided sampler's default
    at.button(key="cmp_run").click().run()
    [job] = JobQueue(ws).jobs()
    request = CompareRequest.from_args(job.args)
    argv = compare_argv(request, ws)
    columns = argv[argv.index("--columns") + 1:argv.index("--columns") + 3]
    assert columns == ["base", f"run:{run_dir}::sampler=lcm,steps=4"]
    bad = CompareRequest((Column("base", sampler="nope"),), ("a",), out=str(ws.comparisons_dir / "x"))
    assert any("unknown sampler 'nope'" in p for p in bad.problems(ws))


def test_compare_page_refuses_an_empty_choice(ws: Workspace) -> None:
    at = page("compare")
    at.checkbox(key="cmp_base").uncheck()
    at.text_area(key="cmp_prompts-None").set_value("")
    at.text_input(key="cmp_seeds").set_value("x")
    at.run()
    errors = texts(at.error)
    assert "at least one column" in errors and "prompt" in errors and "whole numbers" in errors
    assert at.button(key="cmp_run").disabled


def test_compare_page_shows_the_grid_with_each_columns_settings(ws: Workspace) -> None:
    folder = ws.comparisons_dir / "20260101-000000"
    (folder / "cells").mkdir(parents=True)
    Image.new("RGB", (64, 32), "gray").save(folder / "grid.png")
    manifest = {"version": 1, "grid": "grid.png", "model": {"preset": "tiny"},
                "settings": {"steps_c": 6, "decoder": "previewer"}, "prompts": ["a red circle"], "seeds": [0],
                "rows": [{"index": 0, "prompt": "a red circle", "seed": 0}],
                "columns": [{"index": 0, "label": "base", "spec": "base", "adapters": []},
                            {"index": 1, "label": "lora tiny-lora x0.5", "spec": "run:x@0.5",
                             "adapters": [{"method": "lora", "origin": "run", "weight": 0.5, "step": None,
                                           "mlflow_run_id": "abc123", "path": "/ws/runs/x/export/x.safetensors"}]}]}
    for col, size in ((0, (20, 20)), (1, (24, 16))):
        Image.new("RGB", size, "red").save(folder / "cells" / f"r0_c{col}.png")
    manifest["cells"] = [{"row": 0, "col": c, "file": f"cells/r0_c{c}.png"} for c in (0, 1)]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    at = page("compare")
    markdown = "\n".join(m.value for m in at.markdown)
    assert "Column 1: base" in markdown and "Column 2: lora tiny-lora x0.5" in markdown
    captions = "\n".join(c.value for c in at.caption)
    assert "method: lora · origin: run · weight: 0.5 · mlflow_run_id: abc123" in captions
    assert sorted(d.proto.label for d in at.get("download_button")) == ["Download grid.png", "Download r0_c0.png",
                                                                         "Download the comparison (zip)"]
    # the full-size view of one cell: the picked cell's own file
    at.selectbox(key=f"cmp_cell_col-{folder.name}").set_value(1).run()
    grid, cell = at.get("image")
    assert cell.proto.imgs[0].caption == "lora tiny-lora x0.5 · a red circle (seed 0) · r0_c1.png"
    assert "Download r0_c1.png" in [d.proto.label for d in at.get("download_button")]


def test_compare_takes_adapter_files_from_outside_each_column_with_its_strength(ws: Workspace, tmp_path: Path,
                                                                                monkeypatch) -> None:
    run_dir = make_run(ws, "tiny-lora", "f" * 32)
    exported = run_dir / "export" / "tiny-lora-comfyui.safetensors"
    at = page("compare")
    at.file_uploader(key="cmp_upload").upload("not really.safetensors", b"nonsense bytes").run()
    assert "Not added: not really.safetensors is not a safetensors adapter file" in texts(at.error)
    at.file_uploader(key="cmp_upload").set_value(("style v2.safetensors", exported.read_bytes(),
                                                  "application/octet-stream")).run()
    uploaded = ws.adapters_dir / "style-v2.safetensors"
    assert uploaded.read_bytes() == exported.read_bytes() and at.multiselect(key="cmp_files").value == [str(uploaded)]
    outside = tmp_path / "elsewhere" / "ext.safetensors"
    outside.parent.mkdir()
    shutil.copy(exported, outside)
    at.text_input(key="cmp_path").set_value(str(outside)).run()
    at.button(key="cmp_add_path").click().run()
    assert "is outside the folders the studio may use" in texts(at.error)
    monkeypatch.setenv("CASCADE_STUDIO_ALLOW_PATHS", str(outside.parent))  # cascade-studio ui --allow-path
    at.button(key="cmp_add_path").click().run()
    assert at.multiselect(key="cmp_files").value == [str(uploaded), str(outside)]
    at.multiselect(key="cmp_runs").set_value([str(run_dir)]).run()
    strengths = {w.label: w for w in at.number_input if w.label.startswith("Strength: ")}
    assert set(strengths) == {"Strength: adapters/style-v2.safetensors", f"Strength: {outside}",
                              "Strength: run tiny-lora"}
    strengths["Strength: run tiny-lora"].set_value(0.5)
    strengths["Strength: adapters/style-v2.safetensors"].set_value(-0.8)
    at.run()
    at.button(key="cmp_run").click().run()
    [job] = JobQueue(ws).jobs()
    argv = compare_argv(CompareRequest.from_args(job.args), Workspace.from_env(root=ws.root))
    specs = argv[argv.index("--columns") + 1:argv.index(f"--prompt={TINY.preview.prompts[0]}")]
    assert specs == ["base", f"run:{run_dir}@0.5", f"{uploaded}@-0.8", str(outside)]


def test_compare_settings_are_saved_and_opened_again(ws: Workspace) -> None:
    kept, gone = make_run(ws, "kept", "a" * 32), make_run(ws, "gone", "b" * 32)
    at = page("compare")
    at.multiselect(key="cmp_runs").set_value([str(kept), str(gone)]).run()
    [w for w in at.number_input if w.label == "Strength: run kept"][0].set_value(0.7)
    at.text_area(key=f"cmp_prompts-{kept}").set_value("a green square\na red circle")
    at.text_input(key="cmp_seeds").set_value("3 4")
    at.number_input(key="cmp_steps").set_value(5)
    at.text_input(key="cmp_save_name").set_value("my grid")
    at.run()
    at.button(key="cmp_save").click().run()
    saved = ws.comparison_settings_dir / "my-grid.json"
    assert f"Saved the settings as `{saved}`" in texts(at.success)
    assert json.loads(saved.read_text())["seeds"] == [3, 4]
    shutil.rmtree(gone)
    at = page("compare")  # later, in a fresh session
    at.selectbox(key="cmp_open").set_value(str(saved))
    at.button(key="cmp_open_go").click().run()
    assert at.multiselect(key="cmp_runs").value == [str(kept)]
    assert at.text_area(key=f"cmp_prompts-{kept}").value == "a green square\na red circle"
    assert (at.text_input(key="cmp_seeds").value, at.number_input(key="cmp_steps").value) == ("3 4", 5)
    assert [w.value for w in at.number_input if w.label == "Strength: run kept"] == [0.7]
    assert f"run:{gone}: {gone} does not exist" in texts(at.warning)


# ------------------------------------------------------------------------------------------------- export
@pytest.mark.slow
def test_export_page_exports_a_checkpoint_in_a_subprocess(ws: Workspace) -> None:
    run_dir = make_run(ws, "to-export", "e" * 32, export=False)
    at = page("export")
    assert at.selectbox(key="exp_run").value == str(run_dir)
    assert at.selectbox(key="exp_fmt-lora").options == ["comfyui", "peft"]
    assert at.selectbox(key="exp_src-to-export").options == ["step 4", "step 2"]  # newest first
    at.selectbox(key="exp_src-to-export").set_value("step 2")
    at.selectbox(key="exp_fmt-lora").set_value("peft")
    at.run()
    at.button(key="exp_go").click().run()
    out = run_dir / "export" / "to-export-step2-peft"
    assert "Exported to-export-step2-peft" in texts(at.success), "\n".join(c.value for c in at.code)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert [d.proto.label for d in at.get("download_button")] == ["Download to-export-step2-peft.zip"]


# ------------------------------------------------------------------------------------------- whole app
def test_the_app_navigates_between_pages(ws: Workspace) -> None:
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception and at.title[0].value == "Recipes"
    for view, title in (("views/launch.py", "Launch"), ("views/runs.py", "Runs"), ("views/export.py", "Export"),
                        ("views/generate.py", "Generate")):
        at.switch_page(view).run()
        assert not at.exception and at.title[0].value == title


def test_the_studio_never_imports_torch_for_its_pages(ws: Workspace) -> None:
    """Imports every UI module and renders the pages that need no scan in a fresh interpreter."""
    code = (
        "import sys, importlib, pkgutil\n"
        "import cascade_studio.ui as ui\n"
        "for m in pkgutil.iter_modules(ui.__path__):\n"
        "    importlib.import_module(f'cascade_studio.ui.{m.name}')\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        "from streamlit.testing.v1 import AppTest\n"
        "for name in ('recipes', 'launch', 'runs', 'compare', 'generate', 'export'):\n"
        "    at = AppTest.from_string(f'from cascade_studio.ui.page_{name} import render\\nrender()\\n',"
        " default_timeout=120).run()\n"
        "    assert not at.exception, (name, at.exception)\n"
        "    assert 'torch' not in sys.modules, name\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_launch_with_a_shipped_accelerate_config_is_in_the_ready_line_and_the_queued_job(ws: Workspace) -> None:
    at = page("launch")
    at.selectbox(key="launch_config").set_value("cpu-2proc").run()
    assert "with accelerate config `cpu-2proc.yaml` (its process count)" in texts(at.success)
    at.selectbox(key="launch_config").set_value("multi-node").run()
    assert "starts processes on 2 machines" in texts(at.error) and not at.success
    at.selectbox(key="launch_config").set_value("fsdp").run()
    at.button(key="launch_queue").click().run()
    [job] = JobQueue(ws).jobs()
    assert job.args["launch"] == "fsdp"
