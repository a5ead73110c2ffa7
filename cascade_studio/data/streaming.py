"""Streaming sources (``data.streaming: true``): webdataset shards read through fsspec, and hub datasets in
streaming mode, as an iterable dataset of decoded, preprocessed batches.

Order and splitting (docs/DESIGN.md, "Streaming data"):
- The readers are the ``processes x workers`` data-loader workers of a run (a run without workers has one per
  process); reader ``slot = rank * workers + worker``.
- Each reader's epoch ``e``: the shards are shuffled with ``(seed, e)`` and dealt round-robin, so reader ``s`` reads
  shards ``s, s + readers, ...`` of that order; every sample is read once per epoch by exactly one reader. Its
  samples pass a shuffle buffer of ``data.shuffle_buffer`` raw (undecoded) samples seeded by ``(seed, e, s)``.
- So the order is a pure function of (seed, processes, workers, the shards' contents). A reader's position is
  ``(epoch, samples it has passed on in that epoch)``; every batch carries the position after its last sample,
  the loop records the positions of the batches it used (``StreamPosition``), and a checkpoint saves them.
- Resume replays each reader's epoch from its start and passes over the samples already used without decoding
  them: the cost is re-reading (downloading) at most one epoch's share of each reader, never decoding it.
- A torch DataLoader takes batches from its workers in turn (worker 0, 1, ... 0, 1, ...), so after ``n`` used
  batches the next comes from worker ``n mod workers``; a resumed loader's worker ``w`` plays reader
  ``(w + n) mod workers`` and the run continues with exactly the batch it would have had.
"""
from __future__ import annotations

import logging
import random
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decoded import decoded_sample
from .images import BadImageError
from .sources import (
    _KEY_AND_EXTENSION,
    WEBDATASET_IMAGE_EXTENSIONS,
    DataSourceError,
    EmptyDatasetError,
    _caption_text,
    _cell_bytes,
    _control_suffixes,
    _expand_shards,
    _resolve_caption_column,
    expand_braces,
)

logger = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Skipped samples named in the log per reader; the rest are only counted.
_SKIPS_SHOWN = 5


@dataclass(frozen=True)
class RawSample:
    """One sample as read from a shard, not decoded: what a shuffle buffer holds (compressed bytes are small)."""

    key: str
    where: str
    caption: str
    image: bytes | None
    control: bytes | None = None
    problem: str | None = None  # why it cannot be used (then it is counted as skipped after the shuffle)


def is_url(path: str) -> bool:
    return bool(_URL.match(path))


def shard_urls(pattern: str) -> list[str]:
    """The shards ``data.path`` names, in order: local globs, folders and ``{000..009}`` ranges (as the scanned
    webdataset source reads them), or URLs with ranges (and globs on filesystems that list, such as s3:// or
    hf://). Raises ``DataSourceError`` when nothing matches."""
    if not is_url(pattern):
        shards = _expand_shards(pattern)
    else:
        shards = []
        for name in expand_braces(pattern):
            if any(c in name for c in "*?[") and not name.startswith(("http://", "https://")):
                import fsspec

                try:
                    fs, root = fsspec.core.url_to_fs(name)
                    shards += sorted(fs.unstrip_protocol(p) for p in fs.glob(root))
                except ImportError as exc:  # s3:// needs s3fs, gs:// gcsfs: fsspec names the package
                    raise DataSourceError(f"cannot list {name} ({exc}); install that package, or list the shards "
                                          "with a {000..099} range") from exc
            else:
                shards.append(name)
    if not shards:
        raise DataSourceError(f"no .tar shards match {pattern!r}; data.path takes a local glob, folder or "
                              "{000..009} range, or URLs such as https://host/shard-{000..009}.tar")
    return shards


# ---------------------------------------------------------------------------------------------------------------
# Shard readers: picklable descriptions (DataLoader workers open their own connections).


