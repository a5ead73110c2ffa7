"""The only commands the studio runs, built as argument lists from validated choices (never a shell string).

- train: ``accelerate launch ... -m cascade_studio.train <recipe> <overrides>`` (``cli.accelerate_command``),
  for a recipe that validates with the studio's overrides (its workspace and run name); with ``--resume`` for a
  run folder of the workspace that has a checkpoint, with the ``recipe.yaml`` that run saved;
- compare: ``python -m cascade_studio.cli compare --columns ... --prompt=... --seeds ... --out ...``;
- export: ``python -m cascade_studio.cli export <run or checkpoint> --format F --out FILE``;
- plan: ``python -m cascade_studio.cli plan <recipe> <overrides> --gpu-gb N --json`` (the Launch page's memory
  estimate: the planner builds Stage C on the meta device, which needs torch, so it runs in a child process).

Every path in them is confined to the workspace (or recipes/ for recipe files; an adapter file of a comparison
to the folders the path policy allows), and every path setting of a
launched recipe, from its file or an override, must pass the studio's path policy (``ui/paths.py``) both when
the job is queued and when the runner starts it. Prompts are passed as
``--prompt=<text>`` so a prompt that starts with ``-`` is still a prompt, not an option.
"""
from __future__ import annotations

import copy
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..adapters import catalog
from ..config import Problem, RecipeError, load_recipe, parse_override
from ..diffusion.samplers import sampler_names
from ..models.presets import PRESETS
from ..run_folder import RunFolder
from .paths import NAME_RULE, PathNotAllowed, safe_filename
from .workspace import Workspace

__all__ = ["TrainRequest", "CompareRequest", "Column", "export_argv", "default_run_name", "train_command",
           "compare_argv", "CLI", "new_comparison_dir", "parse_seeds", "plan_argv"]

CLI = [sys.executable, "-m", "cascade_studio.cli"]
# The studio sets these itself; a user override of them would send the run somewhere the studio does not look.
_RESERVED_OVERRIDES = ("workspace", "name")


def default_run_name(workspace: Workspace, recipe_name: str, taken: Sequence[str] = ()) -> str:
    """``recipe_name`` if no run folder (or active job) has it yet, else ``recipe_name-2``, ``-3``, ..."""
    base = safe_filename(recipe_name)
    name, n = base, 1
    while (workspace.runs_dir / name).exists() or name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


