"""The toy demo: train an adapter on the pretrained toy cascade and show base vs adapter side by side.

``run_demo(workspace)`` writes the toy-shapes ``purple`` split (a colour the toy base never saw) into the
workspace, runs ``recipes/toy/lora.yaml`` on it through ``run.train`` (what ``cascade-studio train`` runs), and
draws the base-vs-LoRA grid with ``inference.compare.run_compare`` (what ``cascade-studio compare`` and the
studio's Compare page run), on ``preset: toy`` with the command's defaults. ``run_controlnet_demo`` and
``run_ip_adapter_demo`` do the same for the toy ControlNet (edge images) and IP-Adapter (image prompts).

Every number the demo prints (and the toy tests assert) is measured on the cells of those comparisons, so the
demo, the tests and a user of the commands look at the same pictures; there is no sampling code here.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "toy"
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
    """Run ``recipes/toy/<recipe>`` (a file name, e.g. ``lora.yaml``) on the toy-shapes ``split`` written under
    ``workspace``; returns the exported adapter. Each call gets a fresh run name, so a rerun never collides with
    an earlier run."""
    from .run import train

    workspace = Path(workspace).resolve()
    data = toy_shapes().ensure_split(split, workspace / "data")
    name = f"toy-{Path(recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}"
    result = train(RECIPES / recipe, [f"workspace={workspace}", f"data.path={data}", f"name={name}",
                                                *overrides], progress=False)
    if not result.exports:
        raise RuntimeError(f"the {recipe} run in {result.run_dir} exported nothing")
    if result.run_id:
        print(f"[demo] MLflow run {result.run_id} at {result.tracking_uri} "
              f"(browse: mlflow ui --backend-store-uri {result.tracking_uri})", flush=True)
    return result.exports[0]


class Comparison(NamedTuple):
    """A finished ``run_compare`` (grid, cells, manifest on disk) and its cells as uint8 arrays [row][column]."""

    result: Any  # inference.compare.CompareResult
    images: list[list[np.ndarray]]

    def column(self, index: int) -> list[np.ndarray]:
        """Every row's picture in one column (0 = the first column given)."""
        return [row[index] for row in self.images]

    def labels(self) -> list[str]:
        """The column labels ``run_compare`` wrote into the manifest (what the grid's header says)."""
        manifest = json.loads(Path(self.result.manifest_path).read_text(encoding="utf-8"))
        return [column["label"] for column in manifest["columns"]]


class Measured(NamedTuple):
    """One number measured on the base column and on the adapter's column of the same comparison."""

    base: float
    adapter: float


def toy_compare(columns: Sequence[str], prompts: Sequence[str], seeds: Sequence[int], out_dir: Path,
                workspace: Path, control: Path | None = None, image_prompts: Sequence[Path] = ()) -> Comparison:
    """``cascade-studio compare --preset toy --columns ... --prompt ... --seeds ... --out out_dir`` (plus
    ``--control`` / ``--image-prompt``), in this process: the same ``run_compare`` and the same defaults as the
    command and the studio's Compare page, so the demo measures exactly the pictures a user gets."""
    from .inference.compare import CompareSettings, run_compare
    from .inference.pipeline import ModelSpec

    settings = CompareSettings(columns=list(columns), prompts=list(prompts), seeds=[int(s) for s in seeds],
                               out_dir=Path(out_dir), model=ModelSpec(preset="toy"),
                               control=str(control) if control is not None else None,
                               image_prompts=[str(p) for p in image_prompts], workspace=Path(workspace),
                               progress=False)
    result = run_compare(settings)
    images = []
    for row in result.cells:
        pictures = []
        for path in row:
            with Image.open(path) as image:
                pictures.append(np.asarray(image.convert("RGB")))
        images.append(pictures)
    return Comparison(result, images)


@contextlib.contextmanager
def _collector_skips_existing_objects():
    """Around a series of comparisons: ``run_compare`` frees every stage with a full ``gc.collect()``, which
    walks every object of the process (a test session holds millions; about 0.3 s a call here). Objects that
    exist before the series are moved out of the collector's view (``gc.freeze``) and handed back after it;
    objects made by the comparisons are collected as usual."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def save_image(array: np.ndarray, path: Path) -> Path:
    """Write a uint8 image (H x W or H x W x 3) as a PNG, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


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


