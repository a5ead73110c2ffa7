"""The method catalog's contract: a method is one registered folder, and every caller learns it from there.

Walks the registry: for every method and every export format it declares, validation accepts it, a short tiny
run exports exactly those files, and each file loads back (through the generation path users take) to the same
Stage C outputs as the run's own final checkpoint. A format a method lacks is refused by ``validate`` with the
formats it has. A fourth method living only in ``tests/plugins`` appears in ``validate``, training, ``export``,
``generate`` and the studio's recipe form with no edit outside its folder. And outside ``adapters/`` no code
names a method.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cascade_studio.adapters import catalog
from cascade_studio.config import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"
FAST = ["train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=0", "preview.every=0",
        "tracking.enabled=false", "data.holdout_fraction=0", "data.max_images=4", "optimizer.name=adamw",
        "optimizer.lr=0.05", "data.caption_dropout=0"]


def _tiny_recipe(method: str) -> Path:
    """The shipped tiny recipe of a method (found by what the recipes say, not by file name)."""
    for path in sorted((REPO / "recipes" / "tiny").glob("*.yaml")):
        if yaml.safe_load(path.read_text())["adapter"]["method"] == method:
            return path
    raise AssertionError(f"no recipes/tiny recipe trains {method}")


def _cli(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cascade_studio.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


def _plugin_env() -> dict:
    path = os.pathsep.join([str(PLUGINS), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {"CASCADE_STUDIO_METHODS": "dummy_bias.config", "PYTHONPATH": path}


def test_the_catalog_lists_the_built_in_methods_once_with_their_formats():
    names = catalog.names()
    assert names[:len(catalog.BUILTIN_METHODS)] == catalog.BUILTIN_METHODS and len(set(names)) == len(names)
    for method in catalog.methods():
        assert method.formats and len(set(method.format_names)) == len(method.format_names)
        assert method.config.__module__ == f"cascade_studio.adapters.{method.name}.config"
    # The schema's choices are derived from the catalog (nothing restates them).
    from cascade_studio.config.schema import AdapterConfig, ExportConfig, describe_fields

    fields = {doc.path: doc for doc in describe_fields(ExportConfig)}
    assert fields["formats"].choices == catalog.all_formats()
    assert {f.name for f in __import__("dataclasses").fields(AdapterConfig)} == {"method", *names}


@pytest.mark.parametrize("method", catalog.BUILTIN_METHODS)
def test_a_format_the_method_lacks_is_refused_with_the_formats_it_has(method):
    record = catalog.get(method)
    recipe = _tiny_recipe(method)
    for fmt in record.format_names:
        load_recipe(recipe, [f"export.formats=[{fmt}]"])  # each declared format validates
    for fmt in set(catalog.all_formats()) - set(record.format_names):
        with pytest.raises(RecipeError) as caught:
            load_recipe(recipe, [f"export.formats=[{fmt}]"])
        message = str(caught.value)
        assert "export.formats" in message and all(name in message for name in record.format_names), message
    # The same through the command a user types (the ControlNet "comfyui" case validated OK and wrote nothing).
    lacking = sorted(set(catalog.all_formats()) - set(record.format_names))[0]
    done = _cli("validate", str(recipe), f"export.formats=[{lacking}]")
    assert done.returncode != 0 and record.format_names[0] in done.stdout + done.stderr


def _outputs(model, spec_source: str, control: Path, image: Path, method: str) -> torch.Tensor:
    """Stage C's output with one adapter loaded through the generation path (resolve, load, build inputs)."""
    from cascade_studio.inference.adapters import AdapterInputs, AdapterSpec, adapter_context, load_adapters, \
        remove_adapters

    checkpoint = (Path(spec_source) / "adapter.safetensors").is_file()
    spec = AdapterSpec(source=spec_source, origin="ckpt" if checkpoint else "file",
                       control=str(control), image_prompts=(str(image),))
    loaded = load_adapters(model, [spec], adapter_context(model.stage_c))
    assert [entry.resolved.method for entry in loaded] == [method]
    try:
        inputs = AdapterInputs(256, 256)
        inputs.prepare([entry.resolved for entry in loaded])
        cond, _ = inputs.build(loaded, batch=2)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 8, 8, generator=g)
        with torch.no_grad():
            return model(x, torch.full((2,), 0.6), torch.randn(2, 77, 64, generator=g),
                         torch.randn(2, 1, 64, generator=g), torch.zeros(2, 1, 32), **cond)
    finally:
        remove_adapters(model, [entry.name for entry in loaded])


