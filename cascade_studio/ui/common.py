"""Streamlit pieces every page shares: the workspace, the job queue and its background worker, the sidebar's job
status and end-of-job notifications, status badges, problem lists."""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import streamlit as st

from .jobs import CANCELLED, FAILED, FINISHED, TERMINAL, Job, JobQueue, failure_message, job_progress
from .workspace import Workspace

logger = logging.getLogger(__name__)

# Off in the AppTest suite (tests pump the queue themselves, with stand-in runners).
WORKER_ENV = "CASCADE_STUDIO_QUEUE_WORKER"
WORKER_INTERVAL_S = 2.0
SIDEBAR_REFRESH_S = 2.0
# Streamlit's own Material icons: they draw without an emoji font (a bare Linux desktop shows tofu for emoji).
STATUS_ICONS = {FINISHED: ":material/check_circle:", FAILED: ":material/error:", CANCELLED: ":material/cancel:",
                "running": ":material/progress_activity:", "queued": ":material/schedule:"}
_NOTIFIED = "jobs_notified"  # ids of ended jobs this session has already told the user about
_SESSION_START = "jobs_session_start"
PAGES = {"recipes": "views/recipes.py", "data": "views/data.py", "launch": "views/launch.py",
         "runs": "views/runs.py", "compare": "views/compare.py", "generate": "views/generate.py",
         "export": "views/export.py"}


def workspace() -> Workspace:
    """The studio's workspace (``cascade-studio ui --workspace``), created on first use."""
    ws = Workspace.from_env()
    ws.root.mkdir(parents=True, exist_ok=True)
    return ws


def queue() -> JobQueue:
    return JobQueue(workspace())


@st.cache_resource(show_spinner=False)
def _queue_worker(root: str) -> threading.Thread:
    """One thread per server and workspace that keeps the queue moving while no browser is open."""

    def loop() -> None:
        job_queue = JobQueue(Workspace.from_env(root=Path(root)))
        while True:
            try:
                job_queue.pump()
            except Exception:  # noqa: BLE001 - the worker must outlive any one bad job file; logged, not hidden
                logger.exception("job queue pump failed; retrying")
            time.sleep(WORKER_INTERVAL_S)

    thread = threading.Thread(target=loop, name="cascade-studio-queue", daemon=True)
    thread.start()
    return thread


def start_queue_worker() -> None:
    """Start the background queue worker once per server (unless ``CASCADE_STUDIO_QUEUE_WORKER=0``)."""
    if os.environ.get(WORKER_ENV, "1") != "0":
        _queue_worker(str(workspace().root))


def status_badge(status: str) -> str:
    """A job status as Markdown: the word, then its Material icon (the word reads without any icon font, too)."""
    return f"{status} {STATUS_ICONS.get(status, '')}".strip()


@st.fragment(run_every=SIDEBAR_REFRESH_S)
def sidebar_status() -> None:
    """The sidebar's job status, refreshed on its own timer on every page, and a toast when a job ends."""
    job_queue = queue()
    job_queue.pump()  # cheap and idempotent; notices a job that just ended even where no worker thread runs
    jobs = job_queue.jobs()
    running = next((j for j in jobs if j.status == "running"), None)
    if running is not None:
        progress = job_progress(running)
        step = f" · step {progress.step}/{progress.max_steps}" if progress.max_steps else ""
        st.caption(f"{STATUS_ICONS['running']} Running: {running.label}{step}")
    else:
        st.caption("No job is running.")
    queued = sum(1 for j in jobs if j.status == "queued")
    if queued:
        st.caption(f"{STATUS_ICONS['queued']} {queued} queued")
    notify_ended_jobs(job_queue, jobs)


def notify_ended_jobs(job_queue: JobQueue, jobs: Iterable[Job]) -> None:
    """A toast for every job that ended since this browser session began, once per job (on the next rerun)."""
    start = st.session_state.setdefault(_SESSION_START, time.time())
    notified: set[str] = st.session_state.setdefault(_NOTIFIED, set())
    for job in jobs:
        if job.status not in TERMINAL or job.id in notified:
            continue
        notified.add(job.id)
        if (job.ended or 0) < start:
            continue  # ended before this session: the Launch page lists it, no news
        text = f"{job.label}: {job.status}"
        if job.status == FAILED:
            text += f". {failure_message(job, job_queue.log_tail(job, 40))}"
        st.toast(text, icon=STATUS_ICONS[job.status])


def show_problems(problems: Iterable[Any], title: str = "") -> None:
    """Every problem at once, one per line (each already says what to write instead)."""
    problems = list(problems)
    if not problems:
        return
    noun = "problem" if len(problems) == 1 else "problems"
    lines = "\n".join(f"- `{getattr(p, 'path', '')}` {_problem_text(p)}" if hasattr(p, "path") else f"- {p}"
                      for p in problems)
    st.error(f"{title or f'{len(problems)} {noun}'}:\n{lines}")


def _problem_text(problem: Any) -> str:
    text = str(problem)
    prefix = f"{problem.path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def page_link(page: str, label: str, query: Optional[dict[str, str]] = None) -> None:
    """A link to another studio page; outside the full app (a single page under test) it degrades to text."""
    try:
        st.page_link(PAGES[page], label=label, query_params=query)
    except Exception:  # noqa: BLE001 - StreamlitAPIException when the page is not registered (single-page tests)
        st.caption(f"{label}: open the {page.title()} page")


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"
