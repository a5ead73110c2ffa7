"""Adapters at generation time: parse a spec, find its file, load it onto one Stage C, build its inputs.

One spec names one adapter (see ``SPEC_SYNTAX``, which is also the ``--help`` text). ``resolve_adapter`` turns
run folders, MLflow run ids and checkpoints into the file to load; ``load_adapters`` / ``apply_adapters`` put
any number of adapters on one :class:`AdaptedStageC` through the registry (so every method's own base checks
run), and ``remove_adapters`` takes them off again without touching the base weights, which is how compare
switches columns. ``AdapterInputs`` turns control images and image prompts into the ``control*`` /
``ip_image_embeds`` model inputs, and ``generate_with_adapters`` is ``pipeline.generate`` with all of the above.
"""
from __future__ import annotations

import math
import re
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cascade_studio.adapters import catalog
from cascade_studio.adapters.base import AdaptedStageC, AdapterMismatchError
from cascade_studio.adapters.registry import AdapterContext, detect_method, load_adapter
from cascade_studio.run_folder import ADAPTER_FILE, RunFolder, checkpoint_step

__all__ = ["SPEC_SYNTAX", "AdapterSpec", "ResolvedAdapter", "LoadedAdapter", "AdapterInputs", "parse_adapter_spec",
           "resolve_adapter", "resolve_adapter_path", "adapter_context", "load_adapters", "apply_adapters",
           "remove_adapters", "generate_with_adapters"]

def _kinds() -> str:
    """``lora | controlnet (cn) | ...``: every registered method's spec prefix, from the catalog."""
    return " | ".join(m.name + (f" ({', '.join(m.aliases)})" if m.aliases else "") for m in catalog.methods())


SPEC_SYNTAX = f"""\
Adapter spec: [KIND:][ORIGIN:]TARGET[@STEP][@WEIGHT]
  KIND    {_kinds()}; omitted = read from the file
  ORIGIN  omitted = TARGET is an adapter file (or a PEFT folder)
          run:  TARGET is a run folder (workspace/runs/<name>) or an MLflow run id; its exported adapter is
                used, else its latest checkpoint
          ckpt: TARGET is a run folder, MLflow run id or checkpoint folder; @STEP picks the checkpoint
                (ckpt:workspace/runs/x@40), omitted or @latest = the newest complete one
  WEIGHT  LoRA multiplier, ControlNet strength or IP-Adapter scale (default 1.0)
Examples: lora:style.safetensors@0.8  cn:canny.safetensors@0.7  ip:ip.safetensors@0.6  run:3f2a...c9
          run:workspace/runs/tiny-lora  ckpt:workspace/runs/tiny-lora@20  lora:ckpt:workspace/runs/x@40@0.5"""

