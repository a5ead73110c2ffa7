"""``cascade-studio export``: turn a run's (or a checkpoint's) adapter into a file other tools load.

Checkpoints store adapter tensors in the method's own layout plus metadata (method, rank, alpha, ...), so an
export is a pure tensor conversion: no base model is loaded, which keeps exporting a 3.6B run instant.
"""
from __future__ import annotations

from pathlib import Path

from .adapters.base import AdapterMismatchError
from .adapters.files import load_adapter_tensors, save_adapter_tensors
from .run_folder import ADAPTER_FILE, RunFolder


def find_adapter_tensors(source: str | Path) -> Path:
    """The adapter tensors of a run folder (its latest good checkpoint) or of a checkpoint folder."""
    source = Path(source)
    if source.is_file():
        return source
    if (source / ADAPTER_FILE).exists():
        return source / ADAPTER_FILE
    run = RunFolder(source)
    # verified, and without cleaning up: the run may be saving a checkpoint right now
    latest = run.latest_checkpoint(verify=True)
    if latest is not None:
        return latest / ADAPTER_FILE
    exports = [p for p in run.exported_adapters() if p.is_file()]
    if exports:
        return exports[0]
    raise FileNotFoundError(f"{source}: no checkpoint or exported adapter found; pass a run folder "
                            "(workspace/runs/<name>), a checkpoint folder or an adapter file")


def export_from_run(source: str | Path, fmt: str = "comfyui", out: str | Path | None = None) -> Path:
    tensors_path = find_adapter_tensors(source)
    tensors, metadata = load_adapter_tensors(tensors_path)
    method = metadata.get("cascade_studio.method")
    out = Path(out) if out else _default_out(Path(source), tensors_path, metadata, fmt)
    if method == "lora":
        return _export_lora(tensors, metadata, fmt, out)
    if method in ("controlnet", "ip_adapter"):
        wanted = {"controlnet": "official", "ip_adapter": "ip_adapter"}[method]
        if fmt != wanted:
            raise ValueError(f"a {method} exports as --format {wanted}, not {fmt}")
        metadata["cascade_studio.format"] = fmt
        return save_adapter_tensors(tensors, out, metadata)
    raise AdapterMismatchError(f"{tensors_path}: no cascade_studio.method in its metadata; was it written by "
                               "cascade-studio?")


def _default_out(source: Path, tensors_path: Path, metadata: dict, fmt: str) -> Path:
    """A run folder's export goes to its ``export/``; a checkpoint's to its run's ``export/`` with the step in the
    name (never into the checkpoint itself); a loose file's to ``export/`` beside it."""
    step = None
    if source.is_dir() and source != tensors_path.parent:  # a run folder (its latest checkpoint or export)
        run = RunFolder(source)
    elif (checkpoint := RunFolder.of_checkpoint(tensors_path.parent)) is not None:  # a checkpoint or its file
        run, step = checkpoint
    else:
        run = RunFolder(tensors_path.parent)
    return run.export_path(fmt, step=step, run_name=metadata.get("cascade_studio.recipe_name") or run.name)


def _export_lora(tensors, metadata, fmt: str, out: Path) -> Path:
    from .adapters.lora.adapter import LoraSpec
    from .adapters.lora.formats import _split_peft_key, peft_to_comfyui

    spec = LoraSpec(rank=int(metadata.get("cascade_studio.rank", 16)),
                    alpha=float(metadata.get("cascade_studio.alpha", 16)),
                    type=metadata.get("cascade_studio.lora_type", "lora"),
                    targets=tuple(filter(None, metadata.get("cascade_studio.targets", "attention").split(","))))
    modules = sorted({_split_peft_key(k)[0] for k in tensors})
    ranks = {}
    for m in modules:
        if f"{m}.lora_A.weight" in tensors:
            ranks[m] = tensors[f"{m}.lora_A.weight"].shape[0]
        elif f"{m}.hada_w1_b" in tensors:
            ranks[m] = tensors[f"{m}.hada_w1_b"].shape[0]
        else:
            ranks[m] = spec.rank
    alphas = {m: spec.alpha for m in modules}
    if fmt == "comfyui":
        metadata["cascade_studio.format"] = "comfyui"
        return save_adapter_tensors(peft_to_comfyui(tensors, spec, alphas, ranks), out, metadata)
    if fmt == "peft":
        import json

        from .adapters.lora.adapter import _peft_config

        out.mkdir(parents=True, exist_ok=True)
        metadata["cascade_studio.format"] = "peft"
        save_adapter_tensors(tensors, out / "adapter_model.safetensors", metadata)
        config = _peft_config(spec, modules).to_dict()
        config["target_modules"] = modules
        (out / "adapter_config.json").write_text(json.dumps(
            {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}, indent=2, default=list))
        return out
    raise ValueError(f"a LoRA exports as --format comfyui or peft, not {fmt}")
