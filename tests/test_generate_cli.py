"""`cascade-studio generate` with adapters, the adapter spec syntax, and the adapter loading helpers.

Everything runs on the tiny preset (random weights built in code, CPU). Adapter files are made here from the
same tiny Stage C the CLI builds (lora_B zero = a fresh LoRA; random weights stand in for a trained one).
The builders are also used by test_compare.py.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cascade_studio.adapters.lora.config import LoraConfig
from cascade_studio.adapters.ip_adapter.config import IPAdapterConfig
from cascade_studio.adapters.controlnet.config import ControlNetConfig
from cascade_studio import cli
from cascade_studio.adapters import controlnet as cn
from cascade_studio.adapters import ip_adapter as ipa
from cascade_studio.adapters import lora
from cascade_studio.adapters.base import AdaptedStageC, AdapterMismatchError
from cascade_studio.adapters.registry import AdapterContext
from cascade_studio.inference.adapters import (AdapterInputs, AdapterSpec, adapter_context, apply_adapters,
                                               parse_adapter_spec, remove_adapters, resolve_adapter)
from cascade_studio.models.presets import build_stage_c, get_preset
from cascade_studio.models.random_init import build_random

# Small and fast: 128 px -> 3x3 Stage C latents -> 24 px previews.
FAST = ["--width", "128", "--height", "128", "--steps", "2", "--steps-b", "2", "--dtype", "fp32"]
CONTEXT = AdapterContext(preset="tiny", base_fingerprint="test", stage_c_config={"c_hidden": [64, 64]})


# ------------------------------------------------------------------------------------------------- builders
def _randomize(parameters, seed: int, std: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def lora_adapter(seed: int | None = None, c_hidden: tuple[int, int] | None = None):
    """A LoRA on a tiny Stage C (or a custom-width one); ``seed`` randomises it (a fresh LoRA has lora_B = 0)."""
    if c_hidden is None:
        stage_c = build_random("stage_c", "tiny")
        context = CONTEXT
    else:
        stage_c = build_stage_c(**dict(get_preset("tiny").stage_c, c_hidden=list(c_hidden)))
        context = AdapterContext(preset="tiny", stage_c_config={"c_hidden": list(c_hidden)})
    adapter = lora.create_adapter(LoraConfig(rank=4, alpha=4.0, targets=("attention",)), AdaptedStageC(stage_c),
                                  context)
    if seed is not None:
        _randomize(adapter.trainable_parameters(), seed, 0.3)
    return adapter


def build_adapter_files(folder: Path) -> SimpleNamespace:
    """Adapter files and images for the tests: zero / random / other-width LoRAs, a ControlNet, an IP-Adapter,
    a control photo and two image prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    files = SimpleNamespace()
    files.zero_lora = lora.export_adapter(lora_adapter(), folder / "zero-lora.safetensors")
    files.lora = lora.export_adapter(lora_adapter(seed=1), folder / "style-lora.safetensors")
    files.narrow_lora = lora.export_adapter(lora_adapter(seed=1, c_hidden=(32, 32)), folder / "narrow.safetensors")
    model = AdaptedStageC(build_random("stage_c", "tiny"))
    controlnet = cn.create_adapter(ControlNetConfig(control="canny"), model, CONTEXT)
    # A fresh ControlNet's projections are zero (no effect); random ones make the hint matter.
    _randomize(controlnet.controlnet.projections.parameters(), 2, 0.2)
    files.controlnet = cn.export_adapter(controlnet, folder / "canny-cn.safetensors")
    ip = ipa.create_adapter(IPAdapterConfig(image_encoder="tiny", num_tokens=2), model, CONTEXT)
    files.ip = ipa.export_adapter(ip, folder / "style-ip.safetensors")
    photo = Image.new("RGB", (256, 256), "black")
    ImageDraw.Draw(photo).ellipse((60, 60, 196, 196), fill="white")
    files.control = folder / "photo.png"
    photo.save(files.control)
    files.image_prompt = folder / "red.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(files.image_prompt)
    files.image_prompt_2 = folder / "blue.png"
    Image.new("RGB", (40, 40), (20, 40, 230)).save(files.image_prompt_2)
    return files


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    return build_adapter_files(tmp_path_factory.mktemp("adapters"))


def _generate(tmp_path: Path, name: str, capsys, *extra) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    code, _, err = run_cli(["generate", "--prompt", "a red circle", "--seed", "4", "--preview", *FAST,
                            "--out", out, *extra], capsys)
    assert code == 0, err
    return pixels(out)


