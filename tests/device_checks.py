"""What a GPU checks that the meta device does not, for the device dry run."""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class GeneratorDeviceCheck(TorchFunctionMode):
    """Refuse a random draw whose generator lives on another device than the tensor it fills.

    CUDA raises there ("Expected a 'cuda' device type for generator but found 'cpu'"); the meta device ignores
    the generator. Inside this mode every draw with a ``generator=`` is checked against its target: the
    ``device=`` of a factory call, the tensor of an in-place or ``*_like`` call, else the CPU (the default).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator):
            target = kwargs.get("device")
            if target is None:
                target = args[0].device if args and isinstance(args[0], torch.Tensor) else "cpu"
            target = torch.device(target)
            if target.type != generator.device.type:
                raise RuntimeError(f"Expected a '{target.type}' device type for generator but found "
                                   f"'{generator.device.type}' ({getattr(func, '__name__', func)})")
        return func(*args, **kwargs)
