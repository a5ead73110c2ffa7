"""A default lives in the recipe schema only (issue 16, "typed config all the way down").

The loop and the trainer's components take the schema's own sections (``LoopSettings.from_recipe(recipe)``,
``BaseModels(recipe.model)``, ``build_optimizer(params, recipe.optimizer)``, ``build_scheduler(optimizer,
recipe.schedule, ...)``) and state no default of their own for anything the schema defines. These tests compare
what they use with the schema's defaults, carry a recipe whose every value differs from its default through each
of them, and fail when a default is re-stated below the schema (as ``LoopSettings.caption_dropout = 0.0`` against
the schema's 0.05 once was).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import re
import typing
from pathlib import Path

import pytest
import torch

from cascade_studio.config.schema import (OptimizerConfig, Recipe, ScheduleConfig, describe_fields, get_setting,
                                          is_section, section_types)
from cascade_studio.trainers.components import BaseModels, resolve_dtype
from cascade_studio.trainers.loop import LoopSettings
from cascade_studio.trainers.optim import OPTIMIZERS, build_optimizer, build_scheduler, lr_multiplier

PACKAGE = Path(__file__).resolve().parents[1] / "cascade_studio"
SCHEMA_DEFAULTS = {d.path: d.default for d in describe_fields(Recipe)}
# LoopSettings fields named differently from the recipe setting they carry; every other schema-backed field is
# train.<same name>.
RENAMED = {"caption_dropout": "data.caption_dropout", "preview_every": "preview.every"}
# LoopSettings fields that are not recipe settings, and where they come from.
DERIVED = {"c_clip_img": "the base Stage C's preset"}
# The sections the trainer reads; a parameter named after one of their fields must not carry a default.
TRAINER_SECTIONS = ("model", "data", "optimizer", "schedule", "train", "preview")
TRAINER_MODULES = ("loop", "components", "optim", "steps", "previews", "features")
# Parameters that share a name with a schema field but mean something else (and why).
NOT_SCHEMA_SETTINGS = {
    ("components", "make_random_base_learnable", "seed"): "the random base's init seed, not train.seed",
}


def loop_source(name: str) -> str | None:
    """The recipe setting LoopSettings field ``name`` carries (None for a derived field)."""
    if name in DERIVED:
        return None
    return RENAMED.get(name, f"train.{name}")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _changed(value, tp, meta, counter) -> object:
    """A value of type ``tp`` that differs from the default ``value`` (and from every other changed value)."""
    n = next(counter)
    if typing.get_origin(tp) is typing.Union:  # Optional[X] with default None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if meta.get("choices") and not meta.get("open_choices") and tp is str:
        return next(c for c in meta["choices"] if c != value)
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        size = len(value) if value else 1
        return tuple(_changed(None, item, {}, counter) for _ in range(size))
    if tp is bool:
        return not value
    if tp is int:
        return 10_000 + n
    if tp is float:
        return n + 0.25
    if tp is str:
        return f"changed-{n}"
    raise AssertionError(f"no changed value for type {tp}")


def all_changed(section, counter=None):
    """``section`` with every leaf setting changed from its default (nested sections too)."""
    counter = counter or itertools.count(1)
    hints = section_types(type(section))
    changes = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if is_section(hints[f.name]):
            changes[f.name] = all_changed(value, counter)
        else:
            changes[f.name] = _changed(value, hints[f.name], f.metadata, counter)
    return dataclasses.replace(section, **changes)


CHANGED = all_changed(Recipe())


def test_the_changed_recipe_differs_from_the_schema_in_every_setting():
    same = [path for path, default in SCHEMA_DEFAULTS.items() if _plain(get_setting(CHANGED, path)) == default]
    assert not same, same


# ------------------------------------------------------------------------------------------------ the loop
def test_loop_settings_have_no_defaults_of_their_own():
    fields = dataclasses.fields(LoopSettings)
    unknown = [f.name for f in fields if f.name not in DERIVED and loop_source(f.name) not in SCHEMA_DEFAULTS]
    assert not unknown, f"LoopSettings fields with no recipe setting behind them: {unknown} (name the setting " \
                        "in RENAMED, or the source in DERIVED)"
    shadowing = []
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is dataclasses.MISSING:
            continue
        source = loop_source(f.name)
        if source is None:
            shadowing.append(f"LoopSettings.{f.name} = {default!r} (derived from {DERIVED[f.name]})")
            continue
        schema = SCHEMA_DEFAULTS[source]
        shadowing.append(f"LoopSettings.{f.name} = {default!r} (schema {source}: {schema!r}"
                         + (", DIFFERENT)" if schema != default else ")"))
    assert not shadowing, "defaults re-stated below the schema:\n" + "\n".join(shadowing)


def test_loop_settings_carry_every_value_of_the_recipe():
    # train.global_batch, when set, decides the accumulation instead of train.grad_accum (checked below)
    recipe = dataclasses.replace(CHANGED, train=dataclasses.replace(CHANGED.train, global_batch=None))
    settings = LoopSettings.from_recipe(recipe, c_clip_img=7)
    for f in dataclasses.fields(LoopSettings):
        source = loop_source(f.name)
        expected = 7 if source is None else get_setting(recipe, source)
        assert getattr(settings, f.name) == expected, (f.name, source)
    per_step = dataclasses.replace(CHANGED.train, grad_accum=1, global_batch=CHANGED.train.batch_size * 6)
    recipe = dataclasses.replace(CHANGED, train=per_step)
    assert LoopSettings.from_recipe(recipe, c_clip_img=7, processes=3).grad_accum == 2


def test_loop_settings_of_the_default_recipe_are_the_schemas_defaults():
    settings = LoopSettings.from_recipe(Recipe(), c_clip_img=7)
    effective = {loop_source(f.name): getattr(settings, f.name) for f in dataclasses.fields(LoopSettings)
                 if loop_source(f.name)}
    assert effective == {path: SCHEMA_DEFAULTS[path] for path in effective}  # caption_dropout once was not


# ------------------------------------------------------------------------------------------ the components
def test_base_models_read_the_model_section():
    default = BaseModels(Recipe().model)
    assert default.preset_name == SCHEMA_DEFAULTS["model.preset"]
    assert default.dtype == resolve_dtype(SCHEMA_DEFAULTS["model.dtype"])  # bf16, where BaseModels said fp32
    changed = BaseModels(CHANGED.model)
    assert (changed.preset_name, changed.dtype) == (CHANGED.model.preset, resolve_dtype(CHANGED.model.dtype))
    spec = changed.components.spec  # the one model loader gets the section's sources
    assert (spec.preset, spec.stage_c, spec.repo_id) == (CHANGED.model.preset, CHANGED.model.stage_c,
                                                         CHANGED.model.repo_id)
    only_repo = BaseModels(dataclasses.replace(CHANGED.model, stage_c=None))
    assert only_repo.components.spec.source("stage_c") == CHANGED.model.repo_id


def test_components_refuse_dicts_that_would_bring_their_own_defaults():
    # A dict without "dtype" used to give an fp32 base (the schema says bf16), one without "lr" a rate of 1e-4.
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="ModelConfig"):
        BaseModels({"preset": "tiny"})
    with pytest.raises(TypeError, match="OptimizerConfig"):
        build_optimizer(params, {"name": "adamw"})
    optimizer = build_optimizer(params, OptimizerConfig(name="adamw"))
    with pytest.raises(TypeError, match="ScheduleConfig"):
        build_scheduler(optimizer, {"name": "constant"}, 10)


def _group(optimizer) -> dict:
    return optimizer.param_groups[0]


def optimizer_class(name: str) -> type:
    import bitsandbytes as bnb
    from transformers.optimization import Adafactor

    return {"adamw8bit": bnb.optim.AdamW8bit, "adamw": torch.optim.AdamW, "lion8bit": bnb.optim.Lion8bit,
            "adafactor": Adafactor}[name]


def test_optimizer_of_the_default_recipe_uses_the_schemas_values():
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(300))], Recipe().optimizer)
    assert type(optimizer) is optimizer_class(SCHEMA_DEFAULTS["optimizer.name"])
    group = _group(optimizer)
    assert {key: _plain(group[key]) for key in ("lr", "weight_decay", "betas", "eps")} == \
        {key: SCHEMA_DEFAULTS[f"optimizer.{key}"] for key in ("lr", "weight_decay", "betas", "eps")}


def test_optimizer_carries_every_value_of_its_section():
    cfg = dataclasses.replace(CHANGED.optimizer, name="adamw", betas=(0.8, 0.95))  # betas must be < 1 for torch
    group = _group(build_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg))
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == \
        (cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    for name in OPTIMIZERS:  # every optimizer the schema offers is the one named, at the section's rate and decay
        optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(300))],
                                    OptimizerConfig(name=name, lr=3e-3, weight_decay=0.02))
        assert type(optimizer) is optimizer_class(name)
        assert (_group(optimizer)["lr"], _group(optimizer)["weight_decay"]) == (3e-3, 0.02), name


def test_schedule_follows_its_section():
    def rates(schedule: ScheduleConfig, total: int) -> list[float]:
        optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimizerConfig(name="adamw", lr=1.0))
        scheduler = build_scheduler(optimizer, schedule, total)
        out = []
        for _ in range(total):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    assert rates(Recipe().schedule, 5) == [1.0] * 5  # the schema's constant schedule without warmup
    changed = ScheduleConfig(name="linear", warmup_steps=2)
    assert changed != Recipe().schedule
    assert rates(changed, 6) == pytest.approx([lr_multiplier(s, 6, "linear", 2) for s in range(6)])
    assert rates(changed, 6)[:2] == [0.5, 1.0]


# ------------------------------------------------------------------------------- nothing re-states a default
def _callables(module):
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            yield name, obj
            for attr, member in vars(obj).items():
                function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if inspect.isfunction(function) and attr != "__init__":
                    yield f"{name}.{attr}", function


def test_no_trainer_parameter_restates_a_schema_default():
    names = {path.split(".")[-1]: path for path in SCHEMA_DEFAULTS if path.split(".")[0] in TRAINER_SECTIONS}
    found = []
    for module_name in TRAINER_MODULES:
        module = importlib.import_module(f"cascade_studio.trainers.{module_name}")
        for qualname, obj in _callables(module):
            try:
                parameters = inspect.signature(obj).parameters.values()
            except (TypeError, ValueError):
                continue
            for p in parameters:
                if p.name not in names or p.default in (inspect.Parameter.empty, None):
                    continue
                if (module_name, qualname, p.name) in NOT_SCHEMA_SETTINGS:
                    continue
                found.append(f"{module_name}.{qualname}({p.name}={p.default!r}): the schema's {names[p.name]} "
                             f"is {SCHEMA_DEFAULTS[names[p.name]]!r}")
    assert not found, "pass the recipe's value instead of a default of its own:\n" + "\n".join(found)


# Every caller reads the typed sections (issue 16 item 4): no dict-or-attribute reader with defaults of its own.
def test_no_dict_or_attribute_get_helper():
    helper = re.compile(r"^\s*def _get\(", re.MULTILINE)
    found = [path.relative_to(PACKAGE).as_posix() for path in sorted(PACKAGE.rglob("*.py"))
             if helper.search(path.read_text())]
    assert not found, f"read the typed section's attributes instead of a _get(cfg, key, default) helper: {found}"
