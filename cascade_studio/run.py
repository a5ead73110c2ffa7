"""A training run, phase by phase. This is the one place that lists them in order:

config -> accelerator -> run folder lock -> tracking -> data + encode-once cache -> frozen base -> adapter ->
optimizer -> loop -> export -> end of run.

Everything else is delegated: ``config`` validates, ``data`` scans and caches, ``trainers`` loops and
checkpoints, ``adapters`` attaches and exports, ``tracking`` talks to MLflow.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .adapters import catalog
from .run_folder import RunFolder, RunFolderBusy


@dataclass
class RunResult:
    run_dir: Path
    run_id: str | None
    tracking_uri: str | None
    exports: list[Path] = field(default_factory=list)
    step: int = 0
    final_loss: float | None = None
    heldout_before: float | None = None
    heldout_after: float | None = None
    skipped_files: int = 0


def _method_fn(method_module, name: str):
    return getattr(method_module, name, None)


def split_holdout(records: list, fraction: float) -> tuple[list, list]:
    """Deterministic train/held-out split by a hash of each record's key (stable as the folder grows)."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    scored = sorted(records, key=lambda r: hashlib.sha256(str(r.key).encode()).hexdigest())
    n_hold = min(len(records) - 1, max(1, round(len(records) * fraction)))
    held = {id(r) for r in scored[:n_hold]}
    return [r for r in records if id(r) not in held], [r for r in records if id(r) in held]


def train(recipe_source: str | Path | dict, overrides: Sequence[str] = (), resume: bool = False,
          progress: bool = True) -> RunResult:
    """Run a recipe end to end and return where its outputs are."""
    from .config import load_recipe

    # 1. config: everything is validated before anything is created or started
    recipe = load_recipe(recipe_source, overrides=list(overrides))
    from .trainers.preflight import refuse_unusable_weights

    refuse_unusable_weights(recipe)  # weights there (files, hub cache) and of the right kind, from headers only
    folder = RunFolder.in_workspace(Path(recipe.workspace).resolve(), recipe.name)

    # 2. accelerator
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .launch import use_cpu_without_cuda

    use_cpu_without_cuda()  # `accelerate launch --config_file multi-gpu.yaml` on a machine without CUDA: gloo
    _forget_previous_precision()
    # The loop accumulates gradients itself (it controls the per-micro-batch seeds).
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision,
                              kwargs_handlers=distributed_settings(recipe))
    set_seed(recipe.train.seed)
    from .launch import fsdp_requested

    sharded = fsdp_requested() and accelerator.num_processes > 1
    if sharded:
        from .trainers.sharding import refuse_unshardable

        refuse_unshardable(recipe)
    if recipe.train.quantize_base != "none":
        # refuse an unsupported quantization mode before anything is encoded or loaded
        from .trainers.components import resolve_dtype
        from .trainers.quantize import check_quantization_supported

        check_quantization_supported(recipe.train.quantize_base, accelerator.device, resolve_dtype(recipe.model.dtype))

    # 2b. one owner per run folder: a second run (or --resume) of a running one is refused before it writes anything
    lock = _lock_run_folder(folder, accelerator)
    try:
        return _train_in_locked_folder(recipe, folder, accelerator, resume, progress, sharded)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Run:
    """What the phases of one run hand to each other (filled in order by the functions below)."""

    recipe: Any
    folder: RunFolder
    accelerator: Any
    resume: bool
    progress: bool
    sharded: bool = False  # FSDP: the frozen Stage C is sharded across the processes (trainers/sharding.py)
    is_main: bool = False
    checkpoints: Any = None
    latest: Path | None = None
    resume_changes: dict = field(default_factory=dict)
    run_state: Any = None
    events: Any = None
    tracker: Any = None
    result: RunResult | None = None
    method: Any = None  # the method's torch side (catalog record .load())
    method_cfg: Any = None
    models: Any = None
    context: Any = None
    data: Any = None  # (train_set, holdout_set, extras, preview_embeddings)
    encode_batch: Any = None  # cache.mode none: the loaded encoders, encoding each batch (BatchEncoder)
    model: Any = None
    unwrapped: Any = None
    adapter: Any = None
    optimizer: Any = None
    scheduler: Any = None
    sampler: Any = None
    start_step: int = 0
    holdout_batches: list | None = None

    @property
    def method_inputs(self):
        return _method_fn(self.method, "training_inputs")

    @property
    def loss_step(self):
        """The method's own training objective (hook ``training_loss``), else the published diffusion loss."""
        from .trainers.steps import diffusion_training_loss

        return _method_fn(self.method, "training_loss") or diffusion_training_loss


