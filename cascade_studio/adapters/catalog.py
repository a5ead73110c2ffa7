"""The catalog of adapter methods: what each method is, registered once, readable without torch.

A method lives in one folder, ``adapters/<name>/``: its torch-free ``config.py`` declares the method's recipe
section and registers one :class:`Method` record here; the module the record names (``method.py`` for the
built-in methods) holds the torch side: create, export, load, sniff, training inputs, generation inputs. Recipe
validation, the CLI, the studio's forms and pages, export, the planner and inference learn which methods and
export formats exist from this catalog and nowhere else (the layout of peft's ``tuners/<method>/``, each
registered once).

Methods come from the built-in import list :data:`BUILTIN_METHODS` (the folders of ``adapters/`` with a
``config.py``), then from installed packages' entry points
in the ``cascade_studio.methods`` group and from the ``CASCADE_STUDIO_METHODS`` environment variable
(comma-separated module names); each such module is imported once and registers its record. A recipe only
names a registered method: it never carries an import path (config is data, not code).
"""
from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Optional

__all__ = ["BUILTIN_METHODS", "PLUGIN_ENV", "ENTRY_POINT_GROUP", "ExportFormat", "CommandLine", "Method", "register", "methods",
           "names", "get", "by_alias", "all_formats", "recipe_method", "method_section", "control_column",
           "export_formats", "format_help"]

# The order the first built-in methods are listed in (CLI flags, the studio's forms); any other folder is after them.
_LISTED_FIRST = ("lora", "controlnet", "ip_adapter")


def _builtin_methods() -> tuple[str, ...]:
    """The built-in methods: every folder of ``adapters/`` holding a ``config.py`` (which registers its record),
    so a new method is one new folder and no edit here."""
    from pathlib import Path

    folders = sorted(path.parent.name for path in Path(__file__).resolve().parent.glob("*/config.py"))
    return tuple(n for n in _LISTED_FIRST if n in folders) + tuple(n for n in folders if n not in _LISTED_FIRST)


# The catalog's import list: the built-in methods' folders (each has a config.py that registers its record).
BUILTIN_METHODS = _builtin_methods()
PLUGIN_ENV = "CASCADE_STUDIO_METHODS"
ENTRY_POINT_GROUP = "cascade_studio.methods"


@dataclass(frozen=True)
class ExportFormat:
    """One file layout a method can export: its name in ``export.formats``, what it is and who loads it."""

    name: str
    doc: str
    folder: bool = False  # written as a folder (e.g. PEFT's adapter_model.safetensors + adapter_config.json)

    def target(self, folder: Any, stem: str) -> Any:
        """Where a run exports this format: ``<folder>/<stem>-<format>`` (+ ``.safetensors`` for a file)."""
        return folder / (f"{stem}-{self.name}" + ("" if self.folder else ".safetensors"))


@dataclass(frozen=True)
class CommandLine:
    """A method's options on ``cascade-studio generate`` / ``compare`` (argparse, torch-free).

    ``add_generate(parser)`` adds its adapter flag(s) to generate (``--lora FILE``); ``add_inputs(parser,
    repeat)`` its inputs on both commands (``--control IMAGE``, repeatable on generate); ``settings(args)`` the
    spec settings those inputs give every adapter spec that leaves them unset; ``specs(args, parse)`` the specs
    of its own flags, where ``parse(text, **settings)`` is the spec parser.
    """

    add_generate: Callable[[Any], None]
    specs: Callable[[Any, Callable[..., Any]], list]
    add_inputs: Optional[Callable[[Any, bool], None]] = None
    settings: Callable[[Any], dict] = field(default=lambda args: {})


# A relation rule of a method's section: (section, recipe, ok(*paths) -> bool, add(path, value, message, hint)).
Check = Callable[[Any, Any, Callable[..., bool], Callable[..., None]], None]


