"""Recipes: the typed, versioned, documented training configuration (imports no torch).

``load_recipe("recipes/tiny/lora.yaml", ["train.max_steps=20"])`` returns a frozen :class:`Recipe` or raises one
:class:`RecipeError` listing every problem. The field docs feed ``--help``, YAML comments and UI tooltips through
:func:`describe_fields`.
"""
from .errors import MISSING, Problem, RecipeError
from .loader import load_recipe, load_recipe_text, parse_override, validate_recipe_file
from .schema import (
    LORA_TARGET_GROUPS,
    SCHEMA_VERSION,
    AdapterConfig,
    CacheConfig,
    ControlNetConfig,
    DataConfig,
    ExportConfig,
    FieldDoc,
    IPAdapterConfig,
    LoraConfig,
    ModelConfig,
    OptimizerConfig,
    PreviewConfig,
    Recipe,
    ScheduleConfig,
    TrackingConfig,
    TrainConfig,
    describe_fields,
    dump_recipe_yaml,
    get_setting,
    recipe_to_dict,
)

__all__ = [
    "MISSING", "Problem", "RecipeError", "load_recipe", "load_recipe_text", "parse_override",
    "validate_recipe_file", "LORA_TARGET_GROUPS", "SCHEMA_VERSION", "AdapterConfig", "CacheConfig",
    "ControlNetConfig", "DataConfig", "ExportConfig", "FieldDoc", "IPAdapterConfig", "LoraConfig", "ModelConfig",
    "OptimizerConfig", "PreviewConfig", "Recipe", "ScheduleConfig", "TrackingConfig", "TrainConfig",
    "describe_fields", "dump_recipe_yaml", "get_setting", "recipe_to_dict",
]
