"""Smaller faults found by trying to break the studio (issue 17, item 6), each checked where the user meets it:
a NaN adapter file, metric points logged twice after a resume, a full disk named by the wrong filesystem, a
summary of an all-bad data folder that drops reasons or quotes another pixel limit, ``validate --data``, and
images that train on an empty caption without a word.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from cascade_studio.config.schema import DataConfig
from cascade_studio.data import EmptyDatasetError, scan_source
from cascade_studio.run import main as run_main
from cascade_studio.run import train
from cascade_studio.tracking import read_run
from cascade_studio.trainers import steps as steps_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_generate_cli import FAST as GENERATE_FAST  # noqa: E402
from test_generate_cli import lora_adapter, run_cli  # noqa: E402
from subprocess_env import can_mount_tmpfs, child_env, tmpfs_prefix  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "lora.yaml")
DATA = REPO / "datasets" / "tiny-shapes"
TRAIN_FAST = [f"data.path={DATA}", "preview.every=0", "train.max_steps=6", "data.holdout_fraction=0"]


# --------------------------------------------------------------------------------------------- a NaN adapter
def test_an_adapter_file_with_nan_tensors_is_refused_instead_of_drawing_black(tmp_path, capsys):
    from cascade_studio.adapters import lora

    good = lora.export_adapter(lora_adapter(seed=1), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    poisoned = sorted(tensors)[1]
    tensors[poisoned] = torch.full_like(tensors[poisoned], float("nan"))
    broken = tmp_path / "diverged.safetensors"
    save_file(tensors, str(broken), metadata=metadata)

    out = tmp_path / "out.png"
    code, _, err = run_cli(["generate", "--prompt", "a red circle", "--preview", *GENERATE_FAST, "--out", out,
                            "--lora", broken], capsys)
    assert code != 0 and not out.exists(), err
    assert str(broken) in err and "NaN or infinite" in err and poisoned in err
    assert "earlier checkpoint" in err and "Traceback" not in err
    code, _, err = run_cli(["generate", "--prompt", "a red circle", "--preview", *GENERATE_FAST, "--out", out,
                            "--lora", good], capsys)
    assert code == 0 and out.exists(), err  # the same file before it diverged still loads


# -------------------------------------------------------------------------------- metric history after resume
class StopAt:
    """Ctrl-C in the loss step of ``step`` (after the steps before it were logged)."""

    def __init__(self, monkeypatch, step: int) -> None:
        self.real, self.stop_at, self.calls = steps_module.diffusion_training_loss, step, 0
        monkeypatch.setattr(steps_module, "diffusion_training_loss", self)  # the run's loss step

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt()
        return self.real(*args, **kwargs)


def test_a_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
    args = [*TRAIN_FAST, f"workspace={tmp_path}", "name=resumed", "train.checkpoint_every=4"]
    StopAt(monkeypatch, step=6)  # steps 1-5 logged, checkpoint at 4: the resume repeats step 5
    assert run_main([RECIPE, *args, "--no-progress"]) == 130
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.undo()
    result = train(RECIPE, args, resume=True, progress=False)
    run = read_run(uri, result.run_id)
    for key in ("loss", "lr", "grad_norm"):
        assert [p["step"] for p in run["metrics"][key]] == [1, 2, 3, 4, 5, 6], key
    for key in ("skipped_files", "train_samples"):  # logged at step 0 by every start
        assert [p["step"] for p in run["metrics"][key]] == [0], key


# --------------------------------------------------------------------------------- a full disk, its filesystem
FULL_CACHE_DRIVER = r"""
import os, resource, signal, sys
import cascade_studio.data as data
build_cache = data.build_cache

def build_cache_on_a_full_disk(*args, **kwargs):
    if os.environ.get("CS_TEST_FSIZE_KB"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["CS_TEST_FSIZE_KB"]) * 1024,
                                                   resource.RLIM_INFINITY))
    return build_cache(*args, **kwargs)

