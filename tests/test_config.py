"""Recipes: schema, loading, all-problems-at-once validation, overrides, round-trips and the shipped recipes."""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade_studio.adapters.lora.config import LoraConfig
from cascade_studio.config import (
    MISSING,
    Problem,
    Recipe,
    RecipeError,
    TrainConfig,
    describe_fields,
    dump_recipe_yaml,
    load_recipe,
    load_recipe_text,
    recipe_to_dict,
    validate_recipe_file,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
EXPECTED_RECIPES = {
    "lora/stage-c-big-style.yaml", "lora/stage-c-lite-style.yaml", "controlnet/stage-c-big-canny.yaml",
    "controlnet/stage-c-big-inpainting.yaml", "controlnet/stage-c-lite-canny.yaml", "ip_adapter/stage-c-big.yaml",
    "ip_adapter/stage-c-lite.yaml", "tiny/lora.yaml", "tiny/controlnet-canny.yaml", "tiny/controlnet-image.yaml",
    "tiny/ip-adapter.yaml",
}


@pytest.fixture(autouse=True, scope="module")
def _run_from_repo_root():
    """Recipes are run from the repository root, so their relative data paths resolve there."""
    before = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(before)


def _minimal(**sections: Any) -> dict[str, Any]:
    """The smallest valid recipe (tiny preset, the sample data set), with sections replaced as given."""
    data: dict[str, Any] = {"version": 1, "data": {"path": "datasets/tiny-shapes"}}
    data.update(sections)
    return data


def _problems(data: Any, overrides: tuple[str, ...] = ()) -> list[Problem]:
    with pytest.raises(RecipeError) as info:
        load_recipe(data, overrides)
    return info.value.problems


def _by_path(problems: list[Problem]) -> dict[str, Problem]:
    return {p.path: p for p in problems}


# ------------------------------------------------------------------------------------------ shipped recipes

def test_every_expected_recipe_is_shipped():
    assert RECIPES, "no recipes found under recipes/"
    shipped = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert EXPECTED_RECIPES <= shipped


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_shipped_recipe_validates_and_round_trips(path: Path):
    recipe = load_recipe(path)
    assert validate_recipe_file(path) == []
    assert load_recipe_text(dump_recipe_yaml(recipe)) == recipe
    assert load_recipe_text(dump_recipe_yaml(recipe, with_comments=False)) == recipe
    assert load_recipe(recipe_to_dict(recipe)) == recipe


def test_tiny_lora_recipe_holds_the_documented_settings():
    r = load_recipe(REPO / "recipes/tiny/lora.yaml")
    assert (r.model.preset, r.model.dtype, r.train.mixed_precision) == ("tiny", "fp32", "no")
    assert (r.data.resolution, r.data.holdout_fraction, r.data.caption_dropout) == (256, 0.25, 0.05)
    assert (r.train.max_steps, r.train.batch_size, r.train.checkpoint_every) == (100, 4, 25)
    assert (r.optimizer.name, r.optimizer.lr, r.adapter.lora.rank) == ("adamw8bit", 3e-3, 8)
    assert (r.preview.every, len(r.preview.prompts), r.preview.seeds) == (50, 2, (0, 1))


def test_real_size_recipes_use_the_published_defaults():
    lora = load_recipe(REPO / "recipes/lora/stage-c-big-style.yaml")
    assert (lora.optimizer.lr, lora.optimizer.name, lora.data.resolution) == (1e-4, "adamw8bit", 768)
    assert (lora.model.dtype, lora.train.mixed_precision, lora.train.gradient_checkpointing) == ("bf16", "bf16", True)
    assert (lora.adapter.lora.rank, lora.model.repo_id) == (16, "stabilityai/stable-cascade")
    assert load_recipe(REPO / "recipes/controlnet/stage-c-big-inpainting.yaml").train.offset_noise == 0.1
    ip = load_recipe(REPO / "recipes/ip_adapter/stage-c-lite.yaml")
    assert (ip.optimizer.lr, ip.optimizer.weight_decay, ip.model.preset) == (1e-4, 0.01, "lite")
    image = load_recipe(REPO / "recipes/tiny/controlnet-image.yaml").adapter.controlnet
    assert (image.control, image.control_column) == ("image", "_control")


# ------------------------------------------------------------------------------------ every problem at once

BAD_RECIPE = """\
version: 1
model:
  preset: big
  dtype: fp16
  stage_c: ./weights/missing_stage_c.safetensors
adapter:
  method: lora
  lora:
    dropout: 1.5
    targets: [attention, "not a module!"]
data:
  path: no/such/folder
  resolution: 500
  crop: middle
optimizer:
  lr: -0.001
trian:
  max_steps: 10
train:
  max_steps: -5
  batch_size: true
"""


def test_bad_recipe_reports_every_problem_with_paths_and_hints(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_RECIPE)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    problems = _by_path(info.value.problems)
    assert set(problems) == {
        "model.dtype", "model.stage_c", "adapter.lora.dropout", "adapter.lora.targets[1]", "data.path",
        "data.resolution", "data.crop", "optimizer.lr", "trian", "train.max_steps", "train.batch_size",
    }
    text = str(info.value)
    assert text.splitlines()[0] == f"{path} has 11 problems:"
    assert "train.max_steps: got -5; must be a positive whole number, e.g. 1000" in text
    assert "trian: got {max_steps: 10}; unknown setting; did you mean 'train'?" in text
    assert "overflow" in problems["model.dtype"].message and problems["model.dtype"].hint == "write bf16 or fp32"
    assert problems["train.batch_size"].message == "must be a whole number, not true/false"
    assert problems["data.resolution"].message == "must be a whole number, 32 or more and a multiple of 32"
    assert problems["data.resolution"].hint == "e.g. 512"
    assert problems["adapter.lora.dropout"].message == "must be a number at least 0 and below 1"
    assert problems["optimizer.lr"].message == "must be a number above 0"
    assert problems["data.crop"].message == "must be one of: center, random"
    assert "not found" in problems["data.path"].message and "your own folder" in problems["data.path"].hint
    assert "not found" in problems["model.stage_c"].message
    assert validate_recipe_file(path) == info.value.problems  # the UI's entry point sees the same list


def test_lite_and_big_presets_need_weights_but_tiny_accepts_a_repo_id():
    problem = _by_path(_problems(_minimal(model={"preset": "lite"})))["model.stage_c"]
    assert "preset lite needs real weights" in problem.message
    assert "repo_id" in problem.hint
    recipe = load_recipe(_minimal(model={"preset": "tiny", "repo_id": "stabilityai/stable-cascade"}))
    assert recipe.model.repo_id == "stabilityai/stable-cascade"
    # A repo id is not a local path and is not looked up on disk; an id with a bad shape is still reported.
    assert load_recipe(_minimal(model={"preset": "big", "stage_c": "someone/their-stage-c"})).model.preset == "big"
    assert "repo id" in _by_path(_problems(_minimal(model={"repo_id": "not a repo"})))["model.repo_id"].message


def test_method_specific_rules():
    cnet = {"method": "controlnet", "controlnet": {"control": "image", "control_column": ""}}
    assert "control_column" in {p.path.split(".")[-1] for p in _problems(_minimal(adapter=cnet))}
    # The same empty column is fine when the control is computed from the image.
    load_recipe(_minimal(adapter={"method": "controlnet", "controlnet": {"control": "canny", "control_column": ""}}))
    ip = {"method": "ip_adapter", "ip_adapter": {"drop_image": 0.5, "drop_text": 0.4, "drop_both": 0.3}}
    assert "sum to 1.2" in _by_path(_problems(_minimal(adapter=ip)))["adapter.ip_adapter.drop_both"].message
    official = _by_path(_problems(_minimal(export={"formats": ["official"]})))["export.formats"]
    assert "ControlNet" in official.message
    peft = _by_path(_problems(_minimal(adapter={"method": "controlnet"}, export={"formats": ["peft"]})))
    assert "LoRA" in peft["export.formats"].message
    hub = _by_path(_problems(_minimal(data={"source": "hf_hub"})))
    assert set(hub) == {"data.name"}  # no data.path needed for a hub dataset


def test_problems_in_the_file_as_a_whole():
    with pytest.raises(RecipeError) as info:
        load_recipe_text("version: 1\nmodel:\n  preset: tiny\n   dtype: bf16\n")
    (problem,) = info.value.problems
    assert problem.path == "(file)" and "line 4, column 9" in problem.message
    assert _problems(["version", 1])[0].path == "(recipe)"
    with pytest.raises(RecipeError, match="top level of a recipe must be a mapping"):
        load_recipe_text("- version\n- 1\n")
    assert _problems(Path("recipes/does-not-exist.yaml"))[0].message.startswith("recipe file not found")
    missing = _by_path(_problems({"data": {"path": "datasets/tiny-shapes"}}))["version"]
    assert missing.value is MISSING and missing.hint == "add 'version: 1' at the top"
    assert "version 1 only" in _by_path(_problems(_minimal(version=2)))["version"].message


def test_misplaced_key_is_pointed_to_its_section():
    problem = _by_path(_problems(_minimal(lr=1e-3)))["lr"]
    assert problem.hint == "this setting belongs in optimizer.lr"


def test_misplaced_section_and_pickles_and_list_items():
    found = _problems(_minimal(lora={"rank": 4}, model={"stage_c": "/nonexistent/base.ckpt"},
                               preview={"prompts": ["ok", 3], "seeds": [0, -1]}))
    problems = _by_path(found)
    assert problems["lora"].hint == "this setting belongs in adapter.lora"
    stage_c = [p.message for p in found if p.path == "model.stage_c"]
    assert stage_c == ["is a pickle file, which can run code when it is loaded",
                       f"file or folder not found (relative paths start at {REPO})"]
    assert problems["preview.prompts[1]"].message == "must be text"
    assert problems["preview.seeds[1]"].message == "must be a whole number, 0 or more"
    allowed = _problems(_minimal(model={"stage_c": "/nonexistent/base.ckpt", "allow_pickle": True}))
    assert [p.message for p in allowed] == [f"file or folder not found (relative paths start at {REPO})"]


def test_yaml_1_1_pitfalls_are_read_as_meant():
    text = ("version: 1\ndata: {path: datasets/tiny-shapes}\noptimizer: {lr: 1e-4}\n"
            "train: {mixed_precision: no, quantize_base: no}\n")
    recipe = load_recipe_text(text)
    assert recipe.optimizer.lr == 1e-4 and recipe.train.mixed_precision == "no"
    assert recipe.train.quantize_base == "none"
    assert _by_path(_problems(_minimal(optimizer={"lr": "fast"})))["optimizer.lr"].message == "must be a number"


def test_name_defaults_to_the_file_stem(tmp_path: Path):
    path = tmp_path / "my-style.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    assert load_recipe(path).name == "my-style"


def test_validation_creates_nothing_on_disk(tmp_path: Path):
    os.chdir(tmp_path)
    try:
        data = _minimal(workspace="ws", cache={"dir": "ws/cache"}, export={"dir": "out"},
                        data={"path": str(REPO / "datasets/tiny-shapes")})
        recipe = load_recipe(data)
        recipe.tracking_uri({})  # resolving the default store must not create it either
        assert list(tmp_path.iterdir()) == []
    finally:
        os.chdir(REPO)


def test_webdataset_globs_expand_brace_ranges(tmp_path: Path):
    for i in range(3):
        (tmp_path / f"shard-{i:03d}.tar").write_bytes(b"")
    ok = _minimal(data={"source": "webdataset", "path": str(tmp_path / "shard-{000..002}.tar")})
    assert load_recipe(ok).data.source == "webdataset"
    bad = _minimal(data={"source": "webdataset", "path": str(tmp_path / "other-*.tar")})
    assert "no tar shard matches" in _by_path(_problems(bad))["data.path"].message


def test_tracking_uri_prefers_recipe_then_environment_then_workspace_sqlite(tmp_path):
    ws = tmp_path / "ws"
    recipe = load_recipe(_minimal(workspace=str(ws)))
    assert recipe.tracking_uri({}) == f"sqlite:///{ws}/mlflow.db"
    assert recipe.tracking_uri({"MLFLOW_TRACKING_URI": "http://x"}) == "http://x"
    explicit = load_recipe(_minimal(tracking={"uri": "file:///m"}))
    assert explicit.tracking_uri({"MLFLOW_TRACKING_URI": "h"}) == "file:///m"
    assert recipe.cache_dir == ws / "cache"


# ------------------------------------------------------------------------------------------------ overrides

def test_overrides_set_values_parsed_as_yaml():
    recipe = load_recipe("recipes/tiny/lora.yaml", ["train.max_steps=200", "preview.prompts=[a cat, a dog]",
                                                     "optimizer.lr=1e-3", "tracking.run_name=", "adapter.lora.rank=4"])
    assert recipe.train.max_steps == 200 and recipe.preview.prompts == ("a cat", "a dog")
    assert recipe.optimizer.lr == 1e-3 and recipe.tracking.run_name is None and recipe.adapter.lora.rank == 4


def test_bad_overrides_are_reported_with_the_rest():
    problems = _by_path(_problems("recipes/tiny/lora.yaml", (
        "train.max_step=3", "no-equals-sign", "train.max_steps.deeper=1", "train.batch_size=0", "bogus.key=1")))
    assert problems["train.max_step"].hint == "did you mean 'max_steps'?"
    assert "(from an override)" in problems["train.max_step"].message
    assert "(override 'no-equals-sign')" in problems
    assert "single setting" in problems["train.max_steps.deeper"].message
    assert problems["train.batch_size"].message == "must be a positive whole number"
    assert "bogus.key" in problems


def test_overrides_do_not_edit_the_callers_mapping():
    data = _minimal(train={"max_steps": 5})
    before = copy.deepcopy(data)
    assert load_recipe(data, ["train.max_steps=7"]).train.max_steps == 7
    assert data == before


# ---------------------------------------------------------------------------------------------- documentation

def test_every_field_is_documented_and_described():
    docs = describe_fields(Recipe)
    assert all(d.doc.strip() for d in docs)
    by_path = {d.path: d for d in docs}
    assert by_path["model.dtype"].choices == ("bf16", "fp32")
    assert by_path["data.path"].type == "path | null" and by_path["optimizer.betas"].default == [0.9, 0.999]
    assert {"train.max_steps", "adapter.ip_adapter.drop_both", "export.formats", "tracking.uri"} <= set(by_path)
    assert [d.path for d in describe_fields(LoraConfig)][:2] == ["rank", "alpha"]
    assert describe_fields(TrainConfig(), prefix="train.")[0].path == "train.max_steps"
    # Every dataclass field (leaf or section) carries a doc, so --help and tooltips never show a blank.
    stack: list[Any] = [Recipe]
    while stack:
        for f in dataclasses.fields(stack.pop()):
            assert f.metadata.get("doc"), f.name
            if isinstance(f.default_factory, type):  # type: ignore[misc]
                stack.append(f.default_factory)


def test_dump_writes_docs_as_comments():
    text = dump_recipe_yaml(load_recipe(_minimal()))
    assert "# Precision the frozen base model is held in." in text and "One of: bf16, fp32." in text
    assert "#" not in dump_recipe_yaml(load_recipe(_minimal()), with_comments=False)


def test_config_imports_no_torch():
    code = "import cascade_studio.config, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------ property tests

_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=12)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_SECTION_KEYS = ["version", "name", "workspace", "model", "adapter", "data", "cache", "optimizer", "schedule",
                 "train", "preview", "tracking", "export"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_SECTION_KEYS) | st.text(max_size=6), _values, max_size=6))
