"""Launch page: queue a validated recipe as a training job, watch the running job live, cancel, read logs.

Jobs run one at a time in separate processes (``jobs.py``); this page only writes job files and reads their
events and logs, so reloading the page, or a crashed job, changes nothing about the queue.

Queueing is idempotent until the form changes: clicking Queue again (three quick clicks, a click that arrives
after the page already queued the job) with the same recipe, overrides and processes queues nothing more, unless
a new run name was typed; after a launch the form resets (no overrides, one process, a fresh run name). Every
path the run will use passes the studio's path policy (``paths.py``).

Before launching, the page asks the planner (``cascade-studio plan --json`` in a child process: it builds Stage
C on the meta device, which needs torch) for the predicted peak GPU memory of the recipe with its overrides, and
shows the switches that would make it fit a card of the size given.
"""
from __future__ import annotations

import json
import subprocess
import time
from typing import Any, Optional

import pandas as pd
import streamlit as st

from ..config import RecipeError, load_recipe
from ..trainers.plan import DEFAULT_GPU_GIB, GiB
from .commands import TrainRequest, default_run_name, plan_argv
from .common import format_eta, page_link, queue, show_problems, status_badge, workspace
from .jobs import ACTIVE, FAILED, FINISHED, Job, JobQueue, failure_message, job_progress
from .paths import NAME_RULE, PathNotAllowed
from .workspace import Workspace

REFRESH_S = 2.0
PLAN_TIMEOUT_S = 180
_FLASH = "launch_flash"
_LAUNCHES = "launch_count"
_LAST = "launch_last"  # (form, job id, run name) of this session's last queued launch
_PENDING_FORM = "launch_pending_form"  # (overrides, processes) for the next run: reset, or switches added
_OVERRIDES, _PROCESSES = "launch_overrides", "launch_processes"


def _recipe_name(path) -> str:
    try:
        return load_recipe(path).name
    except RecipeError:
        return path.stem


def render() -> None:
    ws = workspace()
    job_queue = queue()
    st.title("Launch")
    st.caption("Training runs as a separate process through `accelerate launch`, one job at a time; the queue "
               f"and logs live in `{ws.jobs_dir}`, so reloading this page loses nothing.")
    if _FLASH in st.session_state:
        st.success(st.session_state.pop(_FLASH))
    reset = st.session_state.pop(_PENDING_FORM, None)
    if reset is not None:  # widget values can only be set before the widgets are drawn
        st.session_state[_OVERRIDES], st.session_state[_PROCESSES] = reset
    entries = ws.list_recipes()
    labels = [e.label for e in entries]
    label = st.selectbox("Recipe", labels, key="launch_recipe", help="Edit or create recipes on the Recipes page")
    entry = entries[labels.index(label)]
    taken = [str(j.args.get("run_name")) for j in job_queue.jobs() if j.status in ACTIVE]
    # A new key after each launch: the browser then shows the fresh default name instead of keeping the old one.
    name_key = f"launch_name-{entry.path}-{st.session_state.get(_LAUNCHES, 0)}"
    suggested = default_run_name(ws, _recipe_name(entry.path), taken)
    run_name = st.text_input("Run name", value=suggested, key=name_key,
                             help=f"Names the run folder `{ws.runs_dir}/<name>` and the MLflow run; {NAME_RULE}")
    overrides_text = st.text_area("Overrides (optional)", key=_OVERRIDES, height=80,
                                  help="One dotted setting per line, e.g. train.max_steps=200; validated together "
                                       "with the recipe (workspace and name are set by the studio)")
    processes = int(st.number_input("Processes", min_value=1, max_value=8, value=1, step=1, key=_PROCESSES,
                                    help="Data-parallel processes (accelerate; on a CPU they use gloo)"))
    from ..launch import shipped_configs

    launch = st.selectbox("Launch with", ["", *shipped_configs()], key="launch_config",
                          format_func=lambda name: f"accelerate config {name}.yaml" if name else
                          "this machine, the processes above",
                          help="A shipped accelerate config (README, Scaling out): DDP on the GPUs of this machine, "
                               "FSDP (the frozen base sharded across them), or 2 CPU processes. Processes above "
                               "1 replace the file's own count. Several machines: edit multi-node.yaml and run "
                               "`cascade-studio train --accelerate-config FILE` on each.")
    overrides = tuple(line.strip() for line in overrides_text.splitlines() if line.strip())
    request = TrainRequest(str(entry.path), run_name.strip(), overrides, processes, launch=launch)
    repeat = _repeated_launch(request, suggested)
    ready = repeat is not None or _check(request, ws, taken)
    if ready:
        _memory_estimate(request, ws)
    # A repeated launch keeps the button enabled: a quick second click arrives anyway, and is answered here.
    if st.button("Queue training", type="primary", disabled=not ready, key="launch_queue") and repeat is None:
        try:
            job = job_queue.enqueue("train", f"train {request.run_name} ({entry.label})", request.to_args(),
                                    run_dir=str(request.run_dir(ws)))
        except ValueError as exc:
            st.error(str(exc))
        else:
            job_queue.pump()  # start at once when nothing else runs
            # The form as launched and as reset: a quick second click arrives with either, and queues nothing.
            reset = TrainRequest(request.recipe, request.run_name, launch=request.launch)
            st.session_state[_LAST] = ((_form(request), _form(reset)), job.id, request.run_name)
            st.session_state[_LAUNCHES] = st.session_state.get(_LAUNCHES, 0) + 1  # a fresh run name next time
            st.session_state[_FLASH] = (f"Queued {job.label} (job {job.id}). The form is reset for the next "
                                        "launch; the job's progress is below.")
            st.session_state[_PENDING_FORM] = ("", reset.processes)
            st.rerun()
    if repeat is not None:
        st.info(f"Already queued from this form as job {repeat[1]} (run {repeat[2]}); queueing it again does "
                "nothing. Change the recipe, the overrides or the processes, or type another run name, to queue "
                "another run.")
    st.divider()
    _queue_panel()