def train_lora(workspace: str | Path, max_steps: int | None = None) -> Path:
    """The demo's LoRA: ``recipes/toy/lora.yaml`` on the purple split; returns the exported adapter file."""
    overrides = [f"train.max_steps={max_steps}"] if max_steps else []
    return train_toy_recipe("lora.yaml", Path(workspace), "purple", overrides)


def lora_purple_shares(adapter: Path, workspace: Path, out_dir: Path, prompts: Sequence[str] | None = None,
                       seed: int = 1) -> Measured:
    """Share of purple shapes over the purple prompts, base column vs LoRA column of one comparison."""
    comparison = toy_compare(["base", f"lora:{adapter}"], prompts or purple_prompts(), [seed], out_dir, workspace)
    return Measured(held_out_share(comparison.column(0), "purple"), held_out_share(comparison.column(1), "purple"))


def run_demo(workspace: str | Path, max_steps: int | None = None) -> dict[str, Path]:
    """Train the toy LoRA on purple shapes and write the base-vs-LoRA grid; returns {"adapter", "grid"}."""
    start = time.time()
    workspace = Path(workspace).resolve()
    print("[demo] training recipes/toy/lora.yaml on purple shapes (the toy base has never seen purple) ...",
          flush=True)
    adapter = train_lora(workspace, max_steps)
    trained = time.time()
    folder = workspace / "demo"
    comparison = toy_compare(["base", f"lora:{adapter}"], LORA_PROMPTS, DEMO_SEEDS, folder / "lora-purple",
                             workspace)
    grid = folder / "lora-purple.png"
    shutil.copyfile(comparison.result.grid_path, grid)
    shares = lora_purple_shares(adapter, workspace, folder / "lora-purple-measure")
    done = time.time()
    print(f"[demo] adapter: {adapter}", flush=True)
    print(f"[demo] grid:    {grid} (cells and manifest: {comparison.result.grid_path.parent})", flush=True)
    print(f"[demo] purple shapes in {shares.base:.0%} of {len(purple_prompts())} base samples, "
          f"{shares.adapter:.0%} with the LoRA", flush=True)
    print(f"[demo] took {done - start:.0f} s (training {trained - start:.0f} s, grids {done - trained:.0f} s)",
          flush=True)
    return {"adapter": adapter, "grid": grid}


def _input_grid(inputs: Sequence[np.ndarray], comparisons: Sequence[Comparison], input_label: str,
                out: Path) -> Path:
    """One grid from several one-row comparisons (one per control image / image prompt): the input, then
    that comparison's cells, labelled as ``run_compare`` labels them."""
    from .inference.grid import make_grid

    rows, labels = [], []
    for picture, comparison in zip(inputs, comparisons, strict=True):
        manifest = json.loads(Path(comparison.result.manifest_path).read_text(encoding="utf-8"))
        for row, images in zip(manifest["rows"], comparison.images, strict=True):
            rows.append([Image.fromarray(picture)] + [Image.fromarray(image) for image in images])
            labels.append(f"{row['prompt']} | seed {row['seed']}")
    make_grid(rows, labels, [input_label, *comparisons[0].labels()]).save(out)
    return out


def controlnet_comparisons(adapter: Path, specs: Sequence[Any], workspace: Path, out_dir: Path,
                           seed: int = 0) -> list[Comparison]:
    """One ``compare --columns base cn:<adapter> --control <edges> --prompt "a <size> <colour> <shape>"`` per
    test shape: the compare command takes one control image per call. Prompts name size, colour and shape but
    not the place: only the control says where."""
    shapes = toy_shapes()
    comparisons = []
    with _collector_skips_existing_objects():
        for index, spec in enumerate(specs):
            folder = Path(out_dir) / f"{index:03d}-{spec.stem}"
            control = save_image(shapes.edge_map(spec), folder / "control.png")
            comparisons.append(toy_compare(["base", f"cn:{adapter}"], [f"a {spec.size} {spec.colour} {spec.shape}"],
                                           [seed], folder, workspace, control=control))
    return comparisons


def controlnet_iou(adapter: Path, specs: Sequence[Any], workspace: Path, out_dir: Path, seed: int = 0) -> Measured:
    """Mean IoU of the drawn shape with the edge image's shape: base column vs ControlNet column."""
    comparisons = controlnet_comparisons(adapter, specs, workspace, out_dir, seed)
    return Measured(*(mean_shape_iou([c.images[0][column] for c in comparisons], specs) for column in (0, 1)))


