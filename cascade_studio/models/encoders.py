"""Frozen conditioning encoders: CLIP text, CLIP image, OpenCLIP image (IP-Adapter) and the effnet compressor.

What Stage C was trained with (STABLE_CASCADE.md section 2): the CLIP ViT-bigG-14 text tower, whose last encoder
layer's hidden states *before* the final LayerNorm are ``clip_text`` and whose projected pooled embedding is
``clip_text_pooled``; and OpenAI CLIP ViT-L/14 ``image_embeds`` for ``clip_img``. Everything is built from
configs in code with random weights (real weights come from :mod:`cascade_studio.models.loading`); nothing here
ever downloads.

Tokenisation uses open_clip's shipped BPE file, which works offline and gives the same ids as the Hugging Face
CLIP tokenizer (sot 49406, eot 49407, padding 0), because ``CLIPTokenizer.from_pretrained`` silently returns a
2-token tokenizer when offline (STACK.md).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .effnet import EffnetEncoder, build_effnet, weights_digest  # re-exported: one import for all encoders

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "EOT_TOKEN_ID", "EffnetEncoder", "IP_IMAGE_ENCODERS", "ImageEncoder",
    "OpenClipImageEncoder",
    "SOT_TOKEN_ID", "TextEncoder", "build_effnet", "build_image_encoder", "build_ip_image_encoder",
    "build_open_clip_visual", "build_text_encoder", "image_encoder_config", "text_encoder_config", "tokenize",
]

SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
PAD_TOKEN_ID = 0
CONTEXT_LENGTH = 77

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIP ViT-bigG-14 (laion2B-39B-b160k) text tower; gelu (not quick_gelu) like every OpenCLIP model.
_BIGG_TEXT = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
)
_TINY_TEXT = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, projection_dim=64, num_hidden_layers=2,
    num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
)
TEXT_ENCODER_CONFIGS: dict[str, dict[str, Any]] = {"big": _BIGG_TEXT, "lite": _BIGG_TEXT, "tiny": _TINY_TEXT}

# OpenAI CLIP ViT-L/14 at 224 px; OpenAI models use quick_gelu.
_VIT_L_14 = dict(
    hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, hidden_act="quick_gelu",
)
_TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
    image_size=32, patch_size=8, hidden_act="quick_gelu",
)
IMAGE_ENCODER_CONFIGS: dict[str, dict[str, Any]] = {"big": _VIT_L_14, "lite": _VIT_L_14, "tiny": _TINY_VISION}

# IP-Adapter image encoders. OpenCLIP architectures are named as open_clip names them; the tiny one is a custom
# config (open_clip builds it from these overrides without any file).
_TINY_OPENCLIP_TEXT = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
IP_IMAGE_ENCODERS: dict[str, dict[str, Any]] = {
    "openclip-vit-h-14": dict(kind="open_clip", model_name="ViT-H-14"),
    "clip-vit-bigg-14": dict(kind="open_clip", model_name="ViT-bigG-14"),
    "clip-vit-l-14": dict(kind="transformers", preset="big"),
    "tiny": dict(
        kind="open_clip",
        model_name="ViT-B-32",
        overrides=dict(
            embed_dim=32,
            vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0),
        ),
    ),}
# The toy cascade's image encoder: the tiny architecture, with weights trained on toy-shapes (models/toy.py).
IP_IMAGE_ENCODERS["toy"] = dict(IP_IMAGE_ENCODERS["tiny"])


def _check_preset(preset_name: str, table: dict[str, Any]) -> None:
    if preset_name not in table:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {', '.join(sorted(table))}")


class _FrozenMixin:
    """Frozen encoders stay in eval mode even when a parent module calls ``.train()``."""

    frozen: bool

    def train(self, mode: bool = True):  # type: ignore[override]
        return nn.Module.train(self, mode and not self.frozen)  # type: ignore[arg-type]

    def _freeze(self, frozen: bool) -> None:
        self.frozen = frozen
        if frozen:
            nn.Module.requires_grad_(self, False)  # type: ignore[arg-type]
            nn.Module.eval(self)  # type: ignore[arg-type]

    def _grad_context(self):
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen)


@functools.lru_cache(maxsize=1)
def _open_clip_tokenizer():
    # Imported lazily (open_clip is a heavy import). Its BPE vocabulary ships inside the wheel: works offline.
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=CONTEXT_LENGTH)
    if (tokenizer.sot_token_id, tokenizer.eot_token_id) != (SOT_TOKEN_ID, EOT_TOKEN_ID):
        raise RuntimeError(
            "open_clip's tokenizer has unexpected special ids "
            f"({tokenizer.sot_token_id}, {tokenizer.eot_token_id}); reinstall open_clip_torch"
        )
    return tokenizer


def tokenize(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP BPE ids ``[B, 77]`` (sot ... eot, then 0-padding, truncated to 77) and the attention mask.

    The mask is 1 up to and including the end token and 0 on padding, exactly what the Hugging Face tokenizer
    returns and what the official trainer passes to the text model.
    """
    if isinstance(prompts, str):
        raise TypeError("encode/tokenize take a list of prompts; wrap a single prompt in a list")
    ids = _open_clip_tokenizer()(list(prompts), context_length=CONTEXT_LENGTH)
    eot_position = (ids == EOT_TOKEN_ID).int().argmax(dim=-1)
    mask = (torch.arange(CONTEXT_LENGTH)[None, :] <= eot_position[:, None]).long()
    return ids, mask


