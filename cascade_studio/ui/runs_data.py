"""Data behind the Runs, Compare and Export pages: MLflow runs as tables, metric curves, parameter differences,
previews and adapter files. Pure functions over what :mod:`cascade_studio.tracking` and the run folders hold;
no Streamlit, no torch.
"""
from __future__ import annotations

import io
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import unquote, urlparse

import pandas as pd
import yaml

from ..adapters import catalog
from ..run_folder import RunFolder, preview_files
from .workspace import Workspace

__all__ = ["runs_table", "filter_runs", "metric_frame", "params_diff", "run_dirs_by_id", "run_dir_for",
           "preview_steps", "local_artifact_dir", "adapter_files", "zip_folder", "checkpoint_steps", "checkpoint_dirs",
           "run_method", "run_preset", "run_prompts", "default_run", "own_method_params", "RESUMABLE"]

# MLflow statuses of runs that stopped before their end (cancelled = KILLED): the Runs page offers to resume them.
RESUMABLE = ("FAILED", "KILLED")

def runs_table(runs: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per MLflow run (``tracking.list_runs`` output), newest first."""
    rows = []
    for run in runs:
        tags, metrics = run.get("tags", {}), run.get("metrics", {})
        start = run.get("start_time")
        rows.append({
            "run": run.get("run_name") or run["run_id"][:8],
            "status": run.get("status"),
            "method": tags.get("method", run.get("params", {}).get("adapter.method")),
            "base model": tags.get("base_model", tags.get("preset")),
            "preset": tags.get("preset", run.get("params", {}).get("model.preset")),
            "started": datetime.fromtimestamp(start / 1000) if start else None,
            "loss": metrics.get("loss"),
            "holdout_loss": metrics.get("holdout_loss"),
            "run_id": run["run_id"],
        })
    columns = ["run", "status", "method", "base model", "preset", "started", "loss", "holdout_loss", "run_id"]
    return pd.DataFrame(rows, columns=columns)


def filter_runs(table: pd.DataFrame, methods: Iterable[str] = (), bases: Iterable[str] = (),
                statuses: Iterable[str] = ()) -> pd.DataFrame:
    """Rows matching every non-empty filter (an empty filter keeps everything)."""
    keep = pd.Series(True, index=table.index)
    for column, wanted in (("method", methods), ("base model", bases), ("status", statuses)):
        wanted = list(wanted)
        if wanted:
            keep &= table[column].isin(wanted)
    return table[keep]


def metric_frame(histories: dict[str, dict[str, list[dict[str, Any]]]], metric: str) -> pd.DataFrame:
    """Long-form ``run, step, value`` of one metric for several runs (``read_run(...)["metrics"]`` each), ready
    for an overlaid line chart."""
    rows = [{"run": label, "step": int(point["step"]), "value": float(point["value"])}
            for label, metrics in histories.items() for point in metrics.get(metric, [])]
    return pd.DataFrame(rows, columns=["run", "step", "value"])


def default_run(table: pd.DataFrame) -> Optional[str]:
    """The run the Runs page opens on: the newest FINISHED one (``table`` is newest first), else the newest."""
    finished = table[table["status"] == "FINISHED"]
    chosen = finished if not finished.empty else table
    return None if chosen.empty else str(chosen["run_id"].iloc[0])


def own_method_params(params: dict[str, str]) -> dict[str, str]:
    """A run's parameters without the adapter sections of the methods it did not use (every method's section
    is in every recipe, so every run logs them all; the catalog names the methods)."""
    method = params.get("adapter.method")
    others = tuple(f"adapter.{m.name}." for m in catalog.methods() if m.name != method)
    return {key: value for key, value in params.items() if not key.startswith(others)}


def params_diff(params: dict[str, dict[str, str]], only_differences: bool = False) -> pd.DataFrame:
    """Parameters side by side (one column per run) with a ``differs`` column; a missing value shows as ''."""
    labels = list(params)
    keys = sorted({k for values in params.values() for k in values})
    rows = []
    for key in keys:
        values = [params[label].get(key, "") for label in labels]
        rows.append({"parameter": key, **dict(zip(labels, values)), "differs": len(set(values)) > 1})
    frame = pd.DataFrame(rows, columns=["parameter", *labels, "differs"])
    if only_differences:
        frame = frame[frame["differs"]]
    return frame.set_index("parameter")


def run_dirs_by_id(workspace: Workspace) -> dict[str, Path]:
    """MLflow run id -> run folder, from each folder's ``started`` events (a resumed folder keeps its id)."""
    found: dict[str, Path] = {}
    for run_dir in workspace.run_dirs():
        for run_id in RunFolder(run_dir).mlflow_run_ids():
            found[run_id] = run_dir
    return found


def run_dir_for(workspace: Workspace, run: dict[str, Any], by_id: Optional[dict[str, Path]] = None) -> \
        Optional[Path]:
    """The run folder of an MLflow run: by its id in events.jsonl, else ``runs/<run name>`` if that exists."""
    by_id = run_dirs_by_id(workspace) if by_id is None else by_id
    if run.get("run_id") in by_id:
        return by_id[run["run_id"]]
    name = run.get("run_name")
    if name and (workspace.runs_dir / name).is_dir() and "/" not in name:
        return workspace.runs_dir / name
    return None


def local_artifact_dir(artifact_uri: Optional[str]) -> Optional[Path]:
    """A local folder for a ``file://`` (or plain path) artifact URI; None for remote stores."""
    if not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path if parsed.scheme else artifact_uri))
        return path if path.is_dir() else None
    return None


def preview_steps(*folders: Optional[Path]) -> dict[int, list[Path]]:
    """Preview images by training step from the first folder that has any (a run's ``previews/`` or its MLflow
    artifact copy)."""
    for folder in folders:
        by_step = preview_files(folder)
        if by_step:
            return by_step
    return {}


def adapter_files(run_dir: Path) -> list[Path]:
    """Exported adapters of a run: ``export/*.safetensors`` files and PEFT folders."""
    return RunFolder(run_dir).exported_adapters()


def checkpoint_dirs(run_dir: Path) -> dict[int, Path]:
    """Complete checkpoints of a run by step, oldest first (the rule is ``run_folder.complete_checkpoints``)."""
    return RunFolder(run_dir).checkpoints()


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the run's complete checkpoints, oldest first."""
    return list(checkpoint_dirs(run_dir))


def _run_recipe(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(RunFolder(run_dir).recipe_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def run_method(run_dir: Path) -> Optional[str]:
    """The adapter method of a run, from the recipe it saved."""
    return (_run_recipe(run_dir).get("adapter") or {}).get("method")


def run_preset(run_dir: Path) -> Optional[str]:
    """The model preset of a run, from the recipe it saved."""
    return (_run_recipe(run_dir).get("model") or {}).get("preset")


def run_prompts(run_dir: Path) -> list[str]:
    """The preview prompts a run was trained with (a sensible first comparison)."""
    prompts = (_run_recipe(run_dir).get("preview") or {}).get("prompts") or []
    return [str(p) for p in prompts if str(p).strip()]


def zip_folder(folder: Path) -> bytes:
    """A folder (e.g. a PEFT export) as zip bytes for a download button."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, Path(folder.name) / path.relative_to(folder))
    return buffer.getvalue()