class TarShards:
    """webdataset ``.tar`` shards read front to back through fsspec (local files and any URL fsspec opens).

    The members of a sample are adjacent in the tar (``<key>.png``, ``<key>.txt``, ``<key>.<control>.png``), as
    webdataset writes them. Keys ending in a control suffix (``cat_control``) are control sidecars, never samples;
    the recipe's own suffix (``control_column: _control``) is the sample's control image when its members come
    right after the sample's (as a name-sorted tar has them).
    """

    def __init__(self, urls: list[str], caption_column: str | None, control_column: str | None) -> None:
        self.urls = list(urls)
        self.caption_extension = (caption_column or "txt").lower()
        self.control_prefix = control_column.lstrip(".") + "." if control_column else None
        self.control_suffix = control_column
        self.control_suffixes = _control_suffixes(control_column)

    def __len__(self) -> int:
        return len(self.urls)

    def samples(self, index: int) -> Iterator[RawSample]:
        url = self.urls[index]
        import fsspec

        try:
            handle = fsspec.open(url, "rb").open()
        except Exception as exc:  # fsspec/aiohttp/botocore raise many types; all mean "cannot open"
            raise DataSourceError(f"cannot open shard {url} ({type(exc).__name__}: {exc}); check the URL, the "
                                  "network and the credentials (s3:// reads the usual AWS settings)") from exc
        with handle:
            try:
                archive = tarfile.open(fileobj=handle, mode="r|")
            except tarfile.TarError as exc:
                raise DataSourceError(f"{url} is not a tar ({exc}); webdataset shards are .tar files") from exc
            try:
                yield from self._grouped(url, archive)
            except (tarfile.TarError, OSError, EOFError) as exc:
                # A shard cut short: what came before is used, the rest is counted as one skipped entry.
                yield RawSample(f"{url}::<rest>", url, "", None, problem=f"the shard is cut short ({exc})")

    def _grouped(self, url: str, archive: tarfile.TarFile) -> Iterator[RawSample]:
        """The archive's samples: adjacent members with one key, a ``<key><control suffix>`` group right after a
        sample joined to it as its control image."""
        groups = self._groups(archive)
        held = next(groups, None)
        for group in groups:
            key, members = group
            if held is not None and self.control_suffix and key == held[0] + self.control_suffix:
                image = next((members[x] for x in WEBDATASET_IMAGE_EXTENSIONS if x in members), None)
                if image is not None:
                    held[1]["\0control"] = image
                    continue
            if held is not None:
                yield self._sample(url, *held)
            held = group
        if held is not None:
            yield self._sample(url, *held)

    @staticmethod
    def _groups(archive: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
        key, members = None, {}
        for member in archive:
            match = _KEY_AND_EXTENSION.match(member.name)
            if not member.isfile() or not match or member.name.rsplit("/", 1)[-1].startswith((".", "_")):
                continue
            if match.group(1) != key:
                if key is not None:
                    yield key, members
                key, members = match.group(1), {}
            members[match.group(2).lower()] = archive.extractfile(member).read()  # type: ignore[union-attr]
        if key is not None:
            yield key, members

    def _sample(self, url: str, key: str, members: Mapping[str, bytes]) -> RawSample:
        where = f"{url}::{key}"
        if any(key.endswith(suffix) for suffix in self.control_suffixes):
            return RawSample(key, where, "", None, problem="control sidecar")
        image = next((members[x] for x in WEBDATASET_IMAGE_EXTENSIONS if x in members), None)
        control = members.get("\0control")
        if self.control_prefix and control is None:
            control = next((members[self.control_prefix + x] for x in WEBDATASET_IMAGE_EXTENSIONS
                            if self.control_prefix + x in members), None)
        caption = members.get(self.caption_extension, b"").decode("utf-8", errors="replace").strip()
        problem = None if image is not None else f"no .jpg/.png/.webp member (has {sorted(members)})"
        return RawSample(key, where, caption, image, control, problem)


class HubShards:
    """A Hugging Face dataset in streaming mode (``datasets.load_dataset(..., streaming=True)``); its own shards
    (the files it is stored in) are the unit dealt to readers."""

    def __init__(self, name: str, split: str, image_column: str, caption_column: str | None,
                 control_column: str | None) -> None:
        self.name, self.split, self.image_column = name, split, image_column
        self.caption_column, self.control_column = caption_column, control_column
        self._dataset: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}  # each worker opens its own stream

    def dataset(self) -> Any:
        if self._dataset is None:
            import datasets
            from datasets import Image as ImageFeature

            try:
                stream = datasets.load_dataset(self.name, split=self.split, streaming=True)
            except Exception as exc:  # hub/network/builder errors come in many types
                raise DataSourceError(f"cannot stream hub dataset {self.name!r} split {self.split!r} "
                                      f"({type(exc).__name__}: {exc}); check the name and the network") from exc
            columns = list(stream.features or {})
            if self.image_column not in columns:
                raise DataSourceError(f"{self.name} has no image column {self.image_column!r}; columns are "
                                      f"{columns}; set data.image_column")
            for column in (self.image_column, self.control_column):
                if column and isinstance(stream.features.get(column), ImageFeature):
                    stream = stream.cast_column(column, ImageFeature(decode=False))
            self.caption_key = _resolve_caption_column(columns, self.caption_column, self.name)
            self._dataset = stream
        return self._dataset

    def __len__(self) -> int:
        return int(self.dataset().num_shards)

    def samples(self, index: int) -> Iterator[RawSample]:
        stream = self.dataset()
        part = stream.shard(num_shards=stream.num_shards, index=index)
        # .iter(), not iter(): inside a DataLoader worker ``datasets`` would split the shard among the workers
        # again (worker 1 of 2 then reads nothing of a one-file shard); the readers already are that split.
        for row_number, rows in enumerate(part.iter(batch_size=1)):
            row = {column: values[0] for column, values in rows.items()}
            where = f"{self.name}[{self.split}] shard {index} row {row_number}"
            caption = _caption_text(row.get(self.caption_key)) if self.caption_key else ""
            try:
                image = _cell_bytes(row.get(self.image_column))
                control = _cell_bytes(row[self.control_column]) if self.control_column and \
                    row.get(self.control_column) is not None else None
            except (OSError, ValueError) as exc:
                yield RawSample(f"{index}:{row_number}", where, caption, None, problem=str(exc))
                continue
            yield RawSample(f"{index}:{row_number}", where, caption, image, control)


