"""Reliability of a whole training run: numerical faults, crashes, interrupts, full disks, tracking outages,
atomic exports, concurrent runs sharing a cache, and the studio's queue.

Faults are injected where they would really happen (the loss step, the MLflow client, the file-size limit of the
process), and each test checks what the user is left with: a clear message, an honest MLflow status, events, and
a last good checkpoint.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade_studio.run import main as run_main
from cascade_studio.run import train
from cascade_studio.tracking import BUFFER_FILE, Tracker, TrackingUnavailableError, list_runs, read_run
from cascade_studio.trainers import steps as steps_module
from cascade_studio.trainers.checkpoints import CheckpointManager
from cascade_studio.trainers.events import read_events
from cascade_studio.trainers.loop import NonFiniteLossError
from subprocess_env import child_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "lora.yaml")
DATA = REPO / "datasets" / "tiny-shapes"
FAST = [f"data.path={DATA}", "preview.every=0", "train.max_steps=6", "train.checkpoint_every=1",
        "train.keep_checkpoints=10", "data.holdout_fraction=0"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """One workspace for the in-process runs: the cache is encoded once, each test uses its own run name."""
    return tmp_path_factory.mktemp("ws")


def overrides(workspace: Path, name: str, *extra: str) -> list[str]:
    return [*FAST, f"workspace={workspace}", f"name={name}", *extra]


def uri(workspace: Path) -> str:
    return f"sqlite:///{workspace / 'mlflow.db'}"


def trainable(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


class LossFault:
    """Wraps the loop's loss step: poisons chosen steps with NaN (loss and, through backward, gradients), or
    raises there; records the trainable weights each step starts from."""

    def __init__(self, monkeypatch, nan_steps=(), raise_at=None, exc=None):
        self.real = steps_module.diffusion_training_loss
        self.nan_steps, self.raise_at, self.exc = set(nan_steps), raise_at, exc
        self.step = 0
        self.weights_at_start: dict[int, list[torch.Tensor]] = {}
        monkeypatch.setattr(steps_module, "diffusion_training_loss", self)  # the run's loss step

    def __call__(self, model, batch, **kwargs):
        self.step += 1
        self.weights_at_start[self.step] = trainable(model)
        if self.step == self.raise_at:
            raise self.exc
        loss = self.real(model, batch, **kwargs)
        return loss * float("nan") if self.step in self.nan_steps else loss


def assert_finite_file(path: Path) -> None:
    assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path


# -------------------------------------------------------------------------------------------- numerical faults
def test_one_nonfinite_step_is_skipped_counted_and_changes_nothing(workspace, monkeypatch):
    fault = LossFault(monkeypatch, nan_steps={3})
    result = train(RECIPE, overrides(workspace, "one-nan"), progress=False)
    assert result.step == 6  # the run went on
    same = [torch.equal(a, b) for a, b in zip(fault.weights_at_start[3], fault.weights_at_start[4])]
    assert all(same), "the skipped step changed the adapter"
    assert not all(torch.equal(a, b) for a, b in zip(fault.weights_at_start[2], fault.weights_at_start[3]))
    events = read_events(result.run_dir)
    assert [e["step"] for e in events if e["event"] == "nonfinite"] == [3]
    checkpointed = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert checkpointed == [1, 2, 4, 5, 6]  # never a checkpoint of a poisoned step
    skipped = read_run(uri(workspace), result.run_id)["metrics"]["nonfinite_skipped"]
    assert [(p["step"], p["value"]) for p in skipped] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 1)]


def test_nonfinite_last_step_still_checkpoints_the_unchanged_adapter(workspace, monkeypatch):
    LossFault(monkeypatch, nan_steps={6})
    result = train(RECIPE, overrides(workspace, "last-nan"), progress=False)
    checkpoints = result.run_dir / "checkpoints"
    final, before = (load_file(str(checkpoints / f"step-0000000{s}" / "adapter.safetensors")) for s in (6, 5))
    assert all(torch.equal(final[k], before[k]) for k in before)  # what is exported is what was saved
    assert [p.name for p in result.exports] == ["last-nan-comfyui.safetensors"]


def test_nonfinite_weights_are_never_exported(workspace, monkeypatch):
    """Weights that became NaN in the last update (loss and gradient were still finite) are caught at export."""
    fault = LossFault(monkeypatch)
    real = fault.real

    def poison_at_the_end(model, batch, **kwargs):
        loss = real(model, batch, **kwargs)
        if fault.step == 6:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return loss

    fault.real = poison_at_the_end
    with pytest.raises(NonFiniteLossError, match="not exported"):
        train(RECIPE, overrides(workspace, "nan-weights"), progress=False)
    run_dir = workspace / "runs" / "nan-weights"
    assert CheckpointManager(run_dir / "checkpoints").latest().name == "step-00000005"
    assert not (run_dir / "export").exists()
    assert any(e["event"] == "warning" and e["step"] == 6 for e in read_events(run_dir))


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(workspace, monkeypatch, capsys):
    LossFault(monkeypatch, nan_steps={4, 5, 6})
    code = run_main([RECIPE, *overrides(workspace, "nan-streak", "train.max_nonfinite_steps=3",
                                        "train.max_steps=8"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "3 steps in a row had a non-finite loss" in err and "lower optimizer.lr" in err
    run_dir = workspace / "runs" / "nan-streak"
    # Steps 4-6 all ran with step 3's weights (skipped steps do not update): those weights are set aside.
    good = run_dir / "checkpoints" / "step-00000002"
    assert f"last sound checkpoint ({good})" in err and "Traceback" not in err
    assert "step-00000003 held the weights that failed" in err
    unsound = run_dir / "checkpoints" / "unsound-step-00000003"
    assert "from 4 to 6" in (unsound / "REASON.txt").read_text()
    latest = CheckpointManager(run_dir / "checkpoints").latest()
    assert latest == good
    assert_finite_file(latest / "adapter.safetensors")
    events = read_events(run_dir)
    assert events[-1]["event"] == "failed" and "NonFiniteLossError" in events[-1]["error"]
    assert not (run_dir / "export").exists()
    run_id = next(e["run_id"] for e in events if e["event"] == "started")
    assert read_run(uri(workspace), run_id)["status"] == "FAILED"


def test_absurd_learning_rate_overflows_and_stops_cleanly(workspace):
    """A real overflow (no injection): lr 1e30 in fp32 makes the LoRA output overflow after the first update."""
    with pytest.raises(NonFiniteLossError, match="in a row"):
        train(RECIPE, overrides(workspace, "absurd-lr", "optimizer.lr=1e30", "optimizer.name=adamw",
                                "train.max_nonfinite_steps=2", "train.max_grad_norm=0"), progress=False)
    checkpoints = CheckpointManager(workspace / "runs" / "absurd-lr" / "checkpoints")
    # The first step's checkpoint is finite but not sound: its weights overflow in the next forward. It is not
    # offered for --resume (it used to be "the last good checkpoint"); it stays, renamed, for inspection.
    assert checkpoints.list() == []
    unsound = workspace / "runs" / "absurd-lr" / "checkpoints" / "unsound-step-00000001"
    assert_finite_file(unsound / "adapter.safetensors")
    assert max(t.abs().max() for t in load_file(str(unsound / "adapter.safetensors")).values()) > 1e6
    assert not (workspace / "runs" / "absurd-lr" / "export").exists()


# ------------------------------------------------------------------------------------ crashes and interrupts
def test_crash_marks_the_run_failed_with_the_error_in_events(workspace, monkeypatch):
    LossFault(monkeypatch, raise_at=3, exc=RuntimeError("simulated bug in the loss step"))
    with pytest.raises(RuntimeError, match="simulated bug"):
        train(RECIPE, overrides(workspace, "crash"), progress=False)
    events = read_events(workspace / "runs" / "crash")
    failed = events[-1]
    assert failed["event"] == "failed"
    assert failed["error"] == "RuntimeError: simulated bug in the loss step"
    assert "simulated bug" in failed["traceback"] and "Traceback" in failed["traceback"]
    run_id = next(e["run_id"] for e in events if e["event"] == "started")
    assert read_run(uri(workspace), run_id)["status"] == "FAILED"


def test_keyboard_interrupt_marks_killed_and_resume_continues_the_same_run(workspace, monkeypatch, capsys):
    """Ctrl-C (or the studio's SIGTERM, turned into KeyboardInterrupt) before any checkpoint was written."""
    LossFault(monkeypatch, raise_at=2, exc=KeyboardInterrupt())
    args = [RECIPE, *overrides(workspace, "interrupted", "train.checkpoint_every=0"), "--no-progress"]
    assert run_main(args) == 130
    assert "marked KILLED" in capsys.readouterr().err
    run_dir = workspace / "runs" / "interrupted"
    events = read_events(run_dir)
    assert events[-1]["event"] == "killed"
    run_id = events[0]["run_id"]
    assert read_run(uri(workspace), run_id)["status"] == "KILLED"
    monkeypatch.undo()
    result = train(RECIPE, args[1:-1], resume=True, progress=False)  # no checkpoint: starts again at step 0
    assert result.run_id == run_id and result.step == 6
    run = read_run(uri(workspace), run_id)
    assert run["status"] == "FINISHED"
    assert [p["step"] for p in run["metrics"]["loss"]] == [1, 2, 3, 4, 5, 6]  # step 1 ran twice, logged once


# ---------------------------------------------------------------------------------------------- full disk
DISK_FULL_DRIVER = r"""
import resource, signal, sys
from cascade_studio.trainers import loop

save = loop.save_checkpoint
saved = []

def save_then_fill_the_disk(*args, **kwargs):
    save(*args, **kwargs)
    saved.append(1)
    if len(saved) == 2:
        # From now on no file may grow past 64 KiB: the next adapter (192 KiB) cannot be written.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

loop.save_checkpoint = save_then_fill_the_disk
from cascade_studio.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_full_disk_stops_the_run_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    args = ["train", RECIPE, *FAST, f"workspace={tmp_path}", "name=full-disk", "--no-progress"]
    result = subprocess.run([sys.executable, "-c", DISK_FULL_DRIVER, *args], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    # The run ends on one clear line (MLflow's own logger may print its SQLite errors above it: the store
    # lives on the same full disk, and the tracker buffers what it cannot send).
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: Could not write "), result.stderr
    assert "the file-size limit of this process was reached" in message
    assert "tmp-step-00000003" in message and "earlier checkpoints are intact" in message
    assert "then resume the run" in message
    ckpt_dir = tmp_path / "runs" / "full-disk" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    latest = CheckpointManager(ckpt_dir).latest()
    assert latest is not None and latest.name == "step-00000002"  # hashes verified
    events = read_events(tmp_path / "runs" / "full-disk")
    assert events[-1]["event"] == "failed" and "DiskFullError" in events[-1]["error"]


# ------------------------------------------------------------------------------------------ tracking faults
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_tracking_server_stops_before_anything_is_trained(tmp_path, capsys, monkeypatch):
    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}.items():
        monkeypatch.setenv(name, value)
    server = f"http://127.0.0.1:{closed_port()}"
    code = run_main([RECIPE, *FAST, f"workspace={tmp_path}", "name=no-server", f"tracking.uri={server}",
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"The MLflow tracking server at {server} is not reachable" in err and "mlflow server" in err
    assert not (tmp_path / "cache").exists()  # no data encoded, no model built, nothing trained
    assert not (tmp_path / "runs" / "no-server" / "checkpoints").exists()
    assert not [e for e in read_events(tmp_path / "runs" / "no-server") if e["event"] in ("phase", "step")]
    with pytest.raises(TrackingUnavailableError):  # the same through the Python API
        train(RECIPE, [*FAST, f"workspace={tmp_path}", "name=no-server", f"tracking.uri={server}"], progress=False)


class ServerOutage:
    """After the run's tracker starts, its MLflow client fails (ConnectionError) while ``down`` is true;
    ``down`` follows the training step being logged: [first, last] is the outage, last=None means it never ends."""

    def __init__(self, monkeypatch, first: int, last: int | None):
        self.first, self.last, self.down, self.failures = first, last, False, 0
        self.buffered_at: dict[int, bool] = {}
        start, log_metrics = Tracker.start.__func__, Tracker.log_metrics
        outage = self

        def start_then_break(cls, *args, **kwargs):
            tracker = start(cls, *args, **kwargs)
            tracker.retry_interval_s = 0.0  # retry at every record, so recovery is seen mid-run
            for name in ("log_batch", "log_artifact", "log_artifacts", "set_terminated", "update_run"):
                real = getattr(tracker.client, name)

                def failing(*a, _real=real, **k):
                    if outage.down:
                        outage.failures += 1
                        raise ConnectionError("tracking server went away")
                    return _real(*a, **k)

                setattr(tracker.client, name, failing)
            return tracker

        def log_metrics_following_the_step(self, metrics, step):
            outage.buffered_at[step] = self.buffer_path.exists()
            outage.down = step >= outage.first and (outage.last is None or step <= outage.last)
            log_metrics(self, metrics, step)

        monkeypatch.setattr(Tracker, "start", classmethod(start_then_break))
        monkeypatch.setattr(Tracker, "log_metrics", log_metrics_following_the_step)


def test_tracking_outage_mid_run_buffers_and_sends_when_the_server_is_back(workspace, monkeypatch):
    outage = ServerOutage(monkeypatch, first=2, last=4)
    result = train(RECIPE, overrides(workspace, "outage"), progress=False)
    assert result.step == 6 and outage.failures > 0
    assert outage.buffered_at[3] and outage.buffered_at[5]  # records waited in the run folder ...
    assert not outage.buffered_at[6]  # ... and were sent once the server answered again, mid-run
    assert not (result.run_dir / BUFFER_FILE).exists()
    run = read_run(uri(workspace), result.run_id)
    assert run["status"] == "FINISHED"
    assert [p["step"] for p in run["metrics"]["loss"]] == [1, 2, 3, 4, 5, 6]
    assert "adapter/outage-comfyui.safetensors" in run["artifacts"]


def test_tracking_server_gone_for_good_leaves_records_in_the_run_folder(workspace, monkeypatch, caplog):
    from cascade_studio.tracking import replay_buffer

    ServerOutage(monkeypatch, first=3, last=None)
    result = train(RECIPE, overrides(workspace, "gone"), progress=False)
    assert result.step == 6  # training never noticed
    buffered = [json.loads(line) for line in (result.run_dir / BUFFER_FILE).read_text().splitlines()]
    assert [r["step"] for r in buffered if r["kind"] == "metrics" and "loss" in r["values"]] == [3, 4, 5, 6]
    assert buffered[-1] == {**buffered[-1], "kind": "end", "status": "FINISHED"}
    assert any("could not be sent" in r.message and "replay_buffer" in r.message for r in caplog.records)
    assert read_run(uri(workspace), result.run_id)["status"] == "RUNNING"
    monkeypatch.undo()
    assert replay_buffer(uri(workspace), result.run_dir) == 0  # the server is back: everything arrives
    run = read_run(uri(workspace), result.run_id)
    assert run["status"] == "FINISHED" and [p["step"] for p in run["metrics"]["loss"]] == [1, 2, 3, 4, 5, 6]


# -------------------------------------------------------------------------------------------- atomic exports
def _die_while_writing(target: str) -> None:
    """Child process: overwrite ``target`` through the adapter writer, SIGKILLed halfway through the bytes."""
    import safetensors.torch

    from cascade_studio.adapters.files import save_adapter_tensors

    def half_then_die(tensors, filename, metadata=None):
        payload = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as handle:
            handle.write(payload[: len(payload) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = half_then_die
    save_adapter_tensors({"lora_unet_x.lora_up.weight": torch.ones(256, 256)}, target, {"version": "new"})


def test_kill_while_exporting_leaves_the_previous_export(tmp_path):
    from cascade_studio.adapters.files import load_adapter_tensors, save_adapter_tensors

    target = tmp_path / "export" / "run-comfyui.safetensors"
    save_adapter_tensors({"lora_unet_x.lora_up.weight": torch.zeros(4, 4)}, target, {"version": "old"})
    before = target.read_bytes()
    # spawn, not fork: this process has run torch (OpenMP) threads, which a forked child may deadlock on.
    child = multiprocessing.get_context("spawn").Process(target=_die_while_writing, args=(str(target),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert target.read_bytes() == before  # the old file, whole
    tensors, metadata = load_adapter_tensors(target)
    assert metadata["version"] == "old" and torch.equal(tensors["lora_unet_x.lora_up.weight"], torch.zeros(4, 4))
    leftovers = [p for p in target.parent.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")  # the torn bytes never took the name
    assert 0 < leftovers[0].stat().st_size < 256 * 256 * 4


# --------------------------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_two_concurrent_runs_share_one_cache_without_corrupting_it(tmp_path, monkeypatch):
    from cascade_studio.trainers import features

    runs = [subprocess.Popen([sys.executable, "-m", "cascade_studio.cli", "train",
                              RECIPE, *FAST, "train.max_steps=3", f"workspace={tmp_path}", f"name=together-{i}",
                              "--no-progress"],
                             cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    adapters = [load_file(str(CheckpointManager(tmp_path / "runs" / f"together-{i}" / "checkpoints").latest()
                              / "adapter.safetensors")) for i in range(2)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # same features, same result

    # The shared cache is whole: every shard verifies and a third run encodes nothing.
    calls = []
    for cls in (features.LatentFeature, features.TextFeature):
        real = cls.encode
        monkeypatch.setattr(cls, "encode", lambda self, batch, _real=real: calls.append(1) or _real(self, batch))
    train(RECIPE, [*FAST, "train.max_steps=1", f"workspace={tmp_path}", "name=after"], progress=False)
    assert calls == []
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    runs_in_store = list_runs(uri(tmp_path), "cascade-studio")
    assert sorted(r["status"] for r in runs_in_store) == ["FINISHED"] * 3


def test_two_studio_launches_queue_one_job_at_a_time(tmp_path):
    from cascade_studio.ui.jobs import JobQueue
    from cascade_studio.ui.workspace import Workspace

    # A stand-in runner: holds the job until a release file appears, then records exit code 0 as the real one.
    runner = [sys.executable, "-c", (
        "import sys, time, pathlib\n"
        "from cascade_studio.ui.jobs import write_exit\n"
        "job = pathlib.Path(sys.argv[1])\n"
        "while not job.with_suffix('.release').exists(): time.sleep(0.02)\n"
        "write_exit(job.with_suffix('.exit'), 0, ['stand-in'])\n")]
    workspace = Workspace(tmp_path)
    first_ui, second_ui = JobQueue(workspace, runner=runner), JobQueue(workspace, runner=runner)
    a = first_ui.enqueue("train", "run a", {"recipe": RECIPE})
    b = second_ui.enqueue("train", "run b", {"recipe": RECIPE})
    assert first_ui.pump().id == a.id and second_ui.pump().id == a.id  # the second launch waits
    assert [j.status for j in second_ui.jobs()] == ["running", "queued"]
    first_ui.job_path(a.id).with_suffix(".release").touch()
    import time

    deadline = time.monotonic() + 60
    while (current := second_ui.pump()) is not None and current.id == a.id:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert current is not None and current.id == b.id
    assert [j.status for j in first_ui.jobs()] == ["finished", "running"]
    first_ui.job_path(b.id).with_suffix(".release").touch()
    while first_ui.pump() is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [j.status for j in first_ui.jobs()] == ["finished", "finished"]
