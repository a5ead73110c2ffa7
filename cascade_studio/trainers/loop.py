"""The single accelerate training loop shared by every adapter method.

It knows nothing about which adapter it trains: the model is an :class:`AdaptedStageC`, the parameters come from
``model.trainable_parameters()``, and the method contributes its inputs through ``method_inputs``. Checkpoints
hold only adapter tensors, optimizer state and the run state (never the frozen base), written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoints import RunState
from .events import EventLog
from .state_io import load_optimizer_state, save_optimizer_state
from .steps import diffusion_training_loss, heldout_loss, step_generator


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


@dataclass
class LoopSettings:
    max_steps: int
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every: int = 0
    log_every: int = 1
    shift: float = 1.0
    offset_noise: float = 0.0
    caption_dropout: float = 0.0
    max_nonfinite_steps: int = 5
    preview_every: int = 0
    c_clip_img: int = 768
    dtype: torch.dtype | None = None


@dataclass
class LoopResult:
    step: int
    losses: list[float] = field(default_factory=list)
    skipped_nonfinite: int = 0
    seconds: float = 0.0


class InfiniteSampler:
    """Deterministic epoch permutations with a resumable position (the data order survives a restart)."""

    def __init__(self, n: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        if n == 0:
            raise ValueError("no training samples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 9_973 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        # every rank sees the same permutation and takes its own slice of each global batch
        return order

    def next_batch(self) -> list[int]:
        global_batch = self.batch_size * self.num_replicas
        indices = []
        while len(indices) < global_batch:
            if self.position >= self.n:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation()
            indices.append(self._order[self.position])
            self.position += 1
        return indices[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


def collate(samples: list[dict[str, Any]], extras: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if torch.is_tensor(values[0]) else values
    for key, value in (extras or {}).items():
        batch[key] = value.unsqueeze(0).expand(len(samples), *value.shape).clone() if value.dim() >= 1 else value
    return batch


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def run_loop(*, accelerator, model, optimizer, scheduler, dataset, sampler: InfiniteSampler,
             settings: LoopSettings, tracker, events: EventLog, checkpoints, run_state: RunState,
             method_inputs: Callable | None, method_cfg: Any, extras: dict[str, torch.Tensor],
             save_adapter: Callable[[Path], None], preview: Callable[[int], None] | None = None,
             start_step: int = 0, progress: bool = True) -> LoopResult:
    """Train from ``start_step`` to ``settings.max_steps``."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    result = LoopResult(step=start_step)
    nonfinite_in_a_row = run_state.nonfinite_in_a_row
    result.skipped_nonfinite = run_state.skipped_steps_total
    bar = tqdm(total=settings.max_steps, initial=start_step, disable=not (progress and accelerator.is_main_process),
               desc="train", dynamic_ncols=True)
    t0 = time.perf_counter()
    step = start_step
    device = accelerator.device
    while step < settings.max_steps:
        step_start = time.perf_counter()
        losses = []
        ok = True
        for micro in range(settings.grad_accum):
            indices = sampler.next_batch()
            batch = _to_device(collate([dataset[i] for i in indices], extras), device)
            # Seed the global RNG too (LoRA dropout draws from it): resume reproduces the same step.
            torch.manual_seed(settings.seed * 31 + step * settings.grad_accum + micro)
            g = step_generator(settings.seed, step * settings.grad_accum + micro, accelerator.process_index)
            with accelerator.autocast():
                loss = diffusion_training_loss(
                    model, batch, c_clip_img=settings.c_clip_img, caption_dropout=settings.caption_dropout,
                    shift=settings.shift, offset=settings.offset_noise, generator=g,
                    method_inputs=method_inputs, method_cfg=method_cfg, dtype=settings.dtype)
            accelerator.backward(loss / settings.grad_accum)
            losses.append(float(loss.detach()))
        grad_norm = _grad_norm(accelerator, params, settings.max_grad_norm)
        mean_loss = sum(losses) / len(losses)
        finite = math.isfinite(mean_loss) and math.isfinite(grad_norm)
        # every rank must agree, or DDP ranks would diverge
        finite = bool(accelerator.reduce(torch.tensor([0.0 if finite else 1.0], device=device), "sum").item() == 0)
        if finite:
            optimizer.step()
            scheduler.step()
            nonfinite_in_a_row = 0
        else:
            ok = False
            nonfinite_in_a_row += 1
            result.skipped_nonfinite += 1
            events.emit("nonfinite", step=step + 1, loss=mean_loss, grad_norm=grad_norm)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        result.step = step
        if ok:
            result.losses.append(mean_loss)
        if nonfinite_in_a_row >= settings.max_nonfinite_steps:
            good = checkpoints.list()
            kept = (f"The last good checkpoint ({good[-1]}) is kept; resume from it with --resume after fixing "
                    "the recipe." if good else "No checkpoint was saved before the fault; start the run again "
                    "after fixing the recipe.")
            raise NonFiniteLossError(
                f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last at step {step}, "
                f"{result.skipped_nonfinite} skipped in all): lower optimizer.lr, use mixed_precision bf16 rather "
                f"than fp16, or check the data. {kept}")
        seconds = time.perf_counter() - step_start
        lr = scheduler.get_last_lr()[0]
        if accelerator.is_main_process:
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if step % max(1, settings.log_every) == 0 or step == settings.max_steps:
                metrics = {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "it_per_s": 1.0 / max(seconds, 1e-9),
                           "peak_memory_mb": peak_memory_mb(), "nonfinite_skipped": result.skipped_nonfinite}
                tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
                remaining = (settings.max_steps - step) * (time.perf_counter() - t0) / max(1, step - start_step)
                events.emit("step", step=step, max_steps=settings.max_steps, loss=mean_loss, lr=lr,
                            eta_seconds=round(remaining, 1))
        run_state.nonfinite_in_a_row = nonfinite_in_a_row
        run_state.skipped_steps_total = result.skipped_nonfinite
        if preview is not None and settings.preview_every and step % settings.preview_every == 0:
            preview(step)
        # The last step is always checkpointed: it is the trained adapter (exports and `cascade-studio export`
        # are made from it), and a run killed during export resumes straight to exporting.
        due = step == settings.max_steps or (settings.checkpoint_every and step % settings.checkpoint_every == 0)
        if due:
            # Never let checkpoints of a diverging run push the last good one out (keep_checkpoints prunes).
            # The final step is still saved when the weights are finite: a skipped step leaves them as the last
            # good step made them, and the final checkpoint must match what is exported.
            healthy = nonfinite_in_a_row == 0 or step == settings.max_steps
            if healthy and _all_finite(params):
                save_checkpoint(accelerator, checkpoints, step, optimizer, scheduler, sampler, run_state,
                                save_adapter, events)
            else:
                events.emit("warning", step=step, message="checkpoint skipped: the adapter or the last step is "
                            "not finite; the previous checkpoint is kept")
    bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def _all_finite(params) -> bool:
    return all(bool(torch.isfinite(p.detach()).all()) for p in params)


