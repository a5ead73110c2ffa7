"""The recipe schema: frozen, versioned dataclasses whose every field carries its own documentation.

Each field is declared with :func:`setting`, whose ``doc`` text is the single source for ``--help``, the comments
of :func:`dump_recipe_yaml` and the studio's tooltips (STYLE.md habit 4, after litgpt ``args.py``). The numeric
limits and choices in the same metadata drive validation in :mod:`cascade_studio.config.loader`, so a rule is
written once, next to the field it constrains.

Lists are stored as tuples so a loaded recipe is truly immutable (and hashable where its values are).
Paths are kept exactly as written; relative paths are resolved against the current working directory when they
are used (recipes are meant to be run from the repository root).

This module imports no torch: the CLI and the UI read recipes cheaply.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from .errors import Problem

__all__ = [
    "SCHEMA_VERSION", "LORA_TARGET_GROUPS", "WEIGHT_FIELDS", "PICKLE_SUFFIXES", "FieldDoc", "setting",
    "ModelConfig", "LoraConfig", "ControlNetConfig", "IPAdapterConfig", "AdapterConfig", "DataConfig",
    "CacheConfig", "OptimizerConfig", "ScheduleConfig", "TrainConfig", "PreviewConfig", "TrackingConfig",
    "ExportConfig", "Recipe", "check_relations", "describe_fields", "get_setting", "recipe_to_dict",
    "dump_recipe_yaml", "is_section", "section_types",
]

SCHEMA_VERSION = 1

# STABLE_CASCADE.md §3: the published settings are bf16 or fp32 only because activations overflow fp16's range.
_FP16_REASON = ("fp16 is refused: Stage C activations overflow in fp16 (the published weights run in bf16 or "
                "fp32)")

# Named groups of Stage C Linear layers a LoRA can target. "attention" uses ComfyUI's in-memory names for the
# split attention projections, which is what makes the exported file loadable there (STABLE_CASCADE.md §6).
LORA_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "out_proj"),
    "kv_mapper": ("kv_mapper.1",),
    "channelwise": ("channelwise.0", "channelwise.4"),
    "clip_mappers": ("clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper"),
}


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    choices: Optional[tuple[str, ...]] = None,
    open_choices: bool = False,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
    multiple_of: Optional[int] = None,
    example: Any = None,
    path: bool = False,
    allow_empty: bool = False,
    refused: Optional[Mapping[str, str]] = None,
    factory: Any = None,
) -> Any:
    """Declare one recipe field with its documentation and the rules validation enforces.

    ``choices`` apply to a string field or to each item of a list field; with ``open_choices`` they are the
    named options but other values are checked by a field-specific rule instead. ``minimum``/``maximum``
    bound numbers (inclusive unless ``min_exclusive``/``max_exclusive``), or every item of a number list.
    ``example`` is shown in hints; ``path`` marks a filesystem path (for the UI's file pickers).
    Strings must be non-empty unless ``allow_empty``. ``refused`` maps values users are likely to try to the
    reason they are not accepted (shown instead of a bare "must be one of").
    """
    if not doc:
        raise ValueError("every recipe field needs a doc string")  # keeps STYLE.md habit 4 honest
    metadata = {
        "doc": doc, "choices": choices, "open_choices": open_choices, "min": minimum, "max": maximum,
        "min_exclusive": min_exclusive, "max_exclusive": max_exclusive, "multiple_of": multiple_of,
        "example": example, "path": path, "allow_empty": allow_empty, "refused": dict(refused or {}),
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    """Which Stage C to adapt, and where its weights and encoders come from."""

    preset: str = setting("tiny", "Model size: big (3.6B Stage C), lite (1B), tiny (a small model built in code "
                          "for CPU runs and tests) or toy (an even smaller one for unit tests).",
                          choices=("tiny", "lite", "big", "toy"))
    stage_c: Optional[str] = setting(None, "Stage C weights: a local .safetensors file, a diffusers folder or a "
                                     "Hugging Face repo id. null = the preset's random init (tiny/toy only); "
                                     "lite/big need this or model.repo_id. Relative paths resolve against the "
                                     "current directory.", path=True, example="models/stage_c_bf16.safetensors")
    repo_id: Optional[str] = setting(None, "Hugging Face repo to fetch every missing weight file from (uses the "
                                     "local hub cache).", example="stabilityai/stable-cascade")
    variant: Optional[str] = setting(None, "Weight file variant in the repo, e.g. bf16 picks stage_c_bf16."
                                     " null = full precision files.", example="bf16")
    text_encoder: Optional[str] = setting(None, "Text encoder (CLIP ViT-bigG text tower) path; null = from "
                                          "model.repo_id, or built in code for tiny/toy.", path=True)
    image_encoder: Optional[str] = setting(None, "Image encoder (CLIP ViT-L/14 vision tower) path; null = from "
                                           "model.repo_id, or built in code for tiny/toy.", path=True)
    effnet: Optional[str] = setting(None, "EfficientNet semantic compressor weights path; null = from "
                                    "model.repo_id, or built in code for tiny/toy.", path=True)
    previewer: Optional[str] = setting(None, "Previewer weights path (latent -> small RGB preview); null = from "
                                       "model.repo_id, or built in code for tiny/toy.", path=True)
    dtype: str = setting("bf16", "Precision the frozen base model is held in. fp16 is refused: Stage C overflows "
                         "in fp16 (published weights are bf16/fp32 only).", choices=("bf16", "fp32"),
                         refused={"fp16": _FP16_REASON, "float16": _FP16_REASON})
    allow_pickle: bool = setting(False, "Allow loading .ckpt/.pt/.bin pickle files (only with weights_only). "
                                 "Pickles can run code: keep false unless you trust the file.")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA (and its LoHa/LoKr/DoRA relatives) on Stage C Linear layers."""

    rank: int = setting(16, "Rank of the low-rank update.", minimum=1, example=16)
    alpha: float = setting(16.0, "Scale numerator: the update is multiplied by alpha/rank.", minimum=0,
                           min_exclusive=True, example=16.0)
    dropout: float = setting(0.0, "Dropout on the LoRA input during training (0 disables).", minimum=0,
                             maximum=1, max_exclusive=True, example=0.0)
    targets: tuple[str, ...] = setting(("attention",), "Layers to adapt: attention (= to_q, to_k, to_v, "
                                       "out_proj), kv_mapper, channelwise, clip_mappers, or an explicit module "
                                       "name suffix such as attn.to_q.", choices=tuple(LORA_TARGET_GROUPS),
                                       open_choices=True, example=["attention"])
    type: str = setting("lora", "Adapter flavour: lora, loha (Hadamard product), lokr (Kronecker) or dora "
                        "(weight-decomposed). ComfyUI loads all four.", choices=("lora", "loha", "lokr", "dora"))
    init_weights: bool = setting(True, "Initialise so the fresh adapter changes nothing (up weights zero).")


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
                                                     "59,63).", minimum=0, example=[0, 4, 8, 12])
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
                                       "canny.safetensors; null = fresh init with zero projections.", path=True)


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
                                                   "model; null = model.image_encoder / model.repo_id.", path=True)
    num_tokens: int = setting(4, "Image tokens produced per image by the projection.", minimum=1, example=4)
    scale: float = setting(1.0, "Weight of the image attention added to the text attention.", minimum=0,
                           example=1.0)
    drop_image: float = setting(0.05, "Training probability of dropping only the image (for guidance).",
                                minimum=0, maximum=1, example=0.05)
    drop_text: float = setting(0.05, "Training probability of dropping only the caption.", minimum=0, maximum=1,
                               example=0.05)
    drop_both: float = setting(0.05, "Training probability of dropping image and caption together.", minimum=0,
                               maximum=1, example=0.05)


