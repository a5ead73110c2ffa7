"""Load real weights: official single files, diffusers folders and Hugging Face repo ids (STABLE_CASCADE.md s. 5).

Every loader follows the same steps, so one code path is tested for all of them:

1. resolve the source to files (a file, a folder, or a repo id fetched through ``huggingface_hub``, which honours
   ``HF_HUB_OFFLINE`` and the cache);
2. read only the headers and decide what the file is (``detect_family``) and which constructor values its shapes
   imply (``infer_config``; what shapes cannot tell, like head counts, comes from an explicit ``config``, a
   diffusers ``config.json``, the preset of the same width, or a head_dim-64 rule);
3. build the model on the meta device (no memory, no init cost) and compare every name and shape before reading
   any tensor data;
4. read tensors one at a time, converting each to the requested dtype/device as it is read, and *assign* them
   into the model, so no full fp32 copy of a 3.6B model ever exists next to the bf16 one.

Every bad input raises one :class:`WeightsError` naming the file, what is wrong and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import struct
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from torch import nn

from .effnet import EFFNET_ARCHS, EffnetEncoder
from .encoders import (
    IMAGE_ENCODER_CONFIGS,
    IP_IMAGE_ENCODERS,
    TEXT_ENCODER_CONFIGS,
    ImageEncoder,
    OpenClipImageEncoder,
    TextEncoder,
    build_open_clip_visual,
)
from .official import (
    _QKV,
    StateDictMismatchError,
    convert_diffusers_stage_b_keys,
    convert_diffusers_stage_c_keys,
    official_state_dict,
)
from .presets import PRESETS, build_controlnet, build_previewer, build_stage_a, build_stage_b, build_stage_c

OFFICIAL_REPO = "stabilityai/stable-cascade"
PRIOR_REPO = "stabilityai/stable-cascade-prior"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")
PICKLE_HINT = (
    "pass allow_pickle=True (recipe: `model.allow_pickle: true`, CLI: `--allow-pickle`) if you trust the file; "
    "it is then read with torch.load(weights_only=True). Better: convert it to .safetensors once"
)
FAMILY_NAMES = {
    "stage_c": "a Stage C (prior) model",
    "stage_b": "a Stage B (decoder) model",
    "stage_a": "a Stage A (VQGAN) model",
    "previewer": "a previewer",
    "effnet": "the EfficientNet semantic compressor",
    "controlnet": "a ControlNet",
    "text_encoder": "a CLIP text encoder",
    "image_encoder": "a CLIP image encoder",
    "clip": "a full CLIP model (text and image towers)",
    "open_clip": "an OpenCLIP model",
    "adapter": "a LoRA adapter or another adapter file (load it as an adapter, not as a base model)",
}
# Published single files in `stabilityai/stable-cascade` (and in a local copy of it).
_OFFICIAL_FILES = {"stage_a": "stage_a.safetensors", "previewer": "previewer.safetensors",
                   "effnet": "effnet_encoder.safetensors"}
# diffusers subfolders per kind, for each model size.
_SUBFOLDERS = {
    "stage_c": {"big": "prior", "lite": "prior_lite"},
    "stage_b": {"big": "decoder", "lite": "decoder_lite"},
    "text_encoder": {"big": "text_encoder", "lite": "text_encoder"},
    "image_encoder": {"big": "image_encoder", "lite": "image_encoder"},
}
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
_SHOW = 5
Source = str | os.PathLike
Device = str | torch.device


class WeightsError(ValueError):
    """A weights source that cannot be loaded; the message names the file, the problem and the fix."""

    def __init__(self, source: Any, problem: str) -> None:
        self.source = str(source)
        super().__init__(f"{source}: {problem}")


# ----------------------------------------------------------------------------------------------- reading files


_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """Parse and validate a safetensors header without reading tensor data (the one check every weights and
    adapter file goes through).

    Catches truncated downloads and non-safetensors files before safetensors' own less helpful errors.
    """
    path = Path(path)
    size = path.stat().st_size
    fix = "re-download it or point to a different file"
    if size < 8:
        raise WeightsError(path, f"only {size} bytes long, so not a safetensors file (empty or truncated?); {fix}")
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise WeightsError(
                path, f"the header claims {length} bytes but only {size - 8} follow: the file is truncated or not "
                f"a safetensors file; {fix}"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(path, f"the header is not valid safetensors JSON ({exc}); the file is corrupt; {fix}")
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= set(entry)):
            raise WeightsError(path, f"tensor {name!r} has a malformed header entry; {fix}")
        if entry["data_offsets"][1] > data_size:
            raise WeightsError(
                path, f"tensor {name!r} ends at byte {entry['data_offsets'][1]} of the data section but the file "
                f"holds only {data_size} data bytes: the file is truncated; {fix}"
            )
    return header


@dataclass
class Checkpoint:
    """Names and shapes of a checkpoint (one file, shards or a pickle); tensors are read one at a time."""

    label: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _read: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict, repr=False)
    # key -> read rows [start, stop) of the tensor into memory of their own with plain file reads (safetensors
    # files only); used to split fused attention without touching the file's memory map (see ``get_split``)
    _rows: dict[str, Callable[[int, int], torch.Tensor]] = field(default_factory=dict, repr=False)

    def get(self, key: str, dtype: torch.dtype | None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor, casting floating tensors to ``dtype`` (integer counters keep theirs)."""
        return _cast(self._read[key](), dtype, device)

    def get_split(self, key: str, sizes: Sequence[int], dtype: torch.dtype | None,
                  device: str | torch.device = "cpu") -> list[torch.Tensor]:
        """Read one tensor as consecutive row blocks of ``sizes`` (fused q/k/v -> q, k, v), each in its own memory.

        safetensors hands out tensors that live in a private memory map of the file. A part cloned from such a
        tensor leaves the pages it was read from resident in that map for as long as any other tensor of the file
        is alive (on the CPU in the file's dtype, the model's other weights are), so every fused attention weight
        would stay in memory twice (about 1.6 GiB for the 3.6B Stage C in bf16). Parts are therefore read with
        plain file reads, which fill the page cache (reclaimable) but never the process's map.
        """
        if key in self._rows:
            bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            return [_cast(self._rows[key](start, stop), dtype, device)
                    for start, stop in zip(bounds[:-1], bounds[1:])]
        tensor = self.get(key, dtype, device)
        # Own memory per part: shared storages would make safetensors refuse to save the model later.
        return [part.clone() for part in tensor.split(list(sizes), dim=0)]

    def keep(self, keys: Sequence[str]) -> None:
        """Forget every key not in ``keys``."""
        wanted = set(keys)
        self.shapes = {k: v for k, v in self.shapes.items() if k in wanted}
        self._read = {k: v for k, v in self._read.items() if k in wanted}
        self._rows = {k: v for k, v in self._rows.items() if k in wanted}

    def rename(self, mapping: Mapping[str, str]) -> None:
        """Rename keys (old -> new)."""
        self.shapes = {mapping.get(k, k): v for k, v in self.shapes.items()}
        self._read = {mapping.get(k, k): v for k, v in self._read.items()}
        self._rows = {mapping.get(k, k): v for k, v in self._rows.items()}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=target)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _row_reader(path: Path, data_start: int, entry: Mapping[str, Any]) -> Callable[[int, int], torch.Tensor] | None:
    """Rows [start, stop) of a row-major safetensors tensor, read with ``readinto`` into a fresh tensor."""
    dtype, shape = _SAFETENSORS_DTYPES.get(entry["dtype"]), tuple(entry["shape"])
    if dtype is None or not shape or sys.byteorder != "little":
        return None
    row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
    begin = data_start + int(entry["data_offsets"][0])

    def read(start: int, stop: int) -> torch.Tensor:
        out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        with open(path, "rb", buffering=0) as handle:
            handle.seek(begin + start * row_bytes)
            done = 0
            while done < len(view):
                count = handle.readinto(view[done:])
                if not count:
                    raise WeightsError(path, "the file ended early (truncated?); re-download it")
                done += count
        return out

    return read


