"""Data page: look at a dataset folder the way a run will read it (images with captions, skipped files with
reasons, encode-cache status). Folders must pass the studio's path policy (``paths.py``): the workspace, the
repository's datasets/, the Hugging Face cache or a folder named with ``cascade-studio ui --allow-path``."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import streamlit as st

from .common import workspace
from .data_view import ScanView, cache_contexts, cached_count, dataset_folders, scan_folder
from .paths import PathNotAllowed
from .workspace import Workspace

COLUMNS = 4


@st.cache_data(max_entries=16, show_spinner="Scanning the folder (every image is decoded once)...")
def _scan(folder: str, signature: tuple) -> ScanView:
    del signature  # part of the cache key only: a changed folder is scanned again
    return scan_folder(Path(folder))


def _signature(folder: Path) -> tuple:
    """Cheap change detector: the folder's and its files' modification times and sizes."""
    entries = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file())
    return folder.stat().st_mtime_ns, hash(tuple(entries))


def _display(ws: Workspace, path: Path) -> str:
    """Repository folders by their short relative name (what a recipe's data.path says), others in full."""
    try:
        return str(path.relative_to(ws.repo_root))
    except ValueError:
        return str(path)


def render() -> None:
    ws = workspace()
    st.title("Data")
    st.caption(f"Dataset folders may be in: {ws.policy().describe()} (start the studio with `--allow-path DIR` to "
               "add one). A folder holds images with .txt captions beside them, or a metadata.jsonl/csv (the Hugging "
               "Face imagefolder layout).")
    folders = dataset_folders(ws)
    labels = [_display(ws, p) for p in folders]
    picked = st.selectbox("Dataset folder", labels, key="data_pick", index=0 if labels else None,
                          placeholder="no folder found: type one below")
    typed = st.text_input("Or type a folder path", key="data_typed",
                          help="Relative to the repository root (e.g. datasets/tiny-shapes), or absolute inside "
                               "an allowed folder. '..' is not accepted.")
    text = typed.strip() or (picked or "")
    if not text:
        st.info("Choose or type a dataset folder.")
        return
    try:
        folder = ws.confine_data(text)
    except PathNotAllowed as exc:
        st.error(f"Not allowed: {exc}")
        return
    if not folder.is_dir():
        st.error(f"{folder} is not a folder; type the folder that holds the images (e.g. datasets/tiny-shapes).")
        return
    view = _scan(str(folder), _signature(folder))
    if view.error:
        st.error(view.error)
    a, b, c = st.columns(3)
    a.metric("Usable images", len(view.images))
    b.metric("Skipped files", len(view.skipped))
    c.metric("Without caption", view.missing_captions)
    images_tab, skipped_tab, cache_tab = st.tabs(["Images", f"Skipped ({len(view.skipped)})", "Cache"])
    with images_tab:
        _grid(view)
    with skipped_tab:
        if view.skipped:
            st.warning("A run leaves these files out:")
            st.dataframe(pd.DataFrame(view.skipped, columns=["file", "reason"]), hide_index=True)
        else:
            st.success("No file would be skipped.")
    with cache_tab:
        _cache(ws, folder, len(view.images))


def _grid(view: ScanView) -> None:
    if not view.images:
        st.info("No usable image in this folder.")
        return
    per_page = st.selectbox("Images per page", [12, 24, 48], key="data_per_page")
    pages = max(1, math.ceil(len(view.images) / per_page))
    page = int(st.number_input(f"Page (of {pages})", min_value=1, max_value=pages, value=1, step=1,
                               key="data_page"))
    shown = view.images[(page - 1) * per_page: page * per_page]
    for start in range(0, len(shown), COLUMNS):
        for column, (path, caption, width, height) in zip(st.columns(COLUMNS), shown[start:start + COLUMNS]):
            with column:
                st.image(path, caption=caption or "(no caption)", width="stretch")
                st.caption(f"{Path(path).name} · {width}x{height}")


def _cache(ws: Workspace, folder: Path, n_images: int) -> None:
    contexts = cache_contexts(ws, folder)
    if not contexts:
        st.info("Cache status: unknown until the first run. A cache entry is keyed by the encoders' weight "
                "hashes, which need the models loaded (the studio does not load them); the first run that trains "
                f"on this folder encodes every image once into {ws.root / 'cache'} and later runs reuse them.")
        return
    for context in contexts:
        cached, total = cached_count(folder, context)
        st.progress(cached / total if total else 0.0,
                    text=f"{cached} of {total} images cached for the encoders of run {context.run_name} "
                         f"(resolution {context.preprocessing.get('resolution', '?')})")
