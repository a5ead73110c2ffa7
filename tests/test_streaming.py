"""Streaming data (issue 21): shards dealt to processes x data-loader workers, buffer shuffle, exact resume of the
read position, URLs through fsspec (a local HTTP server the test starts on 127.0.0.1), and bad inputs.

The end-to-end runs (a 10,000-image webdataset served over HTTP, 1 and 2 processes, kill and resume, data wait)
are in test_streaming_e2e.py.
"""
from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from cascade_studio.data import DataSourceError, EmptyDatasetError
from cascade_studio.data.streaming import (StreamingDataset, StreamPosition, TarShards, buffer_shuffle,
                                           reader_stream, shard_urls)
from stream_shards import LocalServer, write_shards

IMAGES, SHARDS = 48, 8  # 6 images per shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return write_shards(tmp_path_factory.mktemp("wds"), IMAGES, SHARDS)


def stream(source, *, rank=0, processes=1, workers=0, batch_size=2, seed=7, buffer=5) -> StreamingDataset:
    return StreamingDataset(source, preprocessing={"resolution": 32, "crop": "center"}, max_pixels=10**6,
                            with_control=False, batch_size=batch_size, seed=seed, buffer=buffer, rank=rank,
                            processes=processes, workers=workers)


def loader(dataset: StreamingDataset, position: StreamPosition | None = None):
    view = dataset.at(position or StreamPosition(dataset.processes, dataset.workers))
    workers = dataset.workers if dataset.workers > 1 else 0
    return iter(DataLoader(view, batch_size=None, num_workers=workers))


def epoch_keys(source, seed: int, readers: int, buffer: int) -> list[list[str]]:
    """Each reader's epoch-0 keys, in order."""
    keys = []
    for slot in range(readers):
        keys.append([raw.key for epoch, _, raw in _until_epoch(reader_stream(source, seed, slot, readers, buffer), 1)])
    return keys


def _until_epoch(items, stop: int):
    for item in items:
        if item[0] >= stop:
            return
        yield item


def test_every_sample_is_read_once_per_epoch_across_processes_and_workers(shards):
    """2 processes x 2 DataLoader workers, through real DataLoaders: the first 6 batches of each process (3 per
    worker: a reader's whole epoch of 2 shards = 12 images in batches of 4) hold every image exactly once."""
    source = TarShards([str(p) for p in shards], None, None)
    seen: Counter[str] = Counter()
    for rank in range(2):
        batches = loader(stream(source, rank=rank, processes=2, workers=2, batch_size=4))
        for _ in range(6):
            batch = next(batches)
            assert batch["image"].shape == (4, 3, 32, 32) and batch["caption"][0].startswith("a ")
            seen.update(batch["key"])
    assert sorted(seen) == [f"{i:06d}" for i in range(IMAGES)] and set(seen.values()) == {1}


def test_the_order_is_a_function_of_the_seed_and_the_layout(shards):
    source = TarShards([str(p) for p in shards], None, None)
    first = epoch_keys(source, seed=3, readers=4, buffer=5)
    assert epoch_keys(source, seed=3, readers=4, buffer=5) == first  # the same on every run
    assert epoch_keys(source, seed=4, readers=4, buffer=5) != first  # another seed, another order
    assert epoch_keys(source, seed=3, readers=2, buffer=5) != first[:2]  # another layout, another order
    # each reader's epoch is its shards' images, shuffled across shard boundaries by the buffer
    for keys in first:
        assert len(keys) == 12 and keys != sorted(keys)
    # the next epoch deals the shards anew
    second = [[raw.key for e, _, raw in _until_epoch(reader_stream(source, 3, slot, 4, 5), 2) if e == 1]
              for slot in range(4)]
    assert sorted(sum(second, [])) == sorted(sum(first, [])) and second != first


