"""Path confinement, the studio's path policy and file-name sanitising (cascade_studio/ui/paths.py,
workspace.py, and the pages and commands that use them)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cascade_studio.ui import jobs as jobs_module
from cascade_studio.ui.jobs import JobQueue
from cascade_studio.ui.paths import PathNotAllowed, confine, is_inside, safe_filename
from cascade_studio.ui.workspace import REPO_ROOT, Workspace


@pytest.fixture()
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    workspace, datasets, outside = tmp_path / "ws", tmp_path / "repo" / "datasets", tmp_path / "outside"
    for folder in (workspace / "data", datasets / "shapes", outside):
        folder.mkdir(parents=True)
    return workspace, datasets, outside


def test_relative_and_absolute_paths_inside_a_root_are_accepted(roots) -> None:
    workspace, datasets, _ = roots
    assert confine("data", [workspace, datasets]) == (workspace / "data").resolve()
    assert confine(str(datasets / "shapes"), [workspace, datasets]) == (datasets / "shapes").resolve()
    assert confine("shapes", [workspace, datasets], base=datasets) == (datasets / "shapes").resolve()
    # a root itself is inside, and the path need not exist yet (an output folder to create)
    assert confine(str(workspace), [workspace]) == workspace.resolve()
    assert confine("compare/new", [workspace]) == (workspace / "compare" / "new").resolve()


@pytest.mark.parametrize("text", ["../outside", "data/../../outside", "data/..", "..", "data\\..\\..\\outside",
                                  "./data/../data"])
def test_dotdot_is_refused_even_when_it_would_land_inside(roots, text: str) -> None:
    workspace, datasets, _ = roots
    with pytest.raises(PathNotAllowed, match=r"'\.\.'"):
        confine(text, [workspace, datasets])


def test_absolute_paths_outside_every_root_are_refused_with_where_to_put_them(roots) -> None:
    workspace, datasets, outside = roots
    with pytest.raises(PathNotAllowed) as err:
        confine(str(outside), [workspace, datasets])
    assert str(workspace) in str(err.value) and "copy or move" in str(err.value)
    with pytest.raises(PathNotAllowed):
        confine("/etc", [workspace, datasets])
    # a sibling whose name merely starts like the root is not inside it
    (workspace.parent / "ws-evil").mkdir()
    with pytest.raises(PathNotAllowed):
        confine(str(workspace.parent / "ws-evil"), [workspace])


def test_symlinks_pointing_out_of_a_root_are_refused(roots) -> None:
    workspace, _, outside = roots
    os.symlink(outside, workspace / "link")
    with pytest.raises(PathNotAllowed):
        confine("link", [workspace])
    assert not is_inside(workspace / "link", workspace)
    os.symlink(workspace / "data", workspace / "inner-link")
    assert confine("inner-link", [workspace]) == (workspace / "data").resolve()


@pytest.mark.parametrize("text", ["", "   ", "data\x00/x"])
def test_empty_and_nul_paths_are_refused(roots, text: str) -> None:
    with pytest.raises(PathNotAllowed):
        confine(text, [roots[0]])


@pytest.mark.parametrize(("name", "expected"), [
    ("my-style", "my-style.yaml"),
    ("My Style v2!", "My-Style-v2.yaml"),
    ("../../etc/passwd", "etc-passwd.yaml"),
    (".hidden", "hidden.yaml"),
    ("lora.yaml", "lora.yaml"),
    ("a/b\\c", "a-b-c.yaml"),
    ("x" * 100, "x" * 64 + ".yaml"),
])
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name, ".yaml") == expected


@pytest.mark.parametrize("name", ["", "..", "../..", "///", "!!!"])
def test_safe_filename_refuses_names_with_nothing_usable(name: str) -> None:
    with pytest.raises(PathNotAllowed):
        safe_filename(name, ".yaml")


def test_workspace_confines_data_to_workspace_and_repo_datasets(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    (ws.root / "datasets" / "mine").mkdir(parents=True)
    assert ws.confine_data("datasets/tiny-shapes") == REPO_ROOT / "datasets" / "tiny-shapes"
    assert ws.confine_data(str(ws.root / "datasets" / "mine")) == (ws.root / "datasets" / "mine").resolve()
    for bad in ("recipes", "cascade_studio", "/etc", "datasets/../recipes", str(tmp_path)):
        with pytest.raises(PathNotAllowed):
            ws.confine_data(bad)
    assert ws.confine_recipe("recipes/tiny/lora.yaml") == REPO_ROOT / "recipes" / "tiny" / "lora.yaml"
    with pytest.raises(PathNotAllowed):
        ws.confine_recipe("pyproject.toml")
    with pytest.raises(PathNotAllowed):
        ws.confine_workspace(str(REPO_ROOT / "recipes" / "tiny" / "lora.yaml"))


# ---------------------------------------------------------------------- the studio's path policy (issue 17 #8)
# Driven through the Launch and Data pages with AppTest, the way a user hits them; the page tests use only names
# that existed before the policy, so they run (and fail) on the old code too.
TINY_LORA = REPO_ROOT / "recipes" / "tiny" / "lora.yaml"
REFUSED = "is outside the folders the studio may use"
STAND_IN_RUNNER = "import time\ntime.sleep(30)\n"  # nothing trains: the tests only look at the queue


@pytest.fixture()
def studio(tmp_path: Path, monkeypatch) -> Workspace:
    """An empty workspace served by the in-process pages, jobs started with a stand-in runner, and a fake
    Hugging Face cache (so the real one on this machine plays no part)."""
    import huggingface_hub.constants

    workspace = Workspace(tmp_path / "ws")
    workspace.root.mkdir()
    monkeypatch.setenv("CASCADE_STUDIO_WORKSPACE", str(workspace.root))
    monkeypatch.setenv("CASCADE_STUDIO_QUEUE_WORKER", "0")
    monkeypatch.delenv("CASCADE_STUDIO_ALLOW_PATHS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    hub = tmp_path / "hf-home" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    runner = tmp_path / "stand_in_runner.py"
    runner.write_text(STAND_IN_RUNNER)
    monkeypatch.setattr(jobs_module, "_default_runner", lambda: [sys.executable, str(runner)])
    yield workspace
    for job in JobQueue(workspace).jobs():  # never leave a stand-in runner behind
        if job.status == "running":
            JobQueue(workspace, cancel_grace_s=0).cancel(job.id)


def launch_page() -> AppTest:
    return AppTest.from_string("from cascade_studio.ui.page_launch import render\nrender()\n",
                               default_timeout=120).run()


def errors(at: AppTest) -> str:
    return "\n".join(e.value for e in at.error)


def queue_with(at: AppTest, overrides: str) -> AppTest:
    """Type the overrides and click Queue (when the page lets a user click it)."""
    at.text_area(key="launch_overrides").set_value(overrides).run()
    if not at.button(key="launch_queue").disabled:
        at.button(key="launch_queue").click().run()
    return at


def assert_refused(at: AppTest, ws: Workspace, setting: str, shown: str) -> None:
    text = errors(at)
    assert REFUSED in text and setting in text and shown in text, text
    assert "cascade-studio ui --allow-path" in text and str(ws.root) in text, text  # how to allow, and what is
    assert at.button(key="launch_queue").disabled
    assert JobQueue(ws).jobs() == []


@pytest.mark.parametrize(("setting", "value"), [
    ("data.path", "/etc"),
    ("model.stage_c", "/etc/passwd"),
    ("export.dir", "{tmp}/elsewhere/export"),
    ("cache.dir", "{tmp}/elsewhere/cache"),
    ("cache.dir", "~/cascade-cache"),
])
def test_launch_refuses_an_override_pointing_outside(studio: Workspace, tmp_path: Path, setting: str,
                                                     value: str) -> None:
    value = value.format(tmp=tmp_path)
    at = queue_with(launch_page(), f"train.max_steps=4\n{setting}={value}")
    assert_refused(at, studio, setting, value)
    assert not (tmp_path / "elsewhere").exists()


def test_launch_refuses_a_symlink_inside_the_workspace_that_points_outside(studio: Workspace,
                                                                          tmp_path: Path) -> None:
    outside = tmp_path / "outside-images"
    outside.mkdir()
    (studio.root / "datasets").mkdir()
    (studio.root / "datasets" / "mine").symlink_to(outside)
    at = queue_with(launch_page(), f"data.path={studio.root}/datasets/mine")
    assert_refused(at, studio, "data.path", str(outside))
    # relative to the repository root, as the job resolves it, through a link in the workspace: the same
    (studio.root / "weights.safetensors").symlink_to("/etc/passwd")
    at = queue_with(launch_page(), f"model.stage_c={studio.root}/weights.safetensors")
    assert_refused(at, studio, "model.stage_c", "/etc/passwd")


def test_launch_refuses_a_recipe_file_whose_own_paths_point_outside(studio: Workspace) -> None:
    saved = studio.root / "recipes"
    saved.mkdir()
    text = TINY_LORA.read_text().replace("path: datasets/tiny-shapes", "path: /etc")
    assert "path: /etc" in text
    (saved / "reads-etc.yaml").write_text(text)
    at = launch_page()
    at.selectbox(key="launch_recipe").set_value("saved: reads-etc.yaml").run()
    if not at.button(key="launch_queue").disabled:
        at.button(key="launch_queue").click().run()
    assert_refused(at, studio, "data.path", "/etc")


def test_a_relative_path_is_resolved_where_the_job_runs(studio: Workspace) -> None:
    # "cascade_studio" exists at the repository root (the jobs' working directory), which is not an allowed root
    at = queue_with(launch_page(), "data.path=cascade_studio")
    assert_refused(at, studio, "data.path", str(REPO_ROOT / "cascade_studio"))


def test_an_allow_path_root_and_the_hugging_face_cache_are_accepted(studio: Workspace, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import huggingface_hub.constants

    data_root = tmp_path / "my-data"
    shutil.copytree(REPO_ROOT / "datasets" / "tiny-shapes", data_root / "shapes")
    weights = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--org--name" / "snapshots" / "abc"
    weights.mkdir(parents=True)
    (weights / "stage_c.safetensors").write_bytes(b"stand-in")  # validation checks existence, never loads it
    overrides = (f"train.max_steps=4\ndata.path={data_root}/shapes\nexport.dir={data_root}/exports\n"
                 f"model.stage_c={weights}/stage_c.safetensors")
    at = queue_with(launch_page(), overrides)  # without --allow-path: refused, saying how to allow it
    assert_refused(at, studio, "data.path", f"--allow-path {data_root}/shapes")
    assert "model.stage_c" not in errors(at)  # the hub cache is allowed by default

    monkeypatch.setenv("CASCADE_STUDIO_ALLOW_PATHS", str(data_root))  # what `cascade-studio ui --allow-path` sets
    at = queue_with(launch_page(), overrides)
    assert not errors(at), errors(at)
    [job] = JobQueue(studio).jobs()
    assert job.args["overrides"] == overrides.splitlines()


def test_three_quick_clicks_on_queue_queue_one_job_until_the_form_changes(studio: Workspace) -> None:
    at = launch_page()
    at.text_area(key="launch_overrides").set_value("train.max_steps=4").run()
    for _ in range(3):
        at.button(key="launch_queue").click().run()
    [job] = JobQueue(studio).jobs()
    assert job.args["run_name"] == "tiny-lora"
    assert "Already queued from this form" in "\n".join(i.value for i in at.info)
    at.text_area(key="launch_overrides").set_value("train.max_steps=5").run()  # a changed form queues again
    at.button(key="launch_queue").click().run()
    at.button(key="launch_queue").click().run()
    assert [j.args["run_name"] for j in JobQueue(studio).jobs()] == ["tiny-lora", "tiny-lora-2"]


def test_the_job_runner_applies_the_same_policy_to_a_job_file(studio: Workspace) -> None:
    """A queued job is checked again when it starts: a job file naming /etc never reaches the trainer."""
    from cascade_studio.config import RecipeError
    from cascade_studio.ui.commands import TrainRequest
    from cascade_studio.ui.jobs import Job
    from cascade_studio.ui.runner import build

    request = TrainRequest(str(TINY_LORA), "sneaky", ("data.path=/etc",))
    job = Job(id="j", kind="train", label="x", args=request.to_args(), created=0.0)
    with pytest.raises(RecipeError, match=REFUSED):
        build(job, Workspace.from_env(root=studio.root))


def test_the_data_page_refuses_with_the_same_message_and_accepts_an_allow_path_root(studio: Workspace,
                                                                                   tmp_path: Path,
                                                                                   monkeypatch) -> None:
    folder = tmp_path / "my-data" / "shapes"
    shutil.copytree(REPO_ROOT / "datasets" / "tiny-shapes", folder)
    at = AppTest.from_string("from cascade_studio.ui.page_data import render\nrender()\n", default_timeout=120)
    at.run()
    at.text_input(key="data_typed").set_value(str(folder)).run()
    assert REFUSED in errors(at) and f"--allow-path {folder}" in errors(at)
    monkeypatch.setenv("CASCADE_STUDIO_ALLOW_PATHS", str(folder.parent))
    at.run()
    assert not errors(at) and {m.label for m in at.metric} >= {"Usable images"}


# ------------------------------------------------------------------------------------------ policy, directly
def test_every_path_setting_of_the_schema_is_checked() -> None:
    """The policy reads the ``path=True`` flag of the schema, so no field list can fall behind it."""
    from cascade_studio.config import Recipe, describe_fields
    from cascade_studio.ui.paths import path_settings

    marked = {doc.path for doc in describe_fields(Recipe) if doc.type.startswith("path")}
    assert set(path_settings()) == marked
    assert {"data.path", "model.stage_c", "export.dir", "cache.dir", "workspace"} <= marked
    assert {k for k, hub in path_settings().items() if hub} == {d.path for d in describe_fields(Recipe) if d.weights}


def test_policy_shard_patterns_repo_ids_and_urls(tmp_path: Path) -> None:
    from cascade_studio.ui.paths import PathPolicy

    ws, base = tmp_path / "ws", tmp_path / "repo"
    (ws / "shards").mkdir(parents=True)
    base.mkdir()
    (ws / "shards" / "a-000.tar").write_bytes(b"")
    policy = PathPolicy(workspace=ws, base=base)
    policy.check_setting("data.path", str(ws / "shards" / "a-{000..001}.tar"))
    policy.check_setting("data.path", str(ws / "shards" / "*.tar"))
    policy.check_setting("data.path", "https://example.org/shard-{000..009}.tar")  # nothing local
    policy.check_setting("model.stage_c", "stabilityai/stable-cascade", hub_id_ok=True)  # read via the hub cache
    (ws / "shards" / "b-000.tar").symlink_to("/etc/hostname")
    for bad in (str(ws / "shards" / "*.tar"), str(ws / "shards" / "{a,b}-000.tar"), "/etc/{a,b}.tar",
                str(ws / "{..,x}" / "y.tar"), "pipe:cat /etc/passwd", "file:///etc/passwd"):
        with pytest.raises(PathNotAllowed):
            policy.check_setting("data.path", bad)
    with pytest.raises(PathNotAllowed):  # a would-be cache folder named like a repo id is still a path
        policy.check_setting("cache.dir", "org/name")


def test_hub_cache_follows_hf_home() -> None:
    code = "from cascade_studio.ui.paths import hf_hub_cache; print(hf_hub_cache())"
    for env, expected in (({"HF_HOME": "/tmp/hf-home-x"}, "/tmp/hf-home-x/hub"),
                          ({"HF_HUB_CACHE": "/tmp/hub-y"}, "/tmp/hub-y")):
        environ = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE")}
        done = subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True,
                              check=True)
        assert done.stdout.strip() == expected


def test_cli_ui_passes_allow_path_roots_to_the_studio(tmp_path: Path, monkeypatch) -> None:
    from cascade_studio import cli

    seen = {}
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env, cwd: seen.update(env=env) or 0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = cli.build_parser().parse_args(["ui", "--allow-path", str(tmp_path / "a"), "--allow-path",
                                          str(tmp_path / "b")])
    assert args.handler(args) == 0
    assert seen["env"]["CASCADE_STUDIO_ALLOW_PATHS"].split(os.pathsep) == [str(tmp_path / "a"), str(tmp_path / "b")]
    args = cli.build_parser().parse_args(["ui", "--allow-path", str(tmp_path / "missing")])
    assert args.handler(args) == 2
