"""The studio's job queue: one job at a time (a single-GPU machine), persisted in ``<workspace>/jobs/``.

Files per job (``<id>`` sorts by creation time)::

    <id>.json   the job: kind, its arguments, status; written only by the studio, under ``jobs/.queue.lock``
    <id>.log    stdout + stderr of the job (the runner's header, then the command's own output)
    <id>.exit   {"returncode", "command", ...}: written by the runner (``ui/runner.py``) when the command ends

The narrow channel of STYLE.md habit 11: the studio writes a job file and starts ``python -m
cascade_studio.ui.runner <job file>`` in a new session; the runner builds the command from the job's *kind and
arguments* (never from stored command text), runs it, and records its exit code. Progress comes back through the
run's ``events.jsonl``. A crashed job only ever shows up as a failed job with its log tail; nothing of it runs in
the studio's process, and no torch is imported here.

Cancelling sends SIGTERM to the job's process group (the runner, ``accelerate launch`` and the trainer, which
ends its MLflow run as KILLED); a job still alive ``cancel_grace_s`` later gets SIGKILL.
"""
from __future__ import annotations

import json
import re
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from filelock import FileLock

from ..trainers.events import read_events
from .workspace import Workspace

__all__ = ["Job", "JobError", "JobQueue", "Progress", "ACTIVE", "TERMINAL", "job_progress", "group_alive",
           "write_exit", "read_exit", "group_members", "failure_message"]

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED = "queued", "running", "finished", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
TERMINAL = (FINISHED, FAILED, CANCELLED)
KINDS = ("train", "compare")
# Processes the studio started, by pid: polling a Popen reaps it, so finished runners never linger as zombies.
_CHILDREN: dict[int, subprocess.Popen] = {}


class JobError(ValueError):
    """A job cannot be queued or changed as asked; the message says what to do instead."""


@dataclass
class Job:
    """One queued, running or ended job. ``args`` are the kind's arguments (see ``ui/runner.py``)."""

    id: str
    kind: str
    label: str
    args: dict[str, Any]
    created: float
    status: str = QUEUED
    run_dir: Optional[str] = None  # train: where events.jsonl appears; compare: the output folder
    pid: Optional[int] = None  # the runner's pid = the job's process group id
    started: Optional[float] = None
    ended: Optional[float] = None
    returncode: Optional[int] = None
    cancel_requested: Optional[float] = None
    error: Optional[str] = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def new_job_id(now: float) -> str:
    """Sortable and unique: creation time to the millisecond, then random hex."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1000) % 1000:03d}"
    return f"{stamp}-{secrets.token_hex(3)}"


def write_exit(path: Path, returncode: int, command: Sequence[str], **extra: Any) -> None:
    """The runner's last word (atomic: the studio never reads half of it)."""
    tmp = path.with_suffix(".exit.tmp")
    tmp.write_text(json.dumps({"returncode": returncode, "command": list(command), "time": time.time(), **extra}))
    os.replace(tmp, path)


