"""The single accelerate training loop shared by every adapter method.

It knows nothing about which adapter it trains: the model is an :class:`AdaptedStageC`, the parameters come from
``model.trainable_parameters()``, and the method contributes its inputs through ``method_inputs``. Checkpoints
hold only adapter tensors, optimizer state and the run state (never the frozen base), written atomically.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config.schema import Recipe
from .checkpoints import RunState
from .events import EventLog
from .state_io import load_optimizer_state, save_optimizer_state
from ..devices import host_floats
from .steps import LossStep, batch_to_device, heldout_loss, step_generator


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


@dataclass(frozen=True)
class LoopSettings:
    """What the loop reads from the recipe, gathered in one place by :meth:`from_recipe`.

    No field has a default of its own: every value is the recipe's, whose defaults live in
    :mod:`cascade_studio.config.schema` only (``tests/test_typed_config.py`` keeps it so).
    """

    max_steps: int             # train.max_steps
    grad_accum: int            # train.grad_accum
    max_grad_norm: float       # train.max_grad_norm
    seed: int                  # train.seed
    checkpoint_every: int      # train.checkpoint_every
    log_every: int             # train.log_every
    eval_every: int            # train.eval_every
    shift: float               # train.shift
    offset_noise: float        # train.offset_noise
    max_nonfinite_steps: int   # train.max_nonfinite_steps
    num_workers: int           # train.num_workers
    caption_dropout: float     # data.caption_dropout
    preview_every: int         # preview.every
    c_clip_img: int            # the base Stage C's image-embedding width (its preset, not the recipe)

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, c_clip_img: int, processes: int = 1) -> LoopSettings:
        """The loop's settings of ``recipe`` on ``processes`` processes; ``c_clip_img`` comes from the loaded base
        (``BaseModels``)."""
        from ..config.schema import accumulation

        train = recipe.train
        return cls(max_steps=train.max_steps, grad_accum=accumulation(train, processes), max_grad_norm=train.max_grad_norm,
                   seed=train.seed, checkpoint_every=train.checkpoint_every, log_every=train.log_every,
                   eval_every=train.eval_every,
                   shift=train.shift, offset_noise=train.offset_noise,
                   max_nonfinite_steps=train.max_nonfinite_steps, num_workers=train.num_workers,
                   caption_dropout=recipe.data.caption_dropout, preview_every=recipe.preview.every,
                   c_clip_img=c_clip_img)


@dataclass
class LoopResult:
    step: int
    losses: list[float] = field(default_factory=list)
    skipped_nonfinite: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class BatchPlan:
    """What one optimizer step consumes and what the whole schedule does, the same at every world size.

    ``train.batch_size`` is per device (per process); a step takes ``grad_accum`` micro-batches on each of the
    ``processes``, so the global batch is their product and the schedule (``train.max_steps`` optimizer steps,
    the learning-rate schedule in steps) covers ``max_steps x global batch`` samples. The sampler draws the same
    per-epoch permutation (of ``seed``) at every world size and splits each global batch across the processes in
    rank order, so the data order is a function of (seed, world size) only.
    """

    per_device_batch: int
    processes: int
    grad_accum: int
    max_steps: int
    seed: int
    train_samples: int | None  # None: a stream, whose size is not known up front
    workers: int | None = None  # a stream's order also depends on its readers per process (data-loader workers)

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.processes * self.grad_accum

    @property
    def samples(self) -> int:
        return self.max_steps * self.global_batch

    @property
    def data_order(self) -> str:
        order = f"seed={self.seed}/world_size={self.processes}"
        return order if self.workers is None else f"{order}/workers={self.workers}"

    def describe(self) -> str:
        size = "a stream" if self.train_samples is None else \
            f"{self.samples / max(1, self.train_samples):.1f} epochs of {self.train_samples:,}"
        return (f"global batch {self.global_batch} = {self.per_device_batch} per device x {self.processes} "
                f"process(es) x {self.grad_accum} accumulation; schedule {self.max_steps} optimizer steps = "
                f"{self.samples:,} samples ({size}); data order {self.data_order}")

    def params(self) -> dict[str, Any]:
        """What MLflow and the run's events record."""
        return {"global_batch": self.global_batch, "processes": self.processes,
                "schedule_steps": self.max_steps, "schedule_samples": self.samples, "data_order": self.data_order}


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
    return add_extras(batch, extras)


