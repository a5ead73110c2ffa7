"""Text -> Stage C -> Stage B -> Stage A -> images (or Stage C -> previewer), one stage in memory at a time.

The cascade (STABLE_CASCADE.md section 1): Stage C samples 16-channel latents at ~1/42.67 of the image size from
the text; Stage B samples 4-channel Stage A latents at 1/4 of the image size conditioned on those latents and
the pooled text; Stage A decodes them to pixels. The previewer shows Stage C latents at 8x their size without
B and A. `sample_stage_c` is shared with compare and training previews, which pass an adapted Stage C and
extra model inputs (ControlNet `cnet`, IP-Adapter image embeddings) through `extra_cond` / `extra_uncond`.
"""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from PIL import Image
from torch import nn

from cascade_studio.devices import to_host
from cascade_studio.diffusion.samplers import DEFAULT_SAMPLER, get_sampler, sample_with
from cascade_studio.models.reuse import reusing_constant_inputs

__all__ = [
    "DTYPES",
    "STAGE_NAMES",
    "CascadeComponents",
    "ModelSpec",
    "STAGE_C_COMPRESSION",
    "GenerateSettings",
    "TextEmbeddings",
    "decode_latents",
    "encode_prompts",
    "generate",
    "initial_noise",
    "sample_stage_c",
    "stage_b_latent_size",
    "stage_c_latent_size",
]

# Image pixels per Stage C latent pixel, as the official pipeline computes it (1024 px -> 24 latents).
STAGE_C_COMPRESSION = 42.67
# Stage A (the VQGAN) works at 1/4 of the image size.
STAGE_A_COMPRESSION = 4
STAGE_C_CHANNELS = 16  # EfficientNet latents (the effnet compressor's 16 channels) at every preset
STAGE_A_CHANNELS = 4
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Stage B is sampled as published whatever Stage C's sampler is (adapters, LCM-LoRAs included, are Stage C's).
STAGE_B_SAMPLER = DEFAULT_SAMPLER
_FP16_NAMES = {"fp16", "float16", "half", "torch.float16"}

# Random streams of one generation besides the Stage C starting noise (which uses `seed` itself, so compare
# can rebuild it with `initial_noise`). Each gets its own derived seed so streams never coincide.
_STREAM_STAGE_C_STEPS = 1
_STREAM_STAGE_B_NOISE = 2
_STREAM_STAGE_B_STEPS = 3

ProgressCallback = Callable[[str, int, int], None]

# ---------------------------------------------------------------------------------------------- components

STAGE_NAMES = ("text_encoder", "stage_c", "stage_b", "stage_a", "previewer", "effnet", "image_encoder")


@dataclass(frozen=True)
class ModelSpec:
    """Where each stage comes from: a preset plus optional weight sources (file, diffusers folder, repo id).

    A stage without a source comes from `repo_id` when set, else from the preset's random init (tiny only).
    """

    preset: str = "tiny"
    stage_c: str | None = None
    stage_b: str | None = None
    stage_a: str | None = None
    previewer: str | None = None
    text_encoder: str | None = None
    effnet: str | None = None
    image_encoder: str | None = None
    repo_id: str | None = None
    variant: str | None = None
    allow_pickle: bool = False

    @classmethod
    def from_config(cls, model_config: Any) -> ModelSpec:
        """Build from a recipe's `model` section (or any object with the same attribute names)."""
        return cls(**{f.name: getattr(model_config, f.name, f.default) for f in fields(cls)})

    def source(self, stage: str) -> str | None:
        """The weight source for `stage`, falling back to `repo_id`."""
        return getattr(self, stage) or self.repo_id


