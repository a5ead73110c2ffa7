"""Reading values back from the accelerator, in one place.

Every device -> host read of the training and sampling paths goes through :func:`to_host` or
:func:`host_floats`, for two reasons:

* On a GPU a read waits for all queued work (a synchronisation). Kept here they can be counted
  (:func:`host_read_count`); the training loop makes one per optimizer step (the step must know whether the loss
  and gradient are finite before it applies them; GradScaler makes the same one).
* The device dry run (``tests/test_device_dry_run.py``) runs the whole path with the models on the ``meta``
  device, so that a tensor made on the host and mixed in, or a CPU generator drawing on another device, raises
  in CI on a machine without a GPU. A meta tensor has no values: reading one gives zeros of its shape and dtype,
  so the path goes on to its next phase.

Imports nothing of the package, so every layer may use it.
"""
from __future__ import annotations

import torch

_reads = 0


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``tensor`` in host memory (the tensor itself, detached, when already there)."""
    global _reads
    if tensor.device.type == "cpu":
        return tensor.detach()
    _reads += 1
    if tensor.device.type == "meta":
        return torch.zeros(tensor.shape, dtype=tensor.dtype)
    return tensor.detach().to("cpu")


def host_floats(*tensors: torch.Tensor) -> list[float]:
    """Several scalars (0-d or one-element tensors on one device) as Python floats, in one read."""
    stacked = torch.stack([t.detach().float().reshape(()) for t in tensors])
    return [float(v) for v in to_host(stacked).tolist()]


def host_read_count() -> int:
    """How many reads from a device other than the CPU this process has made (tests count them per step)."""
    return _reads


def is_meta(device: torch.device | str) -> bool:
    """True for the meta device (no values; the device dry run)."""
    return torch.device(device).type == "meta"


def compiles_blocks(setting: str, device: torch.device | str) -> bool:
    """Whether ``train.compile`` compiles Stage C's blocks on ``device`` (``auto``: on CUDA only, where
    compile time is seconds against hours of steps; on a CPU it takes about a minute, which short runs lose)."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return setting == "on"