@dataclass(frozen=True)
class AdapterConfig:
    """Which adapter method to train; only the sub-section named by ``method`` is used."""

    method: str = setting("lora", "Adapter method to train.", choices=("lora", "controlnet", "ip_adapter"))
    lora: LoraConfig = setting(doc="LoRA settings (used when method is lora).", factory=LoraConfig)
    controlnet: ControlNetConfig = setting(doc="ControlNet settings (used when method is controlnet).",
                                           factory=ControlNetConfig)
    ip_adapter: IPAdapterConfig = setting(doc="IP-Adapter settings (used when method is ip_adapter).",
                                          factory=IPAdapterConfig)


@dataclass(frozen=True)
class DataConfig:
    """Training images and captions."""

    source: str = setting("folder", "Kind of dataset: folder (images with .txt captions or metadata.jsonl/csv), "
                          "hf_disk (a saved Hugging Face dataset), hf_hub (a hub dataset name) or webdataset "
                          "(.tar shards).", choices=("folder", "hf_disk", "hf_hub", "webdataset"))
    path: Optional[str] = setting(None, "Image folder, saved dataset folder, or tar glob ({000..009} ranges "
                                  "work). Relative paths resolve against the current directory.", path=True,
                                  example="datasets/tiny-shapes")
    name: Optional[str] = setting(None, "Hub dataset name (source hf_hub).", example="user/my-dataset")
    split: str = setting("train", "Dataset split to read (hf_disk, hf_hub).", example="train")
    image_column: str = setting("image", "Column (or webdataset extension) holding the image.", example="image")
    caption_column: str = setting("text", "Column (or webdataset extension) holding the caption.", example="text")
    resolution: int = setting(768, "Training side length in pixels; a multiple of 32 (Stage C latents are 1/32 "
                              "of the image through the effnet compressor).", minimum=32, multiple_of=32,
                              example=768)
    crop: str = setting("center", "How images are cropped to the training size.", choices=("center", "random"))
    buckets: bool = setting(False, "Group images by aspect ratio instead of cropping to a square.")
    caption_dropout: float = setting(0.05, "Probability of training on an empty caption (enables classifier-"
                                     "free guidance).", minimum=0, maximum=1, example=0.05)
    max_images: Optional[int] = setting(None, "Use at most this many images; null = all.", minimum=1,
                                        example=1000)
    holdout_fraction: float = setting(0.0, "Fraction of images held out to report a held-out loss (0 "
                                      "disables).", minimum=0, maximum=0.5, example=0.1)
    max_pixels: int = setting(64_000_000, "Images with more pixels are skipped as bad files (guards against "
                              "decompression bombs).", minimum=1, example=64_000_000)