def _train_in_locked_folder(recipe, folder: RunFolder, accelerator, resume: bool, progress: bool,
                            sharded: bool = False) -> RunResult:
    """The phases after the run folder is locked (``train``), one function each, in order."""
    run = _Run(recipe, folder, accelerator, resume, progress, sharded=sharded, is_main=accelerator.is_main_process)
    _open_record(run)  # 3. checkpoints and resume checks (nothing written yet), events, MLflow
    status = "FAILED"
    try:
        _write_recipe(run)
        _prepare(run)  # 4. data + encode-once cache; encoders are freed before training starts
        _build_adapter(run)  # 5. frozen base, 6. adapter
        _build_optimizer(run)  # 7. optimizer, schedule, data order; restored on --resume
        loop = _train_loop(run)  # 8. loop, with held-out loss before and previews
        _finish(run, loop)  # 9. export (main process), with the held-out loss after training
        status = "FINISHED"
        return run.result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        run.events.emit("failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=5))
        raise
    finally:
        _end_record(run, status)  # 10. end of run, truthfully


def _open_record(run: _Run) -> None:
    """Find the checkpoint to resume from and refuse what cannot be resumed, before anything is written; then
    open the event log and the MLflow run (failing fast when the server is unreachable)."""
    from .tracking import NullTracker, Tracker
    from .trainers.checkpoints import RunState
    from .trainers.events import EventLog

    recipe, folder, is_main = run.recipe, run.folder, run.is_main
    run.checkpoints = folder.checkpoint_manager(keep=recipe.train.keep_checkpoints)
    run.latest = run.checkpoints.latest(clean=is_main) if run.resume else None  # only the owner cleans up
    if run.resume and run.latest is None and is_main:
        print(f"--resume: no complete checkpoint in {folder.checkpoints_dir}; starting from step 0", flush=True)
    # Every rank checks (not only the main one), or the other ranks would go on and wait for it forever.
    if not run.resume and run.checkpoints.list():
        raise SystemExit(f"{folder.path} already has checkpoints from an earlier run named {recipe.name!r}: pass "
                         "--resume to continue it, or set name=<new name> to start a new run")
    run.resume_changes = _check_resume(folder, recipe) if run.latest is not None else {}
    run.run_state = run.checkpoints.load_run_state(run.latest) if run.latest is not None else RunState()
    if run.resume and run.run_state.mlflow_run_id is None:
        # Killed before its first checkpoint: continue the same MLflow run rather than leave it RUNNING forever.
        ids = folder.mlflow_run_ids()
        run.run_state.mlflow_run_id = ids[-1] if ids else None
    run.events = EventLog(folder.path, enabled=is_main)
    run.tracker = NullTracker()
    if is_main and recipe.tracking.enabled:
        run.tracker = Tracker.start(
            uri=recipe.tracking.uri, experiment=recipe.tracking.experiment,
            run_name=recipe.tracking.run_name or recipe.name,
            tags={"method": recipe.adapter.method, "preset": recipe.model.preset,
                  "base_model": str(recipe.model.stage_c or recipe.model.repo_id or recipe.model.preset)},
            workspace=Path(recipe.workspace).resolve(), run_dir=folder.path,
            resume_run_id=run.run_state.mlflow_run_id)
        run.run_state.mlflow_run_id = run.tracker.run_id
    run.result = RunResult(run_dir=folder.path, run_id=getattr(run.tracker, "run_id", None),
                           tracking_uri=getattr(run.tracker, "tracking_uri", None))
    run.events.emit("started", run_dir=str(folder.path), run_id=run.result.run_id,
                    tracking_uri=run.result.tracking_uri, method=recipe.adapter.method, resume=bool(run.latest))


def _write_recipe(run: _Run) -> None:
    """recipe.yaml in the run folder and MLflow (parameters only for a new run)."""
    if not run.is_main:
        return
    from .config import dump_recipe_yaml, recipe_to_dict

    run.folder.path.mkdir(parents=True, exist_ok=True)
    run.folder.recipe_file.write_text(dump_recipe_yaml(run.recipe))
    if not run.latest:
        run.tracker.log_params(recipe_to_dict(run.recipe))
    run.tracker.log_artifact(run.folder.recipe_file)


def _prepare(run: _Run) -> None:
    """The base's components, the method, and the encoded data."""
    from .adapters.registry import AdapterContext
    from .trainers.components import BaseModels

    recipe = run.recipe
    run.models = BaseModels(recipe.model, device=run.accelerator.device)
    run.method = catalog.recipe_method(recipe).load()
    run.method_cfg = catalog.method_section(recipe)
    # The adapter context comes from the preset (not the loaded weights) so the big Stage C is not resident
    # while the encoders fill the cache; the weights' fingerprint is added once Stage C is loaded.
    stage_c_config = dict(run.models.preset.stage_c)
    stage_c_config["c_hidden"] = list(stage_c_config.get("c_hidden", [2048, 2048]))
    run.context = AdapterContext(preset=recipe.model.preset, base_fingerprint="unknown",
                                 stage_c_config=stage_c_config, extra={"models": run.models})
    run.events.emit("phase", phase="data")
    if recipe.cache.mode == "none":
        train_set, holdout_set, extras, skipped, preview_embeddings, run.encode_batch = _prepare_uncached_data(
            recipe, run.models, run.method, run.method_cfg, run.context, run.accelerator)
    else:
        train_set, holdout_set, extras, skipped, preview_embeddings = _prepare_data(
            recipe, run.models, run.method, run.method_cfg, run.context, run.accelerator, run.folder.path,
            run.progress, events=run.events)
    run.data = (train_set, holdout_set, extras, preview_embeddings)
    run.result.skipped_files = skipped
    sizes = {"skipped_files": skipped, "holdout_samples": len(holdout_set) if holdout_set is not None else 0}
    if recipe.data.streaming:
        sizes["stream_shards"] = len(train_set.source)
    else:
        sizes["train_samples"] = len(train_set)
    run.tracker.log_metrics(sizes, step=0)


def _build_adapter(run: _Run) -> None:
    """The frozen base (fingerprinted, then quantized if asked) wrapped with a fresh adapter of the method."""
    import torch

    from .adapters.base import AdaptedStageC
    from .devices import compiles_blocks

    recipe = run.recipe
    run.events.emit("phase", phase="model")
    stage_c = run.models.stage_c()
    run.context.base_fingerprint = run.models.fingerprint()  # recorded in the adapter: it loads on this base only
    if recipe.train.quantize_base != "none":
        from .trainers.quantize import quantize_frozen_linears

        quantize_frozen_linears(stage_c, recipe.train.quantize_base)
    stage_c.checkpointing = recipe.train.checkpointing_mode
    if stage_c.checkpointing != "none" and run.is_main:
        print(f"[cascade-studio] train.checkpointing: {stage_c.checkpointing} (activations recomputed in the "
              "backward pass)", flush=True)
    if compiles_blocks(recipe.train.compile, run.accelerator.device) and not run.sharded:
        count = stage_c.compile_blocks()
        if run.is_main:
            print(f"[cascade-studio] train.compile: {count} Stage C blocks compiled on first use (the first steps "
                  "include the compile time)", flush=True)
    run.model = AdaptedStageC(stage_c)
    # The fresh adapter's random init must not depend on what ran before it (a cold cache runs encoders).
    torch.manual_seed(recipe.train.seed)
    run.adapter = run.method.create_adapter(run.method_cfg, run.model, run.context)
    n_trainable = sum(p.numel() for p in run.model.trainable_parameters())
    if run.is_main:
        print(f"[cascade-studio] {recipe.adapter.method}: {n_trainable:,} trainable parameters on a frozen "
              f"{recipe.model.preset} Stage C", flush=True)
        _report_resident_memory(recipe, stage_c, run.model, run.accelerator.device)
    run.tracker.log_params({"trainable_parameters": n_trainable})


def _build_optimizer(run: _Run) -> None:
    """Optimizer, schedule and data order, prepared by accelerate; a resume restores them and the adapter."""
    from .trainers.loop import InfiniteSampler, restore_checkpoint
    from .trainers.optim import build_optimizer, build_scheduler

    recipe, accelerator = run.recipe, run.accelerator
    if run.sharded:
        _shard(run)
    optimizer = build_optimizer(run.model.trainable_parameters(), recipe.optimizer)
    run.scheduler = build_scheduler(optimizer, recipe.schedule, recipe.train.max_steps)
    from accelerate.utils import DistributedType

    if run.sharded or accelerator.distributed_type == DistributedType.FSDP:
        # not accelerator.prepare (its FSDP plugin would shard the adapter too): see trainers/sharding.py; an FSDP
        # launch of one process shards nothing and trains as one process
        run.optimizer = optimizer
    else:
        run.model, run.optimizer = accelerator.prepare(run.model, optimizer)
    run.unwrapped = accelerator.unwrap_model(run.model)
    if recipe.data.streaming:
        from .data.streaming import StreamPosition

        run.sampler = StreamPosition(accelerator.num_processes, recipe.train.num_workers)
        if run.is_main:
            print(f"[cascade-studio] streaming {len(run.data[0].source)} shard(s) through {run.data[0].readers} "
                  f"reader(s) ({accelerator.num_processes} process(es) x {max(1, recipe.train.num_workers)}); the "
                  f"data order follows train.seed={recipe.train.seed} and that layout", flush=True)
    else:
        run.sampler = InfiniteSampler(len(run.data[0]), recipe.train.batch_size, recipe.train.seed,
                                      num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    _record_batch_plan(run)
    if run.latest is None:
        return
    run.run_state = restore_checkpoint(run.checkpoints, run.latest, run.optimizer, run.scheduler, run.sampler,
                                       functools.partial(_load_adapter_tensors, run.adapter),
                                       lr=recipe.optimizer.lr, weight_decay=recipe.optimizer.weight_decay)
    changes = run.resume_changes
    if changes and run.is_main:
        said = ", ".join(f"{path} {old!r} -> {new!r}" for path, (old, new) in changes.items())
        print(f"[cascade-studio] --resume applies the changed settings: {said}", flush=True)
        run.events.emit("resume_changes", step=run.run_state.step,
                        changes={path: [old, new] for path, (old, new) in changes.items()})
        run.tracker.set_tags({f"resume.step{run.run_state.step}.{path}": f"{old!r} -> {new!r}"
                              for path, (old, new) in changes.items()})
    run.run_state.mlflow_run_id = run.result.run_id or run.run_state.mlflow_run_id
    run.start_step = run.run_state.step
    if run.is_main:
        print(f"[cascade-studio] resumed from {run.latest} at step {run.start_step}", flush=True)


def _shard(run: _Run) -> None:
    """FSDP: shard the frozen Stage C across the processes and say what each now holds."""
    from .devices import compiles_blocks
    from .trainers.sharding import shard_frozen_base, sharded_bytes

    compiles = compiles_blocks(run.recipe.train.compile, run.accelerator.device)  # skipped by _build_adapter
    shard_frozen_base(run.model, run.accelerator.device)
    held, whole = sharded_bytes(run.model)
    if run.is_main:
        print(f"[cascade-studio] FSDP: the frozen Stage C is sharded over {run.accelerator.num_processes} processes "
              f"(this one holds {held / 2**20:.2f} of its {whole / 2**20:.2f} MiB); the adapter is whole on every "
              "process; previews are off (the main process alone cannot run a sharded model)"
              + ("; train.compile is off (compiled blocks are not sharded)" if compiles else ""), flush=True)


def _record_batch_plan(run: _Run) -> None:
    """Say at start what a step and the schedule mean at this world size (main process): printed, in the run's
    events, and as MLflow parameters of a new run (a resume adds an event; MLflow parameters cannot change)."""
    from .config.schema import accumulation
    from .trainers.loop import BatchPlan

    recipe = run.recipe
    plan = BatchPlan(per_device_batch=recipe.train.batch_size, processes=run.accelerator.num_processes,
                     grad_accum=accumulation(recipe.train, run.accelerator.num_processes), max_steps=recipe.train.max_steps, seed=recipe.train.seed,
                     train_samples=None if recipe.data.streaming else len(run.data[0]),
                     workers=max(1, recipe.train.num_workers) if recipe.data.streaming else None)
    if not run.is_main:
        return
    print(f"[cascade-studio] {plan.describe()}", flush=True)
    earlier = [e for e in run.folder.events() if e.get("event") == "batch_plan"] if run.latest is not None else []
    run.events.emit("batch_plan", **plan.params())
    if run.latest is None:
        run.tracker.log_params(plan.params())
    elif earlier and earlier[-1].get("global_batch") != plan.global_batch:
        # A resume on another number of processes: allowed, but the rest of the run is not the uninterrupted one.
        was = earlier[-1]
        print(f"[cascade-studio] note: resumed with a global batch of {plan.global_batch} ({plan.processes} "
              f"process(es)); the run had {was.get('global_batch')} ({was.get('processes')} process(es)) before: "
              "the steps from here take more or fewer samples than the uninterrupted run's", flush=True)
        run.tracker.set_tags({f"resume.step{run.run_state.step}.global_batch":
                              f"{was.get('global_batch')} -> {plan.global_batch}"})


def _save_adapter_tensors(adapter, path: Path) -> None:
    from .adapters.files import save_adapter_tensors

    save_adapter_tensors(adapter.adapter_state_dict(), path, adapter.metadata())


def _load_adapter_tensors(adapter, path: Path) -> None:
    from .adapters.files import load_adapter_tensors

    tensors, _ = load_adapter_tensors(path)
    adapter.load_adapter_state_dict(tensors)


def _heldout(run: _Run) -> float | None:
    """The held-out loss of the adapter now (None without a held-out split)."""
    from .trainers.loop import heldout_loss

    if run.holdout_batches is None:  # collated once, used before and after training
        _, holdout_set, extras, _ = run.data
        run.holdout_batches = _holdout_batches(holdout_set, extras, run.recipe.train.batch_size, run.encode_batch)
    batches = run.holdout_batches
    if not batches:
        return None
    import torch

    # Dropout off while measuring; then every module gets its own mode back (the loop may go on training).
    modes = [(module, module.training) for module in run.unwrapped.modules()]
    run.unwrapped.eval()
    try:
        with torch.no_grad():
            return heldout_loss(run.unwrapped, batches, c_clip_img=run.models.c_clip_img(),
                                shift=run.recipe.train.shift, seed=run.recipe.train.seed,
                                method_inputs=run.method_inputs, method_cfg=run.method_cfg,
                                loss_step=run.loss_step)
    finally:
        for module, training in modes:
            module.training = training


def _log_heldout(run: _Run, step: int) -> float | None:
    """The held-out loss at ``step`` (before training, every ``train.eval_every`` steps, after training), logged
    to MLflow and the run's events."""
    loss = _heldout(run)
    if loss is not None:
        run.tracker.log_metrics({"holdout_loss": loss}, step=step)
        run.events.emit("holdout", step=step, loss=loss)
    return loss


def _train_loop(run: _Run):
    """The held-out loss before training, the preview function, then the loop (Stage C stays in eval mode: no
    dropout in the frozen base; adapters decide their own mode)."""
    from .trainers.loop import LoopSettings, add_extras, collate, run_loop

    recipe, result, is_main = run.recipe, run.result, run.is_main
    train_set, holdout_set, extras, preview_embeddings = run.data
    measures = is_main or run.sharded  # a sharded model's forward needs every process (only the main one logs)
    if run.start_step == 0 and measures:
        result.heldout_before = _log_heldout(run, 0)
    elif is_main:
        result.heldout_before = _logged_holdout_before(run.folder.path)
    preview = None
    if recipe.preview.every and is_main and not run.sharded:
        from .trainers.previews import make_preview_fn

        reference = None
        if run.method_inputs is not None:  # the adapter's own inputs (a control, an image prompt) for previews
            source = holdout_set if holdout_set is not None and len(holdout_set) else train_set
            sample = collate([source.first_sample() if recipe.data.streaming else source[0]])
            reference = add_extras(run.encode_batch(sample) if run.encode_batch is not None else sample, extras)
        preview = make_preview_fn(recipe, run.models, run.unwrapped, run.adapter, run.tracker, run.events,
                                  run.folder.path, preview_embeddings, reference, run.method_inputs, run.method_cfg)
    settings = LoopSettings.from_recipe(recipe, c_clip_img=run.models.c_clip_img(),
                                       processes=run.accelerator.num_processes)
    run.events.emit("phase", phase="train")
    run.model.train()
    run.unwrapped.stage_c.eval()
    loop = run_loop(accelerator=run.accelerator, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                    dataset=train_set, sampler=run.sampler, settings=settings, tracker=run.tracker,
                    events=run.events, checkpoints=run.checkpoints, run_state=run.run_state,
                    method_inputs=run.method_inputs, method_cfg=run.method_cfg, extras=extras, loss_step=run.loss_step,
                    encode_batch=run.encode_batch,
                    save_adapter=functools.partial(_save_adapter_tensors, run.adapter), preview=preview,
                    evaluate=functools.partial(_log_heldout, run) if measures and recipe.train.eval_every else None,
                    start_step=run.start_step, progress=run.progress,
                    reduce_gradients=_sharded_gradient_mean() if run.sharded else None)
    result.step = loop.step
    result.final_loss = loop.losses[-1] if loop.losses else None
    return loop


def _sharded_gradient_mean():
    from .trainers.sharding import average_gradients

    return average_gradients


def _finish(run: _Run, loop) -> None:
    """On the main process, once every process is done: refuse a non-finite adapter, log the held-out loss after
    training, export the recipe's formats."""
    run.accelerator.wait_for_everyone()
    if run.sharded:  # every process runs the sharded model's forward; the main one logs
        run.result.heldout_after = _log_heldout(run, loop.step)
    if not run.is_main:
        return
    _refuse_nonfinite(run.unwrapped)
    if run.recipe.data.streaming:
        _report_stream_skips(run, loop.step)
    if not run.sharded:
        run.result.heldout_after = _log_heldout(run, loop.step)
    run.result.exports = _export(run.recipe, run.method, run.adapter, run.context, run.folder, run.tracker)
    run.events.emit("exported", paths=[str(p) for p in run.result.exports])


def _report_stream_skips(run: _Run, step: int) -> None:
    """A stream's bad samples are found while training: their count over every process (the final checkpoint
    gathered it) becomes the run's ``skipped_files``, as a scan's count does."""
    latest = run.checkpoints.latest()
    stream = run.checkpoints.load_run_state(latest).sampler_state.get("stream", {}) if latest else {}
    run.result.skipped_files = int(stream.get("skipped", 0))
    run.tracker.log_metrics({"skipped_files": run.result.skipped_files}, step=step)
    if run.result.skipped_files:
        print(f"[cascade-studio] {run.result.skipped_files} streamed sample(s) skipped as unusable (the first of "
              "each reader are named in the log above)", flush=True)


def _end_record(run: _Run, status: str) -> None:
    """End the MLflow run and the event log with what really happened."""
    run.tracker.end(status)
    result = run.result
    if status == "FINISHED":
        run.events.emit("finished", step=result.step, exports=[str(p) for p in result.exports],
                        run_id=result.run_id, heldout_before=result.heldout_before,
                        heldout_after=result.heldout_after)
    elif status == "KILLED":
        run.events.emit("killed")


def _report_resident_memory(recipe, stage_c, model, device) -> None:
    """Say before the first step what the run keeps resident, and warn when that cannot fit the GPU."""
    import torch

    from .trainers.plan import resident_memory, resident_memory_report

    memory = resident_memory(stage_c, list(model.trainable_parameters()), recipe.optimizer.name)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    line, tight = resident_memory_report(memory, recipe.optimizer.name, total, recipe.train.quantize_base,
                                         recipe.train.checkpointing_mode)
    print(f"[cascade-studio] {'warning: ' if tight else ''}{line}", flush=True)


def _forget_previous_precision() -> None:
    """Let a second ``train()`` in the same process (a notebook, a test) use another mixed precision.

    accelerate keeps the precision in a process-wide singleton and refuses a different one later. Only that part
    is reset; the process group (several processes) is kept, as accelerate's own test cases do it.
    """
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None and AcceleratorState._shared_state:
        reset(reset_partial_state=False)


def distributed_settings(recipe) -> list:
    """accelerate's handlers for a multi-process run (harmless in one process).

    * The process-group timeout: the other ranks wait at a barrier while the main process fills the encode-once
      cache, which can take far longer than NCCL's default (10 minutes) on a large folder; the recipe's
      ``train.distributed_timeout_minutes`` sets it.
    * ``find_unused_parameters=False``: every method's trainable parameters take part in every step's graph, also
      when a micro-batch drops all of its image prompts or captions (the IP-Adapter still runs its branch then,
      with an exact zero result; ``tests/test_gpu_ready_ip_quant.py`` checks every parameter gets a gradient and
      ``tests/test_gpu_ready.py`` runs it under 2-process DDP).
      DDP's slower search for unused parameters is therefore not needed.
    """
    from datetime import timedelta

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(minutes=recipe.train.distributed_timeout_minutes)),
            DistributedDataParallelKwargs(find_unused_parameters=False)]