def _add_safetensors(checkpoint: Checkpoint, path: Path, stack: contextlib.ExitStack) -> None:
    header = read_safetensors_header(path)
    with open(path, "rb") as handle:
        data_start = 8 + struct.unpack("<Q", handle.read(8))[0]
    try:
        handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise WeightsError(path, f"safetensors cannot open it ({exc}); re-download it")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if name in checkpoint.shapes:
            raise WeightsError(path, f"tensor {name!r} appears in more than one shard; the shard set is inconsistent")
        checkpoint.shapes[name] = tuple(entry["shape"])
        checkpoint._read[name] = lambda handle=handle, name=name: handle.get_tensor(name)
        rows = _row_reader(path, data_start, entry)
        if rows is not None:
            checkpoint._rows[name] = rows


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise WeightsError(path, f"is a pickle checkpoint, which can run arbitrary code when loaded; {PICKLE_HINT}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(path, f"holds objects other than tensors, refused even with allow_pickle ({exc})")
    except Exception as exc:
        raise WeightsError(path, f"cannot be read as a torch checkpoint ({type(exc).__name__}: {exc})")
    # Training checkpoints often nest the weights; unwrap the usual containers.
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model", "module", "ema") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(path, f"holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


@contextlib.contextmanager
def open_checkpoint(files: Sequence[Path], allow_pickle: bool = False) -> Iterator[Checkpoint]:
    """Open weight files (safetensors shards or one pickle) as one :class:`Checkpoint`; handles close on exit."""
    checkpoint = Checkpoint(label=str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)")
    with contextlib.ExitStack() as stack:
        for path in files:
            if not path.is_file():
                raise WeightsError(path, "file not found; check the path (or the recipe's model source)")
            if path.suffix.lower() in PICKLE_SUFFIXES:
                tensors = _load_pickle(path, allow_pickle)
                for name, tensor in tensors.items():
                    checkpoint.shapes[name] = tuple(tensor.shape)
                    checkpoint._read[name] = lambda tensor=tensor: tensor
            else:
                _add_safetensors(checkpoint, path, stack)
        if not checkpoint.shapes:
            raise WeightsError(checkpoint.label, "holds no tensors")
        _strip_wrapper_prefix(checkpoint)
        yield checkpoint


def _strip_wrapper_prefix(checkpoint: Checkpoint) -> None:
    # DDP / torch.compile / Lightning wrappers prefix every key; stripping a prefix shared by *all* keys is safe.
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in checkpoint.shapes):
            checkpoint.rename({k: k[len(prefix):] for k in checkpoint.shapes})


def weights_fingerprint(path: str | Path) -> str:
    """A fast content fingerprint of a weights file or folder (sha256 hex), recorded as the base-model hash.

    A full sha256 of the 7 GB Stage C file takes tens of seconds on every run start, so safetensors files hash
    their header (every tensor's name, dtype, shape and offsets, plus metadata), the file size and sixteen 64 KiB
    samples spread over the data. The header alone would not tell two fine-tunes of one architecture apart; the
    samples do, because fine-tuning changes nearly every byte. Pickles have no header and are hashed in full.
    A folder combines the fingerprints of its weight files in name order.
    """
    path = Path(path)
    hasher = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
        if not files:
            raise WeightsError(path, "no weight files (.safetensors) in this folder")
        for file in files:
            hasher.update(f"{file.relative_to(path)}:{weights_fingerprint(file)}".encode())
        return hasher.hexdigest()
    if not path.is_file():
        raise WeightsError(path, "file not found")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                hasher.update(chunk)
            return hasher.hexdigest()
        read_safetensors_header(path)  # validates, so garbage gets a clear error rather than a hash
        (length,) = struct.unpack("<Q", handle.read(8))
        hasher.update(handle.read(length))
        hasher.update(str(size).encode())
        start, span = 8 + length, size - 8 - length
        for i in range(16):
            handle.seek(start + (span * i) // 16)
            hasher.update(handle.read(1 << 16))
    return hasher.hexdigest()


# ---------------------------------------------------------------------------------------------- resolving sources


@dataclass
class ResolvedWeights:
    """Where a model's weights are: the files and, for diffusers/transformers folders, the config.json."""

    files: list[Path]
    layout: str  # "official" | "diffusers" | "transformers"
    config_path: Path | None = None

    @property
    def path(self) -> Path:
        """The single file, or the folder of a sharded / diffusers checkpoint (what to fingerprint)."""
        return self.files[0] if len(self.files) == 1 and self.config_path is None else self.files[0].parent


def _parse_variant(kind: str, variant: str | None, dtype: torch.dtype) -> tuple[list[str], list[str], str | None]:
    """(sizes to try, precisions to try, leftover name) from e.g. ``"lite_bf16"``, ``"fp32"``, ``"canny"``."""
    sizes: list[str] = []
    precisions: list[str] = []
    rest: list[str] = []
    for token in re.split(r"[\s_\-]+", (variant or "").lower()):
        if token in ("big", "lite"):
            sizes.append(token)
        elif token in ("bf16", "fp32"):
            precisions.append(token)
        elif token:
            rest.append(token)
    if rest and kind != "controlnet":
        raise WeightsError(variant, "unknown variant; use big|lite and/or bf16|fp32, e.g. 'lite_bf16'")
    # The bf16 file is half the reading when bf16 is wanted; otherwise the fp32 file loses nothing.
    preferred = ["bf16", "fp32"] if dtype == torch.bfloat16 else ["fp32", "bf16"]
    return sizes or ["big", "lite"], precisions or preferred, "_".join(rest) or None


def _official_candidates(kind: str, sizes: list[str], precisions: list[str], name: str | None) -> list[str]:
    if kind in ("stage_c", "stage_b"):
        return [
            f"{kind}{'_lite' if size == 'lite' else ''}{'_bf16' if precision == 'bf16' else ''}.safetensors"
            for size in sizes for precision in precisions
        ]
    if kind == "controlnet":
        return [f"controlnet/{name}.safetensors"] if name else []
    return [_OFFICIAL_FILES[kind]] if kind in _OFFICIAL_FILES else []


def _weights_in_folder(folder: Path, precisions: list[str]) -> list[Path]:
    """Weight files of a diffusers/transformers folder: an index's shards, or the one file of the best precision."""

    def rank(name: str) -> int:
        # bf16/fp16 variants carry their name ("model.bf16.safetensors"); no tag means fp32.
        tag = next((t for t in ("bf16", "fp16") if f".{t}." in name or f".{t}-" in name), "fp32")
        order = [*precisions, "fp16"]
        return order.index(tag) if tag in order else len(order)

    for index in sorted(folder.glob("*.safetensors.index*.json"), key=lambda p: rank(p.name.replace("index.", ""))):
        shards = [folder / name for name in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))]
        if shards and all(shard.is_file() for shard in shards):  # an index whose shards were not fetched is no use
            return shards
    for suffixes in ((".safetensors",), PICKLE_SUFFIXES):
        files = sorted((p for p in folder.iterdir() if p.suffix in suffixes), key=lambda p: rank(p.name))
        if files:
            return [files[0]]
    return []


