"""The run folder: where one training run keeps everything, and the one place that knows its layout.

Layout (every path below is built here and nowhere else)::

    <workspace>/runs/<name>/
        recipe.yaml             the resolved recipe the run was (last) started or resumed with
        events.jsonl            typed progress events (trainers/events.py); the studio tails it
        .lock                   held by the process that trains here (an OS file lock); its pid and host inside
        checkpoints/            trainers/checkpoints.py writes these:
            step-00000100/      a checkpoint: adapter.safetensors, optimizer/scheduler/run state, COMPLETE
            tmp-step-00000200/  a checkpoint being written (or left by a crash)
            latest              names the newest complete checkpoint (for humans)
        previews/step-000100.png  base-vs-adapter grids written during training
        export/<name>-<format>[.safetensors]  the run's exports (the format decides file or folder:
                                adapters/catalog.py ExportFormat.target(export_dir, export_stem))
        features/               the run's private encode-once cache when ``cache.enabled`` is false
        tracking_buffer.jsonl   MLflow records waiting for an unreachable server (tracking/mlflow_tracker.py),
        tracking_pending/       and the images/texts logged meanwhile

**Complete checkpoint** (the one rule every reader uses): a directory in ``checkpoints/`` named ``step-`` and at
least 8 digits that holds the ``COMPLETE`` marker. The marker is written last (it is the hash manifest of every
other file) and the directory only gets its ``step-`` name by an atomic rename afterwards, so a half-written
checkpoint never matches. Readers that can afford it (resume, ``cascade-studio export`` of a run folder) also
re-check the hashes (``CheckpointManager.latest``); listings for the studio and generation do not.

**One owner per run folder.** :meth:`RunFolder.lock` takes an exclusive ``flock`` on ``.lock`` for the run's
lifetime and writes the owner's pid and host into it. The OS drops the lock when the owner's process dies (also
by SIGKILL), so a lock left by a killed run is recognised as stale and taken over; the file itself is never
deleted (deleting a lock file lets two processes lock two different files). A second run in the same folder is
refused with :class:`RunFolderBusy`, before it writes anything.

No torch here: the studio imports this module in its own process.
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

__all__ = ["RunFolder", "RunFolderBusy", "RunLock", "LockOwner", "RUNS_DIR", "RECIPE_FILE", "EVENTS_FILE",
           "LOCK_FILE", "CHECKPOINTS_DIR", "PREVIEWS_DIR", "EXPORT_DIR", "FEATURES_DIR", "TRACKING_BUFFER_FILE",
           "TRACKING_PENDING_DIR", "ADAPTER_FILE", "COMPLETE_MARKER", "checkpoint_name", "checkpoint_step",
           "complete_checkpoints", "preview_name", "preview_files"]

PathLike = Union[str, "os.PathLike[str]"]

RUNS_DIR = "runs"
RECIPE_FILE = "recipe.yaml"
EVENTS_FILE = "events.jsonl"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
PREVIEWS_DIR = "previews"
EXPORT_DIR = "export"
FEATURES_DIR = "features"
TRACKING_BUFFER_FILE = "tracking_buffer.jsonl"
TRACKING_PENDING_DIR = "tracking_pending"
ADAPTER_FILE = "adapter.safetensors"  # the adapter tensors inside a checkpoint
COMPLETE_MARKER = "COMPLETE"

_CHECKPOINT_DIR = re.compile(r"^step-(\d{8,})$")
_PREVIEW_FILE = re.compile(r"^step-(\d+).*\.png$")  # step-000030.png (more grids of a step may follow)


# ------------------------------------------------------------------------------------------- checkpoints
def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint of ``step`` (``step-00000100``)."""
    return f"step-{step:08d}"


