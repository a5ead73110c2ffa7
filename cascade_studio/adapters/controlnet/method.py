"""The torch side of the method: create, export, load, sniff and the training/generation inputs (see the
package docstring)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from ..base import AdaptedStageC, AdapterMismatchError, stage_c_width
from ..files import load_adapter_tensors, read_safetensors_header, save_adapter_tensors
from .adapter import (BOTTLENECKS, CONTROL_CHANNELS, ControlNetAdapter, ControlNetSpec, as_blocks, check_fits,
                      preset_for_width)
from .config import METHOD, ControlNetConfig
from .formats import COMFYUI_KEY, FileLayout, comfyui_compatibility, control_from, read_layout, sniff_layout
from .plan import plan_adapter  # noqa: F401
from .hints import (CannyHint, HintError, ImageHint, InpaintingHint, SuperResolutionHint, build_hint_encoder,
                    make_mask)

FORMATS = METHOD.format_names

__all__ = ["ControlNetAdapter", "ControlNetSpec", "CannyHint", "InpaintingHint", "SuperResolutionHint",
           "ImageHint", "HintError", "FORMATS", "create_adapter", "export_adapter", "export_tensors",
           "load_adapter_file", "sniff",
           "training_inputs", "hint_encoders", "build_hint_encoder", "spec_from_config", "make_mask",
           "read_layout", "FileLayout", "init_backbone_from_compressor"]


def _preset(context: Any, width: int):
    """The CascadePreset of the base: the context's, else the one with this Stage C width (None if custom)."""
    from ...models.presets import PRESETS, get_preset

    name = getattr(context, "preset", None)
    if name not in PRESETS:
        name = preset_for_width(width)
    return get_preset(name) if name in PRESETS else None


def _default_bottleneck(requested: str | None, control: str, preset_name: str) -> str:
    """The recipe's ``effnet`` is its default value, so it is read as "the default for this base and control":
    ``large`` for super-resolution (the published SR layout; an effnet backbone would shrink its latent-grid
    input to nothing) and ``simple`` on tiny. ``simple`` and ``large`` are always taken as asked."""
    if requested in (None, "effnet"):
        if preset_name in ("tiny", "toy"):
            return "effnet_tiny"
        if control == "sr":
            return "large"
        return "effnet"
    if requested not in BOTTLENECKS:
        raise AdapterMismatchError(f"adapter.controlnet.bottleneck {requested!r}: use one of {BOTTLENECKS}")
    return requested


