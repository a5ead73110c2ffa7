"""Which filesystem holds a path, and how much room is left on it: for messages about full disks.

A "disk full" message must describe the filesystem of the file that failed, not the one of the current directory
(they differ whenever the workspace, the cache or the exports live on another disk). No imports beyond the
standard library, so tracking, data and trainers can all use it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


def format_bytes(count: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # unreachable


def nearest_existing(path: PathLike) -> Path:
    """``path`` or its nearest parent that exists (a file that failed to be created does not)."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_space(path: PathLike) -> Optional[int]:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent); None if unknown."""
    try:
        return shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return None


def mount_point(path: PathLike) -> Path:
    """The folder where the filesystem holding ``path`` is mounted (the highest parent on the same device)."""
    probe = nearest_existing(path)
    try:
        device = probe.stat().st_dev
        while probe != probe.parent and probe.parent.stat().st_dev == device:
            probe = probe.parent
    except OSError:
        pass
    return probe


def describe_free_space(path: PathLike) -> str:
    """``"12.3 GiB free on the filesystem mounted at /data"`` for the filesystem that holds ``path``."""
    free = free_space(path)
    amount = format_bytes(free) if free is not None else "an unknown amount"
    return f"{amount} free on the filesystem mounted at {mount_point(path)}"


def file_size_limit() -> Optional[int]:
    """This process's file-size limit in bytes (``ulimit -f``), or None when there is none."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)
