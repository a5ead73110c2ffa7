"""Training throughput by encode mode, data path and process count (issue 21): the tiny LoRA recipe run by the
public commands in fresh processes on a synthetic webdataset (32x32 PNGs with captions in 10 tar shards, the
tests' ``stream_shards``), each configuration once:

* ``full``, scanned local shards: the encode-once cache is filled first (the data phase's time), then trained.
* ``none``, streamed over HTTP from a server on 127.0.0.1 (this process): nothing ahead; the encoders run in the
  training process on every batch, the data-loader workers read, decode and crop.
* 1 process (2 workers) and 2 processes over gloo (``accelerate launch``, 1 worker each), the same global batch.

Images/s = global batch x the median step rate of rank 0 after the first step (DDP steps are in lock step);
data wait = the loop's ``data_wait_share`` over the same steps. The machine's cores are shared, so the 2-process
rows say what the commands do here, not how they scale on a GPU per process.

    python benchmarks/bench_stream.py [--images 10000] [--steps 30] [--batch 8] [--resolution 256]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
from results import write_section  # noqa: E402
from stream_shards import LocalServer, write_shards  # noqa: E402

RECIPE = str(REPO / "recipes" / "tiny" / "lora.yaml")
FULL_IMAGES = 2_000  # the full-mode rows cache this many (encoding all 10,000 first would dominate the bench)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def run(name: str, processes: int, mode: str, data: list[str], args, workspace: Path) -> dict:
    workers = 2 if processes == 1 else 1
    overrides = [f"workspace={workspace}", f"name={name}", "preview.every=0", "tracking.enabled=false",
                 "data.holdout_fraction=0", f"data.resolution={args.resolution}", f"train.max_steps={args.steps}",
                 "train.checkpoint_every=0", f"train.batch_size={args.batch // processes}",
                 f"train.num_workers={workers}", f"cache.mode={mode}", *data]
    if processes == 1:
        command = [str(Path(sys.executable).with_name("cascade-studio")), "train", RECIPE, *overrides]
        env = _env()
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend",
                   "no", "--mixed_precision", "no", "--num_processes", str(processes), "--multi_gpu", "-m",
                   "cascade_studio.train", RECIPE, *overrides]
        env = _env(ACCELERATE_USE_CPU="true")
    started = time.perf_counter()
    done = subprocess.run(command + ["--no-progress"], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    events = [json.loads(line) for line in (workspace / "runs" / name / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"][1:]
    phases = {e["phase"]: e["time"] for e in events if e["event"] == "phase"}
    seconds = [1.0 / e["it_per_s"] for e in steps]
    return {"name": name, "processes": processes, "workers": workers, "mode": mode,
            "images_per_s": args.batch / statistics.median(seconds),
            "data_wait": sum(e["data_wait_share"] * s for e, s in zip(steps, seconds)) / sum(seconds),
            "data_phase_s": phases["model"] - phases["data"], "wall_s": wall}


def render(rows: list[dict], about: str, command: str, args) -> str:
    lines = ["## Throughput by encode mode and process count (bench_stream.py)", "",
             f"Tiny LoRA recipe, global batch {args.batch}, {args.resolution} px, {args.steps} steps, 32x32 PNG "
             f"sources; `full` rows cache {FULL_IMAGES:,} scanned images from local shards first, `none` rows stream "
             f"all {args.images:,} over HTTP from 127.0.0.1. {about}. `{command}`.", "",
             "| encode mode | data | processes x workers | images/s (training) | data wait | data phase before "
             "step 1 (s) | wall (s) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        data = "stream over HTTP" if row["mode"] == "none" else "scanned local tars"
        lines.append(f"| {row['mode']} | {data} | {row['processes']} x {row['workers']} | "
                     f"{row['images_per_s']:.1f} | {row['data_wait']:.1%} | {row['data_phase_s']:.1f} | "
                     f"{row['wall_s']:.0f} |")
    lines += ["", "`none` pays the encoders on every step (tiny ones here, so little; the real CLIP ViT-bigG and "
              "EfficientNet cost far more) and nothing ahead; `full` pays them once, before the first step. On "
              "this 2-core machine two processes share the cores, so they do not add throughput here."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="global batch (divided among processes)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, args.images, 10)
        local = ["data.source=webdataset", f"data.path={shards}/shard-{{000..009}}.tar",
                 f"data.max_images={FULL_IMAGES}"]
        with LocalServer(shards) as server:
            stream = ["data.source=webdataset", f"data.path={server.url}/shard-{{000..009}}.tar",
                      "data.streaming=true"]
            for processes in (1, 2):
                for mode, data in (("full", local), ("none", stream)):
                    name = f"{mode}-{processes}"
                    rows.append(run(name, processes, mode, data, args, Path(tmp) / name))
                    print(rows[-1], flush=True)
    about = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread per process, "
             f"load average {load:.1f} at start and {os.getloadavg()[0]:.1f} at end, "
             f"{(time.perf_counter() - started) / 60:.1f} min")
    command = "python benchmarks/bench_stream.py" + "".join(
        f" --{k} {getattr(args, k)}" for k in ("images", "steps", "batch", "resolution")
        if getattr(args, k) != parser.get_default(k))
    report = render(rows, about, command, args)
    write_section("stream", report, Path(args.out) if args.out else HERE / "RESULTS.md")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
