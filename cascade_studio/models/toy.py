"""The pretrained toy cascade (``preset: toy``): the tiny architecture with small shipped weights.

``scripts/train_toy_base.py`` trains, on the synthetic toy-shapes set (``datasets/make_toy_shapes.py``):

- the effnet compressor together with the previewer, as an autoencoder (image -> 8x8x16 latents -> 64 px);
  the deterministic random effnet loses most colour information, so it had to be trained;
- Stage C as a text-to-latent prior (epsilon target, P2 weight, cosine schedule, caption dropout for CFG).

- the IP-Adapter image encoder (``ip_image_encoder``, the ``tiny`` image tower) contrastively against the
  captions, a small CLIP: a random tower's embedding hardly tells one shape colour from another, so an image
  prompt could not carry one.

The text encoder and Stage C's own image encoder stay at their deterministic random init (``build_random``): a random
CLIP text tower still gives every caption a distinct embedding, and shipping the 49408-token embedding table
(12 MB) would cost more than everything else together. Weights are stored as float16 (storage only: they are
loaded as float32) in ``cascade_studio/assets/toy/<component>.safetensors``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"
SHIPPED = ("stage_c", "previewer", "effnet", "ip_image_encoder")


def asset_path(name: str) -> Path:
    """Where the shipped weights of component ``name`` live."""
    return ASSET_DIR / f"{name}.safetensors"


def load_state(module: nn.Module, path: Path) -> nn.Module:
    """Load a shipped state dict into ``module`` strictly, casting floats to the module's dtype."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    own = module.state_dict()
    missing, unexpected = set(own) - set(tensors), set(tensors) - set(own)
    if missing or unexpected:
        raise RuntimeError(f"{path} does not match the toy {type(module).__name__}: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}; re-run scripts/train_toy_base.py")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(tensors[key].to(value.dtype))
    return module


def load_toy_component(name: str) -> nn.Module:
    """Component ``name`` of the toy cascade, in float32 and eval mode.

    Shipped components (Stage C, previewer, effnet) get their trained weights; the rest (text encoder, image
    encoder, Stage B/A) are the deterministic random init of the tiny architecture, which is what the shipped
    ones were trained against.
    """
    from .random_init import build_random

    if name == "ip_image_encoder":
        from .encoders import build_ip_image_encoder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = build_ip_image_encoder("toy")
    else:
        module = build_random(name, "toy", initialise=name not in SHIPPED)  # shipped: every weight is loaded
    if name in SHIPPED:
        path = asset_path(name)
        if not path.exists():
            raise FileNotFoundError(f"the toy {name} weights are missing ({path}); run "
                                    "`python scripts/train_toy_base.py` to make them")
        load_state(module, path)
    return module.float().eval()


def save_component(module: nn.Module, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``module``'s state dict with floats stored as ``dtype`` (integer buffers unchanged)."""
    from safetensors.torch import save_file

    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "cascade_studio.preset": "toy"})
    return path