# ------------------------------------------------------------------------------------------------- syntax
@pytest.mark.parametrize("text, expected", [
    ("lora:a.safetensors@0.8", dict(method="lora", origin="file", source="a.safetensors", weight=0.8)),
    ("controlnet:cn.safetensors@0.7", dict(method="controlnet", source="cn.safetensors", weight=0.7)),
    ("cn:cn.safetensors", dict(method="controlnet", weight=None)),
    ("ip:ip.safetensors@0.6", dict(method="ip_adapter", weight=0.6)),
    ("run:0123456789abcdef0123456789abcdef", dict(method=None, origin="run",
                                                  source="0123456789abcdef0123456789abcdef")),
    ("ckpt:workspace/runs/x@40", dict(origin="ckpt", source="workspace/runs/x", step=40, weight=None)),
    ("ckpt:workspace/runs/x@40@0.5", dict(origin="ckpt", step=40, weight=0.5)),
    ("lora:ckpt:runs/x@latest@2", dict(method="lora", origin="ckpt", step=None, weight=2.0)),
    ("me@home/a.safetensors", dict(source="me@home/a.safetensors", weight=None)),
    ("a.safetensors@-1", dict(source="a.safetensors", weight=-1.0)),
])
def test_spec_syntax(text, expected):
    spec = parse_adapter_spec(text)
    for key, value in expected.items():
        assert getattr(spec, key) == value, key


def test_spec_syntax_errors_say_what_to_write():
    with pytest.raises(ValueError, match=r"ckpt:DIR@STEP"):
        parse_adapter_spec("ckpt:runs/x@0.5")
    with pytest.raises(ValueError, match="names no file"):
        parse_adapter_spec("lora:@0.5")
    # Settings given by flags fill only what the string leaves open.
    spec = parse_adapter_spec("cn:c.safetensors@0.3", weight=1.0, control="a.png")
    assert (spec.weight, spec.control) == (0.3, "a.png")
    assert parse_adapter_spec("cn:c.safetensors@0", weight=1.0).weight == 0.0  # an explicit 0 is kept
    assert parse_adapter_spec("cn:c.safetensors", weight=1.0).weight == 1.0


def test_wrong_kind_prefix_is_refused(files):
    with pytest.raises(AdapterMismatchError, match="holds a controlnet"):
        resolve_adapter(parse_adapter_spec(f"lora:{files.controlnet}"))


# ------------------------------------------------------------------------------------ loading and unloading
def test_adapters_load_together_and_unloading_restores_the_base_exactly(files):
    stage_c = build_random("stage_c", "tiny").eval()  # no dropout: outputs must be comparable
    before = {k: v.clone() for k, v in stage_c.state_dict().items()}
    model = AdaptedStageC(stage_c)
    g = torch.Generator().manual_seed(0)
    call = dict(x=torch.randn(2, 16, 4, 4, generator=g), r=torch.rand(2, generator=g),
                clip_text=torch.randn(2, 77, 64, generator=g), clip_text_pooled=torch.randn(2, 1, 64, generator=g),
                clip_img=torch.zeros(2, 1, 32))
    with torch.no_grad():
        base = model(**call)
    specs = [AdapterSpec(str(files.lora)), AdapterSpec(str(files.controlnet), weight=0.5, control=str(files.control)),
             AdapterSpec(str(files.ip), image_prompts=(str(files.image_prompt),))]
    names = apply_adapters(model, specs, adapter_context(stage_c))
    assert len(names) == 3 and sorted(model.enabled) == sorted(names)
    hint = torch.rand(2, 1, 128, 128, generator=g)
    with torch.no_grad():
        adapted = model(**call, control=hint, ip_image_embeds=torch.randn(2, 1, 32, generator=g))
    assert (adapted - base).abs().max() > 1e-3
    remove_adapters(model, names)
    assert not model.enabled
    with torch.no_grad():
        assert torch.equal(model(**call), base)
    after = stage_c.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_failing_adapter_leaves_no_adapter_behind(files):
    model = AdaptedStageC(build_random("stage_c", "tiny"))
    with pytest.raises(AdapterMismatchError, match="narrow.safetensors"):
        apply_adapters(model, [AdapterSpec(str(files.lora)), AdapterSpec(str(files.narrow_lora))],
                       adapter_context(model.stage_c))
    assert not model.enabled


def test_control_hints_follow_the_controlnet_conventions(files):
    model = AdaptedStageC(build_random("stage_c", "tiny"))
    entry = apply_adapters(model, [AdapterSpec(str(files.controlnet))], adapter_context(model.stage_c))[0]
    adapter = model.get_adapter(entry)
    from cascade_studio.adapters.controlnet import generation_hint

    inputs = AdapterInputs(height=100, width=100)  # rounded up to whole 32 px latent cells
    edges = generation_hint(inputs, files.control, adapter)  # canny ControlNet: canny edges by default
    assert edges.shape == (1, 1, 128, 128)
    assert set(edges.unique().tolist()) == {0.0, 1.0}  # binary edges, as CannyHint caches them for training
    assert edges[0, 0, 64, 64] == 0 and edges.mean() < 0.2  # edges on the circle's rim, not its inside
    as_is = generation_hint(inputs, files.control, adapter, "image")  # the photo as a greyscale map
    assert as_is.shape == (1, 1, 128, 128) and as_is[0, 0, 64, 64] > 0.9 and as_is[0, 0, 2, 2] < 0.1
    with pytest.raises(ValueError, match="aspect ratio"):
        generation_hint(AdapterInputs(height=128, width=256), files.control, adapter)


