"""Path confinement for the studio: every file path a user types or picks goes through here.

The studio is a local web app, but a browser tab is still an input channel: a pasted path must not make it read,
list or write files outside the folders it owns. The rules, in order:

- empty text, NUL bytes and ``..`` components are refused outright (even when ``..`` would resolve back inside:
  the brief is "no escapes", and a path that climbs is never what a dataset picker means);
- relative paths are taken relative to a base folder (the repository root or the workspace), absolute paths are
  accepted only when they already lie inside an allowed root;
- containment is checked on the *resolved* path (symlinks followed), so a link inside the workspace pointing at
  ``/etc`` is refused too.

Pure functions, no Streamlit, no torch: tested directly in ``tests/test_ui_paths.py``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePath
from typing import Sequence

__all__ = ["PathNotAllowed", "confine", "is_inside", "safe_filename"]


class PathNotAllowed(ValueError):
    """A path outside the studio's folders (or malformed); the message says where paths may point."""


def is_inside(path: Path, root: Path) -> bool:
    """Whether resolved ``path`` is ``root`` itself or below it (both resolved here)."""
    path, root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return path == root or root in path.parents


def _describe(roots: Sequence[Path]) -> str:
    return " or ".join(str(r) for r in roots)


def confine(candidate: str | os.PathLike[str], roots: Sequence[Path], base: Path | None = None) -> Path:
    """The resolved path of ``candidate`` if it lies inside one of ``roots``; raises :class:`PathNotAllowed`.

    ``base`` is where a relative path starts (default: the first root). The path need not exist.
    """
    if not roots:
        raise ValueError("confine() needs at least one allowed root")
    text = os.fspath(candidate).strip() if not isinstance(candidate, str) else candidate.strip()
    if not text:
        raise PathNotAllowed("the path is empty; type a folder inside " + _describe(roots))
    if "\x00" in text:
        raise PathNotAllowed("the path contains a NUL character; type a plain path")
    text = os.path.expanduser(text) if text.startswith("~") else text
    # Both separators count, so "a\\..\\b" cannot slip through on a POSIX machine either.
    if ".." in re.split(r"[\\/]+", text):
        raise PathNotAllowed(f"{text!r} climbs out with '..'; give the folder's path inside {_describe(roots)} "
                             "without '..'")
    path = Path(text)
    if not path.is_absolute():
        path = (base or roots[0]) / path
    resolved = Path(os.path.realpath(path))
    for root in roots:
        if is_inside(resolved, root):
            return resolved
    raise PathNotAllowed(f"{text!r} is outside the studio's folders; use a path inside {_describe(roots)} "
                         "(copy or move your data there first)")


# Letters, digits, dot, dash and underscore: portable on every filesystem and safe in a URL or an argv item.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 64


def safe_filename(name: str, suffix: str = "") -> str:
    """A file name made from user text: unsafe characters become ``-``, no leading dots, at most 64 characters.

    ``suffix`` (e.g. ``.yaml``) is appended unless already present. Raises ``PathNotAllowed`` if nothing usable
    is left (e.g. ``"../.."``).
    """
    stem = name.strip()
    if suffix and stem.lower().endswith(suffix.lower()):
        stem = stem[: -len(suffix)]
    stem = _UNSAFE.sub("-", stem)
    stem = re.sub(r"-{2,}", "-", stem).strip("-.")  # no hidden files, no "..", no dangling dashes
    stem = stem[:_MAX_NAME].rstrip("-.")
    if not stem:
        raise PathNotAllowed(f"{name!r} has no usable characters for a file name; use letters, digits, '-', '_'")
    result = stem + suffix
    assert PurePath(result).name == result  # nothing above can produce a separator; keep it that way
    return result
