"""The generate pipeline on the tiny preset (random weights built in code, CPU, few steps)."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cascade_studio.inference import (
    CascadeComponents,
    GenerateSettings,
    ModelSpec,
    TextEmbeddings,
    encode_prompts,
    generate,
    initial_noise,
    sample_stage_c,
    stage_b_latent_size,
    stage_c_latent_size,
)


def _settings(**overrides: Any) -> GenerateSettings:
    values: dict[str, Any] = dict(prompt="a red fox", width=128, height=128, steps_c=2, steps_b=2, seed=3,
                                  dtype="fp32")
    values.update(overrides)
    return GenerateSettings(**values)


def _pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP threads
    spin-waiting on each other made these tests ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def components() -> CascadeComponents:
    return CascadeComponents("tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_text() -> nn.Module:
    return CascadeComponents("tiny", device="cpu").load("text_encoder")


# ---------------------------------------------------------------- sizes and settings


def test_latent_sizes_match_official() -> None:
    assert stage_c_latent_size(1024, 1024) == (24, 24)
    assert stage_c_latent_size(768, 1536) == (18, 36)
    assert stage_b_latent_size(1024, 1024) == (256, 256)
    assert stage_b_latent_size(1000, 1030, multiple=16) == (256, 272)


def test_fp16_is_refused_with_an_explanation() -> None:
    with pytest.raises(ValueError, match="overflows.*bf16"):
        GenerateSettings(prompt="x", dtype="fp16")
    with pytest.raises(ValueError, match="steps_c"):
        GenerateSettings(prompt="x", steps_c=0, dtype="fp32")


def test_real_preset_without_weights_says_what_to_set() -> None:
    components = CascadeComponents("big", device="cpu")
    with pytest.raises(ValueError, match="repo_id"):
        components.load("stage_c")


def test_cpu_note_for_real_presets(capsys: pytest.CaptureFixture[str]) -> None:
    CascadeComponents("lite", device="cpu").warn_if_slow()
    assert "CPU" in capsys.readouterr().err
    CascadeComponents("tiny", device="cpu").warn_if_slow()
    assert capsys.readouterr().err == ""


def test_model_spec_from_recipe_section() -> None:
    class Section:
        preset = "lite"
        stage_c = "weights/c.safetensors"
        repo_id = "stabilityai/stable-cascade"

    spec = ModelSpec.from_config(Section())
    assert spec.source("stage_c") == "weights/c.safetensors"
    assert spec.source("stage_b") == "stabilityai/stable-cascade"
    assert ModelSpec().source("stage_b") is None


# ---------------------------------------------------------------- generate end to end


def test_preview_is_deterministic_and_eight_times_the_latent(components: CascadeComponents) -> None:
    settings = _settings(width=256, height=128, preview=True, batch=2)
    first = generate(components, settings)
    assert len(first) == 2
    assert all(image.size == (6 * 8, 3 * 8) for image in first)  # 256/42.67 -> 6, 128/42.67 -> 3
    again = generate(components, settings)
    assert np.array_equal(_pixels(first), _pixels(again))
    # Two images of one batch start from different noise.
    assert not np.array_equal(_pixels(first)[0], _pixels(first)[1])


def test_different_seeds_differ(components: CascadeComponents, tiny_text: nn.Module) -> None:
    # A random-init previewer squashes most of the latent differences, so compare the latents too.
    settings = _settings(preview=True, seed=1)
    one = _pixels(generate(components, settings))
    two = _pixels(generate(components, _settings(preview=True, seed=2)))
    assert not np.array_equal(one, two)
    stage_c = components.load("stage_c")
    text = encode_prompts(tiny_text, settings)
    latents = [sample_stage_c(stage_c, text, _settings(seed=seed)) for seed in (1, 2, 1)]
    assert torch.equal(latents[0], latents[2])
    assert (latents[0] - latents[1]).abs().mean() > 0.1


def test_full_cascade_returns_requested_size_and_frees_every_stage() -> None:
    loaded: list[tuple[str, weakref.ref]] = []
    overlaps: list[str] = []

    def on_load(name: str, module: Any) -> None:
        # Loading a stage while another is still alive would put two stages on the GPU together. No gc.collect
        # here: the pipeline itself must have dropped and collected the previous stage.
        overlaps.extend(f"{old} alive when {name} loaded" for old, ref in loaded if ref() is not None)
        loaded.append((name, weakref.ref(module)))

    components = CascadeComponents("tiny", device="cpu", on_load=on_load)
    settings = _settings(prompt=["a cat", "a dog"], width=120, height=72)
    images = generate(components, settings)
    assert [image.size for image in images] == [(120, 72), (120, 72)]
    assert [name for name, _ in loaded] == ["text_encoder", "stage_c", "stage_b", "stage_a"]
    assert overlaps == []
    assert [name for name, ref in loaded if ref() is not None] == []
    assert components.resident == ()
    # Same seed, same images; the two prompts give two different images.
    again = _pixels(generate(components, settings))
    assert np.array_equal(_pixels(images), again)
    assert not np.array_equal(again[0], again[1])


def test_bf16_runs(components: CascadeComponents) -> None:
    images = generate(components, _settings(preview=True, dtype="bf16"))
    assert images[0].size == (24, 24)
    assert _pixels(images).std() > 0


# ---------------------------------------------------------------- sample_stage_c for adapters and compare


class RecordingStageC(nn.Module):
    """Wraps a tiny Stage C like an adapter would, accepting and recording an extra keyword input."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.calls: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor, r: torch.Tensor, *, bias: torch.Tensor | None = None, **inputs: Any):
        self.calls.append({"training": self.training, "bias": bias, **inputs})
        out = self.base(x, r, **inputs)
        return out if bias is None else out + bias.view(-1, 1, 1, 1)


