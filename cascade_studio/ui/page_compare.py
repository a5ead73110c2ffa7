"""Compare page: pick the base model, runs, checkpoints and adapter files as columns (each adapter column with its
own strength), prompts and seeds as rows, run ``cascade-studio compare`` as a queued job, and show the grid with
each column's settings from its manifest.json, and any cell at full size. Adapter files can come from outside the
workspace (uploaded into it, or a path the studio's path policy allows), and the settings can be saved and opened
again (``compare_inputs.py``). Every comparison stays on disk under ``<workspace>/compare/`` and can be
downloaded."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shlex
from pathlib import Path
from typing import Any, Optional

import streamlit as st

from ..config import Recipe, describe_fields
from ..diffusion.samplers import get_sampler, sampler_help, sampler_names
from ..models.presets import PRESETS
from .commands import Column, CompareRequest, compare_argv, new_comparison_dir, parse_seeds
from .common import page_link, queue, show_problems, workspace
from .compare_inputs import (add_adapter_path, adapter_files_in_workspace, load_settings, save_settings,
                             save_uploaded_adapter, saved_settings)
from .jobs import ACTIVE, FAILED
from .paths import RELATIVE_PATHS_HELP, PathNotAllowed
from .runs_data import adapter_files, checkpoint_steps, run_preset, run_prompts, zip_folder
from .workspace import Workspace

REFRESH_S = 2.0
_JOB = "compare_job"
_SHOW = "compare_show"
_DEFAULT_PROMPT = "a small red circle"
_DECODERS = ("previewer", "cascade")
_EXTRA_FILES = "cmp_extra_files"  # adapter files added by path this session (outside the workspace's lists)
_UPLOADED = "cmp_uploaded_id"  # the upload already saved (a rerun must not save it again)
_PENDING = "cmp_pending_settings"  # opened settings, applied before the widgets are drawn
_OPEN_FLASH = "cmp_open_flash"
_GRID_SAMPLING = "the grid's"  # a column that samples as the grid does (--sampler/--steps)


def _presets() -> list[str]:
    """The model presets the recipe schema knows (the built-in ones first: they run on a CPU)."""
    choices = next(f.choices for f in describe_fields(Recipe) if f.path == "model.preset") or tuple(PRESETS)
    return sorted(choices, key=lambda p: (not PRESETS[p].built_in, p))


def comparisons(ws: Workspace) -> list[Path]:
    """Finished comparison folders (with a manifest), newest first."""
    if not ws.comparisons_dir.is_dir():
        return []
    found = [p for p in ws.comparisons_dir.iterdir() if (p / "manifest.json").exists()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def render() -> None:
    ws = workspace()
    st.title("Compare")
    _open_saved(ws)
    runs = [d for d in ws.run_dirs() if adapter_files(d) or checkpoint_steps(d)]
    names = {str(d): d.name for d in runs}
    st.subheader("Columns")
    base = st.checkbox("Base model (no adapter)", value=True, key="cmp_base")
    chosen_runs = st.multiselect("Runs (their exported adapter, else the latest checkpoint)", list(names),
                                 format_func=names.get, key="cmp_runs")
    ckpt_options = {f"{d}@{s}": f"{d.name} @ step {s}" for d in runs for s in checkpoint_steps(d)}
    chosen_ckpts = st.multiselect("Checkpoints", list(ckpt_options), format_func=ckpt_options.get, key="cmp_ckpts")
    _add_adapter_file(ws)  # before the file picker: a file added here is picked in the same run
    file_options = {str(p): str(p.relative_to(ws.root)) for d in runs for p in adapter_files(d) if p.is_file()}
    file_options.update({str(p): str(p.relative_to(ws.root)) for p in adapter_files_in_workspace(ws)})
    file_options.update({f: f for f in st.session_state.get(_EXTRA_FILES, []) if f not in file_options})
    chosen_files = st.multiselect("Adapter files", list(file_options), format_func=file_options.get,
                                  key="cmp_files")
    picked = [(Column("run", r), f"run {names[r]}") for r in chosen_runs] \
        + [(Column("ckpt", k.rsplit("@", 1)[0], step=int(k.rsplit("@", 1)[1])), ckpt_options[k]) for k in chosen_ckpts] \
        + [(Column("file", f), file_options[f]) for f in chosen_files]
    columns = ([Column("base")] if base else []) + _strengths(picked)
    columns = _own_sampling(columns, (["base"] if base else []) + [label for _, label in picked])

    first_run = Path(chosen_runs[0]) if chosen_runs else (Path(chosen_ckpts[0].rsplit("@", 1)[0])
                                                          if chosen_ckpts else None)
    st.subheader("Rows and model")
    prompts_default = "\n".join((run_prompts(first_run) if first_run else []) or [_DEFAULT_PROMPT])
    # Keys follow the first chosen run: picking another run brings in its prompts and preset.
    prompts_text = st.text_area("Prompts (one per line)", value=prompts_default, key=f"cmp_prompts-{first_run}",
                                height=90)
    seeds_text = st.text_input("Seeds", value="0", key="cmp_seeds", help="Whole numbers; one row per prompt and seed")
    presets = _presets()
    # a preset with shipped weights (the toy cascade, pretrained) shows real pictures on a CPU
    shipped = [p for p in presets if PRESETS[p].weights == "shipped"]
    preset_default = (run_preset(first_run) if first_run else None) or (shipped or presets)[0]
    a, b, c = st.columns(3)
    preset = a.selectbox("Base model preset", presets, index=presets.index(preset_default)
                         if preset_default in presets else 0, key=f"cmp_preset-{first_run}",
                         help="Must match the preset the adapters were trained on")
    decoder = b.selectbox("Decoder", list(_DECODERS), key="cmp_decoder",
                          help="previewer: fast and small; cascade: Stage B + A, full quality, slow")
    steps = int(c.number_input("Stage C steps", min_value=1, max_value=200, value=20, step=1, key="cmp_steps"))
    log_mlflow = st.checkbox("Also log the grid to MLflow (experiment 'compare')", key="cmp_mlflow")

    prompts = tuple(line.strip() for line in prompts_text.splitlines() if line.strip())
    problems: list[str] = []
    try:
        seeds = parse_seeds(seeds_text)
    except ValueError as exc:
        seeds, problems = (), [str(exc)]
    out = new_comparison_dir(ws, taken=[str(j.run_dir) for j in queue().jobs() if j.status in ACTIVE])
    request = CompareRequest(tuple(columns), prompts, seeds, preset, decoder, steps, log_mlflow, str(out))
    problems += request.problems(ws)
    if problems:
        show_problems(problems)
    else:
        with st.expander("Command"):
            st.code(" ".join(shlex.quote(part) for part in compare_argv(request, ws)), language="bash")
    if st.button("Run comparison", type="primary", disabled=bool(problems), key="cmp_run"):
        job = queue().enqueue("compare", f"compare {len(columns)} column(s) x {len(prompts) * len(seeds)} row(s)",
                              request.to_args(), run_dir=str(out))
        queue().pump()
        st.session_state[_JOB] = job.id
        st.session_state[_SHOW] = str(out)
    _save_form(ws, request, disabled=bool(problems))
    st.divider()
    _results(ws)


def _column_key(column: Column) -> str:
    """A widget key for one column's strength that stays the same while the column stays chosen."""
    return "cmp_w-" + hashlib.sha1(f"{column.kind}:{column.target}@{column.step}".encode()).hexdigest()[:10]


