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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from ..adapters import catalog
from ..diffusion.samplers import DEFAULT_SAMPLER, sampler_help, sampler_names
from ..models.checkpointing import MODES as CHECKPOINTING_MODES
from ..models.presets import PRESETS
from .errors import Problem
from .fields import setting

__all__ = [
    "SCHEMA_VERSION", "WEIGHT_FIELDS", "PICKLE_SUFFIXES", "FieldDoc", "setting",
    "ModelConfig", "AdapterConfig", "DataConfig",
    "CacheConfig", "OptimizerConfig", "ScheduleConfig", "TrainConfig", "PreviewConfig", "TrackingConfig",
    "ExportConfig", "Recipe", "check_relations", "describe_fields", "get_setting", "recipe_to_dict",
    "dump_recipe_yaml", "is_section", "section_types",
]

SCHEMA_VERSION = 1

# STABLE_CASCADE.md §3: the published settings are bf16 or fp32 only because activations overflow fp16's range.
_FP16_REASON = ("fp16 is refused: Stage C activations overflow in fp16 (the published weights run in bf16 or "
                "fp32)")

@dataclass(frozen=True)
class ModelConfig:
    """Which Stage C to adapt, and where its weights and encoders come from."""

    preset: str = setting("tiny", "Model size and weights: big (3.6B Stage C) or lite (1B) with the published "
                          "weights, tiny (a small model with a seeded random init, for CPU runs and tests) or toy "
                          "(tiny's architecture with the pretrained weights shipped with the studio: real pictures "
                          "of toy shapes on a CPU).",
                          choices=tuple(PRESETS))
    stage_c: Optional[str] = setting(None, "Stage C weights: a local .safetensors file, a diffusers folder or a "
                                     "Hugging Face repo id. null = the preset's built-in weights (tiny, toy); "
                                     "lite/big need this or model.repo_id. Relative paths resolve against the "
                                     "current directory.", path=True, weights=True, example="models/stage_c_bf16.safetensors")
    repo_id: Optional[str] = setting(None, "Hugging Face repo to fetch every missing weight file from (uses the "
                                     "local hub cache).", example="stabilityai/stable-cascade")
    variant: Optional[str] = setting(None, "Weight file variant in the repo, e.g. bf16 picks stage_c_bf16."
                                     " null = full precision files.", example="bf16")
    text_encoder: Optional[str] = setting(None, "Text encoder (CLIP ViT-bigG text tower) path; null = from "
                                          "model.repo_id, or built in code for tiny/toy.", path=True, weights=True)
    image_encoder: Optional[str] = setting(None, "Image encoder (CLIP ViT-L/14 vision tower) path; null = from "
                                           "model.repo_id, or built in code for tiny/toy.", path=True, weights=True)
    effnet: Optional[str] = setting(None, "EfficientNet semantic compressor weights path; null = from "
                                    "model.repo_id, or built in code for tiny/toy.", path=True, weights=True)
    previewer: Optional[str] = setting(None, "Previewer weights path (latent -> small RGB preview); null = from "
                                       "model.repo_id, or built in code for tiny/toy.", path=True, weights=True)
    dtype: str = setting("bf16", "Precision the frozen base model is held in. fp16 is refused: Stage C overflows "
                         "in fp16 (published weights are bf16/fp32 only).", choices=("bf16", "fp32"),
                         refused={"fp16": _FP16_REASON, "float16": _FP16_REASON})
    allow_pickle: bool = setting(False, "Allow loading .ckpt/.pt/.bin pickle files (only with weights_only). "
                                 "Pickles can run code: keep false unless you trust the file.")


