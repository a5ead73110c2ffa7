"""``cascade-studio export``: turn a run's (or a checkpoint's) adapter into a file other tools load.

Checkpoints store adapter tensors in the method's own layout plus metadata (method, rank, alpha, ...), so an
export is a pure tensor conversion: no base model is loaded, which keeps exporting a 3.6B run instant.
"""
from __future__ import annotations

from pathlib import Path

from .adapters import catalog
from .adapters.base import AdapterMismatchError
from .adapters.files import load_adapter_tensors


def find_adapter_tensors(source: str | Path) -> Path:
    """The adapter tensors of a run folder (its latest good checkpoint) or of a checkpoint folder."""
    source = Path(source)
    if source.is_file():
        return source
    if (source / "adapter.safetensors").exists():
        return source / "adapter.safetensors"
    ckpt_dir = source / "checkpoints"
    if ckpt_dir.is_dir():
        from .trainers.checkpoints import CheckpointManager

        latest = CheckpointManager(ckpt_dir).latest()
        if latest is not None:
            return latest / "adapter.safetensors"
    exports = sorted((source / "export").glob("*.safetensors")) if (source / "export").is_dir() else []
    if exports:
        return exports[0]
    raise FileNotFoundError(f"{source}: no checkpoint or exported adapter found; pass a run folder "
                            "(workspace/runs/<name>), a checkpoint folder or an adapter file")


def export_from_run(source: str | Path, fmt: str | None = None, out: str | Path | None = None) -> Path:
    """Write the adapter of ``source`` (run folder, checkpoint folder or checkpoint file) as ``fmt`` (None: its
    method's default format) at ``out`` (None: ``<run>/export/<recipe name>-<format>``)."""
    tensors_path = find_adapter_tensors(source)
    tensors, metadata = load_adapter_tensors(tensors_path)
    name = metadata.get("cascade_studio.method")
    if name is None:
        raise AdapterMismatchError(f"{tensors_path}: no cascade_studio.method in its metadata; was it written by "
                                   "cascade-studio?")
    method = catalog.get(name)
    try:
        export_format = method.export_format(fmt or method.default_format.name)
    except ValueError as exc:
        raise ValueError(f"{exc} (--format)") from None
    run_dir = Path(source) if Path(source).is_dir() else tensors_path.parent
    stem = metadata.get("cascade_studio.recipe_name") or run_dir.name
    out = Path(out) if out else export_format.target(run_dir / "export", stem)
    return method.load().export_tensors(tensors, metadata, export_format.name, out)
