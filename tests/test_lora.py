"""LoRA on a tiny Stage C: invariants, formats (ComfyUI, PEFT, official), multipliers, merge, unload."""
from __future__ import annotations

import json
import re

import pytest
import torch

from cascade_studio.adapters.base import AdaptedStageC, AdapterMismatchError
from cascade_studio.adapters.files import load_adapter_tensors, save_adapter_tensors
from cascade_studio.adapters.lora import LoraAdapter, LoraSpec, export_adapter, load_adapter_file
from cascade_studio.adapters.lora.formats import base_module_paths
from cascade_studio.adapters.registry import AdapterContext, detect_method, load_adapter
from cascade_studio.models import build_stage_c, get_preset, official_state_dict
from cascade_studio.trainers.components import make_random_base_learnable


def tiny_stage_c(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = make_random_base_learnable(build_stage_c(**get_preset("tiny").stage_c), seed=seed)
    return model.eval().requires_grad_(False)


def tiny_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 16, 8, 8, generator=g),
        r=torch.rand(batch, generator=g),
        clip_text=torch.randn(batch, 77, 64, generator=g),
        clip_text_pooled=torch.randn(batch, 1, 64, generator=g),
        clip_img=torch.zeros(batch, 1, 32),
    )


def randomize(adapter: LoraAdapter, seed: int = 3, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


CONTEXT = AdapterContext(preset="tiny", base_fingerprint="test", stage_c_config={"c_hidden": [64, 64]})


def test_fresh_adapter_changes_no_output_and_only_adapter_params_train():
    model = AdaptedStageC(tiny_stage_c())
    inputs = tiny_inputs()
    base = run(model, inputs)
    adapter = LoraAdapter(LoraSpec(rank=4, alpha=4), name="style")
    model.add_adapter(adapter)
    assert torch.equal(run(model, inputs), base)
    trainable = {id(p) for p in adapter.trainable_parameters()}
    assert trainable, "LoRA created no parameters"
    # 4 attention linears per AttnBlock, A and B each: 12 AttnBlocks in the tiny preset (2+4 down, 4+2 up)
    assert len(trainable) == 12 * 4 * 2
    base_params = {n: p.detach().clone() for n, p in model.stage_c.named_parameters() if id(p) not in trainable}
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=0.1)
    for _ in range(3):
        out = model(**inputs)
        loss = out.pow(2).mean()
        loss.backward()
        for name, p in model.stage_c.named_parameters():
            if id(p) not in trainable:
                assert p.grad is None, f"base parameter {name} received a gradient"
        opt.step()
        opt.zero_grad()
    for name, p in model.stage_c.named_parameters():
        if id(p) not in trainable:
            assert torch.equal(p, base_params[name]), f"base parameter {name} changed"
    assert not torch.equal(run(model, inputs), base)


def test_targets_resolve_to_attention_and_groups():
    model = AdaptedStageC(tiny_stage_c())
    adapter = LoraAdapter(LoraSpec(rank=2, targets=("attention", "kv_mapper", "clip_mappers")))
    model.add_adapter(adapter)
    assert any(t.endswith("attention.attn.to_q") for t in adapter.target_modules)
    assert any(t.endswith("kv_mapper.1") for t in adapter.target_modules)
    assert "clip_txt_mapper" in adapter.target_modules
    with pytest.raises(AdapterMismatchError, match="match no Linear"):
        AdaptedStageC(tiny_stage_c()).add_adapter(LoraAdapter(LoraSpec(targets=("no_such_layer",))))


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_comfyui_roundtrip_reproduces_outputs(tmp_path, kind):
    inputs = tiny_inputs()
    model = AdaptedStageC(tiny_stage_c())
    adapter = LoraAdapter(LoraSpec(rank=4, alpha=2.0, type=kind), name="a", info={})
    model.add_adapter(adapter)
    randomize(adapter)
    trained = run(model, inputs)
    path = export_adapter(adapter, tmp_path / "a.safetensors", "comfyui")
    tensors, meta = load_adapter_tensors(path)
    assert meta["modelspec.architecture"] == "stable-cascade-v1-prior/lora"
    # ComfyUI's rule: lora_unet_ + module path with dots as underscores, onto real Stage C modules
    fresh = AdaptedStageC(tiny_stage_c())
    comfy_names = {"lora_unet_" + p.replace(".", "_") for p in base_module_paths(fresh.stage_c)}
    for key in tensors:
        stem = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
        assert stem in comfy_names, key
    assert all(k.startswith("lora_unet_") for k in tensors)
    loaded = load_adapter_file(path, fresh, CONTEXT, name="b")
    assert loaded.spec.type == kind
    torch.testing.assert_close(run(fresh, inputs), trained, atol=1e-5, rtol=0)