def open_stream_source(data_cfg: Any, control_column: str | None) -> TarShards | HubShards:
    """The shard reader of a streaming recipe (``data.source`` webdataset or hf_hub)."""
    if data_cfg.source == "webdataset":
        return TarShards(shard_urls(str(data_cfg.path)), data_cfg.caption_column, control_column)
    if data_cfg.source == "hf_hub":
        return HubShards(str(data_cfg.name or data_cfg.path), data_cfg.split, data_cfg.image_column,
                         data_cfg.caption_column, control_column)
    raise DataSourceError(f"data.source {data_cfg.source!r} cannot be streamed; use webdataset or hf_hub")


def probe_stream(data_cfg: Any, control_column: str | None, shown: int = 20) -> tuple[str, int]:
    """``cascade-studio validate --data`` for a stream: the shard count and a check of the first shard's images
    (reading the whole stream would defeat streaming). Returns the report and the first shard's usable images."""
    from .images import open_image

    source = open_stream_source(data_cfg, control_column)
    usable, skipped = 0, []
    for raw in source.samples(0):
        if raw.problem == "control sidecar":
            continue
        try:
            if raw.problem is not None:
                raise ValueError(raw.problem)
            open_image(raw.image, raw.where, max_pixels=data_cfg.max_pixels)  # type: ignore[arg-type]
            usable += 1
        except (BadImageError, ValueError) as exc:
            skipped.append(f"    {raw.where}: {getattr(exc, 'reason', exc)}")
    lines = [f"data: {data_cfg.path or data_cfg.name} (streamed: only the first shard is read here)",
             f"  {len(source)} shard(s); the first holds {usable} usable images, {len(skipped)} skipped"]
    if skipped:
        lines += ["  skipped:", *skipped[:shown]] + ([f"    ... and {len(skipped) - shown} more"]
                                                      if len(skipped) > shown else [])
    return "\n".join(lines), usable