def _form(request: TrainRequest) -> tuple:
    """What makes two launches the same: the recipe, its overrides and the process count (not the run name the
    page suggests afresh after every launch)."""
    return request.recipe, request.overrides, request.processes, request.launch


def _repeated_launch(request: TrainRequest, suggested: str):
    """This session's last launch, if ``request`` repeats it: the same form (as launched, or as reset after the
    launch) and a run name the user did not type (the fresh suggestion shown after the launch, or the name just
    launched)."""
    last = st.session_state.get(_LAST)
    if last is None or _form(request) not in last[0] or request.run_name not in (suggested, last[2]):
        return None
    return last


def _check(request: TrainRequest, ws, taken: list[str]) -> bool:
    """Validate the launch and show every problem inline; True when it may be queued."""
    if request.run_name in taken:
        st.error(f"A queued or running job already uses the run name {request.run_name!r}; choose another.")
        return False
    try:
        request.validate(ws)
    except RecipeError as exc:
        show_problems(exc.problems, f"This recipe cannot be launched ({len(exc.problems)} problem(s)); fix it on "
                                    "the Recipes page or in the overrides")
        return False
    except (ValueError, PathNotAllowed) as exc:
        st.error(str(exc))
        return False
    parsed = request.parsed_overrides()  # validate() parsed them already
    changes = ("\n".join(f"- `{key}` = `{json.dumps(value)}`" for key, value in parsed) if parsed
               else "no overrides: the recipe as saved.")
    st.success(f"Ready: `cascade_studio.train {request.recipe}` as run **{request.run_name}**, "
               + (f"with accelerate config `{request.launch}.yaml`"
                  + (f" on {request.processes} processes" if request.processes > 1 else " (its process count)")
                  if request.launch else f"{request.processes} process(es)")
               + f", with {len(parsed) or 'no'} override(s)"
               + (":\n" + changes if parsed else "."))
    return True