def test_peft_roundtrip_and_registry_detection(tmp_path):
    inputs = tiny_inputs()
    model = AdaptedStageC(tiny_stage_c())
    adapter = LoraAdapter(LoraSpec(rank=3, alpha=6.0, targets=("attention", "channelwise")), name="a")
    model.add_adapter(adapter)
    randomize(adapter)
    trained = run(model, inputs)
    folder = export_adapter(adapter, tmp_path / "peft", "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 6.0
    assert detect_method(folder) == "lora"
    fresh = AdaptedStageC(tiny_stage_c())
    load_adapter(folder, fresh, CONTEXT, name="p")
    torch.testing.assert_close(run(fresh, inputs), trained, atol=1e-5, rtol=0)


def test_official_positional_file_matches_fused_weight_update(tmp_path):
    """weights.{i}.lora_down/up on fused in_proj then out_proj, scale 1/rank (alpha fixed at 1)."""
    base = tiny_stage_c()
    rank, width = 2, 64
    g = torch.Generator().manual_seed(7)
    attn_paths = [n for n, _ in base.named_modules() if n.endswith("attention.attn")]
    tensors = {}
    for b, _ in enumerate(attn_paths):
        tensors[f"weights.{2 * b}.lora_down"] = torch.randn(rank, width, generator=g) * 0.1
        tensors[f"weights.{2 * b}.lora_up"] = torch.randn(3 * width, rank, generator=g) * 0.1
        tensors[f"weights.{2 * b + 1}.lora_down"] = torch.randn(rank, width, generator=g) * 0.1
        tensors[f"weights.{2 * b + 1}.lora_up"] = torch.randn(width, rank, generator=g) * 0.1
    path = save_adapter_tensors(tensors, tmp_path / "official_lora.safetensors", {})
    # expected: the official parametrisation adds up @ down * (1/rank) to the fused weights
    expected_model = tiny_stage_c()
    sd = official_state_dict(expected_model)
    for b, p in enumerate(attn_paths):
        sd[f"{p}.in_proj_weight"] = sd[f"{p}.in_proj_weight"] + tensors[f"weights.{2 * b}.lora_up"] @ \
            tensors[f"weights.{2 * b}.lora_down"] / rank
        sd[f"{p}.out_proj.weight"] = sd[f"{p}.out_proj.weight"] + tensors[f"weights.{2 * b + 1}.lora_up"] @ \
            tensors[f"weights.{2 * b + 1}.lora_down"] / rank
    from cascade_studio.models import load_official_state_dict

    load_official_state_dict(expected_model, sd)
    inputs = tiny_inputs()
    model = AdaptedStageC(base)
    load_adapter_file(path, model, CONTEXT, name="official")
    torch.testing.assert_close(run(model, inputs), run(expected_model, inputs), atol=1e-5, rtol=0)
    # the wrong number of layers (e.g. a lite file on a tiny model) is refused clearly
    del tensors["weights.0.lora_down"], tensors["weights.0.lora_up"]
    bad = save_adapter_tensors(tensors, tmp_path / "bad.safetensors", {})
    with pytest.raises(AdapterMismatchError, match="different Stage C|unexpected"):
        load_adapter_file(bad, AdaptedStageC(tiny_stage_c()), CONTEXT)


def test_kohya_onetrainer_names_and_foreign_keys(tmp_path):
    model = AdaptedStageC(tiny_stage_c())
    adapter = LoraAdapter(LoraSpec(rank=2, alpha=1.0), name="a")
    model.add_adapter(adapter)
    randomize(adapter)
    inputs = tiny_inputs()
    trained = run(model, inputs)
    path = export_adapter(adapter, tmp_path / "a.safetensors", "comfyui")
    tensors, meta = load_adapter_tensors(path)
    # OneTrainer-style prefix and diffusers-style attention names are accepted too
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("lora_unet_", "lora_prior_unet_")
        k = re.sub(r"_attention_attn_to_(q|k|v)\.", r"_attention_to_\1.", k)
        k = k.replace("_attention_attn_out_proj.", "_attention_to_out_0.")
        renamed[k] = v
    other = save_adapter_tensors(renamed, tmp_path / "onetrainer.safetensors", {})
    fresh = AdaptedStageC(tiny_stage_c())
    load_adapter_file(other, fresh, CONTEXT)
    torch.testing.assert_close(run(fresh, inputs), trained, atol=1e-5, rtol=0)
    # a text-encoder LoRA tensor is refused, not silently dropped
    renamed["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 8)
    foreign = save_adapter_tensors(renamed, tmp_path / "foreign.safetensors", {})
    with pytest.raises(AdapterMismatchError, match="match no Stage C module"):
        load_adapter_file(foreign, AdaptedStageC(tiny_stage_c()), CONTEXT)


def test_multiplier_disable_remove_and_merge():
    inputs = tiny_inputs()
    model = AdaptedStageC(tiny_stage_c())
    base = run(model, inputs)
    names_before = [n for n, _ in model.stage_c.named_modules()]
    a = LoraAdapter(LoraSpec(rank=4, alpha=4), name="a")
    model.add_adapter(a)
    randomize(a)
    full = run(model, inputs)
    a.set_multiplier(0.0)
    torch.testing.assert_close(run(model, inputs), base, atol=1e-6, rtol=0)
    a.set_multiplier(1.0)
    torch.testing.assert_close(run(model, inputs), full, atol=1e-6, rtol=0)
    # two LoRAs at once; disabling one gives the other alone
    b = LoraAdapter(LoraSpec(rank=2, alpha=2), name="b")
    model.add_adapter(b)
    randomize(b, seed=9)
    both = run(model, inputs)
    assert not torch.allclose(both, full)
    model.set_enabled("b", False)
    torch.testing.assert_close(run(model, inputs), full, atol=1e-6, rtol=0)
    model.set_enabled("b", True)
    # unloading restores base outputs exactly and the original module paths
    model.remove_adapter("b")
    model.remove_adapter("a")
    assert torch.equal(run(model, inputs), base)
    assert [n for n, _ in model.stage_c.named_modules()] == names_before


def test_merge_folds_all_enabled_loras():
    inputs = tiny_inputs()
    model = AdaptedStageC(tiny_stage_c())
    base = run(model, inputs)
    a, b = LoraAdapter(LoraSpec(rank=4, alpha=4), name="a"), LoraAdapter(LoraSpec(rank=2, alpha=2), name="b")
    model.add_adapter(a)
    model.add_adapter(b)
    randomize(a)
    randomize(b, seed=9)
    both = run(model, inputs)
    a.merge()
    # merged weights: same outputs (fp32 rounding) with the LoRA branches no longer run
    torch.testing.assert_close(run(model, inputs), both, atol=1e-5, rtol=0)
    layer = model.stage_c.get_submodule("down_blocks.0.2.attention.attn.to_q")
    assert set(layer.merged_adapters) == {"a", "b"}
    a.unmerge()
    torch.testing.assert_close(run(model, inputs), both, atol=1e-5, rtol=0)
    model.remove_adapter("a")
    model.remove_adapter("b")
    # merge -> unmerge is exact only up to float rounding
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=0)


def test_mismatched_width_refused(tmp_path):
    model = AdaptedStageC(tiny_stage_c())
    adapter = LoraAdapter(LoraSpec(rank=2), name="a", info={"cascade_studio.base_width": "64"})
    model.add_adapter(adapter)
    path = export_adapter(adapter, tmp_path / "a.safetensors", "comfyui")
    lite = AdapterContext(preset="lite", stage_c_config={"c_hidden": [1536, 1536]})
    with pytest.raises(AdapterMismatchError, match="width 64"):
        load_adapter_file(path, AdaptedStageC(tiny_stage_c()), lite)
    # shapes catch files without metadata too
    tensors, _ = load_adapter_tensors(path)
    widened = {k: (torch.zeros(v.shape[0], 128) if k.endswith("lora_down.weight") else v) for k, v in tensors.items()}
    bad = save_adapter_tensors(widened, tmp_path / "wide.safetensors", {})
    with pytest.raises(AdapterMismatchError, match="wrong shapes|size mismatch|shape"):
        load_adapter_file(bad, AdaptedStageC(tiny_stage_c()), CONTEXT)


@pytest.mark.parametrize("content", [b"", b"\x00" * 5, b"not a safetensors file at all" * 10])
def test_garbage_files_refused(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterMismatchError, match="junk.safetensors"):
        load_adapter_file(path, AdaptedStageC(tiny_stage_c()), CONTEXT)


def test_training_checkpoint_file_loads_directly(tmp_path):
    """A checkpoint's adapter.safetensors (PEFT layout + studio metadata) loads without an adapter_config.json."""
    inputs = tiny_inputs()
    model = AdaptedStageC(tiny_stage_c())
    adapter = LoraAdapter(LoraSpec(rank=3, alpha=5.0), name="a")
    model.add_adapter(adapter)
    randomize(adapter)
    trained = run(model, inputs)
    path = save_adapter_tensors(adapter.adapter_state_dict(), tmp_path / "adapter.safetensors", adapter.metadata())
    fresh = AdaptedStageC(tiny_stage_c())
    loaded = load_adapter_file(path, fresh, CONTEXT, name="ckpt")
    assert (loaded.spec.rank, loaded.spec.alpha) == (3, 5.0)
    torch.testing.assert_close(run(fresh, inputs), trained, atol=1e-5, rtol=0)


def comfyui_dora_weight(weight, down, up, alpha, dora_scale, strength=1.0):
    """ComfyUI's DoRA rule (comfy/weight_adapter/base.py ``weight_decompose``, reimplemented as the oracle), for
    a dora_scale of one value per output row: the updated weight times dora_scale over the ORIGINAL weight's row
    norms (plus the dtype's eps), then blended with ``strength``."""
    rank = down.shape[0]
    weight_calc = weight + (alpha / rank) * (up @ down)
    assert dora_scale.shape[0] == weight_calc.shape[0]  # ComfyUI's wd_on_output_axis branch
    weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True) + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / weight_norm)
    return weight + strength * (weight_calc - weight) if strength != 1.0 else weight_calc