class CascadeComponents:
    """Lazily loads each stage for one use and frees it afterwards, so stages never share the GPU.

    `modules` injects already-built stages (tests, training previews, compare); those are used as they are
    (device, dtype, train/eval state) and are never freed here. `on_load(name, module)` is called for every
    stage this object builds (tests keep weak references through it).
    """

    def __init__(
        self,
        spec: ModelSpec | str = "tiny",
        *,
        device: torch.device | str | None = None,
        modules: Mapping[str, Any] | None = None,
        on_load: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.spec = ModelSpec(preset=spec) if isinstance(spec, str) else spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._injected: dict[str, Any] = {}
        for name, module in (modules or {}).items():
            self.inject(name, module)
        self._on_load = on_load
        self._resident: set[str] = set()
        self._warned = False

    def inject(self, name: str, module: Any) -> None:
        """Use `module` for stage `name` instead of loading it (the caller keeps ownership)."""
        if name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}")
        self._injected[name] = module

    @property
    def resident(self) -> tuple[str, ...]:
        """Stages loaded by this object and not yet released (empty between uses)."""
        return tuple(sorted(self._resident))

    def warn_if_slow(self, settings: GenerateSettings | None = None, preview_hint: str = "preview=True") -> None:
        """Print a one-time note when a real-size preset is about to run on the CPU. The note suggests the
        preview (``preview_hint``: how the caller spells it) only when ``settings`` does not use it already."""
        previewing = settings is not None and settings.preview
        if self._warned:
            return
        from cascade_studio.models.presets import get_preset

        if (settings is not None and not previewing and get_preset(self.spec.preset).built_in
                and not self.spec.source("stage_b") and "stage_b" not in self._injected):
            # The built-in presets' Stage B and A are random weights (only the toy Stage C and previewer are
            # trained): the whole cascade decodes to noise, which compare avoids by defaulting to the previewer.
            self._warned = True
            print(f"note: the {self.spec.preset} preset's Stage B and A are random weights, so the whole cascade "
                  f"draws noise; {preview_hint} decodes with the previewer instead.", file=sys.stderr)
            return
        if self.device.type != "cpu" or self.spec.preset not in ("big", "lite"):
            return
        self._warned = True
        advice = "Use a CUDA GPU" + ("" if previewing else f", or {preview_hint} to skip Stage B and A")
        print(f"note: running the {self.spec.preset} Stable Cascade models on the CPU; expect minutes per "
              f"image and tens of GB of RAM. {advice}.", file=sys.stderr)

    @contextmanager
    def use(self, name: str, dtype: torch.dtype = torch.float32) -> Iterator[Any]:
        """Yield stage `name` in eval mode on `self.device`, then free it (del + gc + CUDA cache).

        Delete your own reference inside the block (`del module`) so the memory really goes before the next
        stage loads.
        """
        if name in self._injected:
            yield self._injected[name]
            return
        module = self.load(name, dtype)
        self._resident.add(name)
        try:
            yield module
        finally:
            del module
            self._resident.discard(name)
            self.release()

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> Any:
        """Build stage `name` (the caller owns the result; prefer `use`)."""
        if name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}")
        source = self.spec.source(name)
        module = self._load_weights(name, source, dtype) if source else self._build_random(name, dtype)
        if isinstance(module, nn.Module):
            module.eval().requires_grad_(False)
        if self._on_load is not None:
            self._on_load(name, module)
        return module

    def release(self) -> None:
        """Return freed memory: collect garbage and empty the CUDA cache when on a GPU."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _build_random(self, name: str, dtype: torch.dtype) -> Any:
        # One builder for every command, so train, generate and compare share the same base: the toy preset's
        # shipped weights (pretrained Stage C, previewer, compressor), the tiny preset's seeded random init.
        from cascade_studio.models.presets import get_preset

        if get_preset(self.spec.preset).weights == "shipped":
            from cascade_studio.models.toy import load_toy_component

            return load_toy_component(name).to(device=self.device, dtype=dtype)
        from cascade_studio.models.random_init import build_random

        return build_random(name, self.spec.preset).to(device=self.device, dtype=dtype)

    def _variant(self, name: str) -> str | None:
        if name not in ("stage_c", "stage_b"):
            return None
        # In a repo holding both sizes, the preset picks the file (stage_c_lite_bf16 ...).
        size = self.spec.preset if self.spec.preset in ("big", "lite") else None
        return "_".join(part for part in (size, self.spec.variant) if part) or None

    def _load_weights(self, name: str, source: str, dtype: torch.dtype) -> Any:
        from cascade_studio.models import loading

        loader = getattr(loading, f"load_{name}")
        kwargs: dict[str, Any] = dict(dtype=dtype, device=self.device, allow_pickle=self.spec.allow_pickle)
        if name in ("stage_c", "stage_b"):
            kwargs["variant"] = self._variant(name)
        return loader(source, **kwargs)

    def locate(self, name: str, dtype: torch.dtype = torch.float32) -> Any:
        """Where stage ``name``'s weights are (``loading.ResolvedWeights``; no tensor is read), or None for a stage
        injected or built in code."""
        from cascade_studio.models import loading

        source = self.spec.source(name)
        if name in self._injected or not source:
            return None
        return loading.resolve_weights(name, source, self._variant(name), dtype)

    def check_sources(self, names: Sequence[str], dtype: torch.dtype = torch.float32,
                      local_only: bool = False) -> None:
        """Find the weights of every stage in ``names`` now (the file exists, a hub repo's files are cached or
        downloaded, the headers are that kind of model) without reading a tensor, so a missing Stage B fails
        before Stage C has sampled for minutes. Injected stages and stages built in code need nothing.
        ``local_only`` never downloads (a repo not in the cache raises ``loading.WeightsNotCached``)."""
        from cascade_studio.models import loading
        from cascade_studio.models.presets import get_preset

        for name in names:
            source = self.spec.source(name)
            if name in self._injected:
                continue
            if not source:
                if not get_preset(self.spec.preset).built_in:
                    raise ValueError(f"the {self.spec.preset} preset has no built-in weights for {name}: give a "
                                     "weights file or folder, or a repo id (model.repo_id / --repo-id, e.g. "
                                     "stabilityai/stable-cascade)")
                continue
            loading.check_source(name, source, self._variant(name), dtype, local_only=local_only)


@dataclass
class GenerateSettings:
    """Everything one generation needs besides the models; defaults are the published sampling settings.

    `prompt` is one caption or a list of captions; `batch` images are made per caption. `sampler` is Stage C's
    sampler by name (`diffusion.samplers`; Stage B always uses the published one). `width`/`height` are
    the output size in pixels. `preview=True` stops after Stage C and shows its latents through the previewer
    (8x the latent size, e.g. 192 px for 1024). `dtype` is 'bf16' or 'fp32' (fp16 overflows Stage C).
    """

    prompt: str | list[str]
    negative_prompt: str = ""
    seed: int = 0
    steps_c: int = 20
    cfg_c: float = 4.0
    shift_c: float = 2.0
    steps_b: int = 10
    cfg_b: float = 1.1
    shift_b: float = 1.0
    sampler: str = DEFAULT_SAMPLER
    rho: float = 0.7
    width: int = 1024
    height: int = 1024
    batch: int = 1
    preview: bool = False
    dtype: str = field(default_factory=lambda: "bf16" if torch.cuda.is_available() else "fp32")

    def __post_init__(self) -> None:
        if str(self.dtype).lower() in _FP16_NAMES:
            raise ValueError(
                "dtype 'fp16' is not supported: Stable Cascade's Stage C overflows in float16 (its activations "
                "exceed 65504 and turn into inf/NaN), and the published weights are bf16/fp32 only. "
                "Use dtype='bf16' (GPU) or dtype='fp32' (CPU or GPUs without bf16)."
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        problems = [f"{name} must be at least 1, got {getattr(self, name)}"
                    for name in ("steps_c", "steps_b", "width", "height", "batch") if getattr(self, name) < 1]
        try:
            get_sampler(self.sampler)
        except ValueError as exc:
            problems.append(str(exc))
        if not self.prompts:
            problems.append("prompt is an empty list; give at least one caption (an empty string is fine)")
        if problems:
            raise ValueError("invalid GenerateSettings: " + "; ".join(problems))

    @property
    def prompts(self) -> list[str]:
        """The captions as a list (one entry per distinct prompt, before `batch` repetition)."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def total_images(self) -> int:
        """How many images one generation makes: prompts x batch."""
        return len(self.prompts) * self.batch

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by `dtype`."""
        return DTYPES[self.dtype]


@dataclass
class TextEmbeddings:
    """Text conditioning for `total_images` samples: hidden [B,77,C] and pooled [B,1,C], cond and uncond."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    uncond_hidden: torch.Tensor
    uncond_pooled: torch.Tensor

    @property
    def batch(self) -> int:
        """Number of samples (cond half only)."""
        return self.hidden.shape[0]


