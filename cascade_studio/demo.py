"""The toy demo: train an adapter on the pretrained toy cascade and show base vs adapter side by side.

``run_demo(workspace)`` writes the toy-shapes ``purple`` split (a colour the toy base never saw) into the
workspace, runs ``recipes/toy/lora.yaml`` on it, and renders a grid (rows: prompt x seed; columns: base,
LoRA) from the same starting noise, decoded by the previewer. ``run_controlnet_demo`` and
``run_ip_adapter_demo`` do the same for the toy ControlNet (edge images) and IP-Adapter (image prompts).

The helpers below (``sample_previews``, ``load_trained``) are what the tests measure, so the demo and the
tests look at the same pictures.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "toy"
TOY_SIZE = 256  # training size of the toy cascade: the effnet's stride 32 gives 8x8 latents, 64 px previews
# The pipeline sizes Stage C latents with the published compression, ceil(size / 42.67), which gives 6x6 at
# 256 px; 320 px asks for the 8x8 latents the toy Stage C was trained on.
GENERATE_SIZE = 320
CLIP_IMG_DIM = 32  # the tiny architecture's image-embedding width (c_clip_img)
LORA_PROMPTS = ("a large purple circle", "a small purple square in the top left", "a large purple triangle")
DEMO_SEEDS = (0, 1, 2)


def toy_shapes():
    """The toy-shapes generator (``datasets/`` is data, not a package, so the module is loaded by path)."""
    if "make_toy_shapes" in sys.modules:
        return sys.modules["make_toy_shapes"]
    path = REPO / "datasets" / "make_toy_shapes.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the toy demo runs from a source checkout of cascade-studio")
    spec = importlib.util.spec_from_file_location("make_toy_shapes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_toy_shapes"] = module
    spec.loader.exec_module(module)
    return module


def train_toy_recipe(recipe: str, workspace: Path, split: str, overrides: Sequence[str] = ()) -> Path:
    """Run ``recipes/toy/<recipe>.yaml`` on the toy-shapes ``split`` written under ``workspace``; returns the
    exported adapter. Each call gets a fresh run name, so a rerun never collides with an earlier run."""
    from .run import train

    workspace = Path(workspace).resolve()
    data = toy_shapes().ensure_split(split, workspace / "data")
    name = f"toy-{recipe}-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}"
    result = train(RECIPES / f"{recipe}.yaml", [f"workspace={workspace}", f"data.path={data}", f"name={name}",
                                                *overrides], progress=False)
    if not result.exports:
        raise RuntimeError(f"the {recipe} run in {result.run_dir} exported nothing")
    if result.run_id:
        print(f"[demo] MLflow run {result.run_id} at {result.tracking_uri} "
              f"(browse: mlflow ui --backend-store-uri {result.tracking_uri})", flush=True)
    return result.exports[0]


def load_trained(adapter_path: Path | None, name: str = "adapter"):
    """The toy base Stage C wrapped in an AdaptedStageC, with the adapter file loaded when given."""
    from .adapters.base import AdaptedStageC
    from .adapters.registry import AdapterContext, load_adapter
    from .models import get_preset
    from .models.toy import load_toy_component
    from .trainers.components import BASE_SEED

    model = AdaptedStageC(load_toy_component("stage_c").requires_grad_(False)).eval()
    if adapter_path is not None:
        stage_c_config = dict(get_preset("tiny").stage_c)
        context = AdapterContext(preset="toy", base_fingerprint=f"toy-seed{BASE_SEED}", stage_c_config=stage_c_config)
        load_adapter(adapter_path, model, context, name=name)
    return model


def to_arrays(pixels: torch.Tensor) -> list[np.ndarray]:
    """Previewer output [B,3,H,W] -> uint8 HxWx3 arrays."""
    return list((pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


@torch.no_grad()
def sample_previews(model: Any, prompts: Sequence[str], seed: int = 0, extra_cond: dict | None = None,
                    extra_uncond: dict | None = None, steps: int = 20, cfg: float = 4.0) -> list[np.ndarray]:
    """One 64 px preview per prompt, all from ``initial_noise(seed)`` (batch-major), as uint8 arrays."""
    from .inference.pipeline import GenerateSettings, sample_stage_c
    from .models.toy import load_toy_component

    settings = GenerateSettings(prompt=list(prompts), seed=seed, steps_c=steps, cfg_c=cfg, width=GENERATE_SIZE,
                                height=GENERATE_SIZE, dtype="fp32")
    extra_cond = dict(extra_cond or {})
    # Zero image embeddings ("no image prompt") given explicitly: sample_stage_c sizes them from Stage C's
    # clip_img_mapper, which it cannot find once a LoRA on the clip mappers has wrapped that layer.
    extra_cond.setdefault("clip_img", torch.zeros(len(prompts), 1, CLIP_IMG_DIM))
    latents = sample_stage_c(model, _text_encoder(), settings, extra_cond=extra_cond, extra_uncond=extra_uncond)
    return to_arrays(_previewer()(latents))


_CACHE: dict[str, Any] = {}


def _text_encoder():
    from .models.toy import load_toy_component

    if "text_encoder" not in _CACHE:
        _CACHE["text_encoder"] = load_toy_component("text_encoder")
    return _CACHE["text_encoder"]


def _previewer():
    from .models.toy import load_toy_component

    if "previewer" not in _CACHE:
        _CACHE["previewer"] = load_toy_component("previewer")
    return _CACHE["previewer"]


def compare_grid(model: Any, adapter_name: str, prompts: Sequence[str], seeds: Sequence[int], out: Path,
                 label: str, extra_cond: dict | None = None, extra_uncond: dict | None = None,
                 extra_column: Sequence[Image.Image] | None = None) -> Path:
    """Rows prompt x seed, columns base | adapter (same noise per row); optional first column (the hint)."""
    from .inference.grid import make_grid

    columns = {}
    for enabled in (False, True):
        model.set_enabled(adapter_name, enabled)
        columns[enabled] = {seed: sample_previews(model, prompts, seed, extra_cond, extra_uncond) for seed in seeds}
    model.set_enabled(adapter_name, True)
    rows, labels = [], []
    for p, prompt in enumerate(prompts):
        for seed in seeds:
            row = [Image.fromarray(columns[False][seed][p]), Image.fromarray(columns[True][seed][p])]
            if extra_column is not None:
                row.insert(0, extra_column[p])
            rows.append(row)
            labels.append(f"{prompt} (seed {seed})")
    header = (["input"] if extra_column is not None else []) + ["toy base", label]
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, labels, header).save(out)
    return out


def held_out_share(images: Sequence[np.ndarray], colour: str) -> float:
    """Share of images whose dominant shape colour is ``colour``."""
    shapes = toy_shapes()
    return sum(shapes.dominant_colour(image) == colour for image in images) / max(len(images), 1)


def colour_share(images: Sequence[np.ndarray], colours: Sequence[str]) -> float:
    """Share of images whose dominant shape colour is the one given for it (image i, colour i)."""
    shapes = toy_shapes()
    return sum(shapes.dominant_colour(im) == c for im, c in zip(images, colours, strict=True)) / max(len(images), 1)


def mean_shape_iou(images: Sequence[np.ndarray], specs: Sequence[Any]) -> float:
    """Mean IoU of each image's shape pixels (saturated, see make_toy_shapes.saturated_mask) with the shape of
    its spec, drawn at the image's size."""
    shapes = toy_shapes()
    scores = []
    for image, spec in zip(images, specs, strict=True):
        drawn, wanted = shapes.saturated_mask(image), shapes.shape_mask(spec, image.shape[0])
        scores.append((drawn & wanted).sum() / max((drawn | wanted).sum(), 1))
    return float(np.mean(scores)) if scores else 0.0


