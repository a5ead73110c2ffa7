"""Recipes page: pick a shipped or saved recipe, edit it in a form generated from the schema (or as YAML), see
every problem at once next to the field it concerns, save it as a new recipe in ``<workspace>/recipes/``."""
from __future__ import annotations

import copy
import hashlib
from typing import Any, Optional

import streamlit as st

from ..config import RecipeError, load_recipe_text
from ..trainers.preview_cost import PREVIEW_SHARE_WARNING, preview_cost
from .common import show_problems, workspace
from .paths import NAME_RULE, RELATIVE_PATHS_HELP, PathNotAllowed
from .recipe_form import (SECTION_TITLES, FormField, form_fields, from_widget, get_dotted, load_form_data,
                          problems_by_field, recipe_yaml, save_recipe_text, set_dotted, to_widget, validate_data)
from .workspace import RecipeEntry, Workspace

SELECT_KEY = "recipes_select"
_PENDING = "recipes_select_pending"  # a widget's value can only be set before it is drawn: after a save, rerun
_FLASH = "recipes_flash"
_EXPANDED = ("", "model", "adapter", "data", "train")


def render() -> None:
    ws = workspace()
    st.title("Recipes")
    st.caption("Shipped recipes (recipes/) are read-only: edit one here and save it under a new name in "
               f"`{ws.recipes_dir}`. {RELATIVE_PATHS_HELP}")
    if _FLASH in st.session_state:
        st.success(st.session_state.pop(_FLASH))
    entries = ws.list_recipes()
    labels = [e.label for e in entries]
    pending = st.session_state.pop(_PENDING, None)
    if pending in labels:
        st.session_state[SELECT_KEY] = pending
    label = st.selectbox("Recipe", labels, key=SELECT_KEY, help="recipes/** from the repository, then the "
                         "recipes saved in this workspace")
    entry = entries[labels.index(label)]
    data, text, file_problems = load_form_data(entry.path)
    # Widget keys carry the file and its modification time, so picking (or re-saving) a file resets the form.
    source_key = hashlib.sha1(f"{entry.path}:{entry.path.stat().st_mtime_ns}".encode()).hexdigest()[:10]
    form_tab, yaml_tab = st.tabs(["Form", "YAML"])
    with form_tab:
        if data is None:
            show_problems(file_problems, "This file is not a valid recipe, so the form cannot show it; fix these "
                                         "problems in the YAML tab")
        else:
            _form(ws, entry, data, source_key)
    with yaml_tab:
        _yaml_editor(ws, entry, text, source_key)


def _widget(field: FormField, value: Any, key: str) -> Any:
    """Draw the widget for one field and return its (raw) value."""
    label = field.path.split(".", 1)[1] if "." in field.path else field.path
    shown = to_widget(field, value)
    kind, doc = field.kind, field.doc
    if kind == "bool":
        return st.checkbox(label, value=shown, key=key, help=field.help)
    if kind == "choice":
        options = list(doc.choices or ())
        if shown not in options:  # keep an unexpected value visible; validation says what is wrong with it
            options.append(shown)
        return st.selectbox(label, options, index=options.index(shown), key=key, help=field.help)
    if kind == "multichoice":
        options = list(doc.choices or ()) + [v for v in shown if v not in (doc.choices or ())]
        # New options are allowed (LoRA targets take module-name suffixes); the validator checks them.
        return st.multiselect(label, options, default=shown, key=key, help=field.help, accept_new_options=True)
    if kind == "int" and isinstance(shown, int) and not isinstance(shown, bool):
        return st.number_input(label, value=shown, step=1, format="%d", key=key, help=field.help)
    if kind == "lines":
        return st.text_area(label, value=shown, key=key, help=field.help, height=90)
    return st.text_input(label, value=str(shown), key=key, help=field.help)