# ---------------------------------------------------------------------------------------------------------------
# Order


def reader_shards(n_shards: int, seed: int, epoch: int, slot: int, readers: int) -> list[int]:
    """The shards reader ``slot`` of ``readers`` reads in ``epoch``: a seeded shuffle dealt round-robin."""
    order = list(range(n_shards))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order[slot::readers]


def buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a buffer of ``size``: fill it, then give out a random slot and refill it; the rest in
    random order at the end (webdataset's and ``datasets``' buffer shuffle)."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def reader_stream(source: Any, seed: int, slot: int, readers: int, buffer: int,
                  start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, int, RawSample]]:
    """Reader ``slot``'s endless ``(epoch, index, raw sample)`` stream from position ``start`` (epoch, samples
    already passed on in it): earlier samples of that epoch are read again but not yielded (nor decoded)."""
    if len(source) < readers:
        raise DataSourceError(f"{len(source)} shard(s) for {readers} readers (processes x data-loader workers): "
                              "every reader needs a shard of its own; write the data as more shards or lower "
                              "train.num_workers")
    epoch, skip = start
    while True:
        rng = random.Random(f"buffer:{seed}:{epoch}:{slot}")
        shards = reader_shards(len(source), seed, epoch, slot, readers)
        raw = (sample for shard in shards for sample in source.samples(shard))
        index = 0
        for sample in buffer_shuffle(raw, buffer, rng):
            if index >= skip:
                yield epoch, index, sample
            index += 1
        if index == 0:
            raise EmptyDatasetError(f"the shards of reader {slot} hold no sample in epoch {epoch}")
        epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------------
# The dataset


class StreamingDataset(IterableDataset):
    """Endless decoded, preprocessed batches of one process's readers (one per DataLoader worker).

    A batch is ``{"key": [...], "caption": [...], "image": [B, 3, H, W], ("control_image": ...),
    "stream_position": [slot, epoch, next index], "stream_skipped": n}``; ``positions`` and ``rotation`` (from
    :class:`StreamPosition`) say where each reader starts.
    """

    def __init__(self, source: Any, *, preprocessing: Mapping[str, Any], max_pixels: int, with_control: bool,
                 batch_size: int, seed: int, buffer: int, rank: int, processes: int, workers: int) -> None:
        self.source, self.preprocessing, self.max_pixels = source, dict(preprocessing), max_pixels
        self.with_control, self.batch_size, self.seed, self.buffer = with_control, batch_size, seed, buffer
        self.rank, self.processes, self.workers = rank, processes, max(1, workers)
        self.positions: dict[int, tuple[int, int]] = {}
        self.rotation = 0

    @property
    def readers(self) -> int:
        return self.processes * self.workers

    def at(self, position: "StreamPosition") -> "StreamingDataset":
        """A copy starting where ``position`` says the run is."""
        import copy

        view = copy.copy(self)
        view.positions = {int(k): (int(v[0]), int(v[1])) for k, v in position.positions.items()}
        view.rotation = position.batches % self.workers
        return view

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"internal error: the stream was laid out for {self.workers} workers, the loader has "
                               f"{info.num_workers}")
        slot = self.rank * self.workers + (worker + self.rotation) % self.workers
        batch: list[dict[str, Any]] = []
        skipped = good_in_epoch = 0
        start = self.positions.get(slot, (0, 0))
        current_epoch, whole_epoch = start[0], start[1] == 0  # a resumed epoch's rest may hold only bad samples
        for epoch, index, raw in reader_stream(self.source, self.seed, slot, self.readers, self.buffer, start):
            if epoch != current_epoch:
                if whole_epoch and good_in_epoch == 0:
                    raise EmptyDatasetError(f"no usable image in the shards of reader {slot} (epoch {current_epoch}); "
                                            "check the data (cascade-studio validate <recipe> --data on local shards)")
                current_epoch, good_in_epoch, whole_epoch = epoch, 0, True
            try:
                if raw.problem is not None:
                    raise ValueError(raw.problem)
                sample = decoded_sample(raw.key, raw.caption, raw.image, raw.where, self.preprocessing,  # type: ignore[arg-type]
                                        self.max_pixels, control=raw.control, control_where=raw.where,
                                        with_control=self.with_control)
            except (BadImageError, ValueError, OSError) as exc:
                if raw.problem != "control sidecar":
                    skipped += 1
                    if skipped <= _SKIPS_SHOWN:
                        logger.warning("skipped %s: %s", raw.where, getattr(exc, "reason", exc))
                continue
            good_in_epoch += 1
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate_stream(batch, [slot, epoch, index + 1], skipped)
                batch, skipped = [], 0

    def first_sample(self) -> dict[str, Any]:
        """The first usable sample of the first reader (a preview's reference input), decoded."""
        for _, _, raw in reader_stream(self.source, self.seed, 0, self.readers, 1):
            if raw.problem is None:
                try:
                    return decoded_sample(raw.key, raw.caption, raw.image, raw.where, self.preprocessing,  # type: ignore[arg-type]
                                          self.max_pixels, control=raw.control, with_control=self.with_control)
                except (BadImageError, ValueError, OSError):
                    continue
        raise EmptyDatasetError("the stream has no usable sample")