@dataclass(frozen=True)
class TrainRequest:
    """A training job: a recipe file, the run's name, extra dotted overrides and the process count."""

    recipe: str
    run_name: str
    overrides: tuple[str, ...] = ()
    processes: int = 1
    resume: bool = False  # continue the run's folder from its newest sound checkpoint (``train --resume``)
    launch: str = ""  # a shipped accelerate config by name (``train --accelerate-config``); "" = plain launch

    @classmethod
    def resuming(cls, workspace: Workspace, run_dir: Path, max_steps: int | None = None) -> "TrainRequest":
        """Resume the run in ``run_dir`` with the recipe it saved (so nothing the adapter learns from changes);
        ``max_steps`` trains a finished run further, to that step."""
        run = RunFolder(run_dir)
        overrides = (f"train.max_steps={int(max_steps)}",) if max_steps is not None else ()
        return cls(str(run.recipe_file), run.name, overrides, resume=True)

    def all_overrides(self, workspace: Workspace) -> list[str]:
        # JSON strings are valid YAML scalars: quoting keeps a name like "1e3" or "true" a string.
        return [*self.overrides, f"workspace={json.dumps(str(workspace.root))}",
                f"name={json.dumps(self.run_name)}"]

    def run_dir(self, workspace: Workspace) -> Path:
        return RunFolder.in_workspace(workspace.root, self.run_name).path

    def validate(self, workspace: Workspace) -> None:
        """Raise ``RecipeError`` (every recipe problem) or ``ValueError`` (what to change) unless launchable."""
        if self.resume:
            self._validate_resume(workspace)
        else:
            workspace.confine_recipe(self.recipe)
        if safe_filename(self.run_name) != self.run_name:
            raise ValueError(f"The run name `{self.run_name}` may only use {NAME_RULE}; e.g. "
                             f"`{safe_filename(self.run_name)}`")
        if not 1 <= int(self.processes) <= 8:
            raise ValueError("processes must be between 1 and 8")
        self.launch_config()
        for text in self.overrides:
            key, _ = parse_override(text)  # ValueError says how an override is written
            if key in _RESERVED_OVERRIDES:
                raise ValueError(f"{key} is set by the studio (workspace and run name); remove that override")
        run = RunFolder(self.run_dir(workspace))
        owner = run.owner()  # read-only: a run started from the command line may be training in it right now
        if owner is not None:
            raise ValueError(run.busy_message(owner))
        if run.checkpoints() and not self.resume:
            raise ValueError(f"a run named {self.run_name!r} already has checkpoints in {run.path}; choose another "
                             "run name")
        problems = self.path_problems(workspace)
        try:
            load_recipe(self.recipe, overrides=self.all_overrides(workspace))
        except RecipeError as exc:
            raise RecipeError(problems + exc.problems, exc.source) from None
        if problems:
            raise RecipeError(problems, Path(self.recipe).name)

    def _validate_resume(self, workspace: Workspace) -> None:
        """A resume continues a run folder of this workspace from a checkpoint, with the recipe it saved."""
        run = RunFolder(self.run_dir(workspace))
        if not run.path.is_dir():
            raise ValueError(f"there is no run {self.run_name!r} in {workspace.runs_dir} to resume")
        if Path(self.recipe).resolve() != run.recipe_file.resolve() or not run.recipe_file.is_file():
            raise ValueError(f"a resume uses the recipe the run saved ({run.recipe_file}); it is missing, so "
                             "start a new run instead")
        if run.latest_checkpoint() is None:
            raise ValueError(f"run {self.run_name!r} has no complete checkpoint to resume from (it stopped before "
                             "its first one); start it again as a new run")

    def path_problems(self, workspace: Workspace) -> list[Problem]:
        """Every path setting, from the recipe file or an override, that the studio's path policy refuses.

        Checked on the parsed file with the overrides applied (not on the validated recipe), so a refused path
        is reported even when the recipe has other problems too."""
        try:
            data = yaml.safe_load(Path(self.recipe).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None  # load_recipe reports why the file cannot be read
        data = copy.deepcopy(data) if isinstance(data, dict) else {}
        for text in self.all_overrides(workspace):
            try:
                key, value = parse_override(text)
            except ValueError:
                continue  # reported by load_recipe
            *sections, leaf = key.split(".")
            target = data
            for part in sections:
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
            target[leaf] = value
        return workspace.policy().recipe_problems(data)

    def launch_config(self) -> Path | None:
        """The shipped accelerate config this request launches with (checked), or None for the plain launch;
        ``ValueError`` for an unknown name or a file that needs editing first (multi-node)."""
        if not self.launch:
            return None
        from ..launch import LaunchConfigError, check_accelerate_config, shipped_configs

        shipped = shipped_configs()
        if self.launch not in shipped:
            raise ValueError(f"unknown launch {self.launch!r}; the studio launches with one of: "
                             f"{', '.join(shipped)}")
        try:
            config = check_accelerate_config(shipped[self.launch])
        except LaunchConfigError as exc:
            raise ValueError(str(exc)) from None
        if config.get("num_machines", 1) > 1:
            raise ValueError(f"{self.launch}.yaml starts processes on {config['num_machines']} machines, which the "
                             "studio on this one cannot do: copy it, set num_machines, machine_rank and "
                             "main_process_ip, and run `cascade-studio train --accelerate-config FILE RECIPE` on "
                             "every machine")
        return shipped[self.launch]

    def to_args(self) -> dict[str, Any]:
        args = {"recipe": self.recipe, "run_name": self.run_name, "overrides": list(self.overrides),
                "processes": int(self.processes)}
        if self.launch:
            args["launch"] = self.launch
        return {**args, "resume": True} if self.resume else args

    def parsed_overrides(self) -> list[tuple[str, Any]]:
        """(dotted key, value as the recipe will read it) of every override; raises ``ValueError`` for a bad one."""
        return [parse_override(text) for text in self.overrides]

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "TrainRequest":
        return cls(str(args["recipe"]), str(args["run_name"]), tuple(args.get("overrides", ())),
                   int(args.get("processes", 1)), bool(args.get("resume", False)), str(args.get("launch", "")))


def train_command(request: TrainRequest, workspace: Workspace) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of a validated train request. Imports the CLI's helpers, which look for CUDA through torch:
    only the job runner calls this, never the studio's own process."""
    from ..cli import accelerate_command, launch_env

    request.validate(workspace)
    config = request.launch_config()
    processes = request.processes if config is None or request.processes > 1 else None  # None: the file's count
    argv = accelerate_command(request.recipe, request.all_overrides(workspace), processes,
                              resume=request.resume, config_file=config)
    env = launch_env(processes, config)
    return argv + ["--no-progress"], env  # progress bars would fill the log; the studio reads events instead


def plan_argv(request: TrainRequest, workspace: Workspace, gpu_gib: float) -> list[str]:
    """``cascade-studio plan --json`` for a train request: its recipe with its overrides, on a ``gpu_gib`` card."""
    recipe = workspace.confine_recipe(request.recipe)
    return [*CLI, "plan", str(recipe), *request.overrides, "--gpu-gb", f"{float(gpu_gib):g}", "--json"]


# ------------------------------------------------------------------------------------------------ compare
@dataclass(frozen=True)
class Column:
    """One column of a comparison: ``base``, a run's adapter, a checkpoint, or an adapter file with a weight."""

    kind: str  # base | run | ckpt | file
    target: str = ""
    step: Optional[int] = None
    weight: Optional[float] = None
    sampler: Optional[str] = None  # this column's own Stage C sampler / steps (None = the grid's)
    sampling_steps: Optional[int] = None

    def spec(self) -> str:
        """The column as ``cascade-studio compare --columns`` reads it (``SPEC_SYNTAX`` in inference/adapters,
        its own sampling after ``::``, ``COLUMN_SYNTAX`` in inference/compare)."""
        weight = f"@{self.weight:g}" if self.weight is not None else ""
        if self.kind == "base":
            text = "base"
        elif self.kind == "run":
            text = f"run:{self.target}{weight}"
        elif self.kind == "ckpt":
            text = f"ckpt:{self.target}@{self.step if self.step is not None else 'latest'}{weight}"
        else:
            text = f"{self.target}{weight}"
        own = ([f"sampler={self.sampler}"] if self.sampler else []) + \
            ([f"steps={int(self.sampling_steps)}"] if self.sampling_steps else [])
        return f"{text}::{','.join(own)}" if own else text


@dataclass(frozen=True)
class CompareRequest:
    """A comparison grid: columns x (prompt, seed) rows, on one base model."""

    columns: tuple[Column, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    preset: str = "tiny"
    decoder: str = "previewer"
    steps: Optional[int] = None
    mlflow: bool = False
    out: str = ""

    def problems(self, workspace: Workspace) -> list[str]:
        """Everything wrong at once (empty = runnable), each saying what to change."""
        found = []
        if len(self.columns) < 1:
            found.append("choose at least one column (base, a run, a checkpoint or an adapter file)")
        for column in self.columns:
            if column.kind not in ("base", "run", "ckpt", "file"):
                found.append(f"unknown column kind {column.kind!r}")
            elif column.kind != "base":
                try:  # an adapter file may come from any folder the path policy allows; runs live in the workspace
                    path = (workspace.policy().check(column.target) if column.kind == "file"
                            else workspace.confine_workspace(column.target))
                except PathNotAllowed as exc:
                    found.append(str(exc))
                    continue
                if not path.exists():
                    found.append(f"{column.target} does not exist; pick a run, checkpoint or adapter file again")
            if column.weight is not None and not -10 <= column.weight <= 10:
                found.append(f"weight {column.weight:g} of {column.spec()} is out of range; use -10..10")
            if column.sampler is not None and column.sampler not in sampler_names():
                found.append(f"unknown sampler {column.sampler!r}; choose one of {', '.join(sampler_names())}")
            if column.sampling_steps is not None and not 1 <= column.sampling_steps <= 200:
                found.append(f"steps {column.sampling_steps} of {column.spec()} must be between 1 and 200")
        if not self.prompts:
            found.append("write at least one prompt")
        if not self.seeds:
            found.append("give at least one seed, e.g. 0")
        if any(s < 0 for s in self.seeds):
            found.append("seeds are whole numbers >= 0")
        if self.steps is not None and not 1 <= self.steps <= 200:
            found.append("Stage C steps must be between 1 and 200 (20 is the published setting)")
        if self.preset not in PRESETS:
            found.append(f"unknown preset {self.preset!r}")
        if self.decoder not in ("previewer", "cascade"):
            found.append(f"unknown decoder {self.decoder!r}")
        try:
            workspace.confine_workspace(self.out)
        except PathNotAllowed as exc:
            found.append(f"output folder: {exc}")
        return found

    def to_args(self) -> dict[str, Any]:
        return {**asdict(self), "columns": [asdict(c) for c in self.columns]}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "CompareRequest":
        return cls(columns=tuple(Column(**c) for c in args["columns"]), prompts=tuple(args["prompts"]),
                   seeds=tuple(int(s) for s in args["seeds"]), preset=args.get("preset", "tiny"),
                   decoder=args.get("decoder", "previewer"), steps=args.get("steps"),
                   mlflow=bool(args.get("mlflow")), out=str(args["out"]))


def compare_argv(request: CompareRequest, workspace: Workspace) -> list[str]:
    """The ``cascade-studio compare`` command line; raises ``ValueError`` listing the problems if not runnable."""
    problems = request.problems(workspace)
    if problems:
        raise ValueError("; ".join(problems))
    argv = [*CLI, "compare", "--columns", *[c.spec() for c in request.columns]]
    argv += [f"--prompt={p}" for p in request.prompts]
    argv += ["--seeds", *[str(int(s)) for s in request.seeds], "--out", request.out, "--preset", request.preset,
             "--decoder", request.decoder, "--workspace", str(workspace.root),
             "--tracking-uri", workspace.tracking_uri(), "--no-progress"]
    if request.steps is not None:
        argv += ["--steps", str(int(request.steps))]
    if request.mlflow:
        argv.append("--mlflow")
    return argv


def new_comparison_dir(workspace: Workspace, now: Optional[float] = None, taken: Sequence[str] = ()) -> Path:
    """``<workspace>/compare/<date-time>`` not yet on disk nor ``taken`` by a queued job (not created here)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    path, n = workspace.comparisons_dir / stamp, 1
    while path.exists() or str(path) in taken:
        n += 1
        path = workspace.comparisons_dir / f"{stamp}-{n}"
    return path


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0, 1 2"`` -> (0, 1, 2); raises ``ValueError`` with what to write."""
    items = [t for t in re.split(r"[\s,]+", text.strip()) if t]
    try:
        return tuple(int(t) for t in items)
    except ValueError:
        raise ValueError(f"seeds are whole numbers separated by spaces or commas, e.g. 0 1; got {text!r}") from None


# ------------------------------------------------------------------------------------------------- export
def export_argv(workspace: Workspace, source: str | Path, fmt: str, out: str | Path) -> list[str]:
    """The ``cascade-studio export`` command line for a run or checkpoint folder inside the workspace."""
    source_path = workspace.confine_workspace(source)
    out_path = workspace.confine_workspace(out)
    if fmt not in catalog.all_formats():
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(catalog.all_formats())}")
    return [*CLI, "export", str(source_path), "--format", fmt, "--out", str(out_path)]
