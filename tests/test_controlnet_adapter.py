"""ControlNet adapter invariants on the tiny Stage C: a fresh ControlNet changes nothing, strength scales the
residuals, only ControlNet weights train, export -> import is exact, published layouts are recognised and files
for another base width are refused with a message naming both widths."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cascade_studio.adapters.controlnet.config import ControlNetConfig
from cascade_studio.adapters import controlnet as cn
from cascade_studio.adapters.base import AdaptedStageC, AdapterMismatchError, merge_cnet
from cascade_studio.adapters.controlnet import ControlNetAdapter, ControlNetSpec
from cascade_studio.adapters.files import load_adapter_tensors
from cascade_studio.adapters.registry import AdapterContext, detect_method
from cascade_studio.models.official import official_state_dict
from cascade_studio.models.presets import build_controlnet, build_stage_c, get_preset

TINY_BLOCKS = (0, 2, 9, 11)
BIG_BLOCKS = [0, 4, 8, 12, 51, 55, 59, 63]


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.5) -> None:
    """Non-zero random weights (the official init zeroes Stage C's output conv and every ControlNet output
    projection, which would make every comparison below trivially pass). ControlNets get std 0.5 so their
    residuals visibly move the output; Stage C gets 0.05 to stay numerically tame."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def stage_c() -> torch.nn.Module:
    model = build_stage_c(**get_preset("tiny").stage_c)
    _randomize(model, 0, std=0.05)
    return model.eval().requires_grad_(False)  # eval: dropout off, so two calls can be compared exactly


@pytest.fixture()
def model(stage_c) -> AdaptedStageC:
    return AdaptedStageC(stage_c)


@pytest.fixture(scope="module")
def context() -> AdapterContext:
    return AdapterContext(preset="tiny", base_fingerprint="tiny-test", stage_c_config=get_preset("tiny").stage_c)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 16, 8, 8, generator=g), "r": torch.rand(2, generator=g),
            "clip_text": torch.randn(2, 77, 64, generator=g), "clip_text_pooled": torch.randn(2, 1, 64, generator=g),
            "clip_img": torch.randn(2, 1, 32, generator=g)}


def _hint(channels: int = 1, size: int = 256, seed: int = 2) -> torch.Tensor:
    return torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _run(model, inputs, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **extra)


def test_fresh_controlnet_leaves_stage_c_output_unchanged(model, context, inputs):
    base = _run(model, inputs)
    adapter = cn.create_adapter(ControlNetConfig(control="canny"), model, context)
    # tiny default: the tiny compressor architecture as backbone, fed the hint at image resolution
    assert adapter.spec == ControlNetSpec(c_in=1, c_proj=64, proj_blocks=TINY_BLOCKS, bottleneck="effnet_tiny",
                                          control="canny", hint_size=None)
    assert torch.equal(_run(model, inputs, control=_hint()), base)


def test_strength_scales_residuals_and_zero_is_the_base(model, context, inputs):
    base = _run(model, inputs)
    adapter = cn.create_adapter(ControlNetConfig(control="canny"), model, context)
    _randomize(adapter, 3)
    hint = _hint()
    with torch.no_grad():
        full = adapter.residuals(hint)
        assert _run(model, inputs, control=hint).sub(base).abs().max() > 1e-3  # the ControlNet does something
        adapter.set_strength(0.5)
        half = adapter.residuals(hint)
        for i in range(len(full)):
            assert (full[i] is None) == (i not in TINY_BLOCKS)
            if full[i] is not None:
                torch.testing.assert_close(half[i], 0.5 * full[i])
        # The adapted model equals Stage C fed the scaled residuals by hand.
        expected = model.stage_c(**inputs, cnet=[None if r is None else 0.5 * r for r in full])
        torch.testing.assert_close(_run(model, inputs, control=hint), expected, rtol=0, atol=1e-6)
    adapter.set_strength(0.0)
    assert torch.equal(_run(model, inputs, control=hint), base)
    model.set_enabled(adapter.name, False)
    assert torch.equal(_run(model, inputs, control=hint), base)


def test_only_controlnet_parameters_receive_gradients(model, context, inputs):
    adapter = cn.create_adapter(ControlNetConfig(control="inpainting"), model, context)
    _randomize(adapter.controlnet.backbone, 4)
    adapter.train()
    assert set(map(id, adapter.trainable_parameters())) == set(map(id, adapter.controlnet.parameters()))
    model(**inputs, control=_hint(4)).square().mean().backward()
    assert all(p.grad is None for p in model.stage_c.parameters())
    # The zero output projections still get a gradient (their input features are not zero): learning starts.
    for projection in adapter.controlnet.projections:
        assert projection[2].weight.grad is not None and projection[2].weight.grad.abs().sum() > 0


