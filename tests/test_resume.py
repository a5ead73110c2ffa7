"""Crash and resume at the run level: a run killed again and again (SIGKILL at seeded random steps, SIGKILL in the
middle of a checkpoint write, SIGTERM from outside) and resumed with --resume ends with the same adapter as the
same run without interruption, and keeps one MLflow run.

The recipe makes every piece of state matter: a cosine schedule with warmup (LR schedule), LoRA dropout (global
RNG), caption dropout (per-step generator), 8-bit AdamW (optimizer state), and 12 steps of batch 4 over 18 images
(the sampler crosses epoch boundaries). Checkpoints every 2 steps, so most kills repeat steps done since the last
checkpoint; equality says those repeats draw exactly what the first attempt drew.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade_studio.trainers.checkpoints import CheckpointManager
from cascade_studio.trainers.events import read_events
from subprocess_env import child_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "lora.yaml")
MAX_STEPS = 12
OVERRIDES = [f"data.path={REPO / 'datasets' / 'tiny-shapes'}", "preview.every=0", f"train.max_steps={MAX_STEPS}",
             "train.checkpoint_every=2", "train.keep_checkpoints=2", "schedule.name=cosine",
             "schedule.warmup_steps=3", "adapter.lora.dropout=0.1", "name=resumable"]

# Runs the CLI in a child process with optional fault injection, so the faults hit the real code paths:
#   CS_TEST_KILL_AT_STEP=k   SIGKILL right after step k is reported (before that step's checkpoint, if any)
#   CS_TEST_TEAR_SAVE_AT=k   SIGKILL halfway through writing optimizer.safetensors of checkpoint k
DRIVER = r"""
import os, signal, sys
from pathlib import Path

kill_at = int(os.environ.get("CS_TEST_KILL_AT_STEP", "0"))
tear_at = int(os.environ.get("CS_TEST_TEAR_SAVE_AT", "0"))
if kill_at:
    from cascade_studio.trainers import events

    emit = events.EventLog.emit

    def emit_then_die(self, event, **fields):
        emit(self, event, **fields)
        if event == "step" and fields.get("step") == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    events.EventLog.emit = emit_then_die
if tear_at:
    from cascade_studio.trainers import atomic

    write_bytes = atomic.atomic_write_bytes

    def torn_write(path, data):
        path = Path(path)
        if path.name == "optimizer.safetensors" and path.parent.name == f"tmp-step-{tear_at:08d}":
            def half(handle):
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return atomic._atomic_write(path, half)
        return write_bytes(path, data)

    atomic.atomic_write_bytes = torn_write
from cascade_studio.cli import main

sys.exit(main(sys.argv[1:]))
"""


def start_child(workspace: Path, resume: bool, **faults: str) -> subprocess.Popen:
    args = ["train", RECIPE, *OVERRIDES, f"workspace={workspace}", "--no-progress"] + (["--resume"] if resume else [])
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=REPO, env=child_env(**faults),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def steps_of(events: list[dict]) -> list[int]:
    return [e["step"] for e in events if e["event"] == "step"]


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = CheckpointManager(run_dir / "checkpoints").latest()
    assert latest is not None and latest.name == f"step-{MAX_STEPS:08d}", latest
    return load_file(str(latest / "adapter.safetensors"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The same run without interruption, in this process."""
    from cascade_studio.run import train

    workspace = tmp_path_factory.mktemp("uninterrupted")
    result = train(RECIPE, [*OVERRIDES, f"workspace={workspace}"], progress=False)
    events = read_events(result.run_dir)
    steps = {e["step"]: e for e in events if e["event"] == "step"}
    return {"result": result, "adapter": final_adapter(result.run_dir), "steps": steps}


