"""The memory planner (``cascade-studio plan``) on every shipped recipe, and its error against measured peaks
for every method (issue 20, item 6).

Two tables, written to the ``plan`` section of benchmarks/RESULTS.md:

* every shipped recipe as `cascade-studio plan` sees it (published recipes at their published size on a CUDA
  device, tiny/toy ones on the CPU): predicted peak, and whether it fits 24/16/12 GB;
* predicted against measured peak tensor bytes of one real training step (forward, backward, optimizer step) on
  the CPU, for a LoRA at three widths and for each other method, in fp32 and bf16 and each checkpointing mode:
  the cases ``tests/test_plan.py`` holds to +-25% (``cascade_studio.trainers.plan_check``).

    .venv/bin/python benchmarks/bench_plan.py
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

MiB = 2 ** 20
BUDGETS_GB = (24, 16, 12)


def shipped_recipes() -> list[Path]:
    return sorted((REPO / "recipes").glob("*/*.yaml"))


def plan_recipes() -> list[dict]:
    from cascade_studio.adapters import catalog
    from cascade_studio.config import load_recipe
    from cascade_studio.trainers.plan import GiB, Setup, plan_memory, stage_c_layout, suggest

    rows = []
    for path in shipped_recipes():
        recipe = load_recipe(path)
        published = recipe.model.preset not in ("tiny", "toy")
        setup = Setup.from_recipe(recipe, device="cuda" if published else "cpu")
        layout = stage_c_layout(setup.stage_c)
        plan = plan_memory(setup, layout)
        fits = [gb for gb in BUDGETS_GB if plan.peak <= gb * GiB]
        smallest = min(BUDGETS_GB)
        advice = suggest(setup, int(smallest * GiB), layout) if plan.peak > smallest * GiB else None
        rows.append({"recipe": str(path.relative_to(REPO / "recipes")), "method": catalog.recipe_method(recipe).label,
                     "preset": recipe.model.preset, "device": setup.device, "peak_gib": plan.peak / GiB,
                     "fits": fits, "advice": advice})
    return rows


def check_cases() -> list[dict]:
    from cascade_studio.trainers.plan_check import LORA_CASES, METHOD_CASES, check_plan, lora_case_setup, \
        method_case_setup

    rows = []
    for kind, cases, setup_of in (("lora", LORA_CASES, lora_case_setup), ("method", METHOD_CASES, method_case_setup)):
        for case in cases:
            setup = setup_of(*case)
            check = check_plan(setup)
            name = f"LoRA ({case[0]} Stage C)" if kind == "lora" else case[0]
            rows.append({"case": name, "method": setup.method, "dtype": case[1], "autocast": case[2],
                         "checkpointing": case[3], "predicted": check.predicted_peak, "measured": check.measured_peak,
                         "total": check.total_ratio, "rise": check.activation_ratio,
                         "resident_exact": check.predicted_resident == check.resident})
    return rows


def render(recipes: list[dict], checks: list[dict], about: str) -> str:
    lines = ["## Memory planner: every shipped recipe, and its error against measured peaks (bench_plan.py)", "",
             about, "",
             "Every shipped recipe, planned as `cascade-studio plan RECIPE` plans it (published recipes on a CUDA "
             "device at their published size, workspace included; tiny and toy ones on the CPU):", "",
             "| recipe | method | preset | device | predicted peak (GiB) | fits |", "|---|---|---|---|---|---|"]
    for r in recipes:
        fits = ", ".join(f"{gb} GB" for gb in r["fits"]) or f"none of {', '.join(map(str, BUDGETS_GB))} GB"
        advice = r["advice"]
        if advice is not None and advice.applied:
            fits += f"; {min(BUDGETS_GB)} GB {'with' if advice.fits else 'not even with'} " + \
                ", ".join(f"`{override}`" for override, _, _ in advice.applied)
        lines.append(f"| {r['recipe']} | {r['method']} | {r['preset']} | {r['device']} | {r['peak_gib']:.2f} | {fits} |")
    lines += ["", "Predicted against measured: one real training step on the CPU (the method's own adapter and "
              "objective, batch 2, 8x8 latents, AdamW), peak = resident tensors + the live-tensor rise during the "
              "step; ratio = predicted / measured (1.00 is exact; the tests hold every case to 0.75-1.25). Resident "
              "bytes (weights, adapter, optimizer state) are counted exactly in every case.", "",
              "| case | weights | autocast | checkpointing | predicted (MiB) | measured (MiB) | peak ratio | "
              "activation+gradient ratio |", "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['case']} | {c['dtype']} | {c['autocast']} | {c['checkpointing']} | "
                     f"{c['predicted'] / MiB:.1f} | {c['measured'] / MiB:.1f} | {c['total']:.2f} | {c['rise']:.2f} |")
    lines += ["", "Error per method (worst case over the rows above):", "",
              "| method | cases | worst peak error | worst activation+gradient error | resident exact |",
              "|---|---|---|---|---|"]
    for method in dict.fromkeys(c["method"] for c in checks):
        mine = [c for c in checks if c["method"] == method]
        worst = max(abs(c["total"] - 1) for c in mine)
        worst_rise = max(abs(c["rise"] - 1) for c in mine)
        exact = "yes" if all(c["resident_exact"] for c in mine) else "NO"
        lines.append(f"| {method} | {len(mine)} | {worst:.0%} | {worst_rise:.0%} | {exact} |")
    lines += ["", "Not measured here: a GPU's own peak (allocator blocks, CUDA context, cuDNN/cuBLAS workspaces). "
              "`benchmarks/gpu_check.py` prints planned against measured on CUDA where there is one."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results file (default: benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    load = os.getloadavg()[0]
    recipes = plan_recipes()
    checks = check_cases()
    about = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), load average at start {load:.1f}, "
             f"{(time.perf_counter() - start) / 60:.1f} min. Command: `python benchmarks/bench_plan.py`.")
    report = render(recipes, checks, about)
    print(report)
    path = write_section("plan", report, Path(args.out) if args.out else Path(__file__).resolve().parent / "RESULTS.md")
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