def test_random_mappings_only_ever_raise_recipe_error(data: dict):
    try:
        load_recipe(data)
    except RecipeError as err:
        assert err.problems and str(err)


def _leaf_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    if not isinstance(data, dict):
        return [prefix]
    paths = [prefix] if prefix else []
    for key, value in data.items():
        paths += _leaf_paths(value, prefix + (key,))
    return paths


@functools.lru_cache(maxsize=1)
def _base_recipe_dict() -> dict[str, Any]:
    """The tiny LoRA recipe as a dict; loaded lazily, once the fixture has moved to the repository root."""
    return recipe_to_dict(load_recipe(REPO / "recipes/tiny/lora.yaml"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_mutations_of_a_good_recipe_only_ever_raise_recipe_error(data: st.DataObject):
    mutated = copy.deepcopy(_base_recipe_dict())
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(_leaf_paths(mutated) or [("train",)]))
        parent = mutated
        for key in path[:-1]:
            parent = parent[key] if isinstance(parent.get(key), dict) else {}
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(_values)
        else:
            parent.pop(path[-1], None)
    overrides = data.draw(st.lists(st.text(max_size=20), max_size=2))
    try:
        recipe = load_recipe(mutated, overrides)
    except RecipeError as err:
        assert err.problems and str(err)
    else:
        assert load_recipe_text(dump_recipe_yaml(recipe)) == recipe


def test_a_section_or_key_written_twice_is_reported_with_every_other_problem():
    """Plain YAML keeps the last of two equal keys without a word (issue 17, item 4)."""
    text = ("version: 1\nmodel:\n  preset: tiny\n  preset: toy\nadapter: {method: lora}\n"
            "data: {path: datasets/tiny-shapes}\ntrain:\n  max_steps: 10\ntrain:\n  max_steps: 0\n")
    with pytest.raises(RecipeError) as err:
        load_recipe_text(text)
    problems = _by_path(err.value.problems)
    assert set(problems) == {"model.preset", "train", "train.max_steps"}
    assert "lines 3 and 4" in problems["model.preset"].message and problems["model.preset"].value == ["tiny", "toy"]
    assert "lines 7 and 9" in problems["train"].message
    # without the repetition the same text is a valid recipe
    load_recipe_text(text.replace("  preset: toy\n", "").replace("train:\n  max_steps: 10\n", "").replace(
        "max_steps: 0", "max_steps: 10"))


def test_missing_sample_data_path_hint_does_not_suggest_the_same_path(tmp_path, monkeypatch):
    """Run from another folder, the recipes' datasets/tiny-shapes is not found: the hint must not suggest it."""
    monkeypatch.chdir(tmp_path)
    problem = _by_path(_problems({"data": {"path": "datasets/tiny-shapes"}}))["data.path"]
    assert "not found" in problem.message
    assert "e.g. datasets/tiny-shapes" not in problem.hint and "repository root" in problem.hint


@pytest.mark.parametrize("name", ["a/b", "a\\b", ".."])
def test_a_run_name_that_is_not_a_folder_name_is_refused_in_words_markdown_keeps(name):
    """The studio shows messages as Markdown, which ate the backslash of "contain / or \\" (issue 18 item 7)."""
    problem = _by_path(_problems(_minimal(name=name)))["name"]
    assert "slash" in problem.message and "backslash" in problem.message and "\\" not in problem.message


def test_settings_the_trainer_does_not_apply_yet_are_refused_not_ignored():
    """data.buckets and random crops were accepted and silently did nothing (every image trained as a center crop
    of the square resolution); now each says so and what to write."""
    problems = _by_path(_problems(_minimal(), ("data.buckets=true", "data.crop=random")))
    assert "not applied by the trainer yet" in problems["data.buckets"].message
    assert "data.buckets: false" in problems["data.buckets"].hint
    assert "center" in problems["data.crop"].hint
    assert load_recipe(_minimal(), ("data.buckets=false", "data.crop=center")).data.buckets is False