ORIGINS = ("file", "run", "ckpt")
CONTROL_MODES = ("canny", "image")
_MLFLOW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# The effnet compressor's stride: control hints are sized to whole latent cells, as in training.
_HINT_MULTIPLE = 32


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to load, as the user wrote it plus its per-method settings.

    ``weight`` is the LoRA multiplier, ControlNet strength or IP-Adapter scale (None = 1.0). ``merge`` folds
    a LoRA into the base weights (faster sampling; generate only). ``control`` / ``control_mode`` give a
    ControlNet its control image and how to turn it into a hint (canny edges of a photo, or the image as is;
    None = canny for canny ControlNets). ``image_prompts`` are an IP-Adapter's images, combined by
    ``multi_image`` (average: one blended image; concat: every image keeps its own tokens).
    """

    source: str
    origin: str = "file"
    method: str | None = None
    step: int | None = None
    weight: float | None = None
    merge: bool = False
    control: str | None = None
    control_mode: str | None = None
    image_prompts: tuple[str, ...] = ()
    multi_image: str | None = None  # None = average
    text: str = ""

    def __post_init__(self) -> None:
        if self.origin not in ORIGINS:
            raise ValueError(f"adapter origin {self.origin!r}: use one of {ORIGINS}")
        if self.method is not None and self.method not in catalog.names():
            raise ValueError(f"adapter kind {self.method!r}: use one of " + ", ".join(
                " / ".join((m.name, *m.aliases)) for m in catalog.methods()))
        if self.control_mode not in (None, *CONTROL_MODES):
            raise ValueError(f"control mode {self.control_mode!r}: use one of {CONTROL_MODES}")
        if self.multi_image not in (None, "average", "concat"):
            raise ValueError(f"multi_image {self.multi_image!r}: use average or concat")

    @classmethod
    def parse(cls, text: str, **settings: Any) -> AdapterSpec:
        """Parse ``SPEC_SYNTAX``; keyword ``settings`` fill the fields the string does not set."""
        return parse_adapter_spec(text, **settings)

    def with_defaults(self, **settings: Any) -> AdapterSpec:
        """A copy with ``settings`` applied to the fields still at their defaults (None / empty)."""
        def is_unset(value: Any) -> bool:
            # Identity, not ==: an explicit weight of 0 must not count as unset (0 == False).
            return value is None or value is False or (isinstance(value, (tuple, str)) and not value)

        unset = {k: v for k, v in settings.items() if is_unset(getattr(self, k)) and v is not None}
        return replace(self, **unset)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_adapter_spec(text: str, **settings: Any) -> AdapterSpec:
    """``lora:a.safetensors@0.8`` -> AdapterSpec(method='lora', source='a.safetensors', weight=0.8)."""
    rest, method, origin = text.strip(), None, "file"
    if not rest:
        raise ValueError("empty adapter spec; " + SPEC_SYNTAX.splitlines()[0])
    head, sep, tail = rest.partition(":")
    named = catalog.by_alias(head) if sep else None
    if named is not None:
        method, rest = named.name, tail
        head, sep, tail = rest.partition(":")
    if sep and head.lower() in ("run", "ckpt"):
        origin, rest = head.lower(), tail
    # Suffixes are peeled from the right only while they parse, so a path containing '@' still works.
    step, weight = None, None
    target, at, suffix = rest.rpartition("@")
    if at and origin == "ckpt":
        inner, at2, step_text = target.rpartition("@")
        if at2 and (step_text.isdigit() or step_text == "latest") and _number(suffix) is not None:
            target, weight = inner, _number(suffix)
            step = None if step_text == "latest" else int(step_text)
        elif suffix.isdigit() or suffix == "latest":
            step = None if suffix == "latest" else int(suffix)
        else:
            raise ValueError(f"adapter spec {text!r}: a checkpoint step is a whole number; write "
                             "ckpt:DIR@STEP or ckpt:DIR@STEP@WEIGHT (ckpt:DIR@latest@0.5 for the newest)")
    elif at and _number(suffix) is not None:
        weight = _number(suffix)
    else:
        target = rest
    if not target:
        raise ValueError(f"adapter spec {text!r} names no file, run or checkpoint\n{SPEC_SYNTAX}")
    spec = AdapterSpec(source=target, origin=origin, method=method, step=step, weight=weight, text=text.strip())
    return spec.with_defaults(**settings)


# ------------------------------------------------------------------------------------------------ resolving
@dataclass(frozen=True)
class ResolvedAdapter:
    """Where a spec's weights are: ``path`` (file or PEFT folder), its method, and the run it came from."""

    spec: AdapterSpec
    path: Path
    method: str
    run_dir: Path | None = None
    mlflow_run_id: str | None = None
    step: int | None = None

    @property
    def weight(self) -> float:
        return 1.0 if self.spec.weight is None else float(self.spec.weight)

    @property
    def label(self) -> str:
        """Short human name with settings, e.g. ``lora tiny-lora step 20 x0.8``."""
        method = catalog.get(self.method)
        name = self.run_dir.name if self.run_dir is not None else self.path.stem
        parts = [method.short, name]
        if self.spec.origin == "ckpt" and self.step is not None:
            parts.append(f"step {self.step}")
        elif self.spec.origin == "run" and self.mlflow_run_id and not Path(self.spec.source).is_dir():
            parts.append(f"({self.mlflow_run_id[:8]})")
        parts.append(f"{method.weight_prefix}{self.weight:g}")
        describe = method.hook("describe_spec")
        if describe is not None:
            parts += describe(self.spec)
        return " ".join(parts)

    def describe(self) -> dict[str, Any]:
        """JSON-ready record for manifests."""
        return {"spec": self.spec.text or self.spec.source, "method": self.method, "origin": self.spec.origin,
                "source": self.spec.source, "path": str(self.path),
                "run_dir": str(self.run_dir) if self.run_dir else None, "mlflow_run_id": self.mlflow_run_id,
                "step": self.step, "weight": self.weight, "merge": self.spec.merge, "control": self.spec.control,
                "control_mode": self.spec.control_mode, "image_prompts": list(self.spec.image_prompts),
                "multi_image": self.spec.multi_image or "average", "label": self.label}