def _form(ws: Workspace, entry: RecipeEntry, data: dict, source_key: str) -> None:
    fields = form_fields()
    edited = copy.deepcopy(data)
    slots: dict[str, Any] = {}
    cost_slot = None
    summary = st.container()
    sections = list(dict.fromkeys(f.section for f in fields))
    for section in sections:
        with st.expander(SECTION_TITLES.get(section, section), expanded=section in _EXPANDED):
            columns, shown = st.columns(2), 0
            for field in (f for f in fields if f.section == section):
                method = get_dotted(edited, "adapter.method")
                if field.path.startswith("adapter.") and field.path.count(".") == 2 \
                        and not field.path.startswith(f"adapter.{method}."):
                    continue  # only the chosen method's settings; the others keep their values
                with columns[shown % 2]:
                    raw = _widget(field, get_dotted(data, field.path), key=f"rf-{source_key}-{field.path}")
                    set_dotted(edited, field.path, from_widget(field, raw))
                    slots[field.path] = st.empty()  # filled with this field's problems after validation
                shown += 1
            if section == "preview":
                cost_slot = st.empty()  # what the previews cost, once the recipe validates
    recipe, problems = validate_data(edited)
    if recipe is not None and cost_slot is not None:
        _show_preview_cost(cost_slot, recipe)
    by_field, _ = problems_by_field(problems, list(slots))  # the rest shows in the summary
    for path, found in by_field.items():
        slots[path].error("\n".join(f"{p}" for p in found))
    with summary:
        if problems:
            show_problems(problems, f"{len(problems)} problem{'s' if len(problems) != 1 else ''} (also shown "
                                    "next to each field)")
        else:
            st.success("Valid recipe.")
    st.divider()
    name = st.text_input("Save as", value=default_save_name(entry, edited.get("name")), key=f"saveas-{source_key}",
                         help=_save_help(ws))
    overwrite = st.checkbox("Overwrite an existing file of that name", key=f"overwrite-{source_key}")
    if st.button("Save recipe", key=f"save-{source_key}", type="primary"):
        if recipe is None:
            st.error(f"Not saved: fix the {len(problems)} problem(s) above first.")
        else:
            _save(ws, name, recipe_yaml(recipe), overwrite)


def _show_preview_cost(slot, recipe) -> None:
    cost = preview_cost(recipe)
    if cost.share > PREVIEW_SHARE_WARNING:
        slot.warning(f"**Preview cost.** {cost.describe()} That slows the run noticeably: lower `preview.steps`, "
                     "render less often (`preview.every`) or use fewer prompts or seeds.")
    else:
        slot.info(f"**Preview cost.** {cost.describe()}")


def default_save_name(entry: RecipeEntry, recipe_name: Optional[str]) -> str:
    """The one default for both tabs: a saved recipe is saved over itself (tick 'overwrite'); a shipped one (read-
    only) under its recipe name, which is also the name its runs get."""
    return entry.path.stem if not entry.shipped else str(recipe_name or entry.path.stem)


def _save_help(ws: Workspace) -> str:
    return f"File name in `{ws.recipes_dir}`: {NAME_RULE}; `.yaml` is added"


def _save(ws: Workspace, name: str, text: str, overwrite: bool) -> None:
    try:
        path = save_recipe_text(ws.recipes_dir, name, text, overwrite=overwrite)
    except RecipeError as exc:
        show_problems(exc.problems, "Not saved")
    except (FileExistsError, PathNotAllowed, OSError) as exc:
        st.error(f"Not saved: {exc}")
    else:
        st.session_state[_PENDING] = f"saved: {path.name}"
        st.session_state[_FLASH] = f"Saved {path}"
        st.rerun()


def _yaml_editor(ws: Workspace, entry: RecipeEntry, text: str, source_key: str) -> None:
    edited = st.text_area("Recipe YAML", value=text, height=480, key=f"yaml-{source_key}",
                          help="The whole recipe as YAML; it is validated as you edit (click outside to apply)")
    try:
        recipe = load_recipe_text(edited, name=entry.path.stem, label="this YAML")
    except RecipeError as exc:
        show_problems(exc.problems)
        recipe = None
    else:
        st.success(f"Valid recipe: {recipe.adapter.method} on preset {recipe.model.preset}, "
                   f"{recipe.train.max_steps} steps.")
    name = st.text_input("Save YAML as", value=default_save_name(entry, recipe.name if recipe else None),
                         key=f"yaml-saveas-{source_key}", help=_save_help(ws))
    overwrite = st.checkbox("Overwrite an existing file of that name", key=f"yaml-overwrite-{source_key}")
    if st.button("Save YAML", key=f"yaml-save-{source_key}"):
        if recipe is None:
            st.error("Not saved: fix the problems above first.")
        else:
            _save(ws, name, edited, overwrite)