def _strengths(picked: list[tuple[Column, str]]) -> list[Column]:
    """One strength per adapter column (its ``@WEIGHT``: LoRA multiplier, ControlNet strength, IP-Adapter scale)."""
    if not picked:
        return []
    st.caption("Strength of each adapter column (LoRA multiplier, ControlNet strength, IP-Adapter scale)")
    cells = st.columns(min(len(picked), 4))
    columns = []
    for index, (column, label) in enumerate(picked):
        weight = cells[index % len(cells)].number_input(f"Strength: {label}", value=1.0, step=0.1,
                                                        key=_column_key(column))
        columns.append(dataclasses.replace(column, weight=None if weight == 1.0 else float(weight)))
    return columns


def _own_sampling(columns: list[Column], labels: list[str]) -> list[Column]:
    """A column may sample with its own sampler and steps (``COLUMN::sampler=..,steps=..``), e.g. an LCM-LoRA at
    4 unguided steps beside the base at the grid's 20 guided ones; every row still shares its starting noise."""
    if not columns:
        return columns
    with st.expander("Sampling per column (e.g. an LCM-LoRA at 4 steps beside the base at 20)"):
        out = []
        for column, label in zip(columns, labels):
            key = _column_key(column).replace("cmp_w-", "")
            left, right = st.columns(2)
            sampler = left.selectbox(f"Sampler: {label}", [_GRID_SAMPLING, *sampler_names()], key=f"cmp_smp-{key}",
                                     help=sampler_help())
            own = sampler != _GRID_SAMPLING
            default_steps = 20 if not own or get_sampler(sampler).guided else 4
            steps = right.number_input(f"Steps: {label}", min_value=1, max_value=200, value=default_steps, step=1,
                                       key=f"cmp_smp_steps-{key}-{sampler}", disabled=not own)
            out.append(dataclasses.replace(column, sampler=sampler, sampling_steps=int(steps)) if own else column)
        return out


