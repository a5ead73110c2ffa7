"""MLflow tracking against a real SQLite store, read back with MlflowClient; outages simulated on the client."""

from __future__ import annotations

import dataclasses
import http.server
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from cascade_studio.tracking import (
    BUFFER_FILE,
    NullTracker,
    Tracker,
    TrackingError,
    TrackingUnavailableError,
    check_reachable,
    flatten_params,
    list_runs,
    read_run,
    replay_buffer,
    resolve_tracking_uri,
    start_tracker,
)

_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """One SQLite store for the module: creating its tables is the slow part (about a second)."""
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, value in _HTTP_ENV.items():  # Tracker.start sets these with setdefault; keep them test-local
        monkeypatch.setenv(name, value)


def start(workspace: Path, run_dir: Path, experiment: str, **kwargs) -> Tracker:
    kwargs.setdefault("retry_interval_s", 0.0)
    return Tracker.start(None, experiment, kwargs.pop("run_name", "run"), kwargs.pop("tags", None), workspace,
                         run_dir, **kwargs)


def steps_and_values(run: dict, key: str) -> list[tuple[int, float]]:
    return [(point["step"], point["value"]) for point in run["metrics"][key]]


class Outage:
    """Makes chosen MlflowClient methods raise ConnectionError until ``end()``; counts the attempts."""

    def __init__(self, monkeypatch, client, names=("log_batch",)):
        self.calls = 0
        self.down = True
        for name in names:
            original = getattr(client, name)

            def failing(*args, _original=original, **kwargs):
                self.calls += 1
                if self.down:
                    raise ConnectionError("server went away")
                return _original(*args, **kwargs)

            monkeypatch.setattr(client, name, failing)

    def end(self) -> None:
        self.down = False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------ pure helpers
def test_resolve_tracking_uri_prefers_argument_then_env_then_workspace_sqlite(tmp_path, monkeypatch):
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://tracking.example:5000"
    explicit = f"sqlite:///{tmp_path / 'elsewhere' / 'x.db'}"
    assert resolve_tracking_uri(explicit, tmp_path) == explicit


def test_flatten_params_makes_dotted_string_keys():
    @dataclasses.dataclass(frozen=True)
    class Optim:
        lr: float = 1e-4
        betas: tuple = (0.9, 0.99)

    nested = {"version": 1, "adapter": {"method": "lora", "lora": {"rank": 8, "targets": ["to_q", "to_v"]}},
              "optimizer": Optim(), "data": {"filters": {}}, "seed": None, "ema": False}
    assert flatten_params(nested) == {
        "version": "1", "adapter.method": "lora", "adapter.lora.rank": "8", "adapter.lora.targets": '["to_q", "to_v"]',
        "optimizer.lr": "0.0001", "optimizer.betas": "[0.9, 0.99]", "data.filters": "{}", "seed": "None",
        "ema": "False",
    }
    with pytest.raises(TypeError, match="mapping or dataclass"):
        flatten_params([1, 2])


def test_null_tracker_has_the_same_methods_and_does_nothing(tmp_path):
    public = {name for name in dir(Tracker) if not name.startswith("_")}
    assert public >= {"start", "log_params", "log_metrics", "set_tags", "log_artifact", "log_image", "log_text",
                      "end", "pending"}
    assert all(callable(getattr(NullTracker, name, None)) for name in public)
    null = NullTracker()
    null.log_params({"a": {"b": 1}})
    null.log_metrics({"loss": 1.0}, step=1)
    null.log_image(Image.new("RGB", (2, 2)), "x.png")
    null.end("FAILED")
    with pytest.raises(ValueError, match="FINISHED"):
        null.end("DONE")
    assert null.run_id is None and null.pending() == 0
    assert isinstance(start_tracker(enabled=True, is_main_process=False, workspace=tmp_path), NullTracker)
    assert isinstance(start_tracker(enabled=False, is_main_process=True, workspace=tmp_path), NullTracker)
    assert list(tmp_path.iterdir()) == []  # no store created for a non-tracking process


