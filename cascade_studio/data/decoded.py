"""Decoded, preprocessed samples for encoding on the fly (``cache.mode: none``).

With the encode-once cache the data-loader workers read finished features; without it they decode and
preprocess images exactly as the cache would before encoding them (``training_crop`` to ``target_size``), and the
training process encodes each batch (``trainers.features.BatchEncoder``). One sample is
``{"key", "caption", "image": float [3, H, W] in [0, 1], "control_image": the same, when the method reads
controls}`` (named as ``FeatureEncoder.inputs`` name them).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .cache import target_size, training_crop
from .images import open_image, to_tensor01
from .sources import Record


def pixels(data: bytes, where: str, preprocessing: Mapping[str, Any], max_pixels: int) -> torch.Tensor:
    """Image bytes -> the float tensor the cache would encode (raises ``BadImageError`` for a bad image)."""
    image = open_image(data, where, max_pixels=max_pixels)
    return to_tensor01(training_crop(image, target_size(image.width, image.height, preprocessing)))


def decoded_sample(key: str, caption: str, image: bytes, where: str, preprocessing: Mapping[str, Any],
                   max_pixels: int, control: bytes | None = None, control_where: str | None = None,
                   with_control: bool = False) -> dict[str, Any]:
    """One training sample before encoding. ``with_control``: the method reads a control image, which must then
    be there (a ``ValueError`` otherwise, so a stream counts it as a skipped sample)."""
    sample: dict[str, Any] = {"key": key, "caption": caption, "image": pixels(image, where, preprocessing, max_pixels)}
    if with_control:
        if control is None:
            raise ValueError("no control image for this sample (the method needs one)")
        sample["control_image"] = pixels(control, control_where or where, preprocessing, max_pixels)
    return sample


class RecordImages(Dataset):
    """Scanned records (folders, saved datasets, local shards) as decoded samples, for ``cache.mode: none``.

    ``record_keys`` lets the loop check each batch is the one its sampler chose, as with ``CachedDataset``.
    """

    def __init__(self, records: Sequence[Record], preprocessing: Mapping[str, Any], with_control: bool) -> None:
        self.records = list(records)
        self.record_keys = [r.key for r in self.records]
        self.preprocessing = dict(preprocessing)
        self.with_control = with_control

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        control = record.control_bytes() if (self.with_control and record.control_bytes is not None) else None
        return decoded_sample(record.key, record.caption, record.image_bytes(), record.path, self.preprocessing,
                              record.max_pixels, control=control, control_where=record.control_path,
                              with_control=self.with_control)