def test_dora_comfyui_export_gives_peft_outputs_under_comfyuis_rule(tmp_path):
    """ComfyUI normalises a DoRA by the original weight's norm, PEFT by the updated one's: the exported
    dora_scale makes ComfyUI's own rule (the oracle) reproduce the trained PEFT DoRA."""
    inputs = tiny_inputs()
    model = AdaptedStageC(tiny_stage_c())
    adapter = LoraAdapter(LoraSpec(rank=4, alpha=2.0, type="dora"), name="a", info={})
    model.add_adapter(adapter)
    randomize(adapter, std=0.2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained magnitude no longer equals the base's row norms
        for _, layer in adapter._layers():
            magnitude = layer.lora_magnitude_vector["a"].weight
            magnitude.mul_(1 + 0.3 * torch.rand(magnitude.shape, generator=g))
    trained = run(model, inputs)
    path = export_adapter(adapter, tmp_path / "dora.safetensors", "comfyui")
    tensors, meta = load_adapter_tensors(path)

    patched = tiny_stage_c()
    base = run(AdaptedStageC(tiny_stage_c()), inputs)
    with torch.no_grad():
        for module_path in base_module_paths(patched):
            stem = "lora_unet_" + module_path.replace(".", "_")
            if f"{stem}.dora_scale" not in tensors:
                continue
            linear = patched.get_submodule(module_path)
            linear.weight.copy_(comfyui_dora_weight(
                linear.weight, tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"],
                float(tensors[f"{stem}.alpha"]), tensors[f"{stem}.dora_scale"]))
    comfy = run(AdaptedStageC(patched), inputs)
    assert (trained - base).abs().max() > 1e-2  # the DoRA really changes the output
    torch.testing.assert_close(comfy, trained, atol=1e-4, rtol=1e-4)
    assert meta["cascade_studio.dora_scale"] == "comfyui-original-norm"


def test_dora_exported_without_the_base_says_comfyui_differs(tmp_path, capsys):
    from cascade_studio.adapters.lora.method import export_tensors

    model = AdaptedStageC(tiny_stage_c())
    adapter = LoraAdapter(LoraSpec(rank=4, alpha=2.0, type="dora"), name="a", info={})
    model.add_adapter(adapter)
    randomize(adapter)
    path = export_tensors(adapter.adapter_state_dict(), adapter.metadata(), "comfyui", tmp_path / "d.safetensors")
    assert load_adapter_tensors(path)[1]["cascade_studio.dora_scale"] == "peft-magnitude"
    assert "ComfyUI" in capsys.readouterr().err
