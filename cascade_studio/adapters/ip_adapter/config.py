"""The IP-Adapter method's recipe section (``adapter.ip_adapter``) and its catalog record. Imports no torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ...config.fields import setting
from ..catalog import CommandLine, ExportFormat, Method, register

@dataclass(frozen=True)
class IPAdapterConfig:
    """An IP-Adapter: extra key/value projections that let Stage C attend to image tokens."""

    image_encoder: str = setting("openclip-vit-h-14", "Image encoder whose embedding becomes the image tokens: "
                                 "openclip-vit-h-14 (the original IP-Adapter's), clip-vit-l-14 (the one Stage "
                                 "C's native image input was trained with), clip-vit-bigg-14, tiny (a small "
                                 "random encoder for tiny runs) or toy (tiny's architecture trained on toy-shapes, "
                                 "shipped with preset: toy).",
                                 choices=("openclip-vit-h-14", "clip-vit-l-14", "clip-vit-bigg-14", "tiny", "toy"))
    image_encoder_weights: Optional[str] = setting(None, "Weights of the image encoder: an open_clip checkpoint "
                                                   "file (.safetensors) or a folder/repo id with a CLIP vision "
                                                   "model; null = model.image_encoder / model.repo_id.", path=True,
                                                   weights=True)
    num_tokens: int = setting(4, "Image tokens produced per image by the projection.", minimum=1, example=4)
    scale: float = setting(1.0, "Weight of the image attention added to the text attention.", minimum=0,
                           example=1.0)
    drop_image: float = setting(0.05, "Training probability of dropping only the image (for guidance).",
                                minimum=0, maximum=1, example=0.05)
    drop_text: float = setting(0.05, "Training probability of dropping only the caption.", minimum=0, maximum=1,
                               example=0.05)
    drop_both: float = setting(0.05, "Training probability of dropping image and caption together.", minimum=0,
                               maximum=1, example=0.05)


def check(section: IPAdapterConfig, recipe: Any, ok, add) -> None:
    """A toy-sized encoder cannot condition a real base; the three dropouts are exclusive probabilities."""
    if ok("adapter.ip_adapter.image_encoder", "model.preset") and section.image_encoder in ("tiny", "toy") \
            and recipe.model.preset in ("lite", "big"):
        add("adapter.ip_adapter.image_encoder", section.image_encoder, f"the {section.image_encoder} encoder is a "
            f"32-dim toy-sized encoder and cannot condition the real {recipe.model.preset} model",
            "e.g. clip-vit-l-14")
    drops = ("drop_image", "drop_text", "drop_both")
    if ok(*(f"adapter.ip_adapter.{d}" for d in drops)):
        total = sum(getattr(section, d) for d in drops)
        if total > 1:
            add("adapter.ip_adapter.drop_both", [getattr(section, d) for d in drops],
                f"drop_image + drop_text + drop_both are exclusive probabilities and sum to {total:g} > 1",
                "e.g. 0.05 each")


def _add_generate(parser: Any) -> None:
    parser.add_argument("--ip-adapter", metavar="FILE[@SCALE]", help="IP-Adapter file (needs --image-prompt)")
    parser.add_argument("--ip-scale", type=float, default=1.0, help="IP-Adapter scale when FILE has no @SCALE")


def _add_inputs(parser: Any, repeat: bool) -> None:
    parser.add_argument("--image-prompt", action="append", default=[], metavar="PATH",
                        help="IP-Adapter image prompt (repeatable; several are combined by --ip-multi)")
    parser.add_argument("--ip-multi", choices=["average", "concat"], default="average",
                        help="several image prompts: average their embeddings (one blended prompt) or concatenate "
                             "their tokens (each image keeps its features)")
    parser.add_argument("--ip-image-encoder", metavar="SOURCE",
                        help="weights of the IP-Adapter's image encoder (file, folder or repo id; tiny is built in)")


def _settings(args: Any) -> dict:
    return {"image_prompts": tuple(getattr(args, "image_prompt", None) or ()) or None,
            "multi_image": getattr(args, "ip_multi", None)}


def _specs(args: Any, parse) -> list:
    text = getattr(args, "ip_adapter", None)
    if getattr(args, "image_prompt", None) and not (text or getattr(args, "adapter", None)):
        raise ValueError("--image-prompt needs an IP-Adapter: add --ip-adapter FILE")
    if not text:
        return []
    spec = parse(text, method="ip_adapter", **_settings(args))
    return [spec if spec.weight is not None else spec.with_defaults(weight=args.ip_scale)]


METHOD = register(Method(
    name="ip_adapter", label="IP-Adapter", doc="image prompts: extra key/value projections that let Stage C "
    "attend to image tokens",
    config=IPAdapterConfig,
    formats=(ExportFormat("ip_adapter", "one .safetensors file with image_proj.* + ip_adapter.* keys"),),
    implementation="cascade_studio.adapters.ip_adapter.method", aliases=("ip", "ip-adapter"), short="ip",
    weight_name="scale", weight_prefix="scale ", check=check,
    command_line=CommandLine(add_generate=_add_generate, specs=_specs, add_inputs=_add_inputs, settings=_settings)))
