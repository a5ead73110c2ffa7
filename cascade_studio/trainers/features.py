"""Feature encoders for the encode-once cache: the base encoders seen through the cache's small protocol."""
from __future__ import annotations

from typing import Any

import torch

from ..devices import to_host


class LatentFeature:
    """Stage C latents: the EfficientNet semantic compressor on the preprocessed image."""

    name = "latents"
    inputs = "image"

    def __init__(self, effnet, batch_device: torch.device | None = None):
        self.effnet = effnet
        self.identity = f"effnet:{effnet.identity}"
        self.device = batch_device or next(effnet.parameters()).device

    @torch.no_grad()
    def encode(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images = torch.stack(list(batch)).to(self.device, torch.float32)
        return {"latents": to_host(self.effnet.encode(images).float())}


class TextFeature:
    """CLIP text hidden states (before the final norm) and the pooled embedding."""

    name = "text"
    inputs = "caption"

    def __init__(self, text_encoder):
        self.text_encoder = text_encoder
        self.identity = f"text:{text_encoder.identity}"

    @torch.no_grad()
    def encode(self, batch: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = self.text_encoder.encode(list(batch))
        return {"clip_text": to_host(hidden.float()), "clip_text_pooled": to_host(pooled.float())}


def base_feature_encoders(models: Any) -> list[Any]:
    return [LatentFeature(models.effnet()), TextFeature(models.text_encoder())]
