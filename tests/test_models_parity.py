"""Numerical parity with the official modules: every ``out*`` tensor of the reference file, fp32, eval mode,
weights loaded through load_official_state_dict."""

from __future__ import annotations

import pytest
import torch

from cascade_studio.models import (
    build_controlnet,
    build_previewer,
    build_stage_a,
    build_stage_b,
    build_stage_c,
    load_official_state_dict,
)

TOL = 1e-4


def _loaded(builder, data, group):
    model = builder(**data.config(group))
    load_official_state_dict(model, data.weights(group))
    return model.eval()


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert want.abs().max() > 1e-2  # the reference is not trivially zero, so closeness means something
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def stage_c(official_parity):
    return _loaded(build_stage_c, official_parity, "stage_c")


def _stage_c_inputs(data):
    return [data("stage_c", k) for k in ("x", "r", "clip_text", "clip_text_pooled", "clip_img")]


@torch.no_grad()
def test_stage_c_out(stage_c, official_parity):
    _assert_close(stage_c(*_stage_c_inputs(official_parity)), official_parity("stage_c", "out"))


@torch.no_grad()
def test_stage_c_out_cnet(stage_c, official_parity):
    cnet_len = official_parity.meta["stage_c"]["cnet_len"]
    assert stage_c.resblock_count() == cnet_len
    cnet = [None] * cnet_len
    for key in official_parity.tensors:
        if key.startswith("stage_c.cnet."):
            cnet[int(key.rsplit(".", 1)[1])] = official_parity.tensors[key]
    out = stage_c(*_stage_c_inputs(official_parity), cnet=cnet)
    _assert_close(out, official_parity("stage_c", "out_cnet"))
    assert (out - official_parity("stage_c", "out")).abs().max() > 1e-2  # the control really acted


@torch.no_grad()
def test_stage_c_out_sca_crp(stage_c, official_parity):
    out = stage_c(
        *_stage_c_inputs(official_parity), sca=official_parity("stage_c", "sca"), crp=official_parity("stage_c", "crp")
    )
    _assert_close(out, official_parity("stage_c", "out_sca_crp"))


@torch.no_grad()
@pytest.mark.parametrize("with_pixels", [False, True])
def test_stage_b(official_parity, with_pixels):
    model = _loaded(build_stage_b, official_parity, "stage_b")
    args = [official_parity("stage_b", k) for k in ("x", "r", "effnet", "clip")]
    if with_pixels:
        out, want = model(*args, pixels=official_parity("stage_b", "pixels")), official_parity("stage_b", "out_pixels")
    else:
        out, want = model(*args), official_parity("stage_b", "out")
    _assert_close(out, want)


@torch.no_grad()
def test_stage_a_decode_and_encode(official_parity):
    model = _loaded(build_stage_a, official_parity, "stage_a")
    _assert_close(model.decode(official_parity("stage_a", "latent")), official_parity("stage_a", "decoded"))
    encoded = model.encode(official_parity("stage_a", "image"), quantize=False)
    assert isinstance(encoded, torch.Tensor)
    _assert_close(encoded, official_parity("stage_a", "encoded"))


@torch.no_grad()
def test_previewer(official_parity):
    model = _loaded(build_previewer, official_parity, "previewer")
    _assert_close(model(official_parity("previewer", "x")), official_parity("previewer", "out"))


@torch.no_grad()
def test_controlnet_simple(official_parity):
    model = _loaded(build_controlnet, official_parity, "controlnet")
    outputs = model(official_parity("controlnet", "hint"))
    assert len(outputs) == official_parity.meta["controlnet"]["list_len"]
    injected = official_parity.config("controlnet")["proj_blocks"]
    for i, out in enumerate(outputs):
        if i in injected:
            _assert_close(out, official_parity("controlnet", f"out.{i}"))
        else:
            assert out is None