def test_image_prompts_become_embeddings_with_zeros_when_unconditional(files):
    from cascade_studio.inference.adapters import load_adapters

    model = AdaptedStageC(build_random("stage_c", "tiny"))
    spec = AdapterSpec(str(files.ip), image_prompts=(str(files.image_prompt), str(files.image_prompt_2)))
    loaded = load_adapters(model, [spec], adapter_context(model.stage_c))
    cond, uncond = AdapterInputs(128, 128).build(loaded, batch=3)
    embeds = cond["ip_image_embeds"]
    assert embeds.shape == (3, 2, 32)  # [B, M images, tiny encoder width]
    assert torch.equal(embeds[0], embeds[2]) and not torch.equal(embeds[0, 0], embeds[0, 1])
    assert torch.equal(uncond["ip_image_embeds"], torch.zeros_like(embeds))
    with pytest.raises(ValueError, match="--image-prompt"):
        AdapterInputs(128, 128).prepare(
            [resolve_adapter(AdapterSpec(str(files.ip)))])


# --------------------------------------------------------------------------------------------------- CLI
def test_zero_lora_and_multiplier_zero_give_the_base_image_and_a_random_lora_does_not(files, tmp_path, capsys):
    base = _generate(tmp_path, "base", capsys)
    assert np.array_equal(_generate(tmp_path, "zero", capsys, "--lora", files.zero_lora), base)
    assert np.array_equal(_generate(tmp_path, "off", capsys, "--lora", f"{files.lora}@0"), base)
    styled = _generate(tmp_path, "styled", capsys, "--lora", files.lora)
    # The random tiny previewer squashes latent differences into a level or two; test_compare.py measures the
    # LoRA's effect on the latents themselves.
    assert not np.array_equal(styled, base)


