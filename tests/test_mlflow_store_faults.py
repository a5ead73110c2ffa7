"""Faults of the local MLflow database (``<workspace>/mlflow.db``), injected where they really happen: random bytes
or damaged pages in the file, another process holding a write transaction, a disk that fills up while the database
is first created (the process's file-size limit, and a real full filesystem where one can be mounted), and a
process killed in the middle of creating it. Each ends in one message naming the file and what to do, in the CLI,
the Python API and the studio's Runs page; a half-made database never breaks the runs after it.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cascade_studio.tracking import Tracker, TrackingError, list_runs, read_run
from subprocess_env import can_mount_tmpfs, child_env, tmpfs_prefix  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "lora.yaml")
DATA = REPO / "datasets" / "tiny-shapes"
FAST = [f"data.path={DATA}", "preview.every=0", "train.max_steps=2", "train.checkpoint_every=0",
        "data.holdout_fraction=0"]
EXPERIMENT = "cascade-studio"

CLI_DRIVER = r"""
import os, resource, signal, sys
fault = os.environ.get("CS_TEST_DB_FAULT", "")
if fault.startswith("fsize:"):
    # From the start no file may grow past the limit: mlflow.db (about 1 MB once migrated) cannot be created.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(fault[6:]) * 1024, resource.RLIM_INFINITY))
elif fault.startswith("kill-at:"):
    # SIGKILL right after MLflow ran this SQL statement while creating its tables (mid-migration).
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "after_cursor_execute")
    def kill(conn, cursor, statement, *args):
        if statement.lstrip().startswith(fault[8:]):
            os.kill(os.getpid(), signal.SIGKILL)
from cascade_studio.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_cli(workspace: Path, name: str, fault: str = "", prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["train", RECIPE, *FAST, f"workspace={workspace}", f"name={name}", "--no-progress"]
    return subprocess.run([*prefix, sys.executable, "-c", CLI_DRIVER, *args], cwd=REPO,
                          env=child_env(CS_TEST_DB_FAULT=fault), capture_output=True, text=True, timeout=600)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The run's last stderr line, after checking it is the only thing it said about the failure."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "sqlalchemy" not in result.stderr.lower(), result.stderr
    return result.stderr.strip().splitlines()[-1]


def start(workspace: Path, name: str = "run") -> Tracker:
    return Tracker.start(None, EXPERIMENT, name, {}, workspace, workspace / "runs" / name)


def uri(workspace: Path) -> str:
    return f"sqlite:///{workspace / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> Path:
    """A complete store with one finished run (creating the schema is the slow part: made once, then copied)."""
    workspace = tmp_path_factory.mktemp("good")
    tracker = start(workspace, "first")
    tracker.log_metrics({"loss": 0.5}, step=1)
    tracker.end("FINISHED")
    return workspace / "mlflow.db"


def copy_store(good_store: Path, workspace: Path) -> Path:
    workspace.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(good_store, workspace / "mlflow.db"))


# ------------------------------------------------------------------------------------------------ damaged file
@pytest.mark.slow
def test_random_bytes_in_the_database_stop_a_real_run_with_one_message(tmp_path):
    database = tmp_path / "mlflow.db"
    garbage = os.urandom(64 * 1024)
    database.write_bytes(garbage)
    message = error_line(train_cli(tmp_path, "garbage"))
    assert message.startswith(f"error: The MLflow database {database} is damaged"), message
    assert f"mv {database} {database}.damaged" in message and "restore it from a backup" in message
    assert database.read_bytes() == garbage  # never overwritten: it may be restorable
    assert not (tmp_path / "cache").exists()  # stopped before any data was encoded


def test_damaged_pages_are_reported_by_the_api_and_by_the_runs_listing(good_store, tmp_path):
    database = copy_store(good_store, tmp_path)
    with open(database, "r+b") as handle:  # page 1 (the schema) survives, the pages after it do not
        handle.seek(4096)
        handle.write(os.urandom(database.stat().st_size - 4096))
    for attempt in (lambda: start(tmp_path), lambda: list_runs(uri(tmp_path), EXPERIMENT)):
        with pytest.raises(TrackingError) as caught:
            attempt()
        assert str(caught.value).startswith(f"The MLflow database {database} is damaged"), caught.value
        assert "Move it aside" in str(caught.value)


