"""The one way a recipe field is declared: :func:`setting`, its default plus the documentation and rules.

Kept apart from :mod:`.schema` so that each adapter method's own section (``adapters/<method>/config.py``)
declares its fields the same way without importing the whole schema (the schema imports the methods).
Imports no torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Mapping, Optional

__all__ = ["setting"]


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    choices: Optional[tuple[str, ...]] = None,
    open_choices: bool = False,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
    multiple_of: Optional[int] = None,
    example: Any = None,
    path: bool = False,
    weights: bool = False,
    allow_empty: bool = False,
    refused: Optional[Mapping[str, str]] = None,
    factory: Any = None,
) -> Any:
    """Declare one recipe field with its documentation and the rules validation enforces.

    ``choices`` apply to a string field or to each item of a list field; with ``open_choices`` they are the
    named options but other values are checked by a field-specific rule instead. ``minimum``/``maximum``
    bound numbers (inclusive unless ``min_exclusive``/``max_exclusive``), or every item of a number list.
    ``example`` is shown in hints; ``path`` marks a filesystem path (for the UI's file pickers), ``weights`` one naming weights to load.
    Strings must be non-empty unless ``allow_empty``. ``refused`` maps values users are likely to try to the
    reason they are not accepted (shown instead of a bare "must be one of").
    """
    if not doc:
        raise ValueError("every recipe field needs a doc string")  # keeps STYLE.md habit 4 honest
    metadata = {
        "doc": doc, "choices": choices, "open_choices": open_choices, "min": minimum, "max": maximum,
        "min_exclusive": min_exclusive, "max_exclusive": max_exclusive, "multiple_of": multiple_of,
        "example": example, "path": path, "weights": weights, "allow_empty": allow_empty, "refused": dict(refused or {}),
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)