def _run_id_of(run_dir: Path | None) -> str | None:
    """The MLflow run id a run folder recorded (its last ``started`` event; resumes keep the id)."""
    ids = RunFolder(run_dir).mlflow_run_ids() if run_dir is not None else []
    return ids[-1] if ids else None


def _run_export(run_dir: Path) -> Path | None:
    """The run's exported adapter: the paths of its last ``exported`` event, else files in ``export/``."""
    run = RunFolder(run_dir)
    exported = [e.get("paths") or [] for e in run.events() if e.get("event") == "exported"]
    candidates = [Path(p) for p in (exported[-1] if exported else [])]
    files = run.exported_adapters()
    candidates += [p for p in files if p.is_file()] + [p for p in files if p.is_dir()]
    for path in candidates:
        if path.exists():
            return path
    return None


def _run_dir_from_mlflow(run_id: str, workspace: Path, tracking_uri: str | None) -> tuple[Path | None, Path | None]:
    """(run folder, downloaded adapter) for an MLflow run id; the folder is ``<workspace>/runs/<recipe name>``
    as run.py lays it out, with the recipe's own ``workspace`` param as a second guess."""
    from cascade_studio.tracking import read_run, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, workspace)
    try:
        info = read_run(uri, run_id)
    except Exception:  # not in this store (or no store): the run folders may still know it
        info = None
    if info is not None:
        params = info.get("params", {})
        names = [n for n in (params.get("name"), info.get("run_name")) if n]
        roots = [workspace] + ([Path(params["workspace"])] if params.get("workspace") else [])
        for root in roots:
            for name in names:
                if RunFolder.in_workspace(root, name).exists():
                    return RunFolder.in_workspace(root, name).path, None
        # The folder is gone (or on another machine): the exported adapter is also an MLflow artifact.
        artifacts = [a for a in info.get("artifacts", []) if a.startswith("adapter/") and a.endswith(".safetensors")]
        if artifacts:
            import mlflow

            target = workspace / "cache" / "mlflow-adapters" / run_id
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifacts[0],
                                                        dst_path=str(target), tracking_uri=uri)
            return None, Path(local)
    for run in sorted(RunFolder.all_in(workspace), key=lambda r: r.name):
        ids = run.mlflow_run_ids()
        if ids and ids[-1] == run_id:
            return run.path, None
    raise FileNotFoundError(
        f"MLflow run {run_id}: not in the tracking store {uri} and no run folder under "
        f"{RunFolder.runs_dir(workspace)} "
        "recorded it. Pass the --workspace (or --tracking-uri) the run was trained with, or give its run folder "
        "(run:workspace/runs/<name>).")


def _run_dir(source: str, workspace: Path, tracking_uri: str | None, what: str) -> tuple[Path | None, Path | None]:
    path = Path(source).expanduser()
    if path.is_dir():
        return path, None
    if _MLFLOW_RUN_ID.match(source):
        return _run_dir_from_mlflow(source, workspace, tracking_uri)
    raise FileNotFoundError(f"{what}{source}: no such run folder, and not an MLflow run id (32 hex characters); "
                            "give workspace/runs/<name> or the run id that `cascade-studio train` printed")


