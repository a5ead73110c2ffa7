"""The semantic compressor ("effnet"): EfficientNetV2-S features -> 16-channel Stage C latents.

Stable Cascade's Stage C works in the latent space of a frozen EfficientNetV2-S: torchvision's
``efficientnet_v2_s().features`` (1280 channels at stride 32), then a bias-free 1x1 conv to 16 channels and a
``BatchNorm2d(16, affine=False)`` (STABLE_CASCADE.md section 1). The module and parameter names here are the
official ones (``backbone.*``, ``mapper.0.weight``, ``mapper.1.running_*``) so the published
``effnet_encoder.safetensors`` loads without renaming.

``weights_digest`` also lives here because every encoder's ``identity`` (the encode-cache key) uses it and this
module is the one every encoder file can import without a cycle.
"""

from __future__ import annotations

import hashlib
from functools import partial

import torch
from torch import nn
from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig, _efficientnet_conf

# ImageNet statistics: what torchvision's EfficientNetV2-S (and therefore the published compressor) expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EFFNET_ARCHS = ("efficientnet_v2_s", "tiny")
EFFNET_ARCH_BY_PRESET = {"big": "efficientnet_v2_s", "lite": "efficientnet_v2_s", "tiny": "tiny"}


def _tiny_setting() -> tuple[list[FusedMBConvConfig | MBConvConfig], int]:
    """A narrow EfficientNetV2 built from the same torchvision block classes, still with stride 32.

    Stem (stride 2) plus four stride-2 stages gives the same 1/32 geometry as the real backbone, so a 256 px
    image gives 8x8 latents exactly like the tiny Stage C expects. Channels are multiples of 8 because
    torchvision rounds every width to a multiple of 8.
    """
    setting: list[FusedMBConvConfig | MBConvConfig] = [
        FusedMBConvConfig(1, 3, 1, 8, 8, 1),
        FusedMBConvConfig(4, 3, 2, 8, 16, 1),
        FusedMBConvConfig(4, 3, 2, 16, 24, 1),
        MBConvConfig(4, 3, 2, 24, 32, 1),
        MBConvConfig(4, 3, 2, 32, 48, 1),
    ]
    return setting, 64


def build_effnet_backbone(arch: str = "efficientnet_v2_s") -> nn.Sequential:
    """Return torchvision EfficientNet ``features`` for ``arch`` (random init, nothing is ever downloaded).

    Build under ``torch.device("meta")`` for a weightless skeleton.
    """
    if arch == "efficientnet_v2_s":
        setting, last_channel = _efficientnet_conf("efficientnet_v2_s")
    elif arch == "tiny":
        setting, last_channel = _tiny_setting()
    else:
        raise ValueError(f"unknown effnet architecture {arch!r}; choose one of {', '.join(EFFNET_ARCHS)}")
    # eps 1e-3 and stochastic depth 0.2 are what torchvision's efficientnet_v2_s uses; stochastic depth is
    # the identity in eval mode, which is the only mode a frozen compressor runs in.
    network = EfficientNet(
        setting,
        dropout=0.2,
        stochastic_depth_prob=0.2,
        norm_layer=partial(nn.BatchNorm2d, eps=1e-03),
        last_channel=last_channel,
        num_classes=1,  # the classifier head is discarded; keep it tiny
    )
    return network.features


def backbone_out_channels(backbone: nn.Sequential) -> int:
    """Channel count of the last conv in an EfficientNet ``features`` stack."""
    return backbone[-1][0].out_channels


class EffnetEncoder(nn.Module):
    """Semantic compressor: images in [0, 1] -> Stage C latents ``[B, c_latent, H/32, W/32]``.

    Frozen by default: parameters do not require grad and the module stays in eval mode even when a parent
    calls ``.train()`` (BatchNorm in train mode would use batch statistics and change every cached latent).
    """

    def __init__(self, arch: str = "efficientnet_v2_s", c_latent: int = 16, frozen: bool = True) -> None:
        super().__init__()
        self.arch = arch
        self.c_latent = c_latent
        self.backbone = build_effnet_backbone(arch)
        self.mapper = nn.Sequential(
            nn.Conv2d(backbone_out_channels(self.backbone), c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent, affine=False),
        )
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> "EffnetEncoder":
        """Switch mode, except that a frozen encoder always stays in eval mode."""
        return super().train(mode and not self.frozen)

    @property
    def embed_dim(self) -> int:
        """Channels of the produced latents (16 for every published preset)."""
        return self.c_latent

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        """Map ImageNet-normalised images to latents (use :meth:`encode` for images in [0, 1])."""
        return self.mapper(self.backbone(normalized))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encode RGB images in [0, 1] ``[B, 3, H, W]`` to ``[B, c_latent, H/32, W/32]``.

        ImageNet normalisation happens here so callers never have to remember it. Inputs are cast to the
        module's dtype and device; runs without autograd when frozen.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        reference = self.mapper[0].weight
        mean = torch.tensor(IMAGENET_MEAN, device=reference.device, dtype=reference.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=reference.device, dtype=reference.dtype).view(1, 3, 1, 1)
        x = images.to(device=reference.device, dtype=reference.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self((x - mean) / std)

    @property
    def identity(self) -> str:
        """Architecture plus a hash of every weight and buffer: the encode-cache key.

        Hashes all weights on every call (about a second per GB); call once per run and keep the string.
        """
        return f"effnet-{self.arch}-c{self.c_latent}:{weights_digest(self)}"


def build_effnet(
    preset_name: str = "big", device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> EffnetEncoder:
    """Random-init compressor: EfficientNetV2-S for ``big``/``lite``, the narrow stride-32 one for ``tiny``.

    ``device="meta"`` builds a weightless skeleton (for inspection, or for loading.py to assign weights into).
    """
    if preset_name not in EFFNET_ARCH_BY_PRESET:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {', '.join(EFFNET_ARCH_BY_PRESET)}")
    with torch.device(device if device is not None else "cpu"):
        encoder = EffnetEncoder(EFFNET_ARCH_BY_PRESET[preset_name])
    return encoder.to(dtype)


def weights_digest(module: nn.Module, length: int = 16) -> str:
    """Short sha256 over the names, dtypes, shapes and bytes of every tensor in ``module.state_dict()``.

    Used for encoder identities: two encoders share a cache entry only if every weight is bit-identical (a
    different dtype is a different identity too, since it changes the encodings). A module with tensors on the
    meta device (the device dry run) has no values: its digest covers names, dtypes and shapes only and starts
    with ``meta-``, so it can never match an encoder with real weights.
    """
    hasher = hashlib.sha256()
    on_meta = False
    for name, tensor in module.state_dict().items():
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.is_meta:
            on_meta = True
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        hasher.update(flat.view(torch.uint8).numpy())  # buffer protocol: no extra copy
    return ("meta-" if on_meta else "") + hasher.hexdigest()[:length]
