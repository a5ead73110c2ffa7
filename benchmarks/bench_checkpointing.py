"""Activation checkpointing modes side by side: none / selective / blocks, one LoRA training step each.

Runs ``bench_lora.py``'s worker (one process per measurement, fp32, torch AdamW in every mode) for
``studio-speed`` (no checkpointing), ``studio-selective`` and ``studio-blocks`` (whole blocks), with the modes
interleaved and their order rotated every repetition, so a machine shared with other jobs slows each alike; one
more process per mode measures the peak tensor bytes. Prints the medians, the load average before and after, and
the memory planner's prediction for each mode against the measured peak tensor bytes.

    .venv/bin/python benchmarks/bench_checkpointing.py --size mid --reps 3 --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import SIZES, _run_worker  # noqa: E402

MODES = {"none": "studio-speed", "selective": "studio-selective", "blocks": "studio-blocks"}


def predicted_peak(size: str, mode: str) -> int:
    """The planner's peak (CPU: no workspace) for the benchmark's setting: LoRA on attention, AdamW, fp32."""
    from cascade_studio.adapters.lora.config import LoraConfig
    from cascade_studio.trainers import plan as planner

    cfg, batch, side, rank, _ = SIZES[size]
    setup = planner.Setup(adapter=LoraConfig(rank=rank, alpha=float(rank), targets=("attention",)), stage_c=cfg,
                          preset=size, batch_size=batch, latent_h=side, latent_w=side, dtype="fp32",
                          mixed_precision="no", checkpointing=mode, optimizer="adamw", device="cpu")
    return planner.plan_memory(setup).peak_without_workspace()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="mid", choices=sorted(SIZES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ["CASCADE_BENCH_THREADS"] = str(args.threads)
    load_before = os.getloadavg()
    steps: dict[str, list[float]] = {mode: [] for mode in MODES}
    modes = list(MODES)
    for rep in range(args.reps):
        for mode in modes[rep % len(modes):] + modes[:rep % len(modes)]:
            result = _run_worker(["--worker", MODES[mode], args.size])
            steps[mode].append(statistics.median(result["step_s"]))
            print(f"rep {rep} {mode:9s} step {steps[mode][-1]:.3f} s", flush=True)
    peaks = {mode: _run_worker(["--worker", MODES[mode], args.size, "--profile"])["tensor_peak"] for mode in MODES}
    load_after = os.getloadavg()
    base_step, base_peak = statistics.median(steps["none"]), peaks["none"]
    print(f"\n{args.size}, fp32, {args.threads} thread(s), median of {args.reps} processes; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (1 min)")
    print("| checkpointing | step (s) | step vs none | peak tensor bytes (MiB) | vs none | planner (MiB) | "
          "planner / measured |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        step = statistics.median(steps[mode])
        predicted = predicted_peak(args.size, mode)
        print(f"| {mode} | {step:.3f} | {step / base_step:.2f} | {peaks[mode] / 2**20:.0f} | "
              f"{peaks[mode] / base_peak:.2f} | {predicted / 2**20:.0f} | {predicted / peaks[mode]:.2f} |")
    print("\nsingle steps: " + "; ".join(f"{m} " + ", ".join(f"{s:.2f}" for s in v) for m, v in steps.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