def purple_prompts(count: int = 50) -> list[str]:
    """The held-out concept's measuring prompts: every shape, large and small ("a small purple circle")."""
    shapes = toy_shapes()
    return [f"a {'large' if i % 3 else 'small'} purple {shapes.SHAPES[i % 4]}" for i in range(count)]


def run_demo(workspace: str | Path, max_steps: int | None = None) -> dict[str, Path]:
    """Train the toy LoRA on purple shapes and write the base-vs-LoRA grid; returns {"adapter", "grid"}."""
    start = time.time()
    workspace = Path(workspace).resolve()
    overrides = [f"train.max_steps={max_steps}"] if max_steps else []
    print("[demo] training recipes/toy/lora.yaml on purple shapes (the toy base has never seen purple) ...",
          flush=True)
    adapter = train_toy_recipe("lora", workspace, "purple", overrides)
    trained = time.time()
    model = load_trained(adapter, name="lora")
    grid = compare_grid(model, "lora", LORA_PROMPTS, DEMO_SEEDS, workspace / "demo" / "lora-purple.png", "toy LoRA")
    model.set_enabled("lora", False)
    before = held_out_share(sample_previews(model, purple_prompts(), seed=1), "purple")
    model.set_enabled("lora", True)
    after = held_out_share(sample_previews(model, purple_prompts(), seed=1), "purple")
    done = time.time()
    print(f"[demo] adapter: {adapter}", flush=True)
    print(f"[demo] grid:    {grid}", flush=True)
    print(f"[demo] purple shapes in {before:.0%} of {len(purple_prompts())} base samples, {after:.0%} with the LoRA",
          flush=True)
    print(f"[demo] took {done - start:.0f} s (training {trained - start:.0f} s, grid {done - trained:.0f} s)",
          flush=True)
    return {"adapter": adapter, "grid": grid}


