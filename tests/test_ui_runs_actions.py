"""The Runs page's second round (issue 18 item 3), driven with Streamlit's AppTest: it opens on the newest
finished run, shows only the run's own method's adapter parameters and the held-out loss over steps, resumes a
stopped run through the job runner's ``train --resume`` command, clones a run into the recipe editor and deletes
a run after a confirmation (folder moved aside, MLflow run marked deleted)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cascade_studio.config import load_recipe
from cascade_studio.ui import run_actions
from cascade_studio.ui.commands import TrainRequest
from cascade_studio.ui.jobs import JobQueue
from cascade_studio.ui.runner import build
from cascade_studio.ui.workspace import Workspace
from test_ui_pages import APP, make_run, page, texts, ws  # noqa: F401 - ws is a fixture

HOLDOUT_STEPS = (0, 2, 4)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Three LoRA runs, oldest first: FINISHED 'done', FINISHED 'done-too' (held-out loss every 2 steps), and the
    newest, 'stopped', KILLED. Every run logs both methods' adapter sections, as a real recipe does."""
    from cascade_studio.tracking import Tracker

    root = tmp_path_factory.mktemp("mlflow-actions")
    ids = {}
    for name, status in (("done", "FINISHED"), ("done-too", "FINISHED"), ("stopped", "KILLED")):
        tracker = Tracker.start(uri=None, experiment="cascade-studio", run_name=name,
                                tags={"method": "lora", "preset": "tiny"}, workspace=root, run_dir=root / name)
        tracker.log_params({"adapter": {"method": "lora", "lora": {"rank": 8}, "controlnet": {"c_in": 3}},
                            "optimizer": {"lr": 3e-3}})
        for step in (1, 2, 3, 4):
            tracker.log_metrics({"loss": 1.0 / step, "lr": 3e-3}, step=step)
        if name == "done-too":
            for step, value in zip(HOLDOUT_STEPS, (0.9, 0.7, 0.6)):
                tracker.log_metrics({"holdout_loss": value}, step=step)
        tracker.end(status)
        ids[name] = tracker.run_id
        time.sleep(0.01)  # distinct start times: the table is newest first
    return root / "mlflow.db", ids


@pytest.fixture()
def runs(ws: Workspace, store) -> dict[str, str]:  # noqa: F811 - the imported ws fixture
    database, ids = store
    shutil.copy(database, ws.root / "mlflow.db")
    for name in ids:
        make_run(ws, name, ids[name])
    return ids