class TextEncoder(_FrozenMixin, nn.Module):
    """CLIP text tower giving Stage C's ``clip_text`` (pre-final-LN hidden states) and ``clip_text_pooled``."""

    def __init__(self, model: Any, name: str = "clip-text", frozen: bool = True) -> None:
        super().__init__()
        self.model = model
        self.name = name
        # Pool at the first end token. open_clip pads with 0 and its eot (49407) is the largest id, so both of
        # transformers' pooling rules (first `eos_token_id`, or argmax of ids for legacy eos_token_id == 2)
        # land on the same position; pinning it makes configs carrying another eos id (e.g. 1) harmless.
        model.config.eos_token_id = EOT_TOKEN_ID
        model.text_model.eos_token_id = EOT_TOKEN_ID
        self._freeze(frozen)

    @property
    def hidden_size(self) -> int:
        """Width of ``clip_text`` (per-token hidden states)."""
        return int(self.model.config.hidden_size)

    @property
    def embed_dim(self) -> int:
        """Width of ``clip_text_pooled`` (the projected pooled embedding)."""
        return int(self.model.config.projection_dim)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """See :func:`tokenize`."""
        return tokenize(prompts)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(hidden [B, 77, hidden_size], pooled [B, 1, embed_dim])`` for a list of prompts.

        ``hidden`` is the last encoder layer's output before ``final_layer_norm`` (what Stage C was trained on);
        ``pooled`` is ``text_embeds``. The empty prompt ``""`` gives the unconditional embedding.
        """
        ids, mask = tokenize(prompts)
        device = self.model.text_projection.weight.device
        with self._grad_context():
            out = self.model(
                input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True
            )
        return out.hidden_states[-1], out.text_embeds.unsqueeze(1)

    @property
    def identity(self) -> str:
        """Architecture, tokenizer and a hash of every weight (the encode-cache key; hashes all weights)."""
        cfg = self.model.config
        arch = f"{self.name}-h{cfg.hidden_size}-l{cfg.num_hidden_layers}-p{cfg.projection_dim}"
        return f"{arch}-openclip-bpe{CONTEXT_LENGTH}-prefinalln:{weights_digest(self)}"


def _clip_preprocess(
    images: torch.Tensor, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], reference: torch.Tensor
) -> torch.Tensor:
    """CLIP preprocessing on tensors, as the official trainer does it with torchvision transforms.

    Resize the shortest side to ``image_size`` (bicubic, antialiased), center-crop, normalise. No clamping:
    the official pipeline applies these transforms to float tensors too.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    x = images.to(device=reference.device, dtype=torch.float32)
    x = TF.resize(x, [image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [image_size, image_size])
    # (x - mean) / std per channel, written out: torchvision's normalize reads its std back to the host to check
    # for zeros, a synchronisation on a GPU for constants known to be non-zero.
    shape = (1, -1, 1, 1)
    x = (x - torch.tensor(mean, device=x.device).view(shape)) / torch.tensor(std, device=x.device).view(shape)
    return x.to(reference.dtype)


class ImageEncoder(_FrozenMixin, nn.Module):
    """CLIP vision tower with projection: images in [0, 1] -> ``image_embeds`` ``[B, 1, embed_dim]``."""

    mean = CLIP_MEAN
    std = CLIP_STD

    def __init__(self, model: Any, name: str = "clip-vision", frozen: bool = True) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self._freeze(frozen)

    @property
    def image_size(self) -> int:
        """Side of the square crop the tower sees."""
        return int(self.model.config.image_size)

    @property
    def embed_dim(self) -> int:
        """Width of ``image_embeds``."""
        return int(self.model.config.projection_dim)

    @property
    def hidden_size(self) -> int:
        """Width of the transformer."""
        return int(self.model.config.hidden_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize, center-crop and normalise images in [0, 1] for this tower."""
        return _clip_preprocess(images, self.image_size, self.mean, self.std, self.model.visual_projection.weight)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encode RGB images in [0, 1] ``[B, 3, H, W]`` to ``[B, 1, embed_dim]``."""
        pixels = self.preprocess(images)
        with self._grad_context():
            return self.model(pixel_values=pixels).image_embeds.unsqueeze(1)

    @property
    def identity(self) -> str:
        """Architecture, preprocessing and a hash of every weight (the encode-cache key)."""
        cfg = self.model.config
        arch = f"{self.name}-h{cfg.hidden_size}-l{cfg.num_hidden_layers}-p{cfg.patch_size}-{cfg.image_size}px"
        return f"{arch}-bicubic-crop:{weights_digest(self)}"


class OpenClipImageEncoder(_FrozenMixin, nn.Module):
    """An OpenCLIP vision tower (IP-Adapter option) with the same ``encode`` contract as :class:`ImageEncoder`."""

    def __init__(self, visual: nn.Module, name: str, frozen: bool = True) -> None:
        super().__init__()
        self.visual = visual
        self.name = name
        cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
        self.mean = tuple(cfg.get("mean", CLIP_MEAN))
        self.std = tuple(cfg.get("std", CLIP_STD))
        size = visual.image_size
        self._image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._freeze(frozen)

    @property
    def image_size(self) -> int:
        """Side of the square crop the tower sees."""
        return self._image_size

    @property
    def embed_dim(self) -> int:
        """Width of the projected image embedding."""
        return int(self.visual.output_dim)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize, center-crop and normalise images in [0, 1] for this tower."""
        reference = next(self.visual.parameters())
        return _clip_preprocess(images, self.image_size, self.mean, self.std, reference)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encode RGB images in [0, 1] ``[B, 3, H, W]`` to ``[B, 1, embed_dim]``."""
        pixels = self.preprocess(images)
        with self._grad_context():
            return self.visual(pixels).unsqueeze(1)

    @property
    def identity(self) -> str:
        """Architecture, preprocessing and a hash of every weight (the encode-cache key)."""
        return f"openclip-{self.name}-{self.image_size}px-d{self.embed_dim}-bicubic-crop:{weights_digest(self)}"


def _build_context(device: str | torch.device | None):
    # Building under a device context allocates parameters there directly; "meta" gives a weightless skeleton
    # for cheap inspection (parameter counts, key lists) or for loading.py to assign real tensors into.
    return torch.device(device) if device is not None else torch.device("cpu")


def text_encoder_config(preset_name: str, **overrides: Any):
    """The transformers ``CLIPTextConfig`` for a preset (``big``/``lite``: ViT-bigG-14 text tower; ``tiny``)."""
    from transformers import CLIPTextConfig

    _check_preset(preset_name, TEXT_ENCODER_CONFIGS)
    special = dict(bos_token_id=SOT_TOKEN_ID, eos_token_id=EOT_TOKEN_ID, pad_token_id=PAD_TOKEN_ID)
    return CLIPTextConfig(**{**TEXT_ENCODER_CONFIGS[preset_name], **special, **overrides})


def image_encoder_config(preset_name: str, **overrides: Any):
    """The transformers ``CLIPVisionConfig`` for a preset (``big``/``lite``: OpenAI ViT-L/14; ``tiny``)."""
    from transformers import CLIPVisionConfig

    _check_preset(preset_name, IMAGE_ENCODER_CONFIGS)
    return CLIPVisionConfig(**{**IMAGE_ENCODER_CONFIGS[preset_name], **overrides})


def build_text_encoder(
    preset_name: str = "big", device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> TextEncoder:
    """Random-init text encoder for ``big``/``lite`` (ViT-bigG-14 text) or ``tiny``; ``device="meta"`` is free."""
    from transformers import CLIPTextModelWithProjection

    config = text_encoder_config(preset_name)
    with _build_context(device):
        model = CLIPTextModelWithProjection(config)
    return TextEncoder(model.to(dtype), name="clip-text")


def build_image_encoder(
    preset_name: str = "big", device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> ImageEncoder:
    """Random-init image encoder for ``big``/``lite`` (OpenAI ViT-L/14) or ``tiny``; ``device="meta"`` is free."""
    from transformers import CLIPVisionModelWithProjection

    config = image_encoder_config(preset_name)
    with _build_context(device):
        model = CLIPVisionModelWithProjection(config)
    return ImageEncoder(model.to(dtype), name="clip-vision")


def build_ip_image_encoder(
    name: str = "openclip-vit-h-14", device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> ImageEncoder | OpenClipImageEncoder:
    """Random-init image encoder for IP-Adapter: ``openclip-vit-h-14`` | ``clip-vit-l-14`` | ``clip-vit-bigg-14``
    | ``tiny`` | ``toy`` (tiny's architecture; ``models.toy.load_toy_component("ip_image_encoder")`` loads its
    trained weights). OpenCLIP models are created with ``pretrained=None`` (never downloads)."""
    if name not in IP_IMAGE_ENCODERS:
        raise ValueError(f"unknown IP-Adapter image encoder {name!r}; choose one of {', '.join(IP_IMAGE_ENCODERS)}")
    spec = IP_IMAGE_ENCODERS[name]
    if spec["kind"] == "transformers":
        return build_image_encoder(spec["preset"], device=device, dtype=dtype)
    visual = build_open_clip_visual(spec["model_name"], device=device, **spec.get("overrides", {}))
    return OpenClipImageEncoder(visual.to(dtype), name=name)


def build_open_clip_visual(model_name: str, device: str | torch.device | None = None, **overrides: Any) -> nn.Module:
    """Only the vision tower of an OpenCLIP architecture, randomly initialised.

    open_clip builds whole CLIP models; the text tower is swapped for a one-layer stub so that building
    ViT-bigG-14's vision tower does not also allocate its 700M-parameter text tower.
    """
    import logging

    import open_clip

    device = torch.device(device) if device is not None else torch.device("cpu")
    # open_clip warns "No pretrained weights loaded" at WARNING level, which is the intended state here.
    logger = logging.getLogger()
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with device:  # allocate directly on the target device ("meta": no memory, no init cost)
            model = open_clip.create_model(
                model_name, pretrained=None, device=device, text_cfg=_TINY_OPENCLIP_TEXT, **overrides
            )
    finally:
        logger.setLevel(previous)
    return model.visual
