"""On a machine with an NVIDIA GPU: the GPU-readiness checks, run on the GPU.

Runs, with the models on ``cuda``:

* the ``cuda``-marked tests: every shipped recipe (cache, training step, held-out evaluation, preview,
  checkpoint, export; three resumed), one host read per optimizer step, and ``generate`` / ``compare`` through
  every adapter kind (``tests/test_device_dry_run.py``, the same tests that run on the meta device in CI);
* the published recipes' training settings on the tiny model (``tests/test_published_settings.py``: bf16, batch 1
  with accumulation, dropouts, offset noise, 8-bit optimizers, quantized bases, resume), which accelerate puts on
  the GPU by itself.

Prints the device, then pytest's result; exits with pytest's code. Without a GPU it says so and exits 0.

    .venv/bin/python benchmarks/gpu_check.py [extra pytest arguments]
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check. "
              "CI runs the same paths on the meta device (tests/test_device_dry_run.py).")
        return 0
    props = torch.cuda.get_device_properties(0)
    print(f"gpu_check: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
          f"{props.major}.{props.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}, "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MLFLOW_ENABLE_ASYNC_LOGGING="false")
    command = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "-ra",
               "tests/test_device_dry_run.py", "tests/test_published_settings.py", "tests/test_gpu_ready.py",
               "tests/test_gpu_ready_ip_quant.py", "-m", "cuda or not cuda", "-k", "not meta", *argv]
    return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
