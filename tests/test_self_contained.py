"""The repository is self-contained: no tracked file names a path outside the clone.

A clone on a contributor's laptop or a fork's CI has nothing beside it, so a test, the demo, a benchmark or the
Makefile that reads from an absolute path of one machine (or from a sibling folder through ``../``) fails
there. Documentation that shows an example path says so in ``ALLOWED`` below, with the reason.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Top-level folders of a machine that a project file has no business naming (system tools are found on PATH).
_ROOTS = ("work", "root", "home", "Users", "tmp", "mnt", "opt", "srv", "var", "usr", "etc", "data", "scratch",
          "media", "private", "Volumes")
# An absolute path starts a token (after a quote, a space, '=', '(' or a URL's 'scheme://'); '~/.cache'-style
# per-user locations and URLs' own paths ('https://host/usr/...') are not machine paths of this kind.
ABSOLUTE = re.compile(r"(?:^|[\s\"'`(=,\[]|:///?)/(?:" + "|".join(_ROOTS) + r")(?:/[\w.-]+)+")
WINDOWS = re.compile(r"(?:^|[\s\"'`(=,\[])[A-Za-z]:\\\\?[\w.-]+")
SIBLING = re.compile(r"\.\./(?:shared|\.library)\b")

# (file, exact text) pairs that are documentation examples; each says why it may stay.
_REFUSED = "a path outside the workspace that the studio's path policy must refuse (the test never reads it)"
_ENV_ONLY = "a value for HF_HOME / HF_HUB_CACHE that the test only resolves as a string (nothing is created there)"
ALLOWED: dict[tuple[str, str], str] = {
    ("README.md", "/" "data/images"): "an example of a folder given to `cascade-studio ui --allow-path`",
    ("tests/test_ui_paths.py", "/" "etc/passwd"): _REFUSED,
    ("tests/test_ui_paths.py", "/" "etc/hostname"): _REFUSED,
    ("tests/test_ui_paths.py", "/" "tmp/hf-home-x"): _ENV_ONLY,
    ("tests/test_ui_paths.py", "/" "tmp/hf-home-x/hub"): _ENV_ONLY,
    ("tests/test_ui_paths.py", "/" "tmp/hub-y"): _ENV_ONLY,
}

# Binary and data files are not read as text.
_SKIP_SUFFIXES = {".safetensors", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".pt", ".bin", ".tar", ".gz", ".zip",
                  ".db", ".npz", ".npy"}


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # an exported tree without .git: every file but caches
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
                 and not {".git", ".venv", "__pycache__", "workspace"} & set(p.relative_to(REPO).parts)]
    return [REPO / n for n in names if Path(n).suffix.lower() not in _SKIP_SUFFIXES]


def outside_paths(text: str) -> list[str]:
    """Every path outside the clone that ``text`` names (absolute ones from their first slash on)."""
    found = []
    for pattern in (ABSOLUTE, WINDOWS, SIBLING):
        for match in pattern.finditer(text):
            hit = match.group(0).lstrip(" \t\r\n\"'`(=,[")
            if pattern is ABSOLUTE:
                hit = "/" + hit.lstrip(":/")
            found.append(hit)
    return found


def test_the_pattern_finds_what_it_is_for() -> None:
    # the check must be able to fail: each kind of escape is found, ordinary text is not
    sample = ('open("/' 'work/shared/reference/x.json")\nuri = "sqlite:////' 'tmp/ws/mlflow.db"\n'
              'see ../' 'shared/reference\nC:\\' 'Users\\me\n'
              'fine: ~/.cache/huggingface, https://example.org/usr/x, runs/<name>/export, a/b/c\n')
    found = outside_paths(sample)
    assert len(found) == 4, found
    assert any("reference/x.json" in f for f in found) and any("ws/mlflow.db" in f for f in found)


def test_no_tracked_file_names_a_path_outside_the_repository() -> None:
    files = tracked_files()
    assert len(files) > 50, "expected to see the repository's files"
    offenders = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = str(path.relative_to(REPO))
        for hit in outside_paths(text):
            if (rel, hit) not in ALLOWED:
                offenders.append(f"{rel}: {hit}")
    assert not offenders, ("tracked files name paths outside the repository (ship the data inside it, find tools "
                           "on PATH, or allow a documentation example in ALLOWED with its reason):\n"
                           + "\n".join(offenders))


def test_reference_data_is_read_from_inside_the_repository() -> None:
    from reference_paths import REFERENCE_DIR

    assert REFERENCE_DIR.resolve().is_relative_to(REPO)
    for name in ("official_state_dict_keys.json", "official_parity.safetensors", "README.md"):
        assert (REFERENCE_DIR / name).is_file(), name
