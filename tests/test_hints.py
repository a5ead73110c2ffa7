"""Control hints: canny is cv2's binary edge map, inpainting masks are deterministic per sample and paint
white, super-resolution is effnet latents of the half-size image, pre-made control images are converted or
refused with the file named, and the hints work as encode-cache encoders."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cascade_studio.adapters.controlnet.hints import (CannyHint, HintError, ImageHint, InpaintingHint,
                                                      SuperResolutionHint, build_hint_encoder, make_mask)


def _shapes_image(size: int = 224) -> torch.Tensor:
    """A known picture: a white square and a grey disc on black, [3, size, size] in [0, 1]."""
    array = np.zeros((size, size, 3), np.uint8)
    s = size // 224
    array[40 * s:120 * s, 30 * s:110 * s] = 255
    cv2.circle(array, (160 * s, 150 * s), 40 * s, (128, 128, 128), thickness=-1)
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


# --------------------------------------------------------------------------------------------------------------
# canny


def test_canny_is_binary_and_matches_cv2_on_a_known_image():
    image = _shapes_image(224)  # already 224 px: the hint is cv2.Canny of exactly these pixels
    edges = CannyHint().encode([image])["control"]
    assert edges.shape == (1, 1, 224, 224)
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    expected = cv2.Canny(np.ascontiguousarray((image * 255).permute(1, 2, 0).numpy().astype(np.uint8)), 100, 200)
    assert torch.equal(edges[0, 0], torch.from_numpy(expected).float() / 255)
    # The square's outline is found where it is: its top edge row is on, its flat interior off.
    assert edges[0, 0, 39:41, 50:100].amax(0).all() and edges[0, 0, 60:100, 50:90].sum() == 0


def test_canny_is_computed_at_224_and_brought_back_binary():
    big = _shapes_image(448)
    edges = CannyHint().encode([big, big])["control"]
    assert edges.shape == (2, 1, 448, 448) and set(edges.unique().tolist()) == {0.0, 1.0}
    small = CannyHint().encode([torch.nn.functional.interpolate(big[None], size=(224, 224), mode="bilinear")[0]])
    # Nearest upsampling by 2: every 224-px edge pixel becomes a 2x2 block.
    assert torch.equal(edges[0, 0], small["control"][0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1))
    soft = CannyHint(upsample="bilinear").encode([big])["control"]
    assert ((soft > 0) & (soft < 1)).any()  # the official soft edges, on request
    assert CannyHint().identity != CannyHint(upsample="bilinear").identity


# --------------------------------------------------------------------------------------------------------------
# inpainting


def _photo(seed: int, size: int = 64) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 0.9  # never white already


def test_inpainting_masks_are_deterministic_per_sample_and_paint_white():
    hint = InpaintingHint(mask="mixed")
    photos = [_photo(i) for i in range(6)]
    first = hint.encode(photos)["control"]
    again = hint.encode(list(reversed(photos)))["control"].flip(0)  # batch order does not matter
    assert torch.equal(first, again)
    assert first.shape == (6, 4, 64, 64)
    masks = first[:, 3:]
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert len({m.numpy().tobytes() for m in masks}) == 6  # different samples, different masks
    for photo, h, m in zip(photos, first, masks.bool()):
        assert (h[:3][m.expand(3, -1, -1)] == 1.0).all()  # masked pixels are white
        assert torch.equal(h[:3][~m.expand(3, -1, -1)], photo[~m.expand(3, -1, -1)])  # the rest untouched
    # With keys, the key decides: same key -> same mask even for another image; the cache stays valid.
    keyed = hint.encode([{"key": "cat", "image": photos[0]}, {"key": "cat", "image": photos[1]},
                         {"key": "dog", "image": photos[0]}])["control"][:, 3]
    assert torch.equal(keyed[0], keyed[1]) and not torch.equal(keyed[0], keyed[2])


def test_mask_kinds_have_their_shapes():
    for seed in range(5):
        box = make_mask("box", 64, 96, torch.Generator().manual_seed(seed))[0]
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        inside = box[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert inside.all()  # one filled rectangle
        assert 0.25**2 - 0.02 <= box.mean() <= 0.75**2 + 0.02
        border = make_mask("border", 64, 96, torch.Generator().manual_seed(seed))[0]
        keep = border == 0
        rows, cols = keep.any(1).nonzero(), keep.any(0).nonzero()
        assert keep[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # outpainting: frame masked
        assert 1 - 0.85**2 - 0.02 <= border.mean() <= 1 - 0.4**2 + 0.02
        blobs = make_mask("random", 64, 96, torch.Generator().manual_seed(seed))
        assert 0.08 <= blobs.mean() <= 0.62


def test_inpainting_with_a_saliency_model_follows_the_official_threshold():
    scores = torch.linspace(0, 0.5, 64).view(1, 1, 1, 64).expand(2, 1, 64, 64)
    hint = InpaintingHint(saliency=lambda images: scores[: len(images)], p_outpaint=0.0)
    masks = hint.encode([_photo(0), _photo(1)])["control"][:, 3]
    # The threshold is in [0.04, 0.4]: columns scoring above 0.4 are always masked, below 0.04 never.
    assert masks[:, :, -10:].all() and not masks[:, :, :5].any()
    assert "saliency=function" in hint.identity


# --------------------------------------------------------------------------------------------------------------
# super-resolution


class _PoolingEffnet:
    """A stand-in effnet whose output is easy to recompute: 16 channels of stride-32 average pooling."""

    identity = "fake-effnet"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(images, 32)
        return torch.cat([pooled] * 5 + [pooled[:, :1]], dim=1)  # 16 channels


def test_super_resolution_is_effnet_of_the_half_size_image_on_the_latent_grid():
    image = _shapes_image(256)
    control = SuperResolutionHint(_PoolingEffnet()).encode([image])["control"]
    assert control.shape == (1, 16, 8, 8)
    half = image[None, :, ::2, ::2]  # nearest downsampling by 2 keeps every other pixel
    latents = _PoolingEffnet().encode(half)  # 4x4
    assert torch.equal(control, latents.repeat_interleave(2, -2).repeat_interleave(2, -1))


def test_super_resolution_with_the_real_tiny_effnet():
    from cascade_studio.models.effnet import EffnetEncoder

    effnet = EffnetEncoder("tiny")
    control = build_hint_encoder("sr", effnet=effnet).encode([_shapes_image(256)])["control"]
    assert control.shape == (1, 16, 8, 8) and torch.isfinite(control).all()
    assert torch.equal(control[..., ::2, ::2], control[..., 1::2, 1::2])  # 2x nearest upsampling of a 4x4 grid


# --------------------------------------------------------------------------------------------------------------
# pre-made control images


def test_image_hint_converts_channels_and_sizes(tmp_path):
    grey = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1)), mode="L")  # 64x32 ramp
    path = tmp_path / "ramp_control.png"
    grey.save(path)
    one = ImageHint(channels=1, size=(64, 128)).encode([str(path)])["control"]
    assert one.shape == (1, 1, 64, 128) and 0 <= one.min() and one.max() <= 1
    assert one[0, 0, :, 0].mean() < 0.05 and one[0, 0, :, -1].mean() > 0.9  # the ramp survives resizing
    rgb = ImageHint(channels=3).encode([grey.convert("RGB").resize((64, 32))])["control"]
    assert rgb.shape == (1, 3, 32, 64) and torch.equal(rgb[0, 0], rgb[0, 2])
    colour = torch.zeros(3, 32, 32)
    colour[0] = 1.0  # pure red -> luma 0.299
    torch.testing.assert_close(ImageHint(channels=1).encode([colour])["control"], torch.full((1, 1, 32, 32), 0.299))


def test_image_hint_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken_control.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(HintError, match=r"broken_control\.png: not a readable image"):
        ImageHint().encode([str(bad)])
    with pytest.raises(HintError, match=r"missing_control\.png: control image not found"):
        ImageHint().encode([str(tmp_path / "missing_control.png")])
    wide = tmp_path / "wide_control.png"
    Image.new("RGB", (300, 100)).save(wide)
    with pytest.raises(HintError, match=r"wide_control\.png: control image is 300x100 .* training size is 256x256"):
        ImageHint(size=256).encode([str(wide)])
    with pytest.raises(HintError, match=r"photo_07\.png: control hint is 100x300; it must match the latent grid"):
        ImageHint().encode([{"control_image": Image.new("L", (100, 300)), "path": "photo_07.png"}])
    with pytest.raises(HintError, match=r"control image 1 of the batch: control image values must be finite"):
        ImageHint().encode([torch.zeros(3, 32, 32), torch.full((3, 32, 32), 2.0)])


def test_build_hint_encoder_choices():
    assert isinstance(build_hint_encoder("canny"), CannyHint)
    assert build_hint_encoder("image", channels=1).channels == 1
    assert build_hint_encoder("inpainting", mask="border").mask == "border"
    with pytest.raises(HintError, match="needs the effnet encoder"):
        build_hint_encoder("sr")
    with pytest.raises(HintError, match="unknown control 'depth'"):
        build_hint_encoder("depth")


# --------------------------------------------------------------------------------------------------------------
# through the encode cache


def test_hints_work_as_cache_encoders(tmp_path):
    from cascade_studio.data import build_cache, scan_source

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        photo = (_shapes_image(224) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(np.roll(photo, 20 * i, axis=1)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"shapes {i}")
        Image.fromarray(np.roll(photo, 20 * i, axis=1)[..., 0]).save(folder / f"p{i}_control.png")
    records = scan_source({"source": "folder", "path": str(folder)}, control_column="_control").records
    pre = {"resolution": 64, "crop": "center"}
    canny = build_cache(records, [CannyHint()], tmp_path / "c1", pre, progress=False)
    assert canny[0]["control"].shape == (1, 64, 64) and set(canny[0]["control"].unique().tolist()) <= {0.0, 1.0}
    premade = build_cache(records, [ImageHint(channels=1)], tmp_path / "c2", pre, progress=False)
    assert premade[1]["control"].shape == (1, 64, 64)
    painted = build_cache(records, [InpaintingHint()], tmp_path / "c3", pre, progress=False)
    rebuilt = build_cache(records, [InpaintingHint()], tmp_path / "c4", pre, progress=False)
    assert torch.equal(painted[0]["control"], rebuilt[0]["control"])  # deterministic: a rebuild agrees