def stage_c_latent_size(height: int, width: int) -> tuple[int, int]:
    """Stage C latent (h, w) for an image size, rounded up as the official pipeline does (1024 -> 24)."""
    return math.ceil(height / STAGE_C_COMPRESSION), math.ceil(width / STAGE_C_COMPRESSION)


def _stage_b_multiple(stage_b: nn.Module) -> int:
    """Spatial multiple Stage B latents need: patch size times 2 per resolution change (big/lite: 2·2³ = 16)."""
    try:
        patch = int(stage_b.embedding[0].downscale_factor)
        return patch * 2 ** (len(stage_b.down_blocks) - 1)
    except (AttributeError, IndexError, TypeError):
        return 16


def stage_b_latent_size(height: int, width: int, multiple: int = 16) -> tuple[int, int]:
    """Stage B / Stage A latent (h, w): 1/4 of the image size rounded up to `multiple` (1024 -> 256)."""
    def one(size: int) -> int:
        return math.ceil(size / STAGE_A_COMPRESSION / multiple) * multiple
    return one(height), one(width)


def initial_noise(shape: tuple[int, ...] | torch.Size, seed: int) -> torch.Tensor:
    """Starting noise for `seed`, drawn on the CPU so a seed gives the same image on every device.

    Compare views call this once and pass the result to `sample_stage_c(noise=...)` of every column.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def _derived_seed(seed: int, stream: int) -> int:
    """A seed for `stream` of generation `seed`; the golden-ratio multiplier spreads streams far apart, so
    seed 1's step noise is not seed 2's starting noise."""
    return (int(seed) + stream * 0x9E3779B97F4A7C15) % 2**63


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(_derived_seed(seed, stream))


def _module_device(module: Any, fallback: torch.device | str = "cpu") -> torch.device:
    if isinstance(module, nn.Module):
        for tensor in module.parameters():
            return tensor.device
    return torch.device(fallback)


def _module_dtype(module: Any, fallback: torch.dtype) -> torch.dtype:
    """The dtype the module computes in: that of its first floating-point parameter."""
    if isinstance(module, nn.Module):
        for tensor in module.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
    return fallback


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(item, dtype) for item in value)
    return value


def _casting(model: Callable[..., torch.Tensor], dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """Run `model` on latents in `dtype` while the sampler keeps its state in float32 (bf16 latents lose detail).

    The other inputs are the caller's, cast once with `_cast` before sampling: every step then passes the very
    same tensors, so what depends on them alone is computed once per run (models/reuse). `r` stays float32: its
    sinusoidal embedding multiplies it by 10000, where bf16 rounding would be coarse (the official code computes
    it in float32 under autocast too).
    """
    def call(x: torch.Tensor, r: torch.Tensor, **inputs: Any) -> torch.Tensor:
        return model(x.to(dtype), r, **inputs).float()
    return call


@contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """Sample with dropout off (Stage C has dropout 0.1), then give every submodule back its own mode.

    Restoring per module matters for training previews: the adapted model is in train mode while its frozen
    base stays in eval mode, and a blanket ``.train()`` afterwards would switch the base's dropout on for the
    rest of the run.
    """
    modes = [(m, m.training) for m in module.modules()] if isinstance(module, nn.Module) else []
    if isinstance(module, nn.Module):
        module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


def _clip_img_dim(stage_c: Any) -> int:
    """Width of Stage C's image embedding input, found through any adapter wrapper (big/lite: 768)."""
    modules = stage_c.named_modules() if isinstance(stage_c, nn.Module) else ()
    for name, module in modules:
        if name.split(".")[-1] == "clip_img_mapper" and hasattr(module, "in_features"):
            return module.in_features
    raise ValueError(
        "could not find `clip_img_mapper` in the Stage C passed to sample_stage_c; pass a StageC (or a module "
        "wrapping one), or give `clip_img` in extra_cond, so the image embedding input can be sized."
    )


