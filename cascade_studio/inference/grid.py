"""Labelled image grids (compare, training previews): rows x columns with readable text labels."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

PAD = 4


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _pieces(draw: ImageDraw.ImageDraw, word: str, font, width: int) -> list[str]:
    """``word`` cut into pieces that each fit ``width`` (a path or a long run name has no space to wrap at)."""
    pieces, piece = [], ""
    for char in word:
        if piece and draw.textlength(piece + char, font=font) > width:
            pieces.append(piece)
            piece = ""
        piece += char
    return pieces + [piece] if piece else pieces


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    words, lines, line = [p for w in text.split() for p in _pieces(draw, w, font, width)], [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines or [""]


def make_grid(cells: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] = (),
              col_labels: Sequence[str] = (), cell_size: int | None = None, font_size: int = 14) -> Image.Image:
    """Paste ``cells[row][col]`` into one image with column labels on top and row labels on the left.

    Small cells (tiny models make 64 px previews) are upscaled with nearest-neighbour so pixels stay honest.
    """
    rows, cols = len(cells), max(len(r) for r in cells)
    size = cell_size or max(128, max(im.width for r in cells for im in r))
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_size + 4
    col_lines = [_wrap(probe, str(t), font, size - 2 * PAD) for t in col_labels] if col_labels else []
    top = (max(len(l) for l in col_lines) * line_h + 2 * PAD) if col_lines else 0
    left_w = 0
    row_lines = []
    if row_labels:
        left_w = min(260, max(120, size))
        row_lines = [_wrap(probe, str(t), font, left_w - 2 * PAD) for t in row_labels]
    grid = Image.new("RGB", (left_w + cols * (size + PAD) + PAD, top + rows * (size + PAD) + PAD), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(col_lines):
        for i, line in enumerate(lines):
            draw.text((left_w + PAD + c * (size + PAD), PAD + i * line_h), line, fill="black", font=font)
    for r, row in enumerate(cells):
        y = top + PAD + r * (size + PAD)
        if row_lines:
            for i, line in enumerate(row_lines[r]):
                draw.text((PAD, y + i * line_h), line, fill="black", font=font)
        for c, image in enumerate(row):
            resample = Image.NEAREST if image.width < size else Image.LANCZOS
            grid.paste(image.convert("RGB").resize((size, size), resample), (left_w + PAD + c * (size + PAD), y))
    return grid