def lifecycle(ws: Workspace, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(ws.tracking_uri()).get_run(run_id).info.lifecycle_stage


def test_opens_on_the_newest_finished_run_with_its_own_method_params_and_heldout_curve(ws, runs) -> None:
    at = page("runs")
    assert at.multiselect(key="runs_chosen").value == [runs["done-too"]]  # not 'stopped', the newest
    params = at.dataframe[1].value
    assert "adapter.lora.rank" in params.index and "adapter.method" in params.index
    assert not [key for key in params.index if key.startswith("adapter.controlnet.")]
    assert len(at.get("vega_lite_chart")) == 3  # loss, lr and the held-out loss at its steps
    assert "no holdout_loss logged" not in texts(at.caption)
    at.multiselect(key="runs_chosen").set_value([runs["done"]]).run()
    assert "no holdout_loss logged" in texts(at.caption)


def test_resume_queues_the_studios_train_resume_command_for_a_stopped_run(ws, runs) -> None:
    at = page("runs")
    assert at.button(key=f"runs_resume-{runs['done-too']}").label == "Train further"  # finished: to more steps
    at.multiselect(key="runs_chosen").set_value([runs["stopped"]]).run()
    at.button(key=f"runs_resume-{runs['stopped']}").click().run()
    assert "Queued resume stopped" in texts(at.success), texts(at.error)
    [job] = JobQueue(ws).jobs()
    request = TrainRequest.from_args(job.args)
    run_dir = ws.runs_dir / "stopped"
    assert request.resume and request.recipe == str(run_dir / "recipe.yaml") and job.run_dir == str(run_dir)
    argv, _ = build(job, ws)  # what the job runner runs
    assert argv[argv.index("cascade_studio.train") + 1] == str(run_dir / "recipe.yaml")
    assert "--resume" in argv and 'name="stopped"' in argv
    at.button(key=f"runs_resume-{runs['stopped']}").click().run()  # the folder is taken by the queued job now
    assert "already writes to" in texts(at.error) and len(JobQueue(ws).jobs()) == 1


def test_a_finished_run_trains_further_from_its_last_checkpoint(ws, runs) -> None:
    at = page("runs")
    assert at.number_input(key=f"runs_more_steps-{runs['done-too']}").value == 8  # twice its last checkpoint, 4
    at.number_input(key=f"runs_more_steps-{runs['done-too']}").set_value(10).run()
    at.button(key=f"runs_resume-{runs['done-too']}").click().run()
    assert "Queued resume done-too" in texts(at.success), texts(at.error)
    [job] = JobQueue(ws).jobs()
    argv, _ = build(job, ws)
    assert "--resume" in argv and "train.max_steps=10" in argv and 'name="done-too"' in argv


def test_a_run_without_a_checkpoint_cannot_be_resumed(ws, runs) -> None:
    shutil.rmtree(ws.runs_dir / "stopped" / "checkpoints")
    at = page("runs")
    at.multiselect(key="runs_chosen").set_value([runs["stopped"]]).run()
    assert not [b for b in at.button if b.key == f"runs_resume-{runs['stopped']}"]
    assert "saved no checkpoint" in texts(at.caption)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        TrainRequest.resuming(ws, ws.runs_dir / "stopped").validate(ws)


def test_clone_opens_the_runs_recipe_in_the_recipe_editor(ws, runs) -> None:
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.switch_page("views/runs.py").run()
    at.button(key=f"runs_clone-{runs['done-too']}").click().run()
    assert not at.exception and at.title[0].value == "Recipes"
    assert at.selectbox(key="recipes_select").value == "saved: done-too-clone.yaml"
    clone = load_recipe(ws.recipes_dir / "done-too-clone.yaml")
    original = load_recipe(ws.runs_dir / "done-too" / "recipe.yaml")
    assert clone.name == "done-too-clone" and clone.adapter == original.adapter and clone.train == original.train


def test_delete_asks_first_then_moves_the_folder_aside_and_marks_the_mlflow_run_deleted(ws, runs) -> None:
    at = page("runs")
    run_id, folder = runs["done-too"], ws.runs_dir / "done-too"
    at.button(key=f"runs_delete-{run_id}").click().run()
    assert "Delete run **done-too**?" in texts(at.warning)
    at.button(key=f"runs_delete_no-{run_id}").click().run()  # changed my mind
    assert folder.is_dir() and lifecycle(ws, run_id) == "active" and not at.warning
    at.button(key=f"runs_delete-{run_id}").click().run()
    at.button(key=f"runs_delete_yes-{run_id}").click().run()
    assert "Deleted run done-too" in texts(at.success), texts(at.error)
    assert not folder.exists() and lifecycle(ws, run_id) == "deleted"
    [moved] = ws.deleted_runs_dir.iterdir()
    assert moved.name.startswith("done-too-") and (moved / "recipe.yaml").is_file() and (moved / "checkpoints").is_dir()
    assert "done-too" not in list(at.dataframe[0].value["run"])
    assert at.multiselect(key="runs_chosen").value == [runs["done"]]  # the next newest finished run


def test_a_delete_that_fails_half_way_leaves_the_run_and_its_mlflow_record(ws, runs, monkeypatch) -> None:
    run_id, folder = runs["done"], ws.runs_dir / "done"
    with pytest.raises(ValueError, match="a queued or running job writes"):
        run_actions.delete_run(ws, folder, [run_id], busy=[str(folder)])
    assert lifecycle(ws, run_id) == "active"

    def refuse(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(ValueError, match="nothing was deleted: .*Read-only"):
        run_actions.delete_run(ws, folder, [run_id])
    assert folder.is_dir() and lifecycle(ws, run_id) == "active"  # MLflow put back as it was