# ------------------------------------------------------------------------------------------ server reachability
def test_unreachable_server_fails_at_start_before_training(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    began = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as info:
        Tracker.start(uri, "exp", "run", None, tmp_path / "ws", tmp_path / "run")
    assert time.monotonic() - began < 10
    assert uri in str(info.value) and "mlflow server" in str(info.value)
    assert not (tmp_path / "ws" / "mlflow.db").exists()


def test_any_http_answer_counts_as_reachable():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_port}", timeout=2)  # 404 still means "someone is there"
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------------ normal runs
def test_full_run_is_stored_in_workspace_sqlite_and_reads_back(workspace, tmp_path):
    artifact = tmp_path / "weights.txt"
    artifact.write_text("adapter bytes")
    tracker = start(workspace, tmp_path / "run", "full", run_name="lora-1", tags={"method": "lora"})
    assert tracker.tracking_uri == f"sqlite:///{workspace.resolve()}/mlflow.db"
    assert tracker.artifact_uri.startswith((workspace.resolve() / "mlartifacts").as_uri())
    many = {f"p{i:03d}": i for i in range(250)}  # more than one 100-param batch
    tracker.log_params({"adapter": {"method": "lora", "rank": 4}, "long": "x" * 7000, "many": many})
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4 * step}, step=step)
    image = Image.new("RGB", (8, 4), (200, 10, 30))
    tracker.log_image(image, "samples/step_000004.png")
    tracker.log_text("version: 1\n", "recipe.yaml")
    tracker.log_artifact(artifact, "files")
    tracker.set_tags({"stage": "done"})
    tracker.end("FINISHED")

    run = read_run(tracker.tracking_uri, tracker.run_id)
    assert run["status"] == "FINISHED" and run["run_name"] == "lora-1"
    assert run["params"]["adapter.method"] == "lora" and run["params"]["adapter.rank"] == "4"
    assert run["params"]["long"] == "x" * 6000  # MLflow's limit
    assert all(run["params"][f"many.p{i:03d}"] == str(i) for i in range(250))
    assert steps_and_values(run, "loss") == [(s, pytest.approx(1.0 / (s + 1))) for s in range(5)]
    assert steps_and_values(run, "lr")[-1] == (4, pytest.approx(4e-4))
    assert run["tags"]["method"] == "lora" and run["tags"]["stage"] == "done"
    assert run["artifacts"] == ["files/weights.txt", "recipe.yaml", "samples/step_000004.png"]
    stored = Path(run["artifact_uri"].removeprefix("file://"))
    assert stored.is_relative_to(workspace.resolve() / "mlartifacts")
    assert Image.open(stored / "samples/step_000004.png").getpixel((3, 2)) == (200, 10, 30)
    assert (stored / "files/weights.txt").read_text() == "adapter bytes"
    assert list((tmp_path / "run" / "tracking_pending").iterdir()) == []  # staged image/text removed once sent

    runs = list_runs(tracker.tracking_uri, "full")
    assert [(r["run_id"], r["status"]) for r in runs] == [(tracker.run_id, "FINISHED")]
    assert runs[0]["metrics"]["loss"] == pytest.approx(0.2)
    assert list_runs(tracker.tracking_uri, "no-such-experiment") == []


def test_end_statuses_failed_and_killed(workspace, tmp_path):
    with pytest.raises(RuntimeError):
        with start(workspace, tmp_path / "a", "statuses") as failed:
            raise RuntimeError("loss exploded")
    with pytest.raises(KeyboardInterrupt):
        with start(workspace, tmp_path / "b", "statuses") as interrupted:
            raise KeyboardInterrupt
    killed = start(workspace, tmp_path / "c", "statuses")
    killed.end("KILLED")
    killed.end("FINISHED")  # second end is ignored
    with pytest.raises(ValueError, match="FINISHED"):
        start(workspace, tmp_path / "d", "statuses").end("CRASHED")
    uri = killed.tracking_uri
    assert read_run(uri, failed.run_id)["status"] == "FAILED"
    assert read_run(uri, interrupted.run_id)["status"] == "KILLED"
    assert read_run(uri, killed.run_id)["status"] == "KILLED"


