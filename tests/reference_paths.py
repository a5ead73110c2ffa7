"""Where the reference data lives: ``tests/reference/`` inside the repository (see its README).

The repository must pass its tests when cloned alone, so nothing is looked up beside or outside the clone.
"""
from __future__ import annotations

from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