@pytest.mark.slow
def test_killed_again_and_again_then_resumed_equals_uninterrupted(baseline, tmp_path):
    from cascade_studio.run import train
    from cascade_studio.tracking import list_runs, read_run

    rng = random.Random(20240216)  # seeded: the same kill points on every CI run
    workspace = tmp_path / "ws"
    run_dir = workspace / "runs" / "resumable"
    checkpoints = CheckpointManager(run_dir / "checkpoints")

    # 1. SIGKILL at a random step, before any checkpoint beyond the first ones.
    kill_step = rng.randint(3, 5)
    code, log = finish(start_child(workspace, resume=False, CS_TEST_KILL_AT_STEP=str(kill_step)))
    assert code == -signal.SIGKILL, log
    assert max(steps_of(read_events(run_dir))) == kill_step
    first_good = checkpoints.latest(clean=False)
    assert first_good is not None and CheckpointManager.step_of(first_good) == (kill_step - 1) // 2 * 2

    # 2. Resume, and SIGKILL halfway through writing the next checkpoint's optimizer state.
    torn_step = CheckpointManager.step_of(first_good) + 2
    code, log = finish(start_child(workspace, resume=True, CS_TEST_TEAR_SAVE_AT=str(torn_step)))
    assert code == -signal.SIGKILL, log
    staging = run_dir / "checkpoints" / f"tmp-step-{torn_step:08d}"
    torn = list(staging.glob(".optimizer.safetensors.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0, list(staging.iterdir())  # the kill hit mid-write
    assert not (staging.parent / f"step-{torn_step:08d}").exists()
    assert checkpoints.latest(clean=False) == first_good  # the torn one is never taken for a good one

    # 3. Resume, and cancel it with SIGTERM (what the studio sends) at a later random step: KILLED in MLflow.
    term_step = rng.randint(torn_step + 1, MAX_STEPS - 3)
    process = start_child(workspace, resume=True)
    deadline = time.monotonic() + 300
    while not any(s >= term_step for s in steps_of(read_events(run_dir))[-3:]):
        assert process.poll() is None, finish(process)[1]
        assert time.monotonic() < deadline, "the resumed run never reached its step"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    code, log = finish(process)
    assert code == 130, log
    assert "marked KILLED" in log and "Traceback" not in log
    run_ids = {e["run_id"] for e in read_events(run_dir) if e["event"] == "started"}
    assert len(run_ids) == 1, run_ids  # every process continued the first MLflow run
    run_id = run_ids.pop()
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    assert read_run(uri, run_id)["status"] == "KILLED"
    assert read_events(run_dir)[-1]["event"] == "killed"
    assert not staging.exists()  # the resume cleaned the torn save

    # 4. Resume to the end (in this process, like the baseline).
    result = train(RECIPE, [*OVERRIDES, f"workspace={workspace}"], resume=True, progress=False)
    assert result.step == MAX_STEPS and result.run_id == run_id

    expected = baseline["adapter"]
    got = final_adapter(run_dir)
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, f"resumed adapter differs from the uninterrupted one by {worst}"
    # The adapter must really have trained, or equality would prove nothing.
    assert max(float(v.abs().max()) for k, v in expected.items() if "lora_B" in k) > 1e-3

    # Every step attempted after a kill (including the repeats) saw the same batch, noise, dropout and LR:
    events = read_events(run_dir)
    for e in (e for e in events if e["event"] == "step"):
        reference = baseline["steps"][e["step"]]
        assert e["loss"] == pytest.approx(reference["loss"], abs=1e-6), e
        assert e["lr"] == pytest.approx(reference["lr"], rel=1e-9), e
    starts = [e for e in events if e["event"] == "started"]
    assert [s["resume"] for s in starts] == [False, True, True, True]
    assert sorted(set(steps_of(events))) == list(range(1, MAX_STEPS + 1))

    # One MLflow run, finished, with the metrics of every process appended to it.
    run = read_run(uri, run_id)
    assert run["status"] == "FINISHED"
    assert [r["run_id"] for r in list_runs(uri, "cascade-studio")] == [run_id]
    logged_steps = [p["step"] for p in run["metrics"]["loss"]]
    assert logged_steps == list(range(1, MAX_STEPS + 1))  # every step, once: repeated steps are not logged again
    assert run["metrics"]["holdout_loss"][0]["step"] == 0 and run["metrics"]["holdout_loss"][-1]["step"] == MAX_STEPS
    assert result.heldout_before == pytest.approx(baseline["result"].heldout_before)
    assert result.heldout_after == pytest.approx(baseline["result"].heldout_after, abs=1e-6)


def test_resume_of_a_finished_run_trains_nothing_and_exports_the_same(baseline):
    """The final step is checkpointed, so --resume after a kill during export only exports again."""
    from cascade_studio.run import train

    result = baseline["result"]
    export = result.exports[0]
    before = load_file(str(export))
    export.unlink()  # as if the first process died before its export was renamed into place
    again = train(RECIPE, [*OVERRIDES, f"workspace={result.run_dir.parents[1]}"], resume=True, progress=False)
    assert again.step == MAX_STEPS and again.run_id == result.run_id
    assert again.final_loss is None  # no step ran
    after = load_file(str(export))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_rerun_without_resume_refuses_to_overwrite(baseline):
    from cascade_studio.run import train

    with pytest.raises(SystemExit, match="--resume"):
        train(RECIPE, [*OVERRIDES, f"workspace={baseline['result'].run_dir.parents[1]}"], progress=False)


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit", "AdamW"])
def test_optimizer_state_round_trips_through_safetensors(tmp_path, name):
    """8-bit states (uint8 buffers, absmax, a qmap shared by every parameter) come back exactly: the next step
    of the restored optimizer equals the next step of the original."""
    import bitsandbytes as bnb

    from cascade_studio.trainers.state_io import load_optimizer_state, save_optimizer_state

    cls = getattr(bnb.optim, name) if name.endswith("8bit") else torch.optim.AdamW
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (64, 128), (10,)]  # big ones get 8-bit state, the small one stays fp32 in bitsandbytes
    original = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    optimizer = cls(original, lr=1e-2)
    for _ in range(3):
        for p in original:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    save_optimizer_state(optimizer, tmp_path / "optimizer.safetensors")
    restored = [torch.nn.Parameter(p.detach().clone()) for p in original]
    fresh = cls(restored, lr=1e-2)
    load_optimizer_state(fresh, tmp_path / "optimizer.safetensors")
    grads = [torch.randn(p.shape, generator=g) for p in original]
    for params, opt in ((original, optimizer), (restored, fresh)):
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
    for a, b in zip(original, restored):
        assert torch.equal(a, b)
    if name.endswith("8bit"):
        state = fresh.state_dict()["state"][0]["__bnb_optimizer_quant_state__"]
        assert state["state1"].dtype == torch.uint8


def test_optimizer_state_for_another_adapter_is_refused(tmp_path):
    from cascade_studio.trainers.state_io import load_optimizer_state, save_optimizer_state

    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    save_optimizer_state(torch.optim.AdamW(params), tmp_path / "optimizer.safetensors")
    with pytest.raises(ValueError, match="different adapter configuration"):
        load_optimizer_state(torch.optim.AdamW(params[:1]), tmp_path / "optimizer.safetensors")


# ------------------------------------------------------------------------------------ changing the recipe
def _short(workspace: Path, *extra: str) -> list[str]:
    return [f"workspace={workspace}", f"data.path={REPO / 'datasets' / 'tiny-shapes'}", "preview.every=0",
            "train.checkpoint_every=2", "data.max_images=8", "data.holdout_fraction=0", "name=changing", *extra]


@pytest.mark.slow
def test_resume_with_a_lower_learning_rate_trains_at_it_and_records_it(tmp_path, monkeypatch):
    """The NaN guard's advice ("lower optimizer.lr, then --resume") must work: the restored schedule used to
    bring back the old rate while recipe.yaml and MLflow said the new one (issue 17, item 2)."""
    from cascade_studio.run import train

    monkeypatch.chdir(REPO)
    train(RECIPE, _short(tmp_path, "train.max_steps=2", "optimizer.lr=1e-3"), progress=False)
    result = train(RECIPE, _short(tmp_path, "train.max_steps=4", "optimizer.lr=2.5e-4"), resume=True,
                   progress=False)
    events = read_events(result.run_dir)
    rates = {e["step"]: e["lr"] for e in events if e["event"] == "step"}
    assert rates[1] == rates[2] == pytest.approx(1e-3)
    assert rates[3] == rates[4] == pytest.approx(2.5e-4)  # before: 1e-3 again
    changes = [e["changes"] for e in events if e["event"] == "resume_changes"]
    assert changes == [{"optimizer.lr": [1e-3, 2.5e-4], "train.max_steps": [2, 4]}]
    assert "lr: 0.00025" in (result.run_dir / "recipe.yaml").read_text()


@pytest.mark.slow
def test_resume_that_would_change_the_adapter_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """recipe.yaml, the events and the finished MLflow run stay as they were (issue 17, items 2 and 5)."""
    import mlflow

    from cascade_studio.run import main, train

    monkeypatch.chdir(REPO)
    first = train(RECIPE, _short(tmp_path, "train.max_steps=2"), progress=False)
    recorded = {p: p.read_bytes() for p in (first.run_dir / "recipe.yaml", first.run_dir / "events.jsonl")}
    code = main([RECIPE, *_short(tmp_path, "train.max_steps=4", "adapter.lora.rank=16", "data.max_images=6"),
                 "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "adapter.lora.rank" in err and "data.max_images" in err and "name=<new name>" in err
    assert {p: p.read_bytes() for p in recorded} == recorded
    run = mlflow.MlflowClient(first.tracking_uri).get_run(first.run_id)
    assert run.info.status == "FINISHED"