def test_merged_lora_matches_the_unmerged_one_up_to_rounding(files):
    stage_c = build_random("stage_c", "tiny").eval()
    model = AdaptedStageC(stage_c)
    g = torch.Generator().manual_seed(5)
    call = dict(x=torch.randn(1, 16, 4, 4, generator=g), r=torch.rand(1, generator=g),
                clip_text=torch.randn(1, 77, 64, generator=g), clip_text_pooled=torch.randn(1, 1, 64, generator=g),
                clip_img=torch.zeros(1, 1, 32))
    with torch.no_grad():
        base = model(**call)
        names = apply_adapters(model, [AdapterSpec(str(files.lora))], adapter_context(stage_c))
        unmerged = model(**call)
        remove_adapters(model, names)
        names = apply_adapters(model, [AdapterSpec(str(files.lora), merge=True)], adapter_context(stage_c))
        assert model.get_adapter(names[0]).merged
        merged = model(**call)
    assert (unmerged - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


def test_mismatched_adapter_is_refused_with_a_clear_message(files, tmp_path, capsys):
    code, _, err = run_cli(["generate", "--prompt", "x", "--preview", *FAST, "--out", tmp_path / "x.png",
                            "--lora", files.narrow_lora], capsys)
    assert code != 0
    assert str(files.narrow_lora) in err and "width 32" in err and "width 64" in err
    assert "Traceback" not in err and not (tmp_path / "x.png").exists()
    code, _, err = run_cli(["compare", "--columns", "base", f"lora:{files.narrow_lora}", "--prompt", "x", *FAST,
                            "--out", tmp_path / "cmp", "--no-progress"], capsys)
    assert code != 0 and str(files.narrow_lora) in err and "Traceback" not in err
    assert not (tmp_path / "cmp" / "grid.png").exists()


@pytest.mark.parametrize("flags, message", [
    (["--control", "photo.png"], "--control needs a ControlNet"),
    (["--image-prompt", "red.png"], "--image-prompt needs an IP-Adapter"),
    (["--lora", "missing.safetensors"], "missing.safetensors does not exist"),
    (["--lora", "run:0123456789abcdef0123456789abcdef"], "MLflow run 0123456789abcdef0123456789abcdef"),
    (["--out", "picture.txt"], "cannot write '.txt' images; give a file name ending in one of .png"),
])
def test_bad_flags_fail_before_any_model_loads(flags, message, tmp_path, capsys):
    code, _, err = run_cli(["generate", "--prompt", "x", "--preview", *FAST, "--out", tmp_path / "x.png",
                            "--workspace", tmp_path, *flags], capsys)
    assert code != 0 and message in err and "Traceback" not in err


def test_out_may_be_a_folder_or_a_name_without_extension(tmp_path, capsys):
    """A folder gets generated.png inside it (it used to fail after the whole generation: "unknown file
    extension"), a bare name gets .png, and several images are numbered."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    for out, written in ((folder, folder / "generated.png"), (str(tmp_path / "new") + "/", tmp_path / "new" / "generated.png"),
                         (tmp_path / "bare", tmp_path / "bare.png"), (tmp_path / "photo.jpg", tmp_path / "photo.jpg")):
        code, stdout, err = run_cli(["generate", "--prompt", "a red circle", "--preview", *FAST, "--out", out], capsys)
        assert code == 0, err
        assert f"wrote {written} " in stdout and min(Image.open(written).size) > 0
    code, stdout, err = run_cli(["generate", "--prompt", "a red circle", "--prompt", "a blue square", "--preview",
                                 *FAST, "--out", folder], capsys)
    assert code == 0, err
    assert sorted(p.name for p in folder.glob("generated-*.png")) == ["generated-0.png", "generated-1.png"]


def test_adapter_inputs_without_their_images_are_explained(files, tmp_path, capsys):
    code, _, err = run_cli(["generate", "--prompt", "x", "--preview", *FAST, "--out", tmp_path / "x.png",
                            "--ip-adapter", files.ip], capsys)
    assert code != 0 and "--image-prompt" in err
    code, _, err = run_cli(["generate", "--prompt", "x", "--preview", *FAST, "--out", tmp_path / "x.png",
                            "--controlnet", files.controlnet], capsys)
    assert code != 0 and "--control IMAGE" in err


@pytest.mark.slow
def test_generate_and_compare_on_the_toy_preset_draw_the_toy_cascade_in_a_fresh_process(tmp_path):
    """`--preset toy` used to build the random tiny base (a flat brown square for every prompt) while training
    used the shipped toy weights. Both commands, as a user types them, each in a fresh process."""
    import subprocess
    import sys

    exe = [sys.executable, "-m", "cascade_studio.cli"]
    images = {}
    for prompt in ("a large red circle", "a large blue square"):
        out = tmp_path / f"{prompt.split()[2]}.png"
        done = subprocess.run(exe + ["generate", "--preset", "toy", "--preview", "--prompt", prompt, "--out",
                                     str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        images[prompt] = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255
    red, blue = images.values()
    assert red.std() > 0.1 and blue.std() > 0.1  # a shape on a background, not a flat square
    assert red[..., 0].max() > 0.8 and (red[..., 0] - red[..., 2]).max() > 0.5  # something red is drawn
    assert (blue[..., 2] - blue[..., 0]).max() > 0.5  # and something blue for the other prompt
    grid = tmp_path / "grid"
    done = subprocess.run(exe + ["compare", "--preset", "toy", "--columns", "base", "--prompt", "a large red circle",
                                 "--out", str(grid), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cell = np.asarray(Image.open(grid / "cells" / "r0_c0.png").convert("RGB"), dtype=np.float32) / 255
    assert np.abs(cell - red).max() < 2 / 255  # the base column is what `generate` draws


def test_generate_on_a_built_in_preset_without_preview_says_its_decoder_is_random(tmp_path, capsys):
    """The tiny/toy Stage B and A are random weights, so the whole cascade draws noise: generate says so and
    names --preview (compare defaults to the previewer there); with --preview it says nothing of the kind."""
    code, _, err = run_cli(["generate", "--preset", "tiny", "--prompt", "a red circle", *FAST,
                            "--out", tmp_path / "full.png"], capsys)
    assert code == 0 and "Stage B and A are random weights" in err and "--preview" in err
    code, _, err = run_cli(["generate", "--preset", "tiny", "--prompt", "a red circle", *FAST, "--preview",
                            "--out", tmp_path / "preview.png"], capsys)
    assert code == 0 and "random weights" not in err


def test_generate_shows_a_bar_per_sampling_stage_unless_told_not_to(tmp_path, capsys):
    code, _, err = run_cli(["generate", "--prompt", "a red circle", *FAST, "--out", tmp_path / "a.png"], capsys)
    assert code == 0, err
    bars = [line.split("|")[0].strip() + " " + line.split("|")[2].split()[0]
            for line in err.replace("\r", "\n").splitlines() if "100%" in line]
    assert bars == ["Stage C: 100% 2/2", "Stage B: 100% 2/2"], err
    code, _, err = run_cli(["generate", "--prompt", "a red circle", *FAST, "--out", tmp_path / "b.png",
                            "--no-progress"], capsys)
    assert code == 0 and "Stage C" not in err and "step/s" not in err, err
