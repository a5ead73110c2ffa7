"""How cost grows (issue 20.5): the studio's LoRA step against batch size and latent side, and epochs against
dataset size through the training loop's own data path.

* **Step**: ``StageC`` + ``LoraAdapter`` in ``AdaptedStageC`` (``bench_lora``'s studio-speed variant: rank 8 on
  q/k/v/out, torch AdamW, fp32, frozen base in eval mode) on a small config (``GROWTH_CONFIG``: c 256, blocks
  [[2, 4], [4, 2]], published text/image widths), at batch 1, 2, 4 with 24x24 latents and at latent side 16, 24, 32
  with batch 2. One process, one model; the points alternate every repetition; median step time. Peak tensor
  bytes: parameters, buffers and optimizer state plus the live-tensor peak of one more step
  (``trainers.plan.measure_peak_tensor_bytes``).
* **Data**: 100, 1,000 and 10,000 cached items of the tiny size (16x8x8 latents, 77x64 text, 1x64 pooled) written
  straight into the encode-once cache's shard format (``data.cache``'s shard writer: safetensors shards + index,
  checksums), read back by ``CachedDataset`` through ``trainers.loop.batch_stream`` (the loop's ``DataLoader``,
  sampler and ``collate``) with 0 and 2 workers, while a tiny LoRA step (``bench_lora`` tiny, batch 4) trains on
  every batch. Data wait = the time ``next(batches)`` blocks; its share of the step is wait / (wait + compute),
  over the steps after the first (the first batch carries the workers' start-up, reported apart). Steps per
  point are capped (``--max-steps``): an epoch of 10,000 items is 2,500 steps, so the epoch time with training is
  measured where the cap covers the epoch and otherwise estimated as steps per epoch x the measured step; the
  epoch of reading alone (no training, 0 workers) is measured in full at every size.

    python benchmarks/bench_growth.py [--reps 2] [--max-steps 40] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import SIZES, _studio_model  # noqa: E402 - the sibling module: the LoRA benchmark's studio model
from results import write_section  # noqa: E402

GROWTH_CONFIG = dict(c_cond=256, c_hidden=[256, 256], nhead=[4, 4], blocks=[[2, 4], [4, 2]])
GROWTH_RANK = 8
BATCHES, BATCH_SIDE = (1, 2, 4), 24
SIDES, SIDE_BATCH = (16, 24, 32), 2
DATASET_SIZES = (100, 1_000, 10_000)
WORKERS = (0, 2)
TARGET_WAIT = 0.05  # data wait < 5% of step time


def growth_points() -> list[tuple[int, int]]:
    """(batch, side) of every step measurement, each once: the batch sweep, then the new points of the side sweep."""
    points = [(b, BATCH_SIDE) for b in BATCHES]
    return points + [(SIDE_BATCH, s) for s in SIDES if (SIDE_BATCH, s) not in points]


def _batch(cfg: dict, batch: int, side: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text, pooled, img = cfg.get("c_clip_text", 1280), cfg.get("c_clip_text_pooled", 1280), cfg.get("c_clip_img", 768)
    return {"latents": torch.randn(batch, 16, side, side, generator=g),
            "clip_text": torch.randn(batch, 77, text, generator=g),
            "clip_text_pooled": torch.randn(batch, 1, pooled, generator=g),
            "clip_img": torch.randn(batch, 1, img, generator=g)}


def _trainer(cfg: dict, rank: int):
    """(train_step(batch, step) -> seconds, tensors resident for the run) for the studio's LoRA step."""
    from cascade_studio.trainers.steps import diffusion_training_loss, step_generator

    model, params = _studio_model(cfg, rank, checkpointing="none")
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    c_img = cfg.get("c_clip_img", 768)

    def train_step(batch: dict, step: int) -> float:
        start = time.perf_counter()
        loss = diffusion_training_loss(model, batch, c_clip_img=c_img, caption_dropout=0.0, shift=1.0, offset=0.0,
                                       generator=step_generator(0, step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def resident() -> int:
        tensors = list(model.parameters()) + list(model.buffers()) + [
            v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    return train_step, resident


def step_growth(reps: int) -> list[dict]:
    from cascade_studio.trainers.plan import measure_peak_tensor_bytes

    train_step, resident = _trainer(GROWTH_CONFIG, GROWTH_RANK)
    points = growth_points()
    batches = {p: _batch(GROWTH_CONFIG, *p) for p in points}
    for p in points:  # warm-up: optimizer state, lazy kernels, every shape once
        train_step(batches[p], 0)
    times: dict[tuple[int, int], list[float]] = {p: [] for p in points}
    for rep in range(reps):
        shift = rep % len(points)  # rotate the order so drifting load hits every point alike
        for p in points[shift:] + points[:shift]:
            times[p].append(train_step(batches[p], rep + 1))
    rows = []
    for p in points:
        live, _ = measure_peak_tensor_bytes(lambda: train_step(batches[p], reps + 1))
        rows.append({"batch": p[0], "side": p[1], "step_s": statistics.median(times[p]), "steps": times[p],
                     "tensor_peak": resident() + live})
    return rows


# ------------------------------------------------------------------------------------------------------ data
def write_cache(directory: Path, n: int, side: int = 8, text: int = 64, seed: int = 0):
    """``n`` cached items of random features written in the encode-once cache's own shard format; returns the
    ``CachedDataset`` reading them (what ``build_cache`` returns, without running an encoder)."""
    from cascade_studio.data import cache

    writer = cache._ShardWriter(directory, cache.DEFAULT_SHARD_SIZE)
    cache._shard_dir(directory).mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    preprocessing = {"resolution": side * 32, "crop": "center"}
    keys = [cache.entry_key(f"bench-item-{i}", f"caption {i}", ["bench:latents", "bench:text"], preprocessing)
            for i in range(n)]
    for key in keys:
        writer.add(key, {"latents": torch.randn(16, side, side, generator=g),
                         "clip_text": torch.randn(77, text, generator=g),
                         "clip_text_pooled": torch.randn(1, text, generator=g)})
    writer.flush()
    return cache.CachedDataset(keys=keys, record_keys=[f"item-{i}" for i in range(n)],
                               captions=[f"caption {i}" for i in range(n)], sizes=[None] * n,
                               locations=writer.written, null_key=None)


def read_epoch(dataset, batch_size: int) -> float:
    """Seconds to read every item once through the loop's data path in this process (no training)."""
    from cascade_studio.trainers.loop import InfiniteSampler, batch_stream

    stream = batch_stream(dataset, InfiniteSampler(len(dataset), batch_size, seed=0), {}, 0, pin_memory=False)
    start = time.perf_counter()
    for _ in range(-(-len(dataset) // batch_size)):
        next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    return seconds


def data_wait_share(waits: list[float], computes: list[float]) -> float:
    """Share of step time spent waiting for data, the first step (worker start-up) left out."""
    waited, total = sum(waits[1:]), sum(waits[1:]) + sum(computes[1:])
    return waited / total if total else float("nan")


def data_growth(max_steps: int) -> list[dict]:
    from cascade_studio.trainers.loop import InfiniteSampler, batch_stream

    cfg, batch_size, side, rank, _ = SIZES["tiny"]
    train_step, _ = _trainer(cfg, rank)
    train_step(_batch(cfg, batch_size, side), 0)  # warm-up
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in DATASET_SIZES:
            start = time.perf_counter()
            dataset = write_cache(Path(tmp) / str(n), n, side=side, text=cfg["c_clip_text"])
            write_s = time.perf_counter() - start
            read_s = read_epoch(dataset, batch_size)
            epoch_steps = -(-n // batch_size)
            for workers in WORKERS:
                stream = batch_stream(dataset, InfiniteSampler(n, batch_size, seed=0), {}, workers, pin_memory=False)
                waits, computes = [], []
                steps = min(epoch_steps, max_steps)
                for step in range(steps):
                    start = time.perf_counter()
                    batch = next(stream)
                    waits.append(time.perf_counter() - start)
                    computes.append(train_step(batch, step))
                stream.close()  # stops the workers
                per_step = statistics.median(w + c for w, c in zip(waits[1:], computes[1:]))
                epoch_s = sum(waits) + sum(computes) if steps == epoch_steps else \
                    waits[0] + (epoch_steps - 1) * per_step
                rows.append({"items": n, "workers": workers, "write_s": write_s, "read_epoch_s": read_s,
                             "steps": steps, "epoch_steps": epoch_steps, "startup_s": waits[0],
                             "median_wait_ms": 1000 * statistics.median(waits[1:]),
                             "median_step_ms": 1000 * statistics.median(computes[1:]),
                             "wait_share": data_wait_share(waits, computes), "epoch_s": epoch_s,
                             "epoch_measured": steps == epoch_steps})
                print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- render
def render(step_rows: list[dict], data_rows: list[dict], about: str, command: str) -> str:
    """The ``growth`` section of RESULTS.md: step time and peak tensor bytes against batch and latent side (each
    relative to the smallest point of its sweep), and epoch time and data-wait share against dataset size."""
    cfg = GROWTH_CONFIG
    lines = ["## How cost grows: batch, latent side, dataset size (bench_growth.py)", "",
             f"Machine: {about}. Command: `{command}`.",
             f"Studio LoRA step (rank {GROWTH_RANK} on q/k/v/out, AdamW, fp32, frozen base in eval mode) on Stage C "
             f"c {cfg['c_hidden'][0]}, blocks {cfg['blocks']}, heads {cfg['nhead']}, published text/image widths; "
             "one process, points alternating, median step time; peak tensor bytes = parameters + buffers + "
             "optimizer state + the profiled live-tensor peak of one step.", ""]

    def sweep(title: str, rows: list[dict], key: str) -> None:
        base = rows[0]
        lines.extend([f"| {title} | step (s) | x smallest | peak tensor bytes (MiB) | x smallest |",
                      "|---|---|---|---|---|"])
        for row in rows:
            lines.append(f"| {row[key]} | {row['step_s']:.3f} | {row['step_s'] / base['step_s']:.2f} | "
                         f"{row['tensor_peak'] / 2**20:.0f} | {row['tensor_peak'] / base['tensor_peak']:.2f} |")
        lines.append("")

    by_point = {(r["batch"], r["side"]): r for r in step_rows}
    lines.append(f"Against batch size ({BATCH_SIDE}x{BATCH_SIDE} latents):")
    lines.append("")
    sweep("batch", [by_point[(b, BATCH_SIDE)] for b in BATCHES if (b, BATCH_SIDE) in by_point], "batch")
    lines.append(f"Against latent side (batch {SIDE_BATCH}; tokens grow with the side squared):")
    lines.append("")
    sweep("latent side", [by_point[(SIDE_BATCH, s)] for s in SIDES if (SIDE_BATCH, s) in by_point], "side")
    if data_rows:
        tiny = SIZES["tiny"]
        lines += [f"Epoch time against dataset size: cached tiny items written in the cache's shard format, read "
                  f"through the loop's data path (`batch_stream`: DataLoader, sampler, collate) while the tiny LoRA "
                  f"step (c {tiny[0]['c_hidden'][0]}, batch {tiny[1]}, {tiny[2]}x{tiny[2]} latents) trains on every "
                  "batch. Data wait: the time the loop blocks on the next batch; share = wait / (wait + step), first "
                  "batch (worker start-up) left out. Epoch with training: measured (m) when the step cap covers "
                  "the epoch, else estimated (e) as steps per epoch x the median step plus the start-up.", "",
                  "| items | workers | write cache (s) | read one epoch, no training (s) | steps timed / per epoch | "
                  "start-up (s) | median wait (ms) | median step (ms) | data wait share | epoch with training (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in data_rows:
            lines.append(f"| {row['items']:,} | {row['workers']} | {row['write_s']:.2f} | {row['read_epoch_s']:.2f} | "
                         f"{row['steps']} / {row['epoch_steps']} | {row['startup_s']:.2f} | "
                         f"{row['median_wait_ms']:.2f} | {row['median_step_ms']:.1f} | "
                         f"**{100 * row['wait_share']:.1f}%** | {row['epoch_s']:.1f} "
                         f"({'m' if row['epoch_measured'] else 'e'}) |")
        worst = max(data_rows, key=lambda r: r["wait_share"])
        met = worst["wait_share"] < TARGET_WAIT
        lines += ["", f"Target: data wait < {100 * TARGET_WAIT:.0f}% of step time at every size: "
                  f"{'met' if met else 'NOT met'} (worst {100 * worst['wait_share']:.1f}% at "
                  f"{worst['items']:,} items, {worst['workers']} workers)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=2, help="timed steps per (batch, side) point")
    parser.add_argument("--max-steps", type=int, default=40, help="training steps per (dataset size, workers)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--skip-data", action="store_true", help="only the step sweeps")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    step_rows = step_growth(args.reps)
    for row in step_rows:
        print(row, flush=True)
    data_rows = [] if args.skip_data else data_growth(args.max_steps)
    about = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{args.threads} torch thread(s), load average {load:.1f} at start and {os.getloadavg()[0]:.1f} at end, "
             f"{(time.perf_counter() - started) / 60:.1f} min")
    command = "python benchmarks/bench_growth.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("reps", args.reps), ("max_steps", args.max_steps),
                                                      ("threads", args.threads)) if v != parser.get_default(k)) + \
        (" --skip-data" if args.skip_data else "")
    report = render(step_rows, data_rows, about, command)
    write_section("growth", report, Path(args.out) if args.out else Path(__file__).resolve().parent / "RESULTS.md")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