@pytest.mark.slow
@pytest.mark.parametrize("method", catalog.BUILTIN_METHODS)
def test_a_tiny_run_exports_exactly_its_formats_and_each_loads_back_to_the_same_outputs(method, tmp_path):
    from cascade_studio.adapters.base import AdaptedStageC
    from cascade_studio.models.random_init import build_random
    from cascade_studio.run import train

    record = catalog.get(method)
    formats = record.format_names
    result = train(_tiny_recipe(method), [*FAST, f"workspace={tmp_path}", f"name=contract-{method}",
                                          f"export.formats=[{','.join(formats)}]"], progress=False)
    export_dir = result.run_dir / "export"
    expected = {fmt.target(export_dir, f"contract-{method}").name for fmt in record.formats}
    assert {p.name for p in export_dir.iterdir()} == expected
    assert sorted(p.name for p in result.exports) == sorted(expected)

    from PIL import Image

    control, image = tmp_path / "control.png", tmp_path / "prompt.png"
    picture = Image.new("RGB", (256, 256), (0, 0, 0))
    picture.paste((230, 40, 40), (64, 64, 192, 192))
    picture.save(control)
    picture.save(image)
    model = AdaptedStageC(build_random("stage_c", "tiny")).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    with torch.no_grad():
        base = model(x, torch.full((2,), 0.6), torch.randn(2, 77, 64, generator=g), torch.randn(2, 1, 64, generator=g),
                     torch.zeros(2, 1, 32))
    from cascade_studio.adapters.registry import read_adapter_header
    from cascade_studio.models.identity import weights_identity

    trained_on = weights_identity(model.stage_c)  # each file records the weights it was trained on
    assert {read_adapter_header(p)[1].get("cascade_studio.base_fingerprint") for p in result.exports} == {trained_on}
    checkpoint = sorted((result.run_dir / "checkpoints").iterdir())[-1]
    reference = _outputs(model, str(checkpoint), control, image, method)
    assert (reference - base).abs().max() > 1e-4, "the run's adapter changes nothing: the comparison would be empty"
    for path in result.exports:
        again = _outputs(model, str(path), control, image, method)
        torch.testing.assert_close(again, reference, atol=1e-5, rtol=1e-5, msg=f"{path.name} loads differently")


# ------------------------------------------------------------------------------------- a fourth method
def test_a_method_registered_from_tests_appears_in_validate_and_the_recipe_form():
    env = _plugin_env()
    recipe = str(REPO / "recipes" / "tiny" / "lora.yaml")
    done = _cli("validate", recipe, "adapter.method=dummy_bias", "export.formats=[bias_fp16]", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dummy_bias" in done.stdout
    refused = _cli("validate", recipe, "adapter.method=dummy_bias", "export.formats=[comfyui]", env=env)
    assert refused.returncode != 0 and "bias, bias_fp16" not in refused.stdout  # listed with their docs:
    assert "bias (" in refused.stdout + refused.stderr and "bias_fp16 (" in refused.stdout + refused.stderr
    rule = _cli("validate", recipe, "adapter.method=dummy_bias", "adapter.dummy_bias.scale=50", env=env)
    assert rule.returncode != 0 and "implausibly large" in rule.stdout + rule.stderr
    # Without the plugin the same recipe names an unknown method.
    assert _cli("validate", recipe, "adapter.method=dummy_bias").returncode != 0

    probe = ("import json; from cascade_studio.ui.recipe_form import form_fields; "
             "fields = form_fields(); print(json.dumps({f.path: list(f.doc.choices or ()) for f in fields}))")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, **env}, timeout=300)
    assert shown.returncode == 0, shown.stderr
    fields = json.loads(shown.stdout.strip().splitlines()[-1])
    assert "adapter.dummy_bias.scale" in fields
    assert "dummy_bias" in fields["adapter.method"]
    assert {"bias", "bias_fp16"} <= set(fields["export.formats"])


