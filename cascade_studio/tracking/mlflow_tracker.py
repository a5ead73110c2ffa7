"""MLflow tracking for one training run, built so that tracking can never break training.

- Default store: SQLite at ``<workspace>/mlflow.db`` with artifacts in ``<workspace>/mlartifacts``, because MLflow's
  file store is in maintenance mode and, without an explicit artifact location, artifacts land in ``./mlruns`` of
  whatever directory the process started in. Open it with
  ``mlflow ui --backend-store-uri sqlite:///<workspace>/mlflow.db``.
- Logging is synchronous (``synchronous=True`` on every call): MLflow's async queue would hide failures from us,
  and then we could not buffer what failed.
- An http(s) server is checked at :meth:`Tracker.start`, so an unreachable server stops the run *before* training.
- If the store goes away mid-run, calls do not raise: records go to ``<run_dir>/tracking_buffer.jsonl`` (one JSON
  object a line, each carrying its run id and original step/timestamp) and are sent, in order, once the store
  answers again. A resumed run sends what an earlier process left behind.

``import mlflow`` stays inside functions: it takes about a second and the UI imports this package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import posixpath
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

from .sqlite_store import prepare_sqlite_store, quiet_mlflow_sql_logs, sqlite_path, store_error

from ..run_folder import TRACKING_BUFFER_FILE, TRACKING_PENDING_DIR

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Both live in the run folder (its layout: run_folder.py); images/texts logged while offline wait as files.
BUFFER_FILE, PENDING_DIR = TRACKING_BUFFER_FILE, TRACKING_PENDING_DIR
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
_PARAMS_PER_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH
_METRICS_PER_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH
# Errors that will fail the same way on every retry: drop the record (with a warning) instead of buffering it.
_MLFLOW_SQL_LOGGER = "mlflow.store.db.utils"
_PERMANENT_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}
# MLflow's REST defaults (7 retries, backoff factor 2, 120 s timeout) can stall one training step for minutes
# while a server is away; a short wait plus our own buffer is the better trade for a training loop.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


class TrackingError(RuntimeError):
    """Tracking cannot be set up as asked; the message says what to change."""


class TrackingUnavailableError(TrackingError):
    """The tracking store/server cannot be reached at the start of a run."""


class TrackingStoreError(TrackingUnavailableError):
    """The local SQLite store is damaged, locked, or its disk is full; the message names the file and what to do."""


def _mlflow_client(uri: str) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError as exc:  # pragma: no cover - mlflow is a hard dependency
        raise TrackingError(
            "MLflow is not installed: `pip install mlflow`, or turn tracking off in the recipe."
        ) from exc
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """A file lock beside a SQLite store (held while opening it and creating the run), else no lock."""
    database = sqlite_path(uri)
    if database is None:
        yield
        return
    from filelock import FileLock, Timeout

    lock = FileLock(str(database) + ".lock", timeout=300)
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout as exc:
        raise TrackingStoreError(
            f"Another process has held {lock.lock_file} for 5 minutes while opening the MLflow database {database}. "
            "Wait for it (a run creating the database, or the studio), or stop it, then start again."
        ) from exc
    except OSError as exc:
        raise store_error(exc, database, "create") or exc
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _store_faults(uri: str, action: str = "open") -> Iterator[None]:
    """Turn a damaged, locked or full SQLite store into one :class:`TrackingStoreError` (other errors pass)."""
    database = sqlite_path(uri)
    try:
        with quiet_mlflow_sql_logs():
            yield
    except TrackingError:
        raise
    except Exception as exc:
        translated = store_error(exc, database, action) if database is not None else None
        if translated is None:
            raise
        raise translated from exc


def _open_client(uri: str, artifact_location: Optional[str], create: bool = True) -> Any:
    """An MlflowClient on ``uri``; a SQLite database is first made whole (:mod:`.sqlite_store`). None when a
    SQLite database does not exist and ``create`` is false. Call with :func:`_store_lock` held."""
    database = sqlite_path(uri)
    with _store_faults(uri, "open"):
        if database is not None and not prepare_sqlite_store(database, artifact_location, create=create):
            return None
        return _mlflow_client(uri)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def resolve_tracking_uri(uri: Optional[str], workspace: PathLike) -> str:
    """The argument, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<workspace>/mlflow.db`` (absolute)."""
    if uri:
        return uri
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    database = Path(workspace).resolve() / "mlflow.db"
    return f"sqlite:///{database.as_posix()}"


def default_artifact_location(workspace: PathLike) -> str:
    """``file://`` URI of ``<workspace>/mlartifacts``."""
    return (Path(workspace).resolve() / "mlartifacts").as_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailableError` if an http(s) tracking server does not answer within ``timeout``.

    Any HTTP answer (even 401/404) counts as reachable; only connection failures and timeouts do not.
    """
    if not _is_http(uri):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailableError(
            f"The MLflow tracking server at {uri} is not reachable ({reason}). Start it (for example "
            f"`mlflow server --host 127.0.0.1 --port <port>`), fix the tracking URI in the recipe or "
            f"$MLFLOW_TRACKING_URI, or leave the URI empty to use the local SQLite store in the workspace."
        ) from exc


def flatten_params(nested: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested recipe (dicts and dataclasses) into ``{"dotted.key": "value"}`` strings.

    Lists and tuples become JSON text (``[[2, 4], [4, 2]]``); an empty mapping stays visible as ``{}``.
    """
    if dataclasses.is_dataclass(nested) and not isinstance(nested, type):
        nested = dataclasses.asdict(nested)
    if not isinstance(nested, Mapping):
        raise TypeError(f"flatten_params expects a mapping or dataclass, got {type(nested).__name__}.")
    flat: dict[str, str] = {}
    for key, value in nested.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, dotted))
        elif isinstance(value, Mapping):
            flat[dotted] = "{}"
        elif isinstance(value, (list, tuple)):
            flat[dotted] = json.dumps(value, default=str)
        else:
            flat[dotted] = str(value)
    return flat


def _param_value_limit() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    except ImportError:  # pragma: no cover - very old MLflow
        return 500
    return int(MAX_PARAM_VAL_LENGTH)


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError):  # an artifact deleted before it could be sent
        return True
    return getattr(exc, "error_code", None) in _PERMANENT_ERROR_CODES


def _valid_key(key: str) -> bool:
    # MLflow stores keys as paths and rejects the whole batch if one key is not a clean relative path
    # ("a//b", "/x", "../y"); checking here lets us drop just that key.
    normal = posixpath.normpath(key)
    return bool(key) and normal == key and normal != "." and not normal.startswith(("..", "/"))


def _drop_bad_keys(values: dict[str, Any], what: str) -> dict[str, Any]:
    bad = [key for key in values if not _valid_key(key)]
    for key in bad:
        logger.warning("%s name %r is not allowed by MLflow (it must be a clean relative path); not logged.",
                       what, key)
    return {key: value for key, value in values.items() if key not in bad}


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """One MLflow run. Create it with :meth:`start`; only the main process should have one."""

    def __init__(self, client: Any, run_id: str, tracking_uri: str, artifact_uri: str, run_dir: PathLike,
                 retry_interval_s: float = 30.0) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.artifact_uri = artifact_uri
        self.run_dir = Path(run_dir)
        self.buffer_path = self.run_dir / BUFFER_FILE
        self.retry_interval_s = retry_interval_s
        self._params_by_run: dict[str, dict[str, str]] = {}
        self._offline_since: Optional[float] = None
        self._last_attempt = -math.inf  # monotonic() may be small right after boot
        self._warned_offline = False
        self._warned_changed: set[str] = set()
        self._ended = False
        self._pending_count = 0
        # metric -> steps this run already has (set when resuming): the steps between the last checkpoint and
        # the interruption run again, and MLflow's history should hold each step once.
        self._logged_steps: dict[str, set[int]] = {}

    # --------------------------------------------------------------------------------------------- start
    @classmethod
    def start(cls, uri: Optional[str], experiment: str, run_name: Optional[str], tags: Optional[Mapping[str, Any]],
              workspace: PathLike, run_dir: PathLike, resume_run_id: Optional[str] = None, *,
              retry_interval_s: float = 30.0, reachability_timeout_s: float = 5.0) -> "Tracker":
        """Open (or resume, same run id) an MLflow run; raises :class:`TrackingError` before training if it can't."""
        resolved = resolve_tracking_uri(uri, workspace)
        Path(workspace).mkdir(parents=True, exist_ok=True)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        if _is_http(resolved):
            for name, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            check_reachable(resolved, reachability_timeout_s)
        # A remote server stores artifacts where it was told to (--artifacts-destination); a local path of ours
        # would be meaningless there.
        artifact_location = None if _is_http(resolved) else default_artifact_location(workspace)
        # Runs starting together on a new SQLite store would each create its tables, and all but one fail
        # ("table ... already exists"); one at a time, the later ones find the tables made.
        with _store_lock(resolved):
            client = _open_client(resolved, artifact_location)
            try:
                experiment_id = _get_or_create_experiment(client, experiment, artifact_location)
                if resume_run_id:
                    run = client.get_run(resume_run_id)
                    tracker = cls(client, run.info.run_id, resolved, run.info.artifact_uri, run_dir, retry_interval_s)
                    if run.info.experiment_id != experiment_id:
                        logger.warning("Resumed run %s belongs to experiment id %s, not %r; logging there.",
                                       resume_run_id, run.info.experiment_id, experiment)
                    # Send what an earlier process buffered (including its end status) before marking RUNNING again.
                    tracker._flush(force=True)
                    client.update_run(tracker.run_id, status="RUNNING")
                    tracker._logged_steps = tracker._metric_steps()
                    if tags:
                        tracker.set_tags(tags)
                else:
                    clean_tags = {str(k): str(v) for k, v in (tags or {}).items()}
                    run = client.create_run(experiment_id, tags=clean_tags, run_name=run_name)
                    tracker = cls(client, run.info.run_id, resolved, run.info.artifact_uri, run_dir, retry_interval_s)
                    tracker._params_by_run[tracker.run_id] = {}
            except TrackingError:
                raise
            except Exception as exc:
                database = sqlite_path(resolved)
                translated = store_error(exc, database) if database is not None else None
                if translated is not None:
                    raise translated from exc
                hint = ""
                if resume_run_id and getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                    hint = (f" Run {resume_run_id} is not in this store: check the workspace/tracking URI, or resume "
                            "without a run id to start a new MLflow run.")
                elif resolved.startswith("file:") or "://" not in resolved:
                    hint = " MLflow's file store is in maintenance mode: use sqlite:///<path>/mlflow.db instead."
                raise TrackingUnavailableError(f"Could not open an MLflow run at {resolved}: {exc}.{hint}") from exc
        return tracker

    # ------------------------------------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a nested or flat dict; values are stringified and truncated to MLflow's length limit."""
        limit = _param_value_limit()
        flat = flatten_params(params)
        truncated = _drop_bad_keys({key: value[:limit] for key, value in flat.items()}, "Param")
        self._record({"kind": "params", "values": truncated})

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log numeric metrics at ``step`` (tensors and numpy scalars are converted with ``float``)."""
        values: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                values[str(key)] = float(value)
            except (TypeError, ValueError):
                logger.warning("Metric %r has a non-numeric value %r; not logged.", key, value)
        values = _drop_bad_keys(values, "Metric")
        # A resumed run repeats the steps after its last checkpoint exactly (same batches, same seeds): the
        # points the interrupted process logged for them stay, and are not logged a second time.
        values = {key: value for key, value in values.items() if int(step) not in self._logged_steps.get(key, ())}
        if values:
            self._record({"kind": "metrics", "step": int(step), "timestamp": _now_ms(), "values": values})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified)."""
        self._record({"kind": "tags", "values": {str(k): str(v) for k, v in tags.items()}})

    def log_artifact(self, path: PathLike, artifact_path: Optional[str] = None) -> None:
        """Upload a file or a directory (sent later from its current location if the store is away)."""
        self._record({"kind": "artifact", "local_path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Log a PIL image as ``artifact_file`` (for example ``samples/step_000100.png``)."""
        local = self._pending_file(artifact_file)
        try:
            image.save(local)
        except (OSError, ValueError) as exc:
            logger.warning("Could not save image %s for tracking (%s); not logged.", artifact_file, exc)
            return
        self._record_pending(local, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as the artifact ``artifact_file`` (for example ``recipe.yaml``)."""
        local = self._pending_file(artifact_file)
        try:
            local.write_text(text, encoding="utf-8")
        except OSError as exc:
            logger.warning("Could not write %s for tracking (%s); not logged.", artifact_file, exc)
            return
        self._record_pending(local, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED after a last attempt to send buffered records. Idempotent."""
        if status not in END_STATUSES:
            raise ValueError(f"status must be one of {END_STATUSES}, got {status!r}.")
        if self._ended:
            return
        self._ended = True
        self._last_attempt = -math.inf  # a last try, whatever the retry interval says
        self._record({"kind": "end", "status": status, "end_time": _now_ms()})
        pending = self.pending()
        if pending:
            logger.warning(
                "%d tracking record(s) could not be sent to %s; they are kept in %s. They are sent when this run "
                "is resumed, or call cascade_studio.tracking.replay_buffer(%r, %r) once the store is back.",
                pending, self.tracking_uri, self.buffer_path, self.tracking_uri, str(self.run_dir))

    def pending(self) -> int:
        """How many records wait in the buffer file."""
        return len(self._read_buffer())

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            self.end("KILLED")
        else:
            self.end("FAILED")

    # ----------------------------------------------------------------------------------- send or buffer
    def _pending_file(self, artifact_file: str) -> Path:
        # One fresh folder per record keeps the artifact's file name (MLflow uses it) without collisions.
        self._pending_count += 1
        folder = self.run_dir / PENDING_DIR / f"{time.time_ns()}-{self._pending_count}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / Path(artifact_file).name

    def _record_pending(self, local: Path, artifact_file: str) -> None:
        parent = Path(artifact_file).parent.as_posix()
        self._record({"kind": "artifact", "local_path": str(local), "artifact_path": None if parent == "." else parent,
                      "pending": True})

    def _record(self, record: dict[str, Any]) -> None:
        record["run_id"] = self.run_id
        if self._flush():
            try:
                self._send(record)
                return
            except Exception as exc:  # never into training: buffer below
                if _is_permanent(exc):
                    logger.warning("MLflow rejected a %s record (%s); it is dropped.", record["kind"], exc)
                    return
                self._go_offline(exc)
        self._append(record)

    def _go_offline(self, exc: BaseException) -> None:
        if self._offline_since is None:
            self._offline_since = time.monotonic()
            # MLflow's SQL store logs a full traceback for every failed call; our one warning says it all.
            logging.getLogger(_MLFLOW_SQL_LOGGER).setLevel(logging.CRITICAL)
        self._last_attempt = time.monotonic()
        if not self._warned_offline:
            self._warned_offline = True
            logger.warning("MLflow at %s is not answering (%s: %s). Training continues; tracking records are "
                           "buffered in %s and sent when it is back.", self.tracking_uri, type(exc).__name__, exc,
                           self.buffer_path)

    def _flush(self, force: bool = False) -> bool:
        """Try to send buffered records in order; True when the buffer is empty afterwards."""
        if not self.buffer_path.exists():
            return True
        if not force and time.monotonic() - self._last_attempt < self.retry_interval_s:
            return False
        records = self._read_buffer()
        for index, record in enumerate(records):
            try:
                self._send(record)
            except Exception as exc:
                if _is_permanent(exc):
                    logger.warning("MLflow rejected a buffered %s record (%s); it is dropped.", record.get("kind"),
                                   exc)
                    continue
                self._go_offline(exc)
                self._write_buffer(records[index:])
                return False
        self.buffer_path.unlink(missing_ok=True)
        if self._offline_since is not None:
            logger.info("MLflow at %s answers again; sent %d buffered record(s).", self.tracking_uri, len(records))
            logging.getLogger(_MLFLOW_SQL_LOGGER).setLevel(logging.NOTSET)
        self._offline_since = None
        return True

    def _send(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id, kind = record["run_id"], record["kind"]
        if kind == "metrics":
            metrics = [Metric(key, value, record["timestamp"], record["step"])
                       for key, value in record["values"].items()]
            for chunk in _chunks(metrics, _METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=chunk, synchronous=True)
        elif kind == "params":
            existing = self._existing_params(run_id)
            new: dict[str, str] = {}
            for key, value in record["values"].items():
                if key not in existing:
                    new[key] = value
                elif existing[key] != value and key not in self._warned_changed:
                    self._warned_changed.add(key)
                    logger.warning("Param %r was logged as %r and is now %r; MLflow params cannot change, so the "
                                   "first value is kept (the new one is in the run's recipe).", key, existing[key],
                                   value)
            for chunk in _chunks(sorted(new.items()), _PARAMS_PER_BATCH):
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)
                existing.update(chunk)
        elif kind == "tags":
            tags = [RunTag(k, v) for k, v in record["values"].items()]
            for chunk in _chunks(tags, _PARAMS_PER_BATCH):
                self.client.log_batch(run_id, tags=chunk, synchronous=True)
        elif kind == "artifact":
            local = Path(record["local_path"])
            if local.is_dir():
                self.client.log_artifacts(run_id, str(local), record.get("artifact_path"))
            elif local.is_file():
                self.client.log_artifact(run_id, str(local), record.get("artifact_path"))
            else:
                raise FileNotFoundError(f"artifact {local} no longer exists")
            if record.get("pending"):
                shutil.rmtree(local.parent, ignore_errors=True)
        elif kind == "end":
            self.client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
        else:
            logger.warning("Unknown tracking record kind %r in %s; skipped.", kind, self.buffer_path)

    def _metric_steps(self) -> dict[str, set[int]]:
        """The steps at which this run has each metric, in the store or still waiting in the buffer file."""
        steps: dict[str, set[int]] = {}
        for key in self.client.get_run(self.run_id).data.metrics:
            steps[key] = {int(m.step) for m in self.client.get_metric_history(self.run_id, key)}
        for record in self._read_buffer():
            if record.get("kind") == "metrics" and record.get("run_id") == self.run_id:
                for key in record.get("values", {}):
                    steps.setdefault(key, set()).add(int(record["step"]))
        return steps

    def _existing_params(self, run_id: str) -> dict[str, str]:
        if run_id not in self._params_by_run:
            self._params_by_run[run_id] = dict(self.client.get_run(run_id).data.params)
        return self._params_by_run[run_id]

    def _read_buffer(self) -> list[dict[str, Any]]:
        try:
            lines = self.buffer_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash while appending
                logger.warning("Skipping a damaged line in %s.", self.buffer_path)
        return records

    def _append(self, record: dict[str, Any]) -> None:
        try:
            with open(self.buffer_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:  # disk full or read-only: losing a metric beats stopping the run
            logger.warning("Could not buffer a tracking record in %s (%s); it is lost.", self.buffer_path, exc)

    def _write_buffer(self, records: list[dict[str, Any]]) -> None:
        # Write-then-rename so a crash mid-rewrite cannot lose the buffer. (Not trainers.atomic: tracking must
        # not depend on trainers, which imports tracking.)
        temporary = self.buffer_path.with_name(self.buffer_path.name + ".tmp")
        try:
            temporary.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            os.replace(temporary, self.buffer_path)
        except OSError as exc:
            logger.warning("Could not rewrite the tracking buffer %s (%s).", self.buffer_path, exc)


class NullTracker:
    """Same methods as :class:`Tracker`, doing nothing: tracking disabled, or a non-main process."""

    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    artifact_uri: Optional[str] = None

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> "NullTracker":
        """Accepts :meth:`Tracker.start`'s arguments and ignores them."""
        return cls()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """No-op."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """No-op."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """No-op."""

    def log_artifact(self, path: PathLike, artifact_path: Optional[str] = None) -> None:
        """No-op."""

    def log_image(self, image: Any, artifact_file: str) -> None:
        """No-op."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """No-op."""

    def end(self, status: str = "FINISHED") -> None:
        """Validates ``status`` like :meth:`Tracker.end`, then does nothing."""
        if status not in END_STATUSES:
            raise ValueError(f"status must be one of {END_STATUSES}, got {status!r}.")

    def pending(self) -> int:
        """Always 0."""
        return 0

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None


def start_tracker(enabled: bool, is_main_process: bool, **start_kwargs: Any) -> Union[Tracker, NullTracker]:
    """A real :class:`Tracker` on the main process when tracking is enabled, else a :class:`NullTracker`."""
    if enabled and is_main_process:
        return Tracker.start(**start_kwargs)
    return NullTracker()


def _get_or_create_experiment(client: Any, name: str, artifact_location: Optional[str]) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except Exception as exc:  # another process created it first
            if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} was deleted. Restore it (MLflow UI, or `mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or choose another experiment name in the recipe."
        )
    return experiment.experiment_id


