"""Bad inputs meet clear errors, never a crash: recipes (through `cascade-studio validate`, fuzzed too) and adapter
files (through the registry and `cascade-studio generate --lora`).

Bad image files at the run level (corrupt, truncated, empty, non-image, CMYK, oversized) are in
test_train_e2e.py; per-file reasons and mode conversions in test_data.py; config details in test_config.py.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cascade_studio.adapters.base import AdaptedStageC, AdapterMismatchError
from cascade_studio.adapters.lora import LoraAdapter, LoraSpec, export_adapter
from cascade_studio.adapters.registry import AdapterContext, load_adapter
from cascade_studio.cli import main as cli_main
from cascade_studio.models import build_stage_c, get_preset
from cascade_studio.trainers.components import make_random_base_learnable

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("cascade-studio"))


def validate(*argv: str) -> tuple[int, str, str]:
    """`cascade-studio validate ...` in this process; any exception fails the calling test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["validate", *argv])
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------------------------------- recipes
def test_every_recipe_problem_is_reported_at_once(tmp_path):
    recipe = tmp_path / "many.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1,
        "model": {"preset": "lite", "stage_c": str(tmp_path / "missing.safetensors"), "dtype": "fp64"},
        "adapter": {"method": "lora", "lora": {"rank": "eight", "alpah": 4}},
        "data": {"path": str(tmp_path / "no-images"), "holdout_fraction": 2},
        "optimizer": {"lr": "fast"},
        "train": {"batch_size": 0},
        "colour": "blue",
    }))
    code, out, err = validate(str(recipe), "train.max_steps=ten", "nosuch.key=1")
    assert code == 2 and out == ""
    expected = ["model.stage_c", "model.dtype", "adapter.lora.rank", "adapter.lora.alpah", "data.path",
                "data.holdout_fraction", "optimizer.lr", "train.batch_size", "colour", "train.max_steps", "nosuch"]
    for path in expected:
        assert f"  {path}" in err, (path, err)
    assert f"{recipe}: {len(err.strip().splitlines()) - 2} problem(s)" in err
    assert "did you mean 'alpha'" in err  # each problem says what to write instead
    assert "Traceback" not in err


@pytest.mark.parametrize("text, fragment", [
    ("version: 1\nmodel: {preset: tiny\n", "line"),  # unclosed flow mapping
    ("version: 1\n\tname: tabs\n", "line"),  # a tab where YAML wants spaces
    ("- a list\n- not a mapping\n", "mapping"),
    ("", "empty"),
])
def test_malformed_yaml_is_one_clear_problem(tmp_path, text, fragment):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    code, _, err = validate(str(recipe))
    assert code == 2 and fragment in err.lower(), err


def test_missing_and_unreadable_recipe_files(tmp_path):
    code, _, err = validate(str(tmp_path / "nope.yaml"))
    assert code == 2 and "recipe file not found" in err
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = validate(str(tmp_path / "binary.yaml"))
    assert code == 2 and "not UTF-8" in err


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       overrides=st.lists(st.text(max_size=24).filter(lambda s: not s.startswith("-")), max_size=3))
def test_fuzzed_recipe_files_never_crash_validate(content, overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.yaml"
        path.write_bytes(content)
        code, out, err = validate(str(path), *overrides)
    assert code in (0, 2)
    assert (err if code == 2 else out).strip()


_leaf = st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats() | st.text(max_size=10)
_section = st.dictionaries(st.sampled_from(["rank", "lr", "max_steps", "path", "preset", "method", "formats",
                                            "every", "enabled", "uri", "x"]),
                           st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3), max_leaves=4), max_size=4)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["version", "name", "model", "adapter", "data", "optimizer", "train",
                                        "preview", "tracking", "export", "extra"]),
                       _section | _leaf, max_size=6))
def test_fuzzed_recipe_structures_never_crash_validate(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        code, out, err = validate(str(path), f"workspace={folder}/ws")
        assert not (Path(folder) / "ws").exists()  # validation never creates anything
    assert code in (0, 2) and (err if code == 2 else out).strip()


# ---------------------------------------------------------------------------------------------- adapter files
CONTEXT = AdapterContext(preset="tiny", base_fingerprint="test", stage_c_config={"c_hidden": [64, 64]})


def tiny_model(width: int = 64) -> AdaptedStageC:
    config = dict(get_preset("tiny").stage_c, c_hidden=[width, width])
    torch.manual_seed(0)
    # The official init zeroes the output layer; a learnable random base makes outputs (and changes) visible.
    stage_c = make_random_base_learnable(build_stage_c(**config), seed=0)
    return AdaptedStageC(stage_c.eval().requires_grad_(False))


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(1, 16, 8, 8, generator=g), r=torch.rand(1, generator=g),
                clip_text=torch.randn(1, 77, 64, generator=g), clip_text_pooled=torch.randn(1, 1, 64, generator=g),
                clip_img=torch.zeros(1, 1, 32))


