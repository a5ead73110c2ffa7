"""Load a recipe from YAML (or a dict), apply command-line overrides, and validate everything at once.

Validation has three passes, all of which add to one list of :class:`Problem` s:

1. shape and types, driven by the dataclass annotations and the ``setting()`` metadata in :mod:`.schema`
   (unknown keys, wrong types, choices, numeric limits);
2. rules that involve several fields (a lite/big preset needs weights, ``control: image`` needs a column...),
   skipped for fields that already failed pass 1 so one mistake is not reported twice;
3. the filesystem: paths that must already exist. Nothing is ever created on disk while validating.

Relative paths are checked against the current working directory, which is where they are resolved at run time
too (recipes are meant to be run from the repository root).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from .errors import MISSING, Problem, RecipeError
from .schema import SCHEMA_VERSION, WEIGHT_FIELDS, Recipe, check_relations, get_setting, is_section, section_types

__all__ = ["load_recipe", "load_recipe_text", "validate_recipe_file", "parse_override"]

RecipeSource = Union[str, os.PathLike, Mapping[str, Any]]

# PyYAML follows YAML 1.1, where "1e-4" (no dot) is a *string*; users write learning rates that way, so float
# fields accept numeric strings in scientific notation (and only those).
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _all_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted path of the schema, sections included (``adapter``, ``adapter.lora``, ``adapter.lora.rank``)."""
    paths = []
    for name, tp in section_types(cls).items():
        paths.append(prefix + name)
        if is_section(tp):
            paths += _all_paths(tp, prefix + name + ".")
    return paths


# Where each name lives, to tell a user who wrote "lr" at the top level that it belongs in optimizer.lr.
_HOMES: dict[str, list[str]] = {}
for _path in _all_paths(Recipe):
    _HOMES.setdefault(_path.rsplit(".", 1)[-1], []).append(_path)


def load_recipe(source: RecipeSource, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe file (or a plain mapping), apply dotted ``overrides``, validate, return a frozen Recipe.

    ``overrides`` look like ``train.max_steps=200`` or ``preview.prompts=[a cat, a dog]``; values are parsed as
    YAML. Raises :class:`RecipeError` listing every problem found; nothing is written to disk.
    """
    if not isinstance(source, (str, os.PathLike)):
        # Already-parsed data (a dict, or anything else, which is then reported as "not a mapping").
        return _load_data(source, overrides, default_name="recipe", label="recipe")
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem("(file)", str(path), f"recipe file not found (looked in {Path.cwd()})",
                                   "check the path; relative paths start at the current directory")],
                          str(path)) from None
    except IsADirectoryError:
        raise RecipeError([Problem("(file)", str(path), "is a folder, not a recipe file",
                                   "give a .yaml file inside it, e.g. recipes/tiny/lora.yaml")], str(path)) from None
    except UnicodeDecodeError as exc:
        raise RecipeError([Problem("(file)", str(path), f"is not UTF-8 text ({exc.reason})",
                                   "save the recipe as UTF-8")], str(path)) from None
    except OSError as exc:
        raise RecipeError([Problem("(file)", str(path), f"cannot be read: {exc.strerror or exc}",
                                   "check the file's permissions")], str(path)) from None
    return load_recipe_text(text, name=path.stem, overrides=overrides, label=str(path))


def load_recipe_text(text: str, name: str = "recipe", overrides: Sequence[str] = (),
                     label: Optional[str] = None) -> Recipe:
    """Like :func:`load_recipe` for YAML text (the studio's editor); ``name`` is used if the text has none."""
    label = label or name
    data = _parse_yaml(text, label)
    return _load_data(data, overrides, default_name=name, label=label, problems=duplicate_keys(text))


def duplicate_keys(text: str) -> list[Problem]:
    """A problem for every key written twice in one mapping of ``text`` (plain YAML keeps the last one without a
    word, so a second ``train:`` section would silently replace the first)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # the node tree only: nothing is constructed
    except yaml.YAMLError:
        return []  # a syntax error is reported by _parse_yaml
    problems: list[Problem] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            first: dict[str, tuple[int, Any]] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                dotted = f"{path}.{key}" if path else str(key)
                if key is not None and key != "<<":
                    line = key_node.start_mark.line + 1
                    if key in first:
                        earlier_line, earlier = first[key]
                        scalar = isinstance(value_node, yaml.ScalarNode)
                        value = [earlier, value_node.value] if scalar and earlier is not None else "2 sections"
                        problems.append(Problem(dotted, value, f"is written twice (lines {earlier_line} and "
                                                f"{line}); YAML would silently keep only the last one",
                                                "keep one of them, with every setting it needs"))
                    else:
                        first[key] = (line, value_node.value if isinstance(value_node, yaml.ScalarNode) else None)
                walk(value_node, dotted)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, path)

    walk(root, "")
    return problems


def validate_recipe_file(path: Union[str, os.PathLike], overrides: Sequence[str] = ()) -> list[Problem]:
    """Every problem of a recipe file, without raising (empty list = the recipe is usable)."""
    try:
        load_recipe(path, overrides)
    except RecipeError as err:
        return err.problems
    return []


def _parse_yaml(text: str, label: str) -> Any:
    """``yaml.safe_load`` with syntax errors turned into one problem that points at the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in str(exc.problem):
            # e.g. "!!python/object": safe_load refuses tags that would build objects, and so do we.
            hint = "recipes hold plain values only; remove the !! tag"
        else:
            hint = "check indentation (spaces, not tabs) and that every 'key: value' has a space after the colon"
        raise RecipeError([Problem("(file)", MISSING, f"is not valid YAML{where}: {what}", hint)], label) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem("(file)", MISSING, f"is not valid YAML: {exc}",
                                   "remove control characters and check the file is plain text")], label) from None