def _grad_norm(accelerator, params, max_norm: float) -> float:
    if max_norm and max_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_norm)
        return float(norm)
    total = torch.zeros(())
    for p in params:
        if p.grad is not None:
            total = total + p.grad.detach().float().pow(2).sum().cpu()
    return float(total.sqrt())


def save_checkpoint(accelerator, checkpoints, step, optimizer, scheduler, sampler, run_state, save_adapter, events):
    """Adapter tensors + optimizer + scheduler + sampler position, atomically (main process writes)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = dataclasses.replace(run_state, step=step, epoch=sampler.epoch, sampler_state=sampler.state_dict())

        def write(tmp_dir: Path) -> None:
            save_adapter(tmp_dir / "adapter.safetensors")
            save_optimizer_state(optimizer, tmp_dir / "optimizer.safetensors")
            (tmp_dir / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), default=_jsonable))

        path = checkpoints.save(step, write, state)
        events.emit("checkpoint", step=step, path=str(path))
    accelerator.wait_for_everyone()


def _jsonable(value: Any) -> Any:
    return None if callable(value) else str(value)


def restore_checkpoint(checkpoints, path: Path, optimizer, scheduler, sampler,
                       load_adapter: Callable[[Path], None]) -> RunState:
    load_adapter(path / "adapter.safetensors")
    load_optimizer_state(optimizer, path / "optimizer.safetensors")
    sched = json.loads((path / "scheduler.json").read_text())
    sched.pop("lr_lambdas", None)
    scheduler.load_state_dict({**scheduler.state_dict(), **sched})
    state = checkpoints.load_run_state(path)
    if state.sampler_state:
        sampler.load_state_dict(state.sampler_state)
    return state


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


__all__ = ["run_loop", "LoopSettings", "LoopResult", "InfiniteSampler", "collate", "save_checkpoint",
           "restore_checkpoint", "NonFiniteLossError", "heldout_loss", "peak_memory_mb"]
