"""Toy shapes: a deterministic, captioned synthetic image set for the pretrained toy cascade (``preset: toy``).

One coloured shape per 256x256 image (8x8 Stage C latents on the tiny architecture, 64 px previews): four
kinds of shape, two sizes, nine positions (with a little jitter), five low-saturation backgrounds, and colours
that are saturated, so "which colour is the shape" can be measured from pixels alone (see
:func:`dominant_colour`). Captions name what is drawn ("a small red circle in the top left on a grey
background"); some captions leave out the size, position or background so the model also answers short prompts,
and in the splits that train models a fifth leave out the colour, so colourless prompts are in-distribution too.

Splits (each a fixed seed, so the same name always gives the same pixels):

- ``train`` (4000) / ``test`` (200): the base set, colours red, yellow, green and blue only.
- ``purple`` (240) / ``purple-test`` (40): the held-out colour. The toy base never sees purple, so a LoRA
  trained on ``purple`` teaches something the base cannot do (the demo and tests check before/after).
- ``control`` (400): base colours, used by the toy ControlNet and IP-Adapter recipes.

Folder layout (what ``cascade_studio.data.scan_source`` reads): ``<stem>.png`` RGB image, ``<stem>.txt`` caption,
``<stem>_control.png`` the shape's outline, white on black ("L"), as a pre-made ControlNet hint.

Run: ``python datasets/make_toy_shapes.py --split purple --out DIR`` (default DIR: ``datasets/toy-shapes/<split>``).
Library use (the demo, the base-training script, tests): ``ensure_split(name, root)`` writes a split once
into a cache folder and returns its path; ``render(spec)`` / ``sample_specs(split)`` work in memory.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VERSION = 2  # bump when pixels or captions change: cached folders carry it in their marker file
SIZE = 256
SUPERSAMPLE = 2  # draw at 2x and downscale: anti-aliased edges at a fraction of a 4x render's cost
SHAPES = ("circle", "square", "triangle", "diamond")
# Saturated colours with well-separated hues (0, 50, 130, 225 degrees; purple 280) so a hue test can tell them
# apart even on a blurry 64 px preview.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (235, 200, 25),
    "green": (35, 165, 60),
    "blue": (40, 80, 225),
    "purple": (150, 45, 205),
}
BASE_COLOURS = ("red", "yellow", "green", "blue")
HELD_OUT_COLOUR = "purple"
# Half-extent as a fraction of the image side. A small shape spans about 2.7 latent cells of the 8x8 grid: at
# 0.13 (2 cells) the toy Stage C often drew nothing for "small" prompts.
SIZES = {"small": 0.17, "large": 0.24}
POSITIONS = {
    "top left": ((0.27, 0.27), "in the top left"),
    "top": ((0.5, 0.27), "at the top"),
    "top right": ((0.73, 0.27), "in the top right"),
    "left": ((0.27, 0.5), "on the left"),
    "center": ((0.5, 0.5), "in the center"),
    "right": ((0.73, 0.5), "on the right"),
    "bottom left": ((0.27, 0.73), "in the bottom left"),
    "bottom": ((0.5, 0.73), "at the bottom"),
    "bottom right": ((0.73, 0.73), "in the bottom right"),
}
# Low-saturation backgrounds: every saturated pixel in an image belongs to the shape.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (240, 240, 240),
    "black": (22, 22, 22),
    "beige": (226, 214, 194),
    "slate": (68, 74, 84),
}
# Share of captions that leave out the colour ("a large circle in the top left"), in the base-colour splits
# that train models (train, control): the base then answers colourless prompts with some colour of its own, so
# an image prompt (the toy IP-Adapter) has something to decide. Test and purple captions always name it.
COLOURLESS_SHARE = {"train": 0.2, "control": 0.2}
# name -> (seed, count, colours)
SPLITS: dict[str, tuple[int, int, tuple[str, ...]]] = {
    "train": (1, 4000, BASE_COLOURS),
    "test": (2, 200, BASE_COLOURS),
    "purple": (3, 240, (HELD_OUT_COLOUR,)),
    "purple-test": (4, 40, (HELD_OUT_COLOUR,)),
    "control": (5, 400, BASE_COLOURS),
}


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that decides one image and its caption."""

    stem: str
    shape: str
    colour: str
    size: str
    position: str
    background: str
    dx: float  # position jitter, fraction of the image side
    dy: float
    scale: float  # size jitter factor
    caption_parts: tuple[bool, bool, bool]  # mention (size, position, background)
    with_colour: bool = True  # False: the caption leaves the colour out

    @property
    def caption(self) -> str:
        """E.g. "a small red circle in the top left on a grey background"; parts may be left out."""
        with_size, with_position, with_background = self.caption_parts
        words = ["a"] + ([self.size] if with_size else []) + ([self.colour] if self.with_colour else [])
        words.append(self.shape)
        if with_position:
            words.append(POSITIONS[self.position][1])
        if with_background:
            words.append(f"on a {self.background} background")
        return " ".join(words)

    @property
    def centre(self) -> tuple[float, float]:
        """Shape centre in pixels."""
        (fx, fy), _ = POSITIONS[self.position]
        return (fx + self.dx) * SIZE, (fy + self.dy) * SIZE

    @property
    def half(self) -> float:
        """Half-extent in pixels."""
        return SIZES[self.size] * self.scale * SIZE