def collate_stream(samples: list[dict[str, Any]], position: list[int], skipped: int) -> dict[str, Any]:
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples]}
    for name in ("image", "control_image"):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    batch["stream_position"] = position
    batch["stream_skipped"] = skipped
    return batch


class StreamPosition:
    """Where a streaming run is: per reader, the position after the last sample of a batch the loop used.

    The loop's sampler for a stream (the counterpart of ``InfiniteSampler``): ``next_batch()`` before a batch is
    used, ``consumed(batch)`` after. ``state_dict()`` gathers every process's readers, so every process calls it
    (``save_checkpoint`` does).
    """

    def __init__(self, processes: int, workers: int) -> None:
        self.processes, self.workers = processes, max(1, workers)
        self.positions: dict[int, tuple[int, int]] = {}
        self.batches = 0  # batches used by each process (the same on every process)
        self.skipped = 0

    @property
    def epoch(self) -> int:
        return max((p[0] for p in self.positions.values()), default=0)

    def next_batch(self) -> list[int]:
        self.batches += 1
        return []

    def consumed(self, batch: Mapping[str, Any]) -> None:
        slot, epoch, after = batch["stream_position"]
        self.positions[int(slot)] = (int(epoch), int(after))
        self.skipped += int(batch.get("stream_skipped", 0))

    def state_dict(self) -> dict[str, Any]:
        mine = {"positions": {str(k): list(v) for k, v in self.positions.items()}, "skipped": self.skipped}
        parts = [mine]
        if self.processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([mine])
        positions = {k: v for part in parts for k, v in part["positions"].items()}
        return {"stream": {"processes": self.processes, "workers": self.workers, "batches": self.batches,
                           "positions": positions, "skipped": sum(int(p["skipped"]) for p in parts)}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        stream = state.get("stream")
        if stream is None:
            raise DataSourceError("the checkpoint was written by a run that did not stream its data; resume it "
                                  "with data.streaming: false")
        if (stream["processes"], stream["workers"]) != (self.processes, self.workers):
            raise DataSourceError(
                f"this streaming run was started with {stream['processes']} process(es) x {stream['workers']} "
                f"data-loader worker(s); its data order depends on both, so resume it with the same (now "
                f"{self.processes} x {self.workers}): set train.num_workers={stream['workers'] if stream['workers'] > 1 else 0} "
                "and launch as many processes")
        self.batches = int(stream["batches"])
        self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in stream["positions"].items()}
        self.skipped = int(stream["skipped"])
