"""Training checkpoints that survive crashes, kills and full disks.

Layout under the checkpoint directory::

    step-00000100/          a finished checkpoint (whatever ``save_fn`` wrote, plus the two files below)
        run_state.json      the loop's bookkeeping (:class:`RunState`)
        COMPLETE            JSON: the step and the sha256 + size of every other file
    tmp-step-00000200/      a checkpoint being written (or left over by a crash: ignored and cleaned)
    latest                  text file naming the newest finished checkpoint (for humans and the UI)

A checkpoint only gets its ``step-`` name by an atomic rename *after* every file is written, fsynced and hashed,
so a half-written checkpoint can never be mistaken for a good one. :meth:`CheckpointManager.latest` re-checks the
hashes, so a checkpoint damaged later (bit rot, a truncated copy) is skipped in favour of the previous good one.

Multi-process training: every rank must write into the same staging directory (accelerate's ``save_state`` writes
one RNG file per rank), so the loop can split :meth:`CheckpointManager.save` into :meth:`prepare` (main process,
before a barrier), ``accelerator.save_state(staging)`` (all ranks), and :meth:`commit` (main process, after a
barrier).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Union

from cascade_studio.run_folder import COMPLETE_MARKER, checkpoint_name, checkpoint_step, complete_checkpoints
from cascade_studio.trainers.atomic import (
    DiskFullError,
    as_disk_full,
    atomic_write_text,
    disk_full_error,
    free_space,
    fsync_dir,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

RUN_STATE_FILE = "run_state.json"
LATEST_POINTER = "latest"
RUN_STATE_VERSION = 1
MANIFEST_FORMAT = 1

_LEFTOVER_DIR = re.compile(r"^(tmp|trash)-step-\d{8,}$")
_HASH_CHUNK = 1024 * 1024
# torch.save (used by accelerate) reports a full disk as an errno-less RuntimeError ("file write failed",
# "unexpected pos ..."); below this much free space we tell the user the likely cause instead.
_LOW_SPACE_BYTES = 256 * 1024 * 1024


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or unreadable; the message says what to do."""


