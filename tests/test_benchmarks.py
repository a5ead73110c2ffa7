"""The benchmark scripts' own helpers: RESULTS.md sections written by several scripts, FLOP counting, and the LCM
benchmark's target judgement (the timings themselves live in `make bench`, not in tests)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
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