def _lock_run_folder(folder: RunFolder, accelerator):
    """Only the main process owns the run folder (``RunFolder.lock``); with several processes it tells the others
    whether it got the folder, so every rank stops together with the same message instead of waiting at a barrier
    for a main process that has gone. Returns the lock (main process) or None."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = folder.lock()
        except RunFolderBusy as exc:
            refusal = str(exc)
        else:
            if lock.stale is not None:
                print(f"[cascade-studio] {folder.path} was locked by a run that is gone ({lock.stale.describe()}); "
                      "taking it over", flush=True)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal], from_process=0)[0]
    if refusal is not None:
        raise RunFolderBusy(refusal)
    return lock


def _check_resume(folder: RunFolder, recipe) -> dict:
    """The settings this resume changes against the recipe the run was started with (its ``recipe.yaml``);
    refuses the ones a resume cannot change (``config.resume``) with a RecipeError."""
    from .config import RecipeError, load_recipe
    from .config.resume import resume_changes

    started_with = folder.recipe_file
    if not started_with.is_file():
        return {}
    try:
        previous = load_recipe(started_with)
    except RecipeError:
        return {}  # written by another version of the studio: nothing to compare against
    return resume_changes(previous, recipe)


def _logged_holdout_before(run_dir: Path) -> float | None:
    """The untrained adapter's held-out loss, measured by the process that started this run."""
    from .trainers.events import read_events

    values = [e["loss"] for e in read_events(run_dir) if e.get("event") == "holdout" and e.get("step") == 0]
    return values[0] if values else None


