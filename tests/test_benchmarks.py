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


def test_growth_points_cover_both_sweeps_once():
    from bench_growth import BATCH_SIDE, BATCHES, SIDE_BATCH, SIDES, growth_points

    points = growth_points()
    assert len(points) == len(set(points))
    assert {(b, BATCH_SIDE) for b in BATCHES} | {(SIDE_BATCH, s) for s in SIDES} == set(points)


def test_data_wait_share_leaves_out_the_start_up_batch():
    from bench_growth import data_wait_share

    assert data_wait_share([5.0, 0.1, 0.3], [1.0, 0.9, 0.7]) == 0.4 / 2.0


def test_growth_tables_are_relative_to_the_smallest_point_and_judge_the_wait_target():
    from bench_growth import render

    steps = [{"batch": b, "side": s, "step_s": t, "tensor_peak": m * 2**20}
             for b, s, t, m in [(1, 24, 1.0, 100), (2, 24, 1.8, 150), (4, 24, 4.0, 300), (2, 16, 0.9, 120),
                                (2, 32, 3.6, 240)]]
    data = [{"items": n, "workers": 0, "write_s": 0.1, "read_epoch_s": 0.2, "steps": 25, "epoch_steps": 25,
             "startup_s": 0.01, "median_wait_ms": 1.0, "median_step_ms": 100.0, "wait_share": share,
             "epoch_s": 2.5, "epoch_measured": True} for n, share in [(100, 0.01), (10_000, 0.07)]]
    text = render(steps, data, "test machine", "python benchmarks/bench_growth.py")
    assert "| 4 | 4.000 | 4.00 | 300 | 3.00 |" in text  # batch sweep, against batch 1
    assert "| 32 | 3.600 | 4.00 | 240 | 2.00 |" in text  # side sweep, against side 16 (batch 2)
    assert "NOT met (worst 7.0% at 10,000 items, 0 workers)" in text
    assert "data wait < 5% of step time at every size: met" in render(steps, data[:1], "m", "c")


def test_cache_items_written_in_the_shard_format_read_back_through_the_loop(tmp_path):
    from bench_growth import write_cache

    from cascade_studio.trainers.loop import InfiniteSampler, batch_stream

    dataset = write_cache(tmp_path, 5, side=4, text=8)
    assert list((tmp_path / "shards").glob("shard-*.json"))  # the cache's own on-disk layout
    stream = batch_stream(dataset, InfiniteSampler(5, 2, seed=0), {}, 0, pin_memory=False)
    batch = next(stream)
    stream.close()
    assert batch["latents"].shape == (2, 16, 4, 4) and batch["clip_text"].shape == (2, 77, 8)
    assert batch["latents"].std() > 0.5  # random features, not zeros


def test_plan_bench_plans_every_shipped_recipe_and_judges_each_method_on_its_worst_case(monkeypatch):
    """bench_plan.py's recipe table has one row per recipe file of every method, and its per-method error line
    is the worst of that method's rows (a case with a large error must show there)."""
    import bench_plan
    from cascade_studio.adapters import catalog

    recipes = bench_plan.plan_recipes()
    assert [r["recipe"] for r in recipes] == [str(p.relative_to(bench_plan.REPO / "recipes"))
                                             for p in bench_plan.shipped_recipes()]
    assert {r["method"] for r in recipes} == {m.label for m in catalog.methods()}
    assert all(r["peak_gib"] > 0 for r in recipes)
    checks = [{"case": "a", "method": "lora", "dtype": "fp32", "autocast": "no", "checkpointing": "none",
               "predicted": 2 ** 20, "measured": 2 ** 20, "total": 1.02, "rise": 0.9, "resident_exact": True},
              {"case": "b", "method": "lora", "dtype": "fp32", "autocast": "no", "checkpointing": "blocks",
               "predicted": 2 ** 20, "measured": 2 ** 20, "total": 0.7, "rise": 1.1, "resident_exact": True}]
    text = bench_plan.render(recipes, checks, "about")
    assert "| lora | 2 | 30% | 10% | yes |" in text