data.build_cache = build_cache_on_a_full_disk
from cascade_studio.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_with_cache(workspace: Path, cache: Path, prefix: tuple[str, ...] = (), **env: str):
    args = ["train", RECIPE, *TRAIN_FAST, f"workspace={workspace}", f"cache.dir={cache}", "tracking.enabled=false",
            "--no-progress"]
    result = subprocess.run([*prefix, sys.executable, "-c", FULL_CACHE_DRIVER, *args], cwd=REPO,
                            env=child_env(**env), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_full_disk_while_caching_names_the_file_and_its_filesystem(tmp_path):
    cache = tmp_path / "cache"
    message = train_with_cache(tmp_path / "ws", cache, CS_TEST_FSIZE_KB="16")
    assert message.startswith(f"error: Could not write {cache}"), message  # the shard, not "a file somewhere"
    from cascade_studio.diskspace import mount_point

    assert "the file-size limit of this process was reached" in message
    assert f"free on the filesystem mounted at {mount_point(cache)}" in message


@pytest.mark.slow
def test_a_really_full_cache_disk_is_named_not_the_current_directorys(tmp_path):
    if not can_mount_tmpfs():
        pytest.skip("needs `unshare --mount` and tmpfs mounts (root or user namespaces) for a real full disk")
    small = tmp_path / "small-disk"
    small.mkdir()
    # The cache on a 48 KiB filesystem of its own (the workspace and the current directory are elsewhere).
    prefix = tmpfs_prefix(small, 48)
    message = train_with_cache(tmp_path / "ws", small / "cache", prefix=prefix)
    assert message.startswith(f"error: Could not write {small / 'cache'}"), message
    assert "the disk is full" in message and f"free on the filesystem mounted at {small}." in message


# ----------------------------------------------------------------------------------------- bad data folders
def bad_folder(root: Path) -> dict[str, Path]:
    """One file for each kind of fault a folder can hold (six kinds), two of them too large for 10000 pixels."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"empty": root / "empty.png", "text": root / "notes.png", "tiny": root / "tiny.png",
             "large": root / "large.png", "huge": root / "huge.png", "truncated": root / "cut.png",
             "caption": root / "latin1.png"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("not an image")
    Image.new("RGB", (10, 10), "red").save(files["tiny"])
    Image.new("RGB", (120, 120), "red").save(files["large"])  # 14400 pixels: over 10000
    Image.new("RGB", (300, 300), "red").save(files["huge"])  # 90000: over twice the limit (PIL's bomb *error*)
    whole = root / "whole.tmp"
    Image.effect_noise((64, 64), 50).convert("RGB").save(whole, format="PNG")
    files["truncated"].write_bytes(whole.read_bytes()[:2000])
    whole.unlink()
    Image.new("RGB", (64, 64), "blue").save(files["caption"])
    files["caption"].with_suffix(".txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    return files


def test_the_all_bad_folder_summary_keeps_every_reason_and_the_configured_limit(tmp_path):
    files = bad_folder(tmp_path / "bad")
    with pytest.raises(EmptyDatasetError) as caught:
        scan_source(DataConfig(source="folder", path=str(tmp_path / "bad"), max_pixels=10000))
    message = str(caught.value)
    assert f"all {len(files)} file(s) were skipped" in message
    for marker in ("empty file", "not an image", "under 32 px", "truncated", "caption file latin1.txt unreadable",
                   "is over data.max_pixels=10000"):
        assert marker in message, (marker, message)
    assert "20000" not in message  # PIL's own limit for its bomb error is twice the configured one
    assert "14400 pixels" in message or "90000 pixels" in message


def test_validate_data_scans_the_folder_without_training(tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(DATA, folder, ignore=shutil.ignore_patterns("0[3-9]_*", "[1-9]*"))  # 3 images of tiny-shapes
    (folder / "01_large_red_square.txt").unlink()  # one image loses its caption
    files = bad_folder(folder)
    workspace = tmp_path / "ws"
    command = [sys.executable, "-m", "cascade_studio.cli", "validate", RECIPE, f"data.path={folder}",
               f"workspace={workspace}", "data.max_pixels=80000", "--data"]
    result = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # 256x256 shapes and the 120x120 image are under 80000 pixels; the 300x300 one is not
    assert "4 usable images (2 with a caption, 2 without), 6 skipped" in out, out
    assert "01_large_red_square.png" in out and "no caption" in out
    for kind, path in files.items():
        assert (f"{path}: " in out) == (kind != "large"), (path, out)  # every bad file, with its reason
    assert f"{files['huge']}: too large: 90000 pixels is over data.max_pixels=80000" in out
    assert not workspace.exists()  # nothing trained, nothing written
    bad_folder(tmp_path / "only-bad")
    only_bad = subprocess.run([*command[:5], f"data.path={tmp_path / 'only-bad'}", "data.max_pixels=10000",
                               "--data"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert only_bad.returncode == 2 and "No usable images" in only_bad.stderr  # a data problem is a problem


def test_images_without_a_caption_are_named_once_per_run(tmp_path, capsys):
    folder = tmp_path / "shapes"
    shutil.copytree(DATA, folder)
    uncaptioned = sorted(folder.glob("0[4-8]_*.txt"))
    for caption in uncaptioned:
        caption.unlink()
    code = run_main([RECIPE, *TRAIN_FAST, f"data.path={folder}", f"workspace={tmp_path / 'ws'}",
                     "train.max_steps=1", "tracking.enabled=false", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "have no caption" in line]
    assert len(warnings) == 1, out
    assert f"{len(uncaptioned)} of 24 images have no caption" in warnings[0]
    assert str(uncaptioned[0].with_suffix(".png")) in warnings[0] and ", ..." in warnings[0]  # the first few


def test_exported_adapter_files_get_the_users_normal_permissions(tmp_path):
    """Exports are read by other tools and users (ComfyUI on a shared machine): not the 0600 of a temp file."""
    from cascade_studio.adapters.files import save_adapter_tensors

    umask = os.umask(0)
    os.umask(umask)
    path = save_adapter_tensors({"x": torch.zeros(2)}, tmp_path / "out.safetensors", {"a": "b"})
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert umask & 0o044 or path.stat().st_mode & 0o044  # readable by others wherever the umask allows it
