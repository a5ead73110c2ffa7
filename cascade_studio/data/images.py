"""Robust image decoding and the deterministic transforms used before encoding.

Every training image goes through `open_image` once at scan time, so a broken file is reported (with its path
and a reason a user can act on) before any model is loaded, instead of crashing a run hours in.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

# Stage C's semantic compressor has stride 32, so a side under 32 px has no latent pixel left.
MIN_SIDE = 32
# 64 MP: far above any training resolution, well under what fits in RAM once decoded (about 200 MB as RGB).
# The same number as the recipe's default data.max_pixels, so a scan without a recipe (the studio's Data page)
# applies, and quotes, the limit a run would.
DEFAULT_MAX_PIXELS = 64_000_000
# PIL's decompression-bomb messages: "Image size (N pixels) exceeds limit of M pixels" (M is PIL's own global,
# twice our limit for the error), so only N is taken from them.
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")

# PIL's decompression-bomb limit is one process-wide global; we set it from `max_pixels` only while a header
# is parsed, and this lock keeps two threads from seeing each other's limit.
_PIL_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of the dataset, and why (shown to the user as-is)."""

    path: str
    reason: str


class BadImageError(ValueError):
    """An image that cannot be used for training; `reason` is written for the user."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    @property
    def skipped(self) -> SkippedFile:
        return SkippedFile(self.path, self.reason)


_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white, the background a viewer would show (black would invent dark halos)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit and float greyscale to 8 bits; PIL's own convert('RGB') clips at 255 instead of scaling."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = array.astype(np.float64) / 257.0
    elif image.mode == "I":
        # 16-bit PNGs open as "I" on some PIL versions; values above 255 mean the 16-bit range is in use.
        as_float = array.astype(np.float64)
        scaled = as_float / 257.0 if as_float.max(initial=0) > 255 else as_float
    else:  # "F": treat [0, 1] data as normalised, anything else as already 0..255
        as_float = array.astype(np.float64)
        finite_max = np.nanmax(as_float) if as_float.size else 0.0
        scaled = as_float * 255.0 if finite_max <= 1.0 else as_float
    grey = np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: transparency composited on white, high bit depths scaled, CMYK converted."""
    mode = image.mode
    # Not `"A" in mode`: that would also match LAB, which has no alpha channel.
    has_transparency = mode in _ALPHA_MODES or "transparency" in image.info
    if has_transparency:
        if mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these only via RGBA
            image = image.convert("RGBA")
        return _composite_on_white(image)
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(image)
    if mode == "RGB":
        return image
    return image.convert("RGB")


def _describe_open_failure(exc: BaseException) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image PIL can read (wrong extension, or not an image at all); delete or convert it"
    message = str(exc) or type(exc).__name__
    if "truncated" in message.lower():
        return "truncated image file (incomplete download or copy); re-download or delete it"
    return f"cannot decode image ({type(exc).__name__}: {message}); re-save it as PNG or JPEG, or delete it"


def _too_large(size: str, limit: int) -> str:
    return (f"too large: {size} is over data.max_pixels={limit} (the guard against decompression bombs); "
            "downscale it, or raise data.max_pixels if the image is genuine")


def open_image(
    data: bytes,
    path: str,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image with EXIF orientation applied.

    Raises `BadImageError(path, reason)` for empty files, non-images, truncated or corrupt data, images over
    `max_pixels` (decompression bombs included) and images with a side under `min_side` pixels.
    """
    if len(data) == 0:
        raise BadImageError(path, "empty file (0 bytes); delete it or copy it again")
    limit = max_pixels if max_pixels else DEFAULT_MAX_PIXELS
    try:
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            # The warning is PIL's "over the limit" signal, the error its "over twice the limit"; both mean no.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            previous_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = limit
            try:
                image = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = previous_limit
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = _BOMB_PIXELS.search(str(exc))
        size = f"{int(found.group(1))} pixels" if found else "its pixel count"
        raise BadImageError(path, _too_large(size, limit)) from exc
    except Exception as exc:  # PIL plugins raise many types (OSError, SyntaxError, struct.error...) on bad data
        raise BadImageError(path, _describe_open_failure(exc)) from exc

    width, height = image.size
    if width * height > limit:  # header-level check before any pixel is decoded
        raise BadImageError(path, _too_large(f"{width}x{height} = {width * height} pixels", limit))
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = to_rgb(image)
    except Exception as exc:  # see above: decode errors surface only when pixels are read
        raise BadImageError(path, _describe_open_failure(exc)) from exc
    if min(rgb.size) < min_side:
        raise BadImageError(
            path, f"{rgb.size[0]}x{rgb.size[1]} has a side under {min_side} px (the model's stride); remove it"
        )
    return rgb


def open_image_file(path: str | os.PathLike[str], **kwargs: int | None) -> Image.Image:
    """`open_image` on a file path (unreadable files are reported like bad images)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise BadImageError(str(path), f"cannot read file ({exc.strerror or exc}); check permissions") from exc
    return open_image(data, str(path), **kwargs)  # type: ignore[arg-type]


def resize_and_crop(
    image: Image.Image,
    size_hw: tuple[int, int],
    crop: Literal["center", "random"] = "center",
    generator: torch.Generator | None = None,
) -> Image.Image:
    """Resize so the image covers `size_hw` (short side fitted), then crop to exactly (height, width).

    Bicubic resampling; PIL widens the filter when shrinking, so downscaling is antialiased. `crop='random'`
    draws the offset from `generator` (torch) so crops are reproducible per seed.
    """
    target_h, target_w = size_hw
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    # Never round below the target, or the crop below would fall outside the image.
    new_w = max(target_w, round(width * scale))
    new_h = max(target_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    spare_w, spare_h = new_w - target_w, new_h - target_h
    if crop == "center":
        left, top = spare_w // 2, spare_h // 2
    elif crop == "random":
        left = int(torch.randint(0, spare_w + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_h + 1, (1,), generator=generator))
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    return image.crop((left, top, left + target_w, top + target_h))


def to_tensor01(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W] with values in [0, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
