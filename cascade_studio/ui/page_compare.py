"""Compare page: pick the base model, runs, checkpoints and adapter files as columns, prompts and seeds as rows,
run ``cascade-studio compare`` as a queued job, and show the grid with each column's settings from its
manifest.json. Every comparison stays on disk under ``<workspace>/compare/`` and can be downloaded."""
from __future__ import annotations

import functools
import json
import shlex
from pathlib import Path
from typing import Any, Optional

import streamlit as st

from ..config import Recipe, describe_fields
from ..models.presets import PRESETS
from .commands import Column, CompareRequest, compare_argv, new_comparison_dir, parse_seeds
from .common import page_link, queue, show_problems, workspace
from .jobs import ACTIVE, FAILED
from .runs_data import adapter_files, checkpoint_steps, run_preset, run_prompts, zip_folder
from .workspace import Workspace

REFRESH_S = 2.0
_JOB = "compare_job"
_SHOW = "compare_show"
_DEFAULT_PROMPT = "a small red circle"


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
    runs = [d for d in ws.run_dirs() if adapter_files(d) or checkpoint_steps(d)]
    names = {str(d): d.name for d in runs}
    st.subheader("Columns")
    base = st.checkbox("Base model (no adapter)", value=True, key="cmp_base")
    chosen_runs = st.multiselect("Runs (their exported adapter, else the latest checkpoint)", list(names),
                                 format_func=names.get, key="cmp_runs")
    ckpt_options = {f"{d}@{s}": f"{d.name} @ step {s}" for d in runs for s in checkpoint_steps(d)}
    chosen_ckpts = st.multiselect("Checkpoints", list(ckpt_options), format_func=ckpt_options.get, key="cmp_ckpts")
    file_options = {str(p): str(p.relative_to(ws.root)) for d in runs for p in adapter_files(d) if p.is_file()}
    chosen_files = st.multiselect("Adapter files", list(file_options), format_func=file_options.get,
                                  key="cmp_files")
    weight = st.number_input("Adapter weight (LoRA multiplier, ControlNet strength, IP-Adapter scale)",
                             value=1.0, step=0.1, key="cmp_weight")
    w = None if weight == 1.0 else float(weight)
    columns = ([Column("base")] if base else []) + [Column("run", r, weight=w) for r in chosen_runs] \
        + [Column("ckpt", k.rsplit("@", 1)[0], step=int(k.rsplit("@", 1)[1]), weight=w) for k in chosen_ckpts] \
        + [Column("file", f, weight=w) for f in chosen_files]

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
    decoder = b.selectbox("Decoder", ["previewer", "cascade"], key="cmp_decoder",
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
    st.divider()
    _results(ws)


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