def test_resume_continues_same_run_and_keeps_first_param_values(workspace, tmp_path, caplog):
    first = start(workspace, tmp_path / "run", "resume")
    first.log_params({"optim": {"lr": 0.001, "steps": 100}})
    first.log_metrics({"loss": 0.9}, step=1)
    first.log_metrics({"loss": 0.8}, step=2)
    first.end("KILLED")

    second = start(workspace, tmp_path / "run", "resume", resume_run_id=first.run_id)
    assert second.run_id == first.run_id
    assert read_run(second.tracking_uri, second.run_id)["status"] == "RUNNING"
    with caplog.at_level(logging.WARNING):
        second.log_params({"optim": {"lr": 0.001, "steps": 200}, "resumed_from": 2})  # steps changed
    assert "optim.steps" in caplog.text and "first value is kept" in caplog.text
    second.log_metrics({"loss": 0.7}, step=3)
    second.end("FINISHED")

    run = read_run(second.tracking_uri, first.run_id)
    assert run["status"] == "FINISHED"
    assert run["params"] == {"optim.lr": "0.001", "optim.steps": "100", "resumed_from": "2"}
    assert steps_and_values(run, "loss") == [(1, pytest.approx(0.9)), (2, pytest.approx(0.8)), (3, pytest.approx(0.7))]
    with pytest.raises(TrackingUnavailableError, match="not in this store"):
        start(workspace, tmp_path / "other", "resume", resume_run_id="0" * 32)


def test_invalid_metric_key_is_dropped_without_losing_the_others(workspace, tmp_path, caplog):
    tracker = start(workspace, tmp_path / "run", "keys")
    with caplog.at_level(logging.WARNING):
        tracker.log_metrics({"loss": 0.5, "bad//key": 1.0, "note": "text"}, step=7)
    tracker.end()
    run = read_run(tracker.tracking_uri, tracker.run_id)
    assert set(run["metrics"]) == {"loss"} and steps_and_values(run, "loss") == [(7, 0.5)]
    assert "bad//key" in caplog.text and "non-numeric" in caplog.text


def test_deleted_experiment_is_explained(workspace, tmp_path):
    tracker = start(workspace, tmp_path / "run", "to-delete")
    tracker.end()
    tracker.client.delete_experiment(tracker.client.get_experiment_by_name("to-delete").experiment_id)
    with pytest.raises(TrackingError, match="was deleted. Restore it"):
        start(workspace, tmp_path / "run2", "to-delete")


