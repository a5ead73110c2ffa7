"""The pretrained toy cascade (``preset: toy``) and its adapters, measured with simple pixel statistics.

Every number here comes from fixed seeds and from the toy-shapes palette: a shape's colour is the hue most of
its saturated pixels are closest to (backgrounds are near-grey), and its mask is the set of saturated pixels.
No learned judge is involved, so a failing threshold means the pictures really changed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_studio.adapters.ip_adapter.config import IPAdapterConfig
from cascade_studio.config.schema import DataConfig
from cascade_studio.demo import toy_compare, toy_shapes
from cascade_studio.models.toy import ASSET_DIR, SHIPPED, load_toy_component

SHAPES = toy_shapes()
SAMPLES = 50


# ------------------------------------------------------------------------------------------------- the data

def test_toy_shapes_are_deterministic_and_measurable():
    specs = SHAPES.sample_specs("test")
    assert specs == SHAPES.sample_specs("test")
    assert np.array_equal(SHAPES.render(specs[0]), SHAPES.render(specs[0]))
    # The pixel measure the thresholds rely on is exact on the data itself.
    assert all(SHAPES.dominant_colour(SHAPES.render(s)) == s.colour for s in specs[:60])
    # The held-out colour never appears in the base's training split, and only it in the concept split.
    assert not any("purple" in s.caption for s in SHAPES.sample_specs("train"))
    assert {s.colour for s in SHAPES.sample_specs("purple")} == {"purple"}
    assert SHAPES.sample_specs("purple")[0].caption.startswith("a ")


def test_written_split_is_a_folder_the_data_module_reads(tmp_path):
    from cascade_studio.data import scan_source

    folder = SHAPES.ensure_split("purple", tmp_path, limit=6)
    scan = scan_source(DataConfig(source="folder", path=str(folder)), control_column="_control")
    assert len(scan.records) == 6 and not scan.skipped
    assert all("purple" in r.caption and r.has_control for r in scan.records)
    assert SHAPES.ensure_split("purple", tmp_path, limit=6) == folder  # second call reuses the folder


# ----------------------------------------------------------------------------------------------- the base

def test_shipped_weights_are_small_and_strict():
    files = [ASSET_DIR / f"{name}.safetensors" for name in SHIPPED]
    assert all(f.exists() for f in files)
    assert sum(f.stat().st_size for f in files) < 4_000_000
    for name in SHIPPED:
        module = load_toy_component(name)
        assert all(p.dtype == torch.float32 for p in module.parameters())
    # The text encoder is not shipped: it is the deterministic random init, identical on every call.
    a, b = load_toy_component("text_encoder"), load_toy_component("text_encoder")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def _colour_probe(encoder) -> float:
    """Nearest-centroid colour accuracy of an image encoder: centroids from the control split, scored on test."""
    def embed(split):
        specs = SHAPES.sample_specs(split)
        images = torch.from_numpy(np.stack([SHAPES.render(s) for s in specs])).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return torch.nn.functional.normalize(encoder.encode(images)[:, 0], dim=-1), [s.colour for s in specs]

    (fit, fit_colours), (test, test_colours) = embed("control"), embed("test")
    names = sorted(set(fit_colours))
    centroids = torch.stack([fit[[c == n for c in fit_colours]].mean(0) for n in names])
    guesses = (test @ centroids.T).argmax(1)
    return sum(names[int(g)] == c for g, c in zip(guesses, test_colours)) / len(test_colours)


def test_toy_image_encoder_tells_shape_colours_apart():
    from cascade_studio.adapters.ip_adapter import image_encoder_feature

    trained = _colour_probe(load_toy_component("ip_image_encoder"))
    random_tower = _colour_probe(image_encoder_feature(IPAdapterConfig(image_encoder="tiny")).encoder)
    # The toy encoder is the tiny tower trained as a small CLIP on the captions; the random one barely sees colour.
    assert trained >= 0.9, f"toy image encoder: colour probe {trained:.0%}"
    assert random_tower < 0.6, f"random tiny tower: colour probe {random_tower:.0%}"
    assert image_encoder_feature(IPAdapterConfig(image_encoder="toy")).encoder.embed_dim == 32


def test_compressor_and_previewer_round_trip_colours():
    specs = SHAPES.sample_specs("test")[:40]
    images = torch.from_numpy(np.stack([SHAPES.render(s) for s in specs])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        latents = load_toy_component("effnet").encode(images)
        pixels = load_toy_component("previewer")(latents)
    assert latents.shape == (40, 16, 8, 8)
    assert 0.5 < latents.std().item() < 1.5  # normalised latents, what the diffusion schedule assumes
    decoded = [SHAPES.dominant_colour(a) for a in (pixels.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()]
    assert sum(d == s.colour for d, s in zip(decoded, specs)) >= 36


@pytest.mark.slow
def test_toy_base_follows_colour_prompts(tmp_path):
    """The base column of ``compare --preset toy`` (pixel-identical to ``generate``), 50 prompts, seed 0."""
    colours = [SHAPES.BASE_COLOURS[i % 4] for i in range(SAMPLES)]
    prompts = [f"a {'large' if i % 3 else 'small'} {c} {SHAPES.SHAPES[i % 4]}" for i, c in enumerate(colours)]
    images = toy_compare(["base"], prompts, [0], tmp_path / "compare", tmp_path).column(0)
    hits = sum(SHAPES.dominant_colour(im) == c for im, c in zip(images, colours))
    assert hits >= 0.8 * SAMPLES, f"prompted colour dominant in {hits}/{SAMPLES} samples"


# --------------------------------------------------------------------------------------------- the adapters

# The demo's LoRA (teach purple) is judged in test_toy_outcomes.py, through `cascade-studio compare` in a fresh
# process and the demo's own comparison, on one training run.


@pytest.mark.slow
def test_demo_all_runs_the_controlnet_and_ip_adapter_demos(toy_workspace, capsys):
    """``cascade-studio demo --all``'s two extra demos, on 2 training steps and 4 measured shapes each: grids
    written (through run_compare), numbers printed."""
    from PIL import Image

    from cascade_studio.demo import run_controlnet_demo, run_ip_adapter_demo

    for run, printed in ((run_controlnet_demo, "shape IoU with the edge image"),
                         (run_ip_adapter_demo, "image prompt's colour drawn in")):
        result = run(toy_workspace, max_steps=2, shapes=4)
        assert result["adapter"].is_file()
        with Image.open(result["grid"]) as grid:
            assert grid.height > grid.width  # 4 prompt rows of (input | base | adapter)
        assert printed in capsys.readouterr().out
