"""Data page: look at a dataset folder the way a run will read it (images with captions, skipped files with
reasons, encode-cache status) and prepare it: edit one caption, find/replace in every caption, prepend a trigger
word, list the images without a caption, preview the aspect-ratio buckets and the training crop. Folders must pass
the studio's path policy (``paths.py``): the workspace, the repository's datasets/ (read-only here), the Hugging
Face cache or a folder named with ``cascade-studio ui --allow-path``. Caption edits are written where the run
reads them, atomically (``data/captions.py``)."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import streamlit as st

from ..config import RecipeError, load_recipe
from .common import workspace
from .data_view import (ScanView, bucket_counts, bucket_size, cache_contexts, cached_count, captions_of, cropped,
                        dataset_folders, read_only_reason, scan_folder, training_size)
from .paths import RELATIVE_PATHS_HELP, PathNotAllowed
from .workspace import Workspace

COLUMNS = 4
_FLASH = "data_flash"


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
                          help=f"{RELATIVE_PATHS_HELP} Or an absolute path inside an allowed folder; '..' is not "
                               "accepted.")
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
    if _FLASH in st.session_state:
        st.success(st.session_state.pop(_FLASH))
    a, b, c = st.columns(3)
    a.metric("Usable images", len(view.images))
    b.metric("Skipped files", len(view.skipped))
    c.metric("Without caption", view.missing_captions)
    images_tab, captions_tab, uncaptioned_tab, buckets_tab, skipped_tab, cache_tab = st.tabs(
        ["Images", "Edit captions", f"Without caption ({view.missing_captions})", "Buckets",
         f"Skipped ({len(view.skipped)})", "Cache"])
    with images_tab:
        _grid(view)
    with captions_tab:
        _edit_captions(ws, folder, view)
    with uncaptioned_tab:
        _uncaptioned(folder, view)
    with buckets_tab:
        _buckets(ws, folder, view)
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


def _name(folder: Path, path: str) -> str:
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return Path(path).name


def _write(folder: Path, changes: dict[str, str], what: str) -> None:
    """Write caption changes where the scan read them; say what was written (or why nothing was)."""
    from ..data import DataSourceError
    from ..data.captions import edit_captions

    try:
        written = edit_captions(folder, changes)
    except (OSError, DataSourceError) as exc:
        st.error(f"Not saved: {exc}")
        return
    files = written[0].name if len(written) == 1 else f"{len(written)} caption files"
    st.session_state[_FLASH] = f"{what}: wrote {files}."
    st.rerun()


def _edit_captions(ws: Workspace, folder: Path, view: ScanView) -> None:
    if not view.images:
        st.info("No usable image to caption.")
        return
    reason = read_only_reason(ws, folder)
    if reason:
        st.warning(f"Read-only: {reason}.")
        return
    from ..data.captions import count_matches, transformed, with_trigger  # imports torch (data/): only here

    captions = captions_of(view)
    st.markdown("**One image**")
    paths = list(captions)
    path = st.selectbox("Image", paths, format_func=lambda p: _name(folder, p), key="data_edit_image")
    left, right = st.columns([1, 3])
    left.image(path, width="stretch")
    # The key carries the caption on disk, so after a save (or an edit elsewhere) the box shows the file again.
    text = right.text_area("Caption", value=captions[path], key=f"data_edit_caption-{hash((path, captions[path]))}",
                           help="Written to the image's .txt sidecar, or to its row of metadata.jsonl/csv")
    if right.button("Save caption", key="data_edit_save", disabled=text.strip() == captions[path]):
        _write(folder, {path: text}, f"Saved the caption of {_name(folder, path)}")
    st.markdown("**Find and replace in every caption**")
    a, b = st.columns(2)
    find = a.text_input("Find", key="data_find", help="Plain text, case-sensitive")
    new = b.text_input("Replace with", key="data_replace_with")
    hits, occurrences = count_matches(captions, find)
    if find:
        st.caption(f"{hits} of {len(captions)} captions contain {find!r} ({occurrences} occurrences).")
    if st.button("Replace in all captions", key="data_replace_go", disabled=not hits):
        _write(folder, transformed(captions, lambda c: c.replace(find, new)),
               f"Replaced {find!r} with {new!r} in {hits} captions")
    st.markdown("**Trigger word**")
    trigger = st.text_input("Trigger word", key="data_trigger",
                            help="Put in front of every caption (\"ohwx, a red circle\"); captions that already "
                                 "start with it are left alone, so adding it twice changes nothing")
    changes = transformed(captions, lambda c: with_trigger(c, trigger))
    if trigger.strip():
        st.caption(f"Would change {len(changes)} of {len(captions)} captions "
                   f"({len(captions) - len(changes)} already start with it).")
    if st.button("Prepend to all captions", key="data_trigger_go", disabled=not changes):
        _write(folder, changes, f"Prepended {trigger.strip()!r} to {len(changes)} captions")


def _uncaptioned(folder: Path, view: ScanView) -> None:
    missing = [_name(folder, path) for path, caption, _, _ in view.images if not caption]
    if not missing:
        st.success("Every usable image has a caption.")
        return
    st.warning(f"{len(missing)} images have no caption: they train on the empty caption (as unconditional "
               "samples). Caption them on the Edit captions tab.")
    st.dataframe(pd.DataFrame({"image": missing}), hide_index=True)


def _buckets(ws: Workspace, folder: Path, view: ScanView) -> None:
    if not view.images:
        st.info("No usable image.")
        return
    entries = ws.list_recipes()
    labels = [e.label for e in entries]
    label = st.selectbox("Recipe (for its resolution)", labels, key="data_bucket_recipe")
    try:
        data = load_recipe(entries[labels.index(label)].path).data
    except RecipeError as exc:
        st.error(f"This recipe does not validate, so its resolution is unknown: {exc}")
        return
    resolution = data.resolution
    st.caption(f"At {resolution} px. This studio's runs train every image at the size below (resized to cover, "
               f"center-cropped); data.buckets is {data.buckets} but the trainer does not group by aspect ratio "
               "yet. The table shows where each image would land with aspect-ratio buckets.")
    counts = pd.DataFrame(bucket_counts(view, resolution), columns=["bucket (HxW)", "aspect h/w", "images"])
    st.dataframe(counts[counts["images"] > 0], hide_index=True)
    st.caption(f"{len(counts)} buckets at this resolution; {int((counts['images'] > 0).sum())} hold images.")
    paths = [path for path, _, _, _ in view.images]
    path = st.selectbox("Image to crop", paths, format_func=lambda p: _name(folder, p), key="data_crop_image")
    _, _, width, height = next(item for item in view.images if item[0] == path)
    trained = training_size(data, width, height)
    bucket = bucket_size(resolution, width, height)
    a, b, c = st.columns(3)
    a.image(path, caption=f"original {width}x{height}", width="stretch")
    b.image(cropped(path, trained), caption=f"as trained: {trained[0]}x{trained[1]}", width="stretch")
    c.image(cropped(path, bucket), caption=f"in its bucket: {bucket[0]}x{bucket[1]}", width="stretch")