def test_freeze_backbone_trains_projections_only(model, context, inputs):
    adapter = cn.create_adapter(ControlNetConfig(control="canny", freeze_backbone=True), model, context)
    _randomize(adapter.controlnet.projections, 5)
    assert set(map(id, adapter.trainable_parameters())) == set(map(id, adapter.controlnet.projections.parameters()))
    model(**inputs, control=_hint()).square().mean().backward()
    assert all(p.grad is None for p in adapter.controlnet.backbone.parameters())
    assert all(p.grad is not None for p in adapter.controlnet.projections.parameters())


@pytest.fixture(scope="module")
def effnet_adapter() -> ControlNetAdapter:
    """An effnet-bottleneck ControlNet (full EfficientNetV2-S backbone, random init) sized for the tiny base;
    built once because the backbone takes seconds to construct."""
    adapter = ControlNetAdapter(ControlNetSpec(c_in=1, c_proj=64, proj_blocks=TINY_BLOCKS, bottleneck="effnet"))
    _randomize(adapter.controlnet.projections, 8)
    return adapter


def test_backbone_stays_in_eval_mode_while_training(effnet_adapter):
    adapter = effnet_adapter
    adapter.train()
    assert adapter.training and adapter.controlnet.projections.training
    assert not any(m.training for m in adapter.controlnet.backbone.modules())
    batchnorm = next(m for m in adapter.controlnet.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = batchnorm.running_mean.clone()
    with torch.no_grad():
        adapter.controlnet(torch.rand(2, 1, 64, 64) * 5)
    assert torch.equal(batchnorm.running_mean, before)  # statistics frozen, as the official trainer keeps them
    adapter.eval()


def test_missing_or_malformed_control_input_is_a_clear_error(model, context, inputs):
    cn.create_adapter(ControlNetConfig(control="canny"), model, context, name="edges")
    with pytest.raises(AdapterMismatchError, match=r"'edges' needs a control hint: pass control="):
        _run(model, inputs)
    with pytest.raises(AdapterMismatchError, match=r"expects a hint batch \[B, 1, H, W\]; got \(2, 3, 256, 256\)"):
        _run(model, inputs, control=_hint(3))


def test_attach_refuses_wrong_width_and_out_of_range_blocks(model):
    big = ControlNetAdapter(ControlNetSpec(c_in=1, c_proj=2048, proj_blocks=(0, 4), bottleneck="simple"))
    with pytest.raises(AdapterMismatchError, match=r"width 2048 \(big\); the base has width 64 \(tiny\)"):
        model.add_adapter(big)
    far = ControlNetAdapter(ControlNetSpec(c_in=1, c_proj=64, proj_blocks=(0, 12), bottleneck="simple"))
    with pytest.raises(AdapterMismatchError, match=r"ResBlocks \[12\].*only 12 ResBlocks"):
        model.add_adapter(far)
    assert not model.enabled  # nothing was left half-attached


def test_export_then_import_reproduces_outputs_exactly(tmp_path, model, context, inputs, stage_c):
    adapter = cn.create_adapter(ControlNetConfig(control="inpainting", strength=0.7), model, context)
    _randomize(adapter, 6)
    hint = _hint(4)
    expected = _run(model, inputs, control=hint)
    path = cn.export_adapter(adapter, tmp_path / "inpaint", extra_metadata={"cascade_studio.recipe": "{}"})
    assert path.name == "inpaint.safetensors"

    tensors, meta = load_adapter_tensors(path)
    # Adapter-only, official layout: no Stage C weight leaked into the file.
    assert all(k.startswith(("backbone.", "projections.")) for k in tensors)
    assert {f"projections.{i}.{j}.weight" for i in range(4) for j in (0, 2)} <= set(tensors)
    assert meta["modelspec.architecture"] == "stable-cascade-v1-prior/controlnet"
    assert json.loads(meta["cascade_studio.proj_blocks"]) == list(TINY_BLOCKS)
    assert (meta["cascade_studio.c_in"], meta["cascade_studio.c_proj"], meta["cascade_studio.bottleneck"]) == (
        "4", "64", "effnet_tiny")
    assert (meta["cascade_studio.base_width"], meta["cascade_studio.base_fingerprint"]) == ("64", "tiny-test")
    assert meta["cascade_studio.control"] == "inpainting" and meta["cascade_studio.recipe"] == "{}"
    assert detect_method(path) == "controlnet"

    fresh = AdaptedStageC(stage_c)
    dotted = path.rename(tmp_path / "inpaint.v2.safetensors")
    loaded = cn.load_adapter_file(dotted, fresh, context, strength=0.7)
    assert loaded.spec == adapter.spec and loaded.name == "inpaint_v2"  # ModuleDict keys cannot hold dots
    assert torch.equal(_run(fresh, inputs, control=hint), expected)


def test_init_from_starts_from_a_file_and_refuses_a_contradicting_recipe(tmp_path, model, context, inputs, stage_c):
    source = cn.create_adapter(ControlNetConfig(control="canny"), model, context, name="source")
    _randomize(source, 7)
    path = cn.export_adapter(source, tmp_path / "canny.safetensors")
    other = AdaptedStageC(stage_c)
    started = cn.create_adapter(ControlNetConfig(control="canny", init_from=str(path)), other, context)
    for key, value in source.adapter_state_dict().items():
        assert torch.equal(started.adapter_state_dict()[key], value), key
    with pytest.raises(AdapterMismatchError, match=r"init_from .*canny.safetensors: it takes 1-channel hints \(canny\)"
                                                   r".*control inpainting gives 4"):
        cn.create_adapter(ControlNetConfig(control="inpainting", init_from=str(path)), AdaptedStageC(stage_c), context)


def _published_shapes(reference_dir: Path, name: str) -> dict[str, list[int]]:
    return dict(json.loads((reference_dir / "official_state_dict_keys.json").read_text())["keys"][name])


@pytest.mark.parametrize("name, c_in, bottleneck, control", [
    ("controlnet_canny", 1, "effnet", "canny"),
    ("controlnet_inpainting", 4, "effnet", "inpainting"),
    ("controlnet_sr_large", 16, "large", "sr"),
])
def test_published_layouts_are_recognised_and_rebuilt_exactly(reference_dir, name, c_in, bottleneck, control):
    shapes = _published_shapes(reference_dir, name)
    layout = cn.read_layout(shapes, name)
    assert layout == cn.FileLayout(c_in=c_in, c_proj=2048, projection_count=8, bottleneck=bottleneck)
    assert cn.sniff(list(shapes), {})
    assert cn.formats.control_from({}, layout) == control
    with torch.device("meta"):  # 54M-203M parameters: build the skeleton only
        rebuilt = build_controlnet(c_in, 2048, BIG_BLOCKS, bottleneck)
    ours = {k: list(v.shape) for k, v in official_state_dict(rebuilt).items()}
    assert ours == shapes  # same names, same shapes: the published file loads strictly


def test_recipe_defaults_per_base():
    big = AdapterContext(preset="big")
    spec = cn.spec_from_config(ControlNetConfig(control="canny"), 2048, big)
    assert (spec.c_in, spec.c_proj, spec.proj_blocks, spec.bottleneck, spec.hint_size) == (
        1, 2048, tuple(BIG_BLOCKS), "effnet", None)
    spec = cn.spec_from_config(ControlNetConfig(control="sr", bottleneck="effnet"), 2048, big)
    assert (spec.c_in, spec.bottleneck) == (16, "large")
    lite = cn.spec_from_config(ControlNetConfig(control="inpainting"), 1536, AdapterContext(preset="lite"))
    assert (lite.c_in, lite.c_proj, lite.proj_blocks) == (4, 1536, (0, 2, 4, 6, 25, 27, 29, 31))
    image = cn.spec_from_config(ControlNetConfig(control="image", proj_blocks=(1, 3)), 64,
                                AdapterContext(preset="tiny"), channels=1)
    assert (image.c_in, image.proj_blocks, image.bottleneck, image.hint_size) == (1, (1, 3), "effnet_tiny", None)
    simple = cn.spec_from_config(ControlNetConfig(control="image", bottleneck="simple"), 64,
                                 AdapterContext(preset="tiny"), channels=1)
    assert (simple.bottleneck, simple.hint_size) == ("simple", 32)


def test_published_big_file_is_refused_on_a_smaller_base(tmp_path, model, context):
    """A file shaped like the published canny ControlNet (projections to width 2048, no metadata), kept small
    by the simple backbone: refused by shape before any weight is loaded."""
    spec = ControlNetSpec(c_in=1, c_proj=2048, proj_blocks=tuple(BIG_BLOCKS), bottleneck="simple")
    path = tmp_path / "canny.safetensors"
    save_file({k: v.contiguous() for k, v in ControlNetAdapter(spec).adapter_state_dict().items()}, str(path))
    assert detect_method(path) == "controlnet"  # no metadata: recognised from the key layout
    with pytest.raises(AdapterMismatchError, match=r"canny.safetensors: this ControlNet was made for a Stage C of "
                                                   r"width 2048 \(big\); the base has width 64 \(tiny\)"):
        cn.load_adapter_file(path, model, context)
    assert not model.enabled


def test_effnet_file_without_metadata_loads_with_preset_blocks(tmp_path, model, context, inputs, effnet_adapter):
    """Like a published file: only tensors; c_in, bottleneck and control come from the keys and shapes, the
    injection points from the base preset."""
    source = effnet_adapter
    path = tmp_path / "canny_effnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.adapter_state_dict().items()}, str(path))
    loaded = cn.load_adapter_file(path, model, context)
    assert loaded.spec == ControlNetSpec(c_in=1, c_proj=64, proj_blocks=TINY_BLOCKS, bottleneck="effnet",
                                         control="canny")
    hint = _hint(1, size=64)
    with torch.no_grad():
        expected = model.stage_c(**inputs, cnet=source.residuals(hint))
    assert torch.equal(_run(model, inputs, control=hint), expected)


def test_two_controlnets_sum_their_residuals(model, context, inputs):
    # random backbones on both, so neither one's BatchNorm statistics dwarf the other's residuals
    first = cn.create_adapter(ControlNetConfig(control="canny", backbone_init="random"), model, context, name="edges")
    _randomize(first, 9)
    second = ControlNetAdapter(ControlNetSpec(c_in=4, c_proj=64, proj_blocks=(2, 5), bottleneck="effnet_tiny",
                                              control="inpainting"), name="paint", input_name="mask")
    _randomize(second, 10)
    model.add_adapter(second)
    edges, paint = _hint(1), _hint(4, seed=11)
    with torch.no_grad():
        both = _run(model, inputs, control=edges, mask=paint)
        expected = model.stage_c(**inputs, cnet=merge_cnet(first.residuals(edges), second.residuals(paint)))
        only_first = model.stage_c(**inputs, cnet=first.residuals(edges))
    torch.testing.assert_close(both, expected, rtol=0, atol=1e-6)
    assert (both - only_first).abs().max() > 1e-3
    summed = merge_cnet(first.residuals(edges), second.residuals(paint))
    torch.testing.assert_close(summed[2], first.residuals(edges)[2] + second.residuals(paint)[2])


def test_hint_is_area_downsampled_to_hint_size():
    adapter = ControlNetAdapter(ControlNetSpec(c_in=1, c_proj=64, proj_blocks=(0,), bottleneck="simple",
                                               hint_size=32))
    hint = torch.zeros(1, 1, 256, 384)
    hint[..., :8, :8] = 1.0  # exactly one 8x8 cell of the 32x48 grid
    small = adapter.prepare_hint(hint)
    assert small.shape == (1, 1, 32, 48)
    assert small[0, 0, 0, 0] == 1.0 and small.sum() == 1.0
    assert adapter.prepare_hint(torch.ones(1, 1, 16, 16)).shape == (1, 1, 16, 16)  # never upsampled


def test_training_inputs_takes_the_cached_hint():
    hint = torch.ones(2, 1, 8, 8)
    assert cn.training_inputs({"control": hint}, {"x": 1}, None, None) == {"x": 1, "control": hint}
    with pytest.raises(AdapterMismatchError, match="rebuild it"):
        cn.training_inputs({"latents": hint}, {}, None, None)
    encoders = cn.hint_encoders(ControlNetConfig(control="inpainting"))
    assert [e.identity for e in encoders] == ["hint-inpainting-v1(mask=mixed)"]
    assert cn.build_hint_encoder("inpainting", mask="box").identity == "hint-inpainting-v1(mask=box)"


def test_backbone_starts_from_the_base_compressor(model, context):
    """An EfficientNet backbone starts from the base's own compressor (as the official trainer starts from an
    ImageNet EfficientNet); extra hint channels start at zero, fewer take the first RGB filters."""
    from cascade_studio.models.random_init import build_random

    compressor = build_random("effnet", "tiny").backbone.state_dict()
    image = cn.create_adapter(ControlNetConfig(control="image"), model, context, name="image")
    state = image.controlnet.backbone.state_dict()
    assert set(state) == set(compressor)
    assert all(torch.equal(state[k], compressor[k]) for k in state)
    assert image.info["cascade_studio.backbone_init"] == "compressor"

    canny = cn.create_adapter(ControlNetConfig(control="canny"), model, context, name="canny").controlnet.backbone
    assert torch.equal(canny.state_dict()["0.0.weight"], compressor["0.0.weight"][:, :1])
    inpaint = cn.create_adapter(ControlNetConfig(control="inpainting"), model, context, name="inpaint").controlnet.backbone
    first = inpaint.state_dict()["0.0.weight"]
    assert torch.equal(first[:, :3], compressor["0.0.weight"]) and not first[:, 3].any()

    fresh = cn.create_adapter(ControlNetConfig(control="image", backbone_init="random"), model, context, name="fresh")
    assert not torch.equal(fresh.controlnet.backbone.state_dict()["0.0.weight"], compressor["0.0.weight"])
    assert fresh.info["cascade_studio.backbone_init"] == "random"

    with pytest.raises(AdapterMismatchError, match="backbone_init"):
        cn.create_adapter(ControlNetConfig(control="image", bottleneck="simple", backbone_init="compressor"), model,
                          context, name="simple")
    # A published base whose compressor is not at hand: the default falls back to random, asking for it fails.
    assert cn._compressor(AdapterContext(preset="big"), required=False) is None
    with pytest.raises(AdapterMismatchError, match="model.effnet"):
        cn._compressor(AdapterContext(preset="big"), required=True)


def test_backbone_init_uses_the_runs_compressor_and_frees_it(model):
    """In a training run the compressor comes from the run's base models and is not kept resident."""
    from cascade_studio.models.random_init import build_random

    class Models:
        freed: list = []

        def effnet(self):
            compressor = build_random("effnet", "tiny")
            with torch.no_grad():
                compressor.backbone[0][0].weight.fill_(0.25)
            return compressor

        def free(self, *names):
            self.freed.extend(names)

    models = Models()
    context = AdapterContext(preset="tiny", stage_c_config=get_preset("tiny").stage_c, extra={"models": models})
    adapter = cn.create_adapter(ControlNetConfig(control="image"), model, context)
    assert bool((adapter.controlnet.backbone[0][0].weight == 0.25).all())
    assert models.freed == ["effnet"]


# -- what ComfyUI does with our files (comfy/controlnet.py load_t2i_adapter: it always builds the official 3.6B
#    ControlNet, width 2048, injection points [0, 4, 8, 12, 51, 55, 59, 63], and loads the file strictly) --------
def _layout_shapes(c_proj: int, projections: int = 8, embd: int = 1280, c_in: int = 1) -> dict:
    shapes = {"backbone.0.0.weight": (24, c_in, 3, 3)}
    for i in range(projections):
        shapes[f"projections.{i}.0.weight"] = (embd, embd, 1, 1)
        shapes[f"projections.{i}.2.weight"] = (c_proj, embd, 1, 1)
    return shapes


def test_comfyui_compatibility_follows_comfyuis_fixed_layout():
    from cascade_studio.adapters.controlnet.formats import comfyui_compatibility, read_layout

    big = read_layout(_layout_shapes(2048))
    assert comfyui_compatibility(big, [0, 4, 8, 12, 51, 55, 59, 63])[0] == "loads"
    assert comfyui_compatibility(big, None)[0] == "loads"  # published files: the default blocks
    status, why = comfyui_compatibility(big, [0, 1, 2, 3, 60, 61, 62, 63])
    assert status == "wrong_blocks" and "[0, 4, 8, 12, 51, 55, 59, 63]" in why
    status, why = comfyui_compatibility(read_layout(_layout_shapes(1536)), [0, 2, 4, 6, 25, 27, 29, 31])
    assert status == "fails" and "1536" in why and "2048" in why
    assert comfyui_compatibility(read_layout(_layout_shapes(2048, projections=4)), [0, 4, 8, 12])[0] == "fails"


def test_a_lite_controlnet_export_says_comfyui_cannot_load_it(tmp_path, capsys):
    """A lite-width ControlNet (c_proj 1536): the export warns and its metadata says why."""
    tensors = {k: torch.zeros(shape, dtype=torch.bfloat16) for k, shape in _layout_shapes(1536, embd=32).items()}
    metadata = {"cascade_studio.method": "controlnet", "cascade_studio.base_model": "lite",
                "cascade_studio.proj_blocks": json.dumps([0, 2, 4, 6, 25, 27, 29, 31])}
    path = cn.export_tensors(tensors, metadata, "official", tmp_path / "lite.safetensors")
    status = load_adapter_tensors(path)[1]["cascade_studio.comfyui"]
    assert status.startswith("fails:") and "width 1536" in status
    assert "not loadable in ComfyUI" in capsys.readouterr().err