def test_sample_stage_c_extra_inputs_noise_and_mode(components: CascadeComponents, tiny_text: nn.Module) -> None:
    settings = _settings(batch=2)
    wrapper = RecordingStageC(components.load("stage_c")).train()
    text = encode_prompts(tiny_text, settings)
    assert isinstance(text, TextEmbeddings) and text.batch == 2

    shared = initial_noise((2, 16, 3, 3), 11)
    bias = torch.tensor([1.0, -1.0])
    image = torch.randn(2, 1, 32)
    out = sample_stage_c(wrapper, text, settings, extra_cond={"bias": bias, "clip_img": image}, noise=shared)
    assert out.shape == (2, 16, 3, 3)
    assert wrapper.training  # put back in train mode
    call = wrapper.calls[0]
    assert call["training"] is False  # sampled without dropout
    # One batched CFG call: cond half then uncond half; bias shared, image zeroed when unconditional.
    torch.testing.assert_close(call["bias"], torch.cat([bias, bias]))
    torch.testing.assert_close(call["clip_img"], torch.cat([image, torch.zeros_like(image)]))
    torch.testing.assert_close(call["clip_text"][2:], text.uncond_hidden)

    # Explicit uncond values win, and the extra input really reaches the output.
    wrapper.calls.clear()
    zero_uncond = sample_stage_c(wrapper, text, settings, extra_cond={"bias": bias, "clip_img": image},
                                 extra_uncond={"bias": torch.zeros(2)}, noise=shared)
    torch.testing.assert_close(wrapper.calls[0]["bias"], torch.cat([bias, torch.zeros(2)]))
    assert not torch.allclose(zero_uncond, out)

    # Compare views share noise: the same noise and settings give the same latents.
    repeat = sample_stage_c(wrapper, text, settings, extra_cond={"bias": bias, "clip_img": image}, noise=shared)
    assert torch.equal(repeat, out)
    with pytest.raises(ValueError, match="initial_noise"):
        sample_stage_c(wrapper, text, settings, noise=torch.zeros(1, 16, 3, 3))


# ---------------------------------------------------------------- every stage's source is checked before sampling


def test_missing_stage_b_fails_before_stage_c_samples(tmp_path) -> None:
    """A Stage B that is not there is reported before any stage loads, not after Stage C has sampled."""
    from cascade_studio.inference.adapters import generate_with_adapters
    from cascade_studio.models.loading import WeightsError

    loaded: list[str] = []
    missing = tmp_path / "stage_b_bf16.safetensors"
    components = CascadeComponents(ModelSpec(preset="tiny", stage_b=str(missing)), device="cpu",
                                   on_load=lambda name, module: loaded.append(name))
    with pytest.raises(WeightsError, match="stage_b_bf16.safetensors"):
        generate(components, _settings())
    assert loaded == []
    with pytest.raises(WeightsError, match="stage_b_bf16.safetensors"):
        generate_with_adapters(components, _settings(), [])
    assert loaded == []
    # the previewer path needs no Stage B
    generate(components, _settings(preview=True))
    assert loaded == ["text_encoder", "stage_c", "previewer"]


def test_stage_b_of_the_wrong_kind_fails_before_sampling(tmp_path) -> None:
    from safetensors.torch import save_file

    from cascade_studio.models.loading import WeightsError
    from cascade_studio.models.official import official_state_dict

    stage_c = CascadeComponents("tiny", device="cpu").load("stage_c")
    wrong = tmp_path / "stage_b.safetensors"
    save_file({k: v.contiguous() for k, v in official_state_dict(stage_c).items()}, str(wrong))
    loaded: list[str] = []
    components = CascadeComponents(ModelSpec(preset="tiny", stage_b=str(wrong)), device="cpu",
                                   on_load=lambda name, module: loaded.append(name))
    with pytest.raises(WeightsError, match="Stage C"):
        generate(components, _settings())
    assert loaded == []


def test_cpu_note_does_not_suggest_the_preview_already_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    CascadeComponents("lite", device="cpu").warn_if_slow(_settings(preview=True), preview_hint="--preview")
    note = capsys.readouterr().err
    assert "CPU" in note and "preview" not in note
    CascadeComponents("lite", device="cpu").warn_if_slow(_settings(), preview_hint="--preview")
    note = capsys.readouterr().err
    assert "--preview" in note and "preview=True" not in note