def _add_adapter_file(ws: Workspace) -> None:
    """Upload an adapter file into the workspace, or name one under an allowed folder; either is picked at once."""
    with st.expander("Add an adapter file from outside the workspace", icon=":material/upload_file:"):
        upload = st.file_uploader("Upload an adapter file (.safetensors; it is saved in the workspace's adapters/)",
                                  type=["safetensors"], key="cmp_upload")
        if upload is not None and st.session_state.get(_UPLOADED) != upload.file_id:
            st.session_state[_UPLOADED] = upload.file_id  # save each upload once, not on every rerun
            try:
                saved = save_uploaded_adapter(ws, upload.name, upload.getvalue())
            except (ValueError, PathNotAllowed, OSError) as exc:
                st.error(f"Not added: {exc}")
            else:
                _pick_file(str(saved))
                st.success(f"Saved {saved.name} in `{saved.parent}` and added it as a column.")
        typed = st.text_input("Or the path of an adapter file", key="cmp_path",
                              help=f"{RELATIVE_PATHS_HELP} Allowed: {ws.policy().describe()}")
        if st.button("Add this file", key="cmp_add_path", disabled=not typed.strip()):
            try:
                path = add_adapter_path(ws, typed)
            except (ValueError, PathNotAllowed) as exc:
                st.error(f"Not added: {exc}")
            else:
                extra = st.session_state.setdefault(_EXTRA_FILES, [])
                if str(path) not in extra:
                    extra.append(str(path))
                _pick_file(str(path))
                st.success(f"Added {path} as a column.")


def _pick_file(path: str) -> None:
    """Select ``path`` in the file picker (drawn after this in the same run, so its state may still change)."""
    chosen = list(st.session_state.get("cmp_files", []))
    if path not in chosen:
        st.session_state["cmp_files"] = chosen + [path]


def _save_form(ws: Workspace, request: CompareRequest, disabled: bool) -> None:
    """Save the form's settings in the workspace to open them again later."""
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    name = left.text_input("Save these settings as", value="comparison", key="cmp_save_name",
                           help=f"A JSON file in {ws.comparison_settings_dir}; open it again at the top of this "
                                "page")
    if right.button("Save settings", key="cmp_save", disabled=disabled):
        try:
            path = save_settings(ws, name, request)
        except (PathNotAllowed, OSError) as exc:
            st.error(f"Not saved: {exc}")
        else:
            st.success(f"Saved the settings as `{path}`.")


def _open_saved(ws: Workspace) -> None:
    """Open saved settings: they fill the form on the next run (a widget's value can only be set before it is
    drawn)."""
    pending = st.session_state.pop(_PENDING, None)
    if pending is not None:
        _fill_form(pending)
    saved = saved_settings(ws)
    if not saved:
        return
    with st.expander("Open saved settings", icon=":material/folder_open:"):
        labels = {str(p): p.stem for p in saved}
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        chosen = left.selectbox("Saved settings", list(labels), format_func=labels.get, key="cmp_open")
        if right.button("Open", key="cmp_open_go"):
            try:
                request, dropped = load_settings(ws, Path(chosen))
            except ValueError as exc:
                st.error(str(exc))
                return
            st.session_state[_PENDING] = request.to_args()
            st.session_state[_OPEN_FLASH] = (labels[chosen], dropped)
            st.rerun()
    if _OPEN_FLASH in st.session_state:
        label, dropped = st.session_state.pop(_OPEN_FLASH)
        st.success(f"Opened the settings {label!r}.")
        if dropped:
            st.warning("Left out, no longer available:\n" + "\n".join(f"- {d}" for d in dropped))


def _fill_form(args: dict[str, Any]) -> None:
    """Set every form widget from saved request arguments."""
    request = CompareRequest.from_args(args)
    state = st.session_state
    runs = [c.target for c in request.columns if c.kind == "run"]
    ckpts = [f"{c.target}@{c.step}" for c in request.columns if c.kind == "ckpt"]
    files = [c.target for c in request.columns if c.kind == "file"]
    state["cmp_base"] = any(c.kind == "base" for c in request.columns)
    state["cmp_runs"], state["cmp_ckpts"], state["cmp_files"] = runs, ckpts, files
    state[_EXTRA_FILES] = list(dict.fromkeys([*state.get(_EXTRA_FILES, []), *files]))
    for column in request.columns:
        if column.kind != "base":
            state[_column_key(column)] = 1.0 if column.weight is None else column.weight
    first_run = runs[0] if runs else (ckpts[0].rsplit("@", 1)[0] if ckpts else None)
    state[f"cmp_prompts-{first_run}"] = "\n".join(request.prompts)
    state[f"cmp_preset-{first_run}"] = request.preset
    state["cmp_seeds"] = " ".join(str(s) for s in request.seeds)
    state["cmp_decoder"], state["cmp_mlflow"] = request.decoder, request.mlflow
    if request.steps is not None:
        state["cmp_steps"] = request.steps