def encode_prompts(text_encoder: Any, settings: GenerateSettings) -> TextEmbeddings:
    """Encode the prompts (each repeated `batch` times) and the negative prompt with a TextEncoder."""
    with torch.no_grad():
        hidden, pooled = text_encoder.encode(settings.prompts)
        neg_hidden, neg_pooled = text_encoder.encode([settings.negative_prompt])
    total = settings.total_images
    return TextEmbeddings(
        hidden=hidden.float().repeat_interleave(settings.batch, dim=0),
        pooled=pooled.float().repeat_interleave(settings.batch, dim=0),
        uncond_hidden=neg_hidden.float().expand(total, *neg_hidden.shape[1:]).clone(),
        uncond_pooled=neg_pooled.float().expand(total, *neg_pooled.shape[1:]).clone(),
    )


def _step_callback(progress: ProgressCallback | None, stage: str) -> Callable[[int, int, torch.Tensor], None] | None:
    if progress is None:
        return None
    return lambda step, total, _x: progress(stage, step, total)


def sample_stage_c(
    stage_c: Callable[..., torch.Tensor],
    text_encoder: Any,
    settings: GenerateSettings,
    extra_cond: Mapping[str, Any] | None = None,
    extra_uncond: Mapping[str, Any] | None = None,
    noise: torch.Tensor | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """Sample Stage C latents [B,16,h,w] (float32) for `settings`, with an optionally adapted Stage C.

    `text_encoder` is a TextEncoder or already computed `TextEmbeddings` (so the encoder can be freed before
    Stage C loads). `extra_cond` / `extra_uncond` are merged into the model inputs (e.g. `cnet`,
    `ip_image_embeds`); a key missing from `extra_uncond` gets the conditional value in both halves, as the
    official ControlNet sampling does; pass zeros explicitly for inputs that should be absent when
    unconditional (image prompts). `clip_img` is the exception: without an explicit uncond value it is zeros
    there. `noise` overrides `initial_noise(shape, settings.seed)`. Stage C is sampled in eval mode (no
    dropout); afterwards every submodule is back in the mode it had.
    """
    emb = text_encoder if isinstance(text_encoder, TextEmbeddings) else encode_prompts(text_encoder, settings)
    device = _module_device(stage_c)
    dtype = _module_dtype(stage_c, settings.torch_dtype)
    shape = (emb.batch, STAGE_C_CHANNELS, *stage_c_latent_size(settings.height, settings.width))
    if noise is None:
        noise = initial_noise(shape, settings.seed)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but these settings need {shape}; "
                         "make it with initial_noise(shape, seed) for the same width/height/batch")
    extra_cond, extra_uncond = dict(extra_cond or {}), dict(extra_uncond or {})
    # Zero image embeddings mean "no image" (how the published model was trained); an image prompt given as
    # `clip_img` in extra_cond still gets zeros in the unconditional half.
    image_embeds = extra_cond.get("clip_img")
    if image_embeds is None:
        image_embeds = torch.zeros(emb.batch, 1, _clip_img_dim(stage_c), device=device)
    base_uncond = {"clip_text": emb.uncond_hidden, "clip_text_pooled": emb.uncond_pooled,
                   "clip_img": torch.zeros_like(image_embeds)}
    cond = {"clip_text": emb.hidden, "clip_text_pooled": emb.pooled, "clip_img": image_embeds, **extra_cond}
    shared = {key: value for key, value in extra_cond.items() if key not in base_uncond}
    uncond = {**base_uncond, **shared, **extra_uncond}
    # In the model's dtype once, so every step gets the very same input tensors and what depends on them alone
    # (conditioning tokens, ControlNet residuals, image-prompt keys) is computed once per run (models/reuse).
    cond, uncond = ({k: _cast(_to_device(v, device), dtype) for k, v in d.items()} for d in (cond, uncond))
    with torch.no_grad(), _eval_mode(stage_c), reusing_constant_inputs():
        return sample_with(
            settings.sampler, _casting(stage_c, dtype), shape, cond, uncond, settings.steps_c, settings.cfg_c,
            settings.rho, settings.shift_c, generator=_generator(settings.seed, _STREAM_STAGE_C_STEPS),
            noise=noise.to(device), callback=_step_callback(progress, "stage_c"), return_x0=True, device=device,
        )


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def _to_images(pixels: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """[B,3,H,W] in [0,1] -> PIL RGB images, resized to `size` (width, height) when it differs."""
    array = to_host((pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)).numpy()
    images = [Image.fromarray(item, mode="RGB") for item in array]
    if size is not None:
        images = [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in images]
    return images


def stages_needed(settings: GenerateSettings) -> tuple[str, ...]:
    """The stages a generation with ``settings`` loads, in order."""
    return ("text_encoder", "stage_c", *(("previewer",) if settings.preview else ("stage_b", "stage_a")))


def decode_latents(
    components: CascadeComponents,
    latents: torch.Tensor,
    settings: GenerateSettings,
    text: TextEmbeddings | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> list[Image.Image]:
    """Stage C latents -> images: the previewer when `settings.preview`, else Stage B sampling + Stage A.

    Stage B needs the pooled text; pass the `TextEmbeddings` used for Stage C, or they are re-encoded.
    Full decodes are resized to `settings.width` x `settings.height` when Stage B's latent grid (a multiple
    of 16 at 1/4 scale) does not match them exactly; previews stay at 8x the latent size.
    """
    dtype = settings.torch_dtype
    if settings.preview:
        with components.use("previewer", dtype) as previewer, torch.no_grad():
            pixels = previewer(latents.to(_module_device(previewer), _module_dtype(previewer, dtype)))
            del previewer  # drop our reference so `use` can really free it
        return _to_images(pixels)
    if text is None:
        with components.use("text_encoder", dtype) as text_encoder:
            text = encode_prompts(text_encoder, settings)
            del text_encoder
    stage_b_latents = _sample_stage_b(components, latents, text, settings, progress)
    with components.use("stage_a", dtype) as stage_a, torch.no_grad():
        pixels = stage_a.decode(stage_b_latents.to(_module_device(stage_a), _module_dtype(stage_a, dtype)))
        del stage_a
    return _to_images(pixels, (settings.width, settings.height))


def _sample_stage_b(
    components: CascadeComponents,
    stage_c_latents: torch.Tensor,
    text: TextEmbeddings,
    settings: GenerateSettings,
    progress: ProgressCallback | None,
) -> torch.Tensor:
    """Stage A latents for the Stage C latents; unconditional = zero effnet latents + negative pooled text."""
    with components.use("stage_b", settings.torch_dtype) as stage_b:
        device = _module_device(stage_b)
        size = stage_b_latent_size(settings.height, settings.width, _stage_b_multiple(stage_b))
        shape = (stage_c_latents.shape[0], STAGE_A_CHANNELS, *size)
        dtype = _module_dtype(stage_b, settings.torch_dtype)
        effnet = stage_c_latents.to(device)
        cond = {"effnet": _cast(effnet, dtype), "clip": _cast(text.pooled.to(device), dtype)}
        uncond = {"effnet": _cast(torch.zeros_like(effnet), dtype), "clip": _cast(text.uncond_pooled.to(device), dtype)}
        with torch.no_grad(), _eval_mode(stage_b):
            latents = sample_with(
                STAGE_B_SAMPLER, _casting(stage_b, dtype), shape, cond,
                uncond, settings.steps_b, settings.cfg_b, settings.rho, settings.shift_b,
                generator=_generator(settings.seed, _STREAM_STAGE_B_STEPS),
                noise=initial_noise(shape, _derived_seed(settings.seed, _STREAM_STAGE_B_NOISE)).to(device),
                callback=_step_callback(progress, "stage_b"), return_x0=True, device=device,
            )
        del stage_b
    return latents


def generate(
    components: CascadeComponents, settings: GenerateSettings, *, progress: ProgressCallback | None = None
) -> list[Image.Image]:
    """Run the cascade for `settings` and return `settings.total_images` PIL images (prompt-major order).

    Each stage is loaded, used and freed in turn (text encoder, Stage C, then previewer or Stage B and
    Stage A), so no two stages share the GPU. `progress(stage, step, total)` reports sampling steps.
    """
    components.warn_if_slow(settings)
    components.check_sources(stages_needed(settings), settings.torch_dtype)  # every stage, before any sampling
    # `del` inside each block: the stage must be unreferenced when `use` collects it on exit.
    with components.use("text_encoder", settings.torch_dtype) as text_encoder:
        text = encode_prompts(text_encoder, settings)
        del text_encoder
    with components.use("stage_c", settings.torch_dtype) as stage_c:
        latents = sample_stage_c(stage_c, text, settings, progress=progress)
        del stage_c
    return decode_latents(components, latents, settings, text, progress=progress)
