"""The one error type recipe loading raises, and the problems it carries.

Validation never stops at the first mistake (STYLE.md habit 5): every problem found in a recipe is collected as
a :class:`Problem` and all of them are raised together in one :class:`RecipeError`, so a user fixes a recipe in
one pass instead of one error per run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["MISSING", "Problem", "RecipeError", "format_value"]


class _Missing:
    """Marks a value that the recipe does not contain at all (distinct from an explicit YAML ``null``)."""

    _instance: "_Missing | None" = None

    def __new__(cls) -> "_Missing":
        # A singleton, so ``value is MISSING`` works across copies and pickles.
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

# Long values (a whole mis-indented section, a pasted prompt) would drown the message that explains them.
_MAX_VALUE_CHARS = 80


def format_value(value: Any, _depth: int = 0) -> str:
    """Show a recipe value the way the user wrote it in YAML (``true``/``null``, quoted strings), shortened."""
    if value is MISSING:
        return "nothing"
    if isinstance(value, (list, tuple, dict)) and _depth >= 3:
        # YAML anchors can build self-containing lists ("&a [*a]"); nesting is cut off instead of recursing.
        return "..."
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(format_value(v, _depth + 1) for v in value[:10]) + "]"
    elif isinstance(value, dict):
        items = list(value.items())[:10]
        text = "{" + ", ".join(f"{k}: {format_value(v, _depth + 1)}" for k, v in items) + "}"
    else:
        text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe.

    ``path`` is the dotted setting path (``train.max_steps``) or ``(file)`` / ``(recipe)`` for problems with the
    file as a whole; ``value`` is what the recipe holds there (:data:`MISSING` if absent); ``message`` says what
    the rule is; ``hint`` says what to write instead (may be empty).
    """

    path: str
    value: Any
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.path}: got {format_value(self.value)}; {self.message}"
        if self.hint:
            # "must be a positive whole number, e.g. 1000" reads better than "...; e.g. 1000".
            joiner = ", " if self.hint.startswith("e.g.") else "; "
            text += joiner + self.hint
        return text


class RecipeError(ValueError):
    """A recipe cannot be used; ``problems`` lists every reason, ``str()`` shows them one per line."""

    def __init__(self, problems: Sequence[Problem], source: str = "recipe") -> None:
        self.problems: list[Problem] = list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        lines = [f"{self.source} has {count} {noun}:"]
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._render()