@pytest.mark.slow
def test_a_method_registered_from_tests_trains_exports_and_generates(tmp_path):
    env = _plugin_env()
    recipe = str(REPO / "recipes" / "tiny" / "lora.yaml")
    done = _cli("train", recipe, *FAST, f"workspace={tmp_path}", "name=dummy", "adapter.method=dummy_bias",
                "export.formats=[bias]", env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "dummy"
    trained = run_dir / "export" / "dummy-bias.safetensors"
    assert trained.is_file()
    out = tmp_path / "half.safetensors"
    exported = _cli("export", str(run_dir), "--format", "bias_fp16", "--out", str(out), env=env)
    assert exported.returncode == 0, exported.stderr
    from safetensors.torch import load_file

    full, half = load_file(str(trained)), load_file(str(out))
    assert half["dummy_bias.bias"].dtype == torch.float16
    assert full["dummy_bias.bias"].abs().max() > 0  # it trained
    torch.testing.assert_close(half["dummy_bias.bias"].float(), full["dummy_bias.bias"], atol=1e-3, rtol=1e-3)
    picture = _cli("generate", "--preset", "tiny", "--preview", "--prompt", "a red circle", "--steps", "2",
                   "--adapter", f"{trained}@1.0", "--out", str(tmp_path / "g.png"), env=env)
    assert picture.returncode == 0, picture.stderr[-3000:]
    assert "adapter: dummy_bias" in picture.stdout and (tmp_path / "g.png").is_file()


# ------------------------------------------------------------------------------------------ one place
OUTSIDE_THE_CATALOG = [p for p in sorted((REPO / "cascade_studio").rglob("*.py"))
                       if p.relative_to(REPO / "cascade_studio").parts[0] != "adapters"]
# models/ holds the official architectures: "controlnet" there is the official ControlNet network's module and
# weight-file family (the published repo's controlnet/ folder), like stage_c or effnet, not the adapter method.
MODEL_FAMILY = ("cascade_studio/models/", "'controlnet'")
# diffusion/ holds the samplers: "lcm" there is the latent-consistency sampler and its module (diffusion/lcm.py),
# which any consistency-distilled model uses, not the adapter method that distils one.
SAMPLER_FAMILY = ("cascade_studio/diffusion/", "'lcm'")
ALLOWED = (MODEL_FAMILY, SAMPLER_FAMILY)


def method_literals(paths, root: Path = REPO) -> list[str]:
    """``file:line 'name'`` for every string constant that is exactly a method's name, alias or short name."""
    words = {w for m in catalog.methods() for w in (m.name, m.short, *m.aliases)}
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    return found


def test_no_code_outside_the_method_folders_names_a_method(tmp_path):
    found = method_literals(OUTSIDE_THE_CATALOG)
    assert [hit for hit in found if not any(hit.startswith(where) and hit.endswith(word) for where, word in ALLOWED)] \
        == []
    # The check can fail: code comparing against a method name or using an alias is caught.
    sample = tmp_path / "sample.py"
    sample.write_text('def f(recipe):\n    return recipe.adapter.method == "controlnet" or "cn"\n')
    assert sorted(method_literals([sample], tmp_path)) == ["sample.py:2 'cn'", "sample.py:2 'controlnet'"]