def _refuse_nonfinite(model) -> None:
    from .trainers.loop import NonFiniteLossError, all_finite

    if not all_finite(model.trainable_parameters()):
        raise NonFiniteLossError("the trained adapter has NaN/inf weights, so it is not exported; lower "
                                 "optimizer.lr and resume from an earlier checkpoint with --resume")


def _feature_encoders(models, method, method_cfg, context) -> list:
    """The run's feature encoders: the base's latents and text, then the method's own (hook ``feature_encoders``)."""
    from .trainers.features import base_feature_encoders

    encoders = base_feature_encoders(models)
    extra_encoders = _method_fn(method, "feature_encoders")
    if extra_encoders is not None:
        encoders += extra_encoders(method_cfg, context, models)
    return encoders


def _scanned_records(recipe, accelerator):
    """Scan the source (skips reported by the main process) and split off the held-out records."""
    from .data import scan_source

    scan = scan_source(recipe.data, control_column=catalog.control_column(recipe))
    if accelerator.is_main_process:
        for item in scan.skipped[:20]:
            print(f"[cascade-studio] skipped {item.path}: {item.reason}", flush=True)
        if len(scan.skipped) > 20:
            print(f"[cascade-studio] ... and {len(scan.skipped) - 20} more skipped files", flush=True)
        if scan.missing_caption_warning():
            print(f"[cascade-studio] warning: {scan.missing_caption_warning()}", flush=True)
    records = list(scan.records)
    if recipe.data.max_images:
        records = records[: recipe.data.max_images]
    train_records, holdout_records = split_holdout(records, recipe.data.holdout_fraction)
    return scan, train_records, holdout_records


