"""Path confinement for the studio: every file path a user types or picks goes through here.

The studio is a local web app, but a browser tab is still an input channel: a pasted path must not make it read,
list or write files outside the folders it owns. The rules, in order:

- empty text, NUL bytes and ``..`` components are refused outright (even when ``..`` would resolve back inside:
  the brief is "no escapes", and a path that climbs is never what a dataset picker means);
- relative paths are taken relative to a base folder (the repository root or the workspace), absolute paths are
  accepted only when they already lie inside an allowed root;
- containment is checked on the *resolved* path (symlinks followed), so a link inside the workspace pointing at
  ``/etc`` is refused too.

On top of :func:`confine` sits the studio's one policy for every path a *run* will read or write
(:class:`PathPolicy`, issue 17 item 8): the Data page, the Launch page's recipe and overrides, and the job runner's
last check before a run starts all ask it, so a path refused in one place is refused everywhere, with one
message. Allowed are the workspace, the repository's sample ``datasets/``, the Hugging Face hub cache (where
``model.repo_id`` weights are read) and the folders named with ``cascade-studio ui --allow-path DIR``.

Pure functions, no Streamlit, no torch: tested directly in ``tests/test_ui_paths.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Iterator, Mapping, Optional, Sequence

__all__ = ["ALLOW_PATHS_ENV", "NAME_RULE", "RELATIVE_PATHS_HELP", "PathNotAllowed", "PathPolicy", "allowed_paths_from_env", "confine", "hf_hub_cache",
           "is_inside", "path_settings", "safe_filename"]

# Where a relative path starts, said the same way on every page and in every path setting's tooltip: the studio
# runs from the repository root and starts every job there (workspace.ensure_repo_cwd, PathPolicy.base).
RELATIVE_PATHS_HELP = ("In the studio, relative paths start at the repository root (where the studio and every job "
                       "it starts run), e.g. datasets/tiny-shapes.")

# Set by ``cascade-studio ui --allow-path DIR`` (os.pathsep-separated); inherited by the job runners it starts.
ALLOW_PATHS_ENV = "CASCADE_STUDIO_ALLOW_PATHS"


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


# ------------------------------------------------------------------------------------------- the policy
def allowed_paths_from_env(environ: Mapping[str, str] = os.environ) -> tuple[Path, ...]:
    """The ``--allow-path`` folders the studio was started with (resolved; empty items ignored)."""
    items = environ.get(ALLOW_PATHS_ENV, "").split(os.pathsep)
    return tuple(Path(os.path.realpath(os.path.expanduser(item))) for item in items if item.strip())


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache this process reads ``repo_id`` weights from: huggingface_hub's own constant,
    which honours ``HF_HUB_CACHE`` and ``HF_HOME`` (read when huggingface_hub is first imported)."""
    from huggingface_hub import constants

    return Path(os.path.realpath(os.path.expanduser(constants.HF_HUB_CACHE)))


