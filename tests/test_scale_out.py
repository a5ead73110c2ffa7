"""Launching at any size (issue 21): the shipped accelerate configs, `cascade-studio train --accelerate-config` and
`accelerate launch --config_file`, the global batch and data order said and recorded at start, only the main
process writing, FSDP (frozen Stage C sharded) training the same adapter as DDP, and the sharded cache.

Two 2-process runs over gloo are shared by the module: DDP started by `accelerate launch --config_file
cpu-2proc.yaml` (filling a cache with `cache.mode=sharded`), then FSDP started by `cascade-studio train
--accelerate-config fsdp --processes 2` on the same cache.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade_studio.launch import free_port, shipped_configs
from cascade_studio.trainers.events import read_events
from subprocess_env import child_env

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "lora.yaml")
DATA = REPO / "datasets" / "tiny-shapes"
CLI = str(Path(sys.executable).with_name("cascade-studio"))
STEPS = 4


def _shards(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((cache / "shards").iterdir())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    cache = root / "shared-cache"
    common = [f"data.path={DATA}", f"workspace={root / 'ws'}", f"train.max_steps={STEPS}", "train.checkpoint_every=2",
              "train.batch_size=2", "train.grad_accum=2",
              "cache.mode=sharded", f"cache.dir={cache}"]
    env = child_env()
    env.pop("ACCELERATE_USE_CPU", None)  # the run itself must find the CPU and use gloo
    ddp = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(shipped_configs()["cpu-2proc"]), "--main_process_port", str(free_port()),
                          "-m", "cascade_studio.train", RECIPE, *common,
                          "name=ddp", "preview.every=4", "--no-progress"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    shards_after_ddp = _shards(cache)
    fsdp = subprocess.run([CLI, "train", "--accelerate-config", "fsdp", "--processes", "2", RECIPE, *common,
                           "name=fsdp", "preview.every=0", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert fsdp.returncode == 0, fsdp.stdout + fsdp.stderr
    return {"root": root, "cache": cache, "ddp": ddp, "fsdp": fsdp, "shards_after_ddp": shards_after_ddp,
            "ws": root / "ws"}


def _adapter(runs, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(runs["ws"] / "runs" / name / "export" / f"{name}-comfyui.safetensors"))


@pytest.mark.slow
def test_fsdp_run_trains_the_same_adapter_as_ddp_with_the_base_sharded(runs):
    ddp, fsdp = _adapter(runs, "ddp"), _adapter(runs, "fsdp")
    assert ddp.keys() == fsdp.keys()
    assert max(float(v.abs().max()) for k, v in ddp.items() if "lora_up" in k) > 1e-3  # it trained
    diff = max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp)
    assert diff <= 1e-5, diff
    out = runs["fsdp"].stdout
    held, whole = map(float, re.search(r"sharded over 2 processes \(this one holds ([\d.]+) of its ([\d.]+) MiB",
                                       out).groups())
    assert whole > 1 and abs(held / whole - 0.5) < 0.02  # each process holds half the frozen weights
    assert "sharded over" not in runs["ddp"].stdout


@pytest.mark.slow
def test_sharded_cache_of_two_processes_equals_one_process_build_and_is_reused(runs, tmp_path):
    from cascade_studio.config import load_recipe
    from cascade_studio.data import build_cache, read_cache, scan_source, training_preprocessing
    from cascade_studio.run import split_holdout
    from cascade_studio.trainers.components import BaseModels
    from cascade_studio.trainers.features import base_feature_encoders

    # both processes encoded a share of the entries (the main one prints each process's count)
    counts = re.search(r"cache \(sharded\) \S+: (\d+) entries encoded \((\d+) \+ (\d+) by process\)",
                       runs["ddp"].stdout)
    assert counts, runs["ddp"].stdout
    total, first, second = map(int, counts.groups())
    assert first > 0 and second > 0 and first + second == total

    # the same records built by one process, as a one-process run builds them
    recipe = load_recipe(RECIPE, overrides=[f"data.path={DATA}"])
    train_records, holdout_records = split_holdout(list(scan_source(recipe.data).records),
                                                   recipe.data.holdout_fraction)
    encoders = base_feature_encoders(BaseModels(recipe.model))
    for records in (train_records, holdout_records):
        build_cache(records, encoders, tmp_path / "one", training_preprocessing(recipe.data), progress=False)
    one, two = read_cache(tmp_path / "one"), read_cache(runs["cache"])
    assert len(one) == total == 24 + 1  # every image and the empty caption
    assert one.keys() == two.keys()
    for key, features in one.items():
        assert features.keys() == two[key].keys()
        for name, tensor in features.items():
            assert torch.equal(tensor, two[key][name]), (key, name)

    # the second run (FSDP, same cache) encoded nothing and wrote no shard
    assert "cache (sharded) " in runs["fsdp"].stdout
    assert re.search(r"cache \(sharded\) \S+: 0 entries encoded \(0 \+ 0 by process\)", runs["fsdp"].stdout)
    assert _shards(runs["cache"]) == runs["shards_after_ddp"]


@pytest.mark.slow
def test_only_the_main_process_logs_previews_checkpoints_and_exports_and_the_batch_plan_is_recorded(runs):
    from cascade_studio.tracking import list_runs

    out = runs["ddp"].stdout
    plan = (f"global batch 8 = 2 per device x 2 process(es) x 2 accumulation; schedule {STEPS} optimizer steps = 32 "
            "samples")
    for line in (plan, "run folder:", "MLflow run", "held-out loss", "adapter:", "trainable parameters"):
        assert out.count(line) == 1, (line, out)
    run_dir = runs["ws"] / "runs" / "ddp"
    events = read_events(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds.count("started") == kinds.count("exported") == kinds.count("finished") == 1
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4]
    assert [e["step"] for e in events if e["event"] == "preview"] == [4]
    assert [p.name for p in (run_dir / "export").iterdir()] == ["ddp-comfyui.safetensors"]
    [batch_plan] = [e for e in events if e["event"] == "batch_plan"]
    assert batch_plan["global_batch"] == 8 and batch_plan["data_order"] == "seed=42/world_size=2"
    mlflow_runs = {r["run_name"]: r for r in list_runs(f"sqlite:///{runs['ws'] / 'mlflow.db'}", "cascade-studio")}
    assert sorted(mlflow_runs) == ["ddp", "fsdp"]  # one MLflow run per training run, not one per process
    params = mlflow_runs["ddp"]["params"]
    assert (params["global_batch"], params["schedule_samples"], params["processes"], params["data_order"]) == \
        ("8", "32", "2", "seed=42/world_size=2")


# ------------------------------------------------------------------------------------------ fast checks
def test_a_global_batch_is_the_same_samples_at_every_world_size():
    """The data order is a function of (seed, world size): the processes' slices of each step make up the batch
    one process with the same global batch takes."""
    from cascade_studio.trainers.loop import BatchPlan, InfiniteSampler

    one = InfiniteSampler(10, 4, seed=3)
    two = [InfiniteSampler(10, 2, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for _ in range(7):  # crosses epochs
        assert one.next_batch() == two[0].next_batch() + two[1].next_batch()
    assert InfiniteSampler(10, 4, seed=4).next_batch() != InfiniteSampler(10, 4, seed=3).next_batch()
    a = BatchPlan(per_device_batch=4, processes=1, grad_accum=2, max_steps=100, seed=3, train_samples=50)
    b = BatchPlan(per_device_batch=2, processes=4, grad_accum=1, max_steps=100, seed=3, train_samples=50)
    assert a.global_batch == b.global_batch == 8 and a.samples == b.samples == 800
    assert (a.data_order, b.data_order) == ("seed=3/world_size=1", "seed=3/world_size=4")


def test_shipped_configs_are_the_sizes_the_readme_lists():
    from cascade_studio.launch import check_accelerate_config

    configs = shipped_configs()
    assert sorted(configs) == ["cpu-2proc", "fsdp", "multi-gpu", "multi-node", "one-gpu"]
    kinds = {name: check_accelerate_config(path)["distributed_type"] for name, path in configs.items()}
    assert kinds == {"cpu-2proc": "MULTI_GPU", "fsdp": "FSDP", "multi-gpu": "MULTI_GPU", "multi-node": "MULTI_GPU",
                     "one-gpu": "NO"}
    node = check_accelerate_config(configs["multi-node"])
    assert node["num_machines"] > 1 and {"machine_rank", "main_process_ip", "main_process_port"} <= node.keys()
    readme = (REPO / "README.md").read_text()
    for name in configs:
        assert f"{name}.yaml" in readme, name


@pytest.mark.parametrize("config, message", [
    ("no-such-config", "not a shipped config; give a file made by `accelerate config` or one of: cpu-2proc"),
    ("bad.yaml", "distributed_type: 'DEEPSPEED' is not supported"),
    ("nodes.yaml", "main_process_ip: missing"),
    ("list.yaml", "an accelerate config is a mapping of settings"),
])
def test_a_missing_or_bad_accelerate_config_is_refused_before_launch(tmp_path, config, message):
    (tmp_path / "bad.yaml").write_text("distributed_type: DEEPSPEED\nnum_processes: 2\n")
    (tmp_path / "nodes.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 4\nnum_machines: 2\n"
                                         "machine_rank: 1\n")
    (tmp_path / "list.yaml").write_text("- MULTI_GPU\n")
    workspace = tmp_path / "ws"
    result = subprocess.run([CLI, "train", "--accelerate-config", config, RECIPE, f"workspace={workspace}"],
                            cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not workspace.exists()


def test_the_cli_launches_a_config_file_with_the_recipe_overrides_and_resume_passed_through(tmp_path):
    from cascade_studio.cli import accelerate_command
    from cascade_studio.launch import resolve_accelerate_config

    path = resolve_accelerate_config("fsdp")
    assert path == shipped_configs()["fsdp"] and resolve_accelerate_config("fsdp.yaml") == path
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    assert resolve_accelerate_config(own) == own.resolve()
    cmd = accelerate_command("r.yaml", ["train.max_steps=3"], 4, resume=True, config_file=path)
    assert cmd[cmd.index("--config_file") + 1] == str(path) and cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("-m", cmd.index("--config_file")) + 1:] == ["cascade_studio.train", "r.yaml",
                                                                     "train.max_steps=3", "--resume"]
    assert "--num_processes" not in accelerate_command("r.yaml", [], None, config_file=path)


@pytest.mark.slow
def test_a_two_process_run_resumes_in_one_process_and_says_the_global_batch_changed(runs, tmp_path, capsys):
    import shutil

    from cascade_studio.run import train

    workspace = tmp_path / "ws"
    shutil.copytree(runs["ws"] / "runs" / "ddp", workspace / "runs" / "ddp")  # the module's run stays as it was
    shutil.copy(runs["ws"] / "mlflow.db", workspace / "mlflow.db")
    overrides = [f"data.path={DATA}", f"workspace={workspace}", "name=ddp", "train.batch_size=2",
                 "train.grad_accum=2", "train.checkpoint_every=2", "cache.mode=sharded", f"cache.dir={runs['cache']}",
                 "preview.every=0", f"train.max_steps={STEPS + 1}"]
    result = train(RECIPE, overrides, resume=True, progress=False)
    out = capsys.readouterr().out
    assert result.step == STEPS + 1
    assert "note: resumed with a global batch of 4 (1 process(es)); the run had 8 (2 process(es)) before" in out
    plans = [e for e in read_events(workspace / "runs" / "ddp") if e["event"] == "batch_plan"]
    assert [(e["global_batch"], e["data_order"]) for e in plans] == [(8, "seed=42/world_size=2"),
                                                                     (4, "seed=42/world_size=1")]
    from cascade_studio.tracking import read_run

    tags = read_run(f"sqlite:///{workspace / 'mlflow.db'}", result.run_id)["tags"]
    assert tags[f"resume.step{STEPS}.global_batch"] == "8 -> 4"


def test_fsdp_refuses_a_quantized_base_with_what_to_use_instead():
    from cascade_studio.config import load_recipe
    from cascade_studio.trainers.sharding import ShardingUnsupportedError, refuse_unshardable

    refuse_unshardable(load_recipe(RECIPE, overrides=["train.mixed_precision=bf16"]))  # bf16, no quantization: fine
    with pytest.raises(ShardingUnsupportedError, match=r"train.quantize_base=int8 .*use quantize_base=none"):
        refuse_unshardable(load_recipe(RECIPE, overrides=["train.quantize_base=int8"]))


def test_train_global_batch_keeps_the_images_per_step_at_every_world_size():
    """``train.global_batch`` fixes the images per optimizer step: the accumulation is worked out per world
    size, a split that does not divide is refused with the process counts that work, and it cannot be set
    beside ``train.grad_accum``."""
    from cascade_studio.config import RecipeError, load_recipe
    from cascade_studio.config.schema import accumulation

    recipe = load_recipe(RECIPE, overrides=["train.batch_size=2", "train.global_batch=16"])
    assert [accumulation(recipe.train, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(RecipeError, match=r"on 3 process\(es\).*launch 1, 2, 4, 8 process\(es\)"):
        accumulation(recipe.train, 3)
    assert accumulation(load_recipe(RECIPE, overrides=["train.grad_accum=3"]).train, 4) == 3
    with pytest.raises(RecipeError, match="train.global_batch.*not a multiple of train.batch_size"):
        load_recipe(RECIPE, overrides=["train.batch_size=4", "train.global_batch=6"])
    with pytest.raises(RecipeError, match="train.grad_accum both set the accumulation"):
        load_recipe(RECIPE, overrides=["train.grad_accum=2", "train.global_batch=8"])


@pytest.mark.slow
def test_a_global_batch_run_trains_what_the_same_accumulation_written_out_trains(tmp_path, capsys):
    from cascade_studio.run import train

    common = [f"data.path={DATA}", "train.max_steps=2", "train.checkpoint_every=0", "train.batch_size=2",
              "preview.every=0", "tracking.enabled=false", f"cache.dir={tmp_path / 'cache'}"]
    written = train(RECIPE, common + [f"workspace={tmp_path / 'a'}", "train.grad_accum=2"], progress=False)
    derived = train(RECIPE, common + [f"workspace={tmp_path / 'b'}", "train.global_batch=4"], progress=False)
    assert "global batch 4 = 2 per device x 1 process(es) x 2 accumulation" in capsys.readouterr().out
    a, b = (load_file(str(r.exports[0])) for r in (written, derived))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_one_machine_launch_gets_its_own_rendezvous_port_and_multi_node_keeps_its_file_s(tmp_path):
    """Two multi-process runs on one machine at once (two GPUs' trainings, the studio's job beside a
    command-line run) must not both take torchrun's default port 29500: the second would fail with "address
    already in use". A multi-node file's port is the one every machine was told, so it is kept."""
    from cascade_studio.launch import accelerate_command

    def port(cmd):
        return int(cmd[cmd.index("--main_process_port") + 1]) if "--main_process_port" in cmd else None

    plain = [port(accelerate_command("r.yaml", [], 2)) for _ in range(2)]
    shipped = port(accelerate_command("r.yaml", [], None, config_file=shipped_configs()["cpu-2proc"]))
    assert None not in plain and shipped is not None and 29500 not in plain + [shipped]
    assert port(accelerate_command("r.yaml", [], 1)) is None  # one process: no rendezvous
    assert port(accelerate_command("r.yaml", [], None, config_file=shipped_configs()["multi-node"])) is None
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nmain_process_port: 31337\n")
    assert port(accelerate_command("r.yaml", [], None, config_file=fixed)) is None  # the file's own port


@pytest.mark.slow
def test_two_two_process_runs_started_together_both_train(tmp_path):
    from cascade_studio.launch import accelerate_command, launch_env

    procs = []
    for name in ("left", "right"):
        overrides = [f"data.path={DATA}", f"workspace={tmp_path / name}", "train.max_steps=1", "preview.every=0",
                     "train.checkpoint_every=0", "tracking.enabled=false", f"name={name}"]
        config = shipped_configs()["cpu-2proc"]  # a config file's launch: static rendezvous on a fixed port
        env = {**child_env(), **launch_env(2, config)}
        procs.append(subprocess.Popen(accelerate_command(RECIPE, overrides, None, config_file=config, no_progress=True),
                                      cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all((tmp_path / n / "runs" / n / "export").is_dir() for n in ("left", "right"))