def _prepare_uncached_data(recipe, models, method, method_cfg, context, accelerator):
    """``cache.mode: none``: decoded samples (scanned records, or a stream) and the encoders, kept loaded to
    encode each batch in the training process. Returns what ``_prepare_data`` does and the ``BatchEncoder``."""
    from .data import training_preprocessing
    from .data.decoded import RecordImages
    from .data.streaming import StreamingDataset, open_stream_source
    from .trainers.features import BatchEncoder

    preprocessing = training_preprocessing(recipe.data)
    encode_batch = BatchEncoder(_feature_encoders(models, method, method_cfg, context))
    with_control = any(e.inputs == "control_image" for e in encode_batch.encoders)
    skipped, holdout_set = 0, None
    if recipe.data.streaming:
        source = open_stream_source(recipe.data, catalog.control_column(recipe))
        train_set = StreamingDataset(source, preprocessing=preprocessing, max_pixels=recipe.data.max_pixels,
                                     with_control=with_control, batch_size=recipe.train.batch_size,
                                     seed=recipe.train.seed, buffer=recipe.data.shuffle_buffer,
                                     rank=accelerator.process_index, processes=accelerator.num_processes,
                                     workers=recipe.train.num_workers)
    else:
        scan, train_records, holdout_records = _scanned_records(recipe, accelerator)
        skipped = len(scan.skipped)
        train_set = RecordImages(train_records, preprocessing, with_control)
        holdout_set = RecordImages(holdout_records, preprocessing, with_control) if holdout_records else None
    extras = {f"null_{k}": v for k, v in encode_batch.null_features().items()}
    preview_embeddings = None
    if recipe.preview.every and accelerator.is_main_process:
        from .trainers.previews import preview_text

        preview_embeddings = preview_text(models.text_encoder(), list(recipe.preview.prompts))
    return train_set, holdout_set, extras, skipped, preview_embeddings, encode_batch


