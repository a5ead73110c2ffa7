"""cache.mode (issue 21 item 2): ``none`` keeps the encoders loaded and encodes each batch in the training
process; it must train exactly what ``full`` (the encode-once cache) trains, and write no cache."""
from __future__ import annotations

from pathlib import Path

import pytest

from cascade_studio.trainers.events import read_events

REPO = Path(__file__).resolve().parents[1]
# The ControlNet from pre-made control images: its hint encoder reads the control image, so every encoder input
# kind (caption, image, control image) goes through both paths.
RECIPE = str(REPO / "recipes" / "tiny" / "controlnet-image.yaml")


def run(workspace: Path, mode: str):
    from cascade_studio.run import train

    result = train(RECIPE, [f"data.path={REPO / 'datasets' / 'tiny-shapes'}", f"workspace={workspace}",
                            f"cache.mode={mode}", "preview.every=0", "train.max_steps=3", "tracking.enabled=false",
                            "data.caption_dropout=0.5", "data.resolution=128"], progress=False)
    losses = [e["loss"] for e in read_events(result.run_dir) if e["event"] == "step"]
    return result, losses


@pytest.mark.slow
def test_encoding_on_the_fly_trains_what_the_cache_trains(tmp_path):
    """Same images, control images, captions, crops, empty-caption features (caption dropout 0.5 uses them) and
    held-out set:
    the same losses and held-out losses. Tolerance 1e-5 relative: the cache encodes the images in batches of 8,
    the loop in batches of 4 (the same maths, other float summation order in the encoders)."""
    cached, cached_losses = run(tmp_path / "full", "full")
    on_the_fly, losses = run(tmp_path / "none", "none")
    print("largest relative loss difference:", max(abs(a - b) / abs(b) for a, b in zip(losses, cached_losses)))
    assert len(losses) == 3 and losses == pytest.approx(cached_losses, rel=1e-5)
    assert on_the_fly.heldout_before == pytest.approx(cached.heldout_before, rel=1e-5)
    assert on_the_fly.heldout_after == pytest.approx(cached.heldout_after, rel=1e-5)
    assert on_the_fly.heldout_after != on_the_fly.heldout_before  # it trained
    assert (tmp_path / "full" / "cache").is_dir() and not (tmp_path / "none" / "cache").exists()
