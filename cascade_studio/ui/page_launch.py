"""Launch page: queue a validated recipe as a training job, watch the running job live, cancel, read logs.

Jobs run one at a time in separate processes (``jobs.py``); this page only writes job files and reads their
events and logs, so reloading the page, or a crashed job, changes nothing about the queue.

Queueing is idempotent until the form changes: clicking Queue again (three quick clicks, a click that arrives
after the page already queued the job) with the same recipe, overrides and processes queues nothing more, unless
a new run name was typed. Every path the run will use passes the studio's path policy (``paths.py``).
"""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from ..config import RecipeError, load_recipe
from .commands import TrainRequest, default_run_name
from .common import format_eta, page_link, queue, show_problems, workspace
from .jobs import ACTIVE, CANCELLED, FAILED, FINISHED, Job, JobQueue, job_progress
from .paths import PathNotAllowed

REFRESH_S = 2.0
_FLASH = "launch_flash"
_LAUNCHES = "launch_count"
_LAST = "launch_last"  # (form, job id, run name) of this session's last queued launch
_STATUS_ICON = {FINISHED: "✅", FAILED: "❌", CANCELLED: "⏹️"}


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
    entries = ws.list_recipes()
    labels = [e.label for e in entries]
    label = st.selectbox("Recipe", labels, key="launch_recipe", help="Edit or create recipes on the Recipes page")
    entry = entries[labels.index(label)]
    taken = [str(j.args.get("run_name")) for j in job_queue.jobs() if j.status in ACTIVE]
    # A new key after each launch: the browser then shows the fresh default name instead of keeping the old one.
    name_key = f"launch_name-{entry.path}-{st.session_state.get(_LAUNCHES, 0)}"
    suggested = default_run_name(ws, _recipe_name(entry.path), taken)
    run_name = st.text_input("Run name", value=suggested, key=name_key,
                             help=f"Names the run folder {ws.runs_dir}/<name> and the MLflow run; letters, digits, "
                                  "'.', '-', '_'")
    overrides_text = st.text_area("Overrides (optional)", key="launch_overrides", height=80,
                                  help="One dotted setting per line, e.g. train.max_steps=200; validated together "
                                       "with the recipe (workspace and name are set by the studio)")
    processes = int(st.number_input("Processes", min_value=1, max_value=8, value=1, step=1, key="launch_processes",
                                    help="Data-parallel processes (accelerate; on a CPU they use gloo)"))
    overrides = tuple(line.strip() for line in overrides_text.splitlines() if line.strip())
    request = TrainRequest(str(entry.path), run_name.strip(), overrides, processes)
    repeat = _repeated_launch(request, suggested)
    ready = repeat is not None or _check(request, ws, taken)
    # A repeated launch keeps the button enabled: a quick second click arrives anyway, and is answered here.
    if st.button("Queue training", type="primary", disabled=not ready, key="launch_queue") and repeat is None:
        try:
            job = job_queue.enqueue("train", f"train {request.run_name} ({entry.label})", request.to_args(),
                                    run_dir=str(request.run_dir(ws)))
        except ValueError as exc:
            st.error(str(exc))
        else:
            job_queue.pump()  # start at once when nothing else runs
            st.session_state[_LAST] = (_form(request), job.id, request.run_name)
            st.session_state[_LAUNCHES] = st.session_state.get(_LAUNCHES, 0) + 1  # a fresh run name next time
            st.session_state[_FLASH] = f"Queued {job.label} (job {job.id})."
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
    return request.recipe, request.overrides, request.processes


def _repeated_launch(request: TrainRequest, suggested: str):
    """This session's last launch, if ``request`` repeats it: the same form and a run name the user did not type
    (the fresh suggestion shown after the launch, or the name just launched)."""
    last = st.session_state.get(_LAST)
    if last is None or last[0] != _form(request) or request.run_name not in (suggested, last[2]):
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
    st.success(f"Ready: `cascade_studio.train {request.recipe}` as run **{request.run_name}**, "
               f"{request.processes} process(es).")
    return True


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
        latest_failed = next((j.id for j in reversed(ended) if j.status == FAILED), None)
        for job in list(reversed(ended))[:10]:
            _ended_card(job_queue, job, expanded=job.id == latest_failed)
        if st.button("Clear ended jobs", key="clear-ended"):
            st.toast(f"Cleared {job_queue.clear_finished()} job(s); their run folders stay.")
            st.rerun(scope="fragment")


def _running_card(job_queue: JobQueue, job: Job) -> None:
    with st.container(border=True):
        started = time.strftime("%H:%M:%S", time.localtime(job.started or 0))
        st.markdown(f"**{job.label}** · job `{job.id}` · started {started}")
        if job.kind == "train":
            progress = job_progress(job)
            if progress.max_steps:
                text = (f"step {progress.step}/{progress.max_steps} · loss "
                        f"{progress.loss:.4f} · lr {progress.lr:.2e} · ETA {format_eta(progress.eta_seconds)}"
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


def _ended_card(job_queue: JobQueue, job: Job, expanded: bool) -> None:
    icon = _STATUS_ICON.get(job.status, "")
    with st.expander(f"{icon} {job.label} · {job.status}", expanded=expanded):
        if job.status == FAILED:
            st.error(f"Failed: {job.error or 'see the log'}. Fix the cause (the log below says what), then queue "
                     "it again.")
        progress = job_progress(job)
        if job.kind == "train" and progress.run_id:
            st.caption(f"MLflow run `{progress.run_id}` · step {progress.step}/{progress.max_steps or '?'}")
            page_link("runs", "Open on the Runs page", {"run_id": progress.run_id})
        if job.kind == "compare" and job.status == FINISHED:
            page_link("compare", "Show on the Compare page", {"out": str(job.run_dir)})
        st.code(job_queue.log_tail(job, 30) or "(empty log)", language=None)
