"""The encode-once cache: hits call no encoder, corruption is never trusted, crashes and concurrent writers are safe."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import cascade_studio.data.cache as cache_module
from cascade_studio.config.schema import DataConfig
from cascade_studio.data import (
    BucketBatchSampler,
    CacheError,
    build_cache,
    cache_status,
    scan_source,
)

PRE = {"resolution": 64, "crop": "center"}
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


class ToyImageEncoder:
    """Counts calls; features are exact functions of the pixels so tests can check the values."""

    name = "toy_image"
    inputs = "image"

    def __init__(self, identity: str = "toy-image-v1", sleep: float = 0.0) -> None:
        self.identity = identity
        self.sleep = sleep
        self.calls = 0
        self.items = 0

    def encode(self, batch: list) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.items += len(batch)
        time.sleep(self.sleep)
        pixels = torch.stack(batch)  # fails unless every image of a call has the same size
        return {"latent": F.avg_pool2d(pixels, 32), "mean_rgb": pixels.mean(dim=(2, 3))}


def caption_vector(caption: str) -> torch.Tensor:
    seed = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))


class ToyTextEncoder:
    name = "toy_text"
    inputs = "caption"

    def __init__(self, identity: str = "toy-text-v1", sleep: float = 0.0) -> None:
        self.identity = identity
        self.sleep = sleep
        self.calls = 0
        self.items = 0

    def encode(self, batch: list) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.items += len(batch)
        time.sleep(self.sleep)
        hidden = torch.stack([caption_vector(c) for c in batch]).to(torch.bfloat16)
        return {"text": hidden, "text_pooled": hidden.float().mean(dim=1, keepdim=True)}


class ToyControlEncoder:
    name = "toy_control"
    inputs = "control_image"
    identity = "toy-control-v1"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, batch: list) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"hint": torch.stack(batch).mean(dim=1, keepdim=True)}


def make_folder(root: Path, count: int = 5, sizes: list[tuple[int, int]] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = sizes[i] if sizes else (64, 64)
        Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"caption {i}")
        Image.new("L", size, 40 * i).save(root / f"{i:02d}_control.png")
    return root


def shard_indexes(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "shards").glob("shard-*.json"))


def snapshot(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (cache_dir / "shards").iterdir()}


def test_second_build_calls_no_encoder_and_values_are_right(tmp_path: Path) -> None:
    records = scan_source(DataConfig(path=str(make_folder(tmp_path / "data")))).records
    image, text = ToyImageEncoder(), ToyTextEncoder()
    cache_dir = tmp_path / "cache"
    assert cache_status(records, [image.identity, text.identity], cache_dir, PRE) == (0, 5)

    first = build_cache(records, [image, text], cache_dir, PRE, batch_size=2, progress=False, shard_size=3)
    assert (image.items, text.items) == (5, 5 + 1)  # + the empty caption, encoded once for caption dropout
    assert image.calls == 3  # batches of 2
    assert len(shard_indexes(cache_dir)) == 2  # 6 entries, 3 per shard

    again_image, again_text = ToyImageEncoder(), ToyTextEncoder()
    second = build_cache(records, [again_text, again_image], cache_dir, PRE, progress=False)  # order irrelevant
    assert again_image.calls == 0 and again_text.calls == 0
    assert cache_status(records, [text.identity, image.identity], cache_dir, PRE) == (5, 5)

    assert len(second) == 5
    for index, record in enumerate(records):
        item = second[index]
        assert item["key"] == record.key and item["caption"] == f"caption {index}"
        expected_rgb = torch.tensor(COLOURS[index], dtype=torch.float32) / 255
        assert torch.allclose(item["mean_rgb"], expected_rgb)
        assert item["latent"].shape == (3, 2, 2)
        assert item["text"].dtype == torch.bfloat16  # stored as the encoder returned it
        assert torch.equal(item["text"], caption_vector(f"caption {index}").to(torch.bfloat16))
        assert all(torch.equal(first[index][k], item[k]) for k in ("latent", "mean_rgb", "text", "text_pooled"))
    null = second.null_features()
    assert set(null) == {"text", "text_pooled"}
    assert torch.equal(null["text"], caption_vector("").to(torch.bfloat16))


def test_open_shards_are_reused_bounded_and_not_shared_with_loader_workers(tmp_path: Path) -> None:
    """Reading keeps a few shards open (opening one was most of an item's read time); a DataLoader's worker
    processes read the same tensors with files of their own."""
    import pickle

    from torch.utils.data import DataLoader

    from cascade_studio.data import cache as cache_module

    records = scan_source(DataConfig(path=str(make_folder(tmp_path / "data", count=12)))).records
    dataset = build_cache(records, [ToyImageEncoder(), ToyTextEncoder()], tmp_path / "cache", PRE, progress=False,
                          shard_size=1)  # one item per shard: the most files to open
    expected = [dataset[i]["mean_rgb"] for i in range(len(dataset))]
    assert 0 < len(dataset._handles) <= cache_module._OPEN_SHARDS < len(dataset)
    assert pickle.loads(pickle.dumps(dataset))._handles == {}  # workers under spawn start with none
    loader = DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=lambda item: item)
    read = {item["key"]: item["mean_rgb"] for item in loader}
    assert all(torch.equal(read[dataset[i]["key"]], expected[i]) for i in range(len(dataset)))


def test_what_misses_the_cache(tmp_path: Path) -> None:
    records = scan_source(DataConfig(path=str(make_folder(tmp_path / "data")))).records
    cache_dir = tmp_path / "cache"
    build_cache(records, [ToyImageEncoder(), ToyTextEncoder()], cache_dir, PRE, progress=False)

    (tmp_path / "data" / "01.txt").write_text("a new caption")  # one caption edited
    edited = scan_source(DataConfig(path=str(tmp_path / "data"))).records
    assert cache_status(edited, ["toy-image-v1", "toy-text-v1"], cache_dir, PRE) == (4, 5)
    image, text = ToyImageEncoder(), ToyTextEncoder()
    build_cache(edited, [image, text], cache_dir, PRE, progress=False)
    assert (image.items, text.items) == (1, 1)

    image, text = ToyImageEncoder(identity="toy-image-v2"), ToyTextEncoder()  # new encoder weights
    build_cache(edited, [image, text], cache_dir, PRE, progress=False)
    assert (image.items, text.items) == (5, 5)  # the null caption is still cached: text identity unchanged

    image = ToyImageEncoder()
    build_cache(edited, [image, ToyTextEncoder()], cache_dir, {"resolution": 96, "crop": "center"}, progress=False)
    assert image.items == 5


def test_duplicates_encoded_once_and_buckets_batched_by_size(tmp_path: Path) -> None:
    sizes = [(96, 48), (64, 64), (48, 96), (96, 48), (64, 64)]
    folder = make_folder(tmp_path / "data", sizes=sizes)
    (folder / "03.png").write_bytes((folder / "00.png").read_bytes())  # 03 becomes identical to 00:
    (folder / "03.txt").write_text("caption 0")  # same bytes, same caption, so one cache entry
    records = scan_source(DataConfig(path=str(folder))).records
    image = ToyImageEncoder()
    pre = {"resolution": 96, "crop": "center", "buckets": True}
    cached = build_cache(records, [image], tmp_path / "cache", pre, batch_size=8, progress=False)
    assert image.items == 4
    assert cached.sizes == [(64, 128), (96, 96), (128, 64), (64, 128), (96, 96)]
    assert [cached[i]["latent"].shape[1:] for i in range(5)] == [(2, 4), (3, 3), (4, 2), (2, 4), (3, 3)]
    ids = cached.bucket_ids()
    loader = DataLoader(cached, batch_sampler=BucketBatchSampler(ids, batch_size=2, seed=0))
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 5
    assert all(b["latent"].shape[0] == len(b["key"]) for b in batches)  # collation worked: one size per batch


def test_control_encoder_and_missing_control(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "data")
    records = scan_source(DataConfig(path=str(folder)), control_column="_control").records
    cached = build_cache(records, [ToyControlEncoder()], tmp_path / "cache", PRE, progress=False)
    assert torch.allclose(cached[2]["hint"], torch.full((1, 64, 64), 80 / 255))
    (folder / "04_control.png").unlink()
    partial = scan_source(DataConfig(path=str(folder)), control_column="_control").records
    with pytest.raises(CacheError, match="no control image"):
        build_cache(partial, [ToyControlEncoder()], tmp_path / "cache2", PRE, progress=False)


def test_contract_violations_are_reported(tmp_path: Path) -> None:
    records = scan_source(DataConfig(path=str(make_folder(tmp_path / "data", count=2)))).records
    with pytest.raises(CacheError, match="random crops"):
        build_cache(records, [ToyImageEncoder()], tmp_path / "c", {"resolution": 64, "crop": "random"})

    class NoBatchDim(ToyTextEncoder):
        def encode(self, batch: list) -> dict[str, torch.Tensor]:
            return {"text": torch.zeros(8)}

    with pytest.raises(CacheError, match="batch dimension"):
        build_cache(records, [NoBatchDim()], tmp_path / "c", PRE, progress=False)

    class Clash(ToyTextEncoder):
        name = "other_text"

        def encode(self, batch: list) -> dict[str, torch.Tensor]:
            return {"latent": torch.zeros(len(batch), 2)}

    with pytest.raises(CacheError, match="rename one"):
        build_cache(records, [ToyImageEncoder(), Clash()], tmp_path / "c", PRE, progress=False)


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "garbled_index"])
def test_corrupt_shard_is_detected_and_reencoded(tmp_path: Path, damage: str) -> None:
    records = scan_source(DataConfig(path=str(make_folder(tmp_path / "data")))).records
    cache_dir = tmp_path / "cache"
    built = build_cache(records, [ToyImageEncoder()], cache_dir, PRE, batch_size=2, progress=False, shard_size=2)
    victim_index = shard_indexes(cache_dir)[1]
    victim = victim_index.with_suffix(".safetensors")
    entries_in_victim = len(json.loads(victim_index.read_text())["entries"])
    data = bytearray(victim.read_bytes())
    if damage == "flip_bytes":  # same length, valid header: only the checksum can tell
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    else:
        victim_index.write_text("{not json")

    if damage != "garbled_index":  # an already-open dataset refuses to return the damaged tensors
        owners = [i for i in range(5) if built._locations[built.keys[i]].shard == victim]
        refused = 0
        for owner in owners:
            try:
                built[owner]
            except CacheError as exc:
                assert "build_cache again" in str(exc)
                refused += 1
        assert refused >= 1  # flipped bytes hit one tensor; truncation breaks the whole file

    image = ToyImageEncoder()
    with pytest.warns(RuntimeWarning, match="not trusted"):
        rebuilt = build_cache(records, [image], cache_dir, PRE, batch_size=2, progress=False, shard_size=2)
    assert image.items == entries_in_victim
    for index in range(5):
        assert torch.allclose(rebuilt[index]["mean_rgb"], torch.tensor(COLOURS[index], dtype=torch.float32) / 255)
    final = ToyImageEncoder()
    build_cache(records, [final], cache_dir, PRE, progress=False)
    assert final.calls == 0


@pytest.mark.parametrize("crash_point", ["shard_write", "between_shard_and_index"])
def test_interrupted_write_leaves_previous_shards_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_point: str
) -> None:
    records = scan_source(DataConfig(path=str(make_folder(tmp_path / "data")))).records
    cache_dir = tmp_path / "cache"
    build_cache(records[:2], [ToyImageEncoder()], cache_dir, PRE, progress=False, shard_size=2)
    before = snapshot(cache_dir)

    if crash_point == "shard_write":
        def power_cut(fd: int) -> None:  # the temporary file is written but never made durable or renamed
            raise OSError("simulated power cut during write")

        monkeypatch.setattr(cache_module.os, "fsync", power_cut)
    else:
        real_write = cache_module._atomic_write

        def crash_on_index(path: Path, data: bytes) -> None:
            if path.suffix == ".json":
                raise KeyboardInterrupt  # the user pressed Ctrl-C after the shard landed
            real_write(path, data)

        monkeypatch.setattr(cache_module, "_atomic_write", crash_on_index)
    with pytest.raises((OSError, KeyboardInterrupt)):
        build_cache(records, [ToyImageEncoder()], cache_dir, PRE, progress=False, shard_size=2)
    monkeypatch.undo()

    after = snapshot(cache_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # previous shards byte-identical
    assert not [name for name in after if name.endswith(".tmp")]
    new_files = set(after) - set(before)
    if crash_point == "shard_write":
        assert new_files == set()
    else:  # the shard landed, its index never did: an orphan that no reader will trust
        assert len(new_files) == 1 and new_files.pop().endswith(".safetensors")

    image = ToyImageEncoder()  # the lock was released and the next build finishes the job
    cached = build_cache(records, [image], cache_dir, PRE, progress=False, shard_size=2)
    assert image.items == 3
    assert not [p for p in (cache_dir / "shards").glob("shard-*.safetensors") if not p.with_suffix(".json").exists()]
    assert torch.allclose(cached[4]["mean_rgb"], torch.tensor(COLOURS[4], dtype=torch.float32) / 255)


def _build_in_process(folder: str, cache_dir: str, result_file: str, barrier) -> None:
    records = scan_source(DataConfig(path=folder)).records
    image, text = ToyImageEncoder(sleep=0.05), ToyTextEncoder(sleep=0.05)
    barrier.wait()  # both processes reach build_cache at the same moment
    build_cache(records, [image, text], cache_dir, PRE, batch_size=2, progress=False, shard_size=3)
    Path(result_file).write_text(json.dumps({"image": image.items, "text": text.items}))


def test_two_processes_building_the_same_cache(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "data", count=6)
    cache_dir = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads is not safe
    barrier = context.Barrier(2)
    workers = [
        context.Process(target=_build_in_process, args=(str(folder), str(cache_dir), str(tmp_path / f"r{i}"), barrier))
        for i in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        if worker.is_alive():  # a deadlock must fail the test, not hang the suite
            worker.terminate()
    assert [w.exitcode for w in workers] == [0, 0]

    counts = [json.loads((tmp_path / f"r{i}").read_text()) for i in range(2)]
    # Exactly one build's worth of encoding in total: the lock made the second process wait, then hit.
    assert sum(c["image"] for c in counts) == 6 and sum(c["text"] for c in counts) == 6 + 1
    assert sorted(c["image"] for c in counts) == [0, 6]

    records = scan_source(DataConfig(path=str(folder))).records
    image, text = ToyImageEncoder(), ToyTextEncoder()
    cached = build_cache(records, [image, text], cache_dir, PRE, progress=False)  # verifies every checksum
    assert image.calls == text.calls == 0
    assert not list((cache_dir / "shards").glob(".*.tmp"))
    for index in range(6):
        assert torch.equal(cached[index]["text"], caption_vector(f"caption {index}").to(torch.bfloat16))


def test_sharded_build_by_two_ranks_equals_one_build_and_is_reused(tmp_path: Path) -> None:
    """cache.mode: sharded, with two threads standing in for two ranks (the 2-process run is in test_scale_out)."""
    import threading

    from cascade_studio.data import read_cache

    records = scan_source(DataConfig(path=str(make_folder(tmp_path / "data", count=7,
                                                          sizes=[(64, 64)] * 4 + [(64, 128)] * 3)))).records
    build_cache(records, [ToyImageEncoder(), ToyTextEncoder()], tmp_path / "one", PRE, batch_size=2,
                progress=False, shard_size=3)

    def build_as_ranks(cache_dir: Path) -> list[int]:
        barrier, counts, errors = threading.Barrier(2), [0, 0], []

        def rank(r: int) -> None:
            try:
                dataset = build_cache(records, [ToyImageEncoder(), ToyTextEncoder()], cache_dir, PRE, batch_size=2,
                                      progress=False, shard_size=3, share=(r, 2), barrier=barrier.wait)
                counts[r] = dataset.encoded
                assert len(dataset) == 7 and dataset[6]["key"] == records[6].key  # every rank reads every entry
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors and not any(t.is_alive() for t in threads), errors
        return counts

    sharded = tmp_path / "two"
    (sharded / "shards").mkdir(parents=True)
    (sharded / "shards" / "shard-orphan.safetensors").write_bytes(b"debris of a crashed writer")
    counts = build_as_ranks(sharded)
    # 4 batches of the one-process plan (2+2 of 64x64, 2+1 of 64x128): 2 each, the empty caption on rank 0
    assert counts == [2 + 2 + 1, 2 + 1]
    assert not (sharded / "shards" / "shard-orphan.safetensors").exists()
    one, two = read_cache(tmp_path / "one"), read_cache(sharded)
    assert one.keys() == two.keys() and len(one) == 8
    for key, features in one.items():
        assert features.keys() == two[key].keys()
        assert all(torch.equal(tensor, two[key][name]) for name, tensor in features.items()), key
    before = snapshot(sharded)
    assert build_as_ranks(sharded) == [0, 0] and snapshot(sharded) == before  # a second run encodes nothing
