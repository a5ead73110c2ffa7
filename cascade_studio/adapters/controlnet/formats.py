"""Reading the architecture of a ControlNet file from its tensor names and shapes.

The published files (``controlnet/canny``, ``inpainting``, ``super_resolution``) carry no metadata, so
everything has to come from the official key layout (STABLE_CASCADE.md section 6 and
``official_state_dict_keys.json``):

- effnet bottleneck: ``backbone.0.0.weight`` is the EfficientNetV2-S stem conv, ``[24, c_in, 3, 3]``;
- large bottleneck (super-resolution): ``backbone.0.weight`` is a 1x1 conv ``[16384, c_in, 1, 1]`` followed by
  eight residual blocks (``backbone.3.blocks.*`` ...);
- simple bottleneck: ``backbone.0.weight`` ``[4*c_in, c_in, 3, 3]`` and ``backbone.2.weight`` only;
- one ``projections.{i}`` per injection point, ``projections.{i}.2.weight`` is ``[c_proj, embd, 1, 1]``.

Which ResBlocks the projections feed is not in the tensors: our exports record it in the metadata, the
published files use the big model's default ``[0, 4, 8, 12, 51, 55, 59, 63]``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..base import AdapterMismatchError

_PROJECTION = re.compile(r"^projections\.(\d+)\.")
# What the published files were trained on, by input channels (used when a file has no metadata).
CONTROL_BY_CHANNELS = {1: "canny", 4: "inpainting", 16: "sr", 3: "image"}


@dataclass(frozen=True)
class FileLayout:
    """The architecture a ControlNet state dict implies."""

    c_in: int
    c_proj: int
    projection_count: int
    bottleneck: str


def sniff_layout(keys: Sequence[str]) -> bool:
    """True for the official ControlNet layout: only ``backbone.*`` and ``projections.*`` tensors."""
    keys = list(keys)
    return (bool(keys) and any(k.startswith("projections.") for k in keys)
            and any(k.startswith("backbone.") for k in keys)
            and all(k.startswith(("backbone.", "projections.")) for k in keys))


def read_layout(shapes: Mapping[str, Sequence[int]], source: str = "this file") -> FileLayout:
    """Infer (c_in, c_proj, number of projections, bottleneck) from tensor names and shapes.

    ``shapes`` maps official key -> shape (a tensor's ``.shape`` works), so a file header or the reference key
    list can be inspected without loading any weights.
    """
    keys = list(shapes)
    if not sniff_layout(keys):
        raise AdapterMismatchError(
            f"{source}: not a Stable Cascade ControlNet (expected only backbone.* and projections.* tensors; "
            f"first keys: {keys[:3]})")
    if "backbone.0.0.weight" in shapes:
        c_in = int(shapes["backbone.0.0.weight"][1])
        # Both effnet backbones share key names; the published one ends in 1280 channels.
        embd = int(shapes["projections.0.0.weight"][0]) if "projections.0.0.weight" in shapes else 1280
        bottleneck = "effnet" if embd == 1280 else "effnet_tiny"
    elif "backbone.0.weight" in shapes:
        c_in = int(shapes["backbone.0.weight"][1])
        bottleneck = "large" if any(k.startswith("backbone.3.") for k in keys) else "simple"
    else:
        raise AdapterMismatchError(
            f"{source}: unknown ControlNet backbone (neither backbone.0.0.weight nor backbone.0.weight present)")
    indices = sorted({int(m.group(1)) for k in keys if (m := _PROJECTION.match(k))})
    if indices != list(range(len(indices))) or "projections.0.2.weight" not in shapes:
        raise AdapterMismatchError(
            f"{source}: projections must be numbered 0..n-1 with a projections.{{i}}.2.weight each; found "
            f"indices {indices}")
    c_proj = int(shapes["projections.0.2.weight"][0])
    return FileLayout(c_in=c_in, c_proj=c_proj, projection_count=len(indices), bottleneck=bottleneck)


def control_from(metadata: Mapping[str, str], layout: FileLayout) -> str:
    """The control type recorded in the metadata, else the one the published file with these inputs used."""
    control = metadata.get("cascade_studio.control")
    if control:
        return control
    return CONTROL_BY_CHANNELS.get(layout.c_in, "image")


# What ComfyUI builds for any Stable Cascade ControlNet file (comfy/controlnet.py ``load_t2i_adapter``): the
# official module with its defaults, i.e. the 3.6B model's width 2048 and injection points, and the effnet
# bottleneck (``backbone.0.0.weight``) or the large one (``backbone.10.blocks.0.weight``); it loads the file
# strictly, and a file with neither backbone is not taken for a ControlNet at all.
COMFYUI_C_PROJ = 2048
COMFYUI_PROJ_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)
COMFYUI_KEY = "cascade_studio.comfyui"


def comfyui_compatibility(layout: FileLayout, proj_blocks: Sequence[int] | None) -> tuple[str, str]:
    """(status, why) of a ControlNet file in ComfyUI: ``loads``, ``fails`` (ComfyUI refuses the file) or
    ``wrong_blocks`` (loads without an error but feeds other ResBlocks than it was trained for)."""
    if layout.c_proj != COMFYUI_C_PROJ:
        return "fails", (f"ComfyUI always builds the 3.6B (big) Stage C's ControlNet, width {COMFYUI_C_PROJ}, and "
                         f"this one has width {layout.c_proj}: loading it there fails with a size mismatch")
    if layout.projection_count != len(COMFYUI_PROJ_BLOCKS):
        return "fails", (f"ComfyUI builds {len(COMFYUI_PROJ_BLOCKS)} projections and loads strictly, this file has "
                         f"{layout.projection_count}")
    if layout.bottleneck not in ("effnet", "large"):
        return "fails", (f"ComfyUI loads only the official effnet and large bottlenecks, this file has the "
                         f"{layout.bottleneck} one")
    if proj_blocks is not None and tuple(int(b) for b in proj_blocks) != COMFYUI_PROJ_BLOCKS:
        return "wrong_blocks", (f"ComfyUI loads it without an error but injects at its fixed ResBlocks "
                                f"{list(COMFYUI_PROJ_BLOCKS)}, not at the trained {list(proj_blocks)}, so its "
                                "output there is not what was trained")
    return "loads", "ComfyUI loads it as the 3.6B model's ControlNet (same layout and injection points)"
