"""The data behind the Runs/Compare/Export pages (cascade_studio/ui/runs_data.py), on hand-made inputs."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from cascade_studio.ui.runs_data import (adapter_files, checkpoint_dirs, filter_runs, local_artifact_dir,
                                         metric_frame, params_diff, preview_steps, run_dir_for, runs_table,
                                         zip_folder)
from cascade_studio.ui.workspace import Workspace

RUNS = [
    {"run_id": "a" * 32, "run_name": "lora-1", "status": "FINISHED", "start_time": 1_700_000_000_000,
     "metrics": {"loss": 0.4}, "params": {}, "tags": {"method": "lora", "base_model": "tiny", "preset": "tiny"}},
    {"run_id": "b" * 32, "run_name": "cnet-1", "status": "FAILED", "start_time": None,
     "metrics": {}, "params": {"adapter.method": "controlnet"}, "tags": {"base_model": "big"}},
]


def test_runs_table_and_filters() -> None:
    table = runs_table(RUNS)
    assert list(table["run"]) == ["lora-1", "cnet-1"]
    assert list(table["method"]) == ["lora", "controlnet"]  # from the params when the tag is missing
    assert table["loss"].iloc[0] == 0.4 and table["loss"].isna().iloc[1]
    assert list(filter_runs(table, statuses=["FAILED"])["run"]) == ["cnet-1"]
    assert list(filter_runs(table, methods=["lora"], bases=["big"])["run"]) == []
    assert len(filter_runs(table)) == 2


def test_metric_frame_overlays_runs_and_params_diff_marks_differences() -> None:
    histories = {"one": {"loss": [{"step": 1, "value": 0.5}, {"step": 2, "value": 0.25}]},
                 "two": {"loss": [{"step": 1, "value": 0.75}], "lr": [{"step": 1, "value": 1e-3}]}}
    frame = metric_frame(histories, "loss")
    assert frame.values.tolist() == [["one", 1, 0.5], ["one", 2, 0.25], ["two", 1, 0.75]]
    assert metric_frame(histories, "grad_norm").empty
    diff = params_diff({"one": {"lr": "1e-3", "rank": "8"}, "two": {"lr": "2e-3", "rank": "8", "extra": "x"}})
    assert diff["differs"].to_dict() == {"extra": True, "lr": True, "rank": False}
    assert diff.loc["extra", "one"] == ""
    assert list(params_diff({"one": {"a": "1"}, "two": {"a": "1"}}, only_differences=True).index) == []


def test_run_files_previews_checkpoints_and_artifacts(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    run = ws.runs_dir / "r"
    for step in (3, 6):
        (run / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        (run / "previews").mkdir(exist_ok=True)
        (run / "previews" / f"step-{step:06d}.png").write_bytes(b"png")
    (run / "checkpoints" / "step-00000006" / "COMPLETE").write_text("{}")
    (run / "checkpoints" / "tmp-step-00000009").mkdir()
    (run / "export" / "r-peft").mkdir(parents=True)
    (run / "export" / "r-peft" / "adapter_config.json").write_text("{}")
    (run / "export" / "r-comfyui.safetensors").write_bytes(b"x")
    (run / "export" / "notes.txt").write_text("not an adapter")
    (run / "events.jsonl").write_text(json.dumps({"event": "started", "run_id": "c" * 32}) + "\n")
    assert list(checkpoint_dirs(run)) == [6]  # step 3 never completed
    assert list(preview_steps(None, run / "previews")) == [3, 6]
    assert [p.name for p in adapter_files(run)] == ["r-comfyui.safetensors", "r-peft"]
    assert run_dir_for(ws, {"run_id": "c" * 32, "run_name": "other"}) == run
    assert run_dir_for(ws, {"run_id": "d" * 32, "run_name": "r"}) == run  # by name when no event names it
    assert run_dir_for(ws, {"run_id": "d" * 32, "run_name": "missing"}) is None
    assert local_artifact_dir(f"file://{run}") == run and local_artifact_dir(str(run)) == run
    assert local_artifact_dir("s3://bucket/x") is None
    with zipfile.ZipFile(io.BytesIO(zip_folder(run / "export" / "r-peft"))) as archive:
        assert archive.namelist() == ["r-peft/adapter_config.json"]