def test_buffer_shuffle_keeps_every_item_and_mixes_beyond_the_buffer():
    import random

    out = list(buffer_shuffle(range(100), 10, random.Random(1)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert max(abs(value - index) for index, value in enumerate(out)) > 10  # items travel further than the buffer


@pytest.mark.parametrize("used", [3, 4])
def test_a_new_loader_at_a_recorded_position_continues_with_the_next_batch(shards, used):
    """What --resume does: record the batches a run used (StreamPosition, as the loop does), save and load the
    state, and start a new loader there; with 2 workers an odd count also rotates the workers."""
    dataset = stream(TarShards([str(p) for p in shards], None, None), workers=2, batch_size=4)
    uninterrupted = loader(dataset)
    expected = [next(uninterrupted) for _ in range(used + 4)]
    position = StreamPosition(processes=1, workers=2)
    for batch in expected[:used]:
        position.next_batch()
        position.consumed(batch)
    restored = StreamPosition(processes=1, workers=2)
    restored.load_state_dict(position.state_dict())
    resumed = loader(dataset, restored)
    for want in expected[used:]:
        got = next(resumed)
        assert got["key"] == want["key"] and torch.equal(got["image"], want["image"])


def test_resume_with_another_layout_is_refused_with_what_to_set(shards):
    position = StreamPosition(processes=1, workers=2)
    state = position.state_dict()
    with pytest.raises(DataSourceError, match=r"1 process\(es\) x 2 data-loader worker\(s\).*train.num_workers=2"):
        StreamPosition(processes=1, workers=4).load_state_dict(state)
    with pytest.raises(DataSourceError, match="did not stream"):
        StreamPosition(processes=1, workers=2).load_state_dict({"epoch": 0, "position": 3})


def test_shards_over_http_read_the_same_as_local_files(shards):
    with LocalServer(shards[0].parent) as server:
        urls = shard_urls(f"{server.url}/shard-{{000..007}}.tar")
        assert urls == [f"{server.url}/shard-{i:03d}.tar" for i in range(SHARDS)]
        remote = TarShards(urls, None, None)
        local = TarShards([str(p) for p in shards], None, None)
        assert [(s.key, s.caption, s.image) for s in remote.samples(5)] == \
               [(s.key, s.caption, s.image) for s in local.samples(5)]
        with pytest.raises(DataSourceError, match=r"cannot open shard .*shard-999.tar"):
            list(TarShards([f"{server.url}/shard-999.tar"], None, None).samples(0))  # 404


def test_bad_inputs_give_clear_errors(tmp_path, shards):
    with pytest.raises(DataSourceError, match="no .tar shards match"):
        shard_urls(str(tmp_path / "missing-{000..009}.tar"))
    assert shard_urls("s3://bucket/s-{8..10}.tar") == ["s3://bucket/s-8.tar", "s3://bucket/s-9.tar",
                                                        "s3://bucket/s-10.tar"]  # ranges need no listing
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataSourceError, match=rf"cannot open shard http://127.0.0.1:{port}/a.tar .*check the URL"):
        list(TarShards([f"http://127.0.0.1:{port}/a.tar"], None, None).samples(0))
    not_tar = tmp_path / "notes.tar"
    not_tar.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(DataSourceError, match="is not a tar"):
        list(TarShards([str(not_tar)], None, None).samples(0))
    with pytest.raises(DataSourceError, match="2 shard\\(s\\) for 4 readers"):
        next(reader_stream(TarShards([str(p) for p in shards[:2]], None, None), 0, 0, 4, 5))


def _tar_with_a_bad_image(path: Path, bad: int, count: int = 4) -> Path:
    import io
    import tarfile

    from stream_shards import sample_png

    with tarfile.open(path, "w") as archive:
        for index in range(count):
            data = b"\x89PNG broken" if index == bad else sample_png(index)[0]
            for name, payload in ((f"{index:06d}.png", data), (f"{index:06d}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return path


def test_a_corrupt_member_is_skipped_and_counted(tmp_path):
    import io
    import tarfile

    dataset = stream(TarShards([str(_tar_with_a_bad_image(tmp_path / "one.tar", bad=2))], None, None),
                     batch_size=3, buffer=1)
    batch = next(loader(dataset))
    assert batch["key"] == ["000000", "000001", "000003"] and batch["stream_skipped"] == 1
    # Resumed right after the last good sample of an epoch whose rest is only a bad one: that is not an empty
    # dataset; the next epoch follows.
    dataset = stream(TarShards([str(_tar_with_a_bad_image(tmp_path / "two.tar", bad=3))], None, None),
                     batch_size=3, buffer=1)
    position = StreamPosition(processes=1, workers=1)
    position.consumed(next(loader(dataset)))
    assert position.positions == {0: (0, 3)}
    batch = next(loader(dataset, position))
    assert batch["key"] == ["000000", "000001", "000002"] and batch["stream_position"] == [0, 1, 3]
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as archive:
        info = tarfile.TarInfo("000000.png")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"12345"))
    with pytest.raises(EmptyDatasetError, match="no usable image"):
        next(loader(stream(TarShards([str(bad)], None, None), batch_size=1, buffer=1)))


def test_streaming_settings_that_cannot_work_are_refused_together():
    from cascade_studio.config import RecipeError, load_recipe

    with pytest.raises(RecipeError) as caught:
        load_recipe({"version": 1, "name": "s", "model": {"preset": "tiny"}, "adapter": {"method": "lora"},
                     "data": {"source": "folder", "path": "x", "streaming": True, "holdout_fraction": 0.1,
                              "max_images": 10}})
    said = str(caught.value)
    for path in ("data.source", "cache.mode", "data.holdout_fraction", "data.max_images"):
        assert path in said, said
    assert "set cache.mode: none" in said


def test_a_hub_dataset_streams_by_its_own_shards(tmp_path):
    """source hf_hub with data.streaming: ``datasets`` in streaming mode (here a local folder of 3 parquet files,
    as a hub dataset is stored; offline), its files dealt to readers like tar shards, read in DataLoader workers."""
    import io

    import datasets
    from PIL import Image

    from cascade_studio.data.streaming import HubShards
    from stream_shards import sample_png

    for part in range(3):
        rows = [{"image": Image.open(io.BytesIO(sample_png(i)[0])), "text": sample_png(i)[1]}
                for i in range(part * 4, part * 4 + 4)]
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / f"train-{part}.parquet"))
    source = HubShards(str(tmp_path), "train", "image", None, None)
    assert len(source) == 3
    per_reader = epoch_keys(source, seed=1, readers=3, buffer=2)
    assert sorted(sum(per_reader, [])) == sorted(f"{part}:{row}" for part in range(3) for row in range(4))
    batches = loader(stream(source, workers=2, batch_size=2, buffer=2))
    for worker in range(2):  # one batch from each DataLoader worker (each its own reader)
        batch = next(batches)
        assert batch["image"].shape == (2, 3, 32, 32) and all(c.endswith("square") for c in batch["caption"])
        assert batch["stream_position"][0] == worker
    with pytest.raises(DataSourceError, match="no image column 'picture'"):
        HubShards(str(tmp_path), "train", "picture", None, None).dataset()
    with pytest.raises(DataSourceError, match="cannot stream hub dataset"):
        HubShards(str(tmp_path / "nothing-here"), "train", "image", None, None).dataset()


