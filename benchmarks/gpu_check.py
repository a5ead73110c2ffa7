"""One-shot accelerator check: the LoRA training step at the published settings, measured against the planner.

On a machine with an NVIDIA GPU, for the lite and big Stage C (random weights of the published shapes, bf16,
bf16 autocast, batch 1 at 24x24 latents, LoRA rank 16 on the attention layers, 8-bit AdamW) with the base as it is
and quantized to NF4: step time, measured peak memory (``torch.cuda.max_memory_allocated``) and the planner's
prediction for the same setup (``cascade-studio plan``'s numbers), as one table. Without a GPU the same code runs
on the CPU at the tiny size (8x8 latents; peak = resident tensors + the profiler's peak of live tensors), which is
how the test suite runs it (tests/test_benchmarks.py), so this is never an untested script.

``--tests`` also runs the GPU-marked tests on the GPU (every shipped recipe's path, the published settings on the
tiny model; see tests/test_device_dry_run.py and tests/test_published_settings.py).

    .venv/bin/python benchmarks/gpu_check.py [--steps 3] [--tests [extra pytest arguments]]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RANK = 16


def _stage_c(config: dict[str, Any], device: Any, dtype: Any) -> Any:
    """Random Stage C weights of the given shape, built on ``device`` directly (big is 7 GB in bf16)."""
    import torch

    from cascade_studio.models import build_stage_c
    from cascade_studio.models.random_init import make_learnable

    with torch.device(device):
        stage_c = build_stage_c(**config)
    return make_learnable(stage_c).to(dtype).eval().requires_grad_(False)


def measure(size: str, config: dict[str, Any], device: Any, quantize: str, latent: int, steps: int) -> dict:
    """Time, measured peak and predicted peak of one LoRA training step setup."""
    import torch

    from cascade_studio.adapters import catalog
    from cascade_studio.adapters.base import AdaptedStageC
    from cascade_studio.adapters.lora.config import LoraConfig
    from cascade_studio.config.schema import OptimizerConfig
    from cascade_studio.trainers import plan as planner
    from cascade_studio.trainers.optim import build_optimizer
    from cascade_studio.trainers.quantize import quantize_frozen_linears
    from cascade_studio.trainers.steps import diffusion_training_loss, step_generator

    device = torch.device(device)
    optimizer_name = "adamw8bit"
    torch.manual_seed(0)
    stage_c = _stage_c(config, device, torch.bfloat16)
    quantize_frozen_linears(stage_c, quantize)
    model = AdaptedStageC(stage_c)
    section = LoraConfig(rank=RANK, alpha=float(RANK), targets=("attention",))
    catalog.get("lora").hook("create_adapter")(section, model, None)
    model.to(device)
    params = list(model.trainable_parameters())
    optimizer = build_optimizer(params, OptimizerConfig(name=optimizer_name, lr=1e-4))
    c_text, c_img = config.get("c_clip_text", 1280), config.get("c_clip_img", 768)
    batch = {"latents": torch.randn(1, 16, latent, latent, device=device),
             "clip_text": torch.randn(1, 77, c_text, device=device),
             "clip_text_pooled": torch.randn(1, 1, c_text, device=device),
             "clip_img": torch.randn(1, 1, c_img, device=device)}

    def step(index: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = diffusion_training_loss(model, batch, c_clip_img=c_img, caption_dropout=0.0, shift=1.0,
                                           offset=0.0, generator=step_generator(0, index))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up: kernels, optimizer state
    times = []
    for index in range(1, steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(index)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step(steps + 1)
        measured = torch.cuda.max_memory_allocated()
    else:
        tensors = list(model.parameters()) + list(model.buffers()) + [
            v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        resident = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
        live, _ = planner.measure_peak_tensor_bytes(lambda: step(steps + 1))
        measured = resident + live
    setup = planner.Setup(adapter=section, stage_c=config, preset=size, batch_size=1, latent_h=latent,
                          latent_w=latent, dtype="bf16", mixed_precision="bf16", quantize_base=quantize,
                          optimizer=optimizer_name, device=device.type)
    predicted = planner.plan_memory(setup).peak_without_workspace()
    return {"size": size, "device": device.type, "quantize": quantize, "step_s": statistics.median(times),
            "measured": measured, "predicted": predicted}


def run(steps: int = 3) -> list[dict]:
    """Every row of the table: lite and big on CUDA, tiny on a CPU; the base as it is and NF4."""
    import torch

    from cascade_studio.models.presets import get_preset

    if torch.cuda.is_available():
        device, sizes, latent = "cuda", ("lite", "big"), 24
    else:
        device, sizes, latent = "cpu", ("tiny",), 8
    rows = []
    for size in sizes:
        for quantize in ("none", "nf4"):
            rows.append(measure(size, get_preset(size).stage_c, device, quantize, latent, steps))
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| size | device | base | step (s) | measured peak (GiB) | predicted (GiB) | predicted / measured |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['size']} | {row['device']} | {'bf16' if row['quantize'] == 'none' else row['quantize']}"
                     f" | {row['step_s']:.3f} | {row['measured'] / 2**30:.3f} | {row['predicted'] / 2**30:.3f} | "
                     f"{row['predicted'] / row['measured']:.2f} |")
    return "\n".join(lines)


def _describe_device() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"gpu_check: no CUDA GPU; the same benchmark on the CPU at the tiny size (torch {torch.__version__})"
    props = torch.cuda.get_device_properties(0)
    return (f"gpu_check: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
            f"{props.major}.{props.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}, "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def _run_gpu_tests(argv: list[str]) -> int:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MLFLOW_ENABLE_ASYNC_LOGGING="false")
    command = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "-ra",
               "tests/test_device_dry_run.py", "tests/test_published_settings.py", "tests/test_gpu_ready.py",
               "tests/test_gpu_ready_ip_quant.py", "-m", "cuda or not cuda", "-k", "not meta", *argv]
    return subprocess.call(command, cwd=ROOT, env=env)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row, after one warm-up step")
    parser.add_argument("--tests", action="store_true", help="also run the GPU-marked tests (on a GPU only)")
    args, pytest_args = parser.parse_known_args(argv)
    print(_describe_device(), flush=True)
    print(render(run(args.steps)), flush=True)
    if args.tests:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check --tests: no CUDA GPU; CI runs the same paths on the meta device "
                  "(tests/test_device_dry_run.py).")
            return 0
        return _run_gpu_tests(pytest_args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
