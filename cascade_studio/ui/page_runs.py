"""Runs page: the workspace's MLflow runs as a filterable table, their loss/lr/held-out curves overlaid, parameters
side by side with differences highlighted (only each run's own method's adapter section), preview images by step,
the exported adapters to download, and what to do with a run: resume a stopped or failed one (a ``train --resume``
job), clone its recipe into the recipe editor, delete it (after a confirmation; see ``run_actions.py``)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from ..config import RecipeError
from ..run_folder import PREVIEWS_DIR, RunFolder, checkpoint_step
from ..tracking import TrackingError, list_runs, read_run
from .commands import TrainRequest
from .common import PAGES, queue, show_problems, workspace
from .jobs import ACTIVE
from .page_recipes import _PENDING as RECIPES_PENDING  # the recipe the Recipes page selects when it opens next
from .paths import PathNotAllowed
from .run_actions import clone_recipe, delete_run
from .runs_data import (RESUMABLE, adapter_files, default_run, filter_runs, local_artifact_dir, metric_frame,
                        own_method_params, params_diff, preview_steps, run_dir_for, run_dirs_by_id, runs_table,
                        zip_folder)
from .workspace import EXPERIMENT, Workspace

CURVES = (("loss", "Training loss"), ("lr", "Learning rate"), ("holdout_loss", "Held-out loss"))
_FLASH = "runs_flash"
_CONFIRM = "runs_confirm_delete"  # the run id whose deletion waits for a confirmation


@st.cache_data(ttl=3, show_spinner=False)
def _list(uri: str) -> list[dict[str, Any]]:
    return list_runs(uri, EXPERIMENT)


@st.cache_data(ttl=3, show_spinner=False)
def _read(uri: str, run_id: str) -> dict[str, Any]:
    return read_run(uri, run_id)


def render() -> None:
    ws = workspace()
    uri = ws.tracking_uri()
    st.title("Runs")
    if _FLASH in st.session_state:
        st.success(st.session_state.pop(_FLASH))
    try:
        runs = _list(uri)
    except TrackingError as exc:
        st.error(f"Cannot read the MLflow store: {exc}")
        return
    if not runs:
        st.info(f"No runs yet in `{uri}` (experiment {EXPERIMENT}): queue one on the Launch page.")
        return
    table = runs_table(runs)
    a, b, c = st.columns(3)
    methods = a.multiselect("Method", sorted(table["method"].dropna().unique()), key="runs_method")
    bases = b.multiselect("Base model", sorted(table["base model"].dropna().unique()), key="runs_base")
    statuses = c.multiselect("Status", sorted(table["status"].dropna().unique()), key="runs_status")
    shown = filter_runs(table, methods, bases, statuses)
    st.dataframe(shown, hide_index=True, column_config={
        "started": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
        "loss": st.column_config.NumberColumn(format="%.4f"),
        "holdout_loss": st.column_config.NumberColumn(format="%.4f")})
    labels = {row.run_id: f"{row.run} · {row.run_id[:8]} · {row.status}" for row in shown.itertuples()}
    wanted = st.query_params.get("run_id")
    newest_finished = default_run(shown)
    default = [wanted] if wanted in labels else ([newest_finished] if newest_finished else [])
    chosen = st.multiselect("Runs to look at (several overlay their curves)", list(labels), default=default,
                            format_func=labels.get, key="runs_chosen")
    if not chosen:
        st.info("Choose one or more runs above.")
        return
    details = {labels[run_id].split(" · ")[0] + f" ({run_id[:6]})": _read(uri, run_id) for run_id in chosen}
    _curves(details)
    _params(details)
    by_id = run_dirs_by_id(ws)
    for tab, (label, run) in zip(st.tabs(list(details)), details.items()):
        with tab:
            run_dir = run_dir_for(ws, run, by_id)
            _run_files(ws, run, run_dir)
            _actions(ws, run, run_dir)


def _curves(details: dict[str, dict[str, Any]]) -> None:
    histories = {label: run["metrics"] for label, run in details.items()}
    columns = st.columns(len(CURVES))
    for column, (metric, title) in zip(columns, CURVES):
        frame = metric_frame(histories, metric)
        with column:
            st.markdown(f"**{title}**")
            if frame.empty:
                st.caption(f"no {metric} logged")
            else:
                st.line_chart(frame, x="step", y="value", color="run", height=260)


def _params(details: dict[str, dict[str, Any]]) -> None:
    st.subheader("Parameters")
    only = st.checkbox("Only parameters that differ", value=len(details) > 1, key="runs_only_diff")
    frame = params_diff({label: own_method_params(run["params"]) for label, run in details.items()},
                        only_differences=only)
    if frame.empty:
        st.caption("The chosen runs have identical parameters." if only else "No parameters logged.")
        return

    def highlight(row: pd.Series) -> list[str]:
        return ["background-color: rgba(255, 193, 7, 0.25)" if row["differs"] else ""] * len(row)

    st.dataframe(frame.style.apply(highlight, axis=1), height=min(600, 40 + 35 * len(frame)))


def _run_files(ws: Workspace, run: dict[str, Any], run_dir: Path | None) -> None:
    artifacts = local_artifact_dir(run.get("artifact_uri"))
    st.caption(f"MLflow run `{run['run_id']}` · status {run['status']} · folder `{run_dir or 'not found'}`")
    steps = preview_steps(RunFolder(run_dir).previews_dir if run_dir else None,
                          artifacts / PREVIEWS_DIR if artifacts else None)  # previews are logged under that name
    if steps:
        step = st.select_slider("Preview at step", options=list(steps), value=list(steps)[-1],
                                key=f"runs_step-{run['run_id']}")
        st.image([str(p) for p in steps[step]], caption=[p.name for p in steps[step]], width=360)
    else:
        st.caption("No preview images (preview.every was 0, or none was rendered yet).")
    files = adapter_files(run_dir) if run_dir else []
    if not files and artifacts and (artifacts / "adapter").is_dir():
        files = sorted((artifacts / "adapter").iterdir())
    if not files:
        st.caption("No exported adapter yet (runs export when they finish; or use the Export page).")
    for path in files:
        if path.is_dir():
            st.download_button(f"Download {path.name}.zip", data=functools.partial(zip_folder, path),
                               file_name=f"{path.name}.zip", mime="application/zip", on_click="ignore",
                               key=f"dl-{run['run_id']}-{path.name}")
        else:
            st.download_button(f"Download {path.name}", data=functools.partial(path.read_bytes),
                               file_name=path.name, mime="application/octet-stream", on_click="ignore",
                               key=f"dl-{run['run_id']}-{path.name}")


def _actions(ws: Workspace, run: dict[str, Any], run_dir: Path | None) -> None:
    """Resume (stopped or failed runs with a checkpoint) or train a finished run further, clone into the recipe
    editor, delete (confirmed)."""
    run_id, name = run["run_id"], run.get("run_name") or run["run_id"][:8]
    st.markdown("**Actions**")
    resume_col, clone_col, delete_col = st.columns(3)
    folder = RunFolder(run_dir) if run_dir else None
    if run["status"] in RESUMABLE and folder is not None and folder.latest_checkpoint() is not None:
        if resume_col.button("Resume this run", key=f"runs_resume-{run_id}",
                             help="Continue from its newest checkpoint (cascade-studio train --resume) as a job"):
            _resume(ws, folder.path)
    elif run["status"] in RESUMABLE:
        resume_col.caption("Cannot resume: it saved no checkpoint before it stopped; start it again instead.")
    elif folder is not None and (latest := folder.latest_checkpoint()) is not None:
        done = checkpoint_step(latest)
        target = resume_col.number_input("Train further, to step", min_value=done + 1, value=2 * done, step=done,
                                         key=f"runs_more_steps-{run_id}")
        if resume_col.button("Train further", key=f"runs_resume-{run_id}",
                             help=f"Continue from its step-{done} checkpoint to the step above (cascade-studio train "
                                  "--resume train.max_steps=N) as a job"):
            _resume(ws, folder.path, max_steps=int(target))
    if folder is not None and folder.recipe_file.is_file() and clone_col.button(
            "Clone into the recipe editor", key=f"runs_clone-{run_id}",
            help="Save this run's recipe as a new recipe and open it on the Recipes page"):
        _clone(ws, folder.path)
    if delete_col.button("Delete this run", key=f"runs_delete-{run_id}"):
        st.session_state[_CONFIRM] = run_id
    if st.session_state.get(_CONFIRM) == run_id:
        where = f"its folder {run_dir} moves to {ws.deleted_runs_dir}/ and " if run_dir else ""
        st.warning(f"Delete run **{name}**? {where}its MLflow run is marked deleted (restorable with `mlflow runs "
                   "restore`).")
        yes, no = st.columns(2)
        if yes.button(f"Yes, delete {name}", key=f"runs_delete_yes-{run_id}", type="primary"):
            _delete(ws, run, run_dir)
        if no.button("Keep it", key=f"runs_delete_no-{run_id}"):
            st.session_state.pop(_CONFIRM, None)
            st.rerun()


def _resume(ws: Workspace, run_dir: Path, max_steps: int | None = None) -> None:
    request = TrainRequest.resuming(ws, run_dir, max_steps)
    job_queue = queue()
    try:
        request.validate(ws)
        job = job_queue.enqueue("train", f"resume {request.run_name}", request.to_args(),
                                run_dir=str(request.run_dir(ws)))
    except RecipeError as exc:
        show_problems(exc.problems, "This run cannot be resumed")
        return
    except (ValueError, PathNotAllowed) as exc:
        st.error(f"Cannot resume: {exc}")
        return
    job_queue.pump()  # start at once when nothing else runs
    st.session_state[_FLASH] = f"Queued {job.label} (job {job.id}); follow it on the Launch page."
    st.rerun()


def _clone(ws: Workspace, run_dir: Path) -> None:
    try:
        path = clone_recipe(ws, run_dir)
    except RecipeError as exc:
        show_problems(exc.problems, "This run's recipe no longer validates, so it was not cloned")
        return
    except (OSError, PathNotAllowed) as exc:
        st.error(f"Not cloned: {exc}")
        return
    st.session_state[RECIPES_PENDING] = f"saved: {path.name}"
    try:
        st.switch_page(PAGES["recipes"])
    except st.errors.StreamlitAPIException:  # this page alone (no navigation): say where the clone is
        st.session_state[_FLASH] = f"Cloned into {path}; open it on the Recipes page."
        st.rerun()


def _delete(ws: Workspace, run: dict[str, Any], run_dir: Path | None) -> None:
    busy = [str(j.run_dir) for j in queue().jobs() if j.status in ACTIVE and j.run_dir]
    try:
        folder = run_dir if run_dir else ws.runs_dir / (run.get("run_name") or run["run_id"])
        moved = delete_run(ws, folder, [run["run_id"]], busy)
    except (ValueError, TrackingError) as exc:
        st.error(f"Not deleted: {exc}")
        return
    st.session_state.pop(_CONFIRM, None)
    st.session_state.pop("runs_chosen", None)  # open on the default run again
    _list.clear()
    st.session_state[_FLASH] = (f"Deleted run {run.get('run_name')}: MLflow marks it deleted" +
                                (f"; its folder is now {moved}" if run_dir else "") + ".")
    st.rerun()
