"""``cascade-studio plan <recipe> [overrides] [--gpu-gb N]``: predicted peak GPU memory of a recipe, part by part,
whether it fits, and the cheapest recipe switches that would make it fit (``trainers/plan.py`` does the work)."""
from __future__ import annotations

import json
import sys
import time


def add_commands(sub) -> None:
    """Register ``plan`` on the ``cascade-studio`` sub-command parser."""
    p = sub.add_parser("plan", help="predict a recipe's peak GPU memory and the cheapest switches that make it fit")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/lora/stage-c-big-style.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.batch_size=2")
    from .trainers.plan import DEFAULT_GPU_GIB

    p.add_argument("--gpu-gb", type=float, default=DEFAULT_GPU_GIB,
                   help="the memory to fit in, GiB: the GPU's (what nvidia-smi shows / 1024; a '12 GB' card has "
                        f"12 GiB), or with --device cpu the RAM to spare; default {DEFAULT_GPU_GIB:g}")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="plan for a CUDA GPU (adds the CUDA context and workspace) or for the CPU's RAM")
    p.add_argument("--json", action="store_true",
                   help="print the plan as one JSON object (bytes per part, peak, budget, fits, switches)")
    p.set_defaults(handler=cmd_plan)


def cmd_plan(args) -> int:
    from .config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, overrides=args.overrides)
    except RecipeError as exc:
        print(f"recipe problems:\n{exc}", file=sys.stderr)
        return 2
    from .trainers.plan import GiB, Setup, format_plan, plan_memory, plan_summary, stage_c_layout, suggest

    start = time.perf_counter()
    setup = Setup.from_recipe(recipe, device=args.device)
    layout = stage_c_layout(setup.stage_c)
    plan = plan_memory(setup, layout)
    budget = int(args.gpu_gb * GiB)
    advice = suggest(setup, budget, layout) if plan.peak > budget else None
    if args.json:
        print(json.dumps(plan_summary(plan, budget, advice)))
        return 0
    print(format_plan(plan, budget, advice, title=recipe.name))
    print(f"(planned in {time.perf_counter() - start:.1f} s on the meta device; activations: an analytic model "
          "calibrated on CPU measurements and checked there to +-25%; not yet measured on a GPU)")
    return 0
