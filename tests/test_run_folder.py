"""The run folder (cascade_studio/run_folder.py): one layout and one complete-checkpoint rule for every reader,
and one owner per folder.

The lock tests inject the faults where they happen: two real ``cascade-studio train`` processes started together
with the same name, a ``--resume`` of a run that is still training, a 2-process (DDP) launch into a folder that
is taken, and a training process SIGKILLed while it holds the lock.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cascade_studio.run_folder import (ADAPTER_FILE, COMPLETE_MARKER, RunFolder, RunFolderBusy, checkpoint_name)
from subprocess_env import child_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "lora.yaml")
DATA = REPO / "datasets" / "tiny-shapes"
FAST = [f"data.path={DATA}", "preview.every=0", "data.holdout_fraction=0", "train.checkpoint_every=5"]


def cli() -> list[str]:
    """The console script users run (``cascade-studio``), from the environment running the tests."""
    script = Path(sys.executable).with_name("cascade-studio")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cascade_studio.cli"]


def mlflow_runs(workspace: Path, name: str) -> list[dict]:
    from cascade_studio.tracking import list_runs

    if not (workspace / "mlflow.db").exists():
        return []
    return [r for r in list_runs(f"sqlite:///{workspace / 'mlflow.db'}", "cascade-studio") if r["run_name"] == name]


def hold_lock_in_child(folder: RunFolder) -> subprocess.Popen:
    """Another process that owns ``folder`` (as a training run would) until it is killed."""
    code = ("import sys, time\nfrom cascade_studio.run_folder import RunFolder\n"
            "lock = RunFolder(sys.argv[1]).lock(command='stand-in run')\nprint('locked', flush=True)\n"
            "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder.path)], cwd=REPO, env=child_env(),
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


# ------------------------------------------------------------------------------------------------- layout
def test_layout_and_the_one_complete_checkpoint_rule(tmp_path: Path) -> None:
    from cascade_studio.adapters import catalog
    from cascade_studio.inference.adapters import AdapterSpec, resolve_adapter
    from cascade_studio.trainers.checkpoints import CheckpointManager
    from cascade_studio.ui.runs_data import checkpoint_dirs

    run = RunFolder.in_workspace(tmp_path, "r")
    assert run.path == tmp_path / "runs" / "r"
    assert (run.recipe_file, run.events_file) == (run.path / "recipe.yaml", run.path / "events.jsonl")
    assert run.checkpoint(40) == run.path / "checkpoints" / "step-00000040"
    assert run.preview_path(30) == run.path / "previews" / "step-000030.png"
    lora = catalog.get("lora")  # the format decides file or folder; the run folder, where and the name
    assert lora.export_format("comfyui").target(run.export_dir, run.export_stem()) == \
        run.path / "export" / "r-comfyui.safetensors"
    assert lora.export_format("peft").target(run.export_dir, run.export_stem(step=40)) == \
        run.path / "export" / "r-step40-peft"
    assert not run.path.exists()  # naming paths creates nothing

    manager = CheckpointManager(run.checkpoints_dir)
    from cascade_studio.trainers.checkpoints import RunState

    for step in (10, 20):
        manager.save(step, lambda d: (d / ADAPTER_FILE).write_bytes(b"tensors"), RunState(step=step))
    run.checkpoint(30).mkdir()  # renamed but its marker is gone: not complete
    (run.checkpoints_dir / f"tmp-{checkpoint_name(40)}").mkdir()  # a save in progress
    (run.checkpoints_dir / "step-50").mkdir()  # not a checkpoint name (8+ digits)
    (run.checkpoints_dir / "step-50" / COMPLETE_MARKER).write_text("{}")

    expected = {10: run.checkpoint(10), 20: run.checkpoint(20)}
    assert run.checkpoints() == expected
    # every reader applies the same rule: the trainer, the studio and generation (ckpt: specs)
    assert {manager.step_of(p): p for p in manager.list()} == expected
    assert checkpoint_dirs(run.path) == expected
    assert RunFolder.of_checkpoint(run.checkpoint(20)) == (run, 20)
    with pytest.raises(FileNotFoundError, match=r"steps \[10, 20\]"):
        resolve_adapter(AdapterSpec(source=str(run.path), origin="ckpt", step=30))
    assert run.latest_checkpoint() == run.checkpoint(20) == run.latest_checkpoint(verify=True)
    assert (run.checkpoints_dir / "tmp-step-00000040").is_dir()  # readers never clean up a save in progress


# ------------------------------------------------------------------------------------------------ locking
def test_one_owner_per_folder_and_release_lets_the_next_one_in(tmp_path: Path) -> None:
    run = RunFolder.in_workspace(tmp_path, "r")
    with run.lock(command="first") as first:
        assert run.owner() == first.owner and first.owner.pid == os.getpid()
        with pytest.raises(RunFolderBusy) as refused:
            run.lock()
        message = str(refused.value)
        assert str(run.path) in message and f"pid {os.getpid()}" in message
        assert "another name" in message and "--resume" in message
    assert run.owner() is None and not first.held
    with run.lock() as second:
        assert second.stale is None  # released cleanly, so nothing was taken over


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    run = RunFolder.in_workspace(tmp_path, "r")
    child = hold_lock_in_child(run)
    with pytest.raises(RunFolderBusy, match=f"pid {child.pid}"):
        run.lock()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert run.owner() is None  # its record is still in the file, but the process is gone
    with run.lock() as lock:
        assert lock.stale is not None and lock.stale.pid == child.pid


def test_the_studio_refuses_to_launch_into_a_folder_a_command_line_run_owns(tmp_path: Path) -> None:
    from cascade_studio.ui.commands import TrainRequest
    from cascade_studio.ui.workspace import Workspace

    workspace = Workspace(tmp_path / "ws")
    request = TrainRequest(RECIPE, "busy", ("train.max_steps=2",))
    child = hold_lock_in_child(RunFolder(request.run_dir(workspace)))
    try:
        with pytest.raises(ValueError, match=f"in use by another training run \\(pid {child.pid}"):
            request.validate(workspace)
    finally:
        child.kill()
        child.wait(timeout=30)
    request.validate(workspace)  # the owner is gone: launchable again


@pytest.mark.slow
def test_resume_of_a_running_run_is_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    from cascade_studio.run import main as run_main

    run = RunFolder.in_workspace(tmp_path, "running")
    run.path.mkdir(parents=True)
    run.recipe_file.write_text("the running run's recipe\n")
    run.events_file.write_text('{"event": "started", "time": 1}\n')
    child = hold_lock_in_child(run)
    try:
        code = run_main([RECIPE, *FAST, "train.max_steps=2", f"workspace={tmp_path}", "name=running", "--resume",
                         "--no-progress"])
    finally:
        child.kill()
        child.wait(timeout=30)
    err = capsys.readouterr().err
    assert code == 1
    assert f"run folder {run.path} is in use" in err and f"pid {child.pid}" in err and "--resume" in err
    assert run.recipe_file.read_text() == "the running run's recipe\n"
    assert run.events_file.read_text() == '{"event": "started", "time": 1}\n'
    assert mlflow_runs(tmp_path, "running") == []


@pytest.mark.slow
def test_two_runs_with_the_same_name_started_together_one_is_refused(tmp_path: Path) -> None:
    """Fault injection (issue 17): the same name at once. Each run gets its own seed, so whose result the folder
    holds can be told apart."""
    runs = [subprocess.Popen([*cli(), "train", RECIPE, *FAST, "train.max_steps=20", f"train.seed={seed}",
                              f"workspace={tmp_path}", "name=same", "--no-progress"],
                             cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed in (1, 2)]
    outputs = [r.communicate(timeout=900) for r in runs]
    codes = [r.returncode for r in runs]
    assert sorted(codes) == [0, 1], (codes, outputs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    folder = RunFolder.in_workspace(tmp_path, "same")
    refusal = outputs[loser][1]
    assert f"run folder {folder.path} is in use by another training run (pid {runs[winner].pid}" in refusal
    assert "Traceback" not in refusal

    # the folder holds the winner's run only, whole
    from cascade_studio.config import load_recipe

    assert load_recipe(folder.recipe_file).train.seed == (1, 2)[winner]
    events = folder.events()
    assert [e["event"] for e in events].count("started") == 1
    assert events[-1]["event"] == "finished" and events[-1]["step"] == 20
    assert sorted(folder.checkpoints()) == [15, 20]
    store = mlflow_runs(tmp_path, "same")
    assert [r["status"] for r in store] == ["FINISHED"] and store[0]["run_id"] == events[0]["run_id"]
    from cascade_studio.adapters.files import load_adapter_tensors
    from cascade_studio.export import export_from_run

    exported, _ = load_adapter_tensors(export_from_run(folder.path, "comfyui", tmp_path / "again.safetensors"))
    written, _ = load_adapter_tensors(Path(events[-1]["exports"][0]))
    assert Path(events[-1]["exports"][0]).parent == folder.export_dir
    assert exported.keys() == written.keys() and all((exported[k] == written[k]).all() for k in exported)
    assert folder.owner() is None  # released at the end


@pytest.mark.slow
def test_a_run_sigkilled_while_training_does_not_block_its_resume(tmp_path: Path, capsys) -> None:
    from cascade_studio.run import main as run_main

    folder = RunFolder.in_workspace(tmp_path, "killed")
    child = subprocess.Popen([*cli(), "train", RECIPE, *FAST, "train.max_steps=400", f"workspace={tmp_path}",
                              "name=killed", "--no-progress"], cwd=REPO, env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not folder.checkpoints():  # training, and owning its folder
            assert child.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        assert folder.owner() is not None and folder.owner().pid == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert json.loads(folder.lock_file.read_text())["pid"] == child.pid  # the dead owner's record is left behind
    code = run_main([RECIPE, *FAST, "train.max_steps=10", f"workspace={tmp_path}", "name=killed", "--resume",
                     "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"was locked by a run that is gone (pid {child.pid}" in out
    assert folder.events()[-1]["event"] == "finished" and folder.owner() is None


@pytest.mark.slow
def test_a_two_process_run_into_a_taken_folder_stops_on_every_rank(tmp_path: Path) -> None:
    """Only the main process owns the folder; the other rank learns it was refused and stops too (no rank waits
    at a barrier for a main process that has gone)."""
    folder = RunFolder.in_workspace(tmp_path, "ddp")
    owner = hold_lock_in_child(folder)
    try:
        launch = subprocess.Popen([*cli(), "train", RECIPE, *FAST, "train.max_steps=2", f"workspace={tmp_path}",
                                   "name=ddp", "--processes", "2", "--no-progress"], cwd=REPO, env=child_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = launch.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.communicate()
            pytest.fail("the 2-process run hung instead of stopping")
    finally:
        owner.kill()
        owner.wait(timeout=30)
    assert launch.returncode != 0, (out, err)
    assert f"run folder {folder.path} is in use by another training run (pid {owner.pid}" in err
    assert not folder.recipe_file.exists() and not folder.events_file.exists()
    assert mlflow_runs(tmp_path, "ddp") == []