def read_exit(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name (state first), or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # the name may contain spaces and ')'


def group_members(pgid: int, exclude: Sequence[int] = ()) -> Optional[list[int]]:
    """Live (non-zombie) processes of process group ``pgid``; None where there is no /proc to ask."""
    if not Path("/proc/self/stat").exists():  # pragma: no cover - Linux has /proc
        return None
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        stat = _proc_stat(int(entry.name))
        # stat[0] is the state, stat[2] the process group
        if stat is not None and len(stat) > 2 and stat[2] == str(pgid) and stat[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def group_alive(pgid: int) -> bool:
    """Whether any live process is in process group ``pgid``.

    The whole group counts, not just its leader: when ``accelerate launch`` dies first, the trainer may still be
    writing its last checkpoint, and the next job must not start on the GPU until it is gone. A group id cannot
    be reused while members exist, so this needs no pid-reuse guard.
    """
    child = _CHILDREN.get(pgid)
    if child is not None and child.poll() is not None:  # reap our own runner so it is not a zombie member
        _CHILDREN.pop(pgid, None)
    members = group_members(pgid)
    if members is not None:
        return bool(members)
    try:  # pragma: no cover - systems without /proc
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _default_runner() -> list[str]:
    return [sys.executable, "-m", "cascade_studio.ui.runner"]


# ---------------------------------------------------------------------------------------------- progress
@dataclass
class Progress:
    """What a train job's events say so far."""

    phase: Optional[str] = None
    step: int = 0
    max_steps: Optional[int] = None
    loss: Optional[float] = None
    lr: Optional[float] = None
    eta_seconds: Optional[float] = None
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    it_per_s: Optional[float] = None  # optimizer steps per second of the last logged step
    peak_memory_mb: Optional[float] = None  # peak accelerator memory (the host's peak RSS on a CPU) so far
    outcome: Optional[str] = None  # finished | failed | killed
    error: Optional[str] = None
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0


def job_progress(job: Job) -> Progress:
    """Progress of a train job from its run's events.jsonl (events of earlier runs in that folder are ignored)."""
    progress = Progress()
    if job.kind != "train" or not job.run_dir or job.started is None:
        return progress
    for event in read_events(job.run_dir):
        if event.get("time", 0) < job.started - 5:  # a resumed folder holds older runs' events
            continue
        kind = event.get("event")
        if kind == "started":
            progress.run_id, progress.tracking_uri = event.get("run_id"), event.get("tracking_uri")
        elif kind == "phase":
            progress.phase = event.get("phase")
        elif kind == "step":
            progress.step = int(event.get("step", 0))
            progress.max_steps = event.get("max_steps")
            progress.loss, progress.lr = event.get("loss"), event.get("lr")
            progress.eta_seconds = event.get("eta_seconds")
            progress.it_per_s, progress.peak_memory_mb = event.get("it_per_s"), event.get("peak_memory_mb")
            if progress.loss is not None:
                progress.losses.append((progress.step, float(progress.loss)))
        elif kind in ("finished", "failed", "killed"):
            progress.outcome = kind
            progress.error = event.get("error")
    return progress


# ---------------------------------------------------------------------------------------------- failures
# What a failed job says when neither its runner nor its events recorded why; failure_message then looks in the log.
_GENERIC_FAILURE = "exited with code {code}; see the log below"
_NO_EXIT_RECORD = "the job stopped without recording an exit code (killed from outside?); see the log below"
# The last line of a Python traceback: "RuntimeError: ...", "torch.OutOfMemoryError: ...", "KeyboardInterrupt".
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Interrupt|Exit)\b(?::.*)?$")


def failure_message(job: Job, log: str) -> str:
    """The clear message of a failed job, to show before its log: what the runner or the trainer recorded, else
    the exception that ended the log (with the exit code), else the generic reason."""
    reason = job.error or "no reason was recorded"
    if reason not in (_GENERIC_FAILURE.format(code=job.returncode), _NO_EXIT_RECORD):
        return reason
    last = next((line.strip() for line in reversed(log.splitlines()) if _EXCEPTION_LINE.match(line.strip())), None)
    if last is None:
        return reason
    return f"{last} (exit code {job.returncode})" if job.returncode is not None else last


# ------------------------------------------------------------------------------------------------- queue
class JobQueue:
    """The persisted queue of one workspace. Safe to use from several sessions/threads: every change happens
    under a file lock and re-reads the job files."""

    def __init__(self, workspace: Workspace, runner: Optional[Sequence[str]] = None, cancel_grace_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.workspace = workspace
        self.dir = workspace.jobs_dir
        # Tests substitute a stand-in runner; the studio always uses its own module.
        self.runner = list(runner) if runner else _default_runner()
        self.cancel_grace_s = cancel_grace_s
        self.clock = clock
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.dir / ".queue.lock"), timeout=30)

    # --------------------------------------------------------------------------------------------- files
    def job_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def log_path(self, job: Job) -> Path:
        return self.dir / f"{job.id}.log"

    def exit_path(self, job: Job) -> Path:
        return self.dir / f"{job.id}.exit"

    def _save(self, job: Job) -> None:
        tmp = self.job_path(job.id).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(job), indent=2))
        os.replace(tmp, self.job_path(job.id))

    def jobs(self) -> list[Job]:
        """Every job, oldest first (queue order)."""
        found = []
        for path in self.dir.glob("*.json"):
            try:
                found.append(Job.from_dict(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # a foreign or damaged file is not a job
        return sorted(found, key=lambda j: (j.created, j.id))

    def get(self, job_id: str) -> Optional[Job]:
        try:
            return Job.from_dict(json.loads(self.job_path(job_id).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running(self) -> Optional[Job]:
        return next((j for j in self.jobs() if j.status == RUNNING), None)

    def queued(self) -> list[Job]:
        return [j for j in self.jobs() if j.status == QUEUED]

    def log_tail(self, job: Job, max_lines: int = 40, max_bytes: int = 64_000) -> str:
        """The last lines of a job's log (reads only the end of a long log)."""
        path = self.log_path(job)
        try:
            with open(path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - max_bytes))
                data = handle.read()
        except OSError:
            return ""
        # Progress bars rewrite one line with \r; only the last state of each line is worth showing.
        lines = [line.rsplit("\r", 1)[-1] for line in data.decode("utf-8", "replace").splitlines()]
        return "\n".join(lines[-max_lines:])

    # ------------------------------------------------------------------------------------------- changes
    def enqueue(self, kind: str, label: str, args: dict[str, Any], run_dir: Optional[str] = None) -> Job:
        """Add a job at the end of the queue (``args`` were validated by the caller; the runner checks again)."""
        if kind not in KINDS:
            raise JobError(f"unknown job kind {kind!r}; the studio runs {', '.join(KINDS)}")
        with self._lock:
            if run_dir and any(j.run_dir == run_dir and j.status in ACTIVE for j in self.jobs()):
                raise JobError(f"a queued or running job already writes to {run_dir}; choose another name")
            now = self.clock()
            job = Job(id=new_job_id(now), kind=kind, label=label, args=args, created=now, run_dir=run_dir)
            self._save(job)
        return job

    def cancel(self, job_id: str) -> str:
        """Remove a queued job, or SIGTERM a running one's process group. Returns what was done."""
        with self._lock:
            job = self.get(job_id)
            if job is None:
                return "no such job"
            if job.status == QUEUED:
                self.job_path(job.id).unlink(missing_ok=True)
                self.log_path(job).unlink(missing_ok=True)
                return f"removed {job.label} from the queue"
            if job.status != RUNNING or job.pid is None:
                return f"{job.label} is {job.status}; nothing to cancel"
            if job.cancel_requested is None:
                job.cancel_requested = self.clock()
                self._save(job)
            self._signal(job.pid, signal.SIGTERM)
            return f"asked {job.label} to stop (SIGTERM); it ends its MLflow run as KILLED"

    def clear_finished(self) -> int:
        """Forget ended jobs (their run folders stay). Returns how many were removed."""
        removed = 0
        with self._lock:
            for job in self.jobs():
                if job.status in TERMINAL:
                    for path in (self.job_path(job.id), self.log_path(job), self.exit_path(job)):
                        path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def pump(self) -> Optional[Job]:
        """Advance the queue: notice a finished job, escalate a stuck cancel, start the next job if none runs.

        Idempotent and cheap; the studio calls it on a timer. Returns the job running afterwards, if any.
        """
        with self._lock:
            running = [j for j in self.jobs() if j.status == RUNNING]
            for job in running:
                self._check(job)
            current = next((j for j in self.jobs() if j.status == RUNNING), None)
            if current is None:
                nxt = next((j for j in self.jobs() if j.status == QUEUED), None)
                if nxt is not None:
                    current = self._start(nxt)
            return current

    # ------------------------------------------------------------------------------------------ internals
    def _signal(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # already gone: the next pump records how it ended

    def _start(self, job: Job) -> Job:
        log = open(self.log_path(job), "ab")
        try:
            # A new session makes the runner a process-group leader: cancel signals the whole tree at once.
            process = subprocess.Popen([*self.runner, str(self.job_path(job.id))], cwd=self.workspace.repo_root,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        except OSError as exc:
            job.status, job.error, job.ended = FAILED, f"could not start the job runner: {exc}", self.clock()
            self._save(job)
            return job
        finally:
            log.close()
        _CHILDREN[process.pid] = process
        job.status, job.pid, job.started = RUNNING, process.pid, self.clock()
        self._save(job)
        return job

    def _check(self, job: Job) -> None:
        assert job.pid is not None
        if group_alive(job.pid):
            if job.cancel_requested and self.clock() - job.cancel_requested > self.cancel_grace_s:
                self._signal(job.pid, signal.SIGKILL)
            return
        record = read_exit(self.exit_path(job))
        job.ended = self.clock()
        job.returncode = record.get("returncode") if record else None
        if job.cancel_requested is not None:
            job.status = CANCELLED
        elif record is not None and job.returncode == 0:
            job.status = FINISHED
        else:
            job.status = FAILED
            job.error = self._failure_reason(job, record)
        self._save(job)

    def _failure_reason(self, job: Job, record: Optional[dict[str, Any]]) -> str:
        if record is None:
            return _NO_EXIT_RECORD
        if record.get("error"):
            return str(record["error"])
        progress = job_progress(job)
        if progress.error:
            return progress.error
        return _GENERIC_FAILURE.format(code=job.returncode)