def add_extras(batch: dict[str, Any], extras: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """``batch`` with the run's per-sample constants (the empty caption's features), one copy per sample."""
    count = len(batch["key"]) if "key" in batch else len(next(iter(batch.values())))
    for key, value in (extras or {}).items():
        batch[key] = value.unsqueeze(0).expand(count, *value.shape).clone() if value.dim() >= 1 else value
    return batch


class _BatchIndices:
    """The batches of an :class:`InfiniteSampler` from its current position on, as a DataLoader batch sampler.

    A copy: the loop advances the original once per batch it *uses*, so a checkpoint records the position of the
    last used batch, not of batches the workers have already prefetched (resume stays exact).
    """

    def __init__(self, sampler: InfiniteSampler) -> None:
        self.sampler = copy.deepcopy(sampler)

    def __iter__(self):
        while True:
            yield self.sampler.next_batch()


class _Prefetched:
    """Batches taken from the data loader by a thread of this process, ``depth`` ahead of the loop.

    Receiving a batch from a DataLoader worker costs a few milliseconds of this process's time (the request for
    the next batch, the pipe, unpickling, mapping shared tensors): 3-6 ms per batch on this project's 2 busy cores
    even with the batch already waiting, 3-4% of a tiny step. A thread does it while the step computes (torch
    releases the GIL), so the loop only takes a finished batch off a queue. The order is the loader's (one
    consumer); errors in the loader are raised by ``next``; ``close`` stops the thread and with it the workers.
    """

    def __init__(self, iterator, depth: int = 2) -> None:
        import queue
        import threading

        self._queue: Any = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(iterator),), daemon=True,
                                        name="cascade-studio-batches")
        self._thread.start()

    def _fill(self, iterator) -> None:
        import queue

        try:
            for item in iterator:
                while not self._stop.is_set():
                    try:
                        self._queue.put(("batch", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # handed to the loop, which raises it
            self._queue.put(("error", exc))

    def __iter__(self):
        return self

    def __next__(self):
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        import queue

        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)  # unblock a put; the thread then drops the loader (and its workers)
            except queue.Empty:
                pass


def batch_stream(dataset, sampler: InfiniteSampler, extras: dict[str, torch.Tensor], num_workers: int,
                 pin_memory: bool) -> _Prefetched:
    """An endless iterator of collated host batches in the sampler's order, read by ``num_workers`` processes
    (0: in this process) while the accelerator computes, and taken from them by a thread (``_Prefetched``).
    ``close()`` it when done."""
    from torch.utils.data import DataLoader

    if hasattr(dataset, "at"):  # a stream (data.streaming): it batches itself, from the run's position on
        loader = DataLoader(dataset.at(sampler), batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                            prefetch_factor=2 if num_workers > 0 else None, persistent_workers=False)
    else:
        loader = DataLoader(dataset, batch_sampler=_BatchIndices(sampler),
                            collate_fn=functools.partial(collate, extras=extras), num_workers=num_workers,
                            pin_memory=pin_memory, prefetch_factor=2 if num_workers > 0 else None,
                            persistent_workers=False)
    return _Prefetched(loader)


def _check_in_step(dataset, indices: list[int], batch: dict[str, Any]) -> None:
    """The loader's batch is the one the sampler says comes next (a guard against a bug, cheap: no tensor read)."""
    keys = getattr(dataset, "record_keys", None)
    if keys is not None and "key" in batch and list(batch["key"]) != [keys[i] for i in indices]:
        raise RuntimeError("internal error: the data loader fell out of step with the sampler")


def run_loop(*, accelerator, model, optimizer, scheduler, dataset, sampler: InfiniteSampler,
             settings: LoopSettings, tracker, events: EventLog, checkpoints, run_state: RunState,
             method_inputs: Callable | None, method_cfg: Any, extras: dict[str, torch.Tensor],
             loss_step: LossStep, encode_batch: Callable[[dict], dict] | None = None,
             save_adapter: Callable[[Path], None], preview: Callable[[int], None] | None = None,
             evaluate: Callable[[int], None] | None = None, start_step: int = 0,
             progress: bool = True, reduce_gradients: Callable[[list], None] | None = None) -> LoopResult:
    """Train from ``start_step`` to ``settings.max_steps``.

    Per optimizer step: ``grad_accum`` micro-batches (gradients all-reduced on the last one only, under
    ``accelerator.no_sync`` before it), each scored by ``loss_step`` (the diffusion loss or the method's own
    ``training_loss``), one host read (mean loss, gradient norm, whether every rank was finite), then the
    optimizer step or a skip. ``encode_batch`` (``cache.mode: none``) turns each decoded batch into features in
    this process; ``data_wait_share`` (logged) is the part of a step spent waiting for the loader.
    ``evaluate(step)`` (the held-out loss) runs every ``eval_every`` steps before the last; the run measures the
    last step itself, after training. ``reduce_gradients(params)`` averages the gradients across processes where
    DDP does not (FSDP's whole adapter, ``trainers/sharding.py``).
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    result = LoopResult(step=start_step)
    nonfinite_in_a_row = run_state.nonfinite_in_a_row
    result.skipped_nonfinite = run_state.skipped_steps_total
    bar = tqdm(total=settings.max_steps, initial=start_step, disable=not (progress and accelerator.is_main_process),
               desc="train", dynamic_ncols=True)
    device = accelerator.device
    batches = batch_stream(dataset, sampler, extras, settings.num_workers, pin_memory=device.type == "cuda")
    reset_peak_memory(device)  # report training's peak, not loading and encoding
    t0 = time.perf_counter()
    step = start_step
    while step < settings.max_steps:
        step_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        data_wait = 0.0
        for micro in range(settings.grad_accum):
            indices = sampler.next_batch()  # the position a checkpoint records: batches used, not prefetched
            wait_start = time.perf_counter()
            host_batch = next(batches)
            data_wait += time.perf_counter() - wait_start
            _check_in_step(dataset, indices, host_batch)
            if hasattr(sampler, "consumed"):  # a stream: the batch says where its readers are
                sampler.consumed(host_batch)
            if encode_batch is not None:  # cache.mode none: decoded images and captions -> features, here
                host_batch = add_extras(encode_batch(host_batch), extras)
            batch = batch_to_device(host_batch, device)
            # Seed the global RNG too (LoRA dropout draws from it): resume reproduces the same step.
            torch.manual_seed(settings.seed * 31 + step * settings.grad_accum + micro)
            g = step_generator(settings.seed, step * settings.grad_accum + micro, accelerator.process_index)
            last = micro == settings.grad_accum - 1
            # Only the last micro-batch all-reduces gradients across processes (DDP); the others accumulate locally.
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss = loss_step(
                        model, batch, c_clip_img=settings.c_clip_img, caption_dropout=settings.caption_dropout,
                        shift=settings.shift, offset=settings.offset_noise, generator=g,
                        method_inputs=method_inputs, method_cfg=method_cfg)
                accelerator.backward(loss / settings.grad_accum)
            loss_sum = loss_sum + loss.detach().float()
        mean_loss_t = loss_sum / settings.grad_accum
        if reduce_gradients is not None:
            reduce_gradients(params)
        grad_norm_t = _grad_norm(accelerator, params, settings.max_grad_norm)
        # every rank must agree, or DDP ranks would diverge
        bad = (~torch.isfinite(mean_loss_t) | ~torch.isfinite(grad_norm_t)).float().reshape(1)
        bad_ranks_t = accelerator.reduce(bad, "sum")
        mean_loss, grad_norm, bad_ranks = host_floats(mean_loss_t, grad_norm_t, bad_ranks_t)  # the step's one read
        finite = bad_ranks == 0
        if finite:
            optimizer.step()
            scheduler.step()
            nonfinite_in_a_row = 0
        else:
            nonfinite_in_a_row += 1
            result.skipped_nonfinite += 1
            events.emit("nonfinite", step=step + 1, loss=mean_loss, grad_norm=grad_norm)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        result.step = step
        if finite:
            result.losses.append(mean_loss)
        if nonfinite_in_a_row >= settings.max_nonfinite_steps:
            kept = _keep_sound_checkpoints(checkpoints, first_bad=step - nonfinite_in_a_row + 1, last_bad=step,
                                           is_main=accelerator.is_main_process)
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
                           "peak_memory_mb": peak_memory_mb(device), "nonfinite_skipped": result.skipped_nonfinite,
                           "data_wait_share": data_wait / max(seconds, 1e-9)}
                tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
                remaining = (settings.max_steps - step) * (time.perf_counter() - t0) / max(1, step - start_step)
                events.emit("step", step=step, max_steps=settings.max_steps, loss=mean_loss, lr=lr,
                            eta_seconds=round(remaining, 1), it_per_s=round(metrics["it_per_s"], 3),
                            peak_memory_mb=round(metrics["peak_memory_mb"], 1),
                            data_wait_share=round(metrics["data_wait_share"], 4))
        run_state.nonfinite_in_a_row = nonfinite_in_a_row
        run_state.skipped_steps_total = result.skipped_nonfinite
        if preview is not None and settings.preview_every and step % settings.preview_every == 0:
            preview(step)
        if evaluate is not None and settings.eval_every and step % settings.eval_every == 0 \
                and step < settings.max_steps:
            evaluate(step)
        # The last step is always checkpointed: it is the trained adapter (exports and `cascade-studio export`
        # are made from it), and a run killed during export resumes straight to exporting.
        due = step == settings.max_steps or (settings.checkpoint_every and step % settings.checkpoint_every == 0)
        if due:
            # Never let checkpoints of a diverging run push the last good one out (keep_checkpoints prunes).
            # The final step is still saved when the weights are finite: a skipped step leaves them as the last
            # good step made them, and the final checkpoint must match what is exported.
            healthy = nonfinite_in_a_row == 0 or step == settings.max_steps
            if healthy and all_finite(params):
                save_checkpoint(accelerator, checkpoints, step, optimizer, scheduler, sampler, run_state,
                                save_adapter, events)
            else:
                events.emit("warning", step=step, message="checkpoint skipped: the adapter or the last step is "
                            "not finite; the previous checkpoint is kept")
    bar.close()
    batches.close()  # stops the loader's workers
    result.seconds = time.perf_counter() - t0
    return result


def _keep_sound_checkpoints(checkpoints, first_bad: int, last_bad: int, is_main: bool) -> str:
    """Set aside the checkpoints whose weights made the non-finite streak, and say which one to resume from.

    Skipped steps do not update, so every step of the streak ran with the weights of step ``first_bad - 1``:
    non-finite on that many different batches, they are not sound even where each value is finite (an lr that
    blew them up to 1e26 overflows only in the next forward). Checkpoints from that step on are renamed
    ``unsound-step-N`` (kept for inspection, never resumed from); the last one before is the one to resume.
    """
    unsound = [path for path in checkpoints.list() if checkpoints.step_of(path) >= first_bad - 1]
    if is_main:
        for path in unsound:
            checkpoints.set_aside(path, f"the weights of this checkpoint gave a non-finite loss or gradient on every "
                                        f"step from {first_bad} to {last_bad}")
    good = [path for path in checkpoints.list() if path not in unsound]
    note = (f" ({', '.join(p.name for p in unsound)} held the weights that failed and were set aside as unsound-*)"
            if unsound else "")
    if good:
        return (f"The last sound checkpoint ({good[-1]}) is kept{note}; resume from it with --resume after fixing "
                "the recipe.")
    return f"No sound checkpoint was saved before the fault{note}; start the run again after fixing the recipe."


def all_finite(params) -> bool:
    """Whether every tensor in ``params`` is finite (one host read for all of them)."""
    bad = [(~torch.isfinite(p.detach())).sum() for p in params]
    return not bad or host_floats(torch.stack(bad).sum())[0] == 0


def _grad_norm(accelerator, params, max_norm: float) -> torch.Tensor:
    """The total gradient norm as a device tensor (clipped to ``max_norm`` when that is set); no host read."""
    if max_norm and max_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_norm)
        return norm if torch.is_tensor(norm) else torch.tensor(float(norm))
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=accelerator.device)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def save_checkpoint(accelerator, checkpoints, step, optimizer, scheduler, sampler, run_state, save_adapter, events):
    """Adapter tensors + optimizer + scheduler + sampler position, atomically (main process writes)."""
    accelerator.wait_for_everyone()
    sampler_state = sampler.state_dict()  # on every process: a stream gathers the positions of all of them
    if accelerator.is_main_process:
        state = dataclasses.replace(run_state, step=step, epoch=sampler.epoch, sampler_state=sampler_state)

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
                       load_adapter: Callable[[Path], None], lr: float | None = None,
                       weight_decay: float | None = None) -> RunState:
    """Adapter, optimizer state, schedule position and data position of checkpoint ``path``.

    The learning rate follows the *current* recipe (``lr``, ``weight_decay`` and the schedule the scheduler was
    built with): only the step count comes from the checkpoint, so a resume with a lower ``optimizer.lr`` trains
    at the lower rate. With an unchanged recipe this gives exactly the rate the uninterrupted run had.
    """
    load_adapter(path / "adapter.safetensors")
    base_lrs = list(scheduler.base_lrs)
    load_optimizer_state(optimizer, path / "optimizer.safetensors")
    sched = json.loads((path / "scheduler.json").read_text())
    sched.pop("lr_lambdas", None)
    scheduler.load_state_dict({**scheduler.state_dict(), **sched})
    if lr is not None:
        base_lrs = [lr] * len(base_lrs)
    scheduler.base_lrs = base_lrs
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, scheduler.lr_lambdas)]
    for group, base, rate in zip(optimizer.param_groups, base_lrs, rates):
        group["initial_lr"], group["lr"] = base, rate
        if weight_decay is not None and "weight_decay" in group:
            group["weight_decay"] = weight_decay
    scheduler._last_lr = rates  # what get_last_lr() reports until the next step
    state = checkpoints.load_run_state(path)
    if state.sampler_state:
        sampler.load_state_dict(state.sampler_state)
    return state


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the accelerator's peak memory afresh (the host's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory since :func:`reset_peak_memory`: allocated on a CUDA device, else the process's peak RSS."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                            else "cpu")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


__all__ = ["run_loop", "LoopSettings", "BatchPlan", "LoopResult", "InfiniteSampler", "collate", "add_extras",
           "save_checkpoint",
           "restore_checkpoint", "NonFiniteLossError", "heldout_loss", "peak_memory_mb"]