@dataclass(frozen=True)
class CacheConfig:
    """The encode-once cache of latents and text/image embeddings."""

    enabled: bool = setting(True, "Encode each image and caption once and reuse the result every epoch.")
    dir: Optional[str] = setting(None, "Cache folder; null = <workspace>/cache.", path=True)


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer of the adapter parameters."""

    name: str = setting("adamw8bit", "Optimizer: adamw8bit / lion8bit (bitsandbytes, less memory), adamw or "
                        "adafactor.", choices=("adamw8bit", "adamw", "lion8bit", "adafactor"))
    lr: float = setting(1e-4, "Peak learning rate.", minimum=0, min_exclusive=True, example=1e-4)
    weight_decay: float = setting(0.0, "Decoupled weight decay.", minimum=0, example=0.01)
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam/Lion beta1 and beta2, each in [0, 1).", minimum=0,
                                         maximum=1, max_exclusive=True, example=[0.9, 0.999])
    eps: float = setting(1e-8, "Adam epsilon.", minimum=0, min_exclusive=True, example=1e-8)


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning-rate schedule."""

    name: str = setting("constant", "Shape after warmup: constant, cosine (to zero) or linear (to zero).",
                        choices=("constant", "cosine", "linear"))
    warmup_steps: int = setting(0, "Steps of linear warmup from zero to the peak learning rate.", minimum=0,
                                example=100)


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    max_steps: int = setting(1000, "Optimizer steps to train.", minimum=1, example=1000)
    batch_size: int = setting(1, "Images per micro-batch.", minimum=1, example=1)
    grad_accum: int = setting(1, "Micro-batches accumulated per optimizer step.", minimum=1, example=1)
    mixed_precision: str = setting("bf16", "Autocast precision for the forward pass: no or bf16 (fp16 "
                                   "overflows in Stage C).", choices=("no", "bf16"),
                                   refused={"fp16": _FP16_REASON, "float16": _FP16_REASON})
    gradient_checkpointing: bool = setting(False, "Recompute Stage C activations in the backward pass "
                                           "(much less memory, about 30% slower).")
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this value; 0 disables clipping.", minimum=0,
                                   example=1.0)
    seed: int = setting(42, "Random seed for data order, noise and initialisation.", minimum=0, example=42)
    checkpoint_every: int = setting(500, "Save a resumable checkpoint every N steps (the final step is always saved); 0 = only the final step.", minimum=0,
                                    example=500)
    keep_checkpoints: int = setting(2, "How many recent checkpoints to keep on disk.", minimum=1, example=2)
    shift: float = setting(1.0, "Noise schedule shift (logSNR += 2*log(1/shift)); 1 is the published training "
                           "setting.", minimum=0, min_exclusive=True, example=1.0)
    offset_noise: float = setting(0.0, "Offset noise strength (0.1 in the official inpainting/SR ControlNet "
                                  "training).", minimum=0, example=0.1)
    log_every: int = setting(1, "Log loss and learning rate every N steps.", minimum=1, example=10)
    max_nonfinite_steps: int = setting(5, "Stop after this many consecutive steps with a NaN/inf loss (each is "
                                       "skipped).", minimum=1, example=5)
    quantize_base: str = setting("none", "Quantize the frozen Stage C to save memory: none, int8 or nf4 "
                                 "(bitsandbytes).", choices=("none", "int8", "nf4"))
    num_workers: int = setting(0, "Data loader worker processes that read cached batches ahead of the "
                               "accelerator (0 = read in the main process; 2-4 on a GPU).", minimum=0, example=2)
    distributed_timeout_minutes: int = setting(120, "Multi-process runs: how long a process waits for the others "
                                               "(e.g. while the main process fills the cache) before giving up; "
                                               "raise it when the first run encodes a very large dataset.",
                                               minimum=1, example=120)


