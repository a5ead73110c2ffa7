"""Our modules, seen through official_state_dict, must have exactly the published names and shapes.

Built on the meta device so the 3.6B model costs nothing. The reference list was produced by running the
official modules; a loader that accepts the published files needs exactly these keys.
"""

from __future__ import annotations

import json
from typing import Callable

import pytest
import torch
from torch import nn

from cascade_studio.models import (
    PRESETS,
    build_controlnet,
    build_previewer,
    build_stage_a,
    build_stage_b,
    build_stage_c,
    get_preset,
    load_official_state_dict,
    official_state_dict,
)

BIG_PROJ = PRESETS["big"].controlnet_proj_blocks

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "stage_c_big": lambda: build_stage_c(**PRESETS["big"].stage_c),
    "stage_c_lite": lambda: build_stage_c(**PRESETS["lite"].stage_c),
    "stage_b_big": lambda: build_stage_b(**PRESETS["big"].stage_b),
    "stage_b_lite": lambda: build_stage_b(**PRESETS["lite"].stage_b),
    "stage_a": lambda: build_stage_a(**PRESETS["big"].stage_a),
    "previewer": lambda: build_previewer(**PRESETS["big"].previewer),
    "controlnet_canny": lambda: build_controlnet(1, 2048, BIG_PROJ),
    "controlnet_inpainting": lambda: build_controlnet(4, 2048, BIG_PROJ),
    "controlnet_sr_large": lambda: build_controlnet(16, 2048, BIG_PROJ, bottleneck_mode="large"),
}


@pytest.fixture(scope="module")
def reference(reference_dir):
    return json.loads((reference_dir / "official_state_dict_keys.json").read_text())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_official_names_shapes_and_counts(name, reference):
    with torch.device("meta"):
        module = BUILDERS[name]()
    ours = official_state_dict(module)
    expected = {key: list(shape) for key, shape in reference["keys"][name]}
    got = {key: list(t.shape) for key, t in ours.items()}
    assert got == expected
    # Same module order too, so files we write list keys like the official ones.
    assert list(got) == [key for key, _ in reference["keys"][name]]
    # Counts in the reference include BatchNorm buffers (num_batches_tracked counts 1).
    assert sum(t.numel() for t in ours.values()) == reference["param_counts"][name]


@pytest.mark.parametrize("name", ["stage_c_lite", "stage_b_lite", "controlnet_canny"])
def test_meta_model_accepts_official_layout_by_assign(name, reference):
    """The loading path: build on meta, assign tensors of the reference shapes (here meta too)."""
    with torch.device("meta"):
        module = BUILDERS[name]()
    state = {key: torch.empty(shape, device="meta") for key, shape in reference["keys"][name]}
    load_official_state_dict(module, state, assign=True)
    assert all(p.is_meta for p in module.parameters())
    for fused in (k for k in state if k.endswith("in_proj_weight")):
        attn = module.get_submodule(fused.rsplit(".", 1)[0])
        c = attn.to_q.in_features
        assert [attn.to_q.weight.shape, attn.to_k.weight.shape, attn.to_v.weight.shape] == [(c, c)] * 3


def test_fresh_stage_c_skips_init_on_meta_but_not_on_cpu(monkeypatch):
    from cascade_studio.models.stage_c import StageC

    with monkeypatch.context() as patch:
        patch.setattr(StageC, "_init_weights", lambda self: pytest.fail("init ran on the meta device"))
        with torch.device("meta"):
            meta = build_stage_c(**PRESETS["tiny"].stage_c)
    assert all(p.is_meta for p in meta.parameters())
    cpu = build_stage_c(**PRESETS["tiny"].stage_c)
    assert torch.count_nonzero(cpu.clf[1].weight) == 0
    assert cpu.clip_txt_mapper.weight.std().item() == pytest.approx(0.02, rel=0.15)


@pytest.mark.parametrize("preset, count", [("big", 64), ("lite", 32), ("tiny", 12)])
def test_resblock_count_and_controlnet_defaults(preset, count):
    p = PRESETS[preset]
    with torch.device("meta"):
        stage_c = build_stage_c(**p.stage_c)
    assert stage_c.resblock_count() == count
    assert max(p.controlnet_proj_blocks) < count
    assert p.controlnet_c_proj == (p.stage_c.get("c_hidden") or [2048])[0]


def test_tiny_preset_dimensions_agree_with_design():
    tiny = PRESETS["tiny"]
    assert tiny.stage_c["c_clip_text"] == tiny.stage_c["c_clip_text_pooled"] == 64
    assert tiny.stage_c["c_clip_img"] == 32
    assert tiny.stage_b["c_clip"] == 64  # Stage B takes the same pooled text embedding
    assert (tiny.train_resolution, tiny.generate_resolution) == (256, 320)
    assert (PRESETS["big"].train_resolution, PRESETS["lite"].generate_resolution) == (768, 1024)


def test_get_preset_returns_a_private_copy_and_names_choices():
    copy = get_preset("tiny")
    copy.stage_c["c_hidden"][0] = 999
    assert PRESETS["tiny"].stage_c["c_hidden"][0] == 64
    with pytest.raises(KeyError, match="big, lite, tiny"):
        get_preset("huge")
