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


def test_renamed_weights_give_diffusers_the_same_denoiser_at_tiny_size():
    import bench_generate
    from cascade_studio.inference.pipeline import initial_noise

    cfg, _, side, _, _ = bench_generate.SIZES["tiny"]
    ours, theirs = bench_generate.build_pair(cfg)
    assert not torch.equal(ours.state_dict()["clf.1.weight"], torch.zeros_like(ours.state_dict()["clf.1.weight"]))
    text, _ = bench_generate.inputs_for(cfg, side)
    noise = initial_noise((1, 16, side, side), 0)
    assert bench_generate.denoiser_difference(ours, theirs, text, noise) <= 1e-5
    # ... and the check can fail: one renamed tensor off by a little is seen
    with torch.no_grad():
        theirs.down_blocks[0][2].attention.to_v.weight.mul_(1.01)
    assert bench_generate.denoiser_difference(ours, theirs, text, noise) > 1e-5


def test_weight_renaming_is_the_inverse_of_the_library_converter():
    import bench_generate
    from cascade_studio.models import build_stage_c, convert_diffusers_stage_c_keys, official_state_dict

    ours = build_stage_c(**bench_generate.SIZES["tiny"][0])
    renamed = bench_generate.studio_to_diffusers(ours.state_dict())
    assert "down_blocks.0.2.attention.to_out.0.weight" in renamed and not any(".attn." in k for k in renamed)
    official = official_state_dict(ours)
    back = convert_diffusers_stage_c_keys(renamed)
    assert set(back) == set(official) and all(torch.equal(back[k], official[k]) for k in official)


def test_aligned_timesteps_are_our_noise_levels_then_zero():
    import bench_generate

    grid = bench_generate.aligned_timesteps(20)
    assert grid.shape == (21,) and grid[-1] == 0
    assert 0.99 < grid[0] < 1.0  # the variance clamp: r is not 1 at t = 1
    torch.testing.assert_close(grid[1:-1], torch.linspace(1, 0, 21)[1:-1], atol=1e-4, rtol=0)
