"""Where the shared reference data lives: beside the repository (CI), or named by CASCADE_STUDIO_REFERENCE."""
from __future__ import annotations

import os
from pathlib import Path


def find_reference_dir() -> Path:
    candidates = []
    if os.environ.get("CASCADE_STUDIO_REFERENCE"):
        candidates.append(Path(os.environ["CASCADE_STUDIO_REFERENCE"]))
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "reference", Path("/work/shared/reference")]
    for candidate in candidates:
        if (candidate / "official_state_dict_keys.json").exists():
            return candidate
    # the first candidate, so a missing file fails with the path a user expects
    return candidates[0]


REFERENCE_DIR = find_reference_dir()
