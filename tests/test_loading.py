"""Loading real weights: every source type (single file, diffusers folder incl. shards and variants, hub repo id
through a fake offline cache, pickles), dtype handling and peak memory, config detection from shapes, and one
clear WeightsError per bad input."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import shutil
import struct
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cascade_studio.models import loading
from cascade_studio.models.effnet import build_effnet
from cascade_studio.models.encoders import build_ip_image_encoder, text_encoder_config, image_encoder_config
from cascade_studio.models.loading import (
    WeightsError,
    detect_family,
    infer_config,
    load_controlnet,
    load_effnet,
    load_image_encoder,
    load_ip_image_encoder,
    load_previewer,
    load_stage_a,
    load_stage_b,
    load_stage_c,
    load_text_encoder,
    weights_fingerprint,
)
from cascade_studio.models.official import official_state_dict
from cascade_studio.models.presets import (
    PRESETS,
    build_controlnet,
    build_previewer,
    build_stage_a,
    build_stage_b,
    build_stage_c,
)

from reference_paths import REFERENCE_DIR  # noqa: E402

REFERENCE = REFERENCE_DIR / "official_state_dict_keys.json"
TINY = PRESETS["tiny"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (fresh Stage C zeroes its output conv, which would hide loading bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=generator) * 0.05
                tensor.copy_(values.abs() + 0.5 if "running_var" in name else values)
    return module.eval()


def save_official(module: torch.nn.Module, path: Path, dtype: torch.dtype | None = None, prefix: str = "") -> Path:
    state = {prefix + k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous()
             for k, v in official_state_dict(module).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def stage_c_inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 16, 8, 8, generator=generator), torch.rand(batch, generator=generator),
            torch.randn(batch, 77, 64, generator=generator), torch.randn(batch, 1, 64, generator=generator),
            torch.randn(batch, 1, 32, generator=generator))


@pytest.fixture(scope="module")
def stage_c() -> torch.nn.Module:
    return randomize(build_stage_c(**TINY.stage_c))


@pytest.fixture(scope="module")
def files(tmp_path_factory, stage_c) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {
        "fp32": save_official(stage_c, root / "stage_c.safetensors"),
        "bf16": save_official(stage_c, root / "stage_c_bf16.safetensors", torch.bfloat16),
        "stage_b": save_official(randomize(build_stage_b(**TINY.stage_b)), root / "stage_b.safetensors"),
    }


def run_c(model, dtype=torch.float32):
    with torch.no_grad():
        return model(*[t.to(dtype) for t in stage_c_inputs()])


# ------------------------------------------------------------------------------------------------ single files


def test_fp32_file_gives_identical_outputs_frozen_in_eval(files, stage_c):
    loaded = load_stage_c(files["fp32"], dtype=torch.float32)
    assert torch.equal(run_c(loaded), run_c(stage_c))
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.parameters())
    assert not loaded.training
    assert loaded.source_path == str(files["fp32"])


def test_bf16_file_into_bf16_keeps_bf16(files, stage_c):
    loaded = load_stage_c(files["bf16"])  # default dtype is bf16
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    reference = build_stage_c(**TINY.stage_c)
    reference.load_state_dict(stage_c.state_dict())
    reference.to(torch.bfloat16).eval()
    assert torch.equal(run_c(loaded, torch.bfloat16), run_c(reference, torch.bfloat16))


def test_fp32_file_into_bf16_rounds_like_a_cast(files, stage_c):
    loaded = load_stage_c(files["fp32"], dtype=torch.bfloat16)
    for name, tensor in stage_c.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name


class MemoryAccounting(TorchDispatchMode):
    """Bytes of tensor storage alive during a load: tensors read from disk (seen through a safe_open wrapper,
    since safetensors creates them outside torch's dispatcher) plus every new storage any torch op allocates
    (casts, clones, concatenations). A storage counts from creation until it is freed, views count once.
    Memory-mapped file pages are page cache, not copies, and are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.largest_read = 0

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                self._track(tensor)
        return out

    def install(self, monkeypatch) -> None:
        real = loading.safe_open
        accounting = self

        class TrackingSafeOpen:
            def __init__(self, *args, **kwargs):
                self._inner = real(*args, **kwargs)

            def __enter__(self):
                self._handle = self._inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self._inner.__exit__(*exc)

            def get_tensor(self, name):
                tensor = self._handle.get_tensor(name)
                accounting.largest_read = max(accounting.largest_read, tensor.numel() * tensor.element_size())
                accounting._track(tensor)
                return tensor

        monkeypatch.setattr(loading, "safe_open", TrackingSafeOpen)


@pytest.mark.parametrize("layout,file_dtype", [("official", torch.bfloat16), ("official", torch.float32),
                                               ("diffusers", torch.float32)])
def test_peak_memory_is_one_model_plus_one_layer(tmp_path, stage_c, monkeypatch, layout, file_dtype):
    state = {k: v.to(file_dtype).contiguous() for k, v in official_state_dict(stage_c).items()}
    if layout == "official":
        save_file(state, str(tmp_path / "stage_c.safetensors"))
    else:
        write_diffusers(tmp_path / "prior", to_diffusers(state, "stage_c"), TINY_C_DIFFUSERS_CONFIG)
    accounting = MemoryAccounting()
    accounting.install(monkeypatch)
    with accounting:
        loaded = load_stage_c(tmp_path, dtype=torch.bfloat16)
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert accounting.current == model_bytes  # what stays alive is exactly the model (nothing leaked)
    # A loader that materialised the fp32 state dict (or all fused attention) first would exceed this bound.
    bound = model_bytes + 4 * accounting.largest_read
    assert bound < 1.5 * model_bytes
    assert accounting.peak <= bound


def _mapped_resident_bytes(path: Path) -> int:
    """Bytes of ``path`` resident in this process's memory maps (/proc/self/smaps ``Rss`` of its mappings)."""
    total, inside = 0, False
    target = str(path.resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == target
        elif inside and fields and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_bf16_load_keeps_no_second_copy_of_fused_attention(tmp_path, layout):
    """A bf16 file loaded in bf16 on the CPU: the non-fused weights stay in safetensors' map of the file, the
    q/k/v parts of every fused ``in_proj_weight`` get memory of their own. The file pages of the fused tensors
    must not also stay resident in that map (they did: about 1.6 GiB extra for the 3.6B Stage C)."""
    config = dict(TINY.stage_c, c_hidden=[768, 768], c_cond=64, nhead=[12, 12], blocks=[[1, 1], [1, 1]])
    model = randomize(build_stage_c(**config))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in official_state_dict(model).items()}
    if layout == "official":
        path = tmp_path / "stage_c_bf16.safetensors"
        save_file(state, str(path))
        files = [path]
    else:
        write_diffusers(tmp_path / "prior", to_diffusers(state, "stage_c"), TINY_C_DIFFUSERS_CONFIG)
        files = sorted((tmp_path / "prior").glob("*.safetensors"))
    fused = sum(v.numel() * v.element_size() for k, v in state.items() if k.endswith("in_proj_weight"))
    loaded = load_stage_c(tmp_path if layout == "official" else tmp_path / "prior", dtype=torch.bfloat16,
                          config={"nhead": [12, 12]})
    resident = sum(_mapped_resident_bytes(f) for f in files)
    # Reading a tensor maps the pages around its start (the kernel's fault-around, 64 KiB by default), however
    # small the tensor: allow 64 KiB per tensor for that, and a quarter of the fused weights.
    allowance = len(state) * (64 << 10) + fused // 4
    assert fused > allowance
    assert resident < allowance, f"{resident} bytes of the file stay mapped after the load (fused: {fused})"
    # and the loaded weights are the file's
    for name, tensor in official_state_dict(loaded).items():
        assert torch.equal(tensor, state[name]), name


def test_wrapper_prefix_is_stripped(tmp_path, stage_c):
    path = save_official(stage_c, tmp_path / "wrapped.safetensors", prefix="module.")
    assert torch.equal(run_c(load_stage_c(path, dtype=torch.float32)), run_c(stage_c))


def test_pickle_loads_only_with_allow_pickle(tmp_path, stage_c):
    path = tmp_path / "stage_c.ckpt"
    torch.save({"state_dict": official_state_dict(stage_c)}, path)
    with pytest.raises(WeightsError) as error:
        load_stage_c(path, dtype=torch.float32)
    message = str(error.value)
    assert str(path) in message and "allow_pickle=True" in message
    assert "model.allow_pickle: true" in message and "--allow-pickle" in message
    loaded = load_stage_c(path, dtype=torch.float32, allow_pickle=True)
    assert torch.equal(run_c(loaded), run_c(stage_c))


class NotATensor:
    pass


def test_pickle_with_arbitrary_objects_is_refused_even_when_allowed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": NotATensor()}, path)
    with pytest.raises(WeightsError, match="objects other than tensors"):
        load_stage_c(path, allow_pickle=True)


# ------------------------------------------------------------------------------------------- other stages


def test_stage_b_stage_a_previewer_and_effnet_round_trip(tmp_path, files):
    stage_b = randomize(build_stage_b(**TINY.stage_b))
    save_official(stage_b, tmp_path / "b.safetensors")
    x, r = torch.randn(2, 4, 16, 16), torch.rand(2)
    effnet, clip = torch.randn(2, 16, 4, 4), torch.randn(2, 1, 64)
    with torch.no_grad():
        assert torch.equal(load_stage_b(tmp_path / "b.safetensors", dtype=torch.float32)(x, r, effnet, clip),
                           stage_b(x, r, effnet, clip))

    stage_a = randomize(build_stage_a(**TINY.stage_a))
    latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = stage_a.decode(latent)
        loaded = load_stage_a(save_official(stage_a, tmp_path / "a.safetensors"))
        assert torch.equal(loaded.decode(latent), expected)

    previewer = randomize(build_previewer(**TINY.previewer))
    with torch.no_grad():
        loaded = load_previewer(save_official(previewer, tmp_path / "p.safetensors"))
        assert torch.equal(loaded(latent.repeat(1, 4, 1, 1)), previewer(latent.repeat(1, 4, 1, 1)))

    torch.manual_seed(3)
    effnet_encoder = randomize(build_effnet("tiny"))
    save_file({k: v.contiguous() for k, v in effnet_encoder.state_dict().items()}, str(tmp_path / "e.safetensors"))
    loaded = load_effnet(tmp_path / "e.safetensors")
    images = torch.rand(1, 3, 64, 64)
    assert torch.equal(loaded.encode(images), effnet_encoder.encode(images))
    assert loaded.identity == effnet_encoder.identity


def test_published_effnet_layout_loads_and_keeps_its_identity(tmp_path):
    torch.manual_seed(0)
    effnet = randomize(build_effnet("big")).to(torch.bfloat16)  # EfficientNetV2-S, official key names
    save_file({k: v.contiguous() for k, v in effnet.state_dict().items()}, str(tmp_path / "effnet_encoder.safetensors"))
    loaded = load_effnet(tmp_path, dtype=torch.bfloat16)  # the folder holds the published file name
    assert loaded.arch == "efficientnet_v2_s"
    assert loaded.identity == effnet.identity


def test_local_copy_of_the_official_repo_picks_files_by_name_and_dtype(files):
    folder = files["fp32"].parent  # stage_c.safetensors, stage_c_bf16.safetensors, stage_b.safetensors
    assert load_stage_c(folder).source_path == str(files["bf16"])
    assert load_stage_c(folder, dtype=torch.float32).source_path == str(files["fp32"])
    assert load_stage_b(folder, dtype=torch.float32).source_path == str(files["stage_b"])


def test_controlnet_width_must_match_the_base(tmp_path):
    controlnet = randomize(build_controlnet(c_in=3, c_proj=64, proj_blocks=TINY.controlnet_proj_blocks,
                                            bottleneck_mode="simple"))
    path = save_official(controlnet, tmp_path / "cnet.safetensors")
    loaded = load_controlnet(path, c_proj_expected=64, dtype=torch.float32)
    assert loaded.proj_blocks == list(TINY.controlnet_proj_blocks)  # taken from the preset of that width
    hint = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(loaded(hint), controlnet(hint)):
            assert (got is None and want is None) or torch.equal(got, want)
    with pytest.raises(WeightsError) as error:
        load_controlnet(path, c_proj_expected=48)
    assert "width 64" in str(error.value) and "width 48" in str(error.value) and str(path) in str(error.value)


def test_controlnet_with_unknown_injection_points_needs_proj_blocks(tmp_path):
    controlnet = build_controlnet(c_in=1, c_proj=40, proj_blocks=[0, 5, 7], bottleneck_mode="simple")
    path = save_official(randomize(controlnet), tmp_path / "cnet.safetensors")
    with pytest.raises(WeightsError, match="proj_blocks"):
        load_controlnet(path)
    assert load_controlnet(path, config={"proj_blocks": [0, 5, 7]}).proj_blocks == [0, 5, 7]


# ------------------------------------------------------------------------------------------- config detection


# Published configurations (STABLE_CASCADE.md sections 2 and 4).
PUBLISHED = {
    "stage_c_big": dict(c_hidden=[2048, 2048], nhead=[32, 32], blocks=[[8, 24], [24, 8]], c_cond=2048),
    "stage_c_lite": dict(c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]], c_cond=1536),
    "stage_b_big": dict(c_hidden=[320, 640, 1280, 1280], nhead=[-1, -1, 20, 20], blocks=[[2, 6, 28, 6], [6, 28, 6, 2]],
                        block_repeat=[[1, 1, 1, 1], [3, 3, 2, 2]], level_config=["CT", "CT", "CTA", "CTA"]),
    "stage_b_lite": dict(c_hidden=[320, 576, 1152, 1152], nhead=[-1, 9, 18, 18], blocks=[[2, 4, 14, 4], [4, 14, 4, 2]],
                         block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]], level_config=["CT", "CT", "CTA", "CTA"]),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_shapes_give_published_configs(name):
    reference = json.loads(REFERENCE.read_text())["keys"][name]
    shapes = {k: tuple(s) for k, s in reference}
    family = name.rsplit("_", 1)[0]
    assert detect_family(shapes) == family
    config = infer_config(family, shapes)
    assert {k: config[k] for k in PUBLISHED[name]} == PUBLISHED[name]
    if family == "stage_c":
        assert config["t_conds"] == ["sca", "crp"] and config["dropout"] == [0.1, 0.1]
    with torch.device("meta"):
        model = (build_stage_c if family == "stage_c" else build_stage_b)(**config)
    assert [[k, list(v.shape)] for k, v in official_state_dict(model).items()] == reference