def _adapter_config() -> type:
    """``adapter``: ``method`` plus one section per registered method (only the one ``method`` names is used).

    Built from the catalog, so a method's section exists exactly where its folder registers it."""
    methods = catalog.methods()
    fields: list[tuple[str, Any, Any]] = [(
        "method", str, setting(methods[0].name, "Adapter method to train: " + "; ".join(
            f"{m.name} ({m.doc})" for m in methods) + ".", choices=tuple(m.name for m in methods)))]
    fields += [(m.name, m.config, setting(doc=f"{m.label} settings (used when method is {m.name}).",
                                          factory=m.config)) for m in methods]
    cls = dataclasses.make_dataclass("AdapterConfig", fields, frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = "Which adapter method to train; only the sub-section named by ``method`` is used."
    return cls


AdapterConfig = _adapter_config()


def _formats_doc() -> str:
    return ("Formats to export; null = the method's first one. " + " ".join(
        f"A {m.label} ({m.name}) exports as {catalog.format_help(m)}." for m in catalog.methods()))


@dataclass(frozen=True)
class DataConfig:
    """Training images and captions."""

    source: str = setting("folder", "Kind of dataset: folder (images with .txt captions or metadata.jsonl/csv), "
                          "hf_disk (a saved Hugging Face dataset), hf_hub (a hub dataset name) or webdataset "
                          "(.tar shards).", choices=("folder", "hf_disk", "hf_hub", "webdataset"))
    path: Optional[str] = setting(None, "Image folder, saved dataset folder, or tar glob ({000..009} ranges "
                                  "work); with data.streaming also shard URLs (https://, s3://, hf://). Relative "
                                  "paths resolve against the current directory.", path=True,
                                  example="datasets/tiny-shapes")
    name: Optional[str] = setting(None, "Hub dataset name (source hf_hub).", example="user/my-dataset")
    split: str = setting("train", "Dataset split to read (hf_disk, hf_hub).", example="train")
    image_column: str = setting("image", "Column (or webdataset extension) holding the image.", example="image")
    caption_column: Optional[str] = setting(None, "Column (or webdataset extension) holding the caption; null = the "
                                            "first of text, caption, prompt that the data has.", example="text")
    resolution: int = setting(768, "Training side length in pixels; a multiple of 32 (Stage C latents are 1/32 "
                              "of the image through the effnet compressor).", minimum=32, multiple_of=32,
                              example=768)
    crop: str = setting("center", "How images are cropped to the training size (center; random is not applied yet "
                        "and is refused).", choices=("center", "random"))
    buckets: bool = setting(False, "Group images by aspect ratio instead of cropping to a square (not applied by "
                            "the trainer yet, so true is refused).")
    caption_dropout: float = setting(0.05, "Probability of training on an empty caption (enables classifier-"
                                     "free guidance).", minimum=0, maximum=1, example=0.05)
    max_images: Optional[int] = setting(None, "Use at most this many images; null = all.", minimum=1,
                                        example=1000)
    holdout_fraction: float = setting(0.0, "Fraction of images held out to report a held-out loss (0 "
                                      "disables).", minimum=0, maximum=0.5, example=0.1)
    max_pixels: int = setting(64_000_000, "Images with more pixels are skipped as bad files (guards against "
                              "decompression bombs).", minimum=1, example=64_000_000)
    streaming: bool = setting(False, "Read the data as a stream while training instead of scanning it first "
                              "(webdataset shards from local paths or https://, s3://, hf:// URLs, or an hf_hub "
                              "dataset): nothing is downloaded or encoded ahead; needs cache.mode: none.")
    shuffle_buffer: int = setting(1000, "Streaming: samples held in each reader's shuffle buffer (more mixes "
                                  "better and takes more memory; shards are shuffled as well).", minimum=1,
                                  example=1000)


# The data sources data.streaming can read (the others are scanned and cached first).
STREAMING_SOURCES = ("webdataset", "hf_hub")


@dataclass(frozen=True)
class CacheConfig:
    """The encode-once cache of latents and text/image embeddings."""

    mode: str = setting("full", "full: encode each image and caption once into the cache before training and "
                        "reuse the result every epoch (the main process encodes what is missing while the others "
                        "wait); sharded: the same cache, every process encoding its share in parallel (on storage "
                        "all processes share: the same path on every machine); none: keep the encoders loaded on "
                        "the training device and encode every batch as it is trained on (for data too big to "
                        "cache, and for streaming).", choices=("full", "sharded", "none"))
    enabled: bool = setting(True, "false: the encode-once cache is private to the run (in its folder) instead of "
                            "shared through cache.dir (cache.mode full or sharded).")
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
    global_batch: Optional[int] = setting(None, "Images per optimizer step over all processes, kept at every "
                                          "world size: the accumulation is worked out at start as global_batch / "
                                          "(batch_size x processes), which must divide evenly; null = "
                                          "batch_size x processes x grad_accum.", minimum=1, example=16)
    mixed_precision: str = setting("bf16", "Autocast precision for the forward pass: no or bf16 (fp16 "
                                   "overflows in Stage C).", choices=("no", "bf16"),
                                   refused={"fp16": _FP16_REASON, "float16": _FP16_REASON})
    gradient_checkpointing: bool = setting(False, "Recompute Stage C activations in the backward pass, whole "
                                           "blocks at a time (much less memory, about 40% slower). true is "
                                           "train.checkpointing: blocks; kept for recipes that say it.")
    checkpointing: str = setting("auto", "Activation checkpointing of Stage C: none; blocks (recompute whole "
                                 "blocks in backward: least memory, the slowest); selective (keep the matmul and "
                                 "attention outputs, recompute norms, GELU, GRN, SiLU and the depthwise conv: "
                                 "less memory than none at a smaller time cost than blocks); auto = what "
                                 "gradient_checkpointing says (true = blocks, false = none).",
                                 choices=("auto",) + CHECKPOINTING_MODES)
    compile: str = setting("auto", "Compile Stage C block by block with torch.compile (fused norms and "
                           "activations; the same results): on, off, or auto = on for CUDA and off elsewhere (on a "
                           "CPU the first step compiles for about a minute, which short runs do not win back).",
                           choices=("auto", "on", "off"))
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
    eval_every: int = setting(0, "Log the held-out loss (data.holdout_fraction) every N steps as well; 0 = only "
                              "before and after training. Each evaluation runs the held-out images once.",
                              minimum=0, example=50)
    max_nonfinite_steps: int = setting(5, "Stop after this many consecutive steps with a NaN/inf loss (each is "
                                       "skipped).", minimum=1, example=5)
    quantize_base: str = setting("none", "Hold the frozen Stage C's Linears smaller to save memory: none; bf16 "
                                 "(with model.dtype: fp32: half the memory, matmuls still in fp32; exact on the "
                                 "published bf16 weights, which are rounded so); int8 or nf4 (bitsandbytes).",
                                 choices=("none", "bf16", "int8", "nf4"))
    num_workers: int = setting(0, "Data loader worker processes that read cached batches (with cache.mode: none, "
                               "read, decode and crop images) ahead of the accelerator (0 = read in the main "
                               "process; 2-4 on a GPU). A stream's order depends on it.", minimum=0, example=2)
    distributed_timeout_minutes: int = setting(120, "Multi-process runs: how long a process waits for the others "
                                               "(e.g. while the main process fills the cache) before giving up; "
                                               "raise it when the first run encodes a very large dataset.",
                                               minimum=1, example=120)

    @property
    def checkpointing_mode(self) -> str:
        """The activation checkpointing in effect: ``checkpointing``, or for ``auto`` what
        ``gradient_checkpointing`` says (the two never disagree: :func:`check_relations` refuses a pair that
        does)."""
        if self.checkpointing != "auto":
            return self.checkpointing
        return "blocks" if self.gradient_checkpointing else "none"


@dataclass(frozen=True)
class PreviewConfig:
    """Sample images rendered during training."""

    every: int = setting(250, "Render previews every N steps; 0 disables.", minimum=0, example=250)
    prompts: tuple[str, ...] = setting(("a photograph of a red fox in the snow",), "Prompts to render; each is "
                                       "rendered once per seed.", example=["a red circle"])
    seeds: tuple[int, ...] = setting((0,), "Seeds to render each prompt with.", minimum=0, example=[0, 1])
    sampler: str = setting(DEFAULT_SAMPLER, "Stage C sampler of the previews: " + sampler_help() + ".",
                           choices=sampler_names())
    steps: int = setting(10, "Stage C sampling steps of a preview: 10 shows how training goes at half the cost of "
                         "the published 20 (every step is two Stage C evaluations per prompt and seed with "
                         "guidance; the studio's recipe form shows the total).", minimum=1, example=10)
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

    formats: Optional[tuple[str, ...]] = setting(None, _formats_doc(), choices=catalog.all_formats(),
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
    weights: bool = False  # names weights to load (checked for pickles and missing local files)


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
                             f.metadata["doc"], f.metadata.get("choices"), f.metadata.get("weights", False)))
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
WEIGHT_FIELDS = tuple(doc.path for doc in describe_fields(Recipe) if doc.weights)
# torch pickle formats: loading one can run arbitrary code, hence model.allow_pickle.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


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
    train = recipe.train
    if ok("train.global_batch", "train.grad_accum", "train.batch_size") and train.global_batch is not None:
        if train.grad_accum != 1:
            add("train.global_batch", train.global_batch, "and train.grad_accum both set the accumulation",
                "set one: global_batch keeps the images per step at every world size, grad_accum fixes the "
                "micro-batches per step")
        elif train.global_batch % train.batch_size:
            add("train.global_batch", train.global_batch, f"is not a multiple of train.batch_size "
                f"({train.batch_size})", f"e.g. {train.batch_size * max(1, round(train.global_batch / train.batch_size))}")
    if ok("name") and (any(sep in recipe.name for sep in "/\\") or recipe.name.strip() in (".", "..")):
        add("name", recipe.name, "names a run folder, so it cannot be '.', '..' or contain a slash or a backslash",
            "e.g. my-style")

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

    method = catalog.get(adapter.method) if ok("adapter.method") else None
    if method is not None and method.check is not None:
        method.check(getattr(adapter, method.name), recipe, ok, add)

    if ok("data.source", "data.path") and data.source != "hf_hub" and data.path is None:
        add("data.path", None, f"source {data.source} reads from data.path, which is not set",
            "point it at your data, e.g. datasets/tiny-shapes")
    if ok("data.buckets") and data.buckets:
        add("data.buckets", True, "aspect-ratio buckets are not applied by the trainer yet: every image is cropped "
            "to the square data.resolution (the Data page's Buckets tab shows what bucketing would do)",
            "set data.buckets: false (or leave it out)")
    if ok("data.crop") and data.crop == "random":
        add("data.crop", "random", "random crops are not applied yet: the encode-once cache crops each image once, "
            "at its center", "set data.crop: center (or leave it out)")
    if ok("data.source", "data.name") and data.source == "hf_hub" and data.name is None:
        add("data.name", None, "source hf_hub needs the hub dataset name", "e.g. user/my-dataset")
    if ok("data.streaming") and data.streaming:
        if ok("data.source") and data.source not in STREAMING_SOURCES:
            add("data.source", data.source, f"cannot be streamed; data.streaming reads {' or '.join(STREAMING_SOURCES)}",
                "set data.streaming: false, or convert the images to webdataset .tar shards")
        if ok("cache.mode") and recipe.cache.mode != "none":
            add("cache.mode", recipe.cache.mode, "a stream is read while training, so it cannot be encoded into the "
                "cache ahead of it", "set cache.mode: none (the encoders then encode each batch on the fly)")
        if ok("data.holdout_fraction") and data.holdout_fraction > 0:
            add("data.holdout_fraction", data.holdout_fraction, "a stream has no fixed set of images to hold out",
                "set data.holdout_fraction: 0, or hold out shards yourself and evaluate on them after training")
        if ok("data.max_images") and data.max_images is not None:
            add("data.max_images", data.max_images, "is not applied to a stream (it has no known length)",
                "leave it out; list fewer shards in data.path to train on fewer images")

    train = recipe.train
    if ok("train.checkpointing", "train.gradient_checkpointing") and train.gradient_checkpointing \
            and train.checkpointing not in ("auto", "blocks"):
        add("train.checkpointing", train.checkpointing, "contradicts train.gradient_checkpointing: true, which means "
            "checkpointing: blocks", f"keep train.checkpointing: {train.checkpointing} and remove "
            "train.gradient_checkpointing (or set it false); train.checkpointing alone says which mode")

    if ok("train.quantize_base", "model.dtype") and train.quantize_base == "bf16" and recipe.model.dtype != "fp32":
        add("train.quantize_base", train.quantize_base, f"holds fp32 Linear weights in bf16, but model.dtype is "
            f"{recipe.model.dtype}: the weights are bf16 already", "remove train.quantize_base (or set model.dtype: "
            "fp32 to compute in fp32 with the weights held in bf16)")

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

    formats = recipe.export.formats
    if ok("export.formats") and formats is not None:
        if not formats:
            add("export.formats", [], "must list at least one format, or be null for the method's default",
                f"e.g. [{method.default_format.name}]" if method else "")
        wrong = [fmt for fmt in formats if method is not None and fmt not in method.format_names]
        if wrong:
            owners = {fmt: [m.label for m in catalog.methods() if fmt in m.format_names] for fmt in wrong}
            said = ", ".join(f"{fmt} (a {' / '.join(owners[fmt])} format)" if owners[fmt] else fmt for fmt in wrong)
            add("export.formats", list(formats), f"a {method.label} cannot be exported as {said}; it exports as "
                f"{catalog.format_help(method)}", f"e.g. [{method.default_format.name}]")


def accumulation(train: TrainConfig, processes: int) -> int:
    """Micro-batches per optimizer step on ``processes`` processes: ``train.grad_accum``, or the one that keeps
    ``train.global_batch`` (a RecipeError when it does not divide)."""
    if train.global_batch is None:
        return train.grad_accum
    per_step = train.batch_size * processes
    if train.global_batch % per_step:
        from .errors import Problem, RecipeError

        fits = [n for n in range(1, 65) if train.global_batch % (train.batch_size * n) == 0]
        raise RecipeError([Problem("train.global_batch", train.global_batch,
                                   f"cannot be split into micro-batches of {train.batch_size} on {processes} "
                                   f"process(es) ({per_step} images per micro-step)",
                                   (f"launch {', '.join(map(str, fits[:6]))} process(es), or change "
                                    if fits else "change ") + "train.global_batch or train.batch_size")])
    return train.global_batch // per_step
