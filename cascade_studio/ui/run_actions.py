"""What the Runs page does to a run besides showing it: clone its recipe into the recipe editor, delete it.

(Resuming is a training job: ``commands.TrainRequest.resuming``.) No Streamlit, no torch.

Deleting never erases: the run folder is moved aside to ``<workspace>/deleted-runs/<name>-<time>/`` with one
rename, and its MLflow runs are marked deleted (MLflow keeps them; ``mlflow gc`` erases, ``mlflow runs restore``
brings one back). MLflow is changed first and put back if the move fails, so a failure leaves both as they were.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable

from ..config import load_recipe
from ..run_folder import RunFolder
from ..tracking import set_run_deleted
from .paths import is_inside, safe_filename
from .recipe_form import recipe_yaml, save_recipe_text
from .workspace import Workspace

__all__ = ["clone_recipe", "delete_run"]


def clone_recipe(workspace: Workspace, run_dir: Path) -> Path:
    """Save the recipe a run trained with as a new recipe ``<run>-clone[-N].yaml`` in the workspace's recipes.

    Raises ``RecipeError`` when that recipe no longer validates (say its data folder moved), listing why.
    """
    run = RunFolder(run_dir)
    base = safe_filename(f"{run.name}-clone")
    name, n = base, 1
    while (workspace.recipes_dir / f"{name}.yaml").exists():
        n += 1
        name = f"{base}-{n}"
    recipe = load_recipe(run.recipe_file, overrides=[f"name={json.dumps(name)}"])
    return save_recipe_text(workspace.recipes_dir, name, recipe_yaml(recipe))


def delete_run(workspace: Workspace, run_dir: Path, run_ids: Iterable[str], busy: Iterable[str] = ()) -> Path:
    """Mark the MLflow runs ``run_ids`` (and those the folder's events name) deleted and move the folder aside.

    ``busy`` are run folders queued or running jobs write to. Returns where the folder went; raises
    ``ValueError`` saying why nothing was deleted.
    """
    run = RunFolder(run_dir)
    if run.path.parent != workspace.runs_dir or not is_inside(run.path, workspace.runs_dir):
        raise ValueError(f"{run.path} is not a run folder of this workspace ({workspace.runs_dir}); nothing deleted")
    owner = run.owner()
    if owner is not None:
        raise ValueError(run.busy_message(owner))
    if str(run.path) in {str(Path(b)) for b in busy}:
        raise ValueError(f"a queued or running job writes to {run.path}; cancel it on the Launch page first")
    ids = list(dict.fromkeys([*run_ids, *(run.mlflow_run_ids() if run.exists else [])]))
    uri = workspace.tracking_uri()
    marked: list[str] = []
    try:
        for run_id in ids:
            set_run_deleted(uri, run_id)
            marked.append(run_id)
        target = None
        if run.path.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target = workspace.deleted_runs_dir / f"{run.name}-{stamp}"
            n = 1
            while target.exists():
                n += 1
                target = workspace.deleted_runs_dir / f"{run.name}-{stamp}-{n}"
            workspace.deleted_runs_dir.mkdir(parents=True, exist_ok=True)
            os.replace(run.path, target)  # one rename on the workspace's filesystem: all or nothing
    except Exception as exc:
        for run_id in marked:  # put MLflow back as it was
            set_run_deleted(uri, run_id, deleted=False)
        raise ValueError(f"nothing was deleted: {exc}") from exc
    return target if target is not None else run.path