@pytest.mark.parametrize("name,expected", [
    ("stage_a", dict(levels=2, c_hidden=384, bottleneck_blocks=12, c_latent=4, codebook_size=8192)),
    ("previewer", dict(c_in=16, c_hidden=512, c_out=3)),
    ("controlnet_canny", dict(c_in=1, c_proj=2048, bottleneck_mode="effnet")),
    ("controlnet_inpainting", dict(c_in=4, c_proj=2048, bottleneck_mode="effnet")),
    ("controlnet_sr_large", dict(c_in=16, c_proj=2048, bottleneck_mode="large")),
    ("effnet_encoder", dict(c_latent=16)),
])
def test_published_small_models_are_recognised(name, expected):
    shapes = {k: tuple(s) for k, s in json.loads(REFERENCE.read_text())["keys"][name]}
    family = detect_family(shapes)
    config = infer_config(family, shapes)
    assert {k: config[k] for k in expected} == expected
    if family == "controlnet":
        assert config["proj_blocks"] == [0, 4, 8, 12, 51, 55, 59, 63]


def test_arbitrary_tiny_config_is_detected_and_nhead_can_be_given(tmp_path):
    kwargs = dict(c_cond=48, c_hidden=[32, 48], nhead=[4, 4], blocks=[[1, 2], [2, 1]], c_clip_text=40,
                  c_clip_text_pooled=24, c_clip_img=16, c_r=32, t_conds=["sca"])
    model = randomize(build_stage_c(**kwargs))
    path = save_official(model, tmp_path / "odd.safetensors")
    shapes = {k: tuple(v.shape) for k, v in official_state_dict(model).items()}
    config = infer_config("stage_c", shapes)
    for key in ("c_cond", "c_hidden", "blocks", "c_clip_text", "c_clip_text_pooled", "c_clip_img", "c_r", "t_conds"):
        assert config[key] == kwargs[key], key
    assert config["nhead"] == [1, 1]  # not in the weights: head_dim-64 rule when no preset has these widths
    loaded = load_stage_c(path, dtype=torch.float32, config={"nhead": [4, 4]})
    inputs = (torch.randn(1, 16, 4, 4), torch.rand(1), torch.randn(1, 77, 40), torch.randn(1, 1, 24),
              torch.randn(1, 1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), model(*inputs))