@dataclass(frozen=True)
class Method:
    """Everything the rest of the studio knows about one adapter method.

    ``config`` is the method's recipe section (``adapter.<name>``); ``formats`` the layouts it exports, the first
    one the default; ``implementation`` the module with the torch side, imported on first use (see
    :meth:`load`). ``aliases`` are extra spellings in adapter specs (``cn:canny.safetensors``); ``short`` names
    it in grid labels; ``weight_name`` / ``weight_prefix`` say what an adapter spec's ``@WEIGHT`` is for it
    (``x0.8``, ``strength 0.7``). ``check`` adds the section's cross-field rules to validation;
    ``control_column`` returns the data column / sidecar suffix of pre-made control images the method reads
    from the dataset (None: it needs none); ``command_line`` its options on generate and compare. ``kind_of``
    names methods whose files this method's files also are (an LCM-LoRA file is a LoRA file): a spec or flag
    asking for one of them (``lora:``, ``--lora``) accepts this method's files, which still load through this
    method.
    """

    name: str
    label: str
    doc: str
    config: type
    formats: tuple[ExportFormat, ...]
    implementation: str
    aliases: tuple[str, ...] = ()
    short: str = ""
    weight_name: str = "weight"
    weight_prefix: str = "x"
    check: Optional[Check] = None
    control_column: Callable[[Any], Optional[str]] = field(default=lambda section: None)
    command_line: Optional[CommandLine] = None
    kind_of: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"adapter method name {self.name!r} must be a Python identifier (it is a recipe "
                             "section name)")
        if not self.formats:
            raise ValueError(f"adapter method {self.name!r} declares no export format")
        if not self.short:
            object.__setattr__(self, "short", self.name)

    @property
    def format_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.formats)

    @property
    def default_format(self) -> ExportFormat:
        return self.formats[0]

    def export_format(self, name: str) -> ExportFormat:
        for fmt in self.formats:
            if fmt.name == name:
                return fmt
        raise ValueError(f"a {self.label} cannot be exported as {name!r}; it exports as "
                         f"{format_help(self)}")

    def load(self) -> ModuleType:
        """The torch side (imported on first use, so reading recipes never imports torch)."""
        return importlib.import_module(self.implementation)

    def hook(self, name: str) -> Optional[Callable[..., Any]]:
        """One optional function of the torch side (e.g. ``training_inputs``), or None when it has none."""
        return getattr(self.load(), name, None)


_REGISTRY: dict[str, Method] = {}
_LOCK = threading.RLock()
_LOADED = False


def register(method: Method) -> Method:
    """Add a method record (its config module calls this once at import). A second, different record under the
    same name is refused: two folders claiming one recipe section would make recipes ambiguous."""
    with _LOCK:
        known = _REGISTRY.get(method.name)
        if known is not None and known != method and known.implementation != method.implementation:
            raise ValueError(f"adapter method {method.name!r} is registered twice ({known.implementation} and "
                             f"{method.implementation}); rename one")
        _REGISTRY[method.name] = method
    return method


def _plugin_modules() -> list[str]:
    found = [name.strip() for name in os.environ.get(PLUGIN_ENV, "").split(",") if name.strip()]
    try:
        from importlib.metadata import entry_points

        found += [entry.value for entry in entry_points(group=ENTRY_POINT_GROUP)]
    except Exception:  # a broken distribution's metadata must not stop the built-in methods from loading
        pass
    return found


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        for name in BUILTIN_METHODS:
            importlib.import_module(f"cascade_studio.adapters.{name}.config")
        for module in _plugin_modules():
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ImportError(f"adapter method plugin {module!r} (from ${PLUGIN_ENV} or the "
                                  f"{ENTRY_POINT_GROUP} entry points) cannot be imported: {exc}") from exc
        _LOADED = True


def methods() -> tuple[Method, ...]:
    """Every registered method: the built-in ones in ``BUILTIN_METHODS`` order (whatever imported their config
    modules first), then the others in registration order."""
    _load_all()
    rank = {name: index for index, name in enumerate(BUILTIN_METHODS)}
    return tuple(sorted(_REGISTRY.values(), key=lambda m: rank.get(m.name, len(rank))))


def names() -> tuple[str, ...]:
    return tuple(method.name for method in methods())


def get(name: str) -> Method:
    """The record of ``name``; an unknown name raises ValueError listing the registered ones."""
    for method in methods():
        if method.name == name:
            return method
    raise ValueError(f"unknown adapter method {name!r}; choose one of {', '.join(names())}")


def by_alias(text: str) -> Optional[Method]:
    """The method a spec prefix names (its name or an alias, any case), else None."""
    text = text.lower()
    for method in methods():
        if text == method.name or text in method.aliases:
            return method
    return None


def all_formats() -> tuple[str, ...]:
    """Every export format some method has, in first-seen order (the schema's choices)."""
    seen: dict[str, None] = {}
    for method in methods():
        for fmt in method.formats:
            seen.setdefault(fmt.name, None)
    return tuple(seen)


def format_help(method: Method) -> str:
    """``comfyui (kohya-style keys ComfyUI loads), peft (a PEFT folder)``: one method's formats in words."""
    return ", ".join(f"{fmt.name} ({fmt.doc})" for fmt in method.formats)


def recipe_method(recipe: Any) -> Method:
    """The record of the method a recipe trains."""
    return get(recipe.adapter.method)


def method_section(recipe: Any) -> Any:
    """The recipe's section of its own method (``recipe.adapter.<method>``)."""
    return getattr(recipe.adapter, recipe.adapter.method)


def control_column(recipe: Any) -> Optional[str]:
    """The dataset column / sidecar suffix of pre-made control images the recipe's method reads (None: none)."""
    return recipe_method(recipe).control_column(method_section(recipe))


def export_formats(recipe: Any) -> tuple[str, ...]:
    """The formats a run exports: ``export.formats`` as written, else its method's default format."""
    formats = recipe.export.formats
    return tuple(formats) if formats is not None else (recipe_method(recipe).default_format.name,)
