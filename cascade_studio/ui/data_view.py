"""What the Data page shows about a dataset folder: the usable images with captions, the files the loader would
skip (and why), and the encode cache's status. No Streamlit here.

Scanning uses the trainer's own :func:`cascade_studio.data.scan_source`, so "skipped" means exactly what a run
would skip; that package imports torch, so it is imported inside the functions that scan (STYLE.md habit 10).

Cache status needs the encoders' identities (architecture + a hash of their weights), which take torch and the
loaded models to compute. The studio does not load models, so the status is only known once a run has recorded
the identities it used: a ``cache`` event in its ``events.jsonl`` with ``encoder_identities``, ``preprocessing``,
``data_path`` and ``cache_dir``. Until then it is "unknown until the first run".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config.schema import DataConfig
from ..trainers.events import read_events
from .paths import PathNotAllowed, is_inside
from .workspace import Workspace

__all__ = ["ScanView", "scan_folder", "CacheContext", "cache_contexts", "cached_count", "dataset_folders",
           "read_only_reason", "captions_of", "bucket_counts", "training_size", "bucket_size", "cropped"]


@dataclass(frozen=True)
class ScanView:
    """A folder's scan as plain data (cacheable by Streamlit, safe to pickle)."""

    images: tuple[tuple[str, str, int, int], ...]  # (path, caption, width, height)
    skipped: tuple[tuple[str, str], ...]  # (path, reason)
    missing_captions: int
    error: Optional[str] = None  # the loader's own message when nothing usable is left


def scan_folder(folder: Path) -> ScanView:
    """Scan an image folder (captions as .txt sidecars or metadata.jsonl/csv) as a training run would."""
    from ..data import DataSourceError, EmptyDatasetError, scan_source  # imports torch: only when scanning

    try:
        result = scan_source(DataConfig(source="folder", path=str(folder)))
    except EmptyDatasetError as exc:
        return ScanView((), (), 0, error=str(exc))
    except DataSourceError as exc:
        return ScanView((), (), 0, error=str(exc))
    images = tuple((r.path, r.caption, r.width, r.height) for r in result.records)
    skipped = tuple((s.path, s.reason) for s in result.skipped)
    return ScanView(images, skipped, result.missing_captions)


def dataset_folders(workspace: Workspace) -> list[Path]:
    """Candidate dataset folders: each folder in the repository's datasets/ and the workspace's datasets/."""
    found = []
    for root in (workspace.datasets_dir, workspace.root / "datasets"):
        if root.is_dir():
            found += sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return found


@dataclass(frozen=True)
class CacheContext:
    """The encoders and preprocessing one run cached a folder with."""

    run_name: str
    encoder_identities: tuple[str, ...]
    preprocessing: dict[str, Any]
    cache_dir: Path


def cache_contexts(workspace: Workspace, folder: Path) -> list[CacheContext]:
    """Every recorded way this folder was cached (newest run first), from the runs' ``cache`` events."""
    found: list[CacheContext] = []
    folder = folder.resolve()
    for run_dir in workspace.run_dirs():
        for event in reversed(read_events(run_dir)):
            if event.get("event") != "cache" or not event.get("encoder_identities"):
                continue
            try:
                same = Path(str(event.get("data_path", ""))).resolve() == folder
            except (OSError, ValueError):
                same = False
            if same:
                found.append(CacheContext(run_dir.name, tuple(event["encoder_identities"]),
                                          dict(event.get("preprocessing") or {}),
                                          Path(str(event.get("cache_dir") or workspace.root / "cache"))))
                break
    return found


def cached_count(folder: Path, context: CacheContext) -> tuple[int, int]:
    """(images already cached, images) of ``folder`` for one run's encoders (reads the shard indexes only)."""
    from ..data import cache_status, scan_source  # imports torch: only when asked

    records = scan_source(DataConfig(source="folder", path=str(folder))).records
    return cache_status(records, list(context.encoder_identities), context.cache_dir, context.preprocessing)


# ------------------------------------------------------------------------------------------- editing captions
def read_only_reason(workspace: Workspace, folder: Path) -> Optional[str]:
    """Why the Data page may not edit ``folder``'s captions (None: it may). The folder already passed the path
    policy; the repository's sample datasets stay as shipped (the tests and the demo train on them)."""
    try:
        workspace.policy().check(str(folder))
    except PathNotAllowed as exc:
        return str(exc)
    if is_inside(folder, workspace.datasets_dir):
        return (f"{folder} is one of the repository's sample datasets, kept as shipped; copy it into "
                f"{workspace.root / 'datasets'} to edit its captions")
    return None


def captions_of(view: ScanView) -> dict[str, str]:
    """Image path -> caption, as the scan read them."""
    return {path: caption for path, caption, _, _ in view.images}


def bucket_counts(view: ScanView, resolution: int) -> list[tuple[str, float, int]]:
    """(bucket "HxW", aspect h/w, images) at ``resolution``, from the same bucket code as the encode cache
    (``data.cache.target_size`` with buckets on), every bucket listed, empty ones too."""
    from ..data import make_buckets, target_size  # imports torch: only when asked

    counts = {size: 0 for size in make_buckets(resolution)}
    for _, _, width, height in view.images:
        counts[target_size(width, height, {"resolution": resolution, "buckets": True})] += 1
    return [(f"{h}x{w}", round(h / w, 3), n) for (h, w), n in counts.items()]


def training_size(data_cfg: DataConfig, width: int, height: int) -> tuple[int, int]:
    """(height, width) a run with this ``data`` section trains an image of this size at."""
    from ..data import target_size, training_preprocessing

    return target_size(width, height, training_preprocessing(data_cfg))


def bucket_size(resolution: int, width: int, height: int) -> tuple[int, int]:
    """(height, width) of the aspect-ratio bucket an image of this size lands in at ``resolution``."""
    from ..data import target_size

    return target_size(width, height, {"resolution": resolution, "buckets": True})


def cropped(path: str, size_hw: tuple[int, int]):
    """The image as the cache encodes it at ``size_hw``: decoded like a run, resized to cover, center-cropped."""
    from ..data import open_image_file, training_crop

    return training_crop(open_image_file(path), size_hw)
