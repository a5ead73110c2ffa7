"""Feature encoders for the encode-once cache: the base encoders seen through the cache's small protocol.

A feature's ``identity`` (the cache key) must be known before deciding whether anything needs encoding. For an
encoder loaded from weight files it is the files' fingerprint (``models.loading.weights_fingerprint``: header,
size and sampled bytes), so a cached re-run neither loads nor hashes the 2.6 GB text encoder; the encoder itself
is loaded on the first ``encode``. Encoders built in code (tiny, toy) are hashed from their weights.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..devices import to_host


class _LazyEncoder:
    """An encoder given as itself or as a zero-argument loader, loaded on first use."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder if not _is_loader(encoder) else None
        self._load: Callable[[], Any] | None = encoder if _is_loader(encoder) else None

    def get(self) -> Any:
        if self._encoder is None:
            self._encoder = self._load()
        return self._encoder


def _is_loader(value: Any) -> bool:
    return callable(value) and not isinstance(value, torch.nn.Module)


class LatentFeature:
    """Stage C latents: the EfficientNet semantic compressor on the preprocessed image."""

    name = "latents"
    inputs = "image"

    def __init__(self, effnet, batch_device: torch.device | None = None, identity: str | None = None):
        self._effnet = _LazyEncoder(effnet)
        self.identity = f"effnet:{identity or self._effnet.get().identity}"
        self._device = batch_device

    @property
    def effnet(self):
        return self._effnet.get()

    @property
    def device(self) -> torch.device:
        return self._device or next(self.effnet.parameters()).device

    @torch.no_grad()
    def encode(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images = torch.stack(list(batch)).to(self.device, torch.float32)
        return {"latents": to_host(self.effnet.encode(images).float())}


class TextFeature:
    """CLIP text hidden states (before the final norm) and the pooled embedding."""

    name = "text"
    inputs = "caption"

    def __init__(self, text_encoder, identity: str | None = None):
        self._text_encoder = _LazyEncoder(text_encoder)
        self.identity = f"text:{identity or self._text_encoder.get().identity}"

    @property
    def text_encoder(self):
        return self._text_encoder.get()

    @torch.no_grad()
    def encode(self, batch: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = self.text_encoder.encode(list(batch))
        return {"clip_text": to_host(hidden.float()), "clip_text_pooled": to_host(pooled.float())}


def base_feature_encoders(models: Any) -> list[Any]:
    """The latent and text features of a run; encoders from weight files are keyed by the files and loaded only
    when something is not cached yet."""
    return [LatentFeature(models.effnet, identity=models.weights_identity("effnet")),
            TextFeature(models.text_encoder, identity=models.weights_identity("text_encoder"))]


class BatchEncoder:
    """``cache.mode: none``: the run's feature encoders kept loaded, encoding each decoded batch as it is trained
    on (in the training process, on the encoders' device), into the features a cached batch has.

    A decoded batch (``data.decoded``) holds ``key``, ``caption``, ``image`` [B, 3, H, W] and, for methods that read
    controls, ``control_image``; each encoder gets the input its ``inputs`` names, exactly as ``build_cache`` gives it.
    """

    def __init__(self, encoders: list[Any]) -> None:
        from ..data.cache import validate_encoders

        validate_encoders(encoders)
        self.encoders = encoders

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ..data.cache import encode_checked, merge_features

        count = len(batch["caption"])
        inputs = {"caption": list(batch["caption"]), "image": list(batch["image"]),
                  "control_image": list(batch["control_image"]) if "control_image" in batch else None}
        features = merge_features([encode_checked(e, inputs[e.inputs], count) for e in self.encoders])
        # clone() outside inference mode: the loss step's autograd may save these inputs for backward
        encoded = {name: tensor.clone() for name, tensor in features.items()}
        return {"key": batch["key"], "caption": batch["caption"], **encoded}

    def null_features(self) -> dict[str, torch.Tensor]:
        """Caption-encoder features of the empty caption (no batch dim), for caption dropout and CFG."""
        from ..data.cache import NULL_CAPTION, encode_checked, merge_features

        caption_encoders = [e for e in self.encoders if e.inputs == "caption"]
        merged = merge_features([encode_checked(e, [NULL_CAPTION], 1) for e in caption_encoders])
        return {name: tensor[0].clone() for name, tensor in merged.items()}
