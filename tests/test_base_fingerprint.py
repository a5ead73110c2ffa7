"""An adapter records the fingerprint of the base it was trained on, computed from the weights themselves, and
loading it on a base with other weights is refused (``--force`` overrides): a toy-trained LoRA on ``tiny`` used to
load without a word."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade_studio.adapters.base import AdaptedStageC, AdapterMismatchError
from cascade_studio.adapters.lora.config import LoraConfig
from cascade_studio.adapters.registry import AdapterContext, load_adapter
from cascade_studio.models.identity import weights_identity
from cascade_studio.models.random_init import build_random
from cascade_studio.models.toy import load_toy_component

REPO = Path(__file__).resolve().parents[1]


def test_the_fingerprint_follows_the_weights_not_their_precision_or_source():
    tiny = build_random("stage_c", "tiny")
    toy = load_toy_component("stage_c")
    assert weights_identity(tiny).startswith("w1-")
    assert weights_identity(tiny) == weights_identity(build_random("stage_c", "tiny"))  # seeded: every build
    assert weights_identity(tiny) != weights_identity(toy)  # same architecture, other weights
    # A bf16 copy (training on a GPU) and the fp32 original (generating on a CPU) are one base.
    assert weights_identity(toy.to(torch.bfloat16)) == weights_identity(load_toy_component("stage_c"))
    nudged = build_random("stage_c", "tiny")
    with torch.no_grad():
        nudged.clf[1].weight.add_(0.01)  # a fine-tune moves values: another base
    assert weights_identity(nudged) != weights_identity(tiny)
    with torch.device("meta"):
        skeleton = build_random("stage_c", "tiny").to("meta")
    assert weights_identity(skeleton) == "meta"


def test_the_fingerprint_is_the_same_in_a_fresh_process():
    code = ("from cascade_studio.models.identity import weights_identity; "
            "from cascade_studio.models.toy import load_toy_component; "
            "print(weights_identity(load_toy_component('stage_c')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == weights_identity(load_toy_component("stage_c"))


@pytest.fixture(scope="module")
def toy_lora(tmp_path_factory) -> Path:
    """A LoRA file made on the toy base the way a run makes it (context with the base's fingerprint)."""
    from cascade_studio.adapters.lora import create_adapter, export_adapter

    stage_c = load_toy_component("stage_c")
    model = AdaptedStageC(stage_c)
    context = AdapterContext(preset="toy", base_fingerprint=weights_identity(stage_c),
                             stage_c_config={"c_hidden": [64, 64]})
    torch.manual_seed(0)
    adapter = create_adapter(LoraConfig(rank=2, alpha=2.0, init_weights=False), model, context)
    return export_adapter(adapter, tmp_path_factory.mktemp("lora") / "toy-style.safetensors", "comfyui")


def test_an_adapter_trained_on_toy_is_refused_on_tiny_naming_both_bases(toy_lora):
    tiny = build_random("stage_c", "tiny")
    model = AdaptedStageC(tiny)
    context = AdapterContext(preset="tiny", base_fingerprint=weights_identity(tiny),
                             stage_c_config={"c_hidden": [64, 64]})
    with pytest.raises(AdapterMismatchError) as caught:
        load_adapter(toy_lora, model, context)
    message = str(caught.value)
    assert "trained on toy" in message and "this base is tiny" in message and "--force" in message
    assert weights_identity(tiny) in message and weights_identity(load_toy_component("stage_c")) in message
    assert not model.enabled  # nothing was attached
    load_adapter(toy_lora, model, context, force=True)  # the explicit override
    toy = load_toy_component("stage_c")
    load_adapter(toy_lora, AdaptedStageC(toy), AdapterContext(preset="toy", base_fingerprint=weights_identity(toy),
                                                              stage_c_config={"c_hidden": [64, 64]}))


def _generate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cascade_studio.cli", "generate", "--preview", "--steps", "2",
                           "--prompt", "a large red circle", "--out", str(tmp_path / "out.png"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_generate_refuses_a_toy_lora_on_tiny_and_force_overrides(toy_lora, tmp_path):
    refused = _generate(tmp_path, "--preset", "tiny", "--lora", str(toy_lora))
    assert refused.returncode != 0
    assert "trained on toy" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert ".." not in refused.stderr  # one full stop where the file's message and the advice meet
    assert _generate(tmp_path, "--preset", "toy", "--lora", str(toy_lora)).returncode == 0
    assert _generate(tmp_path, "--preset", "tiny", "--lora", str(toy_lora), "--force").returncode == 0
