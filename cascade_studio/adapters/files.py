"""Reading and writing adapter safetensors files with clear errors (shared by every method)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..devices import to_host
from ..trainers.atomic import FILE_MODE
from .base import AdapterMismatchError


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file; AdapterMismatchError naming the file when it is not one.

    Adapters add two refusals to the shared check (``models.loading.read_safetensors_header``): a missing file
    and a pickle, which is never loaded as an adapter."""
    from ..models.loading import WeightsError
    from ..models.loading import read_safetensors_header as read_header

    path = Path(path)
    if not path.exists():
        raise AdapterMismatchError(f"{path}: no such file")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise AdapterMismatchError(f"{path}: pickled checkpoints are not loaded as adapters (they can run code); "
                                   "convert it to .safetensors first")
    try:
        return read_header(path)
    except WeightsError as exc:
        raise AdapterMismatchError(str(exc)) from None


def load_adapter_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors adapter file, validated first."""
    from safetensors import safe_open

    header = read_safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterMismatchError(f"{path}: could not read tensors ({exc})") from exc
    # A diverged training run's NaN weights would turn every image black or into noise, and say nothing.
    broken = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise AdapterMismatchError(
            f"{path}: {len(broken)} of {len(tensors)} tensors hold NaN or infinite values (first: {broken[0]}), so "
            "it would only draw black or noise; use an earlier checkpoint of its run (cascade-studio export "
            "<run folder>/checkpoints/step-N) or train it again with a lower optimizer.lr")
    return tensors, dict(metadata)


def save_adapter_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write adapter tensors atomically (temporary file + rename), so a kill never leaves half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: to_host(v).contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)  # the user's normal permissions: other tools and users read exported files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
