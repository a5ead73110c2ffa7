"""Editing the captions of an image folder where they live: the ``.txt`` sidecar of each image, or the caption
column of the folder's ``metadata.jsonl`` / ``metadata.csv`` (the layouts :mod:`.sources` reads; the reading rules
are the scanner's own, imported from there, so an edit lands exactly where a run reads it).

Every write is atomic (``trainers/atomic.py``: a temporary file renamed over the old one), so a failed write
leaves the previous file whole. A metadata file is rewritten as a whole with only the edited cells changed: other
rows, other columns and the row order are kept. Sidecar edits touch one file per image; a bulk edit that fails
half-way says how many files it changed, and each file is either the old or the new caption, never half.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..trainers.atomic import atomic_write_text
from .sources import (DEFAULT_CAPTION_COLUMNS, DataSourceError, _read_metadata, _resolve_caption_column,
                      caption_file, metadata_file)

__all__ = ["CaptionWriteError", "set_caption", "edit_captions", "transformed", "with_trigger", "count_matches"]


class CaptionWriteError(OSError):
    """A caption edit could not be written; the message says what was (and was not) changed."""


def with_trigger(caption: str, trigger: str) -> str:
    """``trigger`` in front of ``caption`` (``"ohwx, a red circle"``), unless it is there already (idempotent)."""
    trigger = trigger.strip()
    if not trigger or caption == trigger or caption.startswith((f"{trigger},", f"{trigger} ")):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def count_matches(captions: Mapping[str, str], find: str) -> tuple[int, int]:
    """(captions containing ``find``, occurrences in all): the preview shown before a find/replace."""
    if not find:
        return 0, 0
    hits = [caption.count(find) for caption in captions.values()]
    return sum(1 for n in hits if n), sum(hits)


@dataclass(frozen=True)
class _Metadata:
    path: Path
    rows: list[dict]
    column: str  # the caption column (added when the file has none)


def _metadata(folder: Path, caption_column: Optional[str]) -> Optional[_Metadata]:
    path = metadata_file(folder)
    if path is None:
        return None
    rows = _read_metadata(path)
    columns = list(rows[0].keys()) if rows else []
    column = _resolve_caption_column(columns, caption_column, str(path)) if rows else None
    return _Metadata(path, rows, column or caption_column or DEFAULT_CAPTION_COLUMNS[0])


def _write_metadata(meta: _Metadata) -> None:
    if meta.path.suffix == ".jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in meta.rows)
    else:
        columns = list(dict.fromkeys([*(meta.rows[0].keys() if meta.rows else ()), meta.column]))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(meta.rows)
        text = buffer.getvalue()
    try:
        atomic_write_text(meta.path, text)
    except OSError as exc:
        raise CaptionWriteError(f"could not write {meta.path} ({exc}); it is unchanged") from exc


def _row_of(meta: _Metadata, folder: Path, image: Path) -> dict:
    target = image.resolve()
    for row in meta.rows:
        if (folder / str(row.get("file_name", ""))).resolve() == target:
            return row
    raise DataSourceError(f"{image.name} has no row in {meta.path.name}; add one (file_name = its path in the "
                          "folder) to caption it there")


def set_caption(folder: Path, image: Path, caption: str, caption_column: Optional[str] = None) -> Path:
    """Write one image's caption where the scanner reads it; returns the file written."""
    return edit_captions(folder, {str(image): caption}, caption_column)[0]


def edit_captions(folder: Path, captions: Mapping[str, str], caption_column: Optional[str] = None) -> list[Path]:
    """Write new captions (image path -> caption) where the scanner reads them; returns the files written.

    Raises :class:`CaptionWriteError` (nothing changed in the file it names) or ``DataSourceError`` (an image the
    metadata file does not list).
    """
    folder = Path(folder)
    images = {Path(path): " ".join(text.split("\n")).strip() for path, text in captions.items()}
    for image in images:
        if folder.resolve() not in image.resolve().parents:
            raise DataSourceError(f"{image} is not inside {folder}; captions are edited per dataset folder")
    meta = _metadata(folder, caption_column)
    if meta is not None:
        for image, caption in images.items():
            _row_of(meta, folder, image)[meta.column] = caption
        _write_metadata(meta)
        return [meta.path]
    written: list[Path] = []
    for image, caption in images.items():
        target = caption_file(image)
        try:
            atomic_write_text(target, caption + "\n")
        except OSError as exc:
            raise CaptionWriteError(f"could not write {target} ({exc}); it is unchanged. {len(written)} of "
                                    f"{len(images)} caption files were written before it") from exc
        written.append(target)
    return written


def transformed(captions: Mapping[str, str], change: Callable[[str], str]) -> dict[str, str]:
    """The captions ``change`` would alter (image path -> new caption), for a bulk edit."""
    return {path: new for path, old in captions.items() if (new := change(old)) != old}
