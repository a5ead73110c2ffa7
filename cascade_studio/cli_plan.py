"""``cascade-studio plan <recipe> [overrides] [--gpu-gb N]``: predicted peak GPU memory of a recipe, part by part,
whether it fits, and the cheapest recipe switches that would make it fit (``trainers/plan.py`` does the work)."""
from __future__ import annotations

import sys
import time


def add_commands(sub) -> None:
    """Register ``plan`` on the ``cascade-studio`` sub-command parser."""
    p = sub.add_parser("plan", help="predict a recipe's peak GPU memory and the cheapest switches that make it fit")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/lora/stage-c-big-style.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.batch_size=2")
    p.add_argument("--gpu-gb", type=float, default=24.0,
                   help="GPU memory in GiB (what nvidia-smi shows / 1024; a '12 GB' card has 12 GiB); default 24")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="plan for a CUDA GPU (adds the CUDA context and workspace) or for the CPU's RAM")
    p.set_defaults(handler=cmd_plan)


def cmd_plan(args) -> int:
    from .config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, overrides=args.overrides)
    except RecipeError as exc:
        print(f"recipe problems:\n{exc}", file=sys.stderr)
        return 2
    from .trainers.plan import GiB, Setup, format_plan, plan_memory, stage_c_layout, suggest

    start = time.perf_counter()
    setup = Setup.from_recipe(recipe, device=args.device)
    layout = stage_c_layout(setup.stage_c)
    plan = plan_memory(setup, layout)
    budget = int(args.gpu_gb * GiB)
    advice = suggest(setup, budget, layout) if plan.peak > budget else None
    print(format_plan(plan, budget, advice, title=recipe.name))
    print(f"(planned in {time.perf_counter() - start:.1f} s on the meta device; activations: an analytic model "
          "calibrated on CPU measurements and checked there to +-25%; not yet measured on a GPU)")
    return 0