def resolve_adapter(spec: AdapterSpec, workspace: str | Path = "workspace",
                    tracking_uri: str | None = None) -> ResolvedAdapter:
    """Find the weights of ``spec``: a file as is; a run's export or latest checkpoint; checkpoint ``step``."""
    workspace = Path(workspace).expanduser()
    run_dir, path, step = None, None, spec.step
    if spec.origin == "file":
        path = Path(spec.source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"adapter file {path} does not exist; for a run folder or MLflow run id write "
                                    f"run:{spec.source}, for a checkpoint ckpt:{spec.source}@STEP")
        if path.is_dir() and not (path / "adapter_config.json").is_file():
            # A run or checkpoint folder given without a prefix: take it the way run: would.
            spec = replace(spec, origin="ckpt" if (path / ADAPTER_FILE).is_file() else "run")
            return resolve_adapter(spec, workspace, tracking_uri)
    elif spec.origin == "run":
        run_dir, path = _run_dir(spec.source, workspace, tracking_uri, "run:")
        if path is None:
            path = _run_export(run_dir)
            if path is None:
                checkpoints = RunFolder(run_dir).checkpoints()
                if not checkpoints:
                    raise FileNotFoundError(f"run:{spec.source}: {run_dir} has no exported adapter and no complete "
                                            "checkpoint yet; train it first, or pick another run")
                step = max(checkpoints)
                path = checkpoints[step] / ADAPTER_FILE
    else:
        source = Path(spec.source).expanduser()
        folder_step = checkpoint_step(source) if (source / ADAPTER_FILE).is_file() else None
        if folder_step is not None:  # a checkpoint folder (in its run folder, or copied elsewhere)
            in_run = RunFolder.of_checkpoint(source)
            run_dir, ckpt_path, step = (in_run[0].path if in_run else None), source, folder_step
            if spec.step is not None and spec.step != step:
                raise ValueError(f"ckpt:{spec.source}@{spec.step}: the folder is the checkpoint of step {step}")
        else:
            run_dir, _ = _run_dir(spec.source, workspace, tracking_uri, "ckpt:")
            if run_dir is None:
                raise FileNotFoundError(f"ckpt:{spec.source}: the run folder is gone (only its exported adapter is "
                                        f"in MLflow); use run:{spec.source} instead")
            checkpoints = RunFolder(run_dir).checkpoints()
            if not checkpoints:
                raise FileNotFoundError(f"ckpt:{spec.source}: {run_dir} has no complete checkpoint")
            step = max(checkpoints) if spec.step is None else spec.step
            if step not in checkpoints:
                raise FileNotFoundError(f"ckpt:{spec.source}@{spec.step}: no complete checkpoint at step {step}; "
                                        f"this run has steps {sorted(checkpoints)}")
            ckpt_path = checkpoints[step]
        path = ckpt_path / ADAPTER_FILE
    method = detect_method(path)
    if spec.method is not None and spec.method != method and spec.method not in catalog.get(method).kind_of:
        raise AdapterMismatchError(f"{path}: asked for a {spec.method} but the file holds a {method}; give it as "
                                   f"a {catalog.get(method).short}: spec (or without a kind prefix: files say what "
                                   "they are)")
    run_id = _run_id_of(run_dir)
    if run_id is None and spec.origin != "file" and _MLFLOW_RUN_ID.match(spec.source):
        run_id = spec.source
    return ResolvedAdapter(spec=spec, path=path, method=method, run_dir=run_dir, mlflow_run_id=run_id, step=step)


def resolve_adapter_path(spec: AdapterSpec | str, workspace: str | Path = "workspace",
                         tracking_uri: str | None = None) -> Path:
    """The file (or PEFT folder) ``spec`` loads; see :func:`resolve_adapter`."""
    spec = parse_adapter_spec(spec) if isinstance(spec, str) else spec
    return resolve_adapter(spec, workspace, tracking_uri).path


# ------------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedAdapter:
    """An adapter attached to a Stage C: its registry name, where it came from, and its hint input name."""

    name: str
    resolved: ResolvedAdapter
    adapter: Any
    input_name: str | None = None


def adapter_context(stage_c: torch.nn.Module, model_spec: Any = None) -> AdapterContext:
    """What the adapter loaders check files against, read from the loaded Stage C: its width (a custom width
    counts) and the fingerprint of its weights (an adapter trained on other weights is refused)."""
    from cascade_studio.adapters.base import stage_c_width
    from cascade_studio.models.identity import weights_identity

    inner = stage_c.stage_c if isinstance(stage_c, AdaptedStageC) else stage_c
    width = stage_c_width(inner)
    preset = getattr(model_spec, "preset", None) or "tiny"
    return AdapterContext(preset=preset, base_fingerprint=weights_identity(inner),
                          stage_c_config={"c_hidden": [width]})


