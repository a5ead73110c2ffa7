"""Training data sources: local folders, saved or hub Hugging Face datasets, and webdataset tar shards.

`scan_source` turns a data config into a list of `Record`s. Every image (and pre-made control image) is
decoded once here, so broken files are reported with a reason before any model is loaded; the records keep
only how to fetch the bytes again, never the pixels.

Layouts (the same ones the rest of the ecosystem reads):
- folder, sidecar captions: `cat.png` + `cat.txt`; control image `cat<control_column>.png` (e.g. `cat_control.png`).
- folder, metadata: `metadata.jsonl` or `metadata.csv` with `file_name` (relative path) and a caption column,
  exactly the Hugging Face `imagefolder` layout (images not listed are ignored, as `imagefolder` does; they
  are reported as skipped so nothing disappears silently). Read directly rather than through `imagefolder`,
  so that each bad file can be reported instead of failing the whole load.
- hf_disk: a dataset saved with `save_to_disk`; hf_hub: a hub dataset name (loaded through the local cache).
- webdataset: plain `.tar` shards (glob, directory, or `{000..009}` range) with `<key>.jpg|png|webp` and
  `<key>.txt` (or `<key>.<caption_column>`); control image `<key>.<control_column>.png` or
  `<key><control_column>.png`. Compressed shards are refused: members are read back by offset.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .images import DEFAULT_MAX_PIXELS, BadImageError, SkippedFile, open_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Caption columns tried, in order, when the config names none (the names common on the hub).
DEFAULT_CAPTION_COLUMNS = ("text", "caption", "prompt")
# Sidecars with this suffix are never training images, whatever control_column says, so a ControlNet folder
# (like datasets/tiny-shapes) can also train a LoRA without its edge maps turning into training images.
DEFAULT_CONTROL_SUFFIX = "_control"
SOURCES = ("folder", "hf_disk", "hf_hub", "webdataset")


class DataSourceError(ValueError):
    """The data config points at something that cannot be read (wrong path, column, source kind...)."""


class EmptyDatasetError(DataSourceError):
    """No usable image was found; the message says how many files were skipped and why."""


# ---------------------------------------------------------------------------------------------------------------
# Byte loaders: small picklable callables, so records can cross into DataLoader workers and subprocesses.


@dataclass(frozen=True)
class FileBytes:
    """Reads a whole file."""

    path: str

    def __call__(self) -> bytes:
        with open(self.path, "rb") as handle:
            return handle.read()


@dataclass(frozen=True)
class TarMemberBytes:
    """Reads one member of an uncompressed tar by offset (no re-parsing of the archive)."""

    tar_path: str
    offset: int
    size: int

    def __call__(self) -> bytes:
        with open(self.tar_path, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


@dataclass(frozen=True, eq=False)
class DatasetCellBytes:
    """Reads an image cell of a Hugging Face dataset (cast to undecoded bytes/path)."""

    dataset: Any
    index: int
    column: str

    def __call__(self) -> bytes:
        return _cell_bytes(self.dataset[self.index][self.column])


ByteLoader = Callable[[], bytes]


@dataclass(frozen=True)
class Record:
    """One training sample: caption, where its image lives, and a hash of its content.

    `content_hash` is the sha256 of the image bytes (combined with the control image's when there is one);
    the encode cache keys on it, so renaming a file does not invalidate its features.
    """

    key: str
    caption: str
    path: str
    content_hash: str
    width: int
    height: int
    image_bytes: ByteLoader = field(repr=False)
    control_path: str | None = None
    control_bytes: ByteLoader | None = field(default=None, repr=False)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def load_image(self) -> Image.Image:
        """The image as RGB (EXIF orientation applied); raises `BadImageError` if the file changed and broke."""
        return open_image(self.image_bytes(), self.path, max_pixels=self.max_pixels)

    @property
    def has_control(self) -> bool:
        return self.control_bytes is not None

    def load_control(self) -> Image.Image | None:
        """The pre-made control image as RGB (callers convert to "L" for one-channel controls), or None."""
        if self.control_bytes is None:
            return None
        return open_image(self.control_bytes(), self.control_path or self.path, max_pixels=self.max_pixels)


@dataclass
class ScanResult:
    """Usable records plus everything left out. `missing_captions` counts records whose caption is "";
    `missing_controls` lists the keys of records without a pre-made control (only when one was asked for)."""

    records: list[Record]
    skipped: list[SkippedFile]
    missing_captions: int = 0
    missing_controls: list[str] = field(default_factory=list)
    uncaptioned: list[str] = field(default_factory=list)  # paths of the records whose caption is ""

    def summary(self) -> str:
        parts = [f"{len(self.records)} images", f"{len(self.skipped)} skipped"]
        if self.missing_captions:
            parts.append(f"{self.missing_captions} without caption")
        if self.missing_controls:
            parts.append(f"{len(self.missing_controls)} without control image")
        return ", ".join(parts)

    def missing_caption_warning(self, shown: int = 3) -> str | None:
        """What a run says once when some images have no caption (they train on the empty caption)."""
        if not self.missing_captions:
            return None
        names = ", ".join(self.uncaptioned[:shown]) + (", ..." if len(self.uncaptioned) > shown else "")
        return (f"{self.missing_captions} of {len(self.records)} images have no caption and train on an empty "
                f"caption (as unconditional samples): {names}. Add a .txt sidecar (or a caption in the metadata "
                "file) for each if that is not what you want.")

    def report(self, where: str, skipped_shown: int = 50) -> str:
        """A scan as text (``cascade-studio validate <recipe> --data``): counts, captions, every skip reason."""
        captioned = len(self.records) - self.missing_captions
        lines = [f"data: {where}", f"  {len(self.records)} usable images ({captioned} with a caption, "
                                   f"{self.missing_captions} without), {len(self.skipped)} skipped"]
        if self.missing_controls:
            lines.append(f"  {len(self.missing_controls)} without a control image")
        warning = self.missing_caption_warning()
        if warning:
            lines.append(f"  warning: {warning}")
        if self.skipped:
            lines.append("  skipped:")
            lines += [f"    {s.path}: {s.reason}" for s in self.skipped[:skipped_shown]]
            if len(self.skipped) > skipped_shown:
                lines.append(f"    ... and {len(self.skipped) - skipped_shown} more; by reason:")
                lines += _reason_lines(self.skipped, indent="    ")
        return "\n".join(lines)


@dataclass
class _Candidate:
    key: str
    path: str
    caption: str
    image_bytes: ByteLoader
    control_path: str | None = None
    control_bytes: ByteLoader | None = None


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def scan_source(data_cfg: Any, control_column: str | None = None) -> ScanResult:
    """Read every sample of the configured source, validating each image once.

    `data_cfg` is the recipe's `data` section (`DataConfig`): `source` (folder | hf_disk | hf_hub | webdataset),
    `path`, `name`, `split`, `image_column`, `caption_column`, `max_images`, `max_pixels`. `control_column` asks
    for pre-made control images (sidecar suffix, dataset column, or webdataset extension; see the module
    docstring).
    Raises `DataSourceError` for an unreadable config and `EmptyDatasetError` when nothing usable is left.
    """
    source = data_cfg.source
    max_pixels = data_cfg.max_pixels
    max_images = data_cfg.max_images or 0
    caption_column = data_cfg.caption_column
    if source == "folder":
        root = Path(_require(data_cfg, "path", source))
        where = str(root)
        items = _folder_candidates(root, caption_column, control_column)
    elif source in ("hf_disk", "hf_hub"):
        dataset, where = _load_hf(data_cfg, source)
        image_column = data_cfg.image_column
        items = _dataset_candidates(dataset, where, image_column, caption_column, control_column)
    elif source == "webdataset":
        pattern = str(_require(data_cfg, "path", source))
        where = pattern
        items = _webdataset_candidates(pattern, caption_column, control_column)
    else:
        raise DataSourceError(f"data.source {source!r} is not known; write one of: {', '.join(SOURCES)}")

    result = ScanResult(records=[], skipped=[])
    for item in items:
        if isinstance(item, SkippedFile):
            result.skipped.append(item)
            continue
        record = _validate(item, max_pixels, result.skipped)
        if record is None:
            continue
        result.records.append(record)
        if record.caption == "":
            result.missing_captions += 1
            result.uncaptioned.append(record.path)
        if control_column and not record.has_control:
            result.missing_controls.append(record.key)
        if max_images and len(result.records) >= max_images:
            break
    if not result.records:
        raise EmptyDatasetError(_empty_message(where, result.skipped))
    logger.info("data from %s: %s", where, result.summary())
    return result


def _require(data_cfg: Any, name: str, source: str) -> Any:
    value = getattr(data_cfg, name)
    if not value:
        raise DataSourceError(f"data.{name} is required for data.source {source!r}")
    return value


def _validate(item: _Candidate, max_pixels: int, skipped: list[SkippedFile]) -> Record | None:
    try:
        image_data = item.image_bytes()
    except (OSError, ValueError) as exc:
        skipped.append(SkippedFile(item.path, f"cannot read ({exc}); check the file"))
        return None
    try:
        image = open_image(image_data, item.path, max_pixels=max_pixels)
    except BadImageError as exc:
        skipped.append(exc.skipped)
        return None
    digest = hashlib.sha256(image_data).hexdigest()
    if item.control_bytes is not None:
        control_path = item.control_path or item.path
        try:
            control_data = item.control_bytes()
            open_image(control_data, control_path, max_pixels=max_pixels)
        except (OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, BadImageError) else str(exc)
            skipped.append(SkippedFile(item.path, f"its control image {control_path} is unusable: {reason}"))
            return None
        control_digest = hashlib.sha256(control_data).hexdigest()
        digest = hashlib.sha256(f"image:{digest}|control:{control_digest}".encode()).hexdigest()
    return Record(
        key=item.key,
        caption=item.caption,
        path=item.path,
        content_hash=digest,
        width=image.width,
        height=image.height,
        image_bytes=item.image_bytes,
        control_path=item.control_path,
        control_bytes=item.control_bytes,
        max_pixels=max_pixels,
    )


def _empty_message(where: str, skipped: Sequence[SkippedFile]) -> str:
    if not skipped:
        return (
            f"No images found in {where}. Expected {', '.join(IMAGE_EXTENSIONS)} files (folder), a saved dataset "
            "with an image column, or .tar shards; check data.path and data.source."
        )
    groups = _reason_groups(skipped)
    return (
        f"No usable images in {where}: all {len(skipped)} file(s) were skipped, for {len(groups)} reason(s):\n"
        + "\n".join(_reason_lines(skipped))
        + "\nFix or remove these files (or point data.path elsewhere), then scan again "
        "(cascade-studio validate <recipe> --data lists every file)."
    )


def _reason_groups(skipped: Sequence[SkippedFile]) -> dict[str, list[SkippedFile]]:
    """Skipped files by kind of reason: reasons that differ only in their numbers (sizes, pixel counts, byte
    counts) are one kind, so no kind is ever left out of a summary."""
    groups: dict[str, list[SkippedFile]] = {}
    for item in skipped:
        groups.setdefault(re.sub(r"\d+", "#", item.reason), []).append(item)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def _reason_lines(skipped: Sequence[SkippedFile], indent: str = "  ") -> list[str]:
    lines = []
    for group in _reason_groups(skipped).values():
        first = group[0]
        others = sum(item.reason != first.reason for item in group)
        example = f"e.g. {first.path}" + (f"; {others} more with other numbers" if others else "")
        lines.append(f"{indent}{len(group)} x {first.reason} ({example})")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Folder


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _control_suffixes(control_column: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(c for c in (control_column, DEFAULT_CONTROL_SUFFIX) if c))


def _folder_images(root: Path) -> list[Path]:
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # skip .git, .cache and the like
        files.extend(Path(directory) / n for n in names if not n.startswith(".") and _is_image_name(n))
    return sorted(files)


def _split_controls(
    images: list[Path], suffixes: Sequence[str], attach: str | None
) -> tuple[list[Path], dict[Path, Path]]:
    """Separate control sidecars (`<stem><suffix>.<ext>` next to an image `<stem>.<ext>`) from training images.

    Sidecars of every suffix are removed from the training images; only those of the `attach` suffix are
    returned, as a map image -> control file (PNG preferred when several exist).
    """
    by_stem: dict[tuple[Path, str], list[Path]] = {}
    for image in images:
        by_stem.setdefault((image.parent, image.stem), []).append(image)
    controls: dict[Path, Path] = {}
    control_files: set[Path] = set()
    for image in images:
        for suffix in suffixes:
            if not image.stem.endswith(suffix) or len(image.stem) == len(suffix):
                continue
            owners = by_stem.get((image.parent, image.stem[: -len(suffix)]))
            if not owners:
                continue  # no image it could belong to: an ordinary training image that happens to end in suffix
            control_files.add(image)
            if suffix != attach:
                continue
            for owner in owners:
                current = controls.get(owner)
                if current is None or (current.suffix.lower() != ".png" and image.suffix.lower() == ".png"):
                    controls[owner] = image
    return [i for i in images if i not in control_files], controls


def caption_file(image: Path) -> Path:
    """The sidecar caption of an image in a folder without metadata: ``cat.png`` -> ``cat.txt``."""
    return image.with_suffix(".txt")


def metadata_file(root: Path) -> Path | None:
    """The folder's ``metadata.jsonl`` or ``metadata.csv`` (the imagefolder layout), or None (sidecars).
    Raises ``DataSourceError`` when both exist."""
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.exists() and csv_path.exists():
        raise DataSourceError(f"{root} has both metadata.jsonl and metadata.csv; keep one of them")
    return jsonl if jsonl.exists() else (csv_path if csv_path.exists() else None)


def _read_caption_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except FileNotFoundError:
        return ""


def _folder_candidates(
    root: Path, caption_column: str | None, control_column: str | None
) -> Iterator[_Candidate | SkippedFile]:
    if not root.is_dir():
        raise DataSourceError(f"data.path {str(root)!r} is not a folder; write the folder that holds the images")
    metadata = metadata_file(root)
    images, controls = _split_controls(_folder_images(root), _control_suffixes(control_column), control_column)
    if metadata is not None:
        yield from _metadata_candidates(root, metadata, images, controls, caption_column, control_column)
        return
    for image in images:
        control = controls.get(image)
        try:
            caption = _read_caption_file(caption_file(image))
        except (OSError, UnicodeDecodeError) as exc:
            yield SkippedFile(str(image), f"caption file {caption_file(image).name} unreadable ({exc}); "
                                          "save it as UTF-8 text")
            continue
        yield _Candidate(
            key=image.relative_to(root).as_posix(),
            path=str(image),
            caption=caption,
            image_bytes=FileBytes(str(image)),
            control_path=str(control) if control else None,
            control_bytes=FileBytes(str(control)) if control else None,
        )


def _read_metadata(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8-sig") as handle:
                for line_number, line in enumerate(handle, start=1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise DataSourceError(f"{path} line {line_number} is not valid JSON ({exc})") from exc
            return rows
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"cannot read {path} ({exc}); save it as UTF-8") from exc


def _resolve_caption_column(columns: Sequence[str], wanted: str | None, where: str) -> str | None:
    if wanted:
        if wanted not in columns:
            raise DataSourceError(
                f"{where} has no caption column {wanted!r}; columns are {list(columns)}; set data.caption_column"
            )
        return wanted
    for name in DEFAULT_CAPTION_COLUMNS:
        if name in columns:
            return name
    logger.warning("%s has no caption column (tried %s); every caption will be empty", where, DEFAULT_CAPTION_COLUMNS)
    return None


def _caption_text(value: Any) -> str:
    # csv gives "" for a blank cell, jsonl may give null; numbers are tolerated as text.
    return "" if value is None else str(value).strip()


def _metadata_candidates(
    root: Path,
    metadata: Path,
    images: list[Path],
    controls: dict[Path, Path],
    caption_column: str | None,
    control_column: str | None,
) -> Iterator[_Candidate | SkippedFile]:
    rows = _read_metadata(metadata)
    columns = list(rows[0].keys()) if rows else []
    if rows and "file_name" not in columns:
        raise DataSourceError(f"{metadata} has no 'file_name' column (columns: {columns}); name the image column "
                              "file_name, as Hugging Face imagefolder expects")
    caption_key = _resolve_caption_column(columns, caption_column, str(metadata)) if rows else None
    control_from_column = bool(control_column) and control_column in columns
    sidecars = {image.resolve(): control for image, control in controls.items()}
    listed: set[Path] = set()
    for row in rows:
        image = (root / str(row.get("file_name", ""))).resolve()
        listed.add(image)
        if not image.is_file():
            yield SkippedFile(str(image), f"listed in {metadata.name} but not found; fix file_name or the row")
            continue
        control: Path | None = sidecars.get(image)
        if control_from_column and row.get(control_column):
            control = (root / str(row[control_column])).resolve()
            listed.add(control)
            if not control.is_file():
                yield SkippedFile(str(image), f"its control image {control} (column {control_column!r}) is missing")
                continue
        yield _Candidate(
            key=Path(os.path.relpath(image, root.resolve())).as_posix(),
            path=str(image),
            caption=_caption_text(row.get(caption_key)) if caption_key else "",
            image_bytes=FileBytes(str(image)),
            control_path=str(control) if control else None,
            control_bytes=FileBytes(str(control)) if control else None,
        )
    for image in images:
        if image.resolve() not in listed:
            yield SkippedFile(str(image), f"not listed in {metadata.name} (imagefolder ignores it too); "
                                          "add a row for it or move it out of the folder")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _load_hf(data_cfg: Any, source: str) -> tuple[Any, str]:
    import datasets  # heavy, and only needed for these two sources

    split = data_cfg.split
    if source == "hf_disk":
        path = str(_require(data_cfg, "path", source))
        try:
            loaded = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as exc:
            raise DataSourceError(f"cannot load a saved dataset from {path!r} ({exc}); data.path must be a folder "
                                  "written by Dataset.save_to_disk") from exc
        where = path
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataSourceError(f"{path} has splits {list(loaded)}, not {split!r}; set data.split")
            loaded = loaded[split]
        return loaded, where
    name = data_cfg.name or _require(data_cfg, "path", source)
    try:
        loaded = datasets.load_dataset(str(name), split=split)
    except Exception as exc:  # hub/network/builder errors come in many types; all mean "could not load"
        raise DataSourceError(
            f"cannot load hub dataset {name!r} split {split!r} ({type(exc).__name__}: {exc}). Check the name; "
            "without network it must already be in the Hugging Face cache (or save it with save_to_disk and use "
            "source: hf_disk)"
        ) from exc
    return loaded, f"{name}[{split}]"


def _cell_bytes(cell: Any) -> bytes:
    if cell is None:
        raise ValueError("empty image cell")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str):
        return FileBytes(cell)()
    if isinstance(cell, Mapping):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        if cell.get("path"):
            return FileBytes(str(cell["path"]))()
        raise ValueError("image cell has neither bytes nor path")
    raise ValueError(f"unsupported image cell type {type(cell).__name__}; store images with datasets.Image()")


def _dataset_candidates(
    dataset: Any, where: str, image_column: str, caption_column: str | None, control_column: str | None
) -> Iterator[_Candidate | SkippedFile]:
    from datasets import Image as ImageFeature

    columns = list(dataset.column_names)
    if image_column not in columns:
        raise DataSourceError(f"{where} has no image column {image_column!r}; columns are {columns}; "
                              "set data.image_column")
    if control_column and control_column not in columns:
        raise DataSourceError(f"{where} has no control column {control_column!r}; columns are {columns}")
    caption_key = _resolve_caption_column(columns, caption_column, where)
    for column in (image_column, control_column):
        # Undecoded cells give the original bytes: hashable, and each bad image reported instead of raising.
        if column and isinstance(dataset.features[column], ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    for index, row in enumerate(dataset):
        path = f"{where} row {index}"
        control = control_column is not None and row.get(control_column) is not None
        yield _Candidate(
            key=f"{index:08d}",
            path=path,
            caption=_caption_text(row.get(caption_key)) if caption_key else "",
            image_bytes=DatasetCellBytes(dataset, index, image_column),
            control_path=f"{path} column {control_column}" if control else None,
            control_bytes=DatasetCellBytes(dataset, index, control_column) if control else None,  # type: ignore[arg-type]
        )


# ---------------------------------------------------------------------------------------------------------------
# webdataset

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
# webdataset's own split: the key is the path up to the first dot of the file name.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def expand_braces(pattern: str) -> list[str]:
    """Every name a ``{000..009}`` range (several ranges multiply) stands for, zero-padded to the first bound's
    width, in order; a pattern without a range is itself."""
    match = _BRACE_RANGE.search(pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first)
    expanded: list[str] = []
    for number in range(int(first), int(last) + 1):
        expanded += expand_braces(pattern[: match.start()] + str(number).zfill(width) + pattern[match.end():])
    return expanded


def _expand_shards(pattern: str) -> list[str]:
    names = expand_braces(pattern)
    if len(names) > 1:
        return [shard for name in names for shard in _expand_shards(name)]
    if os.path.isdir(pattern):
        return sorted(glob.glob(os.path.join(pattern, "*.tar")))
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern))
    return [pattern] if os.path.exists(pattern) else []


def _tar_groups(tar_path: str) -> dict[str, dict[str, tarfile.TarInfo]]:
    try:
        archive = tarfile.open(tar_path, "r:")  # plain tar only: members are then readable by offset
    except tarfile.ReadError as exc:
        raise DataSourceError(
            f"{tar_path} is not a plain tar ({exc}); webdataset image shards are uncompressed .tar files "
            "(decompress it, e.g. with gunzip)"
        ) from exc
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    with archive:
        for member in archive.getmembers():
            base = os.path.basename(member.name)
            if not member.isfile() or base.startswith((".", "_")):
                continue
            match = _KEY_AND_EXTENSION.match(member.name)
            if match:
                groups.setdefault(match.group(1), {})[match.group(2).lower()] = member
    return groups


def _first_image(group: Mapping[str, tarfile.TarInfo], prefix: str = "") -> tarfile.TarInfo | None:
    for extension in WEBDATASET_IMAGE_EXTENSIONS:
        if prefix + extension in group:
            return group[prefix + extension]
    return None


def _webdataset_candidates(
    pattern: str, caption_column: str | None, control_column: str | None
) -> Iterator[_Candidate | SkippedFile]:
    shards = _expand_shards(pattern)
    if not shards and "://" in pattern:
        raise DataSourceError(f"{pattern!r} is a URL: shards at URLs are read as a stream; set data.streaming: true "
                              "and cache.mode: none")
    if not shards:
        raise DataSourceError(f"no .tar shards match {pattern!r}; data.path takes a glob, a folder or a {{000..009}} range")
    caption_extension = (caption_column or "txt").lower()
    suffixes = _control_suffixes(control_column)
    for shard in shards:
        groups = _tar_groups(shard)
        control_keys = {k for k in groups for x in suffixes if k.endswith(x) and k[: -len(x)] in groups}
        for key in sorted(groups):
            if key in control_keys:
                continue
            group = groups[key]
            image = _first_image(group)
            path = f"{shard}::{key}"
            if image is None:
                yield SkippedFile(path, f"no .jpg/.png/.webp member for this key (has {sorted(group)})")
                continue
            caption = ""
            if caption_extension in group:
                text_member = group[caption_extension]
                raw = TarMemberBytes(shard, text_member.offset_data, text_member.size)()
                caption = raw.decode("utf-8", errors="replace").strip()
            control = None
            if control_column:
                control = _first_image(group, control_column.lstrip(".") + ".")
            if control is None and control_column and key + control_column in control_keys:
                control = _first_image(groups[key + control_column])
            yield _Candidate(
                key=key,
                path=f"{shard}::{image.name}",
                caption=caption,
                image_bytes=TarMemberBytes(shard, image.offset_data, image.size),
                control_path=f"{shard}::{control.name}" if control else None,
                control_bytes=TarMemberBytes(shard, control.offset_data, control.size) if control else None,
            )
