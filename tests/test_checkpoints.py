"""Checkpoints and atomic writes: real files on disk, real crashes (SIGKILL) and real size limits (RLIMIT_FSIZE)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cascade_studio.trainers.atomic import (
    DiskFullError,
    as_disk_full,
    atomic_copy,
    atomic_save_safetensors,
    atomic_write_text,
)
from cascade_studio.trainers.checkpoints import CheckpointError, CheckpointManager, RunState

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_python(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that can import cascade_studio from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


def write_files(contents: dict[str, bytes]):
    """A save_fn writing the given relative paths (nested folders allowed), like accelerate.save_state does."""
    def save_fn(directory: Path) -> None:
        for relative, data in contents.items():
            target = directory / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return save_fn


def save_step(manager: CheckpointManager, step: int, payload: bytes = b"") -> Path:
    return manager.save(step, write_files({"model.bin": payload or f"weights@{step}".encode()}), RunState(step=step))


# ---------------------------------------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_content_leaves_no_temp_and_respects_umask(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second ✓")
    assert target.read_text(encoding="utf-8") == "second ✓"
    assert os.listdir(target.parent) == ["file.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_atomic_save_safetensors_roundtrip_with_metadata(tmp_path):
    tensors = {"lora.down": torch.arange(6, dtype=torch.float32).reshape(2, 3), "lora.up": torch.ones(3, 2)}
    path = atomic_save_safetensors(tensors, tmp_path / "adapter.safetensors", metadata={"format": "pt", "r": "4"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "r": "4"}
        assert torch.equal(handle.get_tensor("lora.down"), tensors["lora.down"])
        assert torch.equal(handle.get_tensor("lora.up"), tensors["lora.up"])


def test_atomic_copy_copies_bytes_and_failed_copy_keeps_old_destination(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    destination = tmp_path / "out" / "dst.bin"
    atomic_copy(source, destination)
    assert destination.read_bytes() == source.read_bytes()
    destination.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing.bin", destination)
    assert destination.read_bytes() == b"old"
    assert sorted(os.listdir(destination.parent)) == ["dst.bin"]  # the temp file was removed


def test_rust_style_os_errors_are_recognised_as_disk_full(tmp_path):
    # safetensors' save_file reports EFBIG/ENOSPC as SafetensorError("... (os error 27)"), not OSError.
    error = as_disk_full(RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),
                         tmp_path / "x")
    assert isinstance(error, DiskFullError) and error.errno == 27
    assert as_disk_full(RuntimeError("shape mismatch"), tmp_path / "x") is None
    assert as_disk_full(OSError(13, "Permission denied"), tmp_path / "x") is None


def test_file_size_limit_raises_disk_full_and_keeps_previous_file(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"previous good content")
    script = """
        import resource, signal, sys, json
        from cascade_studio.trainers.atomic import atomic_write_bytes, DiskFullError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            atomic_write_bytes(sys.argv[1], b"x" * (1024 * 1024))
        except DiskFullError as exc:
            print(json.dumps({"type": type(exc).__name__, "errno": exc.errno, "message": str(exc),
                              "is_oserror": isinstance(exc, OSError)}))
    """
    result = run_python(script, str(target))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["type"] == "DiskFullError" and report["is_oserror"] and report["errno"] == 27
    assert str(target) in report["message"] and "free" in report["message"] and "ulimit -f" in report["message"]
    assert target.read_bytes() == b"previous good content"
    assert os.listdir(tmp_path) == ["weights.bin"]


# ------------------------------------------------------------------------------------------------ run state
def test_run_state_json_roundtrip_and_validation():
    state = RunState(step=12, epoch=1, samples_seen=96, mlflow_run_id="abc", sampler_state={"pos": 4, "seed": 7},
                     nonfinite_in_a_row=1, skipped_steps_total=3, extra={"ema": [1, 2]})
    assert RunState.from_json(state.to_json()) == state
    assert json.loads(state.to_json())["version"] == 1
    with pytest.raises(CheckpointError) as info:
        RunState.from_dict({"step": -1, "epoch": "two", "mlflow_run_id": 5})
    message = str(info.value)
    assert "step = -1" in message and "epoch = 'two'" in message and "mlflow_run_id = 5" in message
    with pytest.raises(CheckpointError, match="upgrade cascade-studio"):
        RunState.from_dict({"version": 2, "step": 1})


# ----------------------------------------------------------------------------------------------- checkpoints
def test_save_writes_manifest_with_hashes_pointer_and_run_state(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")
    contents = {"model.safetensors": b"model-bytes", "optimizer.bin": b"opt" * 1000, "rng/random_states_0.pkl": b"r"}
    state = RunState(step=7, epoch=2, samples_seen=56, mlflow_run_id="run-1", sampler_state={"cursor": 3})
    path = manager.save(7, write_files(contents), state)
    assert path == tmp_path / "ckpt" / "step-00000007"
    manifest = json.loads((path / "COMPLETE").read_text())
    assert manifest["step"] == 7
    expected = {**contents, "run_state.json": (path / "run_state.json").read_bytes()}
    assert set(manifest["files"]) == set(expected)
    for relative, data in expected.items():
        assert manifest["files"][relative] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-00000007"
    assert manager.latest() == path
    assert manager.load_run_state(path) == state
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step-00000007"]


def test_save_fn_failing_midway_keeps_previous_latest(tmp_path):
    manager = CheckpointManager(tmp_path)
    first = save_step(manager, 1)

    def half_written(directory: Path) -> None:
        (directory / "model.bin").write_bytes(b"partial")
        raise RuntimeError("simulated crash inside save_state")

    with pytest.raises(RuntimeError, match="simulated crash"):  # not disguised as a disk problem
        manager.save(2, half_written, RunState(step=2))
    assert not (tmp_path / "tmp-step-00000002").exists()
    assert not (tmp_path / "step-00000002").exists()
    assert manager.latest() == first
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"


def test_sigkill_while_writing_a_large_file_keeps_previous_checkpoint(tmp_path):
    ready = tmp_path / "ready"
    script = """
        import sys, time
        from pathlib import Path
        from cascade_studio.trainers.checkpoints import CheckpointManager, RunState
        directory, ready = Path(sys.argv[1]), Path(sys.argv[2])
        manager = CheckpointManager(directory, keep=2)
        manager.save(1, lambda d: (d / "model.bin").write_bytes(b"good" * 1000), RunState(step=1))

        def endless_write(d):
            with open(d / "model.bin", "wb") as handle:
                handle.write(b"x" * (1 << 20))
                handle.flush()
                ready.write_text("writing")
                for _ in range(2000):  # bounded, in case the parent never kills us
                    handle.write(b"x" * (64 << 10))
                    handle.flush()
                    time.sleep(0.005)

        manager.save(2, endless_write, RunState(step=2))
    """
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "ckpt"), str(ready)],
                               env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "child never started writing"
        time.sleep(0.02)
    time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL
    process.stderr.close()

    staging = tmp_path / "ckpt" / "tmp-step-00000002"
    assert (staging / "model.bin").stat().st_size >= 1 << 20  # the kill really hit mid-write
    manager = CheckpointManager(tmp_path / "ckpt")
    assert [p.name for p in manager.list()] == ["step-00000001"]
    latest = manager.latest()
    assert latest is not None and latest.name == "step-00000001"
    assert (latest / "model.bin").read_bytes() == b"good" * 1000
    assert not staging.exists()  # latest() cleaned the leftover
    assert manager.load_run_state(latest).step == 1


def test_disk_full_during_save_keeps_previous_latest_and_says_why(tmp_path):
    script = """
        import json, resource, signal, sys
        from pathlib import Path
        from cascade_studio.trainers.atomic import DiskFullError
        from cascade_studio.trainers.checkpoints import CheckpointManager, RunState
        manager = CheckpointManager(Path(sys.argv[1]))
        manager.save(1, lambda d: (d / "model.bin").write_bytes(b"small"), RunState(step=1))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
        try:
            manager.save(2, lambda d: (d / "model.bin").write_bytes(b"x" * (1 << 20)), RunState(step=2))
        except DiskFullError as exc:
            print(json.dumps({"message": str(exc)}))
    """
    result = run_python(script, str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr
    message = json.loads(result.stdout)["message"]
    assert "tmp-step-00000002" in message and "free on the filesystem mounted at" in message
    assert "earlier checkpoints are intact" in message
    manager = CheckpointManager(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step-00000001"]
    assert manager.latest() == tmp_path / "ckpt" / "step-00000001"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-00000001"


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_file", "delete_marker"])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, damage, caplog):
    manager = CheckpointManager(tmp_path, keep=3)
    save_step(manager, 1, b"A" * 4096)
    newest = save_step(manager, 2, b"B" * 4096)
    model = newest / "model.bin"
    if damage == "flip_byte":  # same size, so only the hash can notice
        data = bytearray(model.read_bytes())
        data[100] ^= 0x01
        model.write_bytes(bytes(data))
    elif damage == "truncate":
        model.write_bytes(model.read_bytes()[:1000])
    elif damage == "delete_file":
        model.unlink()
    else:
        (newest / "COMPLETE").unlink()
    with caplog.at_level(logging.WARNING):
        assert manager.latest() == tmp_path / "step-00000001"
    if damage != "delete_marker":
        assert "step-00000002" in caplog.text and "falling back" in caplog.text
    assert not manager.verify(newest)
    assert manager.verify(tmp_path / "step-00000001")


def test_leftover_staging_dir_even_with_marker_is_ignored(tmp_path):
    manager = CheckpointManager(tmp_path)
    save_step(manager, 1)
    # A crash between writing COMPLETE and the rename leaves a sealed staging dir: still not a checkpoint.
    leftover = tmp_path / "tmp-step-00000005"
    leftover.mkdir()
    (leftover / "COMPLETE").write_text(json.dumps({"step": 5, "files": {}}))
    assert manager.latest(clean=False) == tmp_path / "step-00000001"
    assert leftover.exists()  # clean=False leaves it for a possibly running writer
    assert manager.latest() == tmp_path / "step-00000001"
    assert not leftover.exists()


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_pruning_keeps_the_newest_keep_checkpoints(tmp_path, keep):
    manager = CheckpointManager(tmp_path, keep=keep)
    for step in (10, 20, 30, 40, 50):
        save_step(manager, step)
    expected = [f"step-{s:08d}" for s in (10, 20, 30, 40, 50)][-keep:]
    assert [p.name for p in manager.list()] == expected
    assert (tmp_path / "latest").read_text().strip() == "step-00000050"
    assert manager.latest() == tmp_path / "step-00000050"


def test_resave_same_step_replaces_and_lower_step_drops_abandoned_newer_ones(tmp_path):
    manager = CheckpointManager(tmp_path, keep=5)
    for step in (1, 2, 3):
        save_step(manager, step)
    save_step(manager, 3, b"retrained")
    assert (tmp_path / "step-00000003" / "model.bin").read_bytes() == b"retrained"
    assert manager.verify(tmp_path / "step-00000003")
    # Resumed from step 1 (say step 2 and 3 were judged bad): saving step 2 again abandons step 3.
    save_step(manager, 2, b"second timeline")
    assert [p.name for p in manager.list()] == ["step-00000001", "step-00000002"]
    assert manager.latest() == tmp_path / "step-00000002"
    assert (tmp_path / "step-00000002" / "model.bin").read_bytes() == b"second timeline"
    assert not any(p.name.startswith(("tmp-", "trash-")) for p in tmp_path.iterdir())


def test_prepare_commit_split_and_misuse_errors(tmp_path):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="call prepare"):
        manager.commit(3, RunState(step=3))
    staging = manager.prepare(3)
    (staging / "random_states_0.pkl").write_bytes(b"rank0")
    (staging / "random_states_1.pkl").write_bytes(b"rank1")  # written by another rank in real use
    with pytest.raises(ValueError, match="run_state.step is 2"):
        manager.commit(3, RunState(step=2))
    path = manager.commit(3, RunState(step=3))
    assert manager.latest() == path and (path / "random_states_1.pkl").read_bytes() == b"rank1"
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)


def test_empty_or_missing_directory_has_no_latest_and_missing_run_state_is_explained(tmp_path):
    assert CheckpointManager(tmp_path / "nothing").latest() is None
    assert CheckpointManager(tmp_path / "nothing").list() == []
    with pytest.raises(CheckpointError, match="not a finished checkpoint"):
        CheckpointManager(tmp_path).load_run_state(tmp_path)
