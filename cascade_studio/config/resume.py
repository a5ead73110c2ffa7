"""What a ``--resume`` may change in a run's recipe (issue 17, item 2), decided in one place.

A resumed run continues the same adapter on the same data: what it learns from must stay as it was, or the
checkpoint no longer fits (another adapter shape, optimizer state of another optimizer) or the run would silently
become a different one (another base, other data, another batch or seed). What steers the rest of the run may
change, and the change is applied and recorded: the learning rate and its schedule (the advice after a NaN stop
is "lower optimizer.lr, then --resume"), the length of the run, checkpoint, log and preview settings, exports,
the data-loader workers, gradient checkpointing (the same maths for less memory) and the cache folder.

Torch-free, like the rest of ``config``: the CLI checks a resume before anything is loaded or written.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from .errors import Problem, RecipeError
from .schema import recipe_to_dict

# Dotted prefixes of the settings a resume may change; everything else must equal the run's recipe.yaml. (The
# workspace locates the run folder itself: written another way, it is still the same folder.)
MAY_CHANGE = ("workspace", "optimizer.lr", "optimizer.weight_decay", "schedule.", "train.max_steps", "train.checkpoint_every",
              "train.keep_checkpoints", "train.log_every", "train.eval_every", "train.max_nonfinite_steps",
              "train.max_grad_norm", "train.num_workers", "train.distributed_timeout_minutes",
              "train.gradient_checkpointing", "train.checkpointing", "train.compile",
              "preview.", "export.", "cache.dir")


def _path_fields(cls: Any, prefix: str = "") -> set[str]:
    """Dotted names of the schema's filesystem-path settings (compared as absolute paths)."""
    found: set[str] = set()
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else None
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) or (kind is not None and dataclasses.is_dataclass(kind)):
            found |= _path_fields(type(default) if dataclasses.is_dataclass(default) else kind, f"{prefix}{f.name}.")
        elif f.metadata.get("path"):
            found.add(f"{prefix}{f.name}")
    return found


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _may_change(path: str) -> bool:
    return any(path == p or (p.endswith(".") and path.startswith(p)) for p in MAY_CHANGE)


def resume_changes(previous: Any, current: Any) -> dict[str, tuple[Any, Any]]:
    """The settings ``current`` changes against the run's ``previous`` recipe, as ``path -> (old, new)``.

    Raises :class:`RecipeError` listing every change a resume may not make (nothing has been written then).
    """
    old, new = _flat(recipe_to_dict(previous)), _flat(recipe_to_dict(current))
    for path in _path_fields(type(current)):  # a relative and an absolute spelling of one folder are equal
        for values in (old, new):
            if isinstance(values.get(path), str):
                values[path] = os.path.abspath(os.path.expanduser(values[path]))
    changed = {path: (old.get(path), new.get(path)) for path in sorted(set(old) | set(new))
               if old.get(path) != new.get(path)}
    refused = [Problem(path, values[1], f"was {values[0]!r} when the run started; --resume continues the same "
                       "adapter on the same base and data, so this setting cannot change",
                       f"set it back to {values[0]!r}, or start a new run (name=<new name>) with the new value")
               for path, values in changed.items() if not _may_change(path)]
    workers = (max(1, previous.train.num_workers), max(1, current.train.num_workers))
    if current.data.streaming and previous.data.streaming and workers[0] != workers[1]:
        # a stream's order depends on its readers (processes x workers): checked here, before anything is written
        refused.append(Problem("train.num_workers", current.train.num_workers,
                               f"was {previous.train.num_workers} when this streaming run started, and the data "
                               "order of a stream depends on the number of data-loader workers",
                               f"set it back to {previous.train.num_workers} to resume"))
    if refused:
        raise RecipeError(refused, "--resume")
    return changed
