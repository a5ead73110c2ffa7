"""Issue 23's faults, each found by reading the CUDA paths, each with a test that failed before its fix.

The device-level ones use the meta device as "the GPU" (a host tensor mixed in raises there, as on CUDA); the
IP-Adapter and quantization ones are in ``test_gpu_ready_ip_quant.py``; the whole paths in
``test_device_dry_run.py`` (every recipe and command on another device) and ``test_published_settings.py``
(the published recipes' settings on the tiny model, bf16 included).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade_studio.adapters import ip_adapter as ipa
from cascade_studio.adapters.base import AdaptedStageC
from cascade_studio.config import load_recipe
from cascade_studio.diffusion import offset_noise
from cascade_studio.models.random_init import build_random
from cascade_studio.trainers.steps import heldout_loss

REPO = Path(__file__).resolve().parents[1]
TINY_LORA = REPO / "recipes" / "tiny" / "lora.yaml"
C_TEXT, C_IMG = 64, 32  # the tiny preset's text and image embedding widths


def host_batch(b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(b, 16, 4, 4, generator=g), "clip_text": torch.randn(b, 77, C_TEXT, generator=g),
            "clip_text_pooled": torch.randn(b, 1, C_TEXT, generator=g)}


# -------------------------------------------------------------------------------- 1. held-out batches
def test_heldout_loss_brings_host_batches_to_the_models_device():
    # before: "Tensors on different devices" (the held-out batches stayed on the host)
    model = AdaptedStageC(build_random("stage_c", "tiny").to("meta"))
    loss = heldout_loss(model, [host_batch()], c_clip_img=C_IMG, shift=1.0, seed=1234, repeats=1)
    assert loss == 0.0  # meta reads as zeros


# -------------------------------------------------------------------------------- 2. offset noise
def test_offset_noise_draws_with_a_host_generator_for_a_device_tensor():
    from device_checks import GeneratorDeviceCheck

    noise = torch.zeros(2, 16, 4, 4)
    on_host = offset_noise(noise, 0.1, generator=torch.Generator().manual_seed(3))
    with GeneratorDeviceCheck():  # before: "Expected a 'meta' device type for generator but found 'cpu'"
        on_device = offset_noise(noise.to("meta"), 0.1, generator=torch.Generator().manual_seed(3))
    assert on_device.device.type == "meta" and on_device.shape == noise.shape
    # the same seed still gives the same per-(sample, channel) offsets on every device
    expected = 0.1 * torch.randn(2, 16, 1, 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(on_host, expected.expand_as(noise))


# -------------------------------------------------------------------------------- 4. precision
@pytest.mark.slow
def test_a_bf16_run_feeds_stage_c_an_fp32_noise_level_and_adapters_their_inputs_unrounded(tmp_path, monkeypatch):
    """The published settings (bf16 base, bf16 autocast) on the tiny IP-Adapter recipe, one step."""
    from cascade_studio.adapters.ip_adapter.adapter import IPAdapter
    from cascade_studio.models.stage_c import StageC
    from cascade_studio.run import train

    seen = {"r": [], "embeds": []}
    real_forward, real_tokens = StageC.forward, IPAdapter.image_tokens
    monkeypatch.setattr(StageC, "forward", lambda self, x, r, *a, **k: seen["r"].append(r) or
                        real_forward(self, x, r, *a, **k))
    monkeypatch.setattr(IPAdapter, "image_tokens", lambda self, e: seen["embeds"].append(e) or real_tokens(self, e))
    monkeypatch.chdir(REPO)
    train(REPO / "recipes" / "tiny" / "ip-adapter.yaml",
          [f"workspace={tmp_path}", "model.dtype=bf16", "train.mixed_precision=bf16", "train.max_steps=1",
           "preview.every=0", "data.max_images=8", "data.holdout_fraction=0"], progress=False)
    assert seen["r"] and seen["embeds"]
    # before: bf16, whose 8-bit mantissa scrambles the sinusoidal embedding of r * 10000
    assert all(r.dtype == torch.float32 for r in seen["r"])
    assert any(not torch.equal(r, r.bfloat16().float()) for r in seen["r"])
    # the image embeddings reach the fp32 adapter as cached (fp32), not rounded to the base's bf16 first
    assert all(e.dtype == torch.float32 for e in seen["embeds"])


# -------------------------------------------------------------------------------- 5. previews and dropout
def test_sampling_gives_every_submodule_its_own_mode_back():
    from cascade_studio.inference.pipeline import GenerateSettings, TextEmbeddings, sample_stage_c

    stage_c = build_random("stage_c", "tiny")
    dropouts = [m for m in stage_c.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropouts, "the tiny Stage C should carry the published dropout"
    model = AdaptedStageC(stage_c)
    model.add_adapter(ipa.IPAdapter.for_stage_c(stage_c, embed_dim=C_IMG))
    model.train()
    stage_c.eval()  # the training loop's state: the adapter trains, the frozen base never drops out
    modes = [m.training for m in model.modules()]
    assert any(modes) and not all(modes)
    text = TextEmbeddings(*(torch.zeros(1, n, C_TEXT) for n in (77, 1, 77, 1)))
    sample_stage_c(model, text, GenerateSettings(prompt="x", steps_c=1, width=64, height=64, dtype="fp32"))
    # before: .train() on the whole model, so the base's dropout was on for the rest of the run
    assert [m.training for m in model.modules()] == modes
    assert not any(m.training for m in dropouts)


# -------------------------------------------------------------------------------- 7. several processes
def test_the_process_group_timeout_comes_from_the_recipe():
    from cascade_studio.run import distributed_settings

    recipe = load_recipe(TINY_LORA, ["train.distributed_timeout_minutes=7"])
    kinds = {type(h).__name__: h for h in distributed_settings(recipe)}
    assert kinds["InitProcessGroupKwargs"].timeout.total_seconds() == 7 * 60  # NCCL's default is 10 minutes
    assert kinds["DistributedDataParallelKwargs"].find_unused_parameters is False
    assert load_recipe(TINY_LORA).train.distributed_timeout_minutes == 120


@pytest.mark.slow
def test_accumulated_micro_batches_skip_the_gradient_all_reduce(tmp_path, monkeypatch):
    import accelerate

    from cascade_studio.run import train

    entered = []
    real = accelerate.Accelerator.no_sync

    def no_sync(self, model):
        entered.append(1)
        return real(self, model)

    monkeypatch.setattr(accelerate.Accelerator, "no_sync", no_sync)
    monkeypatch.chdir(REPO)
    train(TINY_LORA, [f"workspace={tmp_path}", "train.max_steps=2", "train.grad_accum=3", "preview.every=0",
                      "data.max_images=8"], progress=False)
    assert len(entered) == 2 * (3 - 1)  # before: 0, every micro-batch was all-reduced


@pytest.mark.slow
def test_two_process_ip_adapter_at_batch_one_with_every_image_dropped(tmp_path):
    """The event that left the IP-Adapter's parameters without gradients on one rank: under DDP (which does not
    search for unused parameters, see run.distributed_settings) the next step would fail."""
    import subprocess

    from cascade_studio.cli import accelerate_command

    overrides = [f"workspace={tmp_path}", "name=ddp-ip", "train.max_steps=3", "train.batch_size=1",
                 "train.grad_accum=2", "adapter.ip_adapter.drop_image=1.0", "adapter.ip_adapter.drop_text=0.0",
                 "adapter.ip_adapter.drop_both=0.0", "preview.every=0", "data.max_images=8",
                 "data.holdout_fraction=0", "train.checkpoint_every=0"]
    command = accelerate_command(REPO / "recipes" / "tiny" / "ip-adapter.yaml", overrides, processes=2)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command + ["--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exported = load_file(str(tmp_path / "runs" / "ddp-ip" / "export" / "ddp-ip-ip_adapter.safetensors"))
    assert exported and all(torch.isfinite(t).all() for t in exported.values())


# -------------------------------------------------------------------------------- 8. memory and speed
@pytest.mark.slow
def test_data_loader_workers_give_the_same_run_and_resume_exactly(tmp_path, monkeypatch):
    """``train.num_workers`` was documented but never read. Workers prefetch batches; the checkpoint still
    records the position of the last batch used, so a resumed run with workers equals one without."""
    from cascade_studio.data.cache import CachedDataset
    from cascade_studio.run import train

    monkeypatch.chdir(REPO)
    pids = tmp_path / "pids"
    real_getitem = CachedDataset.__getitem__

    def getitem(self, index):
        with open(pids, "a") as f:  # from whichever process reads the item
            f.write(f"{os.getpid()}\n")
        return real_getitem(self, index)

    monkeypatch.setattr(CachedDataset, "__getitem__", getitem)
    common = [f"workspace={tmp_path}", "preview.every=0", "data.max_images=12", "train.batch_size=2",
              "train.checkpoint_every=2"]
    plain = train(TINY_LORA, common + ["name=plain", "train.max_steps=4"], progress=False)
    train(TINY_LORA, common + ["name=workers", "train.max_steps=2", "train.num_workers=2"], progress=False)
    resumed = train(TINY_LORA, common + ["name=workers", "train.max_steps=4", "train.num_workers=2"], resume=True,
                    progress=False)
    assert {int(p) for p in pids.read_text().split()} - {os.getpid()}, "no item was read by a worker process"
    a, b = (load_file(str(r.exports[0])) for r in (plain, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_peak_memory_is_reset_after_loading_and_before_the_first_step(tmp_path, monkeypatch):
    from cascade_studio.run import train
    from cascade_studio.trainers import loop, steps

    order = []
    monkeypatch.setattr(loop, "reset_peak_memory", lambda device: order.append("reset"))
    real_loss = steps.diffusion_training_loss  # the run's loss step (a method without its own objective)
    monkeypatch.setattr(steps, "diffusion_training_loss", lambda *a, **k: order.append("step") or real_loss(*a, **k))
    monkeypatch.chdir(REPO)
    train(TINY_LORA, [f"workspace={tmp_path}", "train.max_steps=2", "preview.every=0", "data.max_images=8",
                      "data.holdout_fraction=0"], progress=False)
    assert order == ["reset", "step", "step"]


def test_the_big_ip_adapter_with_adamw_is_reported_not_to_fit_a_16_gb_card():
    """543M fp32 trainable parameters with AdamW beside the bf16 3.6B base; counted on the meta device."""
    from cascade_studio.models.presets import build_stage_c, get_preset
    from cascade_studio.trainers.plan import GiB, resident_memory, resident_memory_report

    with torch.device("meta"):
        stage_c = build_stage_c(**get_preset("big").stage_c).to(torch.bfloat16)
        adapter = ipa.IPAdapter.for_stage_c(stage_c, embed_dim=768)
    params = adapter.trainable_parameters()
    assert 540e6 < sum(p.numel() for p in params) < 550e6
    sixteen = 16 * 10**9
    adamw = resident_memory(stage_c, params, "adamw")
    line, tight = resident_memory_report(adamw, "adamw", sixteen)
    assert tight and adamw.total > 14 * GiB and "optimizer.name=adamw8bit" in line
    shipped = load_recipe(REPO / "recipes" / "ip_adapter" / "stage-c-big.yaml").optimizer.name
    _, tight = resident_memory_report(resident_memory(stage_c, params, shipped), shipped, sixteen)
    assert not tight  # the shipped big recipe leaves room for activations on a 16 GB card
