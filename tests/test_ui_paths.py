"""Path confinement and file-name sanitising for the studio (cascade_studio/ui/paths.py, workspace.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

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