def run_controlnet_demo(workspace: str | Path, max_steps: int | None = None, shapes: int = 20) -> dict[str, Path]:
    """Train the toy ControlNet on edge images; grid: edge input | base | ControlNet for held-out shapes.
    The printed number is measured over the first ``shapes`` test shapes (one comparison each)."""
    workspace = Path(workspace).resolve()
    overrides = [f"train.max_steps={max_steps}"] if max_steps else []
    adapter = train_toy_recipe("controlnet.yaml", workspace, "control", overrides)
    specs = toy_shapes().sample_specs("test")[:max(shapes, 4)]
    comparisons = controlnet_comparisons(adapter, specs, workspace, workspace / "demo" / "controlnet-edges")
    inputs = [toy_shapes().edge_map(spec) for spec in specs[:4]]
    grid = _input_grid(inputs, comparisons[:4], "control image", workspace / "demo" / "controlnet-edges.png")
    print(f"[demo] adapter: {adapter}\n[demo] grid:    {grid}", flush=True)
    scores = Measured(*(mean_shape_iou([c.images[0][column] for c in comparisons], specs) for column in (0, 1)))
    print(f"[demo] shape IoU with the edge image: {scores.base:.2f} without control, {scores.adapter:.2f} with it "
          f"({len(specs)} test shapes)", flush=True)
    return {"adapter": adapter, "grid": grid}


def ip_adapter_comparisons(adapter: Path, specs: Sequence[Any], workspace: Path, out_dir: Path,
                           seed: int = 0) -> list[Comparison]:
    """One ``compare --columns base ip:<adapter> --image-prompt <shape.png> --prompt "a <size> <shape>"`` per
    test shape (the image prompt applies to the whole comparison); the text names no colour."""
    shapes = toy_shapes()
    comparisons = []
    with _collector_skips_existing_objects():
        for index, spec in enumerate(specs):
            folder = Path(out_dir) / f"{index:03d}-{spec.stem}"
            reference = save_image(shapes.render(spec), folder / "image-prompt.png")
            comparisons.append(toy_compare(["base", f"ip:{adapter}"], [f"a {spec.size} {spec.shape}"], [seed], folder,
                                           workspace, image_prompts=[reference]))
    return comparisons


def ip_colour_share(adapter: Path, specs: Sequence[Any], workspace: Path, out_dir: Path, seed: int = 0) -> Measured:
    """Share of samples drawn in the image prompt's colour: base column vs IP-Adapter column."""
    comparisons = ip_adapter_comparisons(adapter, specs, workspace, out_dir, seed)
    colours = [spec.colour for spec in specs]
    return Measured(*(colour_share([c.images[0][column] for c in comparisons], colours) for column in (0, 1)))


def run_ip_adapter_demo(workspace: str | Path, max_steps: int | None = None, shapes: int = 20) -> dict[str, Path]:
    """Train the toy IP-Adapter; grid: image prompt | base | IP-Adapter, with a colourless text prompt.
    The printed number is measured over the first ``shapes`` test shapes (one comparison each)."""
    workspace = Path(workspace).resolve()
    overrides = [f"train.max_steps={max_steps}"] if max_steps else []
    adapter = train_toy_recipe("ip-adapter.yaml", workspace, "control", overrides)
    specs = toy_shapes().sample_specs("test")[:max(shapes, 4)]
    comparisons = ip_adapter_comparisons(adapter, specs, workspace, workspace / "demo" / "ip-adapter-prompts")
    inputs = [toy_shapes().render(spec) for spec in specs[:4]]
    grid = _input_grid(inputs, comparisons[:4], "image prompt", workspace / "demo" / "ip-adapter.png")
    print(f"[demo] adapter: {adapter}\n[demo] grid:    {grid}", flush=True)
    colours = [spec.colour for spec in specs]
    shares = Measured(*(colour_share([c.images[0][column] for c in comparisons], colours) for column in (0, 1)))
    print(f"[demo] image prompt's colour drawn in {shares.base:.0%} of samples without the IP-Adapter, "
          f"{shares.adapter:.0%} with it ({len(specs)} test shapes; text prompts name no colour)", flush=True)
    return {"adapter": adapter, "grid": grid}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cascade_studio.demo [WORKSPACE] [--all]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="cascade_studio.demo", description=__doc__.splitlines()[0])
    parser.add_argument("workspace", nargs="?", default="workspace/demo")
    parser.add_argument("--all", action="store_true", help="also the toy ControlNet and IP-Adapter demos")
    args = parser.parse_args(argv)
    import torch

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