# ------------------------------------------------------------------------------------------- diffusers folders


def to_diffusers(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Official -> diffusers names (the inverse of official.py's converter), written independently here."""
    out = {}
    for key, tensor in state.items():
        if ".attention.attn.in_proj_" in key:
            holder, leaf = key.split(".attention.attn.in_proj_")
            for name, part in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                out[f"{holder}.attention.{name}.{leaf}"] = part.contiguous()
        elif ".attention.attn.out_proj." in key:
            out[key.replace(".attention.attn.out_proj.", ".attention.to_out.0.")] = tensor
        elif family == "stage_b" and key.startswith("clip_mapper."):
            out[key.replace("clip_mapper.", "clip_txt_pooled_mapper.")] = tensor
        else:
            out[key] = tensor
    return out


def write_diffusers(folder: Path, state: dict[str, torch.Tensor], config: dict, shards: int = 1, variant: str = ""):
    """A diffusers model folder, sharded with an index json when shards > 1."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "StableCascadeUNet", **config}))
    tag = f".{variant}" if variant else ""
    if shards == 1:
        save_file(state, str(folder / f"diffusion_pytorch_model{tag}.safetensors"))
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model{tag}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    index = f"diffusion_pytorch_model.safetensors.index{tag}.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


TINY_C_DIFFUSERS_CONFIG = {"num_attention_heads": [2, 2], "dropout": [0.1, 0.1], "self_attn": True,
                           "timestep_conditioning_type": ["sca", "crp"], "switch_level": [False],
                           "block_out_channels": [64, 64]}


def test_diffusers_prior_folders_sharded_and_variants(tmp_path, stage_c):
    state = to_diffusers(official_state_dict(stage_c), "stage_c")
    write_diffusers(tmp_path / "prior", state, TINY_C_DIFFUSERS_CONFIG, shards=3)
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    write_diffusers(tmp_path / "prior", bf16, TINY_C_DIFFUSERS_CONFIG, shards=2, variant="bf16")
    fp32 = load_stage_c(tmp_path, dtype=torch.float32)  # root folder -> prior/ -> fp32 shards
    assert torch.equal(run_c(fp32), run_c(stage_c))
    assert fp32.source_path == str(tmp_path / "prior")
    as_bf16 = load_stage_c(tmp_path / "prior")  # bf16 requested -> the bf16 variant shards
    assert torch.equal(as_bf16.state_dict()["clf.1.weight"], stage_c.state_dict()["clf.1.weight"].bfloat16())


def test_diffusers_lite_folder_chosen_by_variant(tmp_path, stage_c):
    write_diffusers(tmp_path / "prior_lite", to_diffusers(official_state_dict(stage_c), "stage_c"),
                    TINY_C_DIFFUSERS_CONFIG)
    loaded = load_stage_c(tmp_path, dtype=torch.float32, variant="lite")
    assert torch.equal(run_c(loaded), run_c(stage_c))
    with pytest.raises(WeightsError, match="prior/"):
        load_stage_c(tmp_path, variant="big")


def test_diffusers_decoder_folder(tmp_path):
    stage_b = randomize(build_stage_b(**TINY.stage_b))
    write_diffusers(tmp_path / "decoder", to_diffusers(official_state_dict(stage_b), "stage_b"),
                    {"num_attention_heads": [-1, -1, 2, 2], "clip_seq": 4})
    loaded = load_stage_b(tmp_path, dtype=torch.float32)
    x, r, effnet, clip = torch.randn(1, 4, 16, 16), torch.rand(1), torch.randn(1, 16, 4, 4), torch.randn(1, 1, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x, r, effnet, clip), stage_b(x, r, effnet, clip))


@pytest.mark.slow
def test_real_diffusers_unet_files_load_with_the_same_outputs(tmp_path):
    """Files written by diffusers itself (its names, shards and variant naming) give diffusers' outputs."""
    from diffusers import StableCascadeUNet

    cta = ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")
    unet = StableCascadeUNet(
        conditioning_dim=64, block_out_channels=(64, 64), num_attention_heads=(2, 2),
        down_num_layers_per_block=(2, 4), up_num_layers_per_block=(4, 2), block_types_per_layer=(cta, cta),
        clip_text_in_channels=64, clip_text_pooled_in_channels=64, clip_image_in_channels=32,
        switch_level=(False,),
    )
    randomize(unet)
    unet.save_pretrained(tmp_path / "prior", max_shard_size="300KB")
    loaded = load_stage_c(tmp_path, dtype=torch.float32)
    x, r, text, pooled, image = stage_c_inputs()
    with torch.no_grad():
        expected = unet(x, r, clip_text_pooled=pooled, clip_text=text, clip_img=image).sample
        torch.testing.assert_close(loaded(x, r, text, pooled, image), expected, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------- the hub cache


def fake_hub(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """The huggingface_hub cache layout: models--org--name/snapshots/<commit>/... plus refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, snapshot / name)
        else:
            shutil.copy(source, snapshot / name)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_official_repo_id_from_the_cache(tmp_path, files, stage_c, offline):
    fake_hub(tmp_path, "stabilityai/stable-cascade", {"stage_c_bf16.safetensors": files["bf16"],
                                                      "stage_c.safetensors": files["fp32"]})
    loaded = load_stage_c("stabilityai/stable-cascade", cache_dir=tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.source_path.endswith("stage_c_bf16.safetensors")
    fp32 = load_stage_c("stabilityai/stable-cascade", dtype=torch.float32, cache_dir=tmp_path)
    assert fp32.source_path.endswith("stage_c.safetensors")
    assert torch.equal(run_c(fp32), run_c(stage_c))
    with pytest.raises(WeightsError) as error:
        load_stage_c("stabilityai/stable-cascade", variant="lite", cache_dir=tmp_path)
    # huggingface_hub installs the `hf` command (huggingface-cli is deprecated)
    assert "`hf download stabilityai/stable-cascade stage_c_lite_bf16.safetensors`" in str(error.value)


def test_prior_repo_id_from_the_cache(tmp_path, stage_c, offline):
    source = tmp_path / "src"
    write_diffusers(source / "prior_lite", to_diffusers(official_state_dict(stage_c), "stage_c"),
                    TINY_C_DIFFUSERS_CONFIG)
    cache = tmp_path / "cache"
    fake_hub(cache, "stabilityai/stable-cascade-prior", {"prior_lite": source / "prior_lite"})
    loaded = load_stage_c("stabilityai/stable-cascade-prior", dtype=torch.float32, variant="lite", cache_dir=cache)
    assert torch.equal(run_c(loaded), run_c(stage_c))


def test_repo_without_the_model_names_the_repo_and_the_model_not_the_snapshot(tmp_path, files, offline):
    """The official repo in the cache holds no OpenCLIP ViT-H: the message names the repo and what the IP-Adapter
    encoder needs, not huggingface_hub's snapshot folder."""
    fake_hub(tmp_path, "stabilityai/stable-cascade", {"stage_c_bf16.safetensors": files["bf16"]})
    with pytest.raises(WeightsError) as error:
        load_ip_image_encoder("openclip-vit-h-14", "stabilityai/stable-cascade", cache_dir=tmp_path)
    message = str(error.value)
    assert message.startswith("stabilityai/stable-cascade (stage_c_bf16.safetensors):"), message
    assert "OpenCLIP ViT-H-14" in message and "laion/CLIP-ViT-H-14" in message
    assert "snapshots" not in message, message


def test_local_only_never_downloads_and_says_what_to_fetch(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(loading.WeightsNotCached) as error:
        loading.resolve_weights("stage_c", "stabilityai/stable-cascade", "lite", cache_dir=tmp_path, local_only=True)
    assert "hf download stabilityai/stable-cascade stage_c_lite_bf16.safetensors" in str(error.value)


def test_uncached_repo_offline_says_how_to_download(tmp_path, offline):
    with pytest.raises(WeightsError) as error:
        load_stage_c("someone/missing-model", cache_dir=tmp_path)
    assert "someone/missing-model" in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)


# ---------------------------------------------------------------------------------------------- CLIP towers


def _tiny_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text_encoder_config("tiny").to_dict(),
                        vision_config=image_encoder_config("tiny").to_dict(), projection_dim=32)
    return CLIPModel(config).eval()


def test_text_and_image_encoders_from_transformers_folders(tmp_path):
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    text = CLIPTextModelWithProjection(text_encoder_config("tiny", eos_token_id=2)).eval()  # as old exports say
    text.save_pretrained(tmp_path / "text_encoder")
    vision = CLIPVisionModelWithProjection(image_encoder_config("tiny")).eval()
    vision.save_pretrained(tmp_path / "image_encoder")

    encoder = load_text_encoder(tmp_path, dtype=torch.float32)  # finds text_encoder/
    hidden, pooled = encoder.encode(["a photo of a cat"])
    from cascade_studio.models.encoders import TextEncoder

    reference = TextEncoder(text)
    expected_hidden, expected_pooled = reference.encode(["a photo of a cat"])
    assert torch.equal(hidden, expected_hidden) and torch.equal(pooled, expected_pooled)

    image_encoder = load_image_encoder(tmp_path, dtype=torch.float32)
    images = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        expected = vision(pixel_values=image_encoder.preprocess(images)).image_embeds
    assert torch.equal(image_encoder.encode(images)[:, 0], expected)


def test_both_towers_from_one_full_clip_file(tmp_path):
    clip = _tiny_clip()
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    # Older transformers versions saved these buffers; they are not weights and must not fail the load.
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(state, str(tmp_path / "clip.safetensors"))
    text = load_text_encoder(tmp_path / "clip.safetensors", dtype=torch.float32)
    assert (text.hidden_size, text.embed_dim) == (64, 32)
    ids, mask = text.tokenize(["a cat"])
    with torch.no_grad():
        pooled = clip.text_model(input_ids=ids, attention_mask=mask).pooler_output
        # the same weights through a different module path: equal up to float rounding (which differs by CPU)
        torch.testing.assert_close(text.encode(["a cat"])[1][:, 0], clip.text_projection(pooled),
                                   rtol=1e-5, atol=1e-5)
    image = load_image_encoder(tmp_path / "clip.safetensors", dtype=torch.float32)
    assert image.embed_dim == 32 and image.image_size == 32


def test_open_clip_ip_image_encoder(tmp_path):
    torch.manual_seed(0)
    encoder = build_ip_image_encoder("tiny")
    state = {f"visual.{k}": v.contiguous() for k, v in encoder.visual.state_dict().items()}
    state["text_projection"] = torch.zeros(32, 32)  # a full OpenCLIP file also holds the text tower: ignored
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    loaded = load_ip_image_encoder("tiny", tmp_path / "open_clip_model.safetensors", dtype=torch.float32)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(images), encoder.encode(images))
    assert loaded.identity == encoder.identity


# --------------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="file not found") as error:
        load_stage_c(tmp_path / "nope.safetensors")
    assert str(tmp_path / "nope.safetensors") in str(error.value)


def test_truncated_file(tmp_path, files):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(files["fp32"].read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="truncated") as error:
        load_stage_c(path)
    assert str(path) in str(error.value) and "re-download" in str(error.value)


def test_header_length_beyond_file_size(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    with pytest.raises(WeightsError, match="header claims 10000 bytes"):
        load_stage_c(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError, match="not a safetensors file|not valid safetensors JSON"):
        load_stage_c(path)
    path.write_bytes(struct.pack("<Q", 16) + os.urandom(200))  # plausible length, garbage header
    with pytest.raises(WeightsError, match="not valid safetensors JSON"):
        load_stage_c(path)


def test_missing_and_unexpected_keys(tmp_path, stage_c):
    state = {k: v.contiguous() for k, v in official_state_dict(stage_c).items()}
    dropped = [k for k in state if k.startswith("up_blocks.0.0.channelwise.")][:3]
    for key in dropped:
        del state[key]
    state.update({f"extra.{i}": torch.zeros(1) for i in range(7)})
    save_file(state, str(tmp_path / "holes.safetensors"))
    with pytest.raises(WeightsError) as error:
        load_stage_c(tmp_path / "holes.safetensors")
    message = str(error.value)
    assert "3 missing keys" in message and dropped[0] in message
    assert "7 unexpected keys" in message and "extra.0" in message and "and 2 more" in message


def test_shape_mismatch(tmp_path, stage_c):
    state = {k: v.contiguous() for k, v in official_state_dict(stage_c).items()}
    state["clip_txt_mapper.bias"] = torch.zeros(63)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(WeightsError, match=r"clip_txt_mapper.bias \(file \[63\] vs model \[64\]\)"):
        load_stage_c(tmp_path / "shape.safetensors")


def test_wrong_family_names_what_it_looks_like(files, tmp_path):
    with pytest.raises(WeightsError, match="expected a Stage C .* look like a Stage B"):
        load_stage_c(files["stage_b"])
    with pytest.raises(WeightsError, match="expected a Stage B .* look like a Stage C"):
        load_stage_b(files["fp32"])
    save_file({"lora_unet_down_blocks_0_2_attention_attn_to_q.lora_down.weight": torch.zeros(4, 64)},
              str(tmp_path / "lora.safetensors"))
    with pytest.raises(WeightsError, match="LoRA adapter"):
        load_stage_c(tmp_path / "lora.safetensors")
    with pytest.raises(WeightsError, match="CLIP text encoder"):
        load_text_encoder(files["fp32"])


def test_folder_without_weights_and_unknown_variant(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="found no weights for a Stage C"):
        load_stage_c(tmp_path / "empty")
    with pytest.raises(WeightsError, match="unknown variant"):
        load_stage_c(tmp_path / "empty", variant="huge")


def test_fingerprint_is_content_based_and_cheap_to_compute(tmp_path, files, stage_c):
    copy = tmp_path / "copy.safetensors"
    shutil.copy(files["fp32"], copy)
    assert weights_fingerprint(copy) == weights_fingerprint(files["fp32"])
    assert len(weights_fingerprint(copy)) == 64
    retrained = randomize(build_stage_c(**TINY.stage_c), seed=7)  # same architecture, same header
    other = save_official(retrained, tmp_path / "other.safetensors")
    assert other.stat().st_size == files["fp32"].stat().st_size
    assert weights_fingerprint(other) != weights_fingerprint(files["fp32"])
    assert weights_fingerprint(files["bf16"]) != weights_fingerprint(files["fp32"])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(WeightsError):
        weights_fingerprint(garbage)