def replay_buffer(uri: str, run_dir: PathLike) -> int:
    """Send the records buffered in ``<run_dir>/tracking_buffer.jsonl``; returns how many are still unsent."""
    # Each buffered record names its own run, so the sender needs no run id of its own.
    sender = Tracker(_mlflow_client(uri), "", uri, "", run_dir, retry_interval_s=0.0)
    sender._flush(force=True)
    return sender.pending()


# --------------------------------------------------------------------------------------------- reading runs
def _sqlite_missing(uri: str) -> bool:
    return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists()


def _artifact_paths(client: Any, run_id: str, path: Optional[str] = None) -> list[str]:
    found: list[str] = []
    for info in client.list_artifacts(run_id, path):
        found.extend(_artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return found


def _reading_client(uri: str) -> Any:
    """A client for reading runs (the studio, compare): a damaged, locked or full store is one clear
    :class:`TrackingStoreError`; a half-made SQLite database with no runs is made whole first. None when a SQLite
    database does not exist."""
    if _sqlite_missing(uri):
        return None
    with _store_lock(uri):
        return _open_client(uri, None, create=False)


def read_run(uri: str, run_id: str) -> dict[str, Any]:
    """Everything about one run: status, params, tags, full metric histories (by step) and artifact paths."""
    client = _reading_client(uri)
    if client is None:
        raise TrackingError(f"No tracking database at {uri}; check the workspace path.")
    with _store_faults(uri):
        return _read_run(client, run_id)


def _read_run(client: Any, run_id: str) -> dict[str, Any]:
    run = client.get_run(run_id)
    histories = {
        key: [{"step": m.step, "value": m.value, "timestamp": m.timestamp}
              for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]
        for key in run.data.metrics
    }
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "artifact_uri": run.info.artifact_uri,
        "params": dict(run.data.params),
        "tags": dict(run.data.tags),
        "metrics": histories,
        "artifacts": sorted(_artifact_paths(client, run_id)),
    }


def list_runs(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Runs of an experiment, newest first, with their latest metric values; [] if there is none."""
    client = _reading_client(uri)
    if client is None:
        return []
    with _store_faults(uri):
        return _list_runs(client, experiment)


def _list_runs(client: Any, experiment: str) -> list[dict[str, Any]]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    summaries: list[dict[str, Any]] = []
    page_token = None
    while True:
        page = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"],
                                  page_token=page_token)
        for run in page:
            summaries.append({
                "run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
                "start_time": run.info.start_time, "end_time": run.info.end_time,
                "metrics": dict(run.data.metrics), "params": dict(run.data.params), "tags": dict(run.data.tags),
            })
        page_token = page.token
        if not page_token:
            return summaries


def set_run_deleted(uri: str, run_id: str, deleted: bool = True) -> None:
    """Mark a run deleted in MLflow (hidden from lists, restorable with ``mlflow runs restore``), or restore it."""
    client = _reading_client(uri)
    if client is None:
        raise TrackingError(f"No tracking database at {uri}; check the workspace path.")
    with _store_faults(uri, "write"):
        if deleted:
            client.delete_run(run_id)
        else:
            client.restore_run(run_id)
