"""Runs page: the workspace's MLflow runs as a filterable table, their loss/lr curves overlaid, parameters side by
side with differences highlighted, preview images by step, and the exported adapters to download."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from ..run_folder import PREVIEWS_DIR, RunFolder
from ..tracking import TrackingError, list_runs, read_run
from .common import workspace
from .runs_data import (adapter_files, filter_runs, local_artifact_dir, metric_frame, params_diff, preview_steps,
                        run_dir_for, run_dirs_by_id, runs_table, zip_folder)
from .workspace import EXPERIMENT, Workspace

CURVES = (("loss", "Training loss"), ("lr", "Learning rate"), ("holdout_loss", "Held-out loss"))


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
    default = [wanted] if wanted in labels else list(labels)[:1]
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
            _run_files(ws, run, run_dir_for(ws, run, by_id))


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
    frame = params_diff({label: run["params"] for label, run in details.items()}, only_differences=only)
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