def sample_specs(split: str) -> list[ShapeSpec]:
    """The specs of a split, in a fixed order (one seeded stream per split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    seed, count, colours = SPLITS[split]
    rng = random.Random(seed)
    # A second stream decides colourless captions, so adding them left every other attribute as it was.
    colourless = random.Random(seed + 1000)
    share = COLOURLESS_SHARE.get(split, 0.0)
    specs = []
    for index in range(count):
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        size, position = rng.choice(tuple(SIZES)), rng.choice(tuple(POSITIONS))
        background = rng.choice(tuple(BACKGROUNDS))
        # Half the captions are complete; the rest drop each optional part with probability 1/2, so short
        # prompts ("a red circle") are in-distribution too.
        parts = (True, True, True) if rng.random() < 0.5 else tuple(rng.random() < 0.5 for _ in range(3))
        specs.append(ShapeSpec(
            stem=f"{split}_{index:05d}", shape=shape, colour=colour, size=size, position=position,
            background=background, dx=rng.uniform(-0.04, 0.04), dy=rng.uniform(-0.04, 0.04),
            scale=rng.uniform(0.9, 1.1), caption_parts=parts,  # type: ignore[arg-type]
            with_colour=colourless.random() >= share,
        ))
    return specs


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:  # diamond: a square on its corner, a little larger so its area is like the square's
        h = half * 1.25
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)


def shape_mask(spec: ShapeSpec, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of the shape (no anti-aliasing)."""
    mask = Image.new("L", (size, size), 0)
    k = size / SIZE
    _draw(ImageDraw.Draw(mask), spec.shape, spec.centre[0] * k, spec.centre[1] * k, spec.half * k, 255)
    return np.asarray(mask) > 127


def render(spec: ShapeSpec) -> np.ndarray:
    """The RGB image of a spec, uint8 [256, 256, 3]."""
    big = SIZE * SUPERSAMPLE
    alpha = Image.new("L", (big, big), 0)
    cx, cy = spec.centre
    _draw(ImageDraw.Draw(alpha), spec.shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, spec.half * SUPERSAMPLE, 255)
    a = np.asarray(alpha.resize((SIZE, SIZE), Image.Resampling.BOX), np.float32)[..., None] / 255.0
    background = np.asarray(BACKGROUNDS[spec.background], np.float32)
    colour = np.asarray(COLOURS[spec.colour], np.float32)
    return (background * (1 - a) + colour * a).round().astype(np.uint8)


