"""The local MLflow database (``<workspace>/mlflow.db``): made safely, and its faults told in one sentence.

- **Made whole or not at all.** MLflow creates its tables and then runs some sixty schema migrations in place; a
  kill or a full disk in between leaves a half-made file that breaks every later run ("table spans already
  exists", "out-of-date database schema"). Here a new database is created and migrated under a temporary name
  in the same folder and renamed into place only when complete (``os.replace`` within one folder is atomic).
- **A half-made file from before is rebuilt.** A database whose schema is incomplete and that holds no runs (made
  by an older studio, or by ``mlflow ui`` killed while creating it) is moved aside and made again, with a
  warning; one that holds runs is never touched.
- **Faults as messages.** A damaged file, a lock held by another process and a full disk come back as
  :class:`TrackingStoreError` naming the file and what to do, instead of a SQLAlchemy traceback.

Callers hold the store's file lock (``mlflow.db.lock``) around :func:`prepare_sqlite_store`, so two runs
starting together never both create the database.
"""
from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import quote

from ..diskspace import describe_free_space, file_size_limit, format_bytes, free_space

logger = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
_SQLITE_HEADER = b"SQLite format 3\x00"
_CREATING = ".creating-"  # temporary name: .mlflow.db.creating-<pid>
_LOCK_WAIT_S = 5.0  # how long to wait for another process's write transaction before saying so
_LOW_SPACE_BYTES = 64 * 1024 * 1024


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs/path`` or ``sqlite:///rel/path``), else None."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    rest = uri[len(SQLITE_PREFIX):].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest)


# ------------------------------------------------------------------------------------------------ inspecting
class _StoreState:
    def __init__(self, tables: set[str], revision: Optional[str], runs: Optional[int]) -> None:
        self.tables, self.revision, self.runs = tables, revision, runs


def _head_revision() -> Optional[str]:
    """The schema revision this MLflow creates; None if MLflow's internals moved (then only tables are checked)."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        return str(_get_latest_schema_revision())
    except Exception:  # pragma: no cover - a future MLflow
        return None


def _inspect(path: Path) -> _StoreState:
    """Tables, schema revision and number of runs, read without writing anything (raises sqlite3 errors)."""
    with open(path, "rb") as handle:
        header = handle.read(len(_SQLITE_HEADER))
    if header != _SQLITE_HEADER:
        raise sqlite3.DatabaseError("file is not a database")
    connection = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=_LOCK_WAIT_S)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        revision = None
        if "alembic_version" in tables:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
        runs = connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else None
    finally:
        connection.close()
    return _StoreState(tables, revision, runs)


def _is_complete(state: _StoreState, head: Optional[str]) -> bool:
    if head is not None:
        return state.revision == head
    return {"alembic_version", "experiments", "runs", "metrics"} <= state.tables


# ------------------------------------------------------------------------------------------------- creating
def _forget_engines(path: Path) -> None:
    """Drop MLflow's cached SQLAlchemy engines for ``path``: their pooled connections would keep reading the
    file that was moved aside or replaced."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    except ImportError:  # pragma: no cover
        return
    engines = getattr(SqlAlchemyStore, "_engine_map", None)
    if not isinstance(engines, dict):
        return
    target = os.path.abspath(path)
    for uri in list(engines):
        found = sqlite_path(str(uri))
        if found is not None and os.path.abspath(found) == target:
            engine = engines.pop(uri, None)
            if engine is not None:
                engine.dispose()


def _leftovers(path: Path) -> Iterator[Path]:
    return path.parent.glob(f".{path.name}{_CREATING}*")


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# The first database a process creates, kept as bytes (with the artifact root it was made for) per schema
# revision: every later one is a copy with its Default experiment moved to its own artifact root, instead of
# running MLflow's migrations again (about 2 s each here; a process such as the studio or a test session makes
# many workspaces).
_TEMPLATES: dict[str, tuple[bytes, str]] = {}


def _default_experiment_location(connection: sqlite3.Connection) -> Optional[str]:
    row = connection.execute("SELECT artifact_location FROM experiments WHERE experiment_id = 0").fetchone()
    return None if row is None else str(row[0])


