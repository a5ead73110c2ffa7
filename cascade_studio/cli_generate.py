"""``cascade-studio generate`` (prompt -> image, optionally through adapters) and ``cascade-studio compare``
(a labelled grid of base / adapters / runs / checkpoints by prompts x seeds).

Argument parsing only; the work is in ``inference.pipeline``, ``inference.adapters`` and ``inference.compare``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

_STAGES = ("stage_c", "stage_b", "stage_a", "previewer", "text_encoder", "effnet")


_SPEC_HELP = "<adapter spec syntax>"
_COLUMN_HELP = "<compare column syntax>"


class _SpecHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Puts ``SPEC_SYNTAX`` (defined beside its parser) into the epilog when help is printed: importing it pulls
    in torch, and building the parser must stay instant for every other command."""

    def add_text(self, text):
        if text == _SPEC_HELP:
            from .inference.adapters import SPEC_SYNTAX

            text = SPEC_SYNTAX
        elif text == _COLUMN_HELP:
            from .inference.adapters import SPEC_SYNTAX
            from .inference.compare import COLUMN_SYNTAX

            text = COLUMN_SYNTAX + "\n\n" + SPEC_SYNTAX
        super().add_text(text)


def add_commands(sub) -> None:
    """Register ``generate`` and ``compare`` on the top-level subparsers."""
    _add_generate(sub)
    _add_compare(sub)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .models.presets import PRESETS

    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="model size and weights: " + ", ".join(f"{p.name} ({p.weights})" for p in PRESETS.values()))
    p.add_argument("--repo-id", help="Hugging Face repo id with the published weights (from the local hub cache)")
    for stage in _STAGES:
        p.add_argument(f"--{stage.replace('_', '-')}", dest=stage, help=f"weights of {stage} (file or folder)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], help="bf16 (GPU default) or fp32 (CPU default)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt weights (loaded weights_only)")
    p.add_argument("--device", help="where the models run: cuda, cuda:1, cpu ... (default: cuda when present)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from .diffusion.samplers import DEFAULT_SAMPLER, sampler_help, sampler_names

    p.add_argument("--negative-prompt", default="")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=sampler_names(),
                   help=f"Stage C sampler (default {DEFAULT_SAMPLER}): {sampler_help()}")
    p.add_argument("--steps", type=int, default=20, help="Stage C steps (published: 20)")
    p.add_argument("--cfg", type=float, default=4.0, help="Stage C guidance (published: 4; unguided samplers "
                   "ignore it)")
    p.add_argument("--shift", type=float, default=2.0, help="Stage C schedule shift (published: 2)")
    p.add_argument("--steps-b", type=int, default=10)
    p.add_argument("--cfg-b", type=float, default=1.1)
    p.add_argument("--width", type=int, help="image width in pixels (default: the preset's, 1024; tiny 256)")
    p.add_argument("--height", type=int)


def _add_input_args(p: argparse.ArgumentParser, repeat_control: bool) -> None:
    from .adapters import catalog

    for method in catalog.methods():
        if method.command_line is not None and method.command_line.add_inputs is not None:
            method.command_line.add_inputs(p, repeat_control)
    p.add_argument("--force", action="store_true",
                   help="load adapters trained on another base anyway (their base fingerprints differ)")
    p.add_argument("--workspace", default="workspace", help="where run: / ckpt: look for runs and mlflow.db")
    p.add_argument("--tracking-uri", help="MLflow store for run ids (default: <workspace>/mlflow.db)")


def _model_spec(args):
    from .inference.pipeline import ModelSpec

    return ModelSpec(preset=args.preset, repo_id=args.repo_id, allow_pickle=args.allow_pickle,
                     **{stage: getattr(args, stage) for stage in _STAGES})


def _sampling_kwargs(args) -> dict:
    from .models import get_preset

    size = get_preset(args.preset).generate_resolution
    kwargs = dict(negative_prompt=args.negative_prompt, sampler=args.sampler, steps_c=args.steps, cfg_c=args.cfg, shift_c=args.shift,
                  steps_b=args.steps_b, cfg_b=args.cfg_b, width=args.width or size, height=args.height or size)
    if args.dtype:
        kwargs["dtype"] = args.dtype
    return kwargs


# ------------------------------------------------------------------------------------------------ generate
def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="text -> image through the whole cascade (or --preview), optionally with adapters",
        description="Generate images; LoRAs, ControlNets and an IP-Adapter can be combined in one call.",
        epilog=_SPEC_HELP, formatter_class=_SpecHelpFormatter)
    p.add_argument("--prompt", action="append", required=True, help="caption (repeat for several)")
    p.add_argument("--out", default="generated.png",
                   help="image file (.png, .jpg, .webp ...; no extension: .png) or folder (gets generated.png); "
                        "several images add -0, -1, ...")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--preview", action="store_true", help="decode with the previewer only (fast)")
    from .adapters import catalog

    for method in catalog.methods():
        if method.command_line is not None:
            method.command_line.add_generate(p)
    p.add_argument("--adapter", action="append", default=[], metavar="SPEC",
                   help="any adapter in the spec syntax below (repeatable)")
    _add_input_args(p, repeat_control=True)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_generate)


def generate_specs(args) -> list:
    """The AdapterSpecs a generate command line asks for (every flag checked before any model loads): each
    method's own flags in catalog order, then the ``--adapter`` specs with every method's input settings."""
    from .adapters import catalog
    from .inference.adapters import parse_adapter_spec

    specs: list = []
    settings: dict = {}
    for method in catalog.methods():
        if method.command_line is not None:
            specs += method.command_line.specs(args, parse_adapter_spec)
            settings.update(method.command_line.settings(args))
    return specs + [parse_adapter_spec(text, **settings) for text in args.adapter]