@functools.lru_cache(maxsize=None)
def path_settings() -> dict[str, bool]:
    """Every recipe setting declared with ``setting(..., path=True)``, as ``dotted name -> may name a hub repo``.

    Read from the schema's field metadata (``path``, and ``weights`` for settings that also accept a Hugging Face
    repo id), so a method's new path setting is checked without anyone listing it here.
    """
    from ..config.schema import Recipe, is_section, section_types

    found: dict[str, bool] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = section_types(cls)
        for f in dataclasses.fields(cls):
            if is_section(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            elif f.metadata.get("path"):
                found[prefix + f.name] = bool(f.metadata.get("weights"))

    walk(Recipe, "")
    return found


# A Hugging Face repo id, "namespace/name" (the form models/loading.py sends to the hub when no such local path
# exists); a weight-file suffix makes it a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
_MAX_MATCHES = 2000  # glob/brace expansions checked per value (a shard list is rarely longer)


@dataclass(frozen=True)
class PathPolicy:
    """Which folders the studio lets a run (and its own pages) read and write, and the one refusal message.

    ``base`` is where relative paths start: the repository root, the working directory of every job the studio
    starts (and of ``cascade-studio train`` run from a checkout). ``allowed`` are the ``--allow-path`` roots.
    """

    workspace: Path
    base: Path
    datasets: Optional[Path] = None
    allowed: tuple[Path, ...] = ()
    hub_cache: Optional[Path] = None

    def roots(self) -> list[tuple[str, Path]]:
        """(what it is, folder) for every allowed root, in the order the message lists them."""
        named = [("the workspace", self.workspace)]
        if self.datasets is not None:
            named.append(("the sample datasets", self.datasets))
        named += [("--allow-path", root) for root in self.allowed]
        if self.hub_cache is not None:
            named.append(("the Hugging Face cache", self.hub_cache))
        return named

    def describe(self) -> str:
        return "; ".join(f"{what} {root}" for what, root in self.roots())

    def refusal(self, text: str, resolved: Optional[Path], setting: str = "") -> PathNotAllowed:
        """The one message: what was refused, which roots are allowed, how to allow another."""
        where = f"{setting}: " if setting else ""
        target = f" (resolves to {resolved})" if resolved is not None and str(resolved) != text else ""
        folder = resolved if resolved is not None and (resolved.is_dir() or not resolved.exists()) \
            else (resolved.parent if resolved is not None else Path("DIR"))
        return PathNotAllowed(f"{where}{text!r}{target} is outside the folders the studio may use ({self.describe()})."
                              f" To use it, restart the studio with: cascade-studio ui --allow-path {folder}")

    def resolve(self, text: str) -> Path:
        """Where a run started in ``base`` finds ``text`` (``~`` expanded, symlinks followed; need not exist)."""
        path = Path(os.path.expanduser(text))
        return Path(os.path.realpath(path if path.is_absolute() else self.base / path))

    def check(self, text: str | os.PathLike[str], setting: str = "") -> Path:
        """The resolved path of ``text`` if it lies inside an allowed root; raises :class:`PathNotAllowed`."""
        text = os.fspath(text).strip()
        if not text:
            raise PathNotAllowed(f"{setting + ': ' if setting else ''}the path is empty; give a folder inside "
                                 f"{self.describe()}")
        if "\x00" in text:
            raise PathNotAllowed(f"{setting + ': ' if setting else ''}the path contains a NUL character")
        # Brace groups count as separators too: "{..,x}" would expand to a climbing path.
        if ".." in re.split(r"[\\/{},]+", text):
            raise PathNotAllowed(f"{setting + ': ' if setting else ''}{text!r} climbs out with '..'; give the path "
                                 f"without '..' ({self.describe()})")
        resolved = self.resolve(text)
        if not self._inside(resolved):
            raise self.refusal(text, resolved, setting)
        return resolved

    def _inside(self, resolved: Path) -> bool:
        return any(is_inside(resolved, root) for _, root in self.roots())

    def check_setting(self, setting: str, value: Any, hub_id_ok: bool = False) -> None:
        """Check one recipe value as the run will use it; raises :class:`PathNotAllowed`.

        A weights setting (``hub_id_ok``) naming no local file but shaped like ``org/name`` is a hub repo id,
        read from the hub cache. Shard patterns (``{000..009}``, ``*``) are checked for every file they match.
        """
        if not isinstance(value, str) or not value.strip():
            return  # null, or a wrong type the recipe validation reports
        text = value.strip()
        if text.startswith("pipe:"):
            raise PathNotAllowed(f"{setting}: {text!r} runs a shell command; the studio only reads files and "
                                 f"folders inside {self.describe()}")
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
            if not text.lower().startswith("file://"):
                return  # a remote URL (http, s3...): nothing on this machine is read or written
            text = text[len("file://"):]
        if hub_id_ok and _HUB_ID.match(text) and not text.lower().endswith(_WEIGHT_SUFFIXES) \
                and not os.path.lexists(self.base / text):
            return
        self.check(text, setting)
        for candidate in itertools.islice(self._expansions(text), _MAX_MATCHES):
            resolved = self.resolve(candidate)
            if not self._inside(resolved):
                raise self.refusal(text, resolved, setting)

    def _expansions(self, text: str) -> Iterator[str]:
        """Brace alternatives and glob matches of a shard pattern (none for a plain path)."""
        if "{" not in text and not glob.has_magic(text):
            return
        from ..config.loader import _expand_braces  # the loader's own expansion: what the run reads

        for pattern in _expand_braces(os.path.expanduser(text), limit=_MAX_MATCHES):
            yield pattern
            if glob.has_magic(pattern):
                absolute = pattern if os.path.isabs(pattern) else str(self.base / pattern)
                yield from glob.iglob(absolute)

    def recipe_problems(self, data: Any) -> list[Any]:
        """A :class:`~cascade_studio.config.Problem` for every path setting of parsed recipe ``data`` (the
        file's YAML with the overrides applied) that this policy refuses."""
        from ..config import Problem

        problems = []
        for dotted, hub_id_ok in path_settings().items():
            value = data
            for part in dotted.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            try:
                self.check_setting(dotted, value, hub_id_ok)
            except PathNotAllowed as exc:
                message = str(exc)
                message = message[len(dotted) + 2:] if message.startswith(dotted + ": ") else message
                problems.append(Problem(dotted, value, message))
        return problems


# Letters, digits, dot, dash and underscore: portable on every filesystem and safe in a URL or an argv item.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# The rule above in words, as Markdown (every page renders messages and tooltips as Markdown: code spans keep the
# characters literal, where a bare '_' or '\\' is eaten).
NAME_RULE = "letters, digits, `.`, `-` and `_`"
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
        raise PathNotAllowed(f"`{name}` has no usable characters for a file name; use {NAME_RULE}")
    result = stem + suffix
    assert PurePath(result).name == result  # nothing above can produce a separator; keep it that way
    return result