def _prepare_data(recipe, models, method, method_cfg, context, accelerator, run_dir: Path, progress: bool,
                  events=None):
    """Scan the source, split off the held-out set, fill the cache (main process first), free the encoders."""
    from .data import build_cache, training_preprocessing

    scan, train_records, holdout_records = _scanned_records(recipe, accelerator)
    cache_dir = Path(recipe.cache.dir) if recipe.cache.dir else Path(recipe.workspace).resolve() / "cache"
    if not recipe.cache.enabled:
        cache_dir = RunFolder(run_dir).features_dir  # private to this run; still encoded once per run
    preprocessing = training_preprocessing(recipe.data)

    def build(records_subset):
        encoders = _feature_encoders(models, method, method_cfg, context)
        if events is not None:
            # the studio's Data page reads this to show how much of a folder is cached (without loading torch)
            events.emit("cache", encoder_identities=[e.identity for e in encoders], preprocessing=preprocessing,
                        data_path=str(Path(recipe.data.path).resolve()) if recipe.data.path else None,
                        cache_dir=str(cache_dir))
        return build_cache(records_subset, encoders, cache_dir, preprocessing=preprocessing,
                           progress=progress and accelerator.is_main_process, share=share,
                           barrier=accelerator.wait_for_everyone if share[1] > 1 else None)

    if recipe.cache.mode == "sharded":
        # Every process encodes its share of what is missing, in parallel, into the one cache.
        share = (accelerator.process_index, accelerator.num_processes)
        train_set = build(train_records)
        holdout_set = build(holdout_records) if holdout_records else None
    else:
        # The main process encodes; the others then find every entry cached and run no encoder.
        share = (0, 1)
        with accelerator.main_process_first():
            train_set = build(train_records)
            holdout_set = build(holdout_records) if holdout_records else None
    _report_encoded(accelerator, [train_set, holdout_set], cache_dir, recipe.cache.mode)
    preview_embeddings = None
    if recipe.preview.every and accelerator.is_main_process:
        from .trainers.previews import preview_text

        preview_embeddings = preview_text(models.text_encoder(), list(recipe.preview.prompts))
    models.free("text_encoder", "effnet", "image_encoder", "hint")
    null = train_set.null_features()
    extras = {f"null_{k}": v for k, v in null.items()}
    return train_set, holdout_set, extras, len(scan.skipped), preview_embeddings


