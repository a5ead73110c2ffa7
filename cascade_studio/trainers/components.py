"""Build the frozen base models a run needs from the recipe's ``model`` section (a :class:`ModelConfig`).

Every setting is read from that section as it is: the defaults live in :mod:`cascade_studio.config.schema` only.

Published weights come through ``models.loading`` (files, diffusers folders, hub repo ids). Without weights, the
``tiny`` preset is built in code with a fixed seed, so every process and every run gets the same "base model"
(and the encode-once cache stays valid across runs).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config.schema import ModelConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BASE_SEED = 20240216  # the day Stable Cascade was published; any fixed number works


def resolve_dtype(name: str) -> torch.dtype:
    if name == "fp16":
        raise ValueError("fp16 is refused: Stage C overflows in fp16 (the published weights are used in bf16 or "
                         "fp32). Write model.dtype: bf16 (GPU) or fp32 (CPU).")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use bf16 or fp32")
    return DTYPES[name]


def make_random_base_learnable(stage_c: nn.Module, seed: int = BASE_SEED, std: float = 0.02) -> nn.Module:
    """See :func:`cascade_studio.models.random_init.make_learnable` (kept here for tests that build their own)."""
    from ..models.random_init import make_learnable

    return make_learnable(stage_c, seed=seed, std=std)


@dataclass
class BaseModels:
    """Lazily built frozen components of the recipe's ``model`` section; ``free()`` drops the encoders once the
    cache is filled."""

    model_cfg: ModelConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model_cfg, ModelConfig):
            raise TypeError(f"BaseModels takes the recipe's model section (ModelConfig), not "
                            f"{type(self.model_cfg).__name__}: pass recipe.model, or ModelConfig(preset=..., "
                            "dtype=...)")

    @property
    def preset_name(self) -> str:
        return self.model_cfg.preset

    @property
    def preset(self):
        from ..models import get_preset

        name = self.preset_name
        return get_preset(name)

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.model_cfg.dtype)

    @property
    def components(self):
        """The shared stage provider (same random base and same loading code as generate/compare)."""
        if "components" not in self._cache:
            from ..inference.pipeline import CascadeComponents, ModelSpec

            self._cache["components"] = CascadeComponents(ModelSpec.from_config(self.model_cfg), device=self.device)
        return self._cache["components"]

    def _get_stage(self, name: str, dtype: torch.dtype) -> Any:
        if name not in self._cache:
            module = self.components.load(name, dtype)  # the same loader generate and compare use
            if isinstance(module, nn.Module):
                module.eval().requires_grad_(False)
            self._cache[name] = module
        return self._cache[name]

    def stage_c(self) -> nn.Module:
        """The frozen base Stage C in the recipe's dtype (no fp32 copy when that is bf16)."""
        return self._get_stage("stage_c", self.dtype)

    def text_encoder(self):
        return self._get_stage("text_encoder", torch.float32 if self.device.type == "cpu" else self.dtype)

    def effnet(self):
        return self._get_stage("effnet", torch.float32)

    def previewer(self):
        return self._get_stage("previewer", torch.float32)

    # What, besides the weights, decides an encoder's outputs (part of its cache identity when keyed by its files).
    _ENCODER_CODE = {"text_encoder": "openclip-bpe77-prefinalln", "effnet": "imagenet-norm"}

    def weights_identity(self, name: str) -> str | None:
        """The cache identity of encoder ``name`` from its weight files alone (fingerprint, dtype, the code that
        preprocesses for it), without loading it; None when it has no files (built in code: hash the weights)."""
        if not (getattr(self.model_cfg, name, None) or self.model_cfg.repo_id):
            return None
        from ..models.loading import weights_fingerprint

        dtype = torch.float32 if name == "effnet" or self.device.type == "cpu" else self.dtype
        resolved = self.components.locate(name, dtype)
        if resolved is None:
            return None
        fingerprint = weights_fingerprint(resolved.path)[:16]
        return f"{name}-file:{fingerprint}-{str(dtype).removeprefix('torch.')}-{self._ENCODER_CODE.get(name, '')}"

    def fingerprint(self) -> str:
        """The fingerprint of the base Stage C's weights (``models.identity``), recorded in adapter files and
        checked when they load. Computed once, from the loaded weights, before anything modifies them."""
        if "fingerprint" not in self._cache:
            from ..models.identity import weights_identity

            self._cache["fingerprint"] = weights_identity(self.stage_c())
        return self._cache["fingerprint"]

    def free(self, *names: str) -> None:
        """Drop components (encoders after caching) and return their memory."""
        for name in names:
            module = self._cache.pop(name, None)
            del module
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def c_clip_img(self) -> int:
        return int(self.preset.stage_c.get("c_clip_img", 768))
