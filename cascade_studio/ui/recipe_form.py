"""The recipe form's logic: schema fields -> widget kinds, widget values <-> recipe values, problems by field.

Everything here is pure (no Streamlit) so the rules are tested directly; ``pages/recipes.py`` only draws.
The form is generated from :func:`cascade_studio.config.describe_fields`, so a field added to the schema appears
in the studio with its doc as the tooltip and no UI change (STYLE.md habit 4). Values the user types that do not
parse (``abc`` in a float box) are passed on unchanged: the recipe validator then reports them with every other
problem, by dotted path, in one pass (habit 5), instead of the form inventing its own second set of rules.
"""
from __future__ import annotations

import copy
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import (FieldDoc, Problem, Recipe, RecipeError, describe_fields, dump_recipe_yaml, load_recipe,
                      load_recipe_text, recipe_to_dict)
from .paths import RELATIVE_PATHS_HELP, path_settings, safe_filename

__all__ = ["FormField", "form_fields", "to_widget", "from_widget", "set_dotted", "get_dotted", "validate_data",
           "problems_by_field", "save_recipe_text", "recipe_yaml", "load_form_data", "SECTION_TITLES"]

SECTION_TITLES = {
    "": "Recipe", "model": "Model", "adapter": "Adapter", "data": "Data", "cache": "Cache",
    "optimizer": "Optimizer", "schedule": "LR schedule", "train": "Training loop", "preview": "Previews",
    "tracking": "Tracking", "export": "Export",
}


@dataclass(frozen=True)
class FormField:
    """One leaf field of the form: the schema's doc plus the widget that edits it.

    ``kind`` is one of ``bool``, ``choice``, ``multichoice``, ``int``, ``float``, ``text``, ``optional``
    (text, empty = null), ``lines`` (a list of strings, one per line), ``numbers`` (a comma-separated list).
    """

    doc: FieldDoc
    kind: str
    nullable: bool

    @property
    def path(self) -> str:
        return self.doc.path

    @property
    def section(self) -> str:
        """Top-level section (``""`` for top-level fields such as ``name``)."""
        return self.path.split(".", 1)[0] if "." in self.path else ""

    @property
    def help(self) -> str:
        """The tooltip: the field's own doc, then its type and default."""
        default = "null" if self.doc.default is None else self.doc.default
        extra = " Leave empty for null." if self.nullable else ""
        if self.kind == "lines":
            extra += " One item per line."
        elif self.kind == "numbers":
            extra += " Comma-separated."
        if self.path in path_settings():
            extra += f" {RELATIVE_PATHS_HELP}"
        return f"{self.doc.doc}{extra} (type: {self.doc.type}; default: {default})"


def _kind(doc: FieldDoc) -> tuple[str, bool]:
    nullable = doc.type.endswith("| null")
    base = doc.type.replace(" | null", "")
    if base == "bool":
        return "bool", nullable
    if base.startswith("list["):
        if doc.choices:
            return "multichoice", nullable
        return ("lines" if base.startswith("list[str]") else "numbers"), nullable
    if doc.choices and not nullable:
        return "choice", nullable
    if nullable:
        return "optional", nullable
    if base == "int":
        return "int", nullable
    if base == "float":
        return "float", nullable
    return "text", nullable


def form_fields(recipe_cls: type = Recipe) -> list[FormField]:
    """Every editable field of the schema, in schema order (``version`` is fixed, so it is left out)."""
    fields = []
    for doc in describe_fields(recipe_cls):
        if doc.path == "version":
            continue
        kind, nullable = _kind(doc)
        fields.append(FormField(doc, kind, nullable))
    return fields


def _number_text(value: Any) -> str:
    """Numbers as people write them (``0.002``, ``1e-08``), falling back to ``repr`` when ``%g`` would round."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def to_widget(field: FormField, value: Any) -> Any:
    """The widget's value for a recipe value (``None`` shows as an empty box)."""
    kind = field.kind
    if kind == "bool":
        return bool(value)
    if kind in ("choice", "int"):
        return value
    if kind == "multichoice":
        return list(value or [])
    if kind == "lines":
        return "\n".join(str(v) for v in (value or []))
    if kind == "numbers":
        return "" if value is None else ", ".join(_number_text(v) for v in value)
    if value is None:
        return ""
    if kind == "float" or isinstance(value, float):
        return _number_text(value)
    return str(value)


