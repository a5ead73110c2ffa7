"""What can be checked about a recipe's weights before a run starts, cheaply: every weight source a run will load
exists (a file or folder is there; a hub repo's files are in the local cache) and is the right kind of model
(safetensors headers only: names and shapes, no tensor is read), plus each method's own checks (a ControlNet's
``init_from`` width). ``cascade-studio validate`` reports these with the recipe's other problems, and ``train``
refuses them before it creates an MLflow run, rather than 10-15 s later.

A hub repo whose files are not cached is a problem when the hub is offline (``HF_HUB_OFFLINE``), where the run
would fail; online it is only a note, since the run downloads them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..config.errors import Problem

# The stages a training run loads from the recipe's model section (the previewer only for previews).
TRAINING_STAGES = ("stage_c", "text_encoder", "effnet")


@dataclass
class Preflight:
    """The outcome: problems (the run would fail) and notes (it will download what is not cached)."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def needs_weight_check(recipe: Any) -> bool:
    """Whether ``recipe`` names any weights (a preset with published weights, a repo id, a weights file, a path in
    its method's section); a tiny or toy recipe that names none is not checked, so ``validate`` needs no torch."""
    from dataclasses import fields

    from ..adapters import catalog
    from ..config.schema import WEIGHT_FIELDS, get_setting
    from ..models.presets import get_preset

    if recipe.model.repo_id or not get_preset(recipe.model.preset).built_in:
        return True
    if any(get_setting(recipe, dotted) for dotted in WEIGHT_FIELDS):
        return True
    section = catalog.method_section(recipe)
    return any(f.metadata.get("path") and getattr(section, f.name) for f in fields(section))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_recipe_weights(recipe: Any) -> Preflight:
    """Check every weight source ``recipe``'s run will load, without loading any (see the module docstring)."""
    from ..adapters import catalog
    from ..inference.pipeline import CascadeComponents, ModelSpec
    from ..models.loading import WeightsError, WeightsNotCached
    from .components import resolve_dtype

    outcome = Preflight()
    offline = _offline()
    spec = ModelSpec.from_config(recipe.model)
    components = CascadeComponents(spec, device="cpu")
    dtype = resolve_dtype(recipe.model.dtype)

    def add(dotted: str, value: Any, message: str, hint: str = "") -> None:
        outcome.problems.append(Problem(dotted, value, message, hint))

    def attempt(dotted: str, value: Any, check: Callable[[], Any], hint: str = "") -> None:
        try:
            check()
        except WeightsNotCached as exc:
            if offline:
                add(dotted, value, _problem_text(exc), hint or "download it first, or give a local file or folder")
            else:
                outcome.notes.append(f"{dotted}: {_problem_text(exc)}; `train` will download it")
        except (WeightsError, ValueError) as exc:
            add(dotted, value, _problem_text(exc), hint)
        except OSError as exc:  # unreadable file or folder
            add(dotted, value, f"cannot be read ({exc})", hint)

    stages = TRAINING_STAGES + (("previewer",) if recipe.preview.every else ())
    for stage in stages:
        dotted = f"model.{stage}" if getattr(spec, stage) else "model.repo_id"
        value = getattr(spec, stage) or spec.repo_id
        attempt(dotted, value, lambda stage=stage: components.check_sources([stage], dtype, local_only=True))

    def check_weights(dotted: str, kind: str, source: str, variant: Optional[str] = None, hint: str = "") -> None:
        """For a method's own sources: ``kind`` is a ``models.loading`` family (open_clip, image_encoder, ...);
        ``hint`` says what the source must hold."""
        from ..models.loading import check_source

        attempt(dotted, source, lambda: check_source(kind, source, variant, dtype, local_only=True), hint)

    hook = catalog.recipe_method(recipe).hook("preflight")
    if hook is not None:
        hook(catalog.method_section(recipe), recipe, check_weights, add)
    return outcome


def _problem_text(exc: Exception) -> str:
    """A WeightsError's text without a leading ``source:`` (the Problem names the setting and its value)."""
    text = str(exc)
    source = getattr(exc, "source", None)
    if source and text.startswith(f"{source}: ") and os.sep not in source:
        return text[len(source) + 2:]
    return text


def refuse_unusable_weights(recipe: Any) -> None:
    """Raise a RecipeError listing every weight problem of ``recipe`` (``train`` calls this first)."""
    from ..config import RecipeError

    if not needs_weight_check(recipe):
        return
    outcome = check_recipe_weights(recipe)
    if outcome.problems:
        raise RecipeError(outcome.problems, source=f"recipe {recipe.name!r}")