def edge_map(spec: ShapeSpec) -> np.ndarray:
    """The shape's outline, uint8 [256, 256] white (255) on black: a clean edge detector's output."""
    mask = Image.fromarray(shape_mask(spec).astype(np.uint8) * 255, mode="L")
    outline = np.asarray(mask.filter(ImageFilter.MaxFilter(3)), np.int16) - np.asarray(
        mask.filter(ImageFilter.MinFilter(3)), np.int16)
    return np.where(outline > 0, 255, 0).astype(np.uint8)


def write_split(split: str, out_dir: Path, limit: int | None = None) -> Path:
    """Write a split as an image folder with .txt captions and _control.png edge maps; returns `out_dir`.

    A marker file (`toy-shapes.json`) is written last, so a folder with a current marker is complete.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = sample_specs(split)[:limit]
    for spec in specs:
        Image.fromarray(render(spec)).save(out_dir / f"{spec.stem}.png")
        Image.fromarray(edge_map(spec), mode="L").save(out_dir / f"{spec.stem}_control.png")
        (out_dir / f"{spec.stem}.txt").write_text(spec.caption + "\n", encoding="utf-8")
    marker = {"version": VERSION, "split": split, "count": len(specs)}
    (out_dir / "toy-shapes.json").write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return out_dir


def ensure_split(split: str, root: Path, limit: int | None = None) -> Path:
    """`root/<split>` written once (regenerated when the marker is missing or from another version)."""
    out_dir = Path(root) / (split if limit is None else f"{split}-{limit}")
    marker = out_dir / "toy-shapes.json"
    expected = {"version": VERSION, "split": split, "count": len(sample_specs(split)[:limit])}
    if marker.exists() and json.loads(marker.read_text(encoding="utf-8")) == expected:
        return out_dir
    return write_split(split, out_dir, limit)


# ------------------------------------------------------------------------------------------ pixel measurements
# Shared by the tests and the base-training script's report: what "the shape's colour" means in pixels.
SATURATION_MIN = 0.35  # backgrounds stay below ~0.15; every shape colour is above 0.6
VALUE_MIN = 0.25
HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}


def saturated_mask(image: np.ndarray) -> np.ndarray:
    """Pixels that belong to a shape: saturated and not dark (backgrounds are near-grey)."""
    rgb = image.astype(np.float32) / 255.0
    high, low = rgb.max(-1), rgb.min(-1)
    saturation = (high - low) / np.maximum(high, 1e-6)
    return (saturation > SATURATION_MIN) & (high > VALUE_MIN)


def dominant_colour(image: np.ndarray, min_fraction: float = 0.01) -> str | None:
    """The named colour most of the shape's pixels are closest to in hue, or None when there is no shape.

    Each saturated pixel votes for the palette colour with the nearest hue (on the hue circle); the winner
    needs at least `min_fraction` of all pixels, so a few noisy pixels do not make a shape.
    """
    mask = saturated_mask(image)
    if mask.sum() < min_fraction * mask.size:
        return None
    rgb = image[mask].astype(np.float32) / 255.0
    hue = np.array([colorsys.rgb_to_hsv(*px)[0] for px in rgb])
    names = list(HUES)
    ref = np.array([HUES[n] for n in names])
    distance = np.abs(hue[:, None] - ref[None, :])
    distance = np.minimum(distance, 1 - distance)
    votes = np.bincount(distance.argmin(1), minlength=len(names))
    return names[int(votes.argmax())]


def spec_record(spec: ShapeSpec) -> dict:
    """The spec as a JSON-able dict (with its caption)."""
    return {**asdict(spec), "caption": spec.caption}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="purple", choices=sorted(SPLITS))
    parser.add_argument("--out", type=Path, default=None, help="default: datasets/toy-shapes/<split>")
    parser.add_argument("--limit", type=int, default=None, help="write only the first N samples")
    args = parser.parse_args()
    out = args.out or Path(__file__).resolve().parent / "toy-shapes" / args.split
    write_split(args.split, out, args.limit)
    print(f"wrote {len(sample_specs(args.split)[:args.limit])} samples of {args.split!r} to {out}")


if __name__ == "__main__":
    main()
