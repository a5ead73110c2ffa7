"""Recipes: the typed, versioned, documented training configuration (imports no torch).

``load_recipe("recipes/tiny/lora.yaml", ["train.max_steps=20"])`` returns a frozen :class:`Recipe` or raises one
:class:`RecipeError` listing every problem. The field docs feed ``--help``, YAML comments and UI tooltips through
:func:`describe_fields`.

The names below are imported on first use: an adapter method's ``config.py`` declares its section with
:func:`~.fields.setting` while the schema, which gathers every method's section, is still being built.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "errors": ("MISSING", "Problem", "RecipeError"),
    "loader": ("load_recipe", "load_recipe_text", "parse_override", "validate_recipe_file"),
    "schema": ("SCHEMA_VERSION", "AdapterConfig", "CacheConfig", "DataConfig", "ExportConfig", "FieldDoc",
               "ModelConfig", "OptimizerConfig", "PreviewConfig", "Recipe", "ScheduleConfig", "TrackingConfig",
               "TrainConfig", "describe_fields", "dump_recipe_yaml", "get_setting", "recipe_to_dict"),
}
__all__ = [name for names in _EXPORTS.values() for name in names]


__getattr__ = lazy_exports(__name__, _EXPORTS)