def checkpoint_step(path: PathLike) -> Optional[int]:
    """The step a checkpoint directory's name encodes, or None when the name is not a checkpoint's."""
    match = _CHECKPOINT_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(directory: PathLike) -> dict[int, Path]:
    """The complete checkpoints in a ``checkpoints/`` directory by step, oldest first (module docstring)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    found = {}
    for path in directory.iterdir():
        step = checkpoint_step(path)
        if step is not None and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found[step] = path
    return dict(sorted(found.items()))


# ------------------------------------------------------------------------------------------------ locking
class RunFolderBusy(RuntimeError):
    """Another live process owns the run folder; the message names it and says what to do."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or last held) a run folder's lock, as recorded in its lock file."""

    pid: int
    host: str
    started: float
    command: str = ""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, since {when}"

    def alive(self) -> Optional[bool]:
        """Whether the recorded process still runs (None: it is on another host, so this one cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by another user
        return True

    @classmethod
    def parse(cls, text: str) -> Optional["LockOwner"]:
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), float(data["started"]), str(data.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None  # empty (released, or its owner is still writing it) or not ours


class RunLock:
    """An exclusive lock on a run folder, held until :meth:`release` (or the process ends)."""

    def __init__(self, folder: "RunFolder", fd: int, owner: LockOwner, stale: Optional[LockOwner]) -> None:
        self.folder = folder
        self.owner = owner
        self.stale = stale  # the owner recorded by a process that died holding the lock, if any
        self._fd: Optional[int] = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Clear the owner record and unlock (idempotent). The lock file stays, see the module docstring."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.getpid() != self.owner.pid:
            # A forked child (a data-loader worker) shares the lock with its parent: unlocking here would unlock
            # the parent's run too, so the child only closes its copy.
            os.close(fd)
            return
        import fcntl

        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full disk cannot stop the unlock
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __del__(self) -> None:  # a lock dropped without release() must not outlive its owner object
        try:
            self.release()
        except Exception:
            pass


# -------------------------------------------------------------------------------------------- the folder
@dataclass(frozen=True)
class RunFolder:
    """``<workspace>/runs/<name>/`` and everything in it. Creating one touches nothing on disk."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def in_workspace(cls, workspace: PathLike, name: str) -> "RunFolder":
        """The folder of run ``name`` in ``workspace`` (``<workspace>/runs/<name>``)."""
        return cls(cls.runs_dir(workspace) / name)

    @staticmethod
    def runs_dir(workspace: PathLike) -> Path:
        """Where a workspace keeps its run folders."""
        return Path(workspace) / RUNS_DIR

    @classmethod
    def all_in(cls, workspace: PathLike) -> list["RunFolder"]:
        """Every run folder of a workspace, newest first (by modification time)."""
        runs = cls.runs_dir(workspace)
        if not runs.is_dir():
            return []
        folders = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        return [cls(p) for p in folders]

    @classmethod
    def of_checkpoint(cls, checkpoint: PathLike) -> Optional[tuple["RunFolder", int]]:
        """(run folder, step) when ``checkpoint`` is a checkpoint directory of a run folder, else None."""
        checkpoint = Path(checkpoint)
        step = checkpoint_step(checkpoint)
        if step is None or checkpoint.parent.name != CHECKPOINTS_DIR:
            return None
        return cls(checkpoint.parent.parent), step

    @property
    def name(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        return self.path.is_dir()

    # ------------------------------------------------------------------------------------------- files
    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def events_file(self) -> Path:
        return self.path / EVENTS_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def previews_dir(self) -> Path:
        return self.path / PREVIEWS_DIR

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT_DIR

    @property
    def features_dir(self) -> Path:
        return self.path / FEATURES_DIR

    def preview_path(self, step: int) -> Path:
        return self.previews_dir / preview_name(step)

    def export_stem(self, step: Optional[int] = None, run_name: Optional[str] = None) -> str:
        """The name an export starts with (the format adds ``-<format>`` and its suffix): the run's name, and for
        exports made later from a checkpoint ``<run>-step<N>``, so they never overwrite the file the run wrote
        when it finished. ``run_name`` = the recipe's name when it differs from the folder's."""
        name = run_name or self.name
        return name if step is None else f"{name}-step{step}"

    # ------------------------------------------------------------------------------------------ reading
    def checkpoints(self) -> dict[int, Path]:
        """Complete checkpoints by step, oldest first (hashes not re-checked; module docstring)."""
        return complete_checkpoints(self.checkpoints_dir)

    def checkpoint(self, step: int) -> Path:
        """The directory of the checkpoint of ``step`` (complete or not)."""
        return self.checkpoints_dir / checkpoint_name(step)

    def latest_checkpoint(self, verify: bool = False) -> Optional[Path]:
        """The newest complete checkpoint; ``verify=True`` re-checks hashes and skips damaged ones. Never cleans
        up unfinished saves: a run may be writing one right now."""
        if verify:
            from .trainers.checkpoints import CheckpointManager

            return CheckpointManager(self.checkpoints_dir).latest(clean=False)
        found = self.checkpoints()
        return found[max(found)] if found else None

    def checkpoint_manager(self, keep: int = 2):
        """The writer/verifier of this run's checkpoints (``trainers.checkpoints.CheckpointManager``)."""
        from .trainers.checkpoints import CheckpointManager

        return CheckpointManager(self.checkpoints_dir, keep=keep)

    def events(self) -> list[dict]:
        """Every complete event of the run (a torn last line from a killed writer is ignored)."""
        try:
            lines = self.events_file.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        found = []
        for line in lines:
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return found

    def mlflow_run_ids(self) -> list[str]:
        """The MLflow run ids this folder's runs started with, oldest first (a resume keeps its id)."""
        return [str(e["run_id"]) for e in self.events() if e.get("event") == "started" and e.get("run_id")]

    def previews(self) -> dict[int, list[Path]]:
        """Preview images by training step, oldest first."""
        return preview_files(self.previews_dir)

    def exported_adapters(self) -> list[Path]:
        """Files and PEFT folders in ``export/``, sorted by name."""
        if not self.export_dir.is_dir():
            return []
        return sorted(p for p in self.export_dir.iterdir() if (p.is_file() and p.suffix == ".safetensors")
                      or (p.is_dir() and (p / "adapter_config.json").is_file()))

    # ------------------------------------------------------------------------------------------ locking
    def lock(self, command: Optional[str] = None, wait_for_owner_s: float = 2.0) -> RunLock:
        """Become the folder's only owner until :meth:`RunLock.release`, or raise :class:`RunFolderBusy`.

        Creates the folder (and only its lock file) when needed. A lock left by a process that died is taken
        over (``RunLock.stale`` says whose it was). Not for the other ranks of a multi-process run: only the
        main process owns the folder.
        """
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderBusy(self.busy_message(self._wait_for_owner(wait_for_owner_s))) from None
        try:
            stale = LockOwner.parse(_read_fd(fd))
            owner = LockOwner(os.getpid(), socket.gethostname(), time.time(),
                              command if command is not None else " ".join(sys.argv))
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner.__dict__) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)  # closing drops the lock too
            raise
        return RunLock(self, fd, owner, stale)

    def owner(self) -> Optional[LockOwner]:
        """The process that owns the folder now, as its lock file records it, or None. Read-only (it never
        takes the lock, so it cannot make a starting run fail): a record whose process is gone is stale and
        reads as None; one from another host is returned, since this host cannot tell."""
        try:
            recorded = LockOwner.parse(self.lock_file.read_text(encoding="utf-8"))
        except OSError:
            return None
        if recorded is None or recorded.alive() is False:
            return None
        return recorded

    def _wait_for_owner(self, seconds: float) -> Optional[LockOwner]:
        # The owner writes its record right after it takes the lock; give it that moment.
        deadline = time.monotonic() + seconds
        while True:
            try:
                recorded = LockOwner.parse(self.lock_file.read_text(encoding="utf-8"))
            except OSError:
                recorded = None
            if recorded is not None or time.monotonic() >= deadline:
                return recorded
            time.sleep(0.05)

    def busy_message(self, owner: Optional[LockOwner]) -> str:
        """What to tell a user whose run would share this folder with ``owner``."""
        who = f"another training run ({owner.describe()})" if owner else "another training run"
        return (f"run folder {self.path} is in use by {who}: two runs cannot share one folder. Give this run "
                f"another name (name=<new name>), or wait until that run ends and continue it with --resume.")


def preview_name(step: int) -> str:
    """File name of the preview grid of ``step`` (also its MLflow artifact name under ``previews/``)."""
    return f"step-{step:06d}.png"


def preview_files(folder: Optional[PathLike]) -> dict[int, list[Path]]:
    """Preview images in ``folder`` (a run's ``previews/`` or its MLflow artifact copy) by step."""
    if folder is None or not Path(folder).is_dir():
        return {}
    by_step: dict[int, list[Path]] = {}
    for path in sorted(Path(folder).iterdir()):
        match = _PREVIEW_FILE.match(path.name)
        if match:
            by_step.setdefault(int(match.group(1)), []).append(path)
    return dict(sorted(by_step.items()))


def _read_fd(fd: int) -> str:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 4096, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")
