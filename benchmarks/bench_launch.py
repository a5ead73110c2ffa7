"""Launching at any size (issue 21): training throughput and cache-filling time of the tiny LoRA recipe through the
user's commands, one fresh process tree and a cold cache per row.

Rows: 1 process (``cascade-studio train``), 2-process DDP (``--accelerate-config cpu-2proc``) with ``cache.mode``
full and sharded, 2-process FSDP (``--accelerate-config fsdp``, sharded cache). ``train.batch_size`` is per
device (4), so 2 processes train a global batch of 8. From the run's events: *data phase* = scan + encoders +
cache (``phase data`` to ``phase model``); *images/s* = global batch x steps after the first / their time (the
first step carries start-up). Every process runs one torch thread (``OMP_NUM_THREADS=1``): on the shared 2-core
machine two processes use both cores where one process uses one.

    python benchmarks/bench_launch.py [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "lora.yaml")
CLI = str(Path(sys.executable).with_name("cascade-studio"))
ROWS = [  # (label, launcher arguments, cache mode)
    ("1 process", [], "full"),
    ("2 processes, DDP", ["--accelerate-config", "cpu-2proc"], "full"),
    ("2 processes, DDP", ["--accelerate-config", "cpu-2proc"], "sharded"),
    ("2 processes, FSDP", ["--accelerate-config", "fsdp", "--processes", "2"], "sharded"),
]


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def measure(label: str, launcher: list[str], mode: str, steps: int, root: Path) -> dict:
    workspace = root / f"{len(list(root.iterdir()))}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    cmd = [CLI, "train", *launcher, RECIPE, f"workspace={workspace}", f"train.max_steps={steps}",
           "train.checkpoint_every=0", "preview.every=0", f"cache.mode={mode}", "name=bench", "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{label} ({mode}) failed:\n{done.stdout}\n{done.stderr}")
    events = _events(workspace / "runs" / "bench")
    phases = {e["phase"]: e["time"] for e in events if e["event"] == "phase"}
    plan = next(e for e in events if e["event"] == "batch_plan")
    step_times = [e["time"] for e in events if e["event"] == "step"]
    images_per_s = plan["global_batch"] * (len(step_times) - 1) / (step_times[-1] - step_times[0])
    return {"label": label, "mode": mode, "global_batch": plan["global_batch"],
            "data_s": phases["model"] - phases["data"], "images_per_s": images_per_s}


def table(rows: list[dict], steps: int) -> str:
    lines = [f"## Launching at any size: tiny LoRA, {steps} steps, cold cache per row (bench_launch.py)", "",
             f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread per process, load average "
             f"{os.getloadavg()[0]:.1f} at the end; per-device batch 4.", "",
             "| launch | cache.mode | global batch | data phase (s) | train images/s |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['mode']} | {row['global_batch']} | {row['data_s']:.1f} | "
                     f"{row['images_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(label, launcher, mode, args.steps, Path(tmp)) for label, launcher, mode in ROWS]
    text = table(rows, args.steps)
    print(text)
    print(f"written to {write_section('launch', text)}")


if __name__ == "__main__":
    main()