# ---------------------------------------------------------------------------------------------- outages
def test_outage_mid_run_buffers_then_delivers_with_original_steps(workspace, tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    tracker = start(workspace, run_dir, "outage")
    tracker.log_metrics({"loss": 1.0}, step=1)
    outage = Outage(monkeypatch, tracker.client, names=("log_batch", "log_artifact"))
    with caplog.at_level(logging.WARNING):
        tracker.log_metrics({"loss": 0.5}, step=2)
        tracker.log_metrics({"loss": 0.25, "grad_norm": 3.0}, step=3)
        tracker.log_params({"adapter": {"rank": 16}})
        tracker.log_image(Image.new("RGB", (4, 4), (0, 255, 0)), "samples/step_3.png")
    assert caplog.text.count("not answering") == 1  # warned once, not per call
    buffered = [json.loads(line) for line in (run_dir / BUFFER_FILE).read_text().splitlines()]
    assert [(r["kind"], r.get("step")) for r in buffered] == [
        ("metrics", 2), ("metrics", 3), ("params", None), ("artifact", None)]
    assert buffered[1]["values"] == {"loss": 0.25, "grad_norm": 3.0}
    assert tracker.pending() == 4

    outage.end()
    tracker.log_metrics({"loss": 0.125}, step=4)  # first flushes the buffer, in order
    assert not (run_dir / BUFFER_FILE).exists() and tracker.pending() == 0
    tracker.end("FINISHED")
    run = read_run(tracker.tracking_uri, tracker.run_id)
    assert steps_and_values(run, "loss") == [(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.125)]
    assert steps_and_values(run, "grad_norm") == [(3, 3.0)]
    assert run["params"] == {"adapter.rank": "16"}
    assert run["artifacts"] == ["samples/step_3.png"]
    assert run["status"] == "FINISHED"


def test_retry_interval_avoids_hammering_a_dead_server(workspace, tmp_path, monkeypatch):
    tracker = start(workspace, tmp_path / "run", "backoff", retry_interval_s=3600)
    outage = Outage(monkeypatch, tracker.client)
    for step in range(10):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert outage.calls == 1  # the first failure; the other nine went straight to the buffer
    assert tracker.pending() == 10


def test_still_down_at_end_keeps_buffer_and_resume_delivers_it(workspace, tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    tracker = start(workspace, run_dir, "late")
    tracker.log_metrics({"loss": 1.0}, step=10)
    Outage(monkeypatch, tracker.client, names=("log_batch", "set_terminated"))
    tracker.log_metrics({"loss": 0.5}, step=11)
    with caplog.at_level(logging.WARNING):
        tracker.end("KILLED")  # must not raise
    assert str(run_dir / BUFFER_FILE) in caplog.text and "resumed" in caplog.text
    assert [json.loads(line)["kind"] for line in (run_dir / BUFFER_FILE).read_text().splitlines()] == [
        "metrics", "end"]
    assert read_run(tracker.tracking_uri, tracker.run_id)["status"] == "RUNNING"  # the KILLED never arrived

    resumed = start(workspace, run_dir, "late", resume_run_id=tracker.run_id)  # fresh client: server is back
    assert not (run_dir / BUFFER_FILE).exists()
    resumed.log_metrics({"loss": 0.25}, step=12)
    resumed.end("FINISHED")
    run = read_run(resumed.tracking_uri, tracker.run_id)
    assert steps_and_values(run, "loss") == [(10, 1.0), (11, 0.5), (12, 0.25)]
    assert run["status"] == "FINISHED"


def test_replay_buffer_sends_records_left_by_a_finished_process(workspace, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    tracker = start(workspace, run_dir, "replay")
    Outage(monkeypatch, tracker.client, names=("log_batch", "set_terminated"))
    tracker.log_metrics({"loss": 2.0}, step=5)
    tracker.end("FAILED")
    assert replay_buffer(tracker.tracking_uri, run_dir) == 0
    run = read_run(tracker.tracking_uri, tracker.run_id)
    assert steps_and_values(run, "loss") == [(5, 2.0)] and run["status"] == "FAILED"


def test_partial_flush_keeps_only_unsent_records_in_order(workspace, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    tracker = start(workspace, run_dir, "partial")
    metrics_down = Outage(monkeypatch, tracker.client, names=("log_batch",))
    artifacts_down = Outage(monkeypatch, tracker.client, names=("log_artifact",))
    tracker.log_metrics({"loss": 0.5}, step=2)
    tracker.log_text("first sample prompt", "prompts/step_2.txt")
    tracker.log_metrics({"loss": 0.25}, step=3)
    metrics_down.end()  # metrics get through again, artifact uploads still fail
    tracker.log_metrics({"loss": 0.125}, step=4)
    buffered = [json.loads(line) for line in (run_dir / BUFFER_FILE).read_text().splitlines()]
    assert [(r["kind"], r.get("step")) for r in buffered] == [("artifact", None), ("metrics", 3), ("metrics", 4)]
    assert steps_and_values(read_run(tracker.tracking_uri, tracker.run_id), "loss") == [(2, 0.5)]

    artifacts_down.end()
    tracker.end()
    run = read_run(tracker.tracking_uri, tracker.run_id)
    assert steps_and_values(run, "loss") == [(2, 0.5), (3, 0.25), (4, 0.125)]
    assert run["artifacts"] == ["prompts/step_2.txt"]
    assert run["status"] == "FINISHED"
