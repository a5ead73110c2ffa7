"""The ControlNet method's recipe section (``adapter.controlnet``) and its catalog record. Imports no torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ...config.fields import setting
from ..catalog import CommandLine, ExportFormat, Method, register

@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet that feeds residuals into Stage C's ResBlocks."""

    control: str = setting("canny", "Control signal: canny (edges computed from each image), inpainting (masked "
                           "image + mask), sr (super-resolution) or image (pre-made control images from the "
                           "dataset).", choices=("canny", "inpainting", "sr", "image"))
    control_column: str = setting("_control", "Where pre-made control images live: a dataset column, or for a "
                                  "folder the sidecar suffix (photo.png -> photo_control.png). Used when control "
                                  "is image.", example="_control", allow_empty=True)
    c_proj: Optional[int] = setting(None, "Channels of each projection output; null = the preset's width "
                                    "(2048 on big).", minimum=1, example=2048)
    proj_blocks: Optional[tuple[int, ...]] = setting(None, "ResBlock indices (call order) that receive a "
                                                     "residual; null = the preset's default (big: 0,4,8,12,51,55,"
                                                     "59,63). ComfyUI always injects at big's default, so a file "
                                                     "with others is wrong there.", minimum=0,
                                                     example=[0, 4, 8, 12])
    bottleneck: str = setting("effnet", "Control encoder: effnet (the official EfficientNetV2-S backbone, needed "
                              "for the official file layout), simple (a small conv net for quick runs) or large "
                              "(the super-resolution bottleneck); effnet_tiny is the tiny preset's small backbone (the default on "
                              "tiny/toy, where effnet is read as effnet_tiny).",
                              choices=("effnet", "simple", "large", "effnet_tiny"))
    freeze_backbone: bool = setting(False, "Keep the control encoder's backbone frozen (the official trainer "
                                    "trains it).")
    backbone_init: Optional[str] = setting(
        None, "Starting weights of an EfficientNet backbone (effnet, effnet_tiny): compressor (the backbone of "
        "the base's own EfficientNet compressor, Stage C's effnet encoder: the same architecture already trained "
        "on images, where the official trainer starts from ImageNet weights) or random. null = compressor. "
        "Ignored with init_from (the file brings its backbone).", choices=("compressor", "random"))
    strength: float = setting(1.0, "Multiplier on the residuals at inference and in previews.", minimum=0,
                              example=1.0)
    init_from: Optional[str] = setting(None, "Start from a published ControlNet file (official layout), e.g. "
                                       "canny.safetensors; null = fresh init with zero projections.", path=True,
                                       weights=True)


def check(section: ControlNetConfig, recipe: Any, ok, add) -> None:
    """Pre-made control images need their column; an explicit injection list needs an entry."""
    if ok("adapter.controlnet.control", "adapter.controlnet.control_column") and section.control == "image" \
            and not section.control_column.strip():
        add("adapter.controlnet.control_column", section.control_column,
            "control: image reads pre-made control images, so it needs their column or sidecar suffix",
            "e.g. _control (photo.png -> photo_control.png)")
    if ok("adapter.controlnet.proj_blocks") and section.proj_blocks is not None and not section.proj_blocks:
        add("adapter.controlnet.proj_blocks", [], "must list at least one ResBlock index, or be null",
            "write null for the preset's default")


def control_column(section: ControlNetConfig) -> Optional[str]:
    """The dataset column of pre-made control images (control: image); the other controls are computed."""
    return section.control_column if section.control == "image" else None


def _add_generate(parser: Any) -> None:
    parser.add_argument("--controlnet", action="append", default=[], metavar="FILE[@STRENGTH]", help="repeatable")
    parser.add_argument("--strength", type=float, default=1.0,
                        help="ControlNet strength when FILE has no @STRENGTH")


def _add_inputs(parser: Any, repeat: bool) -> None:
    parser.add_argument("--control", action="append" if repeat else "store", metavar="IMAGE",
                        help="control image of the ControlNet(s)" + (" (repeat to pair one per --controlnet)"
                                                                    if repeat else ""))
    parser.add_argument("--control-mode", choices=["canny", "image"],
                        help="canny: edges of a photo (default for canny ControlNets); image: use the image as is")


def _controls(args: Any) -> list:
    control = getattr(args, "control", None)
    return list(control) if isinstance(control, list) else [control] if control else []


def _settings(args: Any) -> dict:
    controls = _controls(args)
    return {"control": controls[0] if controls else None, "control_mode": getattr(args, "control_mode", None)}


def _specs(args: Any, parse) -> list:
    texts, controls = list(getattr(args, "controlnet", [])), _controls(args)
    if controls and texts and len(controls) not in (1, len(texts)):
        raise ValueError(f"{len(texts)} --controlnet but {len(controls)} --control images; give one image for "
                         "all of them or one per ControlNet, in the same order")
    if controls and not (texts or getattr(args, "adapter", None)):
        raise ValueError("--control needs a ControlNet: add --controlnet FILE")
    specs = []
    for index, text in enumerate(texts):
        control = controls[index if len(controls) > 1 else 0] if controls else None
        spec = parse(text, method="controlnet", control=control, control_mode=getattr(args, "control_mode", None))
        specs.append(spec if spec.weight is not None else spec.with_defaults(weight=args.strength))
    return specs


METHOD = register(Method(
    name="controlnet", label="ControlNet", doc="residuals from a control image (canny, inpainting, "
    "super-resolution, your own control images) into Stage C's ResBlocks",
    config=ControlNetConfig,
    formats=(ExportFormat("official", "the official ControlNet layout (backbone.*, projections.*), which ComfyUI "
                          "loads for the big model with the default proj_blocks (a lite one fails there, other "
                          "proj_blocks inject at the wrong blocks; the export warns)"),),
    implementation="cascade_studio.adapters.controlnet.method", aliases=("cn",), short="cn",
    weight_name="strength", weight_prefix="strength ", check=check, control_column=control_column,
    command_line=CommandLine(add_generate=_add_generate, specs=_specs, add_inputs=_add_inputs, settings=_settings)))
