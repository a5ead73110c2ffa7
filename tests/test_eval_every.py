"""``train.eval_every``: the held-out loss is logged every N steps (MLflow and events), not only at the ends."""
from __future__ import annotations

from pathlib import Path

import pytest

from cascade_studio.cli import main as cli_main
from cascade_studio.trainers.events import read_events

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "lora.yaml")


@pytest.mark.slow  # a 5-step tiny training run: 10 s alone, about 20 s on a loaded 2-core machine
def test_eval_every_logs_the_heldout_loss_at_those_steps(tmp_path: Path) -> None:
    from cascade_studio.tracking import list_runs, read_run

    workspace = tmp_path / "ws"
    code = cli_main(["train", RECIPE, f"workspace={workspace}", "name=evals", "train.max_steps=5",
                     "train.eval_every=2", "train.checkpoint_every=0", "preview.every=0", "--no-progress"])
    assert code == 0
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    history = read_run(uri, list_runs(uri, "cascade-studio")[0]["run_id"])["metrics"]["holdout_loss"]
    # before training, every 2 steps, and after the last step (5 is not a multiple of 2)
    assert [point["step"] for point in history] == [0, 2, 4, 5]
    values = [point["value"] for point in history]
    assert all(v > 0 for v in values) and len(set(values)) == 4  # measured each time, not one value repeated
    events = [(e["step"], e["loss"]) for e in read_events(workspace / "runs" / "evals") if e["event"] == "holdout"]
    assert events == [(p["step"], p["value"]) for p in history]
