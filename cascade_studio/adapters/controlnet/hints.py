"""Control hints: what a ControlNet sees, computed once per image and stored in the encode cache.

Each hint is a ``FeatureEncoder`` for ``cascade_studio.data.cache`` (``name``, ``identity``, ``inputs``,
``encode(batch) -> {"control": [B, C, H, W]}``). Hints stay at image resolution (the latent grid for
super-resolution); the adapter brings them to the backbone's grid. The published controls (STABLE_CASCADE.md
section 6) are computed on the fly from the training image by the official trainer; here they are deterministic
per image so a cached hint never goes stale:

- ``CannyHint``: cv2.Canny(100, 200) on a 224 px resize, 1 channel, values {0, 1}.
- ``InpaintingHint``: 4 channels, the image with masked pixels set to white plus the mask; the mask is drawn
  from a generator seeded by the sample (its key, else its pixels).
- ``SuperResolutionHint``: effnet latents of the half-size image, brought back to the latent grid (16 channels).
- ``ImageHint``: pre-made control images from the dataset (the long-standing user request), 1 or 3 channels.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...devices import to_host

# The latent grid is 1/32 of the image (the effnet compressor's stride), so hints must tile it exactly.
LATENT_STRIDE = 32
CONTROLS = ("canny", "inpainting", "sr", "image")
MASK_KINDS = ("random", "box", "border", "mixed")


class HintError(ValueError):
    """A control image or hint that cannot be used; the message names the file and what to do."""


def _item_image(item: Any) -> torch.Tensor:
    """The [3, H, W] image of a batch item (a tensor, or a mapping with an "image" entry)."""
    return item["image"] if isinstance(item, Mapping) else item


def _stack(images: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) != 1:
        raise HintError(f"{what}: one encode call needs images of one size, got {sorted(shapes)}; group the batch "
                        "by bucket")
    return torch.stack([i.float() for i in images])


# --------------------------------------------------------------------------------------------------------------
# Canny


class CannyHint:
    """Canny edges as published: resize to ``resize`` px (square, bilinear), cv2.Canny(low, high) on the RGB
    image, then back to the image size.

    The official filter brings the edges back with bilinear interpolation (soft edges); ``upsample="nearest"``
    (the default) keeps the hint binary, which is what pre-made edge maps look like and makes the cached hint
    exact. Pass ``upsample="bilinear"`` to reproduce the official soft edges.
    """

    name = "control"
    inputs = "image"

    def __init__(self, resize: int | None = 224, low: int = 100, high: int = 200, upsample: str = "nearest"):
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
        self.resize, self.low, self.high, self.upsample = resize, int(low), int(high), upsample

    @property
    def identity(self) -> str:
        return f"hint-canny-v1(resize={self.resize},low={self.low},high={self.high},upsample={self.upsample})"

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 1, H, W] edges."""
        import cv2

        size = images.shape[-2:]
        small = images if self.resize is None else F.interpolate(
            images.float(), size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        # Truncating float -> uint8 (no rounding) is what the published canny ControlNet saw.
        pixels = small.clamp(0, 1).mul(255).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
        maps = [torch.from_numpy(cv2.Canny(np.ascontiguousarray(p), self.low, self.high)) for p in pixels]
        edges = torch.stack(maps).unsqueeze(1).float().div_(255.0)
        if tuple(edges.shape[-2:]) != tuple(size):
            if self.upsample == "nearest":
                edges = F.interpolate(edges, size=size, mode="nearest-exact")
            else:
                edges = F.interpolate(edges, size=size, mode="bilinear", align_corners=False)
        return edges

    def encode(self, batch: list) -> dict[str, torch.Tensor]:
        return {"control": self.edges(_stack([_item_image(i) for i in batch], "canny hint"))}


# --------------------------------------------------------------------------------------------------------------
# Inpainting


def sample_seed(item: Any) -> int:
    """A seed that depends only on the sample: its key when the item carries one, else its pixels.

    The cache keys entries on image content, so a seed from the pixels gives the same mask whenever the cache
    is rebuilt (and never a mask that disagrees with a cached one).
    """
    if isinstance(item, Mapping) and item.get("key") is not None:
        payload = f"key:{item['key']}".encode()
    else:
        image = _item_image(item).detach().cpu().float().contiguous()
        payload = b"pixels:" + str(tuple(image.shape)).encode() + image.numpy().tobytes()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little") & (2**63 - 1)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _box(height: int, width: int, generator: torch.Generator, low: float, high: float) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) with sides a random fraction in [low, high] of the image's."""
    bh = max(1, round(height * _uniform(generator, low, high)))
    bw = max(1, round(width * _uniform(generator, low, high)))
    top = int(torch.randint(0, height - bh + 1, (), generator=generator))
    left = int(torch.randint(0, width - bw + 1, (), generator=generator))
    return top, left, bh, bw


def make_mask(kind: str, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A [1, H, W] {0, 1} mask (1 = to be painted) of one ``kind``:

    random: smooth blobs (low-resolution noise, upsampled and thresholded) covering 10-60% of the image, close
        to the blurred saliency regions the official trainer masks;
    box: one rectangle with sides 25-75% of the image's;
    border: everything outside a rectangle of 40-85% (outpainting).
    """
    if kind == "mixed":
        kind = ("random", "box", "border")[int(torch.randint(0, 3, (), generator=generator))]
    mask = torch.zeros(1, height, width)
    if kind == "random":
        grid = (max(2, height // 32), max(2, width // 32))
        noise = torch.rand((1, 1, *grid), generator=generator)
        noise = F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)[0]
        coverage = _uniform(generator, 0.1, 0.6)
        threshold = torch.quantile(noise.flatten(), 1.0 - coverage)
        mask = (noise > threshold).float()
    elif kind == "box":
        top, left, bh, bw = _box(height, width, generator, 0.25, 0.75)
        mask[:, top:top + bh, left:left + bw] = 1.0
    elif kind == "border":
        top, left, bh, bw = _box(height, width, generator, 0.4, 0.85)
        mask.fill_(1.0)
        mask[:, top:top + bh, left:left + bw] = 0.0
    else:
        raise ValueError(f"unknown mask kind {kind!r}; use one of {MASK_KINDS}")
    return mask


class InpaintingHint:
    """4-channel inpainting hint: RGB with masked pixels set to white (1.0), then the mask.

    Without a saliency model the mask is ``make_mask(mask, ...)`` seeded by :func:`sample_seed`. With one
    (``saliency(images [B,3,H,W]) -> [B,1,h,w]`` scores), the official recipe is followed: threshold at a
    random value in [0.04, 0.4], invert with probability ``p_outpaint`` (outpainting) - with the same
    per-sample generator, so the cache stays valid.
    """

    name = "control"
    inputs = "image"

    def __init__(self, mask: str = "mixed", saliency: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 p_outpaint: float = 0.4):
        if mask not in MASK_KINDS:
            raise ValueError(f"unknown inpainting mask {mask!r}; use one of {MASK_KINDS}")
        self.mask, self.saliency, self.p_outpaint = mask, saliency, float(p_outpaint)

    @property
    def identity(self) -> str:
        if self.saliency is None:
            return f"hint-inpainting-v1(mask={self.mask})"
        model = getattr(self.saliency, "identity", type(self.saliency).__name__)
        return f"hint-inpainting-v1(saliency={model},p_outpaint={self.p_outpaint})"

    def masks(self, batch: list, images: torch.Tensor) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(sample_seed(item)) for item in batch]
        height, width = images.shape[-2:]
        if self.saliency is None:
            return torch.stack([make_mask(self.mask, height, width, g) for g in generators])
        with torch.no_grad():
            scores = to_host(self.saliency(images).float())
        masks = []
        for score, generator in zip(scores, generators):
            mask = score > _uniform(generator, 0.04, 0.4)
            if float(torch.rand((), generator=generator)) < self.p_outpaint:
                mask = ~mask
            masks.append(F.interpolate(mask[None].float(), size=(height, width), mode="nearest")[0])
        return torch.stack(masks)

    def encode(self, batch: list) -> dict[str, torch.Tensor]:
        images = _stack([_item_image(i) for i in batch], "inpainting hint")
        masks = self.masks(batch, images).to(images.dtype)
        painted = torch.where(masks.bool(), torch.ones_like(images), images)
        return {"control": torch.cat([painted, masks], dim=1)}


# --------------------------------------------------------------------------------------------------------------
# Super-resolution


class SuperResolutionHint:
    """16-channel super-resolution hint: effnet latents of the image at half size (nearest), brought back to
    the image's latent grid (H/32, W/32) with nearest upsampling, as the official SR filter does."""

    name = "control"
    inputs = "image"

    def __init__(self, effnet: Any, scale: float = 0.5):
        self.effnet, self.scale = effnet, float(scale)
        self._identity: str | None = None

    @property
    def identity(self) -> str:
        if self._identity is None:  # effnet identities hash every weight: compute once
            self._identity = f"hint-sr-v1(scale={self.scale},effnet={self.effnet.identity})"
        return self._identity

    def encode(self, batch: list) -> dict[str, torch.Tensor]:
        images = _stack([_item_image(i) for i in batch], "super-resolution hint")
        height, width = images.shape[-2:]
        if height % LATENT_STRIDE or width % LATENT_STRIDE:
            raise HintError(f"super-resolution hint: images are {width}x{height}; sides must be multiples of "
                            f"{LATENT_STRIDE} (set data.resolution to a multiple of 32)")
        small = F.interpolate(images, scale_factor=self.scale, mode="nearest")
        with torch.no_grad():
            latents = to_host(self.effnet.encode(small).float())
        latents = F.interpolate(latents, size=(height // LATENT_STRIDE, width // LATENT_STRIDE), mode="nearest")
        return {"control": latents}


# --------------------------------------------------------------------------------------------------------------
# Pre-made control images


class ImageHint:
    """Pre-made control images (a dataset column or ``photo_control.png`` sidecars) as [channels, H, W] in [0, 1].

    Items may be file paths, PIL images, tensors ([C,H,W] or [H,W], float in [0,1] or uint8) or mappings with
    ``control_image`` plus optional ``path`` (named in errors) and ``size`` ((H, W) to resize to). ``size``
    (here or per item) is the training size; a control image of another aspect ratio is refused rather than
    distorted. Every hint must tile the latent grid: sides multiples of 32.
    """

    name = "control"
    inputs = "control_image"

    def __init__(self, channels: int = 3, size: tuple[int, int] | int | None = None, aspect_tolerance: float = 0.02):
        if channels not in (1, 3):
            raise ValueError(f"control image channels must be 1 (greyscale maps) or 3 (RGB), got {channels}")
        self.channels = channels
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
        self.aspect_tolerance = aspect_tolerance

    @property
    def identity(self) -> str:
        return f"hint-image-v1(channels={self.channels},size={self.size})"

    def convert(self, item: Any, where: str) -> torch.Tensor:
        """One control image -> [channels, H, W] float in [0, 1] at the training size."""
        size = self.size
        if isinstance(item, Mapping):
            where = str(item.get("path") or item.get("control_path") or where)
            size = tuple(item["size"]) if item.get("size") is not None else size
            item = item.get("control_image")
        if isinstance(item, (str, Path)):
            where = str(item)
            item = _open_image(Path(item))
        if item is None:
            raise HintError(f"{where}: no control image; add one (e.g. photo_control.png next to photo.png) or "
                            "drop the sample")
        tensor = _image_to_tensor(item, where)
        if size is not None and tuple(tensor.shape[-2:]) != tuple(size):
            tensor = self._resize(tensor, size, where)
        height, width = tensor.shape[-2:]
        if height % LATENT_STRIDE or width % LATENT_STRIDE:
            raise HintError(f"{where}: control hint is {width}x{height}; it must match the latent grid (sides "
                            f"multiples of {LATENT_STRIDE}). Give it the size of its training image.")
        if self.channels == 1 and tensor.shape[0] == 3:
            # ITU-R 601-2 luma, the weights PIL's convert("L") uses.
            weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            tensor = (tensor * weights).sum(0, keepdim=True)
        elif self.channels == 3 and tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1)
        return tensor.contiguous()

    def _resize(self, tensor: torch.Tensor, size: tuple[int, int], where: str) -> torch.Tensor:
        height, width = tensor.shape[-2:]
        target_h, target_w = size
        aspect, target = width / height, target_w / target_h
        if abs(aspect / target - 1.0) > self.aspect_tolerance:
            raise HintError(
                f"{where}: control image is {width}x{height} (aspect {aspect:.3f}) but the training size is "
                f"{target_w}x{target_h} (aspect {target:.3f}); crop the control image to its photo's aspect ratio "
                "(the same crop as the photo) so the two line up")
        return F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False,
                             antialias=True)[0].clamp_(0, 1)

    def encode(self, batch: list) -> dict[str, torch.Tensor]:
        hints = [self.convert(item, f"control image {i} of the batch") for i, item in enumerate(batch)]
        return {"control": _stack(hints, "control images")}


def _open_image(path: Path):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise HintError(f"{path}: control image not found; check data.path and adapter.controlnet."
                        "control_column") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise HintError(f"{path}: not a readable image ({exc}); re-save it as PNG or remove it") from None


def _image_to_tensor(image: Any, where: str) -> torch.Tensor:
    """PIL image or tensor -> float [C, H, W] in [0, 1] with C 1 or 3."""
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
            raise HintError(f"{where}: control image tensor has shape {tuple(image.shape)}; expected [1|3, H, W]")
        tensor = tensor.float().div(255.0) if tensor.dtype == torch.uint8 else tensor.float()
        if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
            raise HintError(f"{where}: control image values must be finite and in [0, 1] (or uint8 0-255)")
        return tensor
    if hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image
        if image.mode in ("L", "1", "I;16", "I", "F"):
            array = np.asarray(image.convert("L"), dtype=np.uint8)[None]
        else:
            rgba = image.convert("RGBA")
            if rgba.getextrema()[3][0] < 255:  # transparency: flatten on white, as the image loader does
                from PIL import Image

                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgba = Image.alpha_composite(white, rgba)
            array = np.asarray(rgba.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
        if array.shape[-1] == 0 or array.shape[-2] == 0:
            raise HintError(f"{where}: control image is empty (0 pixels)")
        return torch.from_numpy(array.copy()).float().div_(255.0)
    raise HintError(f"{where}: control image of type {type(image).__name__}; give a file path, PIL image or tensor")


# --------------------------------------------------------------------------------------------------------------


def build_hint_encoder(control: str, *, mask: str = "mixed", channels: int = 3, effnet: Any = None):
    """The cache encoder for a recipe's ``adapter.controlnet.control``.

    ``mask``: the inpainting masks (random, box, border, mixed); ``channels``: of pre-made control images (1 or
    3). ``effnet`` (an ``EffnetEncoder``) is required for ``sr``.
    """
    control = "sr" if control == "super_resolution" else control
    if control == "canny":
        return CannyHint()
    if control == "inpainting":
        return InpaintingHint(mask=mask)
    if control == "sr":
        if effnet is None:
            raise HintError("the sr (super-resolution) control needs the effnet encoder to make its hints; "
                            "pass effnet= (the run's EffnetEncoder)")
        return SuperResolutionHint(effnet)
    if control == "image":
        return ImageHint(channels=channels)
    raise HintError(f"unknown control {control!r} in adapter.controlnet.control; use one of {', '.join(CONTROLS)}")