def _resolve_folder(kind: str, folder: Path, sizes: list[str], precisions: list[str], name: str | None):
    for candidate in _official_candidates(kind, sizes, precisions, name):
        if (folder / candidate).is_file():
            return ResolvedWeights([folder / candidate], "official")
    subfolders = list(dict.fromkeys(_SUBFOLDERS[kind][s] for s in sizes)) if kind in _SUBFOLDERS else []
    for sub in subfolders:
        if (folder / sub).is_dir():
            resolved = _resolve_model_folder(kind, folder / sub, precisions)
            if resolved is not None:
                return resolved
    resolved = _resolve_model_folder(kind, folder, precisions)
    if resolved is not None:
        return resolved
    expected = _official_candidates(kind, sizes, precisions, name) + [f"{s}/" for s in subfolders]
    raise WeightsError(
        folder, f"found no weights for {FAMILY_NAMES.get(kind, kind)} in this folder"
        + (f"; expected one of: {', '.join(expected)}" if expected else "") + "; or pass the weights file itself"
    )


def _resolve_model_folder(kind: str, folder: Path, precisions: list[str]) -> ResolvedWeights | None:
    """A folder holding one model: config.json plus weights (diffusers/transformers), or a single weights file."""
    config = folder / "config.json"
    files = _weights_in_folder(folder, precisions)
    if not files:
        return None
    if config.is_file():
        return ResolvedWeights(files, "diffusers" if kind in ("stage_c", "stage_b") else "transformers", config)
    # Without a config.json several files are ambiguous (e.g. a folder of different models): ask for the file.
    singles = [p for p in folder.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES)]
    if len(singles) > 1 and not any(folder.glob("*.index*.json")):
        raise WeightsError(folder, f"holds several weight files ({', '.join(sorted(p.name for p in singles)[:_SHOW])}) "
                           "and none is named for this model; pass the file path instead of the folder")
    return ResolvedWeights(files, "official")


def _looks_like_repo_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", source)) and not source.endswith(
        (".safetensors", *PICKLE_SUFFIXES)
    )


class WeightsNotCached(WeightsError):
    """A hub repo's weights are not in the local cache (raised by ``resolve_weights(local_only=True)``)."""


def download_command(repo: str, what: str = "") -> str:
    """The command that puts ``what`` (files or folders of ``repo``) in the hub cache (huggingface_hub's ``hf``)."""
    includes = " ".join(f'--include "{item}*"' if item.endswith("/") else item for item in what.split())
    return f"hf download {repo}" + (f" {includes}" if includes else "")