def test_the_runs_page_shows_the_same_message_for_a_damaged_database(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "mlflow.db").write_bytes(os.urandom(8192))
    monkeypatch.setenv("CASCADE_STUDIO_WORKSPACE", str(workspace))
    monkeypatch.setenv("CASCADE_STUDIO_QUEUE_WORKER", "0")
    at = AppTest.from_string("from cascade_studio.ui.page_runs import render\nrender()\n",
                             default_timeout=120).run()
    assert not at.exception, at.exception
    shown = "\n".join(e.value for e in at.error)
    assert f"The MLflow database {workspace / 'mlflow.db'} is damaged" in shown and "Move it aside" in shown


# ---------------------------------------------------------------------------------------------------- a lock
HOLD_WRITE_LOCK = r"""
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(120)
"""


def test_a_write_lock_held_by_another_process_names_that_process(good_store, tmp_path):
    database = copy_store(good_store, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(database)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for attempt in (lambda: start(tmp_path), lambda: read_run(uri(tmp_path), "0" * 32)):
            with pytest.raises(TrackingError) as caught:
                attempt()
            message = str(caught.value)
            assert message.startswith(f"The MLflow database {database} is locked"), message
            assert f"process {holder.pid} (" in message and "Wait for that process to finish" in message
    finally:
        holder.kill()
        holder.wait()
    start(tmp_path, "after-the-lock").end("FINISHED")  # the lock gone, the same store works


# --------------------------------------------------------------------------------------- full disk at creation
@pytest.mark.slow
def test_file_size_limit_while_creating_the_database_leaves_nothing_half_made(tmp_path):
    message = error_line(train_cli(tmp_path, "full", fault="fsize:256"))
    database = tmp_path / "mlflow.db"
    assert message.startswith(f"error: Could not create the MLflow database {database}: the file-size limit of this "
                              "process was reached"), message
    assert "on the filesystem mounted at " in message and "Nothing half-made was left behind" in message
    assert not database.exists() and not list(tmp_path.glob(".mlflow.db*"))
    assert not (tmp_path / "cache").exists()
    tracker = start(tmp_path, "next")  # the next run in the same workspace creates it whole
    tracker.end("FINISHED")
    assert [r["run_name"] for r in list_runs(uri(tmp_path), EXPERIMENT)] == ["next"]


@pytest.mark.slow
def test_a_really_full_filesystem_is_named_by_its_mount_point(tmp_path):
    if not can_mount_tmpfs():
        pytest.skip("needs `unshare --mount` and tmpfs mounts (root or user namespaces) for a real full disk")
    small = tmp_path / "small-disk"
    small.mkdir()
    # A 384 KiB filesystem mounted in a private mount namespace of the child only: mlflow.db cannot fit.
    prefix = tmpfs_prefix(small, 384)
    message = error_line(train_cli(small, "full", prefix=prefix))
    assert message.startswith(f"error: Could not create the MLflow database {small / 'mlflow.db'}: the disk "
                              "holding it is full"), message
    assert f"free on the filesystem mounted at {small} once" in message  # that disk, not the current directory's
    assert f"Free space on the filesystem holding {small}" in message


# --------------------------------------------------------------------------------- a kill during first creation
@pytest.mark.slow
def test_a_kill_while_creating_the_database_does_not_break_the_next_run(tmp_path):
    # After "CREATE TABLE spans" and before the migration that made it is recorded: the state in which MLflow
    # alone fails on every later start ("table spans already exists").
    killed = train_cli(tmp_path, "killed", fault="kill-at:CREATE TABLE spans")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    tracker = start(tmp_path, "next")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end("FINISHED")
    assert [r["run_name"] for r in list_runs(uri(tmp_path), EXPERIMENT)] == ["next"]
    assert not list(tmp_path.glob(".mlflow.db.creating-*"))  # the killed process's temporary file is cleaned


def _half_made_by_mlflow_itself(database: Path) -> None:
    """What a kill or full disk left behind before this studio created databases under a temporary name: MLflow's
    own in-place creation, stopped by the file-size limit halfway through its migrations."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (320 * 1024, resource.RLIM_INFINITY))\n"
        "from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore\n"
        "try:\n"
        f"    SqlAlchemyStore({'sqlite:///' + str(database)!r}, {database.parent.as_uri()!r})\n"
        "except Exception:\n"
        "    sys.exit(3)\n"
    )
    assert subprocess.run([sys.executable, "-c", script], env=child_env(), timeout=300).returncode == 3
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT COUNT(*) FROM alembic_version").fetchone()[0] == 1  # half-way


def test_a_half_made_database_without_runs_is_rebuilt_and_said_so(tmp_path, caplog):
    database = tmp_path / "mlflow.db"
    _half_made_by_mlflow_itself(database)
    with caplog.at_level(logging.WARNING, logger="cascade_studio.tracking.sqlite_store"):
        tracker = start(tmp_path, "after-half-made")
    tracker.end("FINISHED")
    said = caplog.text
    assert f"The MLflow database {database} was left half-made" in said and "no runs in it" in said
    aside = list(tmp_path.glob("mlflow.db.incomplete-*"))
    assert len(aside) == 1 and str(aside[0]) in said  # moved aside, not deleted
    assert [r["run_name"] for r in list_runs(uri(tmp_path), EXPERIMENT)] == ["after-half-made"]


def test_two_runs_starting_together_on_a_new_workspace_share_one_database(tmp_path):
    script = ("import sys\nfrom cascade_studio.tracking import Tracker\n"
              "w = sys.argv[1]\nTracker.start(None, 'cascade-studio', sys.argv[2], {}, w, w + '/runs/' + sys.argv[2])"
              ".end('FINISHED')\n")
    children = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name], env=child_env())
                for name in ("a", "b")]
    deadline = time.monotonic() + 300
    assert [child.wait(timeout=max(1.0, deadline - time.monotonic())) for child in children] == [0, 0]
    assert sorted(r["run_name"] for r in list_runs(uri(tmp_path), EXPERIMENT)) == ["a", "b"]


def test_a_second_database_in_one_process_is_a_copy_pointing_at_its_own_artifacts(tmp_path, monkeypatch):
    """A process that makes several workspaces (the studio, a test session) migrates MLflow's schema once: later
    databases are copies of the first, whose Default experiment points at their own artifact folder."""
    from mlflow.store.tracking import sqlalchemy_store

    from cascade_studio.tracking import sqlite_store

    monkeypatch.setattr(sqlite_store, "_TEMPLATES", {})
    made = []
    real_store = sqlalchemy_store.SqlAlchemyStore

    class counting_store(real_store):
        def __init__(self, uri, *args, **kwargs):
            made.append(uri)
            super().__init__(uri, *args, **kwargs)

    monkeypatch.setattr(sqlalchemy_store, "SqlAlchemyStore", counting_store)
    first, second = tmp_path / "first", tmp_path / "second"
    for workspace in (first, second):
        workspace.mkdir()
        assert sqlite_store.prepare_sqlite_store(workspace / "mlflow.db", None)
    assert len(made) == 1 and ".creating-" in made[0]  # only the first database ran the migrations
    monkeypatch.setattr(sqlalchemy_store, "SqlAlchemyStore", real_store)

    def default_experiment(workspace: Path) -> tuple:
        connection = sqlite3.connect(workspace / "mlflow.db")
        try:
            return connection.execute("SELECT name, artifact_location, creation_time FROM experiments "
                                      "WHERE experiment_id = 0").fetchone()
        finally:
            connection.close()

    name, location, created = default_experiment(second)
    assert name == "Default" and location == (second / "mlartifacts").as_uri() + "/0"
    assert default_experiment(first)[1] == (first / "mlartifacts").as_uri() + "/0"
    assert created >= default_experiment(first)[2]
    tracker = start(second, "in-the-copy")  # MLflow takes the copy as a complete database and logs into it
    tracker.log_metrics({"loss": 0.25}, step=1)
    tracker.end("FINISHED")
    assert [r["run_name"] for r in list_runs(uri(second), EXPERIMENT)] == ["in-the-copy"]
    assert list_runs(uri(first), EXPERIMENT) == []