def control_hints(specs: Sequence[Any]) -> torch.Tensor:
    """The pre-made edge images of toy-shapes specs as ControlNet hints [B, 3, 256, 256] in [0, 1]."""
    shapes = toy_shapes()
    edges = np.stack([shapes.edge_map(spec) for spec in specs]).astype(np.float32) / 255
    return torch.from_numpy(edges)[:, None].expand(-1, 3, -1, -1).contiguous()


def run_controlnet_demo(workspace: str | Path, max_steps: int | None = None) -> dict[str, Path]:
    """Train the toy ControlNet on edge images; grid: edge input | base | ControlNet for held-out shapes."""
    workspace = Path(workspace).resolve()
    overrides = [f"train.max_steps={max_steps}"] if max_steps else []
    adapter = train_toy_recipe("controlnet", workspace, "control", overrides)
    model = load_trained(adapter, name="controlnet")
    specs = toy_shapes().sample_specs("test")[:4]
    prompts = [f"a {s.size} {s.colour} {s.shape}" for s in specs]
    hints = control_hints(specs)
    inputs = [Image.fromarray((h[0].numpy() * 255).astype(np.uint8)).convert("RGB") for h in hints]
    grid = compare_grid(model, "controlnet", prompts, (0,), workspace / "demo" / "controlnet-edges.png",
                        "toy ControlNet", extra_cond={"control": hints}, extra_column=inputs)
    print(f"[demo] adapter: {adapter}\n[demo] grid:    {grid}", flush=True)
    scores = controlnet_iou(model, "controlnet", toy_shapes().sample_specs("test")[:20])
    print(f"[demo] shape IoU with the edge image: {scores[False]:.2f} without control, {scores[True]:.2f} with it",
          flush=True)
    return {"adapter": adapter, "grid": grid}