@dataclass(frozen=True)
class PreviewConfig:
    """Sample images rendered during training."""

    every: int = setting(250, "Render previews every N steps; 0 disables.", minimum=0, example=250)
    prompts: tuple[str, ...] = setting(("a photograph of a red fox in the snow",), "Prompts to render; each is "
                                       "rendered once per seed.", example=["a red circle"])
    seeds: tuple[int, ...] = setting((0,), "Seeds to render each prompt with.", minimum=0, example=[0, 1])
    steps: int = setting(20, "Stage C sampling steps (20 is the published setting).", minimum=1, example=20)
    cfg: float = setting(4.0, "Classifier-free guidance scale (4 is the published setting).", minimum=0,
                         example=4.0)
    decoder: str = setting("previewer", "How latents become pictures: previewer (fast, small) or cascade "
                           "(Stage B + A, full quality, slow).", choices=("previewer", "cascade"))


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow experiment tracking."""

    enabled: bool = setting(True, "Log parameters, metrics, previews and the adapter to MLflow.")
    uri: Optional[str] = setting(None, "MLflow tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///"
                                 "<workspace>/mlflow.db.", example="sqlite:///workspace/mlflow.db")
    experiment: str = setting("cascade-studio", "MLflow experiment name.", example="cascade-studio")
    run_name: Optional[str] = setting(None, "MLflow run name; null = the recipe name plus a timestamp.",
                                      example="my-style-v1")


@dataclass(frozen=True)
class ExportConfig:
    """Files written at the end of a run."""

    formats: tuple[str, ...] = setting(("comfyui",), "Formats to export: comfyui (kohya-style keys ComfyUI "
                                       "loads; for a ControlNet the same file as official), peft (a PEFT folder; lora "
                                       "only), official (the official ControlNet layout, which ComfyUI loads) or "
                                       "ip_adapter (image_proj.* + ip_adapter.* keys; ip_adapter only).",
                                       choices=("comfyui", "peft", "official", "ip_adapter"),
                                       example=["comfyui"])
    dir: Optional[str] = setting(None, "Export folder; null = the run folder.", path=True)


@dataclass(frozen=True)
class Recipe:
    """A whole training recipe (``version: 1``)."""

    version: int = setting(SCHEMA_VERSION, "Recipe format version; must be 1.", example=1)
    name: str = setting("recipe", "Recipe name, used for run folders and the MLflow run; defaults to the file "
                        "name without .yaml.", example="my-style")
    workspace: str = setting("workspace", "Folder holding runs, the cache, checkpoints and mlflow.db. Relative "
                             "paths resolve against the current directory.", path=True, example="workspace")
    model: ModelConfig = setting(doc="The base model.", factory=ModelConfig)
    adapter: AdapterConfig = setting(doc="The adapter to train.", factory=AdapterConfig)
    data: DataConfig = setting(doc="The training data.", factory=DataConfig)
    cache: CacheConfig = setting(doc="The encode-once cache.", factory=CacheConfig)
    optimizer: OptimizerConfig = setting(doc="The optimizer.", factory=OptimizerConfig)
    schedule: ScheduleConfig = setting(doc="The learning-rate schedule.", factory=ScheduleConfig)
    train: TrainConfig = setting(doc="The training loop.", factory=TrainConfig)
    preview: PreviewConfig = setting(doc="Previews during training.", factory=PreviewConfig)
    tracking: TrackingConfig = setting(doc="MLflow tracking.", factory=TrackingConfig)
    export: ExportConfig = setting(doc="Exported files.", factory=ExportConfig)

    @property
    def cache_dir(self) -> Path:
        """Where the encode cache lives: ``cache.dir`` or ``<workspace>/cache`` (relative to the cwd)."""
        return Path(os.path.expanduser(self.cache.dir)) if self.cache.dir else self.workspace_dir / "cache"

    @property
    def workspace_dir(self) -> Path:
        """The workspace folder as a path (relative to the current directory unless absolute)."""
        return Path(os.path.expanduser(self.workspace))

    def tracking_uri(self, environ: Mapping[str, str] = os.environ) -> str:
        """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store under the workspace."""
        if self.tracking.uri:
            return self.tracking.uri
        if environ.get("MLFLOW_TRACKING_URI"):
            return environ["MLFLOW_TRACKING_URI"]
        # Three slashes then an absolute path (itself starting with "/") is SQLAlchemy's absolute-path form.
        return "sqlite:///" + (self.workspace_dir.resolve() / "mlflow.db").as_posix()


def get_setting(recipe: Any, dotted: str) -> Any:
    """The value at a dotted path, e.g. ``get_setting(recipe, "adapter.lora.rank")``."""
    value = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def is_section(tp: Any) -> bool:
    """True for the dataclass types that form nested recipe sections."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.lru_cache(maxsize=None)
