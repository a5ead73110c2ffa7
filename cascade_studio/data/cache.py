"""Encode-once cache: frozen-encoder features per sample, stored in checksummed safetensors shards.

Stage C adapters train on features of frozen encoders (effnet latents, CLIP text and image embeddings). Those
never change between epochs when preprocessing is deterministic, so they are computed once and read back;
the official trainer re-runs every encoder every step (see STABLE_CASCADE.md section 7).

Layout of `cache_dir`:
    .lock                           filelock: one writer at a time across processes
    shards/shard-<id>.safetensors   up to `shard_size` samples; tensor names "<entry key>.<feature>"
    shards/shard-<id>.json          the shard's index: entries, and the sha256 of every tensor

An entry's key hashes the image content (plus control image), the caption, every encoder identity and the
preprocessing, so any change to one of them misses the cache instead of reusing stale features. Writes are
atomic (temporary file, fsync, rename) and the index is written after its shard, so a crash leaves at worst an
orphan shard that is ignored and removed. Shards whose bytes do not match their index are never trusted: they
are deleted with a warning and their entries encoded again.

The cache assumes deterministic preprocessing: `preprocessing["crop"]` must be "center". With random crops
every epoch sees different pixels, so the caller must not use the cache and encode on the fly instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .buckets import assign_bucket, make_buckets
from .images import resize_and_crop, to_tensor01
from .sources import Record

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
DEFAULT_SHARD_SIZE = 256
ENCODER_INPUTS = ("image", "caption", "control_image")
NULL_CAPTION = ""


@runtime_checkable
class FeatureEncoder(Protocol):
    """What the cache needs from a frozen encoder (a thin adapter over a models/ encoder).

    `inputs` says what `encode` receives: "image" and "control_image" give [3, H, W] float tensors in [0, 1]
    (all the same size within one call), "caption" gives strings. `encode` returns named features with the batch
    dimension first; names must be unique across the encoders of one cache (e.g. "clip_text", "clip_text_pooled").
    """

    name: str
    identity: str
    inputs: str

    def encode(self, batch: list) -> dict[str, torch.Tensor]: ...


class CacheError(RuntimeError):
    """The cache cannot be built or read as asked; the message says what to change."""


# ---------------------------------------------------------------------------------------------------------------
# Keys and preprocessing


def _canonical(preprocessing: Mapping[str, Any]) -> str:
    return json.dumps(dict(preprocessing), sort_keys=True, separators=(",", ":"), default=str)


def entry_key(
    content_hash: str, caption: str, encoder_identities: Sequence[str], preprocessing: Mapping[str, Any]
) -> str:
    """The cache key of one sample's features (order of the encoders does not matter)."""
    payload = json.dumps(
        {
            "format": CACHE_FORMAT,
            "content": content_hash,
            "caption": caption,
            "encoders": sorted(encoder_identities),
            "preprocessing": _canonical(preprocessing),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _null_key(caption_identities: Sequence[str]) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, "null_caption": sorted(caption_identities)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def training_preprocessing(data_cfg: Any) -> dict[str, Any]:
    """The preprocessing a run caches its images with (part of every cache key), from the recipe's ``data``
    section. The trainer crops every image to the square ``resolution`` (center): ``data.buckets`` is not applied
    yet (the loop's sampler does not keep a batch within one bucket)."""
    return {"resolution": data_cfg.resolution, "crop": data_cfg.crop}


def training_crop(image: Any, size_hw: tuple[int, int]) -> Any:
    """What the cache encodes of an image: resized to cover ``size_hw`` (from :func:`target_size`), then
    center-cropped (the studio's Data page shows the same)."""
    return resize_and_crop(image, size_hw, crop="center")


def target_size(width: int, height: int, preprocessing: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) an image is resized and cropped to: the square `resolution`, or with
    `preprocessing["buckets"]` the nearest constant-area bucket (`bucket_step`, `max_ratio` as in make_buckets)."""
    if "resolution" not in preprocessing:
        raise CacheError("preprocessing needs 'resolution' (the training resolution in pixels) for image encoders")
    resolution = int(preprocessing["resolution"])
    if not preprocessing.get("buckets"):
        return resolution, resolution
    buckets = make_buckets(resolution, int(preprocessing.get("bucket_step", 32)),
                           float(preprocessing.get("max_ratio", 2.0)))
    return buckets[assign_bucket(width, height, buckets)]


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 over dtype, shape and raw bytes (so a header-level change is caught as well as flipped bits)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
    if flat.numel():
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Shard files


def _shard_dir(cache_dir: Path) -> Path:
    return cache_dir / "shards"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file + fsync + rename: readers see the old file or the whole new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None:  # write() and fsync() do not say which file: a full disk must name it
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # persist the rename itself (directory entry); not possible on every platform
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


@dataclass(frozen=True)
class _Location:
    shard: Path
    features: dict[str, tuple[str, str]]  # feature -> (tensor name, sha256)


def _read_index(index_path: Path) -> dict[str, Any]:
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise ValueError(f"unknown index format {index.get('format') if isinstance(index, dict) else index!r}")
    return index


def _locations_of(index: Mapping[str, Any], shard: Path) -> dict[str, _Location]:
    tensors = index["tensors"]
    return {
        key: _Location(shard, {f: (f"{key}.{f}", tensors[f"{key}.{f}"]) for f in entry["features"]})
        for key, entry in index["entries"].items()
    }


def _verify_shard(shard: Path, index: Mapping[str, Any]) -> str | None:
    """None if every tensor loads and matches its recorded sha256, else what is wrong."""
    try:
        with safe_open(str(shard), framework="pt") as handle:
            names = set(handle.keys())
            expected = set(index["tensors"])
            if names != expected:
                return f"holds {len(names)} tensors, its index lists {len(expected)}"
            for name, digest in index["tensors"].items():
                if tensor_sha256(handle.get_tensor(name)) != digest:
                    return f"checksum mismatch in {name}"
    except Exception as exc:  # truncated/garbled files fail inside safetensors with several error types
        return f"cannot be read ({type(exc).__name__}: {exc})"
    return None


def _discard(shard: Path, index_path: Path, why: str) -> None:
    message = f"cache shard {shard.name} {why}; not trusted: its entries will be encoded again"
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)
    for path in (shard, index_path):
        path.unlink(missing_ok=True)


def _load_locations(cache_dir: Path, wanted: set[str] | None, verify: bool) -> dict[str, _Location]:
    """Entries of every committed shard; with `verify`, shards holding a wanted entry are checksummed first
    and discarded (deleted, with a warning) when anything is off. Only call with `verify` under the lock."""
    locations: dict[str, _Location] = {}
    directory = _shard_dir(cache_dir)
    if not directory.is_dir():
        return locations
    for index_path in sorted(directory.glob("shard-*.json")):
        shard = index_path.with_suffix(".safetensors")
        try:
            index = _read_index(index_path)
            found = _locations_of(index, shard)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            if verify:
                _discard(shard, index_path, f"has an unreadable index ({exc})")
            continue
        if verify and (wanted is None or wanted & found.keys()):
            problem = _verify_shard(shard, index)
            if problem:
                _discard(shard, index_path, problem)
                continue
        for key, location in found.items():
            locations.setdefault(key, location)
    return locations


def _remove_leftovers(cache_dir: Path) -> None:
    """Delete temporary files and orphan shards (shard written, index not): crashed writers' debris.
    Safe only under the lock, when no other writer can be mid-write."""
    directory = _shard_dir(cache_dir)
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    for shard in directory.glob("shard-*.safetensors"):
        if not shard.with_suffix(".json").exists():
            shard.unlink(missing_ok=True)


class _ShardWriter:
    """Collects encoded entries and commits them `shard_size` at a time (shard first, then its index)."""

    def __init__(self, cache_dir: Path, shard_size: int, commit_lock: "_Locked | None" = None) -> None:
        self.directory = _shard_dir(cache_dir)
        self.shard_size = shard_size
        self.commit_lock = commit_lock  # sharded builds: each commit under the cache's lock, not the whole build
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.written: dict[str, _Location] = {}

    def add(self, key: str, features: dict[str, torch.Tensor]) -> None:
        self.pending[key] = features
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tensors = {f"{key}.{name}": t for key, feats in self.pending.items() for name, t in feats.items()}
        index = {
            "format": CACHE_FORMAT,
            "entries": {key: {"features": sorted(feats)} for key, feats in self.pending.items()},
            "tensors": {name: tensor_sha256(t) for name, t in tensors.items()},
        }
        shard_id = hashlib.sha256("\n".join(sorted(self.pending)).encode()).hexdigest()[:24]
        shard = self.directory / f"shard-{shard_id}.safetensors"
        with self.commit_lock if self.commit_lock is not None else contextlib.nullcontext():
            _atomic_write(shard, safetensors_bytes(tensors, metadata={"format": str(CACHE_FORMAT)}))
            _atomic_write(shard.with_suffix(".json"), json.dumps(index, indent=0).encode())  # the commit point
        self.written.update(_locations_of(index, shard))
        self.pending = {}


# ---------------------------------------------------------------------------------------------------------------
# Building


def validate_encoders(encoders: Sequence[FeatureEncoder]) -> None:
    names = [e.name for e in encoders]
    if len(set(names)) != len(names):
        raise CacheError(f"encoder names must be unique, got {names}")
    for encoder in encoders:
        if encoder.inputs not in ENCODER_INPUTS:
            raise CacheError(f"encoder {encoder.name!r} has inputs={encoder.inputs!r}; use one of {ENCODER_INPUTS}")


def encode_checked(encoder: FeatureEncoder, batch: list, expected: int) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        features = encoder.encode(batch)
    for name, tensor in features.items():
        if tensor.ndim == 0 or tensor.shape[0] != expected:
            raise CacheError(f"encoder {encoder.name!r} returned {name!r} with shape {tuple(tensor.shape)} for "
                             f"{expected} inputs; the batch dimension must come first")
    return features


def _inputs_for(kind: str, records: Sequence[Record], size: tuple[int, int] | None) -> list:
    if kind == "caption":
        return [r.caption for r in records]
    batch = []
    for record in records:
        image = record.load_image() if kind == "image" else record.load_control()
        if image is None:
            raise CacheError(f"{record.path} has no control image but an encoder needs one; add a control sidecar "
                             "or drop the records listed in ScanResult.missing_controls")
        batch.append(to_tensor01(training_crop(image, size)))  # type: ignore[arg-type]
    return batch


def merge_features(per_encoder: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The features of several encoders as one dict (two encoders may not return the same name)."""
    merged: dict[str, torch.Tensor] = {}
    for features in per_encoder:
        clash = merged.keys() & features.keys()
        if clash:
            raise CacheError(f"two encoders return the feature(s) {sorted(clash)}; rename one")
        merged.update(features)
    return merged


def _split_batch(per_encoder: list[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
    merged = merge_features(per_encoder)
    # clone(): each sample owns its storage (safetensors refuses tensors that share memory)
    return [{name: t[i].detach().cpu().contiguous().clone() for name, t in merged.items()} for i in range(count)]


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Locked:
    """The cache directory's file lock, saying why it waits when another process holds it."""

    def __init__(self, cache_dir: Path) -> None:
        self.lock = FileLock(str(cache_dir / ".lock"))
        self.cache_dir = cache_dir

    def __enter__(self) -> None:
        try:
            self.lock.acquire(timeout=0.05)
        except Timeout:
            logger.info("waiting for another process writing the cache at %s", self.cache_dir)
            self.lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.lock.release()


def build_cache(
    records: Sequence[Record],
    encoders: Sequence[FeatureEncoder],
    cache_dir: str | os.PathLike[str],
    preprocessing: Mapping[str, Any],
    batch_size: int = 8,
    progress: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
    share: tuple[int, int] = (0, 1),
    barrier: Callable[[], None] | None = None,
) -> "CachedDataset":
    """Encode what is not cached yet and return a dataset reading every record's features from the cache.

    One process (``share=(0, 1)``) holds the cache folder's file lock for the whole build, so a second process
    building the same cache waits and then finds everything done (it calls no encoder).

    Sharded (``share=(rank, processes)``, every process of a run calls it with the same records and its
    ``barrier``): rank 0 clears crashed writers' debris and checks the existing shards under the lock; then every
    rank encodes its share of the missing entries (every ``processes``-th encoder batch of the single-process
    plan, so each batch and its features are the ones one process would make) and commits its own shards, each
    shard and its index under the lock; after the last barrier every rank reads all of them. Shard names hash
    their entries, so ranks never write the same file.

    Raises `CacheError` for random crops (not cacheable: encode on the fly instead) and for encoders that break
    the `FeatureEncoder` contract. ``CachedDataset.encoded`` says how many entries this call encoded.
    """
    if preprocessing.get("crop", "center") != "center":
        raise CacheError("preprocessing crop must be 'center' to cache: random crops differ every epoch, so "
                         "disable the cache (encode on the fly) when training with random crops")
    rank, processes = share
    if not 0 <= rank < processes:
        raise ValueError(f"share {share}: the rank must be in 0..processes-1")
    if processes > 1 and barrier is None:
        raise ValueError("a sharded build needs the processes' barrier")
    validate_encoders(encoders)
    cache_path = Path(cache_dir)
    _shard_dir(cache_path).mkdir(parents=True, exist_ok=True)
    identities = [e.identity for e in encoders]
    caption_encoders = [e for e in encoders if e.inputs == "caption"]
    needs_size = any(e.inputs != "caption" for e in encoders)
    keys = [entry_key(r.content_hash, r.caption, identities, preprocessing) for r in records]
    sizes = [target_size(r.width, r.height, preprocessing) if needs_size else None for r in records]
    null_key = _null_key([e.identity for e in caption_encoders]) if caption_encoders else None
    wanted = set(keys) | ({null_key} if null_key else set())

    def encode_missing(locations: dict[str, _Location], writer: _ShardWriter) -> int:
        encoded = 0
        if null_key and null_key not in locations and rank == 0:
            null_features = [encode_checked(e, [NULL_CAPTION], 1) for e in caption_encoders]
            writer.add(null_key, _split_batch(null_features, 1)[0])
            encoded += 1
        first_of_key: dict[str, int] = {}
        for index, key in enumerate(keys):
            if key not in locations:
                first_of_key.setdefault(key, index)  # identical samples are encoded once
        # Same-size samples together, so every encoder call gets images it can stack.
        pending = sorted(first_of_key.values(), key=lambda i: (sizes[i] or (0, 0), i))
        groups: dict[Any, list[int]] = {}
        for index in pending:
            groups.setdefault(sizes[index], []).append(index)
        plan = [(size, chunk) for size, members in groups.items() for chunk in _batches(members, batch_size)]
        mine = plan[rank::processes]
        with tqdm(total=sum(len(c) for _, c in mine), desc="encoding cache", unit="img", disable=not progress) as bar:
            for size, chunk in mine:
                chunk_records = [records[i] for i in chunk]
                outputs = [encode_checked(e, _inputs_for(e.inputs, chunk_records, size), len(chunk)) for e in encoders]
                for index, features in zip(chunk, _split_batch(outputs, len(chunk))):
                    writer.add(keys[index], features)
                encoded += len(chunk)
                bar.update(len(chunk))
        writer.flush()
        return encoded

    if processes == 1:
        with _Locked(cache_path):
            _remove_leftovers(cache_path)
            locations = _load_locations(cache_path, wanted, verify=True)
            writer = _ShardWriter(cache_path, shard_size)
            encoded = encode_missing(locations, writer)
            locations.update(writer.written)
    else:
        if rank == 0:
            with _Locked(cache_path):  # no other rank writes before the barrier: debris is really debris
                _remove_leftovers(cache_path)
                _load_locations(cache_path, wanted, verify=True)  # drops shards that fail their checksums
        barrier()
        writer = _ShardWriter(cache_path, shard_size, commit_lock=_Locked(cache_path))
        encoded = encode_missing(_load_locations(cache_path, wanted, verify=False), writer)
        barrier()
        locations = _load_locations(cache_path, wanted, verify=False)  # every rank's shards (reads checksum)
        missing = wanted - locations.keys()
        if missing:
            raise CacheError(f"{len(missing)} cache entries are missing after every process encoded its share; "
                             f"is {cache_path} on storage every process shares (same path on every machine)?")

    dataset = CachedDataset(
        keys=keys,
        record_keys=[r.key for r in records],
        captions=[r.caption for r in records],
        sizes=sizes,
        locations={k: locations[k] for k in wanted},
        null_key=null_key,
    )
    dataset.encoded = encoded
    return dataset


def read_cache(cache_dir: str | os.PathLike[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Every entry of a cache with its features, checksummed (for checks and tools; small caches only)."""
    entries = {}
    for key, location in _load_locations(Path(cache_dir), wanted=None, verify=False).items():
        with safe_open(str(location.shard), framework="pt") as handle:
            features = {}
            for feature, (name, digest) in location.features.items():
                features[feature] = handle.get_tensor(name)
                if tensor_sha256(features[feature]) != digest:
                    raise CacheError(f"cache shard {location.shard} is corrupt (checksum mismatch for {name})")
        entries[key] = features
    return entries


def cache_status(
    records: Sequence[Record],
    encoder_identities: Sequence[str],
    cache_dir: str | os.PathLike[str],
    preprocessing: Mapping[str, Any],
) -> tuple[int, int]:
    """(records already cached, records) for the UI: reads only the shard indexes, needs no encoder loaded and
    no lock (indexes are replaced atomically). Checksums are verified by `build_cache`, not here."""
    found = _load_locations(Path(cache_dir), wanted=None, verify=False)
    keys = [entry_key(r.content_hash, r.caption, encoder_identities, preprocessing) for r in records]
    return sum(key in found for key in keys), len(records)


# ---------------------------------------------------------------------------------------------------------------
# Reading


# Shards a dataset keeps open per process (each a memory-mapped file; random access touches a few at a time).
_OPEN_SHARDS = 8


class CachedDataset(Dataset):
    """Per-sample cached features: item i is {"key", "caption", <feature name>: tensor without batch dim}.

    Holds only strings and file locations (cheap to send to DataLoader workers). Every tensor read is checked
    against its recorded sha256; a mismatch raises `CacheError` (build the cache again to re-encode).
    `sizes[i]` is the (height, width) sample i was preprocessed to; `bucket_ids()` numbers them for
    `BucketBatchSampler`.
    """

    def __init__(
        self,
        keys: list[str],
        record_keys: list[str],
        captions: list[str],
        sizes: list[tuple[int, int] | None],
        locations: dict[str, _Location],
        null_key: str | None,
    ) -> None:
        self.keys = keys
        self.record_keys = record_keys
        self.captions = captions
        self.sizes = sizes
        self._locations = locations
        self._null_key = null_key
        self._handles: OrderedDict[Path, Any] = OrderedDict()  # open shards of this process, most recent last
        self._handles_pid = os.getpid()
        self.encoded = 0  # entries the build that made this dataset encoded (0: all read from the cache)

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the locations, not this process's open files (each worker opens its own).
        return {**self.__dict__, "_handles": OrderedDict()}

    def _shard(self, path: Path) -> Any:
        """An open handle on ``path``, kept for the next items: opening a shard (its header and the mapping of its
        file) cost about 70% of reading one item; a shard holds hundreds of items, read in a row or near it."""
        if self._handles_pid != os.getpid():  # a forked DataLoader worker opens its own files
            self._handles, self._handles_pid = OrderedDict(), os.getpid()
        handle = self._handles.pop(path, None)
        if handle is None:
            handle = safe_open(str(path), framework="pt")
            while len(self._handles) >= _OPEN_SHARDS:
                self._handles.popitem(last=False)
        self._handles[path] = handle
        return handle

    def _read(self, key: str) -> dict[str, torch.Tensor]:
        location = self._locations[key]
        features = {}
        try:
            handle = self._shard(location.shard)
            for feature, (name, digest) in location.features.items():
                tensor = handle.get_tensor(name)
                if tensor_sha256(tensor) != digest:
                    raise CacheError(f"checksum mismatch for {name}")
                features[feature] = tensor
        except CacheError as exc:
            self._handles.pop(location.shard, None)
            raise CacheError(f"cache shard {location.shard} is corrupt ({exc}); run build_cache again") from exc
        except Exception as exc:  # missing or truncated file: safetensors raises several types
            self._handles.pop(location.shard, None)
            raise CacheError(f"cannot read cache shard {location.shard} ({exc}); run build_cache again") from exc
        return features

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"key": self.record_keys[index], "caption": self.captions[index]}
        item.update(self._read(self.keys[index]))
        return item

    def null_features(self) -> dict[str, torch.Tensor]:
        """Caption-encoder features of the empty caption (no batch dim), for caption dropout and CFG."""
        if self._null_key is None:
            raise CacheError("no caption encoder was given to build_cache, so there are no empty-caption features")
        return self._read(self._null_key)

    def bucket_ids(self) -> list[int]:
        """One integer per sample, equal for samples of the same preprocessed size."""
        numbering = {size: i for i, size in enumerate(sorted({s for s in self.sizes if s is not None}))}
        return [numbering.get(size, 0) for size in self.sizes]  # type: ignore[arg-type]
