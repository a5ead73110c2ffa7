"""``cascade-studio``: argument parsing only; every command hands off to the module that does the work.

Heavy imports (torch, mlflow, streamlit) happen inside the handlers, so ``--help`` and ``validate`` are instant.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .launch import accelerate_command, launch_env  # noqa: F401  (the studio's launch page uses them)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _add_train(sub) -> None:
    from .launch import shipped_configs

    p = sub.add_parser("train", help="train an adapter from a recipe (one process, --processes N, or any size "
                                      "through an accelerate config file)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/lora.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=200")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest good checkpoint")
    p.add_argument("--processes", type=int, default=None,
                   help="data-parallel processes (launched with accelerate; on CPU they use gloo); with "
                        "--accelerate-config it overrides the file's num_processes")
    p.add_argument("--accelerate-config", metavar="FILE|NAME",
                   help="launch through `accelerate launch --config_file FILE`; a name picks a shipped file: "
                        + ", ".join(shipped_configs()))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_train)


def cmd_train(args) -> int:
    from .config import RecipeError, load_recipe
    from .launch import LaunchConfigError, check_accelerate_config, resolve_accelerate_config

    config_file = None
    try:
        if args.accelerate_config:
            config_file = resolve_accelerate_config(args.accelerate_config)
            check_accelerate_config(config_file)
        load_recipe(args.recipe, overrides=args.overrides)  # fail before launching anything
    except LaunchConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RecipeError as exc:
        print(f"recipe problems:\n{exc}", file=sys.stderr)
        return 2
    if args.processes is not None and args.processes < 1:
        print("error: --processes must be 1 or more", file=sys.stderr)
        return 2
    if config_file is not None or (args.processes or 1) > 1:
        cmd = accelerate_command(args.recipe, args.overrides, args.processes, resume=args.resume,
                                 config_file=config_file, no_progress=args.no_progress)
        return subprocess.call(cmd, env=launch_env(args.processes, config_file))
    from .run import main as run_main

    argv = [args.recipe, *args.overrides] + (["--resume"] if args.resume else []) + \
        (["--no-progress"] if args.no_progress else [])
    return run_main(argv)


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="check a recipe and list every problem at once")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--data", action="store_true",
                   help="also scan the recipe's data as a run would (images, captions, every bad file and why); "
                        "trains nothing")
    p.set_defaults(handler=cmd_validate)


def cmd_validate(args) -> int:
    from .config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, overrides=args.overrides)
    except RecipeError as exc:
        print(f"{args.recipe}: {len(exc.problems)} problem(s)\n{exc}", file=sys.stderr)
        return 2
    from .trainers.preflight import check_recipe_weights, needs_weight_check

    if needs_weight_check(recipe):  # imports torch: only for recipes that name weights
        weights = check_recipe_weights(recipe)
        for note in weights.notes:
            print(f"note: {note}")
        if weights.problems:
            print(f"{args.recipe}: {len(weights.problems)} problem(s)\n{RecipeError(weights.problems)}",
                  file=sys.stderr)
            return 2
    print(f"{args.recipe}: OK ({recipe.adapter.method} on preset {recipe.model.preset}, "
          f"{recipe.train.max_steps} steps)")
    if not args.data:
        return 0
    from .adapters import catalog
    from .data import DataSourceError, scan_source  # imports torch: only when asked

    control_column = catalog.control_column(recipe)  # as the run scans: pre-made control images if any
    where = str(recipe.data.path or recipe.data.name)
    if recipe.data.streaming:
        from .data.streaming import probe_stream

        try:
            report, usable = probe_stream(recipe.data, control_column)
        except DataSourceError as exc:
            print(f"data: {exc}", file=sys.stderr)
            return 2
        print(report)
        return 0 if usable else 2
    try:
        scan = scan_source(recipe.data, control_column=control_column)
    except DataSourceError as exc:  # also "no usable image", with every reason
        print(f"data: {exc}", file=sys.stderr)
        return 2
    print(scan.report(where))
    return 0


def _add_export(sub) -> None:
    from .adapters import catalog

    p = sub.add_parser("export", help="export a run's adapter (or a checkpoint's) as a file other tools load")
    p.add_argument("source", help="a run folder (workspace/runs/<name>) or one of its checkpoint folders")
    p.add_argument("--format", choices=catalog.all_formats(), help="default: the method's first format. " + " ".join(
        f"{m.label}: {catalog.format_help(m)}." for m in catalog.methods()))
    p.add_argument("--out", help="output path (default: <run>/export/<name>-<format>[.safetensors])")
    p.set_defaults(handler=cmd_export)


def cmd_export(args) -> int:
    from .export import export_from_run

    path = export_from_run(args.source, args.format, args.out)
    print(f"exported: {path}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the built-in toy cascade: train a LoRA that teaches it a colour "
                                    "it never saw, then write a base-vs-LoRA grid (offline, CPU, a few minutes)")
    p.add_argument("workspace", nargs="?", default="workspace", help="where runs, MLflow and the grid go")
    p.add_argument("--all", action="store_true", help="also the toy ControlNet and IP-Adapter demos")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.chdir(REPO_ROOT)  # recipes name their data relative to the repository
    from .demo import main as demo_main

    return demo_main([args.workspace] + (["--all"] if args.all else []))


def _add_ui(sub) -> None:
    p = sub.add_parser("ui", help="start the Streamlit studio on 127.0.0.1")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--workspace", default="workspace")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="a folder (data, weights) runs started from the studio may also read and write, besides "
                        "the workspace, datasets/ and the Hugging Face cache; repeat for several")
    p.set_defaults(handler=cmd_ui)


def cmd_ui(args) -> int:
    app = Path(__file__).resolve().parent / "ui" / "app.py"
    missing = [d for d in args.allow_path if not Path(d).expanduser().is_dir()]
    if missing:
        print(f"--allow-path needs existing folders; not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    env = dict(os.environ, CASCADE_STUDIO_WORKSPACE=str(Path(args.workspace).resolve()))
    # read by cascade_studio/ui/paths.py (ALLOW_PATHS_ENV) in the studio and in every job runner it starts
    env["CASCADE_STUDIO_ALLOW_PATHS"] = os.pathsep.join(str(Path(d).expanduser().resolve()) for d in args.allow_path)
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "minimal"]
    # recipes name their data relative to the repository root
    return subprocess.call(cmd, env=env, cwd=REPO_ROOT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade-studio",
                                     description="Train and compare adapters (LoRA, ControlNet, IP-Adapter) on a "
                                                 "frozen Stable Cascade Stage C.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_validate(sub)
    _add_export(sub)
    _add_demo(sub)
    _add_ui(sub)
    from . import cli_generate, cli_plan

    cli_generate.add_commands(sub)
    cli_plan.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Known failure modes carry a message that says what to do; no traceback for those.
        if os.environ.get("CASCADE_STUDIO_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
