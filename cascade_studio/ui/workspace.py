"""Where the studio keeps things: one workspace folder (runs, jobs, recipes, mlflow.db) plus the repository's
shipped recipes and datasets.

Layout under the workspace (the same one ``run.py`` writes, plus the studio's own folders)::

    recipes/<name>.yaml      recipes saved from the studio
    jobs/<id>.json|.log      the job queue (see jobs.py)
    runs/<name>/             training runs (their layout: ``cascade_studio/run_folder.py``)
    compare/<date-time>/     outputs of ``cascade-studio compare`` (grid.png, cells/, manifest.json)
    deleted-runs/<name>-<time>/  run folders deleted on the Runs page (moved aside, not erased)
    compare-settings/<name>.json   comparison settings saved on the Compare page
    adapters/<name>.safetensors    adapter files uploaded on the Compare page
    mlflow.db, mlartifacts/  MLflow's SQLite store and artifacts

No torch, no Streamlit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..run_folder import RunFolder
from .paths import PathPolicy, allowed_paths_from_env, confine, hf_hub_cache

__all__ = ["REPO_ROOT", "WORKSPACE_ENV", "Workspace", "RecipeEntry", "ensure_repo_cwd"]

# cascade_studio/ui/workspace.py -> the repository root (the editable install's checkout).
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKSPACE_ENV = "CASCADE_STUDIO_WORKSPACE"
EXPERIMENT = "cascade-studio"


def ensure_repo_cwd() -> None:
    """Run from the repository root, as recipes expect: their relative paths (``datasets/tiny-shapes``) resolve
    against the current directory both when validating here and when the job runs (jobs start there too)."""
    if Path.cwd().resolve() != REPO_ROOT:
        os.chdir(REPO_ROOT)


@dataclass(frozen=True)
class RecipeEntry:
    """A recipe file the studio offers: ``label`` is what the picker shows, ``shipped`` means read-only."""

    label: str
    path: Path
    shipped: bool


@dataclass(frozen=True)
class Workspace:
    """The studio's folders. Create with :meth:`from_env` (the server) or directly (tests)."""

    root: Path
    repo_root: Path = REPO_ROOT
    allowed: tuple[Path, ...] = ()  # the --allow-path folders (data, weights) besides the workspace

    @classmethod
    def from_env(cls, default: str = "workspace", root: Optional[Path] = None) -> "Workspace":
        """The workspace named by ``$CASCADE_STUDIO_WORKSPACE`` (or ``root``) with the ``--allow-path`` folders of
        ``$CASCADE_STUDIO_ALLOW_PATHS`` (both set by ``cascade-studio ui``, and inherited by its job runners)."""
        root = root or Path(os.environ.get(WORKSPACE_ENV) or (REPO_ROOT / default))
        return cls(Path(root).resolve(), allowed=allowed_paths_from_env())

    # ------------------------------------------------------------------------------------------------ folders
    @property
    def recipes_dir(self) -> Path:
        return self.root / "recipes"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def runs_dir(self) -> Path:
        return RunFolder.runs_dir(self.root)

    @property
    def comparisons_dir(self) -> Path:
        # The same folder `cascade-studio compare` writes to by default, so CLI comparisons show up here too.
        return self.root / "compare"

    @property
    def deleted_runs_dir(self) -> Path:
        """Where the Runs page moves a deleted run's folder (outside runs/, so no page lists it again)."""
        return self.root / "deleted-runs"

    @property
    def comparison_settings_dir(self) -> Path:
        return self.root / "compare-settings"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def shipped_recipes_dir(self) -> Path:
        return self.repo_root / "recipes"

    @property
    def datasets_dir(self) -> Path:
        return self.repo_root / "datasets"

    def tracking_uri(self) -> str:
        """The MLflow store runs launched from here log to (``$MLFLOW_TRACKING_URI`` wins, as in recipes)."""
        return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + (self.root / "mlflow.db").as_posix()

    # ---------------------------------------------------------------------------------------- confinement
    def policy(self) -> PathPolicy:
        """The studio's one path policy (``ui/paths.py``): workspace, sample datasets, --allow-path folders and the
        Hugging Face cache; relative paths start at the repository root, where jobs run."""
        return PathPolicy(workspace=self.root, base=self.repo_root, datasets=self.datasets_dir,
                          allowed=self.allowed, hub_cache=hf_hub_cache())

    def confine_data(self, text: str) -> Path:
        """A dataset path typed by the user, checked by :meth:`policy` (relative = from the repository root)."""
        return self.policy().check(text)

    def confine_workspace(self, text: str | os.PathLike[str]) -> Path:
        """A path that must lie inside the workspace (adapter files, run folders); relative = from the workspace."""
        return confine(text, [self.root], base=self.root)

    def confine_recipe(self, text: str | os.PathLike[str]) -> Path:
        """A recipe file: a shipped one under recipes/ or a saved one under the workspace's recipes/."""
        return confine(text, [self.shipped_recipes_dir, self.recipes_dir], base=self.repo_root)

    # --------------------------------------------------------------------------------------------- recipes
    def list_recipes(self) -> list[RecipeEntry]:
        """Shipped recipes by group (their folder: the presets built in code first, tiny then toy, so they run on a
        CPU; then the others by name; a group's LoRA first, so the tiny LoRA is at the top), then the workspace's
        saved ones."""
        from ..models.presets import PRESETS

        def order(path: Path) -> tuple:
            group = path.relative_to(self.shipped_recipes_dir).parent.as_posix()
            built_in = group in PRESETS and PRESETS[group].built_in
            return (not built_in, group != "tiny", group, path.name != "lora.yaml", path.name)

        shipped = sorted(self.shipped_recipes_dir.rglob("*.yaml"), key=order)
        entries = [RecipeEntry(f"shipped: {p.relative_to(self.shipped_recipes_dir)}", p, True) for p in shipped]
        if self.recipes_dir.is_dir():
            entries += [RecipeEntry(f"saved: {p.name}", p, False) for p in sorted(self.recipes_dir.glob("*.yaml"))]
        return entries

    def recipe_label(self, path: Path) -> Optional[str]:
        """The picker label of ``path``, if the studio lists it."""
        for entry in self.list_recipes():
            if entry.path == path:
                return entry.label
        return None

    def run_dirs(self) -> list[Path]:
        """Run folders (newest first by modification time)."""
        return [run.path for run in RunFolder.all_in(self.root)]