def exported_lora(folder: Path, width: int = 64, name: str = "good") -> Path:
    model = tiny_model(width)
    adapter = LoraAdapter(LoraSpec(rank=4, alpha=4), name="lora",
                          info={"cascade_studio.base_width": str(width), "cascade_studio.base_model": "tiny"})
    model.add_adapter(adapter)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.normal_(0, 0.05)
    return export_adapter(adapter, folder / f"{name}.safetensors", "comfyui")


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """kind -> (file, what the error must say)."""
    folder = tmp_path_factory.mktemp("adapters")
    good = exported_lora(folder)
    tensors = load_file(str(good))
    with safe_open(str(good), "pt") as handle:
        metadata = handle.metadata()
    raw = good.read_bytes()
    cases: dict[str, tuple[Path, str]] = {}

    def write(name: str, data: bytes, expect: str) -> None:
        (folder / name).write_bytes(data)
        cases[name.split(".")[0]] = (folder / name, expect)

    write("truncated.safetensors", raw[: len(raw) // 2], "truncated")
    write("random.safetensors", os.urandom(4096), "not a safetensors file")
    write("empty.safetensors", b"", "empty or truncated")
    torch.save(tensors, folder / "pickled.pt")
    cases["pickled"] = (folder / "pickled.pt", "pickled checkpoints are not loaded")
    torch.save(tensors, folder / "disguised.safetensors")  # a pickle with a safetensors name
    cases["disguised"] = (folder / "disguised.safetensors", "not a safetensors file")
    other_base = dict(metadata, **{"cascade_studio.base_width": "2048", "cascade_studio.base_model": "big"})
    save_file(tensors, str(folder / "for_big.safetensors"), metadata=other_base)
    cases["for_big"] = (folder / "for_big.safetensors", "made for a Stage C of width 2048 (big)")
    wide = exported_lora(folder, width=128, name="wide_with_metadata")
    cases["wide_with_metadata"] = (wide, "width 128")
    save_file(load_file(str(wide)), str(folder / "wide_no_metadata.safetensors"))  # only the shapes tell
    cases["wide_no_metadata"] = (folder / "wide_no_metadata.safetensors", "wrong shapes")
    no_up = {k: v for k, v in tensors.items() if not k.endswith("lora_up.weight")}
    save_file(no_up, str(folder / "missing_keys.safetensors"), metadata=metadata)
    cases["missing_keys"] = (folder / "missing_keys.safetensors", "needs both lora_down.weight and lora_up.weight")
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(4, 4)}, str(folder / "full_model.safetensors"))
    cases["full_model"] = (folder / "full_model.safetensors", "not an adapter file this studio knows")
    return cases


KINDS = ["truncated", "random", "empty", "pickled", "disguised", "for_big", "wide_with_metadata",
         "wide_no_metadata", "missing_keys", "full_model"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_adapter_file_is_refused_and_leaves_the_model_untouched(bad_adapters, kind):
    path, expect = bad_adapters[kind]
    model = tiny_model()
    before = model(**inputs())
    assert before.abs().max() > 0
    with pytest.raises(AdapterMismatchError) as info:
        load_adapter(path, model, CONTEXT, name="candidate")
    assert expect in str(info.value), str(info.value)
    if kind != "missing_keys":  # that message names the module instead
        assert str(path) in str(info.value)
    assert model.enabled == {} and torch.equal(model(**inputs()), before)


def test_good_adapter_file_loads_as_a_control(bad_adapters, tmp_path):
    path = exported_lora(tmp_path)
    model = tiny_model()
    before = model(**inputs())
    load_adapter(path, model, CONTEXT, name="candidate")
    assert list(model.enabled) == ["candidate"] and not torch.equal(model(**inputs()), before)


@pytest.mark.parametrize("kind", ["truncated", "disguised", "for_big", "missing_keys", "full_model"])
def test_generate_with_a_bad_lora_exits_with_a_message(bad_adapters, kind, tmp_path, capsys):
    path, expect = bad_adapters[kind]
    code = cli_main(["generate", "--prompt", "a red circle", "--preview", "--steps", "1", "--lora", str(path),
                     "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and expect in err, err
    assert not (tmp_path / "out.png").exists()


def test_generate_with_random_bytes_as_lora_has_no_traceback(bad_adapters, tmp_path):
    path, expect = bad_adapters["random"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("CASCADE_STUDIO_DEBUG", None)  # that switch shows tracebacks on purpose
    result = subprocess.run([CLI, "generate", "--prompt", "x", "--preview", "--steps", "1", "--lora", str(path),
                             "--out", str(tmp_path / "out.png")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and expect in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path}")


def test_bitsandbytes_offline_kernel_notes_are_dropped_and_nothing_else(caplog):
    """On AVX512-BF16 CPUs, importing bitsandbytes offline logs two warnings about an optional 4-bit kernel; the
    studio drops exactly those (a demo user saw 'pip install kernels' and thought something was broken)."""
    import logging

    import cascade_studio  # noqa: F401  (installs the filters)

    ops, hub = logging.getLogger("bitsandbytes.backends.cpu.ops"), logging.getLogger("kernels._internals.hf_hub")
    with caplog.at_level(logging.WARNING):
        ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "offline")
        hub.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because ...")
        ops.warning("Failed to load something else")
        hub.warning("Skipping publisher trust check for 'someone/other-kernel' because ...")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load something else", "Skipping publisher trust check for 'someone/other-kernel' because ..."]
