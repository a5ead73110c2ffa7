"""The ControlNet adapter: the official Stable Cascade ControlNet feeding residuals into a frozen Stage C.

Unlike LoRA, a ControlNet never edits Stage C: it turns a control hint (edges, a masked image, low-resolution
latents, a pre-made control image) into one residual per chosen ResBlock and hands them to Stage C through its
``cnet`` argument (STABLE_CASCADE.md sections 2 and 6). So ``attach``/``detach`` only check that the ControlNet
fits the base, and several ControlNets (and LoRAs) combine by summing residual lists with ``merge_cnet``.

The module held in ``self.controlnet`` is the official one (``backbone.*``, ``projections.{i}.{0,2}.weight``),
so its state dict *is* the published file layout.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...models.official import StateDictMismatchError, load_official_state_dict, official_state_dict
from ...models.presets import PRESETS, build_controlnet
from ...models.reuse import reuse
from ..base import AdapterMismatchError, merge_cnet, stage_c_width

# Channels of the hint each control produces (STABLE_CASCADE.md section 6): canny edges are one channel,
# inpainting is RGB + mask, super-resolution feeds 16-channel effnet latents. "image" defaults to RGB.
CONTROL_CHANNELS: dict[str, int] = {"canny": 1, "inpainting": 4, "sr": 16, "image": 3}
BOTTLENECKS = ("effnet", "simple", "large", "effnet_tiny")


@dataclass(frozen=True)
class ControlNetSpec:
    """Everything needed to rebuild a ControlNet's modules (and written into exported metadata).

    ``hint_size``: when set, the hint is area-downsampled inside :meth:`ControlNetAdapter.prepare_hint` so its
    shorter side is at most ``hint_size`` pixels before it reaches the backbone. The tiny preset uses this with
    the 'simple' bottleneck (whose convolutions keep the input resolution) so the cached hint can stay at image
    resolution while the ControlNet runs on a small grid (4x the latent grid). ``None`` feeds the hint as is,
    which is what the official effnet (stride 32) and large (latent grid) bottlenecks expect.
    """

    c_in: int
    c_proj: int
    proj_blocks: tuple[int, ...]
    bottleneck: str = "effnet"
    control: str = "canny"
    hint_size: int | None = None
    freeze_backbone: bool = False

    def __post_init__(self) -> None:
        if self.bottleneck not in BOTTLENECKS:
            raise AdapterMismatchError(
                f"unknown ControlNet bottleneck {self.bottleneck!r}; use one of {', '.join(BOTTLENECKS)}")
        if not self.proj_blocks:
            raise AdapterMismatchError("proj_blocks is empty; list the Stage C ResBlock indices to inject into")
        if min(self.proj_blocks) < 0 or len(set(self.proj_blocks)) != len(self.proj_blocks):
            raise AdapterMismatchError(
                f"proj_blocks {list(self.proj_blocks)} must be distinct ResBlock indices >= 0")

    def metadata(self) -> dict[str, str]:
        return {
            "cascade_studio.control": self.control,
            "cascade_studio.c_in": str(self.c_in),
            "cascade_studio.c_proj": str(self.c_proj),
            "cascade_studio.proj_blocks": json.dumps(list(self.proj_blocks)),
            "cascade_studio.bottleneck": self.bottleneck,
            "cascade_studio.hint_size": "" if self.hint_size is None else str(self.hint_size),
        }


def preset_for_width(width: int) -> str:
    """Name of the preset with this Stage C width, for error messages ('big', 'lite', 'tiny' or 'custom')."""
    for name, preset in PRESETS.items():
        if int(preset.stage_c.get("c_hidden", [2048])[0]) == int(width):
            return name
    return "custom"


def check_fits(spec: ControlNetSpec, width: int, resblocks: int, source: str = "this ControlNet") -> None:
    """Raise :class:`AdapterMismatchError` unless a ControlNet of ``spec`` can feed a Stage C of ``width`` with
    ``resblocks`` ResBlock calls."""
    if spec.c_proj != width:
        raise AdapterMismatchError(
            f"{source} was made for a Stage C of width {spec.c_proj} ({preset_for_width(spec.c_proj)}); the base "
            f"has width {width} ({preset_for_width(width)}). Use a ControlNet made for this base, or load the "
            f"matching base model.")
    too_far = [b for b in spec.proj_blocks if b >= resblocks]
    if too_far:
        raise AdapterMismatchError(
            f"{source} injects into ResBlocks {too_far}, but this Stage C has only {resblocks} ResBlocks "
            f"(indices 0-{resblocks - 1}); set adapter.controlnet.proj_blocks to indices below {resblocks}.")


class ControlNetAdapter(nn.Module):
    """A ControlNet attached to a Stage C through its ``cnet`` input (satisfies the ``Adapter`` protocol).

    ``strength`` multiplies every residual (0 = the base model exactly). The hint arrives as the model input
    named ``input_name`` (``control`` by default; give two ControlNets different input names to drive them
    with different hints in one call).
    """

    method = "controlnet"

    def __init__(self, spec: ControlNetSpec, name: str = "controlnet", strength: float = 1.0,
                 info: dict[str, str] | None = None, input_name: str = "control",
                 controlnet: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        self.name = name
        self.input_name = input_name
        self.input_names: tuple[str, ...] = (input_name,)
        self.strength = float(strength)
        self.enabled = True
        self.info = dict(info or {})
        self.controlnet = controlnet if controlnet is not None else build_controlnet(
            spec.c_in, spec.c_proj, list(spec.proj_blocks), spec.bottleneck)
        self.set_freeze_backbone(spec.freeze_backbone)
        self.train(self.training)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def attach(self, stage_c: nn.Module) -> None:
        """Check that this ControlNet fits ``stage_c``; Stage C itself is left untouched."""
        resblocks = int(stage_c.resblock_count()) if hasattr(stage_c, "resblock_count") else 10**9
        check_fits(self.spec, stage_c_width(stage_c), resblocks, source=f"ControlNet {self.name!r}")

    def detach(self, stage_c: nn.Module) -> None:
        """Nothing to undo: a ControlNet only ever feeds Stage C's ``cnet`` argument."""

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def set_strength(self, strength: float) -> None:
        """Scale every residual (1.0 = as trained); ComfyUI calls this the ControlNet strength."""
        self.strength = float(strength)

    def set_freeze_backbone(self, freeze: bool) -> None:
        """Train only the projections (True) or the whole ControlNet (False, what the official trainer does)."""
        self.spec = replace(self.spec, freeze_backbone=bool(freeze))
        self.controlnet.backbone.requires_grad_(not freeze)
        self.controlnet.projections.requires_grad_(True)

    def train(self, mode: bool = True) -> "ControlNetAdapter":
        """Switch mode, but keep the backbone in eval mode: the official trainer never updates the
        EfficientNet's BatchNorm statistics (its batches are small and single-image statistics would drift)."""
        super().train(mode)
        self.controlnet.backbone.eval()
        return self

    # -- parameters and state ----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.spec.freeze_backbone:
            return list(self.controlnet.projections.parameters())
        return list(self.controlnet.parameters())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The official layout: ``backbone.*`` (BatchNorm buffers included) and ``projections.*``."""
        return {k: v.detach().clone() for k, v in official_state_dict(self.controlnet).items()}

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        own = self.controlnet.projections[0][0].weight
        cast = {k: (v.to(device=own.device, dtype=own.dtype) if v.is_floating_point() else v.to(own.device))
                for k, v in state_dict.items()}
        try:
            load_official_state_dict(self.controlnet, cast)
        except StateDictMismatchError as exc:
            raise AdapterMismatchError(f"ControlNet weights do not fit ({self.spec.bottleneck} bottleneck, "
                                       f"c_in {self.spec.c_in}, c_proj {self.spec.c_proj}): {exc}") from None

    def metadata(self) -> dict[str, str]:
        meta = {
            "modelspec.architecture": "stable-cascade-v1-prior/controlnet",
            "cascade_studio.method": "controlnet",
            "cascade_studio.strength": str(self.strength),
        }
        meta.update(self.spec.metadata())
        meta.update(self.info)
        return meta

    def export(self, path: str, format: str = "official") -> Any:
        """Write this ControlNet to ``path`` (see ``cascade_studio.adapters.controlnet.export_adapter``)."""
        from . import export_adapter

        return export_adapter(self, path, fmt=format)

    # -- forward -----------------------------------------------------------------------------------------
    def prepare_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """Check a hint batch and bring it to the backbone's device, dtype and (with ``hint_size``) grid."""
        if not isinstance(hint, torch.Tensor) or hint.ndim != 4 or hint.shape[1] != self.spec.c_in:
            shape = tuple(hint.shape) if isinstance(hint, torch.Tensor) else type(hint).__name__
            raise AdapterMismatchError(
                f"ControlNet {self.name!r} ({self.spec.control}) expects a hint batch [B, {self.spec.c_in}, H, W]; "
                f"got {shape}. Re-encode the cache with this ControlNet's control type.")
        reference = self.controlnet.projections[0][0].weight
        hint = hint.to(device=reference.device, dtype=reference.dtype)
        size = self.spec.hint_size
        if size is not None and min(hint.shape[-2:]) > size:
            h, w = hint.shape[-2:]
            scale = size / min(h, w)
            # Area averaging keeps thin canny edges as grey values instead of dropping them between samples.
            hint = F.interpolate(hint, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
        return hint

    def residuals(self, hint: torch.Tensor) -> list[torch.Tensor | None]:
        """The scaled residual list for ``hint`` (indexed by Stage C ResBlock call order)."""
        outputs = self.controlnet(self.prepare_hint(hint))
        return [None if r is None else r * self.strength for r in outputs]

    def apply(self, inputs: dict[str, Any], stage_c_kwargs: dict[str, Any]) -> contextlib.AbstractContextManager:
        hint = inputs.get(self.input_name)
        if hint is None:
            raise AdapterMismatchError(
                f"ControlNet {self.name!r} needs a control hint: pass {self.input_name}=<tensor "
                f"[B, {self.spec.c_in}, H, W]> ({self.spec.control}) to the model, or disable the adapter.")
        if self.enabled and self.strength != 0.0:
            # Strength 0 skips the ControlNet entirely: the base model's output, bit for bit, at no cost.
            # The hint is the same at every sampling step: its residuals are computed once per run (models/reuse).
            residuals = reuse(self, ("residuals", self.strength), (hint,), lambda: self.residuals(hint))
            stage_c_kwargs["cnet"] = merge_cnet(stage_c_kwargs.get("cnet"), residuals)
        return contextlib.nullcontext()


def as_blocks(value: Sequence[int] | str | None) -> tuple[int, ...] | None:
    """proj_blocks from a recipe list or a metadata JSON string."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = json.loads(value)
    return tuple(int(v) for v in value)
