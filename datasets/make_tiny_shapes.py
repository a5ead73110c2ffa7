"""Write datasets/tiny-shapes: 24 captioned 256x256 images of simple coloured shapes, each with an edge-map control.

The tiny set is what the CPU recipes, the demo and the tests train on: small enough to commit, varied enough
that a caption actually predicts the picture (shape, colour, size, position and background all vary and are
all named in the caption). Deterministic: running it again gives the same pixels.

Layout written (the folder-with-sidecars layout the data module reads):
    <stem>.png          RGB training image
    <stem>.txt          caption, e.g. "a small red circle in the top left on a grey background"
    <stem>_control.png  the shape's outline, white on black ("L" mode), a pre-made control image

Run: python datasets/make_tiny_shapes.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 256
SUPERSAMPLE = 4  # draw 4x larger, then downscale: smooth edges like a real photo's, not aliased stair-steps
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 45, 45), "green": (45, 170, 70), "blue": (45, 80, 220), "yellow": (240, 205, 40)}
SIZES = {"small": 0.14, "large": 0.26}  # half-extent as a fraction of the image side
POSITIONS = {
    "top left": ((0.28, 0.28), "in the top left"),
    "top": ((0.5, 0.28), "at the top"),
    "top right": ((0.72, 0.28), "in the top right"),
    "left": ((0.28, 0.5), "on the left"),
    "center": ((0.5, 0.5), "in the center"),
    "right": ((0.72, 0.5), "on the right"),
    "bottom left": ((0.28, 0.72), "in the bottom left"),
    "bottom": ((0.5, 0.72), "at the bottom"),
    "bottom right": ((0.72, 0.72), "in the bottom right"),
}
# (caption words, top colour, bottom colour); plain backgrounds have equal ends.
BACKGROUNDS = (
    ("a grey background", (128, 128, 128), (128, 128, 128)),
    ("a white background", (245, 245, 245), (245, 245, 245)),
    ("a black background", (20, 20, 20), (20, 20, 20)),
    ("a soft sky-blue gradient background", (170, 205, 240), (235, 245, 255)),
    ("a soft warm gradient background", (250, 225, 190), (235, 170, 140)),
)


def _background(top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    """Vertical gradient (rows constant, so PNG's row filter compresses it to almost nothing)."""
    ramp = np.linspace(0.0, 1.0, SIZE, dtype=np.float64)[:, None, None]
    rows = np.asarray(top, np.float64) * (1 - ramp) + np.asarray(bottom, np.float64) * ramp
    array = np.broadcast_to(rows, (SIZE, SIZE, 3)).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], half: float, fill) -> None:
    cx, cy = centre
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:  # upright equilateral-ish triangle inside the same box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)


def _shape_mask(shape: str, centre: tuple[float, float], half: float, scale: int) -> Image.Image:
    mask = Image.new("L", (SIZE * scale, SIZE * scale), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, (centre[0] * scale, centre[1] * scale), half * scale, 255)
    return mask


def sample_specs() -> list[dict]:
    """The 24 (shape, colour, size, position, background) combinations, in a fixed order."""
    position_names = list(POSITIONS)
    specs = []
    for index in range(24):
        shape = SHAPES[index % 3]
        colour = list(COLOURS)[(index // 3) % 4]
        size = ("small", "large")[(index // 12 + index) % 2]
        # Strides coprime with 9 and 5 spread positions and backgrounds evenly over the 24 samples.
        position = position_names[(index * 4 + 1) % 9]
        background = BACKGROUNDS[(index * 2 + index // 5) % 5]
        specs.append(
            {
                "stem": f"{index:02d}_{size}_{colour}_{shape}",
                "shape": shape,
                "colour": colour,
                "size": size,
                "position": position,
                "background": background,
            }
        )
    return specs


def render(spec: dict) -> tuple[Image.Image, Image.Image, str]:
    """(RGB image, "L" edge-map control, caption) for one spec."""
    (fx, fy), position_words = POSITIONS[spec["position"]]
    centre = (fx * SIZE, fy * SIZE)
    half = SIZES[spec["size"]] * SIZE
    words, top, bottom = spec["background"]

    big_mask = _shape_mask(spec["shape"], centre, half, SUPERSAMPLE)
    alpha = big_mask.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    shape_layer = Image.new("RGB", (SIZE, SIZE), COLOURS[spec["colour"]])
    image = Image.composite(shape_layer, _background(top, bottom), alpha)

    # Outline = dilated mask minus eroded mask: a 2-3 px white edge, like a clean edge detector's output.
    mask = _shape_mask(spec["shape"], centre, half, 1)
    edges = np.asarray(mask.filter(ImageFilter.MaxFilter(3)), np.int16) - np.asarray(
        mask.filter(ImageFilter.MinFilter(3)), np.int16
    )
    control = Image.fromarray(np.where(edges > 0, 255, 0).astype(np.uint8), mode="L")

    caption = f"a {spec['size']} {spec['colour']} {spec['shape']} {position_words} on {words}"
    return image, control, caption


def make_tiny_shapes(out_dir: Path) -> list[str]:
    """Write every sample into `out_dir`; returns the stems written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = []
    for spec in sample_specs():
        image, control, caption = render(spec)
        stem = spec["stem"]
        image.save(out_dir / f"{stem}.png", optimize=True)
        control.save(out_dir / f"{stem}_control.png", optimize=True)
        (out_dir / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        stems.append(stem)
    return stems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tiny-shapes")
    args = parser.parse_args()
    stems = make_tiny_shapes(args.out)
    total = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {len(stems)} samples to {args.out} ({total / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