def _hint_size(bottleneck: str, control: str, preset) -> int | None:
    # Only the simple bottleneck keeps its input resolution; 4x the latent grid is plenty for its 3x3 convs.
    if bottleneck != "simple" or control == "sr":
        return None
    resolution = int(getattr(preset, "train_resolution", 768) or 768)
    return 4 * (resolution // 32)


def spec_from_config(cfg: ControlNetConfig, width: int, context: Any = None, channels: int = 3) -> ControlNetSpec:
    """The ControlNet a recipe's ``adapter.controlnet`` section asks for, on a Stage C of ``width``
    (``channels``: of pre-made control images, for control ``image``)."""
    control = cfg.control
    control = "sr" if control == "super_resolution" else control
    if control not in CONTROL_CHANNELS:
        raise AdapterMismatchError(f"adapter.controlnet.control {control!r}: use one of {sorted(CONTROL_CHANNELS)}")
    preset = _preset(context, width)
    preset_name = preset.name if preset is not None else "custom"
    c_in = channels if control == "image" else CONTROL_CHANNELS[control]
    blocks = as_blocks(cfg.proj_blocks)
    if blocks is None:
        if preset is None:
            raise AdapterMismatchError("this Stage C matches no preset; set adapter.controlnet.proj_blocks")
        blocks = tuple(preset.controlnet_proj_blocks)
    bottleneck = _default_bottleneck(cfg.bottleneck, control, preset_name)
    return ControlNetSpec(c_in=c_in, c_proj=int(width if cfg.c_proj is None else cfg.c_proj), proj_blocks=blocks,
                          bottleneck=bottleneck, control=control, hint_size=_hint_size(bottleneck, control, preset),
                          freeze_backbone=cfg.freeze_backbone)


def _base_info(context: Any, width: int) -> dict[str, str]:
    return {"cascade_studio.base_model": str(getattr(context, "preset", None) or preset_for_width(width)),
            "cascade_studio.base_fingerprint": str(getattr(context, "base_fingerprint", "unknown")),
            "cascade_studio.base_width": str(width)}


def create_adapter(cfg: Any, model: AdaptedStageC, context: Any, name: str = "controlnet") -> ControlNetAdapter:
    """A ControlNet from the recipe's ``adapter.controlnet`` section, attached to ``model``.

    ``init_from`` starts from a published (or exported) ControlNet file instead of zero projections; the file
    decides the architecture, and a recipe that contradicts it (other control channels, width or number of
    injection points) is refused with the fields to change.
    """
    width = stage_c_width(model.stage_c)
    spec = spec_from_config(cfg, width, context)
    init_from = cfg.init_from
    tensors = None
    if init_from:
        path = Path(init_from)
        tensors, metadata = load_adapter_tensors(path)
        layout = read_layout({k: v.shape for k, v in tensors.items()}, str(path))
        blocks = _init_from_blocks(cfg, metadata, spec)
        problems = _init_from_problems(layout, metadata, spec, blocks)
        if problems:
            raise AdapterMismatchError(f"adapter.controlnet.init_from {path}: " + "; ".join(problems))
        hint_size = spec.hint_size if layout.bottleneck == "simple" else None
        spec = ControlNetSpec(c_in=layout.c_in, c_proj=layout.c_proj, proj_blocks=blocks,
                              bottleneck=layout.bottleneck, control=spec.control, hint_size=hint_size,
                              freeze_backbone=spec.freeze_backbone)
    adapter = ControlNetAdapter(spec, name=name, strength=float(cfg.strength),
                                info=_base_info(context, width))
    # Built where the base lives: weights copied in (a file, the compressor) go straight to that device.
    adapter.to(_device_of(model))
    if tensors is not None:
        try:
            adapter.load_adapter_state_dict(tensors)
        except AdapterMismatchError as exc:
            raise AdapterMismatchError(f"adapter.controlnet.init_from {init_from}: {exc}") from None
    elif spec.bottleneck in ("effnet", "effnet_tiny"):
        init = cfg.backbone_init
        if init not in (None, "compressor", "random"):
            raise AdapterMismatchError(f"adapter.controlnet.backbone_init {init!r}: use compressor or random")
        compressor = _compressor(context, required=init == "compressor") if init != "random" else None
        if compressor is not None:
            init_backbone_from_compressor(adapter.controlnet.backbone, compressor)
        adapter.info["cascade_studio.backbone_init"] = "compressor" if compressor is not None else "random"
    elif cfg.backbone_init == "compressor":
        raise AdapterMismatchError(f"adapter.controlnet.backbone_init compressor needs an EfficientNet backbone; the "
                                   f"{spec.bottleneck} bottleneck has none (set bottleneck: effnet, or drop "
                                   "backbone_init)")
    model.add_adapter(adapter)
    return adapter


def _init_from_blocks(cfg: Any, metadata: Mapping[str, str], spec: ControlNetSpec) -> tuple[int, ...]:
    return as_blocks(cfg.proj_blocks) or as_blocks(metadata.get("cascade_studio.proj_blocks")) or spec.proj_blocks


def _init_from_problems(layout: FileLayout, metadata: Mapping[str, str], spec: ControlNetSpec,
                        blocks: tuple[int, ...], check_channels: bool = True) -> list[str]:
    """Why the ``init_from`` file (its ``layout``) cannot start the ControlNet the recipe asks for (``spec``)."""
    problems = []
    if check_channels and layout.c_in != spec.c_in:
        problems.append(f"it takes {layout.c_in}-channel hints ({control_from(metadata, layout)}), the recipe's "
                        f"control {spec.control} gives {spec.c_in}; set adapter.controlnet.control to match")
    if layout.c_proj != spec.c_proj:
        problems.append(f"it was made for a Stage C of width {layout.c_proj} "
                        f"({preset_for_width(layout.c_proj)}), the base has width {spec.c_proj} "
                        f"({preset_for_width(spec.c_proj)})")
    if layout.projection_count != len(blocks):
        problems.append(f"it has {layout.projection_count} projections, proj_blocks lists {len(blocks)}; set "
                        f"adapter.controlnet.proj_blocks to {layout.projection_count} indices")
    return problems


def preflight(cfg: ControlNetConfig, recipe: Any, check_weights: Any, add: Any) -> None:
    """Before a run starts, from the header of ``init_from`` alone: the file fits the base's width, the
    recipe's control and its injection points (the checks ``create_adapter`` makes once the base is loaded)."""
    if not cfg.init_from:
        return
    from types import SimpleNamespace

    from ...models.presets import PRESETS

    dotted = "adapter.controlnet.init_from"
    try:
        header = read_safetensors_header(cfg.init_from)
        metadata = header.pop("__metadata__", None) or {}
        layout = read_layout({k: v["shape"] for k, v in header.items()}, str(cfg.init_from))
    except AdapterMismatchError as exc:
        add(dotted, cfg.init_from, str(exc))
        return
    preset = PRESETS.get(recipe.model.preset)
    if preset is None:
        return
    width = int(preset.stage_c.get("c_hidden", [2048])[0])  # StageC's defaults are the big model
    try:
        spec = spec_from_config(cfg, width, SimpleNamespace(preset=preset.name))
    except AdapterMismatchError:
        return  # the recipe's own problem, reported where the adapter is built
    problems = _init_from_problems(layout, metadata, spec, _init_from_blocks(cfg, metadata, spec),
                                   check_channels=spec.control != "image")  # image: channels known from the data
    for problem in problems:
        add(dotted, cfg.init_from, f"{problem} (model.preset {preset.name})")


def _compressor(context: Any, required: bool) -> torch.nn.Module | None:
    """The base's EfficientNet compressor: the run's (loaded for the copy, then freed again), else the preset's
    built-in one (tiny, toy). None when there is none at hand and ``required`` is False."""
    models = (getattr(context, "extra", None) or {}).get("models")
    if models is not None:
        compressor = models.effnet()
        models.free("effnet")  # the copy is all the ControlNet needs; do not keep it resident in training
        return compressor
    preset = getattr(context, "preset", None)
    if preset == "toy":
        from ...models.toy import load_toy_component

        return load_toy_component("effnet")
    if preset == "tiny":
        from ...models.random_init import build_random

        return build_random("effnet", "tiny")
    if not required:
        return None
    raise AdapterMismatchError(
        "adapter.controlnet.backbone_init compressor: the base's EfficientNet compressor (effnet) is not loaded "
        "here; give model.effnet (or model.repo_id), or set backbone_init: random")


@torch.no_grad()
def init_backbone_from_compressor(backbone: torch.nn.Module, compressor: torch.nn.Module) -> None:
    """Copy the compressor's EfficientNet ``backbone`` into a ControlNet backbone of the same architecture.

    The first conv may take other than 3 channels (canny 1, inpainting 4); like the official code for a
    pretrained backbone, the RGB filters fill the first channels and extra channels start at zero.
    """
    source = getattr(compressor, "backbone", None)
    if source is None:
        raise AdapterMismatchError("the EfficientNet compressor has no backbone to start the ControlNet from")
    target_state = backbone.state_dict()
    state = {k: v for k, v in source.state_dict().items()}
    wrong = sorted(set(state) ^ set(target_state))
    if wrong:
        raise AdapterMismatchError(
            "the base's EfficientNet compressor does not match the ControlNet backbone (e.g. "
            f"{', '.join(wrong[:3])}); use the effnet bottleneck on big/lite and effnet_tiny on tiny/toy, or "
            "set backbone_init: random")
    first = "0.0.weight"
    rgb = state[first]
    want = target_state[first].shape
    if rgb.shape != want:
        if rgb.shape[0] != want[0] or rgb.shape[2:] != want[2:]:
            raise AdapterMismatchError(f"the compressor's first conv {tuple(rgb.shape)} cannot start a backbone "
                                       f"whose first conv is {tuple(want)}; set backbone_init: random")
        conv = torch.zeros(want, dtype=rgb.dtype, device=rgb.device)
        channels = min(want[1], rgb.shape[1])
        conv[:, :channels] = rgb[:, :channels]
        state[first] = conv
    for key, value in state.items():
        if value.shape != target_state[key].shape:
            raise AdapterMismatchError(f"the compressor's {key} {tuple(value.shape)} does not fit the ControlNet "
                                       f"backbone's {tuple(target_state[key].shape)}; set backbone_init: random")
    backbone.load_state_dict({k: v.to(device=target_state[k].device, dtype=target_state[k].dtype)
                              for k, v in state.items()})


def _device_of(model: AdaptedStageC) -> torch.device:
    param = next(model.stage_c.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def export_adapter(adapter: ControlNetAdapter, out: str | Path, fmt: str = "official",
                   extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the official layout (``backbone.*``, ``projections.{i}.{0,2}.weight``) plus metadata; ComfyUI
    loads this layout for the big model."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown ControlNet export format {fmt!r}; choose one of {FORMATS}")
    meta = adapter.metadata()
    meta.update(extra_metadata or {})
    meta["cascade_studio.format"] = fmt
    out = Path(out)
    out = out if out.suffix == ".safetensors" else out.with_suffix(".safetensors")
    tensors = adapter.adapter_state_dict()
    return save_adapter_tensors(tensors, out, _with_comfyui_status(tensors, meta, out))


def _with_comfyui_status(tensors: Mapping[str, Any], meta: dict[str, str], out: Path) -> dict[str, str]:
    """Record in the file whether ComfyUI can use it (``formats.comfyui_compatibility``), and warn when it cannot
    or would inject at other ResBlocks."""
    layout = read_layout({k: v.shape for k, v in tensors.items()}, str(out))
    status, why = comfyui_compatibility(layout, as_blocks(meta.get("cascade_studio.proj_blocks")))
    from ...models.presets import PRESETS

    base = PRESETS.get(meta.get("cascade_studio.base_model", ""))
    if status != "loads" and not (base is not None and base.built_in):  # a tiny/toy ControlNet is a test piece
        print(f"warning: {out}: {'not loadable in ComfyUI' if status == 'fails' else 'wrong in ComfyUI'}: {why}",
              file=sys.stderr)
    return dict(meta, **{COMFYUI_KEY: f"{status}: {why}"})


def sniff(keys: list[str], metadata: dict[str, str]) -> bool:
    return metadata.get("modelspec.architecture", "").endswith("/controlnet") or sniff_layout(keys)


def load_adapter_file(path: str | Path, model: AdaptedStageC, context: Any = None, name: str | None = None,
                      strength: float = 1.0, proj_blocks: Any = None, input_name: str = "control",
                      **_: Any) -> ControlNetAdapter:
    """Load one of our exports or a published ControlNet (canny, inpainting, super_resolution) onto ``model``.

    The architecture comes from the tensors (see ``formats``); the injection ResBlocks from ``proj_blocks``,
    else the file's metadata, else the base preset's defaults (the published files use big's). A file made for
    another Stage C width is refused before any weight is loaded.
    """
    path = Path(path)
    header = read_safetensors_header(path)
    metadata = dict(header.pop("__metadata__", None) or {})
    layout = read_layout({k: v["shape"] for k, v in header.items()}, str(path))
    width = stage_c_width(model.stage_c)
    if layout.c_proj != width:
        raise AdapterMismatchError(
            f"{path}: this ControlNet was made for a Stage C of width {layout.c_proj} "
            f"({preset_for_width(layout.c_proj)}); the base has width {width} ({preset_for_width(width)}). Load "
            "it with the matching base model.")
    blocks = as_blocks(proj_blocks) or as_blocks(metadata.get("cascade_studio.proj_blocks"))
    if blocks is None:
        preset = _preset(context, width)
        blocks = tuple(preset.controlnet_proj_blocks) if preset is not None else None
    if blocks is None or len(blocks) != layout.projection_count:
        raise AdapterMismatchError(
            f"{path}: {layout.projection_count} projections but no matching injection list (default "
            f"{list(blocks or [])}); pass proj_blocks=[...] with {layout.projection_count} ResBlock indices")
    hint_size = metadata.get("cascade_studio.hint_size")
    spec = ControlNetSpec(c_in=layout.c_in, c_proj=layout.c_proj, proj_blocks=blocks, bottleneck=layout.bottleneck,
                          control=control_from(metadata, layout), hint_size=int(hint_size) if hint_size else None)
    check_fits(spec, width, int(model.stage_c.resblock_count()), source=str(path))
    tensors, _ = load_adapter_tensors(path)
    info = {k: v for k, v in metadata.items() if k.startswith("cascade_studio.base")}
    # Adapters that are modules live in an nn.ModuleDict, whose keys cannot contain dots ("canny.v2").
    name = (name or path.stem).replace(".", "_")
    adapter = ControlNetAdapter(spec, name=name, strength=strength, info=info, input_name=input_name)
    try:
        adapter.load_adapter_state_dict(tensors)
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(f"{path}: {exc}") from None
    adapter.to(_device_of(model))
    model.add_adapter(adapter)
    return adapter


def training_inputs(batch: Mapping[str, Any], inputs: dict[str, Any], cfg: Any = None,
                    generator: torch.Generator | None = None) -> dict[str, Any]:
    """Add the cached hint to the model inputs of one training step (the trainer calls this every step)."""
    if "control" not in batch:
        raise AdapterMismatchError(
            "the training batch has no 'control' hint: the encode cache was built without the ControlNet hint "
            "encoder; rebuild it with adapter.method controlnet (hint_encoders supplies the encoder)")
    inputs["control"] = batch["control"]
    return inputs


def hint_encoders(cfg: Any, context: Any = None, effnet: Any = None) -> list:
    """The cache encoders this method needs: one hint encoder for ``cfg.control``."""
    return [build_hint_encoder(cfg.control, effnet=effnet)]


def feature_encoders(cfg: Any, context: Any, models: Any) -> list:
    """The run's hook for the encode cache (same signature for every method)."""
    control = cfg.control
    return hint_encoders(cfg, context, effnet=models.effnet() if control == "sr" else None)


def export_tensors(tensors: dict, metadata: dict[str, str], fmt: str, out: Path) -> Path:
    """A training checkpoint's tensors as ``fmt`` without a base model (checkpoints already hold this layout)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown ControlNet export format {fmt!r}; choose one of {FORMATS}")
    meta = dict(metadata, **{"cascade_studio.format": fmt})
    return save_adapter_tensors(tensors, Path(out), _with_comfyui_status(tensors, meta, Path(out)))


# -- generation ------------------------------------------------------------------------------------------
def generation_load(resolved: Any, scratch: Path, state: dict) -> tuple[Path, dict[str, Any], str]:
    """(file, loader options, model input name): each ControlNet of a generation reads its own hint input
    (``control``, ``control_1``, ...), so two ControlNets can take two images."""
    index = state.get("controlnets", 0)
    state["controlnets"] = index + 1
    input_name = "control" if index == 0 else f"control_{index}"
    return Path(resolved.path), {"strength": resolved.weight, "input_name": input_name}, input_name


def generation_prepare(resolved: Any, inputs: Any) -> None:
    """Before any model loads: the control image is given and exists."""
    control = resolved.spec.control
    if not control:
        raise ValueError(f"{resolved.path} is a ControlNet but no control image was given; add --control IMAGE")
    if not Path(control).is_file():
        raise FileNotFoundError(f"control image {control} does not exist; check the path")


def generation_hint(inputs: Any, path: str | Path, adapter: ControlNetAdapter, mode: str | None = None
                    ) -> torch.Tensor:
    """The [1, C, H, W] hint of one control image for one ControlNet, at ``inputs``' size (cached there).

    The image is resized to the generation size rounded up to whole latent cells (the grid training hints
    tile; another aspect ratio is refused rather than distorted). Mode ``canny`` takes the Canny edges exactly
    as the training cache's ``CannyHint`` does (the default for canny ControlNets); ``image`` feeds the image
    as is (greyscale for 1-channel ControlNets), for pre-made maps.
    """
    spec = adapter.spec
    if spec.control in ("inpainting", "sr"):
        raise ValueError(f"ControlNet {adapter.name!r} is a {spec.control} ControlNet; generate and compare make "
                         "canny and image hints only")
    mode = mode or ("canny" if spec.control == "canny" else "image")
    key = ("hint", str(path), mode, spec.c_in, inputs.size)
    if key in inputs.cache:
        return inputs.cache[key]
    if mode == "canny" and spec.c_in != 1:
        raise ValueError(f"--control-mode canny makes 1-channel edge maps but ControlNet {adapter.name!r} takes "
                         f"{spec.c_in} channels; use --control-mode image")
    if mode == "image" and spec.c_in not in (1, 3):
        raise ValueError(f"ControlNet {adapter.name!r} takes {spec.c_in}-channel hints; a control image gives 1 or "
                         "3")
    image = inputs.read_image(path, "control image")
    height, width = image.shape[-2:]
    if abs((width / height) / inputs.aspect - 1.0) > 0.02:
        raise ValueError(f"control image {path} is {width}x{height} but the generation is {inputs.aspect:.3f}:1; "
                         "crop it to the generation's aspect ratio so edges land where they should")
    # The aspect was checked above against the requested size, before rounding to whole latent cells.
    resized = ImageHint(channels=3, size=inputs.size, aspect_tolerance=float("inf")).convert(image, str(path))
    if mode == "canny":
        hint = CannyHint().edges(resized[None])
    else:
        hint = ImageHint(channels=spec.c_in).convert(resized, str(path))[None]
    inputs.cache[key] = hint
    return hint


def generation_inputs(entry: Any, inputs: Any, batch: int, cond: dict, uncond: dict) -> None:
    """The hint of one loaded ControlNet, shared by the conditional and unconditional halves."""
    generation_prepare(entry.resolved, inputs)
    hint = generation_hint(inputs, entry.resolved.spec.control, entry.adapter, entry.resolved.spec.control_mode)
    cond[entry.input_name] = hint.expand(batch, *hint.shape[1:])


def describe_spec(spec: Any) -> list[str]:
    """Extra words of a ControlNet spec's label: the hint mode and control image."""
    return [f"{spec.control_mode or 'auto'}:{Path(spec.control).name}"] if spec.control else []
