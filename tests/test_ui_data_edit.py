"""The Data page prepares a dataset (issue 18 item 1), driven with Streamlit's AppTest: one caption edited in
place (sidecar or metadata file), find/replace with a preview count, an idempotent trigger word, the images
without a caption, and the aspect-ratio bucket and crop preview; sample datasets stay read-only and a failed
write changes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade_studio.data import captions as captions_module
from cascade_studio.ui.data_view import cropped
from cascade_studio.ui.workspace import Workspace
from test_ui_pages import page, texts, ws  # noqa: F401 - ws is a fixture

COLORS = ("red", "green", "blue")


@pytest.fixture()
def sidecars(ws: Workspace) -> Path:  # noqa: F811
    folder = ws.root / "datasets" / "cards"
    folder.mkdir(parents=True)
    for i, color in enumerate(COLORS):
        Image.new("RGB", (64, 48), color).save(folder / f"{i}_{color}.png")
        (folder / f"{i}_{color}.txt").write_text(f"a {color} card\n")
    Image.new("RGB", (64, 48), "white").save(folder / "3_blank.png")  # no caption
    return folder


def open_folder(folder: Path):
    at = page("data")
    at.text_input(key="data_typed").set_value(str(folder)).run()
    return at


def caption_box(at):
    [box] = [t for t in at.text_area if t.key and t.key.startswith("data_edit_caption-")]
    return box


def test_one_caption_is_edited_in_its_sidecar_and_the_others_stay(ws, sidecars: Path) -> None:
    at = open_folder(sidecars)
    at.selectbox(key="data_edit_image").set_value(str(sidecars / "1_green.png")).run()
    assert caption_box(at).value == "a green card"
    caption_box(at).set_value("a green card, rounded corners").run()
    at.button(key="data_edit_save").click().run()
    assert "Saved the caption of 1_green.png: wrote 1_green.txt" in texts(at.success)
    assert (sidecars / "1_green.txt").read_text() == "a green card, rounded corners\n"
    assert (sidecars / "0_red.txt").read_text() == "a red card\n" and not (sidecars / "3_blank.txt").exists()
    assert caption_box(at).value == "a green card, rounded corners"  # the page shows the file again


def test_find_replace_previews_its_count_then_rewrites_every_match(ws, sidecars: Path) -> None:
    at = open_folder(sidecars)
    at.text_input(key="data_find").set_value("card")
    at.text_input(key="data_replace_with").set_value("tile").run()
    assert "3 of 4 captions contain 'card' (3 occurrences)." in texts(at.caption)
    assert (sidecars / "0_red.txt").read_text() == "a red card\n"  # nothing written by the preview
    at.button(key="data_replace_go").click().run()
    assert [(sidecars / f"{i}_{c}.txt").read_text() for i, c in enumerate(COLORS)] == \
        [f"a {c} tile\n" for c in COLORS]
    assert not (sidecars / "3_blank.txt").exists()
    at.text_input(key="data_find").set_value("card").run()
    assert at.button(key="data_replace_go").disabled


def test_the_trigger_word_is_prepended_once_and_uncaptioned_images_are_listed(ws, sidecars: Path) -> None:
    at = open_folder(sidecars)
    assert {m.label: m.value for m in at.metric}["Without caption"] == "1"
    assert list(at.dataframe[0].value["image"]) == ["3_blank.png"]  # the Without caption tab
    at.text_input(key="data_trigger").set_value("ohwx").run()
    assert "Would change 4 of 4 captions (0 already start with it)." in texts(at.caption)
    at.button(key="data_trigger_go").click().run()
    assert (sidecars / "2_blue.txt").read_text() == "ohwx, a blue card\n"
    assert (sidecars / "3_blank.txt").read_text() == "ohwx\n"
    assert {m.label: m.value for m in at.metric}["Without caption"] == "0"
    assert "Would change 0 of 4 captions (4 already start with it)." in texts(at.caption)
    assert at.button(key="data_trigger_go").disabled  # a second click would change nothing anyway


def test_metadata_captions_are_edited_in_place_keeping_rows_and_columns(ws: Workspace) -> None:  # noqa: F811
    folder = ws.root / "datasets" / "meta"
    folder.mkdir(parents=True)
    rows = [{"file_name": f"img/{c}.png", "text": f"a {c} disc", "source": f"cam-{i}"} for i, c in enumerate(COLORS)]
    (folder / "img").mkdir()
    for color in COLORS:
        Image.new("RGB", (40, 40), color).save(folder / "img" / f"{color}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    at = open_folder(folder)
    at.selectbox(key="data_edit_image").set_value(str(folder / "img" / "green.png")).run()
    caption_box(at).set_value("a green disc on grey").run()
    at.button(key="data_edit_save").click().run()
    assert "wrote metadata.jsonl" in texts(at.success)
    saved = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["text"] = "a green disc on grey"
    assert saved == rows and not list(folder.rglob("*.txt"))


def test_a_failed_write_shows_why_and_leaves_the_file_as_it_was(ws: Workspace, monkeypatch) -> None:  # noqa: F811
    folder = ws.root / "datasets" / "meta-csv"
    folder.mkdir(parents=True)
    for color in COLORS:
        Image.new("RGB", (40, 40), color).save(folder / f"{color}.png")
    original = "file_name,caption,source\n" + "".join(f"{c}.png,a {c} disc,cam\n" for c in COLORS)
    (folder / "metadata.csv").write_text(original)
    real_write = captions_module.atomic_write_text

    def disk_full(path, text):
        real_write(Path(path).with_name("partial.tmp"), text[:10])  # as far as a real failure gets
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(captions_module, "atomic_write_text", disk_full)
    at = open_folder(folder)
    at.text_input(key="data_trigger").set_value("ohwx").run()
    at.button(key="data_trigger_go").click().run()
    assert "Not saved: could not write" in texts(at.error) and "No space left" in texts(at.error)
    assert (folder / "metadata.csv").read_text() == original
    monkeypatch.setattr(captions_module, "atomic_write_text", real_write)
    at.button(key="data_trigger_go").click().run()
    assert (folder / "metadata.csv").read_text().splitlines()[1] == "red.png,\"ohwx, a red disc\",cam"


def test_the_repositorys_sample_datasets_are_read_only(ws: Workspace) -> None:  # noqa: F811
    at = open_folder(Path("datasets/tiny-shapes"))
    assert "Read-only" in texts(at.warning) and "copy it into" in texts(at.warning)
    assert not [b for b in at.button if b.key in ("data_edit_save", "data_replace_go", "data_trigger_go")]


def test_bucket_preview_counts_images_per_bucket_and_shows_the_crops(ws: Workspace) -> None:  # noqa: F811
    folder = ws.root / "datasets" / "shapes"
    folder.mkdir(parents=True)
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, :32] = (0, 255, 0)
    wide[:, 32:96] = (255, 0, 0)  # the middle half is red
    wide[:, 96:] = (0, 0, 255)
    for i in range(3):
        Image.fromarray(wide).save(folder / f"wide{i}.png")
    Image.new("RGB", (64, 128), "gray").save(folder / "tall.png")
    Image.new("RGB", (96, 96), "gray").save(folder / "square.png")
    at = open_folder(folder)
    assert at.selectbox(key="data_bucket_recipe").value == "shipped: tiny/lora.yaml"  # 256 px
    [table] = [d.value for d in at.dataframe if "bucket (HxW)" in d.value.columns]
    # at 256 px the buckets nearest 1:2, 2:1 and 1:1 are 192x352, 352x192 and 256x256 (h x w)
    assert dict(zip(table["bucket (HxW)"], table["images"])) == {"192x352": 3, "352x192": 1, "256x256": 1}
    at.selectbox(key="data_crop_image").set_value(str(folder / "wide0.png")).run()
    image_captions = [i.caption for element in at.get("image") for i in element.proto.imgs]
    assert {"original 128x64", "as trained: 256x256", "in its bucket: 192x352"} <= set(image_captions)
    square = np.asarray(cropped(str(folder / "wide0.png"), (256, 256))).astype(int)
    assert (np.abs(square - (255, 0, 0)).max(axis=2) < 40).mean() > 0.97  # the center crop keeps the red middle