@st.fragment(run_every=REFRESH_S)
def _results(ws: Workspace) -> None:
    job_queue = queue()
    job_id: Optional[str] = st.session_state.get(_JOB)
    job = job_queue.get(job_id) if job_id else None
    if job is not None and job.status in ACTIVE:
        job_queue.pump()
        position = "running" if job.status == "running" else "waiting for the job before it (see Launch)"
        st.info(f"Comparison {position}...")
        st.code(job_queue.log_tail(job, 15) or "(starting)", language=None)
        return
    if job is not None and job.status == FAILED:
        st.error(f"The comparison failed: {job.error}. The log says why:")
        st.code(job_queue.log_tail(job, 30), language=None)
    saved = comparisons(ws)
    if not saved:
        st.caption("No comparison yet.")
        return
    labels = {str(p): p.name for p in saved}
    wanted = st.session_state.get(_SHOW) or st.query_params.get("out")
    index = list(labels).index(wanted) if wanted in labels else 0
    shown = Path(st.selectbox("Comparison", list(labels), index=index, format_func=labels.get,
                              key=f"cmp_show-{wanted}"))  # a new result gets a fresh picker showing it
    show_comparison(shown)


def _full_size_cell(folder: Path, manifest: dict[str, Any]) -> None:
    """One cell of the grid at its own size (the grid scales every cell to the page's width)."""
    cells = {(c.get("row"), c.get("col")): folder / c["file"] for c in manifest.get("cells", []) if c.get("file")}
    if not cells:
        return
    rows = {r.get("index", i): f"{r.get('prompt')} (seed {r.get('seed')})"
            for i, r in enumerate(manifest.get("rows", []))}
    columns = {c.get("index", i): c.get("label", c.get("spec")) for i, c in enumerate(manifest.get("columns", []))}
    with st.expander("Full-size view of a cell", icon=":material/zoom_in:"):
        left, right = st.columns(2)
        row = left.selectbox("Row", list(rows), format_func=rows.get, key=f"cmp_cell_row-{folder.name}")
        col = right.selectbox("Column", list(columns), format_func=columns.get, key=f"cmp_cell_col-{folder.name}")
        path = cells.get((row, col))
        if path is None or not path.is_file():
            st.warning(f"This comparison has no picture for that cell ({path}).")
            return
        st.image(str(path), caption=f"{columns[col]} · {rows[row]} · {path.name}", width="content",
                 output_format="PNG")
        st.download_button(f"Download {path.name}", data=functools.partial(path.read_bytes),
                           file_name=f"{folder.name}-{path.name}", mime="image/png", on_click="ignore",
                           key=f"cmp-dl-cell-{folder.name}")


def show_comparison(folder: Path) -> None:
    """The grid beside each column's settings, and downloads of the grid and of the whole folder."""
    manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    left, right = st.columns([3, 2])
    with left:
        # PNG as written: st.image's "auto" re-encodes an image without alpha as JPEG, which smears the upscaled
        # preview pixels the comparison is about (up to 37/255 on the toy grids).
        st.image(str(folder / manifest.get("grid", "grid.png")), caption=f"{folder.name}: columns left to right, "
                 "one row per prompt and seed", width="stretch", output_format="PNG")
        st.download_button("Download grid.png", data=functools.partial((folder / "grid.png").read_bytes),
                           file_name=f"{folder.name}-grid.png", mime="image/png", on_click="ignore",
                           key=f"cmp-dl-grid-{folder.name}")
        st.download_button("Download the comparison (zip)", data=functools.partial(zip_folder, folder),
                           file_name=f"compare-{folder.name}.zip", mime="application/zip", on_click="ignore",
                           key=f"cmp-dl-zip-{folder.name}")
        st.caption(f"Saved in `{folder}`")
        _full_size_cell(folder, manifest)
    with right:
        for column in manifest.get("columns", []):
            st.markdown(f"**Column {column.get('index', 0) + 1}: {column.get('label', column.get('spec'))}**")
            adapters = column.get("adapters") or []
            if not adapters:
                st.caption("base model, no adapter")
            for adapter in adapters:
                st.caption(" · ".join(f"{k}: {adapter[k]}" for k in ("method", "origin", "step", "weight",
                                                                      "mlflow_run_id") if adapter.get(k) is not None)
                           + f"\n\n`{adapter.get('path')}`")
        rows = manifest.get("rows", [])
        st.markdown("**Rows**")
        st.table([{"row": r.get("index", i) + 1, "prompt": r.get("prompt"), "seed": r.get("seed")}
                  for i, r in enumerate(rows)])
        with st.expander("Sampling settings"):
            st.json({"model": manifest.get("model"), **(manifest.get("settings") or {})}, expanded=False)
    if st.session_state.get(_JOB):
        page_link("launch", "See the job on the Launch page")
