"""Side-by-side comparison: one grid of columns (base, adapters, runs, checkpoints) by rows (prompts x seeds).

Only the adapter may differ between the cells of a row, so everything else is shared: the base Stage C is
loaded once and adapters are added and removed per column (never a reload; a removed adapter leaves the base
bit-identical), prompts are encoded once, and the Stage C starting noise of a row is ``initial_noise(shape,
seed)`` in every column.

Batching: one sampling call takes one seed and up to ``max_batch`` prompts, i.e. exactly the batch a
``cascade-studio generate --prompt P1 --prompt P2 ... --seed S`` call samples. That is what makes every base
cell pixel-identical to ``generate``: the sampler's step noise comes from one generator per call and its CFG
rescale (``rho``) uses the standard deviation of the whole batch, so stacking rows with *different* seeds into
one call would change every image. ``max_batch=1`` samples each cell alone (= ``generate --prompt P --seed S``).
Each row's ``batch_prompts`` in the manifest says which call it belongs to.

Outputs in ``out_dir``: ``grid.png`` (labelled), ``cells/r{row}_c{col}.png``, ``manifest.json`` and
``manifest.csv``. The CLI (``cascade-studio compare``) is a thin layer over :func:`run_compare`.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from cascade_studio.adapters.base import AdaptedStageC
from cascade_studio.diffusion.samplers import DEFAULT_SAMPLER, get_sampler, sampler_names
from cascade_studio.devices import to_host
from cascade_studio.models.presets import get_preset
from cascade_studio.inference.adapters import (AdapterInputs, AdapterSpec, ResolvedAdapter, adapter_context,
                                               load_adapters, parse_adapter_spec, remove_adapters, resolve_adapter)
from cascade_studio.inference.grid import make_grid
from cascade_studio.inference.pipeline import (CascadeComponents, GenerateSettings, ModelSpec, decode_latents,
                                               encode_prompts, sample_stage_c, stages_needed)

__all__ = ["CompareSettings", "CompareResult", "Column", "COLUMN_SYNTAX", "parse_column", "run_compare", "DECODERS"]

DECODERS = ("previewer", "cascade")
BASE = "base"
# A column's own sampling settings follow its text after this separator (``lora:lcm.safetensors::lcm,steps=4``).
SAMPLING_SEPARATOR = "::"
# The settings a column may carry, by the name written after ``::`` and the GenerateSettings field each sets.
COLUMN_SETTINGS = {"sampler": "sampler", "steps": "steps_c", "cfg": "cfg_c"}
COLUMN_SYNTAX = f"""\
Column: base | SPEC[+SPEC...] [::SETTING[,SETTING...]]
  SPEC     an adapter spec (below); '+' joins several adapters into one column
  SETTING  sampler=NAME, steps=N or cfg=X (Stage C) for this column only, instead of --sampler/--steps/--cfg;
           a bare NAME is the sampler. Samplers: {', '.join(sampler_names())}
  Every row still starts from the same noise in every column, so a grid can put the base at 20 guided steps
  beside an LCM-LoRA at 4 unguided ones: --columns base::steps=20 lora:lcm.safetensors::lcm,steps=4"""
COMPARE_EXPERIMENT = "compare"
COMPARED_RUNS_TAG = "cascade_studio.compared_runs"


@dataclass
class CompareSettings:
    """Everything one comparison needs. ``columns`` are ``"base"`` or adapter specs (``SPEC_SYNTAX``); join
    several adapters into one column with ``+`` (``lora:a.safetensors+cn:canny.safetensors``), and give a column
    its own Stage C sampler, steps or guidance after ``::`` (``COLUMN_SYNTAX``: ``lora:lcm.safetensors::lcm,steps=4``;
    ``sampler`` / ``steps_c`` / ``cfg_c`` are the other columns').

    ``control`` / ``control_mode`` / ``image_prompts`` / ``ip_multi`` apply to every ControlNet / IP-Adapter
    column. ``width`` / ``height`` / ``dtype`` / ``decoder`` default by preset (decoder: the previewer on
    tiny/toy, the full Stage B + A cascade on big/lite). ``max_batch``: prompts sampled together per seed (see
    the module docstring). ``mlflow`` logs grid + manifest as a run of experiment ``compare`` tagged with the
    compared runs' ids. ``save_latents`` also writes every cell's Stage C latents (``latents.safetensors``, key
    ``r{row}_c{col}``), to measure adapter effects without the decoder in between.
    """

    columns: Sequence[str | AdapterSpec | Sequence[AdapterSpec]]
    prompts: Sequence[str]
    seeds: Sequence[int] = (0,)
    out_dir: str | Path = "compare"
    model: ModelSpec = field(default_factory=ModelSpec)
    negative_prompt: str = ""
    sampler: str = DEFAULT_SAMPLER
    steps_c: int = 20
    cfg_c: float = 4.0
    shift_c: float = 2.0
    steps_b: int = 10
    cfg_b: float = 1.1
    width: int | None = None
    height: int | None = None
    dtype: str | None = None
    decoder: str | None = None
    control: str | None = None
    control_mode: str | None = None
    image_prompts: Sequence[str] = ()
    ip_multi: str = "average"
    ip_image_encoder: str | None = None
    max_batch: int = 8
    workspace: str | Path = "workspace"
    tracking_uri: str | None = None
    mlflow: bool = False
    device: str | None = None
    force: bool = False  # load adapters trained on another base (their fingerprints differ)
    progress: bool = True
    save_latents: bool = False

    def resolved_decoder(self) -> str:
        decoder = self.decoder or ("previewer" if get_preset(self.model.preset).built_in else "cascade")
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r}: use one of {DECODERS}")
        return decoder

    def generate_settings(self, prompts: Sequence[str], seed: int) -> GenerateSettings:
        """The GenerateSettings of one sampling call (what ``generate`` would be given for these cells)."""
        size = get_preset(self.model.preset).generate_resolution
        kwargs: dict[str, Any] = dict(
            prompt=list(prompts), negative_prompt=self.negative_prompt, seed=int(seed), sampler=self.sampler,
            steps_c=self.steps_c,
            cfg_c=self.cfg_c, shift_c=self.shift_c, steps_b=self.steps_b, cfg_b=self.cfg_b,
            width=self.width or size, height=self.height or size, batch=1,
            preview=self.resolved_decoder() == "previewer")
        if self.dtype:
            kwargs["dtype"] = self.dtype
        return GenerateSettings(**kwargs)


@dataclass
class CompareResult:
    """Where a comparison's outputs are; ``cells[row][col]`` are the per-cell PNGs."""

    grid_path: Path
    cells: list[list[Path]]
    manifest_path: Path
    mlflow_run_id: str | None = None
    csv_path: Path | None = None


@dataclass
class Column:
    """One column: a label, its adapters (none for the base) and its own sampling settings (GenerateSettings
    field -> value; empty: the comparison's)."""

    text: str
    adapters: list[ResolvedAdapter]
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        label = " + ".join(a.label for a in self.adapters) if self.adapters else BASE
        if self.sampling:
            words = [self.sampling["sampler"]] if "sampler" in self.sampling else []
            if "steps_c" in self.sampling:
                words.append(f"{self.sampling['steps_c']} steps")
            if "cfg_c" in self.sampling:
                words.append(f"cfg {self.sampling['cfg_c']:g}")
            label += f" [{', '.join(words)}]"
        return label

    def settings(self, settings: GenerateSettings) -> GenerateSettings:
        """``settings`` with this column's own sampling settings applied."""
        return replace(settings, **self.sampling) if self.sampling else settings


def parse_sampling(text: str, column: str) -> dict[str, Any]:
    """A column's ``::`` settings (``lcm,steps=4``, ``sampler=ddim,cfg=2``) as GenerateSettings fields, checked
    now so a typo fails before any model loads."""
    sampling: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key, value = (key.strip(), value.strip()) if eq else ("sampler", key.strip())
        if key not in COLUMN_SETTINGS:
            raise ValueError(f"column {column!r}: unknown setting {key!r} after '{SAMPLING_SEPARATOR}'; use "
                             f"{', '.join(f'{k}=...' for k in COLUMN_SETTINGS)} (e.g. {SAMPLING_SEPARATOR}lcm,steps=4)")
        try:
            if key == "sampler":
                parsed: Any = get_sampler(value).name
            elif key == "steps":
                parsed = int(value)
                if parsed < 1:
                    raise ValueError
            else:
                parsed = float(value)
        except ValueError:
            what = {"sampler": f"one of {', '.join(sampler_names())}", "steps": "a whole number of at least 1",
                    "cfg": "a number"}[key]
            raise ValueError(f"column {column!r}: {key}={value!r} must be {what}") from None
        sampling[COLUMN_SETTINGS[key]] = parsed
    return sampling


@dataclass
class _Call:
    """One sampling call: a seed and the rows (prompts) it samples together."""

    seed: int
    rows: list[int]
    prompts: list[str]


def parse_column(column: str | AdapterSpec | Sequence[AdapterSpec], settings: CompareSettings) -> Column:
    """Resolve one column (``"base"``, a spec string with ``+`` joins, or AdapterSpecs) to files on disk."""
    defaults = dict(control=settings.control, control_mode=settings.control_mode,
                    image_prompts=tuple(settings.image_prompts) or None, multi_image=settings.ip_multi)
    sampling: dict[str, Any] = {}
    if isinstance(column, str):
        text = column.strip()
        adapters_text, separator, settings_text = text.partition(SAMPLING_SEPARATOR)
        if separator:
            sampling = parse_sampling(settings_text, text)
            adapters_text = adapters_text.strip()
        if adapters_text.lower() == BASE:
            return Column(text if separator else BASE, [], sampling)
        specs = [parse_adapter_spec(part, **defaults) for part in adapters_text.split("+")]
    else:
        specs = [column] if isinstance(column, AdapterSpec) else list(column)
        specs = [spec.with_defaults(**defaults) for spec in specs]
        text = "+".join(spec.text or spec.source for spec in specs) or BASE
    for spec in specs:
        if spec.merge:
            raise ValueError(f"column {text!r}: merged LoRAs cannot be compared (unmerging is exact only up to "
                             "float rounding, so later columns would drift from the base); drop --merge-lora")
    return Column(text, [resolve_adapter(spec, settings.workspace, settings.tracking_uri) for spec in specs],
                  sampling)


def _calls(settings: CompareSettings) -> tuple[list[tuple[str, int]], list[_Call]]:
    """Rows (prompt, seed) in prompt-major order and the sampling calls that cover them."""
    if settings.max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {settings.max_batch}")
    prompts, seeds = list(settings.prompts), [int(s) for s in settings.seeds]
    if not prompts or not seeds:
        raise ValueError("compare needs at least one prompt and one seed")
    rows = [(p, s) for p in prompts for s in seeds]
    calls = []
    for s_index, seed in enumerate(seeds):
        for start in range(0, len(prompts), settings.max_batch):
            chunk = list(range(start, min(start + settings.max_batch, len(prompts))))
            calls.append(_Call(seed, [p * len(seeds) + s_index for p in chunk], [prompts[p] for p in chunk]))
    return rows, calls


def run_compare(settings: CompareSettings) -> CompareResult:
    """Sample every column for every row, decode, and write grid, cells and manifests (see the module doc)."""
    from tqdm import tqdm

    rows, calls = _calls(settings)
    if not settings.columns:
        raise ValueError("compare needs at least one column (e.g. base lora:my.safetensors)")
    decoder = settings.resolved_decoder()
    # Resolve every column before loading anything: a typo fails in milliseconds, not after the base loads.
    columns = [parse_column(column, settings) for column in settings.columns]
    all_adapters = [a for column in columns for a in column.adapters]
    out_dir = Path(settings.out_dir)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    call_settings = [settings.generate_settings(call.prompts, call.seed) for call in calls]
    first = call_settings[0]
    components = CascadeComponents(settings.model, device=settings.device)
    components.warn_if_slow(first)
    components.check_sources(stages_needed(first), first.torch_dtype)  # every stage, before any sampling
    inputs = AdapterInputs(first.height, first.width, components.device, settings.ip_image_encoder,
                           model_image_encoder=components.spec.source("image_encoder"))
    inputs.prepare(all_adapters)  # missing images fail now; image prompts are encoded before Stage C loads

    bar = tqdm(total=len(columns) * len(calls) * 2, desc="compare", unit="call", disable=not settings.progress)
    with components.use("text_encoder", first.torch_dtype) as text_encoder:
        texts = [encode_prompts(text_encoder, s) for s in call_settings]
        del text_encoder
    latents = _sample_columns(components, columns, calls, call_settings, texts, inputs, bar, settings.force)
    images = _decode(components, decoder, latents, call_settings, texts, bar)
    bar.close()

    cells: list[list[Path]] = [[out_dir / "cells" / f"r{r}_c{c}.png" for c in range(len(columns))]
                               for r in range(len(rows))]
    pictures: list[list[Any]] = [[None] * len(columns) for _ in rows]
    for c in range(len(columns)):
        for call_index, call in enumerate(calls):
            for row, image in zip(call.rows, images[c][call_index]):
                pictures[row][c] = image
                image.save(cells[row][c])
    row_labels = [f"{prompt} | seed {seed}" for prompt, seed in rows]
    grid = make_grid(pictures, row_labels=row_labels, col_labels=[column.label for column in columns])
    grid_path = out_dir / "grid.png"
    grid.save(grid_path)
    if settings.save_latents:
        from safetensors.torch import save_file

        save_file({f"r{row}_c{c}": per_call[call_index][i].contiguous()
                   for c, per_call in enumerate(latents) for call_index, call in enumerate(calls)
                   for i, row in enumerate(call.rows)}, str(out_dir / "latents.safetensors"))
    manifest = _manifest(settings, decoder, first, rows, calls, columns, cells, out_dir)
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
    csv_path = _write_csv(out_dir / "manifest.csv", manifest)
    run_id = _log_to_mlflow(settings, manifest, grid_path, manifest_path, csv_path) if settings.mlflow else None
    return CompareResult(grid_path=grid_path, cells=cells, manifest_path=manifest_path, mlflow_run_id=run_id,
                         csv_path=csv_path)


def _sample_columns(components: CascadeComponents, columns: list[Column], calls: list[_Call],
                    call_settings: list[GenerateSettings], texts: list, inputs: AdapterInputs,
                    bar: Any, force: bool = False) -> list[list[torch.Tensor]]:
    """Stage C latents [column][call]: the base is loaded once; each column adds its adapters, samples every
    call, and removes them again."""
    stage_c = components.load("stage_c", call_settings[0].torch_dtype)
    model = AdaptedStageC(stage_c)
    context = adapter_context(stage_c, components.spec)
    # Load (and drop) every column once first, so an adapter that does not fit this base stops the comparison
    # before any sampling time is spent.
    for column in columns:
        remove_adapters(model, [entry.name for entry in load_adapters(model, column.adapters, context,
                                                                      force=force)])
    latents: list[list[torch.Tensor]] = []
    try:
        for column in columns:
            bar.set_postfix_str(column.label[:40])
            loaded = load_adapters(model, column.adapters, context, force=force)
            try:
                per_call = []
                for call, settings, text in zip(calls, call_settings, texts):
                    extra_cond, extra_uncond = inputs.build(loaded, settings.total_images)
                    per_call.append(to_host(sample_stage_c(model, text, column.settings(settings), extra_cond,
                                                           extra_uncond)))
                    bar.update(1)
                latents.append(per_call)
            finally:
                remove_adapters(model, [entry.name for entry in loaded])
                del loaded
    finally:
        del model, stage_c
        components.release()
    return latents


def _decode(components: CascadeComponents, decoder: str, latents: list[list[torch.Tensor]],
            call_settings: list[GenerateSettings], texts: list, bar: Any) -> list[list[list[Any]]]:
    """Images [column][call][prompt]; the decoder stages are loaded once for all cells, after Stage C is gone."""
    dtype = call_settings[0].torch_dtype
    names = ("previewer",) if decoder == "previewer" else ("stage_b", "stage_a")
    modules = {name: components.load(name, dtype) for name in names}
    decoding = CascadeComponents(components.spec, device=components.device, modules=modules)
    try:
        images = []
        for per_call in latents:
            column_images = []
            for latent, settings, text in zip(per_call, call_settings, texts):
                column_images.append(decode_latents(decoding, latent, settings, text))
                bar.update(1)
            images.append(column_images)
    finally:
        modules.clear()
        del decoding
        components.release()
    return images


def _manifest(settings: CompareSettings, decoder: str, first: GenerateSettings, rows: list[tuple[str, int]],
              calls: list[_Call], columns: list[Column], cells: list[list[Path]], out_dir: Path) -> dict[str, Any]:
    batch_of = {row: call.prompts for call in calls for row in call.rows}
    return {
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "grid": "grid.png",
        "latents": "latents.safetensors" if settings.save_latents else None,
        "model": asdict(settings.model),
        "settings": {"negative_prompt": first.negative_prompt, "sampler": first.sampler, "steps_c": first.steps_c,
                     "cfg_c": first.cfg_c, "shift_c": first.shift_c, "steps_b": first.steps_b, "cfg_b": first.cfg_b,
                     "rho": first.rho, "width": first.width, "height": first.height, "dtype": first.dtype,
                     "decoder": decoder, "max_batch": settings.max_batch, "control": settings.control,
                     "control_mode": settings.control_mode, "image_prompts": list(settings.image_prompts),
                     "ip_multi": settings.ip_multi},
        "prompts": list(settings.prompts),
        "seeds": [int(s) for s in settings.seeds],
        "rows": [{"index": i, "prompt": p, "seed": s, "batch_prompts": batch_of[i]} for i, (p, s) in enumerate(rows)],
        "columns": [{"index": i, "label": column.label, "spec": column.text,
                     "adapters": [a.describe() for a in column.adapters],
                     # what this column sampled with: the comparison's settings unless its text overrides them
                     "sampling": {name: getattr(column.settings(first), name) for name in COLUMN_SETTINGS.values()}}
                    for i, column in enumerate(columns)],
        "cells": [{"row": r, "col": c, "file": cells[r][c].relative_to(out_dir).as_posix()}
                  for r in range(len(rows)) for c in range(len(columns))],
    }


def _write_csv(path: Path, manifest: dict[str, Any]) -> Path:
    """One line per cell: where it is, its row (prompt, seed), its column (label, files, settings)."""
    columns = manifest["columns"]
    rows = manifest["rows"]
    fields = ["row", "col", "file", "prompt", "seed", "column", "adapter_paths", "adapter_settings",
              *manifest["settings"].keys()]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for cell in manifest["cells"]:
            row, column = rows[cell["row"]], columns[cell["col"]]
            writer.writerow({
                "row": cell["row"], "col": cell["col"], "file": cell["file"], "prompt": row["prompt"],
                "seed": row["seed"], "column": column["label"],
                "adapter_paths": ";".join(a["path"] for a in column["adapters"]),
                "adapter_settings": ";".join(f"{a['method']}={a['weight']:g}" for a in column["adapters"]),
                **{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in manifest["settings"].items()},
                **column["sampling"],  # the cell's own sampler, steps and cfg
            })
    return path


def _log_to_mlflow(settings: CompareSettings, manifest: dict[str, Any], grid_path: Path, manifest_path: Path,
                   csv_path: Path) -> str | None:
    """A new run in experiment ``compare`` holding grid + manifests, tagged with the compared runs' ids."""
    from cascade_studio.tracking import Tracker

    compared = sorted({a["mlflow_run_id"] for column in manifest["columns"] for a in column["adapters"]
                       if a["mlflow_run_id"]})
    tags = {COMPARED_RUNS_TAG: ",".join(compared), "cascade_studio.kind": "compare"}
    tracker = Tracker.start(uri=settings.tracking_uri, experiment=COMPARE_EXPERIMENT,
                            run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags,
                            workspace=settings.workspace, run_dir=Path(settings.out_dir))
    with tracker:
        tracker.log_params({"settings": manifest["settings"], "prompts": manifest["prompts"],
                            "seeds": manifest["seeds"], "columns": [c["label"] for c in manifest["columns"]]})
        for path in (grid_path, manifest_path, csv_path):
            tracker.log_artifact(path)
    return tracker.run_id