@dataclass
class RunState:
    """Everything the training loop needs besides model/optimizer tensors to continue exactly where it stopped.

    Stored as ``run_state.json`` in every checkpoint.
    """

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Passes over the dataset completed."""
    samples_seen: int = 0
    """Training samples consumed (across all processes)."""
    mlflow_run_id: Optional[str] = None
    """MLflow run to continue on resume (so metrics append to the same run)."""
    sampler_state: dict[str, Any] = field(default_factory=dict)
    """State of the data sampler / bucket iterator (position, shuffle seed), JSON-serialisable."""
    nonfinite_in_a_row: int = 0
    """Consecutive steps whose loss was NaN/inf (the loop stops after too many)."""
    skipped_steps_total: int = 0
    """Steps skipped over the whole run because of non-finite losses."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-serialisable state for the loop or a method's loss step."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict including the format version."""
        return {"version": RUN_STATE_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        """Pretty JSON text (raises TypeError naming the field if something is not JSON-serialisable)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "run state") -> "RunState":
        """Validate and build; raises :class:`CheckpointError` listing every problem at once."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        version = data.get("version", RUN_STATE_VERSION)
        if version != RUN_STATE_VERSION:
            raise CheckpointError(
                f"{source}: run state version {version!r} is not understood by this cascade-studio "
                f"(it reads version {RUN_STATE_VERSION}); upgrade cascade-studio to resume this checkpoint."
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known) - {"version"})
        if unknown:
            logger.warning("%s: ignoring unknown run state fields %s", source, unknown)
        problems: list[str] = []
        values: dict[str, Any] = {}
        for name in known:
            if name not in data:
                continue
            value = data[name]
            if name == "mlflow_run_id":
                ok = value is None or isinstance(value, str)
                expected = "a string or null"
            elif name in ("sampler_state", "extra"):
                ok, expected = isinstance(value, dict), "a JSON object"
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
                expected = "a non-negative integer"
            if ok:
                values[name] = value
            else:
                problems.append(f"{name} = {value!r} (expected {expected})")
        if problems:
            raise CheckpointError(
                f"{source} is invalid: " + "; ".join(problems) + ". Resume from another checkpoint or fix the file."
            )
        return cls(**values)

    @classmethod
    def from_json(cls, text: str, source: str = "run state") -> "RunState":
        """Parse JSON text; raises :class:`CheckpointError` on malformed input."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{source} is not valid JSON ({exc}); resume from another checkpoint.") from exc
        return cls.from_dict(data, source)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(root: Path) -> list[Path]:
    """Every regular file below ``root`` except the COMPLETE marker, sorted for a stable manifest."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != COMPLETE_MARKER)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root``: save_fn's writers (torch.save) do not fsync themselves."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class CheckpointManager:
    """Writes, verifies, finds and prunes checkpoints in one directory (see the module docstring)."""

    def __init__(self, directory: PathLike, keep: int = 2) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1 (got {keep!r}); it is how many checkpoints to keep.")
        self.directory = Path(directory)
        self.keep = keep

    # ----------------------------------------------------------------------------------------------- naming
    @staticmethod
    def step_name(step: int) -> str:
        """Directory name of the finished checkpoint for ``step`` (``run_folder.checkpoint_name``)."""
        return checkpoint_name(step)

    def staging_dir(self, step: int) -> Path:
        """Where the checkpoint for ``step`` is written before it is committed."""
        return self.directory / f"tmp-{self.step_name(step)}"

    @staticmethod
    def step_of(path: PathLike) -> int:
        """The step encoded in a checkpoint directory name (ValueError if it is not one)."""
        step = checkpoint_step(path)
        if step is None:
            raise ValueError(f"{path} is not a checkpoint directory (expected a name like step-00000100).")
        return step

    # ------------------------------------------------------------------------------------------------ write
    def save(self, step: int, save_fn: Callable[[Path], None], run_state: RunState) -> Path:
        """Write a checkpoint for ``step``: ``save_fn(staging_dir)`` writes the state, then it is committed.

        Returns the finished checkpoint directory. If ``save_fn`` or the commit fails (including a full disk,
        raised as :class:`DiskFullError`), the staging directory is removed and earlier checkpoints are intact.
        """
        staging = self.prepare(step)
        try:
            save_fn(staging)
        except BaseException as exc:
            _remove_tree(staging)
            self._raise_translated(exc, staging)
        return self.commit(step, run_state)

    def prepare(self, step: int) -> Path:
        """Create a fresh, empty staging directory for ``step`` (removing one left by an earlier crash)."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer (got {step!r}).")
        self.directory.mkdir(parents=True, exist_ok=True)
        staging = self.staging_dir(step)
        if staging.exists():
            _remove_tree(staging)
        staging.mkdir()
        return staging

    def commit(self, step: int, run_state: RunState) -> Path:
        """Seal the staging directory of ``step``: run state, hash manifest, atomic rename, pointer, pruning."""
        if run_state.step != step:
            raise ValueError(f"run_state.step is {run_state.step} but the checkpoint is for step {step}; pass the "
                             "RunState of the step being saved.")
        staging = self.staging_dir(step)
        if not staging.is_dir():
            raise CheckpointError(f"No staging directory {staging}; call prepare({step}) before commit({step}).")
        final = self.directory / self.step_name(step)
        try:
            atomic_write_text(staging / RUN_STATE_FILE, run_state.to_json())
            _fsync_tree(staging)
            files = {
                path.relative_to(staging).as_posix(): {"sha256": _sha256(path), "bytes": path.stat().st_size}
                for path in _files_under(staging)
            }
            manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
            atomic_write_text(staging / COMPLETE_MARKER, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        except BaseException as exc:
            _remove_tree(staging)
            self._raise_translated(exc, staging)
        # Checkpoints with a higher step belong to a timeline this run abandoned (it resumed from an earlier
        # one, usually because the newer one failed verification). Removing them *before* the rename keeps
        # "newest step = latest" true even if we crash right after it.
        for stale in self._step_dirs():
            if self.step_of(stale) > step:
                logger.warning("Removing checkpoint %s: it is newer than the step being saved (%d) and belongs "
                               "to an abandoned run timeline.", stale, step)
                _remove_tree(stale)
        trash: Optional[Path] = None
        if final.exists():  # re-saving the same step (e.g. after resuming from it): os.replace needs an empty target
            trash = self.directory / f"trash-{final.name}"
            _remove_tree(trash)
            os.replace(final, trash)
        os.replace(staging, final)
        fsync_dir(self.directory)
        if trash is not None:
            _remove_tree(trash)
        try:
            atomic_write_text(self.directory / LATEST_POINTER, final.name + "\n")
        except DiskFullError:
            # The checkpoint itself is committed and latest() finds it by step; the pointer is a convenience.
            logger.warning("Checkpoint %s saved but the 'latest' pointer could not be updated (disk full).", final)
        self._prune(keep_newest=final)
        return final

    def _raise_translated(self, exc: BaseException, where: Path) -> NoReturn:
        kept = "The unfinished checkpoint was removed; earlier checkpoints are intact."
        translated = as_disk_full(exc, where, kept=kept)
        if translated is None and isinstance(exc, RuntimeError):
            free = free_space(self.directory)
            if free is not None and free < _LOW_SPACE_BYTES:
                translated = disk_full_error(errno.ENOSPC, where, kept=kept)
        if translated is not None and translated is not exc:
            raise translated from exc
        raise exc

    def _prune(self, keep_newest: Path) -> None:
        """Keep ``keep_newest`` plus the ``keep - 1`` newest complete checkpoints below it; delete the rest."""
        newest_step = self.step_of(keep_newest)
        older = [p for p in self.list() if self.step_of(p) < newest_step]
        kept = {keep_newest, *older[-(self.keep - 1):]} if self.keep > 1 else {keep_newest}
        oldest_kept = min(self.step_of(p) for p in kept)
        for path in self._step_dirs():
            if path not in kept and self.step_of(path) < oldest_kept:
                _remove_tree(path)
        for leftover in self.directory.glob("trash-step-*"):
            _remove_tree(leftover)

    # ------------------------------------------------------------------------------------------------- read
    def _step_dirs(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
        return sorted(found, key=self.step_of)

    def list(self) -> list[Path]:
        """Complete checkpoints (``run_folder.complete_checkpoints``), oldest step first (hashes not re-checked)."""
        return list(complete_checkpoints(self.directory).values())

    def problem(self, path: PathLike) -> Optional[str]:
        """Why ``path`` is not a usable checkpoint (missing marker, wrong step, missing/changed file), or None."""
        root = Path(path)
        try:
            manifest = json.loads((root / COMPLETE_MARKER).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "no COMPLETE marker (the save never finished)"
        except (OSError, ValueError) as exc:
            return f"unreadable COMPLETE marker ({exc})"
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            return "malformed COMPLETE marker"
        try:
            expected_step = self.step_of(root)
        except ValueError as exc:
            return str(exc)
        if manifest.get("step") != expected_step:
            return f"COMPLETE marker is for step {manifest.get('step')!r}, directory says {expected_step}"
        if RUN_STATE_FILE not in manifest["files"]:
            return f"{RUN_STATE_FILE} is not in the manifest"
        for relative, entry in manifest["files"].items():
            file = root / relative
            if not file.is_file():
                return f"{relative} is missing"
            if file.stat().st_size != entry.get("bytes"):  # cheap check before hashing
                return f"{relative} has {file.stat().st_size} bytes, expected {entry.get('bytes')}"
            if _sha256(file) != entry.get("sha256"):
                return f"{relative} does not match its sha256"
        return None

    def verify(self, path: PathLike) -> bool:
        """True if every file of the checkpoint matches its recorded sha256."""
        return self.problem(path) is None

    def clean_leftovers(self) -> list[Path]:
        """Delete staging/trash directories left by crashed saves; returns what was removed.

        Do not call this while another process may be saving into the same directory.
        """
        if not self.directory.is_dir():
            return []
        leftovers = [p for p in self.directory.iterdir() if p.is_dir() and _LEFTOVER_DIR.match(p.name)]
        for path in leftovers:
            _remove_tree(path)
        return leftovers

    def latest(self, clean: bool = True) -> Optional[Path]:
        """The newest checkpoint whose hashes verify, or None; broken newer ones are skipped with a warning.

        ``clean=False`` leaves staging directories alone (for readers such as the UI while a run is saving).
        """
        if clean:
            for leftover in self.clean_leftovers():
                logger.info("Removed unfinished checkpoint %s left by an interrupted save.", leftover)
        for path in reversed(self._step_dirs()):
            issue = self.problem(path)
            if issue is None:
                return path
            logger.warning("Skipping checkpoint %s: %s; falling back to the previous one.", path, issue)
        return None

    def set_aside(self, path: PathLike, reason: str) -> Path:
        """Take a checkpoint out of use without deleting it: ``step-N`` becomes ``unsound-step-N`` (never resumed
        from, exported or pruned) with ``REASON.txt`` saying why; returns the new path."""
        path = Path(path)
        target = path.with_name(f"unsound-{path.name}")
        if target.exists():
            _remove_tree(target)
        path.rename(target)
        (target / "REASON.txt").write_text(reason + "\n", encoding="utf-8")
        return target

    def load_run_state(self, path: PathLike) -> RunState:
        """Read the :class:`RunState` of a checkpoint directory (or a ``run_state.json`` file)."""
        target = Path(path)
        file = target / RUN_STATE_FILE if target.is_dir() else target
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise CheckpointError(
                f"{file} does not exist; {target} is not a finished checkpoint. Resume from the path that "
                f"CheckpointManager.latest() returns, or start the run fresh."
            ) from exc
        return RunState.from_json(text, source=str(file))