def _safe_name(index: int, resolved: ResolvedAdapter) -> str:
    # Module-dict keys may not contain dots and PEFT names end up in parameter paths: keep [A-Za-z0-9_].
    stem = re.sub(r"[^A-Za-z0-9_]", "_", resolved.run_dir.name if resolved.run_dir else resolved.path.stem)
    return f"{resolved.method}_{index}_{stem}"


def load_adapters(model: AdaptedStageC, adapters: Sequence[AdapterSpec | ResolvedAdapter],
                  context: AdapterContext, *, workspace: str | Path = "workspace",
                  tracking_uri: str | None = None, force: bool = False) -> list[LoadedAdapter]:
    """Load every adapter onto ``model`` (all or none: on an error the ones already added are removed).
    ``force`` loads adapters trained on another base (see ``registry.check_base``)."""
    resolved = [a if isinstance(a, ResolvedAdapter) else resolve_adapter(a, workspace, tracking_uri)
                for a in adapters]
    loaded: list[LoadedAdapter] = []
    state: dict[str, Any] = {}  # shared by one method's adapters across the list (e.g. ControlNet input names)
    device = next(model.stage_c.parameters()).device
    try:
        with tempfile.TemporaryDirectory(prefix="cascade-adapters-") as scratch:
            for index, item in enumerate(resolved):
                name = _safe_name(index, item)
                path, options, input_name = catalog.get(item.method).hook("generation_load")(
                    item, Path(scratch), state)
                try:
                    with warnings.catch_warnings():
                        # PEFT warns on every LoRA after the first that the Stage C already has a
                        # peft_config; several named adapters on one model is exactly what we want.
                        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                        adapter = load_adapter(path, model, context, name=name, force=force, **options)
                except AdapterMismatchError as exc:
                    message = str(exc) if str(item.path) in str(exc) else f"{item.path}: {exc}"
                    message = message.rstrip(". ")
                    raise AdapterMismatchError(
                        f"{message}. Use an adapter trained on this base ({context.preset}, Stage C width "
                        f"{context.width}), or load the base it was made for (--preset / --stage-c).") from None
                except NotImplementedError as exc:
                    raise ValueError(f"{item.path}: {exc}") from None
                if isinstance(adapter, torch.nn.Module):
                    adapter.to(device)  # loaders build on the CPU; the base may be on a GPU
                loaded.append(LoadedAdapter(name, item, adapter, input_name))
        for method in catalog.methods():
            finish = method.hook("generation_finish")
            mine = [entry for entry in loaded if entry.resolved.method == method.name]
            if finish is not None and mine:
                finish(mine)
    except BaseException:
        remove_adapters(model, [entry.name for entry in loaded])
        raise
    return loaded


def apply_adapters(model: AdaptedStageC, specs: Sequence[AdapterSpec | ResolvedAdapter], context: AdapterContext,
                   **kwargs: Any) -> list[str]:
    """Load ``specs`` onto ``model`` at once and return their names (for ``remove_adapters`` / set_enabled)."""
    return [entry.name for entry in load_adapters(model, specs, context, **kwargs)]


def remove_adapters(model: AdaptedStageC, names: Sequence[str]) -> None:
    """Take adapters off ``model``; the base's modules and outputs come back exactly (merged LoRAs are
    unmerged first, exact up to float rounding)."""
    for name in reversed(list(names)):
        if name in model.enabled:
            model.remove_adapter(name)


