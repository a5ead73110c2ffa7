"""The device dry run: every shipped recipe and every command with the models on a second device.

Everything here has only ever run on the CPU, where a tensor left on the host, or a CPU random generator drawing
for a GPU tensor, goes unnoticed. With the models on the ``meta`` device, any host tensor mixed into their
computation raises, as it would on a GPU, and ``device_checks.GeneratorDeviceCheck`` adds the generator check
CUDA makes, so such mix-ups fail in CI on a machine without one (issue 23 found two: the held-out batches and the
offset noise). Meta tensors carry no values: ``cascade_studio.devices`` reads
them as zeros, so the dry run checks where tensors go, not what they hold.

One exception, on the host in the dry run as well: transformers' CLIP text model reads a value of its own inputs
inside its forward (a padding-mask check), which a meta tensor cannot give. Its outputs are host tensors in any
case (cached, or moved to the device by the code under test).
"""
from __future__ import annotations

import functools

import accelerate
import pytest
import torch
import yaml
from safetensors import safe_open
from device_checks import GeneratorDeviceCheck
from cascade_studio.adapters import catalog
from recipe_transplant import REPO, SHIPPED, recipe_id, transplant

from cascade_studio import devices
from cascade_studio.inference import pipeline
from cascade_studio.run import train
from cascade_studio.trainers import components, loop