def _report_encoded(accelerator, datasets, cache_dir: Path, mode: str) -> None:
    """The main process says how many cache entries each process encoded (0 everywhere: all reused)."""
    encoded = sum(d.encoded for d in datasets if d is not None)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        counts = gather_object([encoded])
    else:
        counts = [encoded]
    if accelerator.is_main_process:
        each = " + ".join(str(c) for c in counts)
        print(f"[cascade-studio] cache ({mode}) {cache_dir}: {sum(counts)} entries encoded"
              f"{f' ({each} by process)' if len(counts) > 1 else ''}", flush=True)


def _holdout_batches(holdout_set, extras, batch_size: int, encode_batch=None) -> list[dict]:
    if holdout_set is None:
        return []
    from .trainers.loop import add_extras, collate

    items = [holdout_set[i] for i in range(len(holdout_set))]
    batches = [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    if encode_batch is not None:
        batches = [encode_batch(batch) for batch in batches]
    return [add_extras(batch, extras) for batch in batches]


def _export(recipe, method, adapter, context, folder: RunFolder, tracker) -> list[Path]:
    exports = []
    meta = {"cascade_studio.recipe_name": recipe.name, "cascade_studio.version": _version()}
    record = catalog.recipe_method(recipe)
    out_dir = Path(recipe.export.dir) if recipe.export.dir else folder.export_dir
    for name in catalog.export_formats(recipe):
        fmt = record.export_format(name)  # validation refused the formats the method lacks
        path = method.export_adapter(adapter, fmt.target(out_dir, folder.export_stem(run_name=recipe.name)),
                                     fmt.name, meta)
        exports.append(Path(path))
        tracker.log_artifact(path, artifact_path="adapter")
    return exports


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cascade_studio.train <recipe> [overrides] [--resume]`` (also used by accelerate launch)."""
    import argparse

    parser = argparse.ArgumentParser(prog="cascade_studio.train", description="Train an adapter from a recipe.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=200")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest good checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    args = parser.parse_args(argv)
    from .config import RecipeError

    # A cancel from the studio (SIGTERM) ends the run as KILLED, with its MLflow status said truthfully.
    import signal

    def _terminate(signum, frame):
        # Later SIGTERMs are ignored so they cannot cut short the cleanup that marks the run KILLED (a cancel
        # that hangs still gets SIGKILL from the studio after its grace period).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = train(args.recipe, args.overrides, resume=args.resume, progress=not args.no_progress)
    except RecipeError as exc:
        print(f"recipe problems:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[cascade-studio] interrupted: the run is marked KILLED; continue it with --resume", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _user_message(exc)
        if message is None or os.environ.get("CASCADE_STUDIO_DEBUG"):
            raise
        # A known failure says what to do in its message; the traceback is in the run's events.jsonl.
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)  # an in-process caller (tests, a notebook) gets its handler back
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(result)
    return 0


def _known_errors() -> tuple[type[BaseException], ...]:
    """Failures whose message tells the user what to do (no traceback needed)."""
    from .adapters.base import AdapterMismatchError
    from .data import CacheError, DataSourceError
    from .models.loading import WeightsError
    from .tracking import TrackingError
    from .trainers.atomic import DiskFullError
    from .trainers.checkpoints import CheckpointError
    from .trainers.loop import NonFiniteLossError
    from .trainers.quantize import QuantizationUnsupportedError
    from .trainers.sharding import ShardingUnsupportedError

    return (AdapterMismatchError, CacheError, DataSourceError, TrackingError, DiskFullError, CheckpointError,
            NonFiniteLossError, WeightsError, QuantizationUnsupportedError, ShardingUnsupportedError, RunFolderBusy)


def _worker_message(message: str, kind: str) -> str:
    """A DataLoader worker's error as its own message: torch raises it again in the training process as
    "Caught <kind> in DataLoader worker process N. Original Traceback ... <kind>: <message>"."""
    if not message.startswith(f"Caught {kind} in DataLoader worker") or f"{kind}: " not in message:
        return message
    return message.rsplit(f"{kind}: ", 1)[1].strip()


def _user_message(exc: BaseException) -> str | None:
    """The message to show for a failure the user can act on, or None for a bug (shown with its traceback)."""
    if isinstance(exc, _known_errors()):
        # OSError subclasses (DiskFullError) print as "[Errno 28] ...: 'path'"; the message alone reads better.
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return _worker_message(message, type(exc).__name__)
    from .trainers.atomic import as_disk_full

    # Disk full outside a checkpoint (cache shards, exports): raw OSErrors and safetensors' "(os error 28)".
    where = getattr(exc, "filename", None)  # None: the message then guesses no filesystem
    full = as_disk_full(exc, where, kept="Completed checkpoints are intact.")
    return full.strerror if full is not None else None


def print_summary(result: RunResult) -> None:
    print(f"[cascade-studio] run folder: {result.run_dir}")
    if result.run_id:
        print(f"[cascade-studio] MLflow run {result.run_id} at {result.tracking_uri} "
              f"(browse: mlflow ui --backend-store-uri {result.tracking_uri})")
    if result.heldout_before is not None and result.heldout_after is not None:
        change = 100.0 * (result.heldout_after - result.heldout_before) / max(result.heldout_before, 1e-12)
        print(f"[cascade-studio] held-out loss {result.heldout_before:.4f} -> {result.heldout_after:.4f} "
              f"({change:+.1f}%)")
    for path in result.exports:
        print(f"[cascade-studio] adapter: {path}")
