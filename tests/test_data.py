"""Data sources, bad-file handling, transforms, buckets and the committed tiny sample set."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # imagefolder pings the hub otherwise (STACK.md)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cascade_studio.config.schema import DataConfig
from cascade_studio.data import (
    BucketBatchSampler,
    DataSourceError,
    EmptyDatasetError,
    assign_bucket,
    make_buckets,
    resize_and_crop,
    scan_source,
    to_tensor01,
)
from cascade_studio.data.images import open_image

REPO = Path(__file__).resolve().parents[1]
TINY_SHAPES = REPO / "datasets" / "tiny-shapes"
RED, BLUE = (220, 30, 30), (30, 30, 220)


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def solid(colour=RED, size=(48, 40)) -> Image.Image:
    return Image.new("RGB", size, colour)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise(size=(64, 64), seed=0) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array)


def absurd_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a few bytes: a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------------------------
# Bad files: each kind skipped with a reason, or converted as designed


@pytest.fixture()
def messy_folder(tmp_path: Path) -> Path:
    root = tmp_path / "messy"
    save(root / "good.png", solid())
    (root / "good.txt").write_text("a red block\n")
    full_png, full_jpg = io.BytesIO(), io.BytesIO()
    noise().save(full_png, format="PNG")
    noise().save(full_jpg, format="JPEG")
    (root / "trunc_png.png").write_bytes(full_png.getvalue()[: len(full_png.getvalue()) // 2])
    (root / "trunc_jpg.jpg").write_bytes(full_jpg.getvalue()[: len(full_jpg.getvalue()) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image")
    (root / "bomb.png").write_bytes(absurd_png(100_000, 100_000))
    save(root / "tiny.png", solid(size=(8, 8)))
    save(root / "cmyk.jpg", Image.new("CMYK", (40, 40), (0, 255, 255, 0)), quality=95)
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # left half transparent, right half opaque red
    rgba.paste((220, 30, 30, 255), (20, 0, 40, 40))
    save(root / "rgba.png", rgba)
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, 30, 30, 220] + [0] * 762)
    palette.paste(1, (0, 0, 40, 20))  # top half palette index 1 (blue), bottom half index 0 (transparent)
    save(root / "palette.png", palette, transparency=0)
    save(root / "grey.png", Image.new("L", (40, 40), 77))
    grey16 = np.full((40, 40), 65535, np.uint16)
    grey16[20:] = 32896  # 32896 / 257 = 128 exactly
    save(root / "grey16.png", Image.fromarray(grey16))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save(root / "rotated.jpg", solid(size=(64, 40)), exif=exif)
    return root


def test_bad_files_are_skipped_with_path_and_reason(messy_folder: Path) -> None:
    result = scan_source(DataConfig(source="folder", path=str(messy_folder)))
    reasons = {Path(s.path).name: s.reason for s in result.skipped}
    assert set(reasons) == {"trunc_png.png", "trunc_jpg.jpg", "zero.png", "text.png", "bomb.png", "tiny.png"}
    assert "truncated" in reasons["trunc_png.png"] and "truncated" in reasons["trunc_jpg.jpg"]
    assert "empty file" in reasons["zero.png"]
    assert "not an image" in reasons["text.png"]
    assert "too large" in reasons["bomb.png"] and "max_pixels" in reasons["bomb.png"]
    assert "under 32 px" in reasons["tiny.png"]
    assert all(Path(s.path).parent == messy_folder for s in result.skipped)
    kept = {r.key for r in result.records}
    assert kept == {"good.png", "cmyk.jpg", "rgba.png", "palette.png", "grey.png", "grey16.png", "rotated.jpg"}
    # only good.png has a .txt sidecar; the other six count as captionless
    assert result.missing_captions == 6


def test_modes_are_converted_to_rgb_as_designed(messy_folder: Path) -> None:
    records = {r.key: r for r in scan_source(DataConfig(path=str(messy_folder))).records}
    images = {key: record.load_image() for key, record in records.items()}
    assert all(image.mode == "RGB" for image in images.values())
    cmyk = images["cmyk.jpg"].getpixel((20, 20))
    assert cmyk[0] > 240 and cmyk[1] < 15 and cmyk[2] < 15  # CMYK (0,255,255,0) is red
    assert images["rgba.png"].getpixel((5, 5)) == (255, 255, 255)  # transparent -> white, not black
    assert images["rgba.png"].getpixel((30, 5)) == (220, 30, 30)
    assert images["palette.png"].getpixel((5, 5)) == (30, 30, 220)
    assert images["palette.png"].getpixel((5, 30)) == (255, 255, 255)  # transparent palette index
    assert images["grey.png"].getpixel((3, 3)) == (77, 77, 77)
    assert images["grey16.png"].getpixel((3, 3)) == (255, 255, 255)  # scaled, not clipped
    assert images["grey16.png"].getpixel((3, 30)) == (128, 128, 128)
    # EXIF orientation 6: the stored 64x40 displays as 40x64, and the record's size says so
    assert images["rotated.jpg"].size == (40, 64)
    assert (records["rotated.jpg"].width, records["rotated.jpg"].height) == (40, 64)


def test_max_pixels_rejects_large_images_before_decoding() -> None:
    data = png_bytes(solid(size=(64, 64)))
    limit_before = Image.MAX_IMAGE_PIXELS
    assert open_image(data, "ok.png", max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(ValueError, match="max_pixels"):
        open_image(data, "big.png", max_pixels=64 * 64 - 1)
    assert Image.MAX_IMAGE_PIXELS == limit_before  # PIL's process-wide limit is restored afterwards


def test_empty_valid_set_raises_with_counts_and_reasons(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "c.jpg").write_text("hello")
    with pytest.raises(EmptyDatasetError) as info:
        scan_source(DataConfig(path=str(tmp_path)))
    message = str(info.value)
    assert "3 file(s) were skipped" in message
    assert "2 x empty file" in message and "1 x not an image" in message
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(EmptyDatasetError, match="No images found"):
        scan_source(DataConfig(path=str(empty)))


def test_config_errors_say_what_to_write(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="one of: folder, hf_disk, hf_hub, webdataset"):
        scan_source(DataConfig(source="ftp", path=str(tmp_path)))
    with pytest.raises(DataSourceError, match="not a folder"):
        scan_source(DataConfig(path=str(tmp_path / "missing")))


# ---------------------------------------------------------------------------------------------------------------
# Folder layouts


def test_folder_with_sidecars_controls_and_subfolders(tmp_path: Path) -> None:
    save(tmp_path / "a.png", solid(RED))
    (tmp_path / "a.txt").write_text("  red one \n")
    save(tmp_path / "a_control.png", Image.new("L", (48, 40), 255))
    save(tmp_path / "sub" / "b.jpg", solid(BLUE))
    (tmp_path / "sub" / "b.txt").write_text("blue one")
    save(tmp_path / "lonely_control.png", solid(BLUE))  # no "lonely" image: an ordinary training image
    save(tmp_path / ".hidden" / "c.png", solid())

    plain = scan_source(DataConfig(path=str(tmp_path)))
    assert [r.key for r in plain.records] == ["a.png", "lonely_control.png", "sub/b.jpg"]
    assert [r.caption for r in plain.records] == ["red one", "", "blue one"]
    assert plain.missing_captions == 1 and not any(r.has_control for r in plain.records)
    # content hash of a control-less record is the sha256 of the file's bytes
    assert plain.records[0].content_hash == hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()

    with_controls = scan_source(DataConfig(path=str(tmp_path)), control_column="_control")
    first = with_controls.records[0]
    assert first.control_path == str(tmp_path / "a_control.png")
    assert first.load_control().getpixel((0, 0)) == (255, 255, 255)
    assert first.content_hash != plain.records[0].content_hash  # the control is part of the content
    assert with_controls.missing_controls == ["lonely_control.png", "sub/b.jpg"]


def test_max_images_and_records_survive_pickling(tmp_path: Path) -> None:
    for i in range(5):
        save(tmp_path / f"{i}.png", solid((i * 40, 0, 0)))
    config = DataConfig(source="folder", path=str(tmp_path), max_images=3)  # the recipe's section
    records = scan_source(config).records
    assert [r.key for r in records] == ["0.png", "1.png", "2.png"]
    clone = pickle.loads(pickle.dumps(records[2]))  # DataLoader workers and subprocesses receive records
    assert clone.load_image().getpixel((0, 0)) == (80, 0, 0)


def _metadata_folder(root: Path) -> None:
    save(root / "a.png", solid(RED))
    save(root / "a_control.png", Image.new("L", (48, 40), 200))
    save(root / "imgs" / "b.png", solid(BLUE))
    save(root / "stray.png", solid())


def test_metadata_jsonl_matches_imagefolder(tmp_path: Path) -> None:
    import datasets

    _metadata_folder(tmp_path)
    rows = [{"file_name": "a.png", "text": "red"}, {"file_name": "imgs/b.png", "text": "blue"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = scan_source(DataConfig(path=str(tmp_path)), control_column="_control")
    assert [(r.key, r.caption) for r in result.records] == [("a.png", "red"), ("imgs/b.png", "blue")]
    assert result.records[0].load_control().getpixel((1, 1)) == (200, 200, 200)
    assert result.missing_controls == ["imgs/b.png"]
    assert [(Path(s.path).name, "not listed" in s.reason) for s in result.skipped] == [("stray.png", True)]

    # the same folder through Hugging Face's own imagefolder builder: same images, same captions
    (tmp_path / "a_control.png").unlink()  # imagefolder would not know it is a control
    reference = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train",
                                      cache_dir=str(tmp_path.parent / "hf-cache"))
    assert sorted(reference["text"]) == ["blue", "red"]


def test_metadata_csv_blank_caption_and_missing_file(tmp_path: Path) -> None:
    _metadata_folder(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png,red\nimgs/b.png,\ngone.png,x\n")
    result = scan_source(DataConfig(path=str(tmp_path)))
    assert [(r.key, r.caption) for r in result.records] == [("a.png", "red"), ("imgs/b.png", "")]
    assert result.missing_captions == 1
    reasons = {Path(s.path).name: s.reason for s in result.skipped}
    assert "not found" in reasons["gone.png"] and "not listed" in reasons["stray.png"]
    with pytest.raises(DataSourceError, match="caption_column"):
        scan_source(DataConfig(path=str(tmp_path), caption_column="prompt_text"))


def test_metadata_control_column_holds_paths(tmp_path: Path) -> None:
    save(tmp_path / "a.png", solid(RED))
    save(tmp_path / "edges" / "a.png", Image.new("L", (48, 40), 255))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "r", "hint": "edges/a.png"}))
    result = scan_source(DataConfig(path=str(tmp_path)), control_column="hint")
    assert len(result.records) == 1 and result.skipped == []  # the control file is not reported as unlisted
    assert result.records[0].control_path.endswith("edges/a.png")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _hf_dataset():
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "edges": datasets.Image()})
    rows = {
        "image": [solid(RED), solid(BLUE), {"bytes": b"not an image", "path": None}],
        "text": ["red", "blue", "broken"],
        "edges": [Image.new("L", (48, 40), 255), Image.new("L", (48, 40), 0), Image.new("L", (48, 40), 0)],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def test_saved_hf_dataset_with_control_column(tmp_path: Path) -> None:
    import datasets

    _hf_dataset().save_to_disk(str(tmp_path / "single"))
    result = scan_source(DataConfig(source="hf_disk", path=str(tmp_path / "single")), control_column="edges")
    assert [(r.key, r.caption) for r in result.records] == [("00000000", "red"), ("00000001", "blue")]
    assert result.records[1].load_image().getpixel((0, 0)) == BLUE
    assert result.records[0].load_control().getpixel((0, 0)) == (255, 255, 255)
    assert len(result.skipped) == 1 and "row 2" in result.skipped[0].path
    assert "not an image" in result.skipped[0].reason
    assert pickle.loads(pickle.dumps(result.records[0])).load_image().getpixel((0, 0)) == RED

    datasets.DatasetDict({"validation": _hf_dataset()}).save_to_disk(str(tmp_path / "dict"))
    assert len(scan_source(DataConfig(source="hf_disk", path=str(tmp_path / "dict"), split="validation")).records) == 2
    with pytest.raises(DataSourceError, match="set data.split"):
        scan_source(DataConfig(source="hf_disk", path=str(tmp_path / "dict")))
    with pytest.raises(DataSourceError, match="set data.image_column"):
        scan_source(DataConfig(source="hf_disk", path=str(tmp_path / "single"), image_column="picture"))


def test_hub_dataset_arguments_are_passed_through(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split, kwargs))
        return _hf_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = DataConfig(source="hf_hub", name="someone/shapes", split="validation", caption_column="text")
    result = scan_source(config)
    assert calls == [("someone/shapes", "validation", {})]
    assert [r.caption for r in result.records] == ["red", "blue"]

    def offline(name, split=None, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataSourceError, match="hf_disk"):
        scan_source(config)


# ---------------------------------------------------------------------------------------------------------------
# webdataset


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_webdataset_shards_with_both_control_spellings(tmp_path: Path) -> None:
    white = png_bytes(Image.new("L", (48, 40), 255))
    with tarfile.open(tmp_path / "shard-000.tar", "w") as archive:
        _add(archive, "s/000.png", png_bytes(solid(RED)))
        _add(archive, "s/000.txt", b"red sample")
        _add(archive, "s/000.control.png", white)  # <key>.<control_column>.png
        _add(archive, "s/001.jpg", png_bytes(solid(BLUE)))  # wrong extension is fine: content decides
        _add(archive, "s/001_control.png", white)  # <key><control_column>.png (default suffix)
        _add(archive, "s/002.txt", b"caption without image")
        _add(archive, "s/003.webp", b"garbage")
    with tarfile.open(tmp_path / "shard-001.tar", "w") as archive:
        _add(archive, "004.png", png_bytes(solid()))
        _add(archive, "004.txt", "ünïcode".encode())

    pattern = str(tmp_path / "shard-{000..001}.tar")
    plain = scan_source(DataConfig(source="webdataset", path=pattern))
    assert [(r.key, r.caption) for r in plain.records] == [("s/000", "red sample"), ("s/001", ""), ("004", "ünïcode")]
    assert plain.records[1].load_image().getpixel((0, 0)) == BLUE
    reasons = {s.path.split("::")[1]: s.reason for s in plain.skipped}
    assert set(reasons) == {"s/002", "s/003.webp"} and "no .jpg/.png/.webp" in reasons["s/002"]

    dotted = scan_source(DataConfig(source="webdataset", path=str(tmp_path / "*.tar")), control_column="control")
    assert [r.has_control for r in dotted.records] == [True, False, False]
    suffixed = scan_source(DataConfig(source="webdataset", path=str(tmp_path)), control_column="_control")
    assert [r.has_control for r in suffixed.records] == [False, True, False]
    assert suffixed.records[1].load_control().getpixel((0, 0)) == (255, 255, 255)
    assert suffixed.missing_controls == ["s/000", "004"]
    with pytest.raises(DataSourceError, match="no .tar shards"):
        scan_source(DataConfig(source="webdataset", path=str(tmp_path / "nope-*.tar")))


# ---------------------------------------------------------------------------------------------------------------
# Transforms


def test_resize_and_crop_center_and_random() -> None:
    halves = Image.new("RGB", (200, 100), RED)
    halves.paste(BLUE, (100, 0, 200, 100))
    out = resize_and_crop(halves, (64, 64))
    assert out.size == (64, 64)  # short side 100 -> 64, long side 200 -> 128, centre 64 columns kept
    assert out.getpixel((5, 32)) == RED and out.getpixel((60, 32)) == BLUE
    tall = resize_and_crop(halves, (96, 32))
    assert tall.size == (32, 96)

    def crop_with(seed: int) -> bytes:
        return resize_and_crop(noise((120, 80)), (64, 64), "random", torch.Generator().manual_seed(seed)).tobytes()

    assert crop_with(1) == crop_with(1)
    assert len({crop_with(s) for s in range(6)}) > 1
    with pytest.raises(ValueError, match="center"):
        resize_and_crop(halves, (32, 32), crop="middle")


def test_to_tensor01_values() -> None:
    tensor = to_tensor01(Image.new("RGB", (5, 3), (255, 0, 51)))
    assert tensor.shape == (3, 3, 5) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


# ---------------------------------------------------------------------------------------------------------------
# Buckets


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024])
def test_buckets_constant_area_multiples_of_32(resolution: int) -> None:
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    for h, w in buckets:
        assert h % 32 == 0 and w % 32 == 0
        assert abs(h * w - resolution**2) <= min(h, w) * 32 / 2  # nearest step to the ideal long side
        assert abs(h * w / resolution**2 - 1) < 0.06
        assert max(h, w) / min(h, w) <= 2.0
        assert (w, h) in buckets
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios)
    with pytest.raises(ValueError, match="multiple of 32"):
        make_buckets(250)


def test_assign_bucket_by_aspect_ratio() -> None:
    buckets = make_buckets(1024)
    assert buckets[assign_bucket(800, 800, buckets)] == (1024, 1024)
    assert buckets[assign_bucket(1920, 1080, buckets)] == (768, 1376)  # 16:9 -> 1.79, bucket 1.79
    assert buckets[assign_bucket(1080, 1920, buckets)] == (1376, 768)
    assert buckets[assign_bucket(5000, 100, buckets)] == (736, 1440)  # beyond max ratio: most extreme bucket


@settings(max_examples=40, deadline=None)
@given(
    bucket_ids=st.lists(st.integers(0, 4), min_size=1, max_size=60),
    batch_size=st.integers(1, 5),
    replicas=st.integers(1, 3),
    drop_last=st.booleans(),
)
def test_bucket_sampler_properties(bucket_ids: list[int], batch_size: int, replicas: int, drop_last: bool) -> None:
    samplers = [BucketBatchSampler(bucket_ids, batch_size, seed=7, num_replicas=replicas, rank=r, drop_last=drop_last)
                for r in range(replicas)]
    per_rank = [list(s) for s in samplers]
    for sampler, batches in zip(samplers, per_rank):
        assert len(batches) == len(sampler)
        for batch in batches:
            assert len({bucket_ids[i] for i in batch}) == 1
            assert 1 <= len(batch) <= batch_size and (not drop_last or len(batch) == batch_size)
    assert len({len(b) for b in per_rank}) == 1  # DDP: every rank steps equally often
    seen = [i for batches in per_rank for batch in batches for i in batch]
    if not drop_last:
        assert set(seen) == set(range(len(bucket_ids)))  # nothing lost (padding may repeat a batch)
    if replicas == 1 and not drop_last:
        assert sorted(seen) == list(range(len(bucket_ids)))  # exactly once


def test_bucket_sampler_deterministic_per_seed_and_epoch() -> None:
    ids = [i % 3 for i in range(40)]
    first, again, other_seed = (BucketBatchSampler(ids, 4, seed=s) for s in (1, 1, 2))
    assert list(first) == list(again)
    assert list(first) != list(other_seed)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    rank0, rank1 = (list(BucketBatchSampler(ids, 4, seed=1, num_replicas=2, rank=r)) for r in (0, 1))
    assert not {tuple(b) for b in rank0} & {tuple(b) for b in rank1}  # shards are disjoint without padding


# ---------------------------------------------------------------------------------------------------------------
# The committed tiny sample set


def _generator_module():
    spec = importlib.util.spec_from_file_location("make_tiny_shapes", REPO / "datasets" / "make_tiny_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_shapes_is_complete_and_small() -> None:
    result = scan_source(DataConfig(path=str(TINY_SHAPES)), control_column="_control")
    assert len(result.records) == 24 and not result.skipped and not result.missing_controls
    for record in result.records:
        size, colour, shape = Path(record.key).stem.split("_")[1:]
        assert record.caption.startswith(f"a {size} {colour} {shape} ")
        assert (record.width, record.height) == (256, 256)
        assert Image.open(record.control_path).mode == "L"
    assert len({r.caption for r in result.records}) == 24
    # without control_column the edge maps are still never training images
    assert len(scan_source(DataConfig(path=str(TINY_SHAPES))).records) == 24
    assert sum(f.stat().st_size for f in TINY_SHAPES.iterdir()) < 300 * 1024


def test_tiny_shapes_matches_its_generator() -> None:
    module = _generator_module()
    for spec in module.sample_specs()[::5]:
        image, control, caption = module.render(spec)
        stem = spec["stem"]
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(TINY_SHAPES / f"{stem}.png").convert("RGB")))
        assert np.array_equal(np.asarray(control), np.asarray(Image.open(TINY_SHAPES / f"{stem}_control.png")))
        assert (TINY_SHAPES / f"{stem}.txt").read_text().strip() == caption
        edge = np.asarray(control) > 0
        assert 0.005 < edge.mean() < 0.1  # an outline, not a filled shape or an empty map