# Loading real adapter tensors into meta parameters is a no-op, which torch says once per tensor.
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")]
META = torch.device("meta")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One workspace for the module: one MLflow store, and the content-keyed cache shared by the recipes."""
    return tmp_path_factory.mktemp("dry-run")


@pytest.fixture(params=["meta", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")])])
def on_device(request, monkeypatch):
    """Training (accelerate's device), generate and compare put their models on the meta device, or on a GPU
    when there is one (the ``cuda`` marker: ``pytest -m cuda``, or ``benchmarks/gpu_check.py --tests``)."""
    device = torch.device(request.param)
    monkeypatch.setattr(accelerate.Accelerator, "device", property(lambda self: device))
    if device.type == "meta":
        real_get_stage = components.BaseModels._get_stage

        def get_stage(self, name, dtype):
            if name != "text_encoder":
                return real_get_stage(self, name, dtype)
            host = components.BaseModels(self.model_cfg, device=torch.device("cpu"))
            return real_get_stage(host, name, torch.float32)

        monkeypatch.setattr(components.BaseModels, "_get_stage", get_stage)
        real_load = pipeline.CascadeComponents.load

        def load(self, name, dtype=torch.float32):
            if name != "text_encoder":
                return real_load(self, name, dtype)
            return real_load(pipeline.CascadeComponents(self.spec, device="cpu"), name, torch.float32)

        monkeypatch.setattr(pipeline.CascadeComponents, "load", load)
        # one pass over the held-out batches instead of four: the same device path at a quarter of the cost
        monkeypatch.setattr(loop, "heldout_loss", functools.partial(loop.heldout_loss, repeats=1))
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository
    with GeneratorDeviceCheck():  # what CUDA checks and meta does not: a generator draws on its own device
        yield device


def _model_on_meta(result, device) -> None:
    """The run really trained on meta: its checkpoint was written from meta tensors, so it holds zeros."""
    from safetensors.torch import load_file

    if device.type != "meta":
        return

    checkpoint = sorted((result.run_dir / "checkpoints").glob("step-*"))[-1]
    tensors = load_file(str(checkpoint / "adapter.safetensors"))
    assert tensors and all(not t.any() for t in tensors.values())


def _dry(recipe, workspace, steps: int, device: torch.device) -> list[str]:
    """The shipped recipe, shortened (four images, one preview prompt), under its own run name: meta tensors cost
    no arithmetic, but torch's meta kernels run in Python, about 0.4 s per tiny Stage C call."""
    name = recipe_id(recipe).replace("/", "-") + f"-{device.type}"
    overrides = transplant(recipe, workspace, steps=steps, max_images=4) + ["preview.prompts=[a red circle]",
                                                                            f"name={name}"]
    # Accumulation over two micro-batches takes the device path the published 4 or 8 take (each micro-batch is
    # the same code) at a fraction of the meta kernels' cost; test_published_settings.py runs the published counts.
    if yaml.safe_load(recipe.read_text()).get("train", {}).get("grad_accum", 1) > 2:
        overrides.append("train.grad_accum=2")
    return overrides


# Resumed on the device as well: one published recipe per method, the one with offset noise among them (every
# published recipe resumes with real values in test_published_settings.py).
RESUMED = [REPO / "recipes" / name for name in ("lora/stage-c-lite-style.yaml", "controlnet/stage-c-big-inpainting.yaml",
                                                "ip_adapter/stage-c-lite.yaml")]


@pytest.mark.parametrize("recipe", SHIPPED, ids=[recipe_id(p) for p in SHIPPED])
def test_every_shipped_recipe_runs_on_another_device(recipe, workspace, on_device):
    """Cache, a training step, held-out evaluation, a preview, a checkpoint and the export with the models on
    the device; three published recipes (batch 1, accumulation, dropouts, offset noise) are resumed for a step."""
    result = train(recipe, _dry(recipe, workspace, steps=1, device=on_device), progress=False)
    assert result.step == 1
    assert result.heldout_before is not None  # held-out batches made on the host, evaluated on the device
    assert list((result.run_dir / "previews").glob("step-*.png"))
    assert result.exports, "the run exported nothing"
    for path in result.exports:  # every export format of the recipe, each a file of its method
        target = path / "adapter_model.safetensors" if path.is_dir() else path
        with safe_open(str(target), framework="pt") as f:
            assert f.metadata()["cascade_studio.method"] in catalog.names()
            assert len(list(f.keys())) > 0
    _model_on_meta(result, on_device)
    if recipe in RESUMED:
        resumed = train(recipe, _dry(recipe, workspace, steps=2, device=on_device), resume=True, progress=False)
        assert resumed.step == 2 and resumed.exports
        assert len(list((result.run_dir / "previews").glob("step-*.png"))) == 2


def test_one_host_read_per_optimizer_step(workspace, on_device):
    """Each read from the device waits for it (a GPU sync); the loop makes one per step, whatever the
    accumulation (loss, gradient norm and the finite check travel together)."""
    recipe = REPO / "recipes" / "tiny" / "lora.yaml"
    counts = {}
    for steps in (1, 1, 2):  # the first run also fills the encode cache (reads of its own): only warms it up
        base = transplant(recipe, workspace, steps=steps, max_images=4) + [
            f"name=reads-{on_device.type}-{steps}-{len(counts)}"]
        # no previews, held-out split or intermediate checkpoints: only the steps differ between the two runs
        quiet = [o for o in base if not o.startswith(("preview.every", "train.checkpoint_every",
                                                      "data.holdout_fraction"))]
        before = devices.host_read_count()
        train(recipe, quiet + ["preview.every=0", "train.checkpoint_every=0", "data.holdout_fraction=0",
                               "train.grad_accum=3"], progress=False)
        counts[steps] = devices.host_read_count() - before
    assert counts[2] - counts[1] == 1, counts


def test_generate_and_compare_commands_on_another_device(tmp_path, workspace, on_device, monkeypatch):
    """`cascade-studio generate` and `compare` with `--device`, through every kind of adapter a run exports, and
    `cascade-studio export` of a run trained on the device."""
    from cascade_studio.cli import main

    monkeypatch.setenv("CASCADE_STUDIO_DEBUG", "1")  # a failure shows its traceback
    made, runs = {}, {}
    for name in ("lora", "controlnet-canny", "ip-adapter"):
        recipe = REPO / "recipes" / "tiny" / f"{name}.yaml"
        overrides = _dry(recipe, workspace, steps=1, device=on_device) + ["preview.every=0", f"name=for-{name}"]
        result = train(recipe, overrides, progress=False)
        made[name], runs[name] = result.exports[0], result.run_dir
    assert main(["export", str(runs["lora"]), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    image = REPO / "datasets" / "tiny-shapes" / sorted(p.name for p in (REPO / "datasets" / "tiny-shapes")
                                                         .glob("*.png"))[0]
    common = ["--preset", "tiny", "--device", str(on_device), "--steps", "2", "--workspace", str(tmp_path)]
    out = tmp_path / "gen.png"
    assert main(["generate", "--prompt", "a red circle", "--preview", "--out", str(out), *common,
                 "--lora", str(made["lora"]), "--controlnet", str(made["controlnet-canny"]), "--control", str(image),
                 "--ip-adapter", str(made["ip-adapter"]), "--image-prompt", str(image)]) == 0
    assert out.is_file()
    assert main(["generate", "--prompt", "a red circle", "--out", str(tmp_path / "full.png"), "--steps-b", "2",
                 *common]) == 0  # the whole cascade: Stage B and Stage A too
    grid = tmp_path / "grid"
    assert main(["compare", "--columns", "base", f"lora:{made['lora']}", "--prompt", "a red circle",
                 "--out", str(grid), "--no-progress", *common]) == 0
    assert (grid / "grid.png").is_file()


def test_encoding_on_the_fly_runs_on_another_device(workspace, on_device):
    """``cache.mode: none``: the encoders stay loaded on the device and encode every batch there (the ControlNet
    from pre-made controls feeds all three encoder inputs: caption, image, control image), held-out batches and the
    preview's reference included."""
    recipe = REPO / "recipes" / "tiny" / "controlnet-image.yaml"
    overrides = _dry(recipe, workspace, steps=1, device=on_device) + ["cache.mode=none", "name=on-the-fly"]
    result = train(recipe, overrides, progress=False)
    assert result.step == 1 and result.heldout_before is not None and result.exports
    assert list((result.run_dir / "previews").glob("step-*.png"))
    _model_on_meta(result, on_device)