def image_out_path(out: str) -> Path:
    """Where ``generate --out`` writes: a folder (an existing one, or a path ending in a separator) gets
    ``generated.png`` inside it, a name without an extension gets ``.png``; an extension Pillow cannot write
    is refused with the ones it can."""
    from PIL import Image

    path = Path(out).expanduser()
    if path.is_dir() or out.endswith(("/", os.sep)):
        return path / "generated.png"
    if not path.suffix:
        return path.with_name(path.name + ".png")
    writable = Image.registered_extensions()  # loads every plugin, so Image.SAVE is complete
    if writable.get(path.suffix.lower()) not in Image.SAVE:
        known = ", ".join(ext for ext in (".png", ".jpg", ".webp", ".tif", ".bmp") if writable.get(ext) in Image.SAVE)
        raise ValueError(f"--out {out}: cannot write {path.suffix!r} images; give a file name ending in one of "
                         f"{known}, or a folder")
    return path


class StepBars:
    """``progress(stage, step, total)`` for the pipeline: a tqdm bar (stderr) for each sampling pass, Stage C then
    Stage B (one per image when it decodes them one by one)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.stage, self.bar = enabled, None, None

    def __call__(self, stage: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None or stage != self.stage or step <= self.bar.n:
            from tqdm.auto import tqdm

            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage.replace("_", " ").title(), unit="step", dynamic_ncols=True)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_generate(args) -> int:
    from .inference.adapters import generate_with_adapters
    from .inference.pipeline import CascadeComponents, GenerateSettings, generate

    out = image_out_path(args.out)  # before any model loads: a bad --out must not cost the generation
    specs = generate_specs(args)
    prompt = args.prompt[0] if len(args.prompt) == 1 else list(args.prompt)
    settings = GenerateSettings(prompt=prompt, seed=args.seed, batch=args.batch, preview=args.preview,
                                **_sampling_kwargs(args))
    components = CascadeComponents(_model_spec(args), device=args.device)
    components.warn_if_slow(settings, preview_hint="--preview")  # the command line's spelling
    bars = StepBars(enabled=not args.no_progress)
    try:
        if specs:
            images, resolved = generate_with_adapters(components, settings, specs, workspace=args.workspace,
                                                      tracking_uri=args.tracking_uri, progress=bars,
                                                      ip_image_encoder=args.ip_image_encoder, force=args.force)
            for item in resolved:
                print(f"adapter: {item.label} <- {item.path}")
        else:
            images = generate(components, settings, progress=bars)
    finally:
        bars.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})")
    return 0


# ------------------------------------------------------------------------------------------------- compare
def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", help="grid of base / adapters / runs / checkpoints (columns) by prompts x seeds (rows)",
        description="Compare adapters side by side. Every cell of a row shares the starting noise, so only the "
                    "adapter differs; the base column is exactly what `generate` makes with the same settings. "
                    "A column is 'base' or an adapter spec; join adapters into one column with '+'. Writes "
                    "grid.png, cells/r{row}_c{col}.png, manifest.json and manifest.csv to --out. A column may "
                    "carry its own sampler, steps and cfg after '::' (see below).",
        epilog=_COLUMN_HELP, formatter_class=_SpecHelpFormatter)
    p.add_argument("--columns", nargs="+", required=True, metavar="COLUMN",
                   help="e.g. base lora:a.safetensors run:<id> ckpt:workspace/runs/x@20 ckpt:workspace/runs/x@40 "
                        "lora:lcm.safetensors::lcm,steps=4 (column syntax below)")
    p.add_argument("--prompt", action="append", required=True, help="caption (repeat for several rows)")
    p.add_argument("--seed", "--seeds", dest="seeds", nargs="+", type=int, default=[0],
                   help="one row per prompt and seed")
    p.add_argument("--out", help="output folder (default: <workspace>/compare/<date-time>)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--decoder", choices=["previewer", "cascade"],
                   help="previewer: Stage C + previewer (fast; default on tiny); cascade: Stage B + A")
    p.add_argument("--max-batch", type=int, default=8,
                   help="prompts sampled together per seed (1 = every cell alone, as `generate --prompt P`)")
    p.add_argument("--mlflow", action="store_true",
                   help="log grid + manifest as a run of MLflow experiment 'compare', tagged with the compared runs")
    p.add_argument("--save-latents", action="store_true",
                   help="also write every cell's Stage C latents to latents.safetensors (key r{row}_c{col})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_input_args(p, repeat_control=False)
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args) -> int:
    from .inference.compare import CompareSettings, run_compare

    out = args.out or str(Path(args.workspace) / "compare" / time.strftime("%Y%m%d-%H%M%S"))
    settings = CompareSettings(
        columns=args.columns, prompts=args.prompt, seeds=args.seeds, out_dir=out, model=_model_spec(args),
        decoder=args.decoder, control=args.control, control_mode=args.control_mode,
        image_prompts=args.image_prompt, ip_multi=args.ip_multi, ip_image_encoder=args.ip_image_encoder,
        max_batch=args.max_batch, workspace=args.workspace, tracking_uri=args.tracking_uri, mlflow=args.mlflow,
        progress=not args.no_progress, save_latents=args.save_latents, device=args.device, force=args.force,
        **_sampling_kwargs(args))
    result = run_compare(settings)
    print(f"grid: {result.grid_path}")
    print(f"manifest: {result.manifest_path}")
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id} (experiment 'compare')")
    return 0