def section_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a section's fields (the annotations are strings under ``from __future__``).

    Cached because validation asks for every section on every load; callers must not mutate the result.
    """
    return typing.get_type_hints(cls)


@dataclass(frozen=True)
class FieldDoc:
    """Documentation of one leaf field: dotted path, readable type, default, doc text and choices."""

    path: str
    type: str
    default: Any
    doc: str
    choices: Optional[tuple[str, ...]]


def _type_name(tp: Any, is_path: bool) -> str:
    """A short readable type such as ``int``, ``path | null`` or ``list[str]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _type_name(inner[0], is_path) + " | null"
    if origin is tuple:
        item = _type_name(args[0], False)
        return f"list[{item}]" if len(args) == 2 and args[1] is Ellipsis else f"list[{item}] of {len(args)}"
    if is_path:
        return "path"
    return getattr(tp, "__name__", str(tp))


def describe_fields(section: Any, prefix: str = "") -> list[FieldDoc]:
    """Every leaf field of a section class (or instance, or the whole :class:`Recipe`), depth first."""
    cls = section if isinstance(section, type) else type(section)
    hints = section_types(cls)
    docs: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if is_section(tp):
            docs.extend(describe_fields(tp, prefix=path + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        docs.append(FieldDoc(path, _type_name(tp, f.metadata.get("path", False)), _plain(default),
                             f.metadata["doc"], f.metadata.get("choices")))
    return docs


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so values dump as ordinary YAML."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    """A plain nested dict (lists, not tuples) that :func:`~cascade_studio.config.load_recipe` accepts back."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        out[f.name] = recipe_to_dict(value) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def _yaml_entry(key: str, value: Any, indent: str) -> list[str]:
    """``key: value`` lines, quoted by PyYAML wherever plain YAML would be misread (e.g. ``'no'``).

    Letting PyYAML write each leaf (rather than formatting by hand) keeps odd strings (newlines, ``: ``, ``#``)
    loadable; shifting every line by the same indent keeps the fragment valid under its section key.
    """
    text = yaml.dump({key: value}, Dumper=_RecipeDumper, default_flow_style=False, sort_keys=False, width=100,
                     allow_unicode=True)
    return [indent + line for line in text.splitlines()]


class _RecipeDumper(yaml.SafeDumper):
    """SafeDumper writing lists in flow style (``betas: [0.9, 0.999]``) and mappings in block style."""


_RecipeDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def dump_recipe_yaml(recipe: Recipe, with_comments: bool = True) -> str:
    """The recipe as YAML text; with comments, each field is preceded by its doc (and choices)."""
    lines: list[str] = []

    def emit(section: Any, indent: str) -> None:
        hints = section_types(type(section))
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if with_comments:
                doc = f.metadata["doc"]
                if f.metadata.get("choices") and not f.metadata.get("open_choices"):
                    doc += " One of: " + ", ".join(f.metadata["choices"]) + "."
                wrapped = textwrap.wrap(doc, width=max(40, 110 - len(indent)))
                lines.extend(f"{indent}# {line}" for line in wrapped)
            if is_section(hints[f.name]):
                lines.append(f"{indent}{f.name}:")
                emit(value, indent + "  ")
            else:
                lines.extend(_yaml_entry(f.name, _plain(value), indent))

    emit(recipe, "")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ rules across several fields

# Hugging Face repo ids are "namespace/name" with letters, digits, "-", "_" and "." (no leading punctuation).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Fields naming weights to load; the loader checks the ones that look like local paths.
WEIGHT_FIELDS = ("model.stage_c", "model.text_encoder", "model.image_encoder", "model.effnet", "model.previewer",
                 "adapter.controlnet.init_from")
# torch pickle formats: loading one can run arbitrary code, hence model.allow_pickle.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# An explicit LoRA target is a dotted module-name suffix such as "attn.to_q" or "down_blocks.0.2.attention".
_MODULE_SUFFIX = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")


def check_relations(recipe: Recipe, bad: set[str], problems: list[Problem]) -> None:
    """Rules that involve more than one field or one method's settings; appends to ``problems``.

    ``bad`` holds the paths that already failed their own checks (they hold defaults now); rules touching them
    are skipped so one mistake is reported once.
    """

    def ok(*paths: str) -> bool:
        return not any(path in bad for path in paths)

    def add(path: str, value: Any, message: str, hint: str = "") -> None:
        problems.append(Problem(path, value, message, hint))

    model, adapter, data = recipe.model, recipe.adapter, recipe.data
    if ok("name") and (any(sep in recipe.name for sep in "/\\") or recipe.name.strip() in (".", "..")):
        add("name", recipe.name, "names a run folder, so it cannot be '.', '..' or contain / or \\", "e.g. my-style")

    if ok("model.preset", "model.stage_c", "model.repo_id") and model.preset in ("lite", "big") \
            and model.stage_c is None and model.repo_id is None:
        add("model.stage_c", None, f"preset {model.preset} needs real weights (random init is for tiny/toy only)",
            "set model.repo_id: stabilityai/stable-cascade, or model.stage_c to a weights file")
    if ok("model.repo_id") and model.repo_id is not None and not _REPO_ID.match(model.repo_id):
        add("model.repo_id", model.repo_id, "must be a Hugging Face repo id like org/name",
            "e.g. stabilityai/stable-cascade; for a local file or folder use model.stage_c")

    if ok("model.allow_pickle") and not model.allow_pickle:
        for dotted in WEIGHT_FIELDS:
            value = get_setting(recipe, dotted)
            if ok(dotted) and value is not None and value.lower().endswith(PICKLE_SUFFIXES):
                add(dotted, value, "is a pickle file, which can run code when it is loaded",
                    "convert it to .safetensors, or set model.allow_pickle: true if you trust its source")

    method = adapter.method if ok("adapter.method") else None
    if method == "lora" and ok("adapter.lora.targets"):
        targets = adapter.lora.targets
        if not targets:
            add("adapter.lora.targets", [], "must list at least one target", "e.g. [attention]")
        for index, target in enumerate(targets):
            if target not in LORA_TARGET_GROUPS and not _MODULE_SUFFIX.match(target):
                add(f"adapter.lora.targets[{index}]", target,
                    "must be one of " + ", ".join(LORA_TARGET_GROUPS) + " or a module name suffix",
                    "e.g. attention or attn.to_q")
    if method == "controlnet":
        cnet = adapter.controlnet
        if ok("adapter.controlnet.control", "adapter.controlnet.control_column") and cnet.control == "image" \
                and not cnet.control_column.strip():
            add("adapter.controlnet.control_column", cnet.control_column,
                "control: image reads pre-made control images, so it needs their column or sidecar suffix",
                "e.g. _control (photo.png -> photo_control.png)")
        if ok("adapter.controlnet.proj_blocks") and cnet.proj_blocks is not None and not cnet.proj_blocks:
            add("adapter.controlnet.proj_blocks", [], "must list at least one ResBlock index, or be null",
                "write null for the preset's default")
    if method == "ip_adapter":
        ip = adapter.ip_adapter
        if ok("adapter.ip_adapter.image_encoder", "model.preset") and ip.image_encoder in ("tiny", "toy") \
                and model.preset in ("lite", "big"):
            add("adapter.ip_adapter.image_encoder", ip.image_encoder, f"the {ip.image_encoder} encoder is a "
                f"32-dim toy-sized encoder and cannot condition the real {model.preset} model", "e.g. clip-vit-l-14")
        drops = ("drop_image", "drop_text", "drop_both")
        if ok(*(f"adapter.ip_adapter.{d}" for d in drops)):
            total = sum(getattr(ip, d) for d in drops)
            if total > 1:
                add("adapter.ip_adapter.drop_both", [getattr(ip, d) for d in drops],
                    f"drop_image + drop_text + drop_both are exclusive probabilities and sum to {total:g} > 1",
                    "e.g. 0.05 each")

    if ok("data.source", "data.path") and data.source != "hf_hub" and data.path is None:
        add("data.path", None, f"source {data.source} reads from data.path, which is not set",
            "point it at your data, e.g. datasets/tiny-shapes")
    if ok("data.source", "data.name") and data.source == "hf_hub" and data.name is None:
        add("data.name", None, "source hf_hub needs the hub dataset name", "e.g. user/my-dataset")

    if ok("schedule.warmup_steps", "train.max_steps") and recipe.schedule.warmup_steps >= recipe.train.max_steps:
        add("schedule.warmup_steps", recipe.schedule.warmup_steps,
            f"warmup must end before training does (train.max_steps is {recipe.train.max_steps})",
            "e.g. a tenth of max_steps, or 0")
    preview = recipe.preview
    if ok("preview.every") and preview.every > 0:
        if ok("preview.prompts") and not preview.prompts:
            add("preview.prompts", [], "previews are on (preview.every > 0) but there is no prompt",
                "list one or more prompts, or set preview.every: 0")
        if ok("preview.seeds") and not preview.seeds:
            add("preview.seeds", [], "previews are on (preview.every > 0) but there is no seed", "e.g. [0]")

    if ok("export.formats"):
        if not recipe.export.formats:
            add("export.formats", [], "must list at least one format", "e.g. [comfyui]")
        if method not in (None, "controlnet") and "official" in recipe.export.formats:
            add("export.formats", list(recipe.export.formats), f"official is the ControlNet file layout; a "
                f"{method} adapter cannot be exported that way", "e.g. [comfyui]")
        if method not in (None, "ip_adapter") and "ip_adapter" in recipe.export.formats:
            add("export.formats", list(recipe.export.formats), f"ip_adapter is the IP-Adapter file layout; a "
                f"{method} adapter cannot be exported that way", "e.g. [comfyui]")
        if method == "ip_adapter" and set(recipe.export.formats) - {"ip_adapter"}:
            add("export.formats", list(recipe.export.formats), "an IP-Adapter exports as ip_adapter "
                "(image_proj.* + ip_adapter.* keys)", "[ip_adapter]")
        if method not in (None, "lora") and "peft" in recipe.export.formats:
            add("export.formats", list(recipe.export.formats), f"peft is a LoRA folder layout; a {method} "
                "adapter cannot be exported that way", "e.g. [official]" if method == "controlnet" else "")
