"""The Compare page's inputs from outside its form: adapter files uploaded or named by a path, and comparison
settings saved in the workspace and opened again.

- An uploaded adapter file is checked to be a safetensors file (its header read, nothing else) and saved, atomically,
  into ``<workspace>/adapters/``; a path is accepted when the studio's path policy allows it (``paths.py``: the
  workspace, the sample datasets, the ``--allow-path`` folders and the Hugging Face cache).
- Saved settings are the comparison's request (columns with their strengths, prompts, seeds, model, decoder,
  steps) as a small JSON file in ``<workspace>/compare-settings/<name>.json``; opening one drops what no longer
  exists (a deleted run) and says so.

Pure functions, no Streamlit, no torch.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

from ..trainers.atomic import atomic_write_bytes, atomic_write_text
from .commands import Column, CompareRequest
from .paths import safe_filename
from .workspace import Workspace

__all__ = ["ADAPTER_SUFFIX", "SETTINGS_VERSION", "add_adapter_path", "adapter_files_in_workspace",
           "load_settings", "save_settings", "save_uploaded_adapter", "saved_settings"]

ADAPTER_SUFFIX = ".safetensors"
SETTINGS_VERSION = 1
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


def _check_safetensors(data: bytes, name: str) -> None:
    """Raise ``ValueError`` unless ``data`` starts like a safetensors file (8-byte length + a JSON header)."""
    problem = f"{name} is not a safetensors adapter file"
    if len(data) < 8:
        raise ValueError(f"{problem} (only {len(data)} bytes); upload the .safetensors file the trainer exported")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(_MAX_HEADER, len(data) - 8):
        raise ValueError(f"{problem} (its header is cut off or damaged); upload the file again")
    try:
        header = json.loads(data[8:8 + length])
    except ValueError:
        raise ValueError(f"{problem} (its header is not JSON); upload the .safetensors file itself") from None
    if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
        raise ValueError(f"{problem} (it holds no tensors)")


def save_uploaded_adapter(workspace: Workspace, filename: str, data: bytes) -> Path:
    """Save an uploaded adapter file into ``<workspace>/adapters/``; returns its path.

    The same file uploaded twice is saved once; another file of the same name gets ``-2``, ``-3``... Raises
    ``ValueError`` (what to do) for a file that is not safetensors.
    """
    name = safe_filename(filename, ADAPTER_SUFFIX)
    _check_safetensors(data, filename)
    folder = workspace.adapters_dir
    folder.mkdir(parents=True, exist_ok=True)
    stem, n = name[:-len(ADAPTER_SUFFIX)], 1
    target = folder / name
    while target.exists():
        if target.read_bytes() == data:
            return target
        n += 1
        target = folder / f"{stem}-{n}{ADAPTER_SUFFIX}"
    return atomic_write_bytes(target, data)


def add_adapter_path(workspace: Workspace, text: str) -> Path:
    """An adapter file (or PEFT folder) named by the user, checked by the studio's path policy; raises
    ``PathNotAllowed`` or ``ValueError`` saying what to do."""
    path = workspace.policy().check(text)
    if not path.exists():
        raise ValueError(f"{text!r} does not exist ({path}); give the path of an adapter file")
    if path.is_file() and path.suffix != ADAPTER_SUFFIX:
        raise ValueError(f"{path.name} is not a {ADAPTER_SUFFIX} file; adapters are loaded from safetensors only")
    if path.is_dir() and not (path / "adapter_model.safetensors").is_file():
        raise ValueError(f"{path} is a folder without adapter_model.safetensors; give an adapter file or a PEFT "
                         "folder")
    return path


def adapter_files_in_workspace(workspace: Workspace) -> list[Path]:
    """The adapter files uploaded into the workspace, by name."""
    folder = workspace.adapters_dir
    return sorted(folder.glob(f"*{ADAPTER_SUFFIX}")) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------ saved settings
def save_settings(workspace: Workspace, name: str, request: CompareRequest) -> Path:
    """Write a comparison's settings (everything but its output folder) as ``compare-settings/<name>.json``,
    replacing a file of that name."""
    settings = {"version": SETTINGS_VERSION, **request.to_args()}
    settings.pop("out", None)  # every run of the settings gets a new output folder
    target = workspace.comparison_settings_dir / safe_filename(name, ".json")
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(target, json.dumps(settings, indent=2) + "\n")


def saved_settings(workspace: Workspace) -> list[Path]:
    folder = workspace.comparison_settings_dir
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def load_settings(workspace: Workspace, path: Path) -> tuple[CompareRequest, list[str]]:
    """Saved settings as a request, and what was dropped from them (columns whose run, checkpoint or file is gone
    or no longer allowed). Raises ``ValueError`` for a file that is not saved comparison settings."""
    try:
        data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("version") != SETTINGS_VERSION:
            raise ValueError(f"version {data.get('version')!r}")
        request = CompareRequest.from_args({**data, "out": ""})
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{Path(path).name} is not comparison settings saved by this studio ({exc}); save them "
                         "again from the Compare page") from None
    kept: list[Column] = []
    dropped: list[str] = []
    for column in request.columns:
        probe = CompareRequest((column,), ("x",), out=str(workspace.comparisons_dir / "probe"))
        problems = probe.problems(workspace)
        if problems:
            dropped.append(f"{column.spec()}: {problems[0]}")
        else:
            kept.append(column)
    return dataclasses.replace(request, columns=tuple(kept)), dropped

