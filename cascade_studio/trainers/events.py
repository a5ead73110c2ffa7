"""Typed events from a training run to whoever watches it (the CLI, the Streamlit studio).

The channel is a JSON-lines file in the run folder: the UI tails it, so a crashed run can never take the UI down
and the UI never needs torch. Each line: ``{"event": <kind>, "time": <unix seconds>, ...fields}``. Kinds:
``started``, ``phase``, ``holdout``, ``step``, ``checkpoint``, ``preview``, ``nonfinite``, ``warning``,
``exported``, ``finished``, ``failed``, ``killed``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..run_folder import RunFolder


class EventLog:
    """Appends events; only the main process writes (others get ``enabled=False``)."""

    def __init__(self, run_dir: str | Path | None, enabled: bool = True):
        self.path = RunFolder(Path(run_dir)).events_file if run_dir is not None else None
        self.enabled = enabled and self.path is not None
        self._warned = False
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(record, default=str) + "\n"
        # One write of one line in append mode: readers never see half a record from this process.
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            # The event channel is for watchers; a full disk must stop the run at its next checkpoint (with a
            # clear message), not here with a half-explained error.
            if not self._warned:
                self._warned = True
                print(f"[cascade-studio] warning: cannot append to {self.path} ({exc}); run events are not "
                      "recorded until this is fixed", file=sys.stderr, flush=True)


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """All complete events of a run (a torn last line from a killed writer is ignored)."""
    return RunFolder(Path(run_dir)).events()