def test_validate_data_of_a_streaming_recipe_checks_the_first_shard_over_http(shards, tmp_path):
    """``cascade-studio validate --data`` reads only the first shard of a stream (here over HTTP): shard count and
    usable images (an unreachable shard is the error of test_bad_inputs_give_clear_errors)."""
    import subprocess
    import sys

    from subprocess_env import child_env

    repo = Path(__file__).resolve().parents[1]
    cli = str(Path(sys.executable).with_name("cascade-studio"))
    with LocalServer(shards[0].parent) as server:
        args = [cli, "validate", str(repo / "recipes" / "tiny" / "lora.yaml"), "data.source=webdataset",
                "data.streaming=true", "cache.mode=none", "data.holdout_fraction=0",
                f"data.path={server.url}/shard-{{000..007}}.tar", "--data"]
        ok = subprocess.run(args, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "8 shard(s); the first holds 6 usable images, 0 skipped" in ok.stdout


def test_resume_of_a_stream_with_other_workers_is_refused_before_anything_is_written():
    from cascade_studio.config import RecipeError, load_recipe
    from cascade_studio.config.resume import resume_changes

    def recipe(workers: int, streaming: bool = True):
        return load_recipe({"version": 1, "name": "s", "model": {"preset": "tiny"}, "adapter": {"method": "lora"},
                            "data": {"source": "webdataset", "path": "https://h/s-{0..9}.tar", "streaming": streaming},
                            "cache": {"mode": "none"}, "train": {"num_workers": workers}})

    with pytest.raises(RecipeError, match=r"train.num_workers.*set it back to 2"):
        resume_changes(recipe(2), recipe(4))
    assert resume_changes(recipe(0), recipe(1)) == {"train.num_workers": (0, 1)}  # both one reader per process
    assert resume_changes(recipe(2, False), recipe(4, False)) == {"train.num_workers": (2, 4)}  # not a stream


@pytest.mark.slow  # a training run in a child process: 12-20 s on 2 busy cores
def test_a_shard_that_cannot_be_read_during_training_stops_the_run_with_its_url(shards, tmp_path):
    """Shard 001 is missing on the server (404): the worker reading it fails, and the run stops with the
    worker's own message (the URL and what to check), not a DataLoader traceback."""
    import shutil
    import subprocess
    import sys

    from subprocess_env import child_env

    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(shards[0], served / "shard-000.tar")
    repo = Path(__file__).resolve().parents[1]
    cli = str(Path(sys.executable).with_name("cascade-studio"))
    with LocalServer(served) as server:
        result = subprocess.run(
            [cli, "train", str(repo / "recipes" / "tiny" / "lora.yaml"), f"workspace={tmp_path / 'ws'}",
             "data.source=webdataset", f"data.path={server.url}/shard-{{000..001}}.tar", "data.streaming=true",
             "cache.mode=none", "data.holdout_fraction=0", "data.resolution=64", "preview.every=0",
             "tracking.enabled=false", "train.max_steps=4", "train.num_workers=2", "--no-progress"],
            env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and f"error: cannot open shard {server.url}/shard-001.tar" in error[0], result.stderr
    assert "check the URL" in result.stderr and "Traceback" not in result.stderr
