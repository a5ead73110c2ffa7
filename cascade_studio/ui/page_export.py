"""Export page: turn a run's adapter (its latest checkpoint, or a chosen one) into a file other tools load, and
download it. The export runs as ``cascade-studio export`` in a subprocess: it is a tensor conversion that needs
torch (``export.py`` imports the adapter file helpers), which the studio's own process never imports."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import streamlit as st

from ..adapters import catalog
from ..adapters.catalog import ExportFormat
from ..run_folder import RunFolder
from .commands import export_argv
from .common import workspace
from .paths import PathNotAllowed
from .runs_data import adapter_files, checkpoint_dirs, run_method, zip_folder
from .workspace import Workspace

EXPORT_TIMEOUT_S = 600


def export_target(run_dir: Path, fmt: ExportFormat, step: int) -> Path:
    """Where an export goes: ``<run>/export/<run>-step<N>-<format>[.safetensors]`` (a folder format has no
    suffix). The step is in the name so an export never overwrites the file the run itself wrote when it
    finished."""
    run = RunFolder(run_dir)
    return fmt.target(run.export_dir, run.export_stem(step=step))


def run_export(ws: Workspace, source: Path, fmt: str, out: Path) -> tuple[bool, str]:
    """Run the export command; (ok, output tail for the user)."""
    argv = export_argv(ws, source, fmt, out)
    try:
        done = subprocess.run(argv, cwd=ws.repo_root, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"the export took longer than {EXPORT_TIMEOUT_S} s and was stopped"
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
    return done.returncode == 0 and out.exists(), tail


def render() -> None:
    ws = workspace()
    st.title("Export")
    runs = [d for d in ws.run_dirs() if checkpoint_dirs(d)]
    if not runs:
        st.info("No run with a checkpoint yet: train one on the Launch page.")
        return
    names = {str(d): d.name for d in runs}
    run_dir = Path(st.selectbox("Run", list(names), format_func=names.get, key="exp_run"))
    method_name = run_method(run_dir)
    if method_name not in catalog.names():
        st.error(f"This run's recipe names the adapter method {method_name!r}, which this studio does not know "
                 f"({', '.join(catalog.names())}); export it with the version of cascade-studio that trained it.")
        return
    method = catalog.get(method_name)
    steps = checkpoint_dirs(run_dir)
    labels = [f"step {s}" for s in reversed(steps)]  # newest first: the default is the latest checkpoint
    step = int(st.selectbox("Adapter from checkpoint", labels, key=f"exp_src-{run_dir.name}").split()[1])
    source = steps[step]
    fmt = st.selectbox("Format", method.format_names, key=f"exp_fmt-{method.name}",
                       help="; ".join(f"{f.name}: {f.doc}" for f in method.formats))
    out = export_target(run_dir, method.export_format(fmt), step)
    st.caption(f"{method.label} → `{out}`")
    if st.button("Export", type="primary", key="exp_go"):
        with st.spinner("Exporting..."):
            try:
                ok, tail = run_export(ws, source, fmt, out)
            except (PathNotAllowed, ValueError) as exc:
                ok, tail = False, str(exc)
        if ok:
            st.success(f"Exported {out.name}")
        else:
            st.error("The export failed; its output says why:")
            st.code(tail or "(no output)", language=None)
    files = adapter_files(run_dir)
    if files:
        st.subheader("Exported files")
    for path in files:
        if path.is_dir():
            st.download_button(f"Download {path.name}.zip", data=functools.partial(zip_folder, path),
                               file_name=f"{path.name}.zip", mime="application/zip", on_click="ignore",
                               key=f"exp-dl-{path.name}")
        else:
            st.download_button(f"Download {path.name} ({path.stat().st_size / 1e6:.1f} MB)",
                               data=functools.partial(path.read_bytes), file_name=path.name,
                               mime="application/octet-stream", on_click="ignore", key=f"exp-dl-{path.name}")