def _load_data(data: Any, overrides: Sequence[str], default_name: str, label: str,
               problems: Optional[list[Problem]] = None) -> Recipe:
    """Validate already-parsed YAML data; the core of every ``load_*`` function. ``problems`` already found in
    the text (keys written twice) are reported with the rest."""
    problems = list(problems or [])
    if data is None:  # every other problem would just follow from this one
        raise RecipeError([Problem("(recipe)", None, "the recipe is empty",
                                   "start from a file in recipes/, e.g. recipes/tiny/lora.yaml")], label)
    if not isinstance(data, Mapping):
        raise RecipeError([Problem("(recipe)", data, "the top level of a recipe must be a mapping of sections",
                                   "write 'key: value' lines, e.g. 'version: 1' then 'model:' ...")], label)
    data = copy.deepcopy(dict(data))  # overrides must never edit the caller's mapping
    _apply_overrides(data, overrides, problems)
    _check_version(data, problems)
    data.setdefault("name", default_name)

    builder = _Builder(problems)
    recipe = builder.build(Recipe, data, "")
    check_relations(recipe, builder.bad, problems)
    check_paths(recipe, builder.bad, problems)
    if problems:
        raise RecipeError(problems, label)
    return recipe


def _check_version(data: dict, problems: list[Problem]) -> None:
    """The version is checked first and separately: a missing one is the clearest sign of a non-recipe file."""
    version = data.get("version", MISSING)
    if version is MISSING:
        problems.append(Problem("version", MISSING, "the recipe format version is missing",
                                f"add 'version: {SCHEMA_VERSION}' at the top"))
    elif isinstance(version, bool) or version != SCHEMA_VERSION:
        problems.append(Problem("version", version, f"this Cascade Studio reads recipe version {SCHEMA_VERSION} only",
                                f"write 'version: {SCHEMA_VERSION}' and compare with a file in recipes/"))
    # Either way the rest is still checked against version 1 so every other problem shows too.
    data["version"] = SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` into the dotted path and the YAML-parsed value; raises ``ValueError`` if malformed."""
    if not isinstance(text, str) or "=" not in text:
        raise ValueError("an override must look like section.key=value")
    path, _, raw = text.partition("=")
    path = path.strip()
    if not path or any(not part for part in path.split(".")):
        raise ValueError("an override must look like section.key=value")
    try:
        return path, yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ValueError(f"the value {raw!r} is not valid YAML (put text with ':' or '#' in quotes)") from None


def _apply_overrides(data: dict, overrides: Sequence[str], problems: list[Problem]) -> None:
    """Set each dotted override into ``data``; report malformed ones and unknown paths like unknown keys."""
    if isinstance(overrides, str):  # a single string would otherwise be iterated character by character
        overrides = [overrides]
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ValueError as exc:
            problems.append(Problem(f"(override {text!r})", text, str(exc), "e.g. train.max_steps=200"))
            continue
        parts = path.split(".")
        if not _check_override_path(parts, value, problems):
            continue
        target = data
        for part in parts[:-1]:
            child = target.get(part)
            if child is None:
                child = target[part] = {}
            elif isinstance(child, Mapping) and not isinstance(child, dict):
                child = target[part] = dict(child)
            if not isinstance(child, dict):
                break  # the section itself is malformed; the builder reports that
            target = child
        else:
            target[parts[-1]] = value


def _check_override_path(parts: list[str], value: Any, problems: list[Problem]) -> bool:
    """True if every segment of an override path names a field, else one unknown-key problem."""
    cls: Any = Recipe
    for depth, part in enumerate(parts):
        hints = section_types(cls) if is_section(cls) else {}
        if part not in hints:
            prefix = ".".join(parts[:depth])
            if not hints:
                message = f"{prefix} is a single setting, not a section (from an override)"
                problems.append(Problem(".".join(parts), value, message, f"write {prefix}=value"))
            else:
                problems.append(_unknown_key(".".join(parts), part, list(hints), value, "(from an override)"))
            return False
        cls = hints[part]
    return True


def _unknown_key(path: str, key: str, known: list[str], value: Any, origin: str = "") -> Problem:
    """An unknown-key problem with a did-you-mean, or where the key belongs if it exists elsewhere."""
    message = "unknown setting" + (f" {origin}" if origin else "")
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    homes = _HOMES.get(key, [])
    if close:
        hint = f"did you mean '{close[0]}'?"
    elif homes:
        hint = f"this setting belongs in {' or '.join(homes[:3])}"
    else:
        hint = "known settings here: " + ", ".join(known)
    return Problem(path, value, message, hint)


# ------------------------------------------------------------------------------------------ type checking

class _Builder:
    """Turns nested mappings into frozen dataclasses, recording a problem (and a default) for each bad value."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        self.bad: set[str] = set()  # dotted paths whose value was rejected and replaced by the default

    def build(self, cls: type, data: Mapping, prefix: str) -> Any:
        """Build ``cls`` from ``data``; unknown keys and bad values become problems, never exceptions."""
        hints = section_types(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if not isinstance(key, str) or key not in fields:
                self.problems.append(_unknown_key(prefix + str(key), str(key), list(fields), value))
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in data:
                continue
            path, value, tp = prefix + name, data[name], hints[name]
            if is_section(tp):
                if value is None:  # "lora:" with nothing under it means "all defaults"
                    value = {}
                if not isinstance(value, Mapping):
                    self._fail(path, value, "must be a section (indented 'key: value' lines)",
                               f"write '{name}:' then its settings indented below it")
                    continue
                kwargs[name] = self.build(tp, value, path + ".")
                continue
            converted = self._leaf(path, value, tp, f.metadata)
            if converted is not _INVALID:
                kwargs[name] = converted
        return cls(**kwargs)

    def _fail(self, path: str, value: Any, message: str, hint: str = "") -> Any:
        self.problems.append(Problem(path, value, message, hint))
        self.bad.add(path)
        return _INVALID

    def _leaf(self, path: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
        """Check and convert one leaf value; returns ``_INVALID`` after recording a problem."""
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Union:  # Optional[X]
            if value is None:
                return None
            tp = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is tuple:
            return self._sequence(path, value, args, meta)
        converted = self._scalar(path, value, tp, meta)
        if converted is _INVALID:
            return _INVALID
        return self._constrain(path, converted, meta)

    def _sequence(self, path: str, value: Any, args: tuple, meta: Mapping[str, Any]) -> Any:
        example = _example(meta)
        if not isinstance(value, (list, tuple)):
            return self._fail(path, value, "must be a list", f"e.g. {example}" if example else "write [a, b]")
        fixed = not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            return self._fail(path, value, f"must be a list of exactly {len(args)} items",
                              f"e.g. {example}" if example else "")
        # Hints about one item show one item, not the whole example list.
        list_example = meta.get("example")
        item_meta = {**meta, "example": list_example[0] if isinstance(list_example, list) else list_example}
        items = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            converted = self._scalar(item_path, item, args[0 if not fixed else index], item_meta)
            if converted is not _INVALID:
                converted = self._constrain(item_path, converted, item_meta, item=True)
            if converted is _INVALID:
                self.bad.add(path)
            items.append(converted)
        return _INVALID if path in self.bad else tuple(items)

    def _scalar(self, path: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
        example = _example(meta)
        eg = f"e.g. {example}" if example not in (None, "") else ""
        if tp is bool:
            if isinstance(value, bool):
                return value
            return self._fail(path, value, "must be true or false")
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, bool):
                return self._fail(path, value, "must be a whole number, not true/false", eg)
            if isinstance(value, float):
                return self._fail(path, value, "must be a whole number (no decimal point)", eg)
            return self._fail(path, value, "must be a whole number", eg)
        if tp is float:
            number: Any = _INVALID
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
                number = float(value)
            if number is _INVALID:
                return self._fail(path, value, "must be a number", eg)
            if not math.isfinite(number):
                return self._fail(path, value, "must be a finite number", eg)
            return number
        # Text. YAML 1.1 reads a bare "no" as false, which would make "mixed_precision: no" fail; map false back
        # to "no" (or to "none": "quantize_base: no"), and null to "none", when the field's choices hold the word.
        choices = meta.get("choices") or ()
        if value is False and "no" in choices:
            return "no"
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if (value is None or value is False) and "none" in choices:
            return "none"
        if isinstance(value, os.PathLike) and meta.get("path"):
            return os.fspath(value)
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self._fail(path, value, "must be text", f"put it in quotes, e.g. '{value}'")
        return self._fail(path, value, "must be text", eg)

    def _constrain(self, path: str, value: Any, meta: Mapping[str, Any], item: bool = False) -> Any:
        """Choices, emptiness and numeric limits from the field's ``setting()`` metadata."""
        if isinstance(value, str):
            refused = meta.get("refused") or {}
            if value in refused:
                choices = meta.get("choices") or ()
                return self._fail(path, value, refused[value], f"write {' or '.join(choices)}")
            choices = meta.get("choices")
            if choices and not meta.get("open_choices") and value not in choices:
                close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
                return self._fail(path, value, "must be one of: " + ", ".join(choices),
                                  f"did you mean '{close[0]}'?" if close else "")
            if not value.strip() and not item and not meta.get("allow_empty"):
                return self._fail(path, value, "must not be empty", "write null to leave it unset"
                                  if meta.get("path") else (f"e.g. {meta['example']}" if meta.get("example") else ""))
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        low, high = meta.get("min"), meta.get("max")
        low_x, high_x, multiple = meta.get("min_exclusive"), meta.get("max_exclusive"), meta.get("multiple_of")
        too_low = low is not None and (value <= low if low_x else value < low)
        too_high = high is not None and (value >= high if high_x else value > high)
        off_grid = multiple is not None and isinstance(value, int) and value % multiple != 0
        if too_low or too_high or off_grid:
            rule = _describe_limits(isinstance(value, int), low, high, low_x, high_x, multiple)
            example = _example(meta)
            hint = f"e.g. {example}" if example is not None else ""
            if off_grid and not (too_low or too_high):
                hint = f"e.g. {max(multiple, round(value / multiple) * multiple)}"
            return self._fail(path, value, rule, hint)
        return value


_INVALID: Any = object()


def _example(meta: Mapping[str, Any]) -> Any:
    """The field's example as the user would type it (lists in YAML flow style)."""
    example = meta.get("example")
    if isinstance(example, list):
        return "[" + ", ".join(str(v) for v in example) + "]"
    return example


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _describe_limits(whole: bool, low: Optional[float], high: Optional[float], low_x: bool, high_x: bool,
                     multiple: Optional[int]) -> str:
    """Say the rule in words: 'must be a positive whole number', 'must be a number from 0 to 1'..."""
    noun = "whole number" if whole else "number"
    if whole and low == 1 and high is None and not low_x:
        text = f"must be a positive {noun}"
    elif low is not None and high is not None:
        if not low_x and not high_x:
            text = f"must be a {noun} from {_fmt(low)} to {_fmt(high)}"
        else:
            text = (f"must be a {noun} {'above' if low_x else 'at least'} {_fmt(low)} "
                    f"and {'below' if high_x else 'at most'} {_fmt(high)}")
    elif low is not None:
        text = f"must be a {noun} above {_fmt(low)}" if low_x else f"must be a {noun}, {_fmt(low)} or more"
    elif high is not None:
        text = f"must be a {noun} below {_fmt(high)}" if high_x else f"must be a {noun}, {_fmt(high)} or less"
    else:
        text = f"must be a {noun}"
    if multiple:
        text += f" and a multiple of {multiple}"
    return text


# ------------------------------------------------------------------------------------------- filesystem

# Suffixes that mark a weight *file*, so the value cannot be a hub repo id (STABLE_CASCADE.md §5 names the
# published .safetensors files; the rest are pickles, see schema.PICKLE_SUFFIXES).
_WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
# Tar shard lists in webdataset style: "shards-{000..009}.tar" (numeric range) or "{train,extra}.tar".
_BRACE = re.compile(r"\{([^{}]*)\}")


def _looks_local(value: str) -> bool:
    """Whether a weight reference is meant as a local path (checked) rather than a hub repo id (not checked).

    ``org/name`` is a repo id; anything starting with ``.``, ``/`` or ``~``, ending in a weight suffix, or with
    more than one ``/`` (repo ids have exactly one) is a path.
    """
    return (value.startswith((".", "/", "~", "\\")) or value.lower().endswith(_WEIGHT_SUFFIXES)
            or value.count("/") > 1 or "\\" in value or re.match(r"^[A-Za-z]:", value) is not None)


def _exists(path: str) -> bool:
    try:
        return os.path.exists(os.path.expanduser(path))
    except (OSError, ValueError):  # NUL bytes, over-long names: simply "not there"
        return False


def _expand_braces(pattern: str, limit: int = 10_000) -> list[str]:
    """Expand ``{000..009}`` and ``{a,b}`` groups (what webdataset accepts), capped to keep validation quick."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        start, stop = numeric.groups()
        width = len(start) if start.startswith("0") else 0
        low, high = int(start), int(stop)
        options = [str(n).zfill(width) for n in range(low, min(high, low + limit) + 1)]
    else:
        options = body.split(",")
    expanded: list[str] = []
    for option in options:
        expanded.extend(_expand_braces(head + option + tail, limit))
        if len(expanded) >= limit:
            break
    return expanded[:limit]


def _glob_matches(pattern: str) -> bool:
    """True if any expanded shard pattern matches an existing file."""
    import glob  # only needed here

    try:
        for candidate in _expand_braces(os.path.expanduser(pattern)):
            if glob.has_magic(candidate):
                if next(glob.iglob(candidate), None) is not None:
                    return True
            elif os.path.isfile(candidate):
                return True
    except (OSError, ValueError, RecursionError):
        return False
    return False


_EXAMPLE_DATA = "datasets/tiny-shapes"  # the sample set in the repository, named in the recipes


def _data_path_hint(value: str) -> str:
    """What to write instead of a data.path that is not there; never the very path that just failed."""
    if os.path.normpath(os.path.expanduser(value)).replace("\\", "/").endswith(_EXAMPLE_DATA):
        return (f"{_EXAMPLE_DATA} is the repository's sample set: run from the repository root, give its absolute "
                "path, or point data.path at your own image folder")
    return f"point data.path at your own folder, e.g. {_EXAMPLE_DATA}"


def check_paths(recipe: Recipe, bad: set[str], problems: list[Problem]) -> None:
    """Report paths that must exist but do not. Nothing is created; relative paths start at the cwd."""
    cwd = Path.cwd()
    for dotted in WEIGHT_FIELDS:
        value = get_setting(recipe, dotted)
        if dotted in bad or value is None or not _looks_local(value) or _exists(value):
            continue
        problems.append(Problem(dotted, value, f"file or folder not found (relative paths start at {cwd})",
                                "fix the path, or give a Hugging Face repo id such as org/name"))

    data = recipe.data
    if not {"data.source", "data.path"} & bad and data.path is not None:
        if data.source in ("folder", "hf_disk"):
            expanded = os.path.expanduser(data.path)
            if not _exists(data.path):
                what = "image folder" if data.source == "folder" else "saved dataset folder (save_to_disk)"
                problems.append(Problem("data.path", data.path, f"{what} not found (relative paths start at {cwd})",
                                        _data_path_hint(data.path)))
            elif not os.path.isdir(expanded):
                problems.append(Problem("data.path", data.path, f"is a file, but source {data.source} reads a "
                                        "folder", "give the folder that holds it, or use source: webdataset for tars"))
        elif data.source == "webdataset" and "://" not in data.path and not data.path.startswith("pipe:"):
            if not _glob_matches(data.path):
                problems.append(Problem("data.path", data.path, f"no tar shard matches (relative paths start at "
                                        f"{cwd})", "e.g. data/shards-{000000..000009}.tar or data/*.tar"))

    # Folders the run will create must not already exist as files.
    for dotted, value in (("workspace", recipe.workspace), ("cache.dir", recipe.cache.dir),
                          ("export.dir", recipe.export.dir)):
        if dotted not in bad and value and _exists(value) and not os.path.isdir(os.path.expanduser(value)):
            problems.append(Problem(dotted, value, "is an existing file, but a folder is needed here",
                                    "choose another folder name"))