def _hub_error(repo: str, what: str, exc: Exception, local_only: bool = False) -> WeightsError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or local_only:
        fix = f"download it first (`{download_command(repo, what)}`)" + (
            " or unset HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else "")
    else:
        fix = (f"check the repo id, accept the licence on https://huggingface.co/{repo} and log in with "
               "`hf auth login`, or download the file and pass its path")
    where = "in the local Hugging Face cache" if constants.HF_HUB_OFFLINE or local_only else \
        "available from the Hugging Face hub or its cache"
    error_type = WeightsNotCached if constants.HF_HUB_OFFLINE or local_only else WeightsError
    return error_type(f"{repo} ({what})", f"no local path has this name and it is not {where} "
                      f"({type(exc).__name__}); {fix}")


def _hub_patterns(repo: str, subfolders: list[str], precision: str) -> list[str]:
    """Download patterns that fetch one precision only (the prior/ folder holds 14 GB fp32 *and* 7 GB bf16)."""
    known = repo.lower() in (OFFICIAL_REPO, PRIOR_REPO)
    places = [f"{sub}/" for sub in subfolders] + ([] if known else [""])
    if precision == "bf16":
        files = ["*.bf16*.safetensors", "*.index.bf16.json"]
    else:
        files = ["*model.safetensors", "*model-*-of-*.safetensors", "*model.safetensors.index.json"]
        if not known:
            files.append("*.safetensors")  # a user's repo may name its single file anything
    return [f"{place}{pattern}" for place in places for pattern in [*files, "config.json"]]


def resolve_weights(
    kind: str,
    source: str | os.PathLike,
    variant: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    cache_dir: str | os.PathLike | None = None,
    local_only: bool = False,
) -> ResolvedWeights:
    """Turn a file path, folder or hub repo id into the files holding ``kind``'s weights (no tensor is read).

    ``local_only``: look in the hub cache only (never download); a repo whose files are not cached raises
    :class:`WeightsNotCached`. That is how a recipe's sources are checked before a run starts.

    ``variant`` picks among published files: ``big``/``lite`` and ``bf16``/``fp32`` (e.g. ``"lite_bf16"``;
    precision defaults to bf16 when ``dtype`` is bf16) or, for ControlNets, ``canny``/``inpainting``/
    ``super_resolution``. Repo ids go through ``huggingface_hub`` (cache, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``
    or ``cache_dir``).
    """
    sizes, precisions, name = _parse_variant(kind, variant, dtype)
    path = Path(source).expanduser()
    if path.is_file():
        return ResolvedWeights([path], "official")
    if path.is_dir():
        return _resolve_folder(kind, path, sizes, precisions, name)
    text = str(source)
    if not _looks_like_repo_id(text):
        raise WeightsError(path, "file not found; check the path (or the recipe's model source)")
    from huggingface_hub import hf_hub_download, snapshot_download

    cache = str(cache_dir) if cache_dir is not None else None
    candidates = _official_candidates(kind, sizes, precisions, name)
    if text.lower() == OFFICIAL_REPO and candidates:
        error: Exception | None = None
        for candidate in candidates:
            try:
                return ResolvedWeights([Path(hf_hub_download(text, candidate, cache_dir=cache,
                                                             local_files_only=local_only))], "official")
            except Exception as exc:  # not cached / not published: try the next candidate
                error = error or exc
        raise _hub_error(text, candidates[0], error or RuntimeError("no candidate"), local_only)
    subfolders = list(dict.fromkeys(_SUBFOLDERS[kind][s] for s in sizes)) if kind in _SUBFOLDERS else []
    last_error: WeightsError | None = None
    for precision in precisions:
        try:
            folder = Path(snapshot_download(text, allow_patterns=_hub_patterns(text, subfolders, precision),
                                            cache_dir=cache, local_files_only=local_only))
        except Exception as exc:
            raise _hub_error(text, " ".join(f"{s}/" for s in subfolders) or kind, exc, local_only) from exc
        try:
            return _resolve_folder(kind, folder, sizes, [precision], name)
        except WeightsError as exc:
            last_error = exc
    assert last_error is not None
    # Name the repo and the model it lacks, not the snapshot folder the hub library fetched it into.
    places = " or ".join(f"{s}/" for s in subfolders) or "its top folder"
    raise WeightsError(text, f"this Hugging Face repo (as cached or downloaded) holds no weights for "
                       f"{FAMILY_NAMES.get(kind, kind)} in {places}; give the repo, folder or file that holds "
                       "them")


def check_source(kind: str, source: str | os.PathLike, variant: str | None = None,
                 dtype: torch.dtype = torch.bfloat16, cache_dir: str | os.PathLike | None = None,
                 local_only: bool = False) -> ResolvedWeights:
    """Resolve ``kind``'s weights and check from the safetensors headers alone that they are that kind of model.

    Reads no tensor, so it is cheap enough to run for every stage before a run or a generation starts.
    """
    resolved = resolve_weights(kind, source, variant, dtype, cache_dir, local_only=local_only)
    keys: list[str] = []
    for file in resolved.files:
        if file.suffix.lower() in PICKLE_SUFFIXES:
            return resolved  # no header to read without unpickling; checked when loaded
        keys += [k for k in read_safetensors_header(file) if k != "__metadata__"]
    checkpoint = Checkpoint(label=str(resolved.path), shapes={k: () for k in keys})
    _strip_wrapper_prefix(checkpoint)
    if resolved.layout == "diffusers":
        return resolved  # checked by name and shape when loaded
    _check_family(kind, checkpoint)
    return resolved


# --------------------------------------------------------------------------------------- what is in a checkpoint


def detect_family(keys: Sequence[str] | Mapping[str, Any]) -> str | None:
    """Which model family a key set belongs to (a key of :data:`FAMILY_NAMES`), or None."""
    keys = list(keys)
    has = set(keys).__contains__

    def starts(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if starts("lora_unet_") or starts("lora_prior_unet_") or any(".lora_down." in k or ".lora_A." in k for k in keys):
        return "adapter"
    if has("effnet_mapper.0.weight"):
        return "stage_b"
    if has("clip_txt_mapper.weight"):
        return "stage_c"
    if has("vquantizer.codebook.weight"):
        return "stage_a"
    if starts("projections.") and starts("backbone."):
        return "controlnet"
    if has("mapper.0.weight") and starts("backbone."):
        return "effnet"
    if starts("text_model.") and starts("vision_model."):
        return "clip"
    if starts("text_model."):
        return "text_encoder"
    if starts("vision_model."):
        return "image_encoder"
    if starts("visual."):
        return "open_clip"
    if keys and all(k.startswith("blocks.") for k in keys):
        return "previewer"
    return None


def _check_family(kind: str, checkpoint: Checkpoint) -> None:
    family = detect_family(checkpoint.shapes)
    # A full transformers CLIP checkpoint holds both towers; either loader takes its own half.
    if family == kind or (family == "clip" and kind in ("text_encoder", "image_encoder")):
        return
    looks = FAMILY_NAMES[family] if family else "none of the known model families"
    raise WeightsError(
        checkpoint.label, f"expected {FAMILY_NAMES[kind]} but the keys look like {looks} "
        f"(first keys: {', '.join(list(checkpoint.shapes)[:3])}); check which file goes where"
    )


def _mismatch(checkpoint: Checkpoint, expected: Mapping[str, tuple[int, ...]], target: str) -> None:
    """Raise WeightsError if names/shapes differ from ``expected`` (BatchNorm counters may be absent)."""
    found = checkpoint.shapes
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    mismatched = [(k, found[k], tuple(s)) for k, s in expected.items() if k in found and tuple(found[k]) != tuple(s)]
    if missing or unexpected or mismatched:
        raise WeightsError(checkpoint.label, str(StateDictMismatchError(target, missing, unexpected, mismatched)))


# --- constructor values from shapes (public so configs can be checked without any weights) ---


def _unet_layout(shapes: Mapping[str, Sequence[int]], family: str) -> dict[str, Any]:
    """Levels, widths, block patterns, counts and repeats of a Stage B/C key set."""
    markers = {"depthwise.weight": "C", "mapper.weight": "T", "attention.attn.in_proj_weight": "A"}
    found: dict[str, dict[int, dict[int, str]]] = {"down": defaultdict(dict), "up": defaultdict(dict)}
    repeats: dict[str, dict[int, set[int]]] = {"down": defaultdict(set), "up": defaultdict(set)}
    t_conds: list[str] = []
    for key in shapes:
        match = re.match(r"^(down|up)_blocks\.(\d+)\.(\d+)\.(.+)$", key)
        if match and match[4] in markers:
            found[match[1]][int(match[2])][int(match[3])] = markers[match[4]]
        elif match and match[4].startswith("mapper_") and match[4].endswith(".weight"):
            name = match[4][len("mapper_"):-len(".weight")]
            if name not in t_conds:
                t_conds.append(name)
        repeat = re.match(r"^(down|up)_repeat_mappers\.(\d+)\.(\d+)\.weight$", key)
        if repeat:
            repeats[repeat[1]][int(repeat[2])].add(int(repeat[3]))
    levels = len(found["down"])
    if levels == 0 or sorted(found["down"]) != list(range(levels)) or sorted(found["up"]) != list(range(levels)):
        raise ValueError(f"no consistent down_blocks/up_blocks levels: not {FAMILY_NAMES[family]} in official layout")
    level_config, blocks_down, blocks_up, c_hidden = [], [], [], []
    for level in range(levels):
        types = "".join(found["down"][level][i] for i in sorted(found["down"][level]))
        # The level's pattern (e.g. "CTA") is the shortest prefix whose repetition gives the whole level.
        period = next(p for p in range(1, len(types) + 1)
                      if len(types) % p == 0 and types[:p] * (len(types) // p) == types)
        level_config.append(types[:period])
        blocks_down.append(len(types) // period)
        first_res = min(i for i, t in found["down"][level].items() if t == "C")
        c_hidden.append(int(shapes[f"down_blocks.{level}.{first_res}.depthwise.weight"][0]))
    for j in range(levels):
        up_types = "".join(found["up"][j][i] for i in sorted(found["up"][j]))
        pattern = level_config[levels - 1 - j]
        if len(up_types) % len(pattern) or pattern * (len(up_types) // len(pattern)) != up_types:
            raise ValueError(f"up_blocks.{j} has block pattern {up_types!r}, not a repeat of {pattern!r}")
        blocks_up.append(len(up_types) // len(pattern))
    first_t = next(f"down_blocks.{lv}.{i}" for lv in range(levels) for i in sorted(found["down"][lv])
                   if found["down"][lv][i] == "T")
    first_c = next(f"down_blocks.{lv}.{i}" for lv in range(levels) for i in sorted(found["down"][lv])
                   if found["down"][lv][i] == "C")
    return dict(
        c_hidden=c_hidden, level_config=level_config, blocks=[blocks_down, blocks_up],
        block_repeat=[[len(repeats["down"][lv]) + 1 for lv in range(levels)],
                      [len(repeats["up"][j]) + 1 for j in range(levels)]],
        c_r=int(shapes[f"{first_t}.mapper.weight"][1]), t_conds=t_conds,
        kernel_size=int(shapes[f"{first_c}.depthwise.weight"][-1]),
    )


def _parameters(builder: Callable) -> dict[str, Any]:
    """Keyword parameters of a constructor with their defaults (``inspect.Parameter.empty`` if none)."""
    import inspect

    target = builder.__init__ if isinstance(builder, type) else builder
    return {n: p.default for n, p in inspect.signature(target).parameters.items() if n != "self"}


def _preset_for(family: str, c_hidden: Sequence[int], builder: Callable) -> dict[str, Any]:
    """Constructor kwargs (defaults filled in) of the preset with these widths, else {}."""
    import inspect

    defaults = {n: d for n, d in _parameters(builder).items() if d is not inspect.Parameter.empty}
    for preset in PRESETS.values():
        kwargs = {**defaults, **getattr(preset, family)}
        if list(kwargs.get("c_hidden", ())) == list(c_hidden):
            return kwargs
    return {}


def _unet_config(family: str, shapes: Mapping[str, Sequence[int]], hints: Mapping[str, Any]) -> dict[str, Any]:
    layout = _unet_layout(shapes, family)
    preset = _preset_for(family, layout["c_hidden"], _model_class(family))
    has_attn = ["A" in cfg for cfg in layout["level_config"]]
    config = dict(layout)
    # A file's key order says nothing about the order of t_conds, so take it from the preset/hints when the names
    # agree. (Numerically it rarely matters: sca and crp are 0 in every public path, so their embeddings match.)
    for source in (preset, hints):
        if set(source.get("t_conds", ())) == set(layout["t_conds"]):
            config["t_conds"] = list(source["t_conds"])
    head_dim_rule = [max(1, c // 64) if a else -1 for c, a in zip(layout["c_hidden"], has_attn)]
    config["nhead"] = list(preset.get("nhead") or head_dim_rule)
    config["dropout"] = list(preset.get("dropout") or [0.1 if a else 0.0 for a in has_attn])
    config["self_attn"] = preset.get("self_attn", True)
    patch = int(hints.get("patch_size", preset.get("patch_size", 1 if family == "stage_c" else 2)))
    c_in_total = int(shapes["embedding.1.weight"][1])
    if c_in_total % (patch * patch):
        patch = 1
    config.update(patch_size=patch, c_in=c_in_total // patch**2, c_out=int(shapes["clf.1.weight"][0]) // patch**2)
    attn_kv = next((shapes[k] for k in shapes if k.endswith(".kv_mapper.1.weight")), None)
    if family == "stage_c":
        c_cond = int(shapes["clip_txt_mapper.weight"][0])
        config.update(
            c_cond=c_cond, c_clip_text=int(shapes["clip_txt_mapper.weight"][1]),
            c_clip_text_pooled=int(shapes["clip_txt_pooled_mapper.weight"][1]),
            c_clip_seq=int(shapes["clip_txt_pooled_mapper.weight"][0]) // c_cond,
            c_clip_img=int(shapes["clip_img_mapper.weight"][1]),
            switch_level=list(preset.get("switch_level") or [False] * (len(layout["c_hidden"]) - 1)),
        )
    else:
        c_clip_seq = int(hints.get("c_clip_seq", preset.get("c_clip_seq", 4)))
        c_cond = int(attn_kv[1]) if attn_kv is not None else int(shapes["clip_mapper.weight"][0]) // c_clip_seq
        config.update(
            c_cond=c_cond, c_clip=int(shapes["clip_mapper.weight"][1]),
            c_clip_seq=int(shapes["clip_mapper.weight"][0]) // c_cond,
            c_effnet=int(shapes["effnet_mapper.0.weight"][1]), c_pixels=int(shapes["pixels_mapper.0.weight"][1]),
        )
    config.update({k: v for k, v in hints.items() if k in config or k in ("nhead", "dropout", "self_attn")})
    return config


def _count_indices(shapes: Mapping[str, Any], pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in shapes if (m := re.match(pattern, k))})


def infer_config(
    family: str, shapes: Mapping[str, Sequence[int]], hints: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Constructor keywords implied by a checkpoint's official key names and shapes.

    ``hints`` supplies what shapes cannot determine (head counts, dropout, t_conds order, ControlNet
    ``proj_blocks``); without hints these come from the preset of the same width, else ``nhead = width // 64``.
    Works for any size, including tiny test configs. Raises ValueError when the keys are not in official layout.
    """
    hints = dict(hints or {})
    try:
        if family in ("stage_c", "stage_b"):
            return _unet_config(family, shapes, hints)
        if family == "stage_a":
            down = _count_indices(shapes, r"^down_blocks\.(\d+)\.gammas$")
            up = _count_indices(shapes, r"^up_blocks\.(\d+)\.gammas$")
            codebook = shapes["vquantizer.codebook.weight"]
            return dict(levels=len(down), c_hidden=int(shapes[f"down_blocks.{down[-1]}.depthwise.1.weight"][0]),
                        bottleneck_blocks=len(up) - (len(down) - 1), c_latent=int(codebook[1]),
                        codebook_size=int(codebook[0]), scale_factor=float(hints.get("scale_factor", 0.43)))
        if family == "previewer":
            last = _count_indices(shapes, r"^blocks\.(\d+)\.weight$")[-1]
            return dict(c_in=int(shapes["blocks.0.weight"][1]), c_hidden=int(shapes["blocks.0.weight"][0]),
                        c_out=int(shapes[f"blocks.{last}.weight"][0]))
        if family == "controlnet":
            return _controlnet_config(shapes, hints)
        if family == "effnet":
            arch = {"arch": hints["arch"]} if "arch" in hints else {}
            return dict(c_latent=int(shapes["mapper.0.weight"][0]), **arch)
    except (KeyError, IndexError, StopIteration) as exc:
        raise ValueError(f"keys are not a complete {FAMILY_NAMES.get(family, family)} in official layout "
                         f"(missing {exc})") from exc
    raise ValueError(f"no config inference for family {family!r}")


def _controlnet_config(shapes: Mapping[str, Sequence[int]], hints: Mapping[str, Any]) -> dict[str, Any]:
    if "backbone.0.0.weight" in shapes:
        mode, c_in = "effnet", int(shapes["backbone.0.0.weight"][1])
    elif any(k.startswith("backbone.3.blocks.") for k in shapes):
        mode, c_in = "large", int(shapes["backbone.0.weight"][1])
    else:
        mode, c_in = "simple", int(shapes["backbone.0.weight"][1])
    count = len(_count_indices(shapes, r"^projections\.(\d+)\."))
    c_proj = int(shapes["projections.0.2.weight"][0])
    proj_blocks = hints.get("proj_blocks")
    if proj_blocks is None:
        proj_blocks = next((list(p.controlnet_proj_blocks) for p in PRESETS.values()
                            if p.controlnet_c_proj == c_proj and len(p.controlnet_proj_blocks) == count), None)
    if proj_blocks is None or len(proj_blocks) != count:
        raise ValueError(f"this ControlNet has {count} projections of width {c_proj} and no preset says which "
                         "ResBlocks they feed; pass config={'proj_blocks': [...]} with one index per projection")
    return dict(c_in=c_in, c_proj=c_proj, proj_blocks=list(proj_blocks),
                bottleneck_mode=hints.get("bottleneck_mode", mode))


# ------------------------------------------------------------------------------------------------ building


def _diffusers_hints(config_path: Path | None) -> dict[str, Any]:
    """Values a diffusers StableCascadeUNet config.json gives that shapes cannot (official keyword names)."""
    if config_path is None:
        return {}
    raw = json.loads(config_path.read_text())
    names = {"num_attention_heads": "nhead", "dropout": "dropout", "self_attn": "self_attn",
             "timestep_conditioning_type": "t_conds", "switch_level": "switch_level", "patch_size": "patch_size",
             "clip_seq": "c_clip_seq"}
    return {ours: raw[theirs] for theirs, ours in names.items() if raw.get(theirs) is not None}


def _diffusers_rename(checkpoint: Checkpoint, family: str) -> None:
    """Turn a diffusers checkpoint's names into official ones, in place and still lazily read.

    official.py's converter is applied to one attention q/k/v group at a time when a fused tensor is read, so at
    most one layer's parts exist twice.
    """
    convert = convert_diffusers_stage_c_keys if family == "stage_c" else convert_diffusers_stage_b_keys
    groups: dict[str, list[str]] = defaultdict(list)
    for key in checkpoint.shapes:
        match = re.match(r"^(.*\.attention)\.(to_q|to_k|to_v)\.(weight|bias)$", key)
        groups[f"{match[1]}|{match[3]}" if match else key].append(key)
    raw = Checkpoint(checkpoint.label, dict(checkpoint.shapes), dict(checkpoint._read), dict(checkpoint._rows))
    shapes: dict[str, tuple[int, ...]] = {}
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    rows: dict[str, Callable[[int, int], torch.Tensor]] = {}
    for members in groups.values():
        try:
            (official, meta), = convert({k: torch.empty(raw.shapes[k], device="meta") for k in members}).items()
        except StateDictMismatchError as exc:
            raise WeightsError(checkpoint.label, f"incomplete diffusers attention weights: {exc}") from exc
        shapes[official] = tuple(meta.shape)
        # Parts are read in the checkpoint's dtype; Checkpoint.get casts the fused result afterwards.
        readers[official] = lambda members=members, official=official: convert(
            {k: raw.get(k, None) for k in members})[official]
        if len(members) > 1 and all(k in raw._rows for k in members):
            # The fused tensor stacks the parts in q, k, v order (official.py); a split along those bounds reads
            # each part straight from its own file tensor.
            ordered = sorted(members, key=lambda k: _QKV.index(k.rsplit(".", 2)[-2]))
            rows[official] = _stacked_rows([(raw._rows[k], raw.shapes[k][0]) for k in ordered])
    checkpoint.shapes, checkpoint._read, checkpoint._rows = shapes, readers, rows


def _stacked_rows(parts: Sequence[tuple[Callable[[int, int], torch.Tensor], int]]
                  ) -> Callable[[int, int], torch.Tensor]:
    """Row reader of the concatenation of ``parts`` (reader, rows) along dim 0, reading only the rows asked for."""

    def read(start: int, stop: int) -> torch.Tensor:
        pieces, offset = [], 0
        for reader, count in parts:
            low, high = max(start, offset), min(stop, offset + count)
            if low < high:
                pieces.append(reader(low - offset, high - offset))
            offset += count
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    return read


def _assign_official(module: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype, device: Device) -> None:
    """Read official-named tensors one by one into ``module`` (built on meta), splitting fused attention.

    Does what ``load_official_state_dict(assign=True)`` does, but drops each fused tensor as soon as its q/k/v
    parts exist, so peak memory is one model plus one layer. The names come from official.py's own plan.
    """
    from .official import official_key_plan  # the single source of the official <-> module name mapping

    own = module.state_dict()
    state: dict[str, torch.Tensor] = {}
    for official, ours in official_key_plan(own.keys()):
        if official not in checkpoint.shapes:  # an absent BatchNorm counter (checked by _mismatch): start at 0
            state[ours[0]] = torch.zeros((), dtype=torch.long, device=device)
            continue
        if len(ours) == 1:
            state[ours[0]] = checkpoint.get(official, dtype, device)
            continue
        parts = checkpoint.get_split(official, [own[k].shape[0] for k in ours], dtype, device)
        state.update(zip(ours, parts))
        del parts
    module.load_state_dict(state, strict=True, assign=True)


def _model_class(kind: str) -> type:
    """The class whose constructor keywords a family's builder takes (presets' builders hide them in **kwargs)."""
    from .controlnet import ControlNet
    from .previewer import Previewer
    from .stage_a import StageA
    from .stage_b import StageB
    from .stage_c import StageC

    return {"stage_c": StageC, "stage_b": StageB, "stage_a": StageA, "previewer": Previewer,
            "controlnet": ControlNet}[kind]


def _finish(module: nn.Module, resolved: ResolvedWeights) -> nn.Module:
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: {len(leftover)} tensors were not loaded ({', '.join(leftover[:3])})")
    module.requires_grad_(False)
    module.eval()
    module.source_path = str(resolved.path)  # for weights_fingerprint / run metadata
    return module


def _empty_module(build: Callable[[], nn.Module]) -> nn.Module:
    # Parameters on meta (free), buffers real: non-persistent buffers (e.g. CLIP position_ids) are not in any
    # file and must exist after loading.
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def _load_official(
    kind: str, builder: Callable[..., nn.Module], source: Source, dtype: torch.dtype, device: Device,
    allow_pickle: bool, variant: str | None, config: Mapping[str, Any] | None, cache_dir: Source | None,
    check: Callable[[dict[str, Any], Checkpoint], None] | None = None,
) -> nn.Module:
    resolved = resolve_weights(kind, source, variant, dtype, cache_dir)
    with open_checkpoint(resolved.files, allow_pickle) as checkpoint:
        _check_family(kind, checkpoint)
        diffusers = resolved.layout == "diffusers"
        if diffusers:
            _diffusers_rename(checkpoint, kind)
        accepted = _parameters(_model_class(kind))
        hints = {k: v for k, v in _diffusers_hints(resolved.config_path if diffusers else None).items()
                 if k in accepted}
        hints.update(config or {})
        try:
            kwargs = {**infer_config(kind, checkpoint.shapes, hints), **dict(config or {})}
        except ValueError as exc:
            raise WeightsError(checkpoint.label, str(exc)) from exc
        if check is not None:
            check(kwargs, checkpoint)
        module = _empty_module(lambda: builder(**kwargs))
        expected = {k: tuple(v.shape) for k, v in official_state_dict(module).items()}
        _mismatch(checkpoint, expected, f"{type(module).__name__}({_short(kwargs)})")
        _assign_official(module, checkpoint, dtype, device)
    return _finish(module.to(device), resolved)


def _short(kwargs: Mapping[str, Any]) -> str:
    keep = ("c_hidden", "c_cond", "blocks", "nhead", "c_proj", "bottleneck_mode", "arch", "c_latent", "levels")
    return ", ".join(f"{k}={kwargs[k]}" for k in keep if k in kwargs)


# ---------------------------------------------------------------------------------------------- public loaders

_LOADER_DOC = """
    ``source``: a file (official names; safetensors, or a pickle with ``allow_pickle=True``), a folder (diffusers
    or a local copy of the hub repo) or a hub repo id. ``config`` overrides inferred constructor keywords.
    Returns the model frozen (``requires_grad=False``) in eval mode, parameters in ``dtype`` on ``device``.
"""


def load_stage_c(source: Source, dtype: torch.dtype = torch.bfloat16, device: Device = "cpu",
                 allow_pickle: bool = False, variant: str | None = None, config: Mapping[str, Any] | None = None,
                 cache_dir: Source | None = None) -> nn.Module:
    """Load Stage C (big, lite or any size, detected from shapes)."""
    return _load_official("stage_c", build_stage_c, source, dtype, device, allow_pickle, variant, config, cache_dir)


def load_stage_b(source: Source, dtype: torch.dtype = torch.bfloat16, device: Device = "cpu",
                 allow_pickle: bool = False, variant: str | None = None, config: Mapping[str, Any] | None = None,
                 cache_dir: Source | None = None) -> nn.Module:
    """Load Stage B (big, lite or any size, detected from shapes)."""
    return _load_official("stage_b", build_stage_b, source, dtype, device, allow_pickle, variant, config, cache_dir)


def load_stage_a(source: Source, dtype: torch.dtype = torch.float32, device: Device = "cpu",
                 allow_pickle: bool = False, config: Mapping[str, Any] | None = None,
                 cache_dir: Source | None = None) -> nn.Module:
    """Load Stage A (the VQGAN); official single file layout only."""
    return _load_official("stage_a", build_stage_a, source, dtype, device, allow_pickle, None, config, cache_dir)


def load_previewer(source: Source, dtype: torch.dtype = torch.float32, device: Device = "cpu",
                   allow_pickle: bool = False, config: Mapping[str, Any] | None = None,
                   cache_dir: Source | None = None) -> nn.Module:
    """Load the previewer (Stage C latents -> rough RGB)."""
    return _load_official("previewer", build_previewer, source, dtype, device, allow_pickle, None, config, cache_dir)


def load_controlnet(source: Source, c_proj_expected: int | None = None, dtype: torch.dtype = torch.bfloat16,
                    device: Device = "cpu", allow_pickle: bool = False, variant: str | None = None,
                    config: Mapping[str, Any] | None = None, cache_dir: Source | None = None) -> nn.Module:
    """Load an official-layout ControlNet; refuse one whose output width does not match the base Stage C.

    ``c_proj_expected`` is the width of the Stage C it will feed (2048 big, 1536 lite); ``variant`` names the
    published file (``canny``, ``inpainting``, ``super_resolution``) when ``source`` is the hub repo.
    """

    def check(kwargs: dict[str, Any], checkpoint: Checkpoint) -> None:
        if c_proj_expected is not None and kwargs["c_proj"] != c_proj_expected:
            raise WeightsError(
                checkpoint.label, f"this ControlNet projects to width {kwargs['c_proj']} but the base Stage C has "
                f"width {c_proj_expected}; use a ControlNet trained for this Stage C size (the published ones are "
                "for the 3.6B model, width 2048)"
            )

    return _load_official("controlnet", build_controlnet, source, dtype, device, allow_pickle, variant, config,
                          cache_dir, check)


def load_effnet(source: Source, dtype: torch.dtype = torch.float32, device: Device = "cpu",
                allow_pickle: bool = False, config: Mapping[str, Any] | None = None,
                cache_dir: Source | None = None) -> EffnetEncoder:
    """Load the semantic compressor (EfficientNetV2-S or the tiny variant, detected from shapes)."""
    resolved = resolve_weights("effnet", source, None, dtype, cache_dir)
    with open_checkpoint(resolved.files, allow_pickle) as checkpoint:
        _check_family("effnet", checkpoint)
        try:
            kwargs = {**infer_config("effnet", checkpoint.shapes), **dict(config or {})}
        except ValueError as exc:
            raise WeightsError(checkpoint.label, str(exc)) from exc
        archs = [kwargs.pop("arch")] if "arch" in kwargs else list(EFFNET_ARCHS)
        candidates = [_empty_module(lambda a=a: EffnetEncoder(a, **kwargs)) for a in archs]
        expected = [{k: tuple(v.shape) for k, v in c.state_dict().items()} for c in candidates]
        scores = [sum(checkpoint.shapes.get(k) == s for k, s in e.items()) for e in expected]
        best = max(range(len(candidates)), key=scores.__getitem__)
        _mismatch(checkpoint, expected[best], f"EffnetEncoder(arch={archs[best]!r})")
        encoder = candidates[best]
        state = {k: checkpoint.get(k, dtype, device) for k in checkpoint.shapes}
        for key in expected[best]:  # some exporters drop BatchNorm counters
            state.setdefault(key, torch.zeros((), dtype=torch.long))
        encoder.load_state_dict(state, strict=True, assign=True)
    return _finish(encoder.to(device), resolved)


def _clip_tower_config(kind: str, shapes: Mapping[str, Sequence[int]], resolved: ResolvedWeights,
                       config: Mapping[str, Any] | None) -> dict[str, Any]:
    """transformers CLIP config values from shapes, a config.json (full CLIP or one tower) and overrides."""
    text = kind == "text_encoder"
    tower = "text_model" if text else "vision_model"
    raw: dict[str, Any] = {}
    if resolved.config_path is not None:
        raw = json.loads(resolved.config_path.read_text())
        raw = {**raw.get("text_config" if text else "vision_config", {}),
               **({"projection_dim": raw["projection_dim"]} if "projection_dim" in raw and
                  ("text_config" in raw or "vision_config" in raw) else {}),
               **{k: v for k, v in raw.items() if k not in ("text_config", "vision_config")}}
    layers = len(_count_indices(shapes, rf"^{tower}\.encoder\.layers\.(\d+)\."))
    fc1 = shapes[f"{tower}.encoder.layers.0.mlp.fc1.weight"]
    values: dict[str, Any] = dict(num_hidden_layers=layers, intermediate_size=int(fc1[0]), hidden_size=int(fc1[1]))
    if text:
        values.update(vocab_size=int(shapes["text_model.embeddings.token_embedding.weight"][0]),
                      max_position_embeddings=int(shapes["text_model.embeddings.position_embedding.weight"][0]),
                      projection_dim=int(shapes["text_projection.weight"][0]))
        presets, default_act = TEXT_ENCODER_CONFIGS, "gelu"
    else:
        patch = shapes["vision_model.embeddings.patch_embedding.weight"]
        positions = int(shapes["vision_model.embeddings.position_embedding.weight"][0])
        values.update(patch_size=int(patch[-1]), num_channels=int(patch[1]),
                      image_size=int(math.isqrt(positions - 1)) * int(patch[-1]),
                      projection_dim=int(shapes["visual_projection.weight"][0]))
        presets, default_act = IMAGE_ENCODER_CONFIGS, "quick_gelu"
    preset = next((p for p in presets.values() if p["hidden_size"] == values["hidden_size"]), {})
    values["num_attention_heads"] = raw.get("num_attention_heads") or preset.get(
        "num_attention_heads", max(1, values["hidden_size"] // 64))
    values["hidden_act"] = raw.get("hidden_act") or preset.get("hidden_act", default_act)
    if raw.get("layer_norm_eps"):
        values["layer_norm_eps"] = raw["layer_norm_eps"]
    values.update(dict(config or {}))
    return values


def _load_clip_tower(kind: str, source: Source, dtype: torch.dtype, device: Device, allow_pickle: bool,
                     config: Mapping[str, Any] | None, cache_dir: Source | None) -> TextEncoder | ImageEncoder:
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    text = kind == "text_encoder"
    resolved = resolve_weights(kind, source, None, dtype, cache_dir)
    with open_checkpoint(resolved.files, allow_pickle) as checkpoint:
        _check_family(kind, checkpoint)
        # A full CLIP checkpoint holds both towers: keep the one asked for.
        shared = ("logit_scale", "logit_bias", "text_model.embeddings.position_ids",
                  "vision_model.embeddings.position_ids")  # old transformers saved position_ids
        other = (("vision_model.", "visual_projection.") if text else ("text_model.", "text_projection.")) + shared
        checkpoint.keep([k for k in checkpoint.shapes if not k.startswith(other)])
        try:
            values = _clip_tower_config(kind, checkpoint.shapes, resolved, config)
        except (KeyError, IndexError) as exc:
            raise WeightsError(checkpoint.label, f"not a complete transformers CLIP {'text' if text else 'vision'} "
                               f"tower (missing {exc})") from exc
        config_cls = CLIPTextConfig if text else CLIPVisionConfig
        model_cls = CLIPTextModelWithProjection if text else CLIPVisionModelWithProjection
        model = _empty_module(lambda: model_cls(config_cls(**values)))
        persistent = model.state_dict()
        _mismatch(checkpoint, {k: tuple(v.shape) for k, v in persistent.items()}, model_cls.__name__)
        state = {k: checkpoint.get(k, dtype, device) for k in checkpoint.shapes}
        model.load_state_dict(state, strict=True, assign=True)
    model = _finish(model.to(device), resolved)
    return TextEncoder(model) if text else ImageEncoder(model)


def load_text_encoder(source: Source, dtype: torch.dtype = torch.bfloat16, device: Device = "cpu",
                      allow_pickle: bool = False, config: Mapping[str, Any] | None = None,
                      cache_dir: Source | None = None) -> TextEncoder:
    """Load the CLIP text encoder (diffusers ``text_encoder/`` folder, a transformers CLIP folder/file, or repo).

    Loaded strictly (every key must match) rather than with ``from_pretrained``, which would silently leave
    missing weights randomly initialised.
    """
    return _load_clip_tower("text_encoder", source, dtype, device, allow_pickle, config, cache_dir)


def load_image_encoder(source: Source, dtype: torch.dtype = torch.bfloat16, device: Device = "cpu",
                       allow_pickle: bool = False, config: Mapping[str, Any] | None = None,
                       cache_dir: Source | None = None) -> ImageEncoder:
    """Load the CLIP image encoder (diffusers ``image_encoder/`` folder, transformers CLIP folder/file, or repo)."""
    return _load_clip_tower("image_encoder", source, dtype, device, allow_pickle, config, cache_dir)


_IP_ENCODER_WEIGHTS = {
    "openclip-vit-h-14": "an OpenCLIP ViT-H-14 checkpoint (keys visual.*), e.g. the hub repo "
                         "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "clip-vit-bigg-14": "an OpenCLIP ViT-bigG-14 checkpoint (keys visual.*), e.g. the hub repo "
                        "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    "clip-vit-l-14": "a transformers CLIP ViT-L/14 image tower, e.g. the image_encoder/ folder of "
                     "stabilityai/stable-cascade",
}


def ip_encoder_weights_hint(name: str) -> str:
    """What weights the IP-Adapter image encoder ``name`` loads from (for messages)."""
    return _IP_ENCODER_WEIGHTS.get(name, f"the weights of {name}")


def load_ip_image_encoder(name: str, source: Source, dtype: torch.dtype = torch.bfloat16, device: Device = "cpu",
                          allow_pickle: bool = False,
                          cache_dir: Source | None = None) -> ImageEncoder | OpenClipImageEncoder:
    """Load an IP-Adapter image encoder by name (see ``IP_IMAGE_ENCODERS``) from an OpenCLIP checkpoint
    (keys ``visual.*``; the text tower is ignored) or, for ``clip-vit-l-14``, a transformers checkpoint."""
    if name not in IP_IMAGE_ENCODERS:
        raise ValueError(f"unknown IP-Adapter image encoder {name!r}; choose one of {', '.join(IP_IMAGE_ENCODERS)}")
    spec = IP_IMAGE_ENCODERS[name]
    try:
        if spec["kind"] == "transformers":
            return load_image_encoder(source, dtype, device, allow_pickle, cache_dir=cache_dir)
        resolved = resolve_weights("open_clip", source, None, dtype, cache_dir)
        checkpoint_files = resolved.files
        with open_checkpoint(checkpoint_files, allow_pickle) as checkpoint:
            _check_family("open_clip", checkpoint)
            checkpoint.keep([k for k in checkpoint.shapes if k.startswith("visual.")])
            checkpoint.rename({k: k[len("visual."):] for k in checkpoint.shapes})
            visual = build_open_clip_visual(spec["model_name"], device="meta", **spec.get("overrides", {}))
            _mismatch(checkpoint, {k: tuple(v.shape) for k, v in visual.state_dict().items()}, f"OpenCLIP {name}")
            state = {k: checkpoint.get(k, dtype, device) for k in checkpoint.shapes}
            visual.load_state_dict(state, strict=True, assign=True)
    except WeightsError as exc:
        raise _wrong_encoder_source(exc, str(source), name) from None
    visual = _finish(visual.to(device), resolved)
    return OpenClipImageEncoder(visual, name=name)


def _wrong_encoder_source(exc: WeightsError, source: str, name: str) -> WeightsError:
    """The error of a source that does not hold the IP-Adapter image encoder ``name``, in the user's terms: a file
    of a hub repo is named by the repo and its path there (not huggingface_hub's snapshot folder), and the
    message says which model the encoder needs."""
    label, problem = exc.source, str(exc)[len(exc.source) + 2:]
    snapshot = re.search(r"[/\\]snapshots[/\\][0-9a-f]{40}(?:[/\\](.*))?$", label)
    if snapshot is not None and _looks_like_repo_id(source):
        label = f"{source} ({snapshot[1]})" if snapshot[1] else source
    return WeightsError(label, f"{problem.rstrip('.')}. The IP-Adapter image encoder {name} needs "
                        f"{ip_encoder_weights_hint(name)}; give it as adapter.ip_adapter.image_encoder_weights "
                        "(training) or --ip-image-encoder (generate)")


for _loader in (load_stage_c, load_stage_b, load_stage_a, load_previewer, load_controlnet, load_effnet):
    _loader.__doc__ = (_loader.__doc__ or "") + _LOADER_DOC
