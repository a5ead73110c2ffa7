"""Generate page: try one adapter (a run's, or a file anywhere the path policy allows) with a prompt, a seed,
steps and a strength, beside the base model drawn from the same noise.

It is a one-row comparison: the page queues the studio's own ``cascade-studio compare`` job (``commands.py``),
which samples through ``inference.compare.run_compare``, the path the Compare page, the CLI and the demo use.
There is no second sampling path here, and torch never enters the studio's process.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import streamlit as st

from ..diffusion.samplers import DEFAULT_SAMPLER, get_sampler, sampler_help, sampler_names
from ..models.presets import PRESETS
from .commands import Column, CompareRequest, new_comparison_dir
from .common import page_link, queue, show_problems, workspace
from .jobs import ACTIVE, FAILED
from .runs_data import adapter_files, checkpoint_steps, run_preset, run_prompts
from .workspace import Workspace

REFRESH_S = 2.0
_JOB = "generate_job"
_DEFAULT_PROMPT = "a small red circle"
FROM_RUN, FROM_FILE = "a training run", "an adapter file"


def render() -> None:
    ws = workspace()
    st.title("Generate")
    st.caption("Try one adapter with your prompt. Each image is a one-row comparison (the same job as the Compare "
               f"page), saved under `{ws.comparisons_dir}`.")
    source = st.radio("Adapter from", [FROM_RUN, FROM_FILE], horizontal=True, key="gen_source")
    run_dir: Optional[Path] = None
    if source == FROM_RUN:
        runs = {str(d): d.name for d in ws.run_dirs() if adapter_files(d) or checkpoint_steps(d)}
        picked = st.selectbox("Run", list(runs), format_func=runs.get, key="gen_run",
                              help="Its exported adapter, else its newest checkpoint",
                              placeholder="no run with an adapter yet: train one on the Launch page")
        run_dir = Path(picked) if picked else None
        adapter = Column("run", picked) if picked else None
    else:
        typed = st.text_input("Adapter file (.safetensors)", key="gen_file",
                              help=f"Inside a folder the studio may use: {ws.policy().describe()}")
        adapter = Column("file", typed.strip()) if typed.strip() else None
    prompt = st.text_area("Prompt", value=(run_prompts(run_dir) if run_dir else [None])[0] or _DEFAULT_PROMPT,
                          key=f"gen_prompt-{run_dir}", height=70)
    a, b, c, d = st.columns(4)
    seed = int(a.number_input("Seed", min_value=0, value=0, step=1, key="gen_seed"))
    steps = int(b.number_input("Stage C steps", min_value=1, max_value=200, value=20, step=1, key="gen_steps"))
    strength = float(c.number_input("Strength", value=1.0, step=0.1, key="gen_strength",
                                    help="LoRA multiplier, ControlNet strength or IP-Adapter scale"))
    presets = [p for p in PRESETS if PRESETS[p].weights != "published"] + \
        [p for p in PRESETS if PRESETS[p].weights == "published"]
    preset_default = (run_preset(run_dir) if run_dir else None) or presets[0]
    preset = d.selectbox("Base model preset", presets, index=presets.index(preset_default)
                         if preset_default in presets else 0, key=f"gen_preset-{run_dir}",
                         help="The preset the adapter was trained on")
    sampler = st.selectbox("Sampler of the adapter's image", sampler_names(), key="gen_sampler",
                           help=f"{sampler_help()}. The base image keeps the published sampler at the steps above; an "
                                "unguided sampler (an LCM-LoRA's lcm) samples the adapter's image at its own steps.")
    own_steps = None
    if not get_sampler(sampler).guided:
        own_steps = int(st.number_input(f"Steps with {sampler}", min_value=1, max_value=200, value=4, step=1,
                                        key=f"gen_own_steps-{sampler}"))
    with_base = st.checkbox("Also draw the base model (same seed and noise)", value=True, key="gen_base")
    own = dict(sampler=sampler, sampling_steps=own_steps) if sampler != DEFAULT_SAMPLER else {}
    columns = ([Column("base")] if with_base else []) + \
        ([Column(adapter.kind, adapter.target, weight=None if strength == 1.0 else strength, **own)]
         if adapter else [])
    out = new_comparison_dir(ws, taken=[str(j.run_dir) for j in queue().jobs() if j.status in ACTIVE])
    request = CompareRequest(tuple(columns), (prompt.strip(),) if prompt.strip() else (), (seed,), preset,
                             steps=steps, out=str(out))
    problems = ([] if adapter else ["choose a run or type an adapter file"]) + request.problems(ws)
    show_problems(problems)
    if st.button("Generate", type="primary", disabled=bool(problems), key="gen_go"):
        label = f"generate {adapter.spec() if adapter else 'base'}: {prompt.strip()[:40]}"
        job = queue().enqueue("compare", label, request.to_args(), run_dir=str(out))
        queue().pump()
        st.session_state[_JOB] = job.id
    st.divider()
    _result(ws)


@st.fragment(run_every=REFRESH_S)
def _result(ws: Workspace) -> None:
    job_queue = queue()
    job_id: Optional[str] = st.session_state.get(_JOB)
    job = job_queue.get(job_id) if job_id else None
    if job is None:
        st.caption("Nothing generated in this session yet.")
        return
    if job.status in ACTIVE:
        job_queue.pump()
        position = "running" if job.status == "running" else "waiting for the job before it (see Launch)"
        st.info(f"Generating ({position})...")
        st.code(job_queue.log_tail(job, 10) or "(starting)", language=None)
        return
    if job.status == FAILED:
        st.error(f"Generation failed: {job.error}. The log says why:")
        st.code(job_queue.log_tail(job, 30), language=None)
        return
    show_images(Path(str(job.run_dir)))
    page_link("compare", "Open it on the Compare page", {"out": str(job.run_dir)})


def show_images(folder: Path) -> None:
    """Each cell of a one-row comparison with its column's label, and where the files are."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        st.warning(f"No images in {folder} (the job ended without writing them; see the Launch page's log).")
        return
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    labels = {c.get("index"): c.get("label", c.get("spec")) for c in manifest.get("columns", [])}
    cells = manifest.get("cells", [])
    for column, cell in zip(st.columns(max(1, len(cells))), cells):
        # PNG as written (see the Compare page: JPEG re-encoding smears the preview pixels)
        column.image(str(folder / cell["file"]), caption=labels.get(cell["col"]), width="stretch",
                     output_format="PNG")
    st.caption(f"Saved in `{folder}`: " + ", ".join(f"`{cell['file']}`" for cell in cells) + ", grid.png, "
               "manifest.json")