def _from_template(temporary: Path, root: str, head: Optional[str]) -> bool:
    """Write the process's template database to ``temporary`` for ``root``; False when there is none to use."""
    template = _TEMPLATES.get(head) if head is not None else None
    if template is None:
        return False
    data, template_root = template
    temporary.write_bytes(data)
    connection = sqlite3.connect(str(temporary), timeout=_LOCK_WAIT_S)
    try:
        location = _default_experiment_location(connection)
        if location is None or not location.startswith(template_root):
            return False
        columns = {row[1] for row in connection.execute("PRAGMA table_info(experiments)")}
        stamps = "".join(f", {c} = :now" for c in ("creation_time", "last_update_time") if c in columns)
        connection.execute(f"UPDATE experiments SET artifact_location = :location{stamps} WHERE experiment_id = 0",
                           {"location": root + location[len(template_root):], "now": int(time.time() * 1000)})
        connection.commit()
    finally:
        connection.close()
    return _is_complete(_inspect(temporary), head)


def _create(path: Path, artifact_root: Optional[str]) -> None:
    """Create and migrate a new MLflow database beside ``path`` and rename it into place when complete."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    temporary = path.with_name(f".{path.name}{_CREATING}{os.getpid()}")
    _remove(temporary)
    temporary_uri = f"{SQLITE_PREFIX}{temporary.as_posix()}"
    root = artifact_root or (path.parent / "mlartifacts").as_uri()
    head = _head_revision()
    try:
        if not _from_template(temporary, root, head):
            _remove(temporary)
            try:
                SqlAlchemyStore(temporary_uri, root)
            finally:
                _forget_engines(temporary)
            if head is not None:
                _TEMPLATES.setdefault(head, (temporary.read_bytes(), root))
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent)
    except BaseException:  # a kill (KeyboardInterrupt) included: never leave the temporary file behind
        _remove(temporary)
        _remove(temporary.with_name(temporary.name + "-journal"))
        raise
    _forget_engines(path)


def prepare_sqlite_store(path: Path, artifact_root: Optional[str], create: bool = True) -> bool:
    """Make sure ``path`` is a complete MLflow database before MLflow opens it; False when there is none
    (``create=False``). Call with the store's file lock held. Raises :class:`TrackingStoreError`."""
    path = Path(os.path.abspath(path))
    for leftover in _leftovers(path):  # from a process killed while creating; we hold the lock, so it is dead
        _remove(leftover)
    exists = path.exists() and path.stat().st_size > 0  # SQLite treats an empty file as an empty database
    if not exists:
        if not create:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _remove(path)
        try:
            _create(path, artifact_root)
        except Exception as exc:
            raise store_error(exc, path, "create") or exc
        return True
    try:
        state = _inspect(path)
    except (sqlite3.Error, OSError) as exc:
        raise store_error(exc, path, "open") or exc
    head = _head_revision()
    if _is_complete(state, head):
        return True
    if state.runs:
        # Runs are in it: never rebuilt. MLflow completes missing tables itself, and for an older schema its own
        # error says what to do (`mlflow db upgrade`).
        return True
    aside = path.with_name(f"{path.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
    logger.warning(
        "The MLflow database %s was left half-made (schema revision %s, this MLflow makes %s; no runs in it), "
        "probably by a process killed or a disk that filled up while creating it. It is moved to %s (delete it "
        "when you like) and made again.", path, state.revision or "none", head or "a complete one", aside)
    _forget_engines(path)
    os.replace(path, aside)
    try:
        _create(path, artifact_root)
    except Exception as exc:
        raise store_error(exc, path, "create") or exc
    return True


# -------------------------------------------------------------------------------------------------- messages
def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [getattr(current, "orig", None), current.__cause__, current.__context__]


def _holders(path: Path) -> list[str]:
    """Other processes with ``path`` open (Linux /proc; empty where that cannot be read)."""
    target = os.path.realpath(path)
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                command = " ".join((entry / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
                found.append(f"process {entry.name} ({command[:100] or '?'})")
        except OSError:
            continue
    return found


def _kind(exc: BaseException) -> tuple[Optional[str], str]:
    """("corrupt" | "locked" | "full" | "io" | "unopenable" | None, the underlying error's text)."""
    for cause in _causes(exc):
        text = str(cause).split("\n", 1)[0]
        lower = text.lower()
        name = str(getattr(cause, "sqlite_errorname", ""))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EFBIG):
            return "full", text
        if "file is not a database" in lower or "malformed" in lower or name.startswith(("SQLITE_CORRUPT",
                                                                                         "SQLITE_NOTADB")):
            return "corrupt", text
        if "database is locked" in lower or "database table is locked" in lower or name.startswith("SQLITE_BUSY"):
            return "locked", text
        if "database or disk is full" in lower or name.startswith("SQLITE_FULL"):
            return "full", text
        if "disk i/o error" in lower or name.startswith("SQLITE_IOERR"):
            return "io", text
        if "unable to open database file" in lower or "readonly database" in lower:
            return "unopenable", text
    return None, ""


def store_error_message(exc: BaseException, path: Path, action: str = "open") -> Optional[str]:
    """One message for a fault of the SQLite database ``path`` (what happened, what to do); None if unknown."""
    kind, detail = _kind(exc)
    if kind is None:
        return None
    if kind == "corrupt":
        return (f"The MLflow database {path} is damaged ({detail}). Move it aside (mv {path} {path}.damaged) and the "
                f"next run makes a new, empty one; or restore it from a backup. To try to save its runs (with the "
                f"sqlite3 command-line tool): sqlite3 {path}.damaged .recover | sqlite3 {path}")
    if kind == "locked":
        holders = _holders(path)
        who = (f"; it is open in {', '.join(holders)}" if holders else
               " (for example a sqlite3 shell with an open transaction, or another run writing to it)")
        return (f"The MLflow database {path} is locked: another process holds a write transaction on it{who}. "
                f"Wait for that process to finish, or end its transaction or stop it, then start again.")
    if kind == "unopenable":
        return (f"The MLflow database {path} cannot be opened ({detail}): check that its folder exists and that "
                f"you may write there, or set tracking.uri (or $MLFLOW_TRACKING_URI) to another {SQLITE_PREFIX}... "
                f"path.")
    space = describe_free_space(path.parent)
    if action == "create":  # measured after the unfinished file was removed, so it may look roomy
        space += " once the unfinished file was removed"
    limit = file_size_limit()
    free = free_space(path.parent)
    if limit is not None and (kind == "io" or (free is not None and free > _LOW_SPACE_BYTES)):
        reason = f"the file-size limit of this process was reached (ulimit -f: {format_bytes(limit)}; {space})"
        todo = "Raise the limit (ulimit -f unlimited)"
    elif kind == "full" or (free is not None and free < _LOW_SPACE_BYTES):
        reason = f"the disk holding it is full ({space})"
        todo = f"Free space on the filesystem holding {path.parent}"
    else:
        return (f"The MLflow database {path} could not be {action}ed: a disk I/O error ({detail}; {space}). "
                f"Check the disk, or set tracking.uri to a database on another disk, then start again.")
    kept = (" Nothing half-made was left behind: the next run creates it whole." if action == "create" else
            " Runs already recorded in it are kept.")
    return (f"Could not {action} the MLflow database {path}: {reason}.{kept} {todo}, then start again; or set "
            f"tracking.uri (or $MLFLOW_TRACKING_URI) to {SQLITE_PREFIX}/<folder on a larger disk>/mlflow.db.")


def store_error(exc: BaseException, path: Path, action: str = "open") -> Optional[Exception]:
    """:class:`TrackingStoreError` for a known fault of ``path``, else None (the caller re-raises ``exc``)."""
    from .mlflow_tracker import TrackingStoreError

    if isinstance(exc, TrackingStoreError):
        return exc
    message = store_error_message(exc, path, action)
    if message is None:
        return None
    error = TrackingStoreError(message)
    error.__cause__ = exc
    return error


def quiet_mlflow_sql_logs() -> Any:
    """MLflow logs a warning with the whole SQL error for every retry of opening a store; ours says it once."""
    return _Quiet("mlflow.store.db.utils")


class _Quiet:
    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR + 1)

    def __exit__(self, *exc_info: Any) -> None:
        self.logger.setLevel(self.level)
