"""The user's training command on the tiny LoRA recipe in a fresh process, and the comparison of two exported
adapters that must be the same training (tests/test_compile.py, tests/test_selective_checkpointing.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from cascade_studio.run_folder import RunFolder
from tests.subprocess_env import child_env

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("cascade-studio"))
TINY_LORA = REPO / "recipes" / "tiny" / "lora.yaml"


def train_tiny_lora(workspace: Path, name: str, *overrides: str) -> tuple[str, dict[str, torch.Tensor]]:
    """``cascade-studio train recipes/tiny/lora.yaml`` for 3 steps (no previews, tracking or checkpoints) with
    ``overrides``: its stdout and the exported adapter's tensors."""
    proc = subprocess.run(
        [CLI, "train", str(TINY_LORA), f"name={name}", f"workspace={workspace}", "train.max_steps=3",
         "train.log_every=1", "train.checkpoint_every=0", "preview.every=0", "tracking.enabled=false", *overrides,
         "--no-progress"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    files = RunFolder(workspace / "runs" / name).exported_adapters()
    assert files, f"no adapter exported for {name}"
    return proc.stdout, load_file(files[0])


def assert_same_training(trained: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Two adapters trained by the same maths: equal to a twentieth of the recipe's learning rate."""
    lr = yaml.safe_load(TINY_LORA.read_text())["optimizer"]["lr"]
    assert trained.keys() == reference.keys()
    for key in reference:
        # Adam divides by the gradient's magnitude, so float-rounding differences of ~1e-7 in a near-zero gradient
        # move an element by up to ~1% of a step (4.6e-5 measured at lr 3e-3); a wrong graph moves whole steps.
        assert torch.allclose(trained[key], reference[key], rtol=0, atol=0.05 * lr), key