# -------------------------------------------------------------------------------------------------- inputs
def _read_rgb(path: str | Path, what: str) -> torch.Tensor:
    """An image file as float [3, H, W] in [0, 1] (EXIF rotation applied, transparency flattened on white)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist; check the path") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{what} {path} is not a readable image ({exc}); re-save it as PNG or JPEG") from None
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return array.view(image.height, image.width, 3).permute(2, 0, 1).float().div(255.0)


class AdapterInputs:
    """The extra model inputs of loaded adapters (ControlNet hints, IP-Adapter image embeddings, ...), built by
    each method's ``generation_prepare`` / ``generation_inputs`` hooks and cached here for a whole generation or
    comparison.

    ``size`` is the generation size rounded up to whole latent cells (multiples of 32 px, the grid training
    hints tile) and ``aspect`` the requested width/height; ``cache`` holds what the methods computed (hints,
    embeddings); ``shared`` holds what several adapters reuse while preparing (an image encoder) until
    :meth:`release_shared`.
    """

    def __init__(self, height: int, width: int, device: torch.device | str = "cpu",
                 ip_image_encoder: str | None = None,
                 encoder_loader: Callable[[str], Any] | None = None,
                 model_image_encoder: str | None = None) -> None:
        self.size = (math.ceil(height / _HINT_MULTIPLE) * _HINT_MULTIPLE,
                     math.ceil(width / _HINT_MULTIPLE) * _HINT_MULTIPLE)
        self.aspect = width / height
        self.device = torch.device(device)
        self.ip_image_encoder = ip_image_encoder
        # where the base's weights say the image encoder is (model.image_encoder, else model.repo_id): used, as
        # training uses it, when no encoder is given explicitly
        self.model_image_encoder = model_image_encoder
        self.encoder_loader = encoder_loader
        self.cache: dict[tuple, Any] = {}
        self._shared: dict[tuple, Any] = {}

    read_image = staticmethod(_read_rgb)

    def shared(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()`` once per key while preparing (e.g. one image encoder for every adapter that uses it)."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def release_shared(self) -> None:
        self._shared.clear()

    def prepare(self, adapters: Sequence[ResolvedAdapter]) -> None:
        """Check every adapter has its inputs and compute what can be computed now: call it before Stage C
        loads, so a missing image fails early and an image encoder is never in memory next to Stage C."""
        try:
            for item in adapters:
                prepare = catalog.get(item.method).hook("generation_prepare")
                if prepare is not None:
                    prepare(item, self)
        finally:
            self.release_shared()

    def build(self, loaded: Sequence[LoadedAdapter], batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(extra_cond, extra_uncond)`` for ``sample_stage_c``."""
        cond: dict[str, Any] = {}
        uncond: dict[str, Any] = {}
        for entry in loaded:
            inputs = catalog.get(entry.resolved.method).hook("generation_inputs")
            if inputs is not None:
                inputs(entry, self, batch, cond, uncond)
        return cond, uncond


# ------------------------------------------------------------------------------------------------ generate
def generate_with_adapters(
    components: Any, settings: Any, specs: Sequence[AdapterSpec], *, workspace: str | Path = "workspace",
    tracking_uri: str | None = None, ip_image_encoder: str | None = None,
    progress: Callable[[str, int, int], None] | None = None, force: bool = False,
) -> tuple[list, list[ResolvedAdapter]]:
    """``pipeline.generate`` with adapters on Stage C; returns (images, resolved adapters).

    Every adapter is resolved before any model loads (a wrong path fails in milliseconds); image prompts are
    encoded before Stage C loads; Stage C is loaded, wrapped in an AdaptedStageC, sampled and freed before the
    decoder loads, so stages still never share the memory. Without adapters this is ``generate`` exactly.
    """
    from cascade_studio.inference.pipeline import decode_latents, encode_prompts, stages_needed

    components.warn_if_slow(settings)
    resolved = [resolve_adapter(spec, workspace, tracking_uri) for spec in specs]
    components.check_sources(stages_needed(settings), settings.torch_dtype)  # every stage, before any sampling
    inputs = AdapterInputs(settings.height, settings.width, components.device, ip_image_encoder,
                           model_image_encoder=components.spec.source("image_encoder"))
    inputs.prepare(resolved)
    with components.use("text_encoder", settings.torch_dtype) as text_encoder:
        text = encode_prompts(text_encoder, settings)
        del text_encoder
    latents = _sample_adapted(components, settings, text, resolved, inputs, progress, force)
    components.release()  # Stage C and its adapters died with _sample_adapted's frame: return the memory
    return decode_latents(components, latents, settings, text, progress=progress), resolved


def _sample_adapted(components: Any, settings: Any, text: Any, resolved: Sequence[ResolvedAdapter],
                    inputs: AdapterInputs, progress: Callable[[str, int, int], None] | None,
                    force: bool = False) -> torch.Tensor:
    from cascade_studio.inference.pipeline import sample_stage_c

    stage_c = components.load("stage_c", settings.torch_dtype)
    model = AdaptedStageC(stage_c)
    loaded = load_adapters(model, resolved, adapter_context(stage_c, components.spec), force=force)
    extra_cond, extra_uncond = inputs.build(loaded, settings.total_images)
    return sample_stage_c(model, text, settings, extra_cond, extra_uncond, progress=progress)
