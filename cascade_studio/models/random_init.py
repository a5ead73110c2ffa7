"""Deterministic random-init components for presets without published weights (tiny; the test/demo world).

Every process, run and command (train, generate, compare, the UI) builds the same "base model" from the same
seed, so an adapter trained by one is valid for the others and the encode-once cache stays valid across runs.
"""
from __future__ import annotations

import torch
from torch import nn

RANDOM_INIT_SEED = 20240213
COMPONENTS = ("text_encoder", "stage_c", "stage_b", "stage_a", "previewer", "effnet", "image_encoder")


def make_learnable(model: nn.Module, seed: int = RANDOM_INIT_SEED, std: float = 0.02) -> nn.Module:
    """Give a freshly initialised Stage C/B non-zero output and timestep layers.

    The official init zeroes the output conv and every TimestepBlock linear (STABLE_CASCADE.md section 2), so a
    fresh model outputs a constant and passes no gradient upstream: an adapter on it cannot learn. A random
    base stands in for a trained one, so it gets small random values there instead.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            is_timestep = name.split(".")[-1].startswith("mapper") and isinstance(module, nn.Linear) and \
                ".mapper" in "." + name
            if (is_timestep and "repeat" not in name) or name == "clf.1":
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)
    return model


def calibration_images(n: int = 32, size: int = 256, seed: int = RANDOM_INIT_SEED) -> torch.Tensor:
    """Deterministic stand-in photos: smooth colour fields with a few flat shapes, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        for _ in range(2):
            cy, cx, r = (torch.randint(0, size, (2,), generator=g).tolist() + [int(torch.randint(size // 10, size // 3, (1,), generator=g))])
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            images[i][:, mask] = torch.rand(3, 1, generator=g)
    return images


@torch.no_grad()
def calibrate_effnet(effnet: nn.Module) -> nn.Module:
    """Set the compressor's output BatchNorm statistics so its latents have zero mean and unit variance.

    A trained compressor's final BatchNorm(affine=False) normalises its latents (Stage C is trained on roughly
    unit-variance latents). Fresh running statistics (mean 0, var 1) leave a random backbone's latents around
    1e-4, which would make every diffusion target pure noise with nothing for an adapter to learn. Deterministic
    stand-in images give the statistics a trained model would have collected.
    """
    images = calibration_images()
    normalized = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    # Every BatchNorm (backbone and mapper) takes the statistics of the stand-in images, as data-dependent init
    # does: a cumulative average (momentum None) over one pass in train mode, then back to eval.
    norms = [m for m in effnet.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.random.fork_rng(devices=[]):  # stochastic depth draws in train mode: keep the caller's RNG
        effnet.mapper(effnet.backbone(normalized))
    for m, (momentum, training) in zip(norms, saved):
        m.momentum = momentum
        m.train(training)
    effnet.eval()
    return effnet


# The built components of this process, by (name, preset): the init is a pure function of the seed, and some of
# it costs (the compressor's calibration pass, 0.6 s at tiny size, on every command and every run of a process).
_BUILT: dict[tuple[str, str], tuple[dict[str, torch.Tensor], list[bool]]] = {}


def build_random(name: str, preset_name: str, *, initialise: bool = True) -> nn.Module:
    """Component ``name`` of ``preset_name`` with the fixed seed (tiny/toy presets only).

    ``initialise=False`` builds the architecture only, for a caller that loads every weight itself (the toy
    preset's shipped components): its values are the layers' default init, not the preset's.
    """
    from . import get_preset

    preset = get_preset(preset_name)
    if not preset.built_in:
        raise ValueError(f"the {preset_name} preset has no built-in weights for {name}: give a weights file or "
                         "folder, or a repo id (model.repo_id, e.g. stabilityai/stable-cascade)")
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; expected one of {COMPONENTS}")
    key = (name, preset_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED + COMPONENTS.index(name))
        module = _architecture(name, preset)
        if not initialise:
            return module
        if key in _BUILT:  # the same values as the first build, without its cost
            state, modes = _BUILT[key]
            module.load_state_dict(state)
            for sub, training in zip(module.modules(), modes):
                sub.training = training
            return module
        if name == "effnet":
            module = calibrate_effnet(module)
        elif name in ("stage_c", "stage_b"):
            module = make_learnable(module, seed=RANDOM_INIT_SEED + (11 if name == "stage_c" else 12))
    _BUILT[key] = ({k: v.detach().clone() for k, v in module.state_dict().items()}, [m.training for m in module.modules()])
    return module


def _architecture(name: str, preset) -> nn.Module:
    """The module of component ``name`` with its layers' own init (drawn from the current RNG)."""
    from . import build_previewer, build_stage_a, build_stage_b, build_stage_c

    if name == "text_encoder":
        from .encoders import build_text_encoder

        return build_text_encoder(preset.architecture)
    if name == "image_encoder":
        from .encoders import build_image_encoder

        return build_image_encoder(preset.architecture)
    if name == "effnet":
        from .effnet import build_effnet

        return build_effnet(preset.architecture)
    build, settings = {"stage_c": (build_stage_c, preset.stage_c), "stage_b": (build_stage_b, preset.stage_b),
                       "stage_a": (build_stage_a, preset.stage_a), "previewer": (build_previewer, preset.previewer)}[name]
    return build(**settings)
