"""The recipe form's logic (cascade_studio/ui/recipe_form.py): generated from the schema, lossless for valid
values, problems mapped to fields, saving validated and sanitised."""
from __future__ import annotations

from pathlib import Path

import pytest

from cascade_studio.config import Recipe, RecipeError, describe_fields, load_recipe
from cascade_studio.ui.recipe_form import (form_fields, from_widget, get_dotted, load_form_data,
                                           problems_by_field, recipe_yaml, save_recipe_text, set_dotted,
                                           to_widget, validate_data)
from cascade_studio.ui.workspace import REPO_ROOT

TINY_LORA = REPO_ROOT / "recipes" / "tiny" / "lora.yaml"


def test_every_schema_field_gets_a_widget_with_its_doc_as_help() -> None:
    docs = {d.path: d for d in describe_fields(Recipe)}
    fields = {f.path: f for f in form_fields()}
    assert set(fields) == set(docs) - {"version"}  # version is fixed at 1, everything else is editable
    for path, field in fields.items():
        assert field.help.startswith(docs[path].doc), path


@pytest.mark.parametrize(("path", "kind"), [
    ("model.preset", "choice"), ("adapter.lora.targets", "multichoice"), ("export.formats", "multichoice"),
    ("preview.prompts", "lines"), ("optimizer.betas", "numbers"), ("adapter.controlnet.proj_blocks", "numbers"),
    ("data.max_images", "optional"), ("model.stage_c", "optional"), ("optimizer.lr", "float"),
    ("train.max_steps", "int"), ("cache.enabled", "bool"), ("name", "text"), ("data.split", "text"),
])
def test_widget_kinds_follow_the_schema_types(path: str, kind: str) -> None:
    assert {f.path: f.kind for f in form_fields()}[path] == kind


@pytest.mark.parametrize("recipe_file", sorted((REPO_ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_widget_round_trip_reproduces_every_shipped_recipe(recipe_file: Path) -> None:
    data, _, problems = load_form_data(recipe_file)
    assert problems == [] and data is not None
    rebuilt: dict = {"version": 1}
    for field in form_fields():
        set_dotted(rebuilt, field.path, from_widget(field, to_widget(field, get_dotted(data, field.path))))
    recipe, problems = validate_data(rebuilt)
    assert problems == []
    assert recipe == load_recipe(recipe_file)


def test_unparseable_input_reaches_the_validator_and_every_problem_is_reported() -> None:
    data, _, _ = load_form_data(TINY_LORA)
    fields = {f.path: f for f in form_fields()}
    set_dotted(data, "optimizer.lr", from_widget(fields["optimizer.lr"], "fast"))
    set_dotted(data, "train.max_steps", 0)
    set_dotted(data, "adapter.lora.targets", from_widget(fields["adapter.lora.targets"], ["attention", "bad name"]))
    set_dotted(data, "optimizer.betas", from_widget(fields["optimizer.betas"], "0.9, x"))
    recipe, problems = validate_data(data)
    assert recipe is None
    by_field, general = problems_by_field(problems, list(fields))
    assert set(by_field) == {"optimizer.lr", "train.max_steps", "adapter.lora.targets", "optimizer.betas"}
    assert general == []
    assert by_field["optimizer.lr"][0].value == "fast"
    assert by_field["adapter.lora.targets"][0].path == "adapter.lora.targets[1]"  # mapped from the item


def test_empty_optional_boxes_mean_null_and_numbers_parse() -> None:
    fields = {f.path: f for f in form_fields()}
    assert from_widget(fields["data.max_images"], "") is None
    assert from_widget(fields["data.max_images"], "12") == 12
    assert from_widget(fields["optimizer.lr"], "2e-3") == 0.002
    assert from_widget(fields["optimizer.betas"], "0.9, 0.99") == [0.9, 0.99]
    assert from_widget(fields["adapter.controlnet.proj_blocks"], "") is None
    assert from_widget(fields["preview.prompts"], "a cat\n\n  a dog  \n") == ["a cat", "a dog"]
    assert to_widget(fields["optimizer.eps"], 1e-8) == "1e-08"
    assert to_widget(fields["optimizer.lr"], 0.002) == "0.002"


def test_save_writes_a_valid_sanitised_file_and_refuses_overwrite_and_invalid(tmp_path: Path) -> None:
    recipe = load_recipe(TINY_LORA, ["train.max_steps=7"])
    path = save_recipe_text(tmp_path / "recipes", "My LoRA (v2)", recipe_yaml(recipe))
    assert path == tmp_path / "recipes" / "My-LoRA-v2.yaml"
    assert load_recipe(path) == recipe  # the dumped YAML (with doc comments) loads back to the same recipe
    assert "# Optimizer steps to train." in path.read_text()
    with pytest.raises(FileExistsError):
        save_recipe_text(tmp_path / "recipes", "My-LoRA-v2", recipe_yaml(recipe))
    save_recipe_text(tmp_path / "recipes", "My-LoRA-v2", recipe_yaml(recipe).replace("max_steps: 7",
                                                                                     "max_steps: 9"),
                     overwrite=True)
    assert load_recipe(path).train.max_steps == 9
    with pytest.raises(RecipeError) as err:
        save_recipe_text(tmp_path / "recipes", "broken", "version: 1\ntrain: {max_steps: -1}\n")
    assert any(p.path == "train.max_steps" for p in err.value.problems)
    assert not (tmp_path / "recipes" / "broken.yaml").exists()
    assert sorted(p.name for p in (tmp_path / "recipes").iterdir()) == ["My-LoRA-v2.yaml"]  # no temp files left


def test_invalid_file_gives_no_form_data_but_all_its_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: 2\ntrain:\n  max_steps: zero\n")
    data, text, problems = load_form_data(path)
    assert data is None and "max_steps: zero" in text
    assert {p.path for p in problems} == {"version", "train.max_steps", "data.path"}  # data.path: unset
