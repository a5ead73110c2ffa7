"""The studio's job queue (cascade_studio/ui/jobs.py) and runner (ui/runner.py).

Most tests use a stand-in runner (a short script written below) so that queue order, cancel, crashes and reloads
are checked in seconds with real processes and real signals; two slow tests run the real runner on a real job.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from cascade_studio.ui.commands import TrainRequest
from cascade_studio.ui.jobs import (CANCELLED, FAILED, FINISHED, QUEUED, RUNNING, JobQueue, group_alive,
                                    job_progress)
from cascade_studio.ui.workspace import REPO_ROOT, Workspace

# Behaviour comes from the job's args: sleep, exit code, whether to ignore SIGTERM, whether to die unrecorded.
FAKE_RUNNER = r'''
import json, os, signal, sys, time
from pathlib import Path
from cascade_studio.ui.jobs import write_exit
job_path = Path(sys.argv[1])
job = json.loads(job_path.read_text())
args = job["args"]
exit_path = job_path.with_suffix(".exit")
def on_term(signum, frame):
    write_exit(exit_path, -15, ["fake"], cancelled=True)
    sys.exit(1)
signal.signal(signal.SIGTERM, signal.SIG_IGN if args.get("ignore_term") else on_term)
with open(job_path.parent / "order.txt", "a") as f:
    f.write(f"start {job['label']} {time.time()}\n")
print(args.get("say", "working"), flush=True)
time.sleep(args.get("sleep", 0))
with open(job_path.parent / "order.txt", "a") as f:
    f.write(f"end {job['label']} {time.time()}\n")
if args.get("die"):
    os._exit(3)
write_exit(exit_path, args.get("rc", 0), ["fake"])
sys.exit(args.get("rc", 0))
'''


@pytest.fixture()
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws")


@pytest.fixture()
def fake_queue(ws: Workspace, tmp_path: Path) -> JobQueue:
    script = tmp_path / "fake_runner.py"
    script.write_text(FAKE_RUNNER)
    return JobQueue(ws, runner=[sys.executable, str(script)], cancel_grace_s=1.0)


def pump_until(queue: JobQueue, done, timeout: float = 60.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue.pump()
        if done():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out; jobs: {queue.jobs()}")


def test_jobs_run_one_at_a_time_in_queue_order(fake_queue: JobQueue) -> None:
    ids = [fake_queue.enqueue("train", f"job{i}", {"sleep": 0.5}).id for i in range(3)]
    assert [j.status for j in fake_queue.jobs()] == [QUEUED] * 3
    most_running = 0
    deadline = time.monotonic() + 60
    while any(j.status in (QUEUED, RUNNING) for j in fake_queue.jobs()) and time.monotonic() < deadline:
        fake_queue.pump()
        most_running = max(most_running, sum(j.status == RUNNING for j in fake_queue.jobs()))
        time.sleep(0.05)
    assert most_running == 1
    assert [fake_queue.get(i).status for i in ids] == [FINISHED] * 3
    events = [line.split() for line in (fake_queue.dir / "order.txt").read_text().splitlines()]
    assert [(kind, label) for kind, label, _ in events] == [("start", "job0"), ("end", "job0"), ("start", "job1"),
                                                           ("end", "job1"), ("start", "job2"), ("end", "job2")]
    starts = {label: float(t) for kind, label, t in events if kind == "start"}
    ends = {label: float(t) for kind, label, t in events if kind == "end"}
    assert starts["job1"] >= ends["job0"] and starts["job2"] >= ends["job1"]


def test_cancel_removes_a_queued_job_and_terminates_a_running_one(fake_queue: JobQueue) -> None:
    first = fake_queue.enqueue("train", "long", {"sleep": 60})
    second = fake_queue.enqueue("train", "waiting", {"sleep": 0})
    running = fake_queue.pump()
    assert running is not None and running.id == first.id and running.pid is not None
    assert "removed" in fake_queue.cancel(second.id)
    assert fake_queue.get(second.id) is None and [j.id for j in fake_queue.jobs()] == [first.id]
    order = fake_queue.dir / "order.txt"
    pump_until(fake_queue, lambda: order.exists() and "start long" in order.read_text())  # its handler is set
    assert "SIGTERM" in fake_queue.cancel(first.id)
    pump_until(fake_queue, lambda: fake_queue.get(first.id).status != RUNNING, timeout=20)
    job = fake_queue.get(first.id)
    assert job.status == CANCELLED and job.returncode == -15
    assert not group_alive(job.pid)


def test_a_job_ignoring_sigterm_is_killed_after_the_grace_period(fake_queue: JobQueue) -> None:
    job = fake_queue.enqueue("train", "stubborn", {"sleep": 60, "ignore_term": True})
    order = fake_queue.dir / "order.txt"
    pump_until(fake_queue, lambda: order.exists() and "start stubborn" in order.read_text())  # SIG_IGN is set
    fake_queue.cancel(job.id)
    time.sleep(0.3)
    assert group_alive(fake_queue.get(job.id).pid)  # SIGTERM alone did not stop it
    pump_until(fake_queue, lambda: fake_queue.get(job.id).status != RUNNING, timeout=20)
    assert fake_queue.get(job.id).status == CANCELLED


def test_a_crashed_job_shows_failed_with_its_log_and_the_queue_moves_on(fake_queue: JobQueue) -> None:
    bad = fake_queue.enqueue("train", "crash", {"say": "Traceback: boom", "rc": 1})
    dead = fake_queue.enqueue("train", "vanish", {"die": True})
    good = fake_queue.enqueue("train", "after", {})
    pump_until(fake_queue, lambda: fake_queue.get(good.id).status == FINISHED)
    crashed, vanished = fake_queue.get(bad.id), fake_queue.get(dead.id)
    assert crashed.status == FAILED and crashed.returncode == 1 and "code 1" in crashed.error
    assert "Traceback: boom" in fake_queue.log_tail(crashed)
    assert vanished.status == FAILED and "without recording an exit code" in vanished.error


def test_queue_state_survives_a_new_queue_object(fake_queue: JobQueue, ws: Workspace) -> None:
    job = fake_queue.enqueue("train", "survivor", {"sleep": 1.5})
    fake_queue.pump()
    # A reloaded studio (or a restarted server) only has the files in jobs/ to go by.
    reloaded = JobQueue(ws, runner=fake_queue.runner)
    assert reloaded.running().id == job.id
    pump_until(reloaded, lambda: reloaded.get(job.id).status == FINISHED)
    assert reloaded.clear_finished() == 1 and reloaded.jobs() == []


def test_the_same_run_folder_cannot_be_queued_twice(fake_queue: JobQueue) -> None:
    fake_queue.enqueue("train", "a", {"sleep": 5}, run_dir="/x/runs/a")
    with pytest.raises(ValueError, match="already writes"):
        fake_queue.enqueue("train", "a again", {}, run_dir="/x/runs/a")
    with pytest.raises(ValueError, match="unknown job kind"):
        fake_queue.enqueue("shell", "nope", {})


def test_progress_comes_from_this_jobs_events_only(fake_queue: JobQueue, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = fake_queue.enqueue("train", "p", {}, run_dir=str(run_dir))
    job.started = 1000.0
    events = [{"event": "step", "time": 900.0, "step": 50, "max_steps": 60, "loss": 9.0},  # an earlier run
              {"event": "started", "time": 1001.0, "run_id": "abc", "tracking_uri": "sqlite:///x"},
              {"event": "phase", "time": 1002.0, "phase": "train"},
              {"event": "step", "time": 1003.0, "step": 1, "max_steps": 4, "loss": 0.5, "lr": 1e-3,
               "eta_seconds": 9.0},
              {"event": "step", "time": 1004.0, "step": 2, "max_steps": 4, "loss": 0.25, "lr": 1e-3,
               "eta_seconds": 4.0},
              {"event": "failed", "time": 1005.0, "error": "RuntimeError: out of memory"}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "st')
    progress = job_progress(job)
    assert (progress.run_id, progress.phase, progress.step, progress.max_steps) == ("abc", "train", 2, 4)
    assert progress.fraction == 0.5 and progress.eta_seconds == 4.0
    assert progress.losses == [(1, 0.5), (2, 0.25)]
    assert (progress.outcome, progress.error) == ("failed", "RuntimeError: out of memory")


# ----------------------------------------------------------------------------------------- the real runner
def test_runner_refuses_a_recipe_that_became_invalid_while_queued(ws: Workspace) -> None:
    recipe = ws.recipes_dir / "mine.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text((REPO_ROOT / "recipes" / "tiny" / "lora.yaml").read_text())
    request = TrainRequest(str(recipe), "mine", ())
    request.validate(ws)
    queue = JobQueue(ws)
    job = queue.enqueue("train", "mine", request.to_args(), run_dir=str(request.run_dir(ws)))
    recipe.write_text("version: 1\ntrain:\n  max_steps: -5\n")  # edited after queueing
    pump_until(queue, lambda: queue.get(job.id).status not in (QUEUED, RUNNING))
    ended = queue.get(job.id)
    assert ended.status == FAILED and ended.returncode == 2 and "recipe problems" in ended.error
    assert "train.max_steps" in queue.log_tail(ended)


@pytest.mark.slow
def test_real_job_that_crashes_is_reported_failed_with_the_trainers_error(ws: Workspace, tmp_path: Path) -> None:
    empty = ws.root / "datasets" / "empty"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    request = TrainRequest(str(REPO_ROOT / "recipes" / "tiny" / "lora.yaml"), "crash",
                           (f"data.path={json.dumps(str(empty))}", "preview.every=0"))
    request.validate(ws)  # the recipe is valid: the folder exists; it only fails when the run scans it
    queue = JobQueue(ws)
    job = queue.enqueue("train", "crash", request.to_args(), run_dir=str(request.run_dir(ws)))
    pump_until(queue, lambda: queue.get(job.id).status not in (QUEUED, RUNNING), timeout=240, interval=0.5)
    ended = queue.get(job.id)
    assert ended.status == FAILED and ended.returncode not in (0, None)
    assert "EmptyDatasetError" in ended.error or "image" in ended.error.lower()
    assert "accelerate.commands.launch" in queue.log_tail(ended, 200)


@pytest.mark.slow
def test_real_training_job_cancelled_ends_its_mlflow_run_as_killed(ws: Workspace) -> None:
    request = TrainRequest(str(REPO_ROOT / "recipes" / "tiny" / "lora.yaml"), "stopme",
                           ("train.max_steps=5000", "preview.every=0", "train.checkpoint_every=0"))
    queue = JobQueue(ws)
    job = queue.enqueue("train", "stopme", request.to_args(), run_dir=str(request.run_dir(ws)))
    pump_until(queue, lambda: job_progress(queue.get(job.id)).step >= 1, timeout=240, interval=0.5)
    queue.cancel(job.id)
    pump_until(queue, lambda: queue.get(job.id).status != RUNNING, timeout=120, interval=0.5)
    ended = queue.get(job.id)
    assert ended.status == CANCELLED
    assert job_progress(ended).outcome == "killed"
    from cascade_studio.tracking import read_run

    assert read_run(ws.tracking_uri(), job_progress(ended).run_id)["status"] == "KILLED"
    assert not group_alive(ended.pid)
