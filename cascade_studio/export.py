"""``cascade-studio export``: turn a run's (or a checkpoint's) adapter into a file other tools load.

Checkpoints store adapter tensors in the method's own layout plus metadata (method, rank, alpha, ...), so an
export is a pure tensor conversion: no base model is loaded, which keeps exporting a 3.6B run instant.
"""
from __future__ import annotations

from pathlib import Path

from .adapters import catalog
from .adapters.base import AdapterMismatchError
from .adapters.files import load_adapter_tensors
from .run_folder import ADAPTER_FILE, RunFolder


def find_adapter_tensors(source: str | Path) -> Path:
    """The adapter tensors of a run folder (its latest good checkpoint) or of a checkpoint folder."""
    source = Path(source)
    if source.is_file():
        return source
    if (source / ADAPTER_FILE).exists():
        return source / ADAPTER_FILE
    run = RunFolder(source)
    # verified, and without cleaning up: the run may be saving a checkpoint right now
    latest = run.latest_checkpoint(verify=True)
    if latest is not None:
        return latest / ADAPTER_FILE
    exports = [p for p in run.exported_adapters() if p.is_file()]
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
    out = Path(out) if out else _default_out(Path(source), tensors_path, metadata, export_format)
    return method.load().export_tensors(tensors, metadata, export_format.name, out)


def _default_out(source: Path, tensors_path: Path, metadata: dict, export_format) -> Path:
    """A run folder's export goes to its ``export/``; a checkpoint's to its run's ``export/`` with the step in the
    name (never into the checkpoint itself); a loose file's to ``export/`` beside it."""
    step = None
    if source.is_dir() and source != tensors_path.parent:  # a run folder (its latest checkpoint or export)
        run = RunFolder(source)
    elif (checkpoint := RunFolder.of_checkpoint(tensors_path.parent)) is not None:  # a checkpoint or its file
        run, step = checkpoint
    else:
        run = RunFolder(tensors_path.parent)
    stem = run.export_stem(step=step, run_name=metadata.get("cascade_studio.recipe_name"))
    return export_format.target(run.export_dir, stem)