def _parse_number(text: str) -> Any:
    """``"3"`` -> 3, ``"2e-3"`` -> 0.002; anything else is returned as typed (the validator reports it)."""
    text = text.strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


def from_widget(field: FormField, raw: Any) -> Any:
    """The recipe value for a widget's value; the inverse of :func:`to_widget` for valid input."""
    kind = field.kind
    if kind in ("bool", "choice", "int"):
        return raw
    if kind == "multichoice":
        return list(raw or [])
    if kind == "lines":
        return [line.strip() for line in str(raw or "").splitlines() if line.strip()]
    text = str(raw or "").strip()
    if kind == "numbers":
        if not text:
            return None if field.nullable else []
        return [_parse_number(item) for item in text.strip("[]").split(",") if item.strip()]
    if kind == "float":
        return _parse_number(text) if text else text
    if kind == "optional":
        if not text:
            return None
        base = field.doc.type.replace(" | null", "")
        return _parse_number(text) if base in ("int", "float") else text
    return str(raw)


def get_dotted(data: dict, dotted: str, default: Any = None) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; ``default`` when a level is missing."""
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``"a.b"``, creating levels as needed."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def validate_data(data: dict, name: str = "recipe") -> tuple[Optional[Recipe], list[Problem]]:
    """(recipe, []) when the edited values form a valid recipe, else (None, every problem)."""
    try:
        return load_recipe(copy.deepcopy(data)), []
    except RecipeError as exc:
        return None, list(exc.problems)


_INDEX = re.compile(r"\[\d+\]$")


def problems_by_field(problems: Sequence[Problem], paths: Sequence[str]) -> tuple[dict[str, list[Problem]],
                                                                                  list[Problem]]:
    """Problems keyed by the form field they belong to (``adapter.lora.targets[1]`` -> ``adapter.lora.targets``),
    and those that belong to no single field (``(file)``, ``(recipe)``)."""
    known = set(paths)
    by_field: dict[str, list[Problem]] = {}
    general: list[Problem] = []
    for problem in problems:
        path = _INDEX.sub("", problem.path)
        if path in known:
            by_field.setdefault(path, []).append(problem)
        else:
            general.append(problem)
    return by_field, general


def load_form_data(path: Path) -> tuple[Optional[dict], str, list[Problem]]:
    """A recipe file as (plain dict for the form or None if invalid, its text, its problems)."""
    text = path.read_text(encoding="utf-8")
    try:
        recipe = load_recipe_text(text, name=path.stem, label=path.name)
    except RecipeError as exc:
        return None, text, list(exc.problems)
    return recipe_to_dict(recipe), text, []


def recipe_yaml(recipe: Recipe) -> str:
    """The YAML a saved recipe gets: every field, each preceded by its doc (so the file documents itself)."""
    return dump_recipe_yaml(recipe, with_comments=True)


def save_recipe_text(recipes_dir: Path, name: str, text: str, overwrite: bool = False) -> Path:
    """Validate ``text`` and write it as ``<recipes_dir>/<sanitised name>.yaml``; returns the path.

    Raises :class:`RecipeError` (every problem) for an invalid recipe, ``FileExistsError`` when the file exists
    and ``overwrite`` is false. The write is atomic: a half-written recipe never appears in the picker.
    """
    filename = safe_filename(name, ".yaml")
    load_recipe_text(text, name=filename[:-5], label=filename)  # raises with every problem
    recipes_dir.mkdir(parents=True, exist_ok=True)
    target = recipes_dir / filename
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target.name} already exists in {recipes_dir}; choose another name or tick "
                              "'overwrite'")
    fd, tmp = tempfile.mkstemp(dir=recipes_dir, prefix=".tmp-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
