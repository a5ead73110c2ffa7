"""The shared adapter protocol and the wrapper that runs a Stage C with any number of adapters.

Every adapter method (LoRA, ControlNet, IP-Adapter) is a flat class that satisfies :class:`Adapter`; there is
no base class to inherit from (STYLE.md habit 2). Stage C itself stays a plain official-layout module: adapters
reach it either by editing its modules in place (LoRA through PEFT), by feeding its ``cnet`` argument
(ControlNet) or through the attention hooks that ``models.blocks`` exposes (IP-Adapter).

:class:`AdaptedStageC` is what the trainer, the sampler, ``generate`` and ``compare`` call. Its forward has the
Stage C signature plus extra keyword inputs that adapters consume (``control`` for a ControlNet hint,
``ip_image_embeds`` for an IP-Adapter). Because those inputs are ordinary tensors with the batch first, the
sampler's classifier-free-guidance batching concatenates them like every other input.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
from torch import nn


class AdapterMismatchError(ValueError):
    """An adapter file or module does not fit the base model it is being attached to."""


def stage_c_width(stage_c: nn.Module) -> int:
    """Hidden width of a Stage C, read from its embedding conv (the official layout's first width)."""
    return int(stage_c.embedding[1].out_channels)


@runtime_checkable
class Adapter(Protocol):
    """What every adapter method provides.

    ``name`` is unique among the adapters attached to one Stage C; ``method`` is the registry key
    (``lora``, ``controlnet``, ``ip_adapter``). ``input_names`` are the extra model inputs the adapter consumes.
    """

    name: str
    method: str
    input_names: tuple[str, ...]

    def attach(self, stage_c: nn.Module) -> None:
        """Install the adapter on ``stage_c`` (must leave its outputs unchanged while the adapter is fresh)."""

    def detach(self, stage_c: nn.Module) -> None:
        """Remove every trace of the adapter from ``stage_c`` (outputs return to the base model's exactly)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should update."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter-only tensors under the method's prefixed key layout (no base weight)."""

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`adapter_state_dict`; raises :class:`AdapterMismatchError` on a mismatch."""

    def metadata(self) -> dict[str, str]:
        """String metadata written into exported safetensors headers."""

    def apply(self, inputs: dict[str, Any], stage_c_kwargs: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Prepare one Stage C call: consume ``inputs``, add to ``stage_c_kwargs``, return a context that is
        active during the call (e.g. attention hooks)."""


def check_adapter_tensors(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str) -> None:
    """Raise one AdapterMismatchError listing missing, unexpected and wrongly shaped tensors (first few of each)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    bad = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or bad):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if bad:
        k = bad[0]
        parts.append(f"{len(bad)} with wrong shapes (e.g. {k}: file {tuple(given[k].shape)}, "
                     f"expected {tuple(expected[k].shape)})")
    raise AdapterMismatchError(f"{what} do not fit: " + "; ".join(parts))


def merge_cnet(existing: list | None, new: list | None) -> list | None:
    """Sum two ControlNet residual lists element-wise (``None`` means no residual at that ResBlock)."""
    if existing is None:
        return new
    if new is None:
        return existing
    length = max(len(existing), len(new))
    merged = []
    for i in range(length):
        a = existing[i] if i < len(existing) else None
        b = new[i] if i < len(new) else None
        if a is None:
            merged.append(b)
        elif b is None:
            merged.append(a)
        else:
            if a.shape[-2:] != b.shape[-2:]:
                b = nn.functional.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=True)
            merged.append(a + b)
    return merged


class AdaptedStageC(nn.Module):
    """A Stage C plus named adapters; forward = Stage C forward + adapter inputs.

    Adapters can be added, switched off (``enabled``) and removed without reloading the base model.
    """

    def __init__(self, stage_c: nn.Module):
        super().__init__()
        self.stage_c = stage_c
        # A ModuleDict when adapters are modules keeps .to()/.train() propagation and state handling simple.
        self.adapters = nn.ModuleDict()
        self._plain_adapters: dict[str, Adapter] = {}
        self.enabled: dict[str, bool] = {}

    # -- managing adapters -------------------------------------------------------------------------------
    def add_adapter(self, adapter: Adapter, enabled: bool = True) -> Adapter:
        if adapter.name in self.enabled:
            raise ValueError(f"an adapter named {adapter.name!r} is already attached; pick another name")
        if isinstance(adapter, nn.Module):
            # An adapter lives on its base's device (attach may copy base weights into it).
            base_param = next(self.stage_c.parameters(), None)
            if base_param is not None:
                adapter.to(base_param.device)
        adapter.attach(self.stage_c)
        if isinstance(adapter, nn.Module):
            self.adapters[adapter.name] = adapter
        else:
            self._plain_adapters[adapter.name] = adapter
        self.enabled[adapter.name] = enabled
        if hasattr(adapter, "set_enabled"):
            adapter.set_enabled(enabled)
        return adapter

    def get_adapter(self, name: str) -> Adapter:
        if name in self.adapters:
            return self.adapters[name]  # type: ignore[return-value]
        if name in self._plain_adapters:
            return self._plain_adapters[name]
        raise KeyError(f"no adapter named {name!r}; attached: {sorted(self.enabled)}")

    def remove_adapter(self, name: str) -> None:
        adapter = self.get_adapter(name)
        adapter.detach(self.stage_c)
        if name in self.adapters:
            del self.adapters[name]
        else:
            del self._plain_adapters[name]
        del self.enabled[name]

    def set_enabled(self, name: str, enabled: bool) -> None:
        adapter = self.get_adapter(name)
        self.enabled[name] = enabled
        if hasattr(adapter, "set_enabled"):
            adapter.set_enabled(enabled)

    def iter_adapters(self) -> Iterator[Adapter]:
        for name in list(self.enabled):
            yield self.get_adapter(name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for adapter in self.iter_adapters():
            params.extend(adapter.trainable_parameters())
        return params

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, x, r, clip_text, clip_text_pooled, clip_img, cnet=None, sca=None, crp=None, **inputs):
        kwargs: dict[str, Any] = {"cnet": cnet, "sca": sca, "crp": crp}
        with contextlib.ExitStack() as stack:
            for adapter in self.iter_adapters():
                if not self.enabled[adapter.name]:
                    continue
                stack.enter_context(adapter.apply(inputs, kwargs))
            unknown = set(inputs) - {n for a in self.iter_adapters() for n in a.input_names}
            if unknown:
                raise TypeError(
                    f"inputs {sorted(unknown)} are consumed by no attached adapter; attached: {sorted(self.enabled)}"
                )
            return self.stage_c(x, r, clip_text, clip_text_pooled, clip_img, **kwargs)

    # Convenience passthroughs so code written for a bare Stage C keeps working.
    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.stage_c, "gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.stage_c.gradient_checkpointing = value
