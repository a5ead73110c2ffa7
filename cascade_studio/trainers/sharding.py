"""FSDP for adapter training: the frozen Stage C sharded across the processes, the adapter whole on every one.

An FSDP config (``assets/accelerate/fsdp.yaml``; accelerate's launcher then sets ``ACCELERATE_USE_FSDP``) makes
the run shard here, with torch's FSDP2 ``fully_shard``, rather than through ``accelerator.prepare``:

* accelerate 1.16 applies its FSDP plugin on GPUs only: on a CPU (``MULTI_CPU``, gloo) it ignores the plugin and
  wraps the model in DDP (``AcceleratorState`` switches to ``DistributedType.FSDP`` only from the GPU-like
  distributed types), while ``fully_shard`` itself runs on a CPU device mesh over gloo. One path on every device
  is the one the tests run.
* Every Stage C block (and what is left, at the root) is one FSDP unit: a process keeps 1/N of its frozen weights
  and gathers the block only while it runs (and again in the backward pass when
  ``fsdp_reshard_after_forward`` is true, the default).
* The adapter's parameters are ``ignored_params``: whole on every process, so checkpoints, exports and the
  optimizer see plain tensors exactly as under DDP; :func:`average_gradients` all-reduces their gradients once per
  optimizer step (what DDP does), so the trained adapter equals the DDP run's.

Every forward of the sharded model is collective: every process must run it (held-out losses are measured on every
process; previews, which only the main process makes, are off).
"""
from __future__ import annotations

import os

import torch
from torch import nn


class ShardingUnsupportedError(RuntimeError):
    """A recipe setting that FSDP cannot run with; the message says what to change."""


def refuse_unshardable(recipe) -> None:
    """The settings an FSDP run cannot honour, refused before anything is loaded. (fp16, whose loss scaler would
    need accelerate's prepared optimizer, is refused for every run by the recipe's validation.)"""
    problems = []
    if recipe.train.quantize_base != "none":
        problems.append(f"train.quantize_base={recipe.train.quantize_base} (quantized weights cannot be sharded: "
                        "use quantize_base=none, FSDP already splits the frozen base across the devices)")
    if problems:
        raise ShardingUnsupportedError("an FSDP launch cannot use " + "; ".join(problems))


def _reshard_after_forward() -> bool:
    """``fsdp_config.fsdp_reshard_after_forward`` of the launch config (accelerate's launcher exports it)."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("1", "true", "yes")


def _blocks(stage_c: nn.Module) -> list[nn.Module]:
    """Stage C's residual, timestep and attention blocks, the units that are gathered one at a time."""
    units = []
    for levels in (stage_c.down_blocks, stage_c.up_blocks):
        for level in levels:
            units.extend(level)
    return units


def shard_frozen_base(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model.stage_c``'s frozen weights across the process group, leaving trainable parameters whole.

    Returns the same module (``fully_shard`` changes it in place). Call it after the adapter is attached and before
    the optimizer is built (the trainable parameters keep their identity either way).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    trainable = {p for p in model.parameters() if p.requires_grad}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reshard = _reshard_after_forward()
    for block in _blocks(model.stage_c):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, ignored_params=trainable)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, ignored_params=trainable)
    return model


def average_gradients(params: list[torch.Tensor]) -> None:
    """All-reduce the (whole, replicated) adapter gradients to their mean over the processes, as DDP does."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sharded_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of frozen weights this process holds, bytes they have whole): what sharding saves here."""
    held = whole = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel() * local.element_size()
        whole += p.numel() * p.element_size()
    return held, whole
