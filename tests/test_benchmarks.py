"""The benchmark scripts' own helpers: RESULTS.md sections written by several scripts, FLOP counting, and the LCM
benchmark's target judgement (the timings themselves live in `make bench`, not in tests)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.subprocess_env import child_env

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from bench_lcm import render  # noqa: E402
from flops import count_flops  # noqa: E402
from results import write_section  # noqa: E402


def test_each_script_rewrites_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section("lora", "## LoRA\nold numbers", path)
    write_section("lcm", "## LCM\n0.113", path)
    write_section("lora", "## LoRA\nnew numbers", path)
    text = path.read_text()
    assert "new numbers" in text and "old numbers" not in text and "0.113" in text
    assert text.index("## LoRA") < text.index("## LCM")  # a rewritten section keeps its place


def test_flops_of_a_linear_layer_forward_and_backward():
    layer = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    forward = 2 * 8 * 32 * 16
    assert count_flops(lambda: layer(x)) == forward
    # backward: the input gradient and the weight gradient, one matmul each
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * forward


def test_the_lcm_target_is_judged_on_each_row():
    rows = [{"preset": "tiny", "batch": 1, "guided_s": 1.0, "lcm_s": 0.25, "ratio": 0.25, "merged_s": 0.2,
             "merged_ratio": 0.2},
            {"preset": "mid", "batch": 1, "guided_s": 10.0, "lcm_s": 1.1, "ratio": 0.11, "merged_s": float("nan"),
             "merged_ratio": float("nan")}]
    text = render(rows, "test machine", "python benchmarks/bench_lcm.py")
    assert "met on mid." in text and "| mid | 1 | 10.0000 | 1.1000 | 0.110 | - | - |" in text


@pytest.mark.slow  # about 20 s: two tiny training steps, one through bitsandbytes' NF4 on the CPU
def test_gpu_check_runs_its_benchmark_on_the_cpu_and_the_planner_predicts_it():
    """benchmarks/gpu_check.py in a fresh process, as a user without a GPU runs it: one table, the tiny LoRA step
    with the base in bf16 and in NF4, each with its measured peak and the planner's prediction within 25%."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--steps", "1"], capture_output=True,
                          text=True, timeout=600, env=child_env())
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| tiny |")]
    assert [r[2].strip() for r in rows] == ["bf16", "nf4"]
    for row in rows:
        measured, predicted, ratio = float(row[4]), float(row[5]), float(row[6])
        assert measured > 0 and 0.75 <= ratio <= 1.25, row