def controlnet_iou(model: Any, name: str, specs: Sequence[Any], seed: int = 0) -> dict[bool, float]:
    """Mean IoU of the drawn shape with the edge image's shape, ControlNet off (False) and on (True).

    Prompts name size, colour and shape but not the place: only the control says where."""
    prompts = [f"a {s.size} {s.colour} {s.shape}" for s in specs]
    hints = control_hints(specs)
    scores = {}
    for enabled in (False, True):
        model.set_enabled(name, enabled)
        scores[enabled] = mean_shape_iou(sample_previews(model, prompts, seed, {"control": hints}), specs)
    model.set_enabled(name, True)
    return scores


def image_prompts(specs: Sequence[Any]) -> torch.Tensor:
    """Toy-shapes images as IP-Adapter image embeddings [B, 1, 32] from the toy image encoder (shipped weights)."""
    from .adapters.ip_adapter import image_encoder_feature

    shapes = toy_shapes()
    images = torch.from_numpy(np.stack([shapes.render(s) for s in specs])).permute(0, 3, 1, 2).float() / 255
    feature = image_encoder_feature({"image_encoder": "toy"})
    return feature.encode(list(images))[feature.name]


def run_ip_adapter_demo(workspace: str | Path, max_steps: int | None = None) -> dict[str, Path]:
    """Train the toy IP-Adapter; grid: image prompt | base | IP-Adapter, with a colourless text prompt."""
    workspace = Path(workspace).resolve()
    overrides = [f"train.max_steps={max_steps}"] if max_steps else []
    adapter = train_toy_recipe("ip-adapter", workspace, "control", overrides)
    model = load_trained(adapter, name="ip_adapter")
    specs = toy_shapes().sample_specs("test")[:4]
    embeds = image_prompts(specs)
    inputs = [Image.fromarray(toy_shapes().render(s)) for s in specs]
    prompts = [f"a {s.size} {s.shape}" for s in specs]
    grid = compare_grid(model, "ip_adapter", prompts, (0,), workspace / "demo" / "ip-adapter.png", "toy IP-Adapter",
                        extra_cond={"ip_image_embeds": embeds}, extra_uncond={"ip_image_embeds": torch.zeros_like(embeds)},
                        extra_column=inputs)
    print(f"[demo] adapter: {adapter}\n[demo] grid:    {grid}", flush=True)
    shares = ip_colour_share(model, "ip_adapter", toy_shapes().sample_specs("test")[:20])
    print(f"[demo] image prompt's colour drawn in {shares[False]:.0%} of samples without the IP-Adapter, "
          f"{shares[True]:.0%} with it (text prompts name no colour)", flush=True)
    return {"adapter": adapter, "grid": grid}


def ip_colour_share(model: Any, name: str, specs: Sequence[Any], seed: int = 0) -> dict[bool, float]:
    """Share of samples drawn in the image prompt's shape colour, IP-Adapter off (False) and on (True), with
    neutral text prompts ("a large circle") that name no colour."""
    embeds = image_prompts(specs)
    prompts = [f"a {s.size} {s.shape}" for s in specs]
    shares = {}
    for enabled in (False, True):
        model.set_enabled(name, enabled)
        images = sample_previews(model, prompts, seed, {"ip_image_embeds": embeds},
                                 {"ip_image_embeds": torch.zeros_like(embeds)})
        shares[enabled] = colour_share(images, [s.colour for s in specs])
    model.set_enabled(name, True)
    return shares


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cascade_studio.demo [WORKSPACE] [--all]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="cascade_studio.demo", description=__doc__.splitlines()[0])
    parser.add_argument("workspace", nargs="?", default="workspace/demo")
    parser.add_argument("--all", action="store_true", help="also the toy ControlNet and IP-Adapter demos")
    args = parser.parse_args(argv)
    # One thread: the toy models' matrices are tiny, so extra threads mostly wait on each other; on a busy
    # 2-core machine two threads made LoRA steps 25x slower (6 s instead of 0.23 s).
    torch.set_num_threads(1)
    run_demo(args.workspace)
    if args.all:
        run_controlnet_demo(args.workspace)
        run_ip_adapter_demo(args.workspace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
