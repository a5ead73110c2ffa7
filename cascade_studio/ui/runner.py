"""``python -m cascade_studio.ui.runner <jobs/ID.json>``: run one studio job and record how it ended.

Started by :class:`cascade_studio.ui.jobs.JobQueue` as the leader of a new process group, with stdout/stderr
going to the job's log. It rebuilds the command from the job's kind and arguments (``ui/commands.py``; the job
file holds no command text), validates again (the recipe may have changed while the job waited), runs the
command, waits for every process of its group to exit, and writes ``<id>.exit``. On SIGTERM (a cancel from the
studio, sent to the whole group) it keeps waiting, so the trainer can end its MLflow run as KILLED first.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..config import RecipeError
from .commands import CompareRequest, TrainRequest, compare_argv, train_command
from .jobs import Job, group_members, write_exit
from .workspace import Workspace

# How long the runner waits for the rest of its process group after the command's own process has exited.
_GROUP_EXIT_WAIT_S = 60.0


def build(job: Job, workspace: Workspace) -> tuple[list[str], dict[str, str]]:
    """(argv, env) for a job; raises ``RecipeError``/``ValueError`` when its arguments are no longer valid."""
    if job.kind == "train":
        return train_command(TrainRequest.from_args(job.args), workspace)
    if job.kind == "compare":
        return compare_argv(CompareRequest.from_args(job.args), workspace), dict(os.environ)
    raise ValueError(f"unknown job kind {job.kind!r}")


def _wait_for_group(timeout_s: float) -> None:
    """Wait until this runner is the last live process of its group (or the timeout passes)."""
    pgid, me = os.getpgrp(), os.getpid()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_members(pgid, exclude=(me,)):  # None (no /proc) also ends the wait
            return
        time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m cascade_studio.ui.runner <workspace>/jobs/<id>.json", file=sys.stderr)
        return 2
    job_path = Path(args[0]).resolve()
    job = Job.from_dict(json.loads(job_path.read_text()))
    # The --allow-path folders come from the studio's environment, so a job is checked by the studio's policy.
    workspace = Workspace.from_env(root=job_path.parent.parent)
    exit_path = job_path.with_suffix(".exit")
    terminated = False

    def on_term(signum, frame) -> None:  # a handler, not SIG_IGN: exec'd children get the default action back
        nonlocal terminated
        terminated = True

    signal.signal(signal.SIGTERM, on_term)
    print(f"[studio] job {job.id} ({job.kind}): {job.label}", flush=True)
    try:
        command, env = build(job, workspace)
    except RecipeError as exc:
        print(f"[studio] the recipe is no longer valid:\n{exc}", flush=True)
        write_exit(exit_path, 2, [], error=f"recipe problems: {len(exc.problems)}; fix the recipe and launch again")
        return 2
    except ValueError as exc:
        print(f"[studio] cannot run this job: {exc}", flush=True)
        write_exit(exit_path, 2, [], error=str(exc))
        return 2
    print("[studio] $ " + " ".join(command), flush=True)
    if terminated:  # cancelled while the command was being built
        write_exit(exit_path, -signal.SIGTERM, command, cancelled=True)
        return 1
    process = subprocess.Popen(command, env=env, cwd=workspace.repo_root)
    while True:
        try:
            returncode = process.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue
    _wait_for_group(_GROUP_EXIT_WAIT_S)
    print(f"[studio] exit code {returncode}" + (" (cancelled)" if terminated else ""), flush=True)
    write_exit(exit_path, returncode, command, cancelled=terminated)
    return 0 if returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