@st.cache_data(show_spinner="Estimating peak GPU memory (cascade-studio plan)...", max_entries=64)
def _plan(argv: tuple[str, ...], cwd: str, recipe_mtime: float) -> dict[str, Any] | str:
    """The planner's JSON for one form (cached per recipe file version, overrides and card size), or why not."""
    try:
        done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=PLAN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the planner took longer than {PLAN_TIMEOUT_S} s"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"the planner exited with code {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_estimate(request: TrainRequest, ws: Workspace) -> None:
    """The predicted peak GPU memory of the launch and, when it does not fit, the switches that would."""
    gpu_gib = float(st.number_input("GPU memory (GiB)", min_value=1.0, max_value=1024.0, value=DEFAULT_GPU_GIB,
                                    step=1.0, key="launch_gpu_gb", help="The card the run is planned for: what "
                                    "nvidia-smi shows divided by 1024 (a '12 GB' card has 12 GiB)"))
    recipe = ws.confine_recipe(request.recipe)
    plan = _plan(tuple(plan_argv(request, ws, gpu_gib)), str(ws.repo_root), recipe.stat().st_mtime)
    if isinstance(plan, str):
        st.caption(f"No memory estimate: {plan}")
        return
    peak, budget = plan["peak"] / GiB, plan["budget"] / GiB
    if plan["fits"]:
        st.info(f"Predicted peak GPU memory: **fits in {peak:.1f} of {budget:g} GiB** "
                "(`cascade-studio plan`; an estimate within about 25%).")
        return
    lines = [f"Predicted peak GPU memory **{peak:.1f} GiB does not fit in {budget:g} GiB**."]
    switches = plan["switches"]
    if switches:
        lines.append("These switches would make it fit, cheapest first (each adds to the ones above):"
                     if plan["switches_fit"] else "Even all of these switches do not make it fit:")
        lines += [f"- `{s['override']}` -> {s['peak'] / GiB:.1f} GiB (cost: {s['cost']})" for s in switches]
    else:
        lines.append("No switch is left to apply; use a smaller preset or resolution, or a larger GPU.")
    st.warning("\n".join(lines))
    if switches and plan["switches_fit"] and st.button("Add these switches to the overrides",
                                                       key="launch_apply_switches"):
        added = [part for s in switches for part in s["override"].split()]
        keys = {a.split("=", 1)[0] for a in added}
        kept = [o for o in request.overrides if o.split("=", 1)[0].strip() not in keys]
        st.session_state[_PENDING_FORM] = ("\n".join(kept + added), request.processes)
        st.rerun()


@st.fragment(run_every=REFRESH_S)
def _queue_panel() -> None:
    job_queue = queue()
    job_queue.pump()
    jobs = job_queue.jobs()
    running = [j for j in jobs if j.status == "running"]
    queued = [j for j in jobs if j.status == "queued"]
    ended = [j for j in jobs if j.status not in ACTIVE]
    st.subheader("Running")
    if running:
        _running_card(job_queue, running[0])
    else:
        st.caption("No job is running.")
    st.subheader(f"Queued ({len(queued)})")
    for position, job in enumerate(queued, start=1):
        left, right = st.columns([5, 1])
        left.write(f"{position}. {job.label} · waits for the job before it")
        if right.button("Remove", key=f"cancel-{job.id}"):
            st.toast(job_queue.cancel(job.id))
            st.rerun(scope="fragment")
    if ended:
        st.subheader("Ended")
        for job in list(reversed(ended))[:10]:
            _ended_card(job_queue, job)
        if st.button("Clear ended jobs", key="clear-ended"):
            st.toast(f"Cleared {job_queue.clear_finished()} job(s); their run folders stay.")
            st.rerun(scope="fragment")


def _speed_and_memory(progress) -> str:
    """`` · 2.31 it/s · peak 1.52 GiB`` from the last step event (empty for runs that did not log them)."""
    text = f" · {progress.it_per_s:.2f} it/s" if progress.it_per_s is not None else ""
    mb: Optional[float] = progress.peak_memory_mb
    if mb is not None:
        text += f" · peak memory {mb / 1024:.2f} GiB" if mb >= 1024 else f" · peak memory {mb:.0f} MiB"
    return text


def _running_card(job_queue: JobQueue, job: Job) -> None:
    with st.container(border=True):
        started = time.strftime("%H:%M:%S", time.localtime(job.started or 0))
        st.markdown(f"**{job.label}** · {status_badge(job.status)} · job `{job.id}` · started {started}")
        if job.kind == "train":
            progress = job_progress(job)
            if progress.max_steps:
                text = (f"step {progress.step}/{progress.max_steps} · loss {progress.loss:.4f} · lr {progress.lr:.2e}"
                        f"{_speed_and_memory(progress)} · ETA {format_eta(progress.eta_seconds)}"
                        if progress.loss is not None else f"step {progress.step}/{progress.max_steps}")
                st.progress(progress.fraction, text=text)
            else:
                st.progress(0.0, text=f"phase: {progress.phase or 'starting'}")
            if progress.run_id:
                st.caption(f"MLflow run `{progress.run_id}` in `{progress.tracking_uri}` (browse it with `mlflow ui "
                           f"--backend-store-uri {progress.tracking_uri}`)")
                page_link("runs", "Open this run on the Runs page", {"run_id": progress.run_id})
            if len(progress.losses) > 1:
                st.line_chart(pd.DataFrame(progress.losses, columns=["step", "loss"]), x="step", y="loss",
                              height=180)
        else:
            st.caption("Generating the comparison grid...")
        if job.cancel_requested:
            st.warning("Stopping (SIGTERM sent)...")
        elif st.button("Cancel", key=f"cancel-{job.id}"):
            st.toast(job_queue.cancel(job.id))
            st.rerun(scope="fragment")
        st.code(job_queue.log_tail(job, 25) or "(no output yet)", language=None)


def _ended_card(job_queue: JobQueue, job: Job) -> None:
    with st.container(border=True, key=f"ended-{job.id}"):
        st.markdown(f"**{job.label}** · {status_badge(job.status)}")
        log = job_queue.log_tail(job, 30)
        if job.status == FAILED:
            st.error(f"**Failed:** {failure_message(job, log)}\n\nFix the cause, then queue it again.")
        progress = job_progress(job)
        if job.kind == "train" and progress.run_id:
            st.caption(f"MLflow run `{progress.run_id}` · step {progress.step}/{progress.max_steps or '?'}")
            page_link("runs", "Open on the Runs page", {"run_id": progress.run_id})
        if job.kind == "compare" and job.status == FINISHED:
            page_link("compare", "Show on the Compare page", {"out": str(job.run_dir)})
        with st.expander("Traceback and log" if job.status == FAILED else "Log", icon=":material/terminal:"):
            st.code(log or "(empty log)", language=None)
