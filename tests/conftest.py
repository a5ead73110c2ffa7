"""Shared pytest fixtures. Tests never touch the network: the offline switches are set before any
Hugging Face library is imported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The shared reference data (official key list, parity tensors) beside the repository."""
    from reference_paths import REFERENCE_DIR

    return REFERENCE_DIR


class ParityData:
    """``official_parity.safetensors``: reference outputs of the official modules on tiny configs."""

    def __init__(self, path: Path) -> None:
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        self.tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            self.meta = json.loads(handle.metadata()["meta"])

    def config(self, group: str) -> dict:
        """Constructor kwargs of the tiny model behind ``group``."""
        return dict(self.meta[group]["config"])

    def weights(self, group: str) -> dict:
        """The group's weights under official key names."""
        prefix = f"{group}.weights."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def __call__(self, group: str, name: str):
        return self.tensors[f"{group}.{name}"]


@pytest.fixture(scope="session")
def official_parity(reference_dir: Path) -> ParityData:
    """Parity tensors and configs; use ``official_parity('stage_c', 'x')`` and ``.weights('stage_c')``."""
    return ParityData(reference_dir / "official_parity.safetensors")


def pytest_configure(config):
    # Tests run two xdist workers on two cores: one torch thread each avoids oversubscription, which made tiny
    # models tens of times slower on a 2-core CI machine.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_workspace(tmp_path_factory) -> Path:
    """One workspace (data splits, MLflow store, runs) per test module that trains toy adapters."""
    return tmp_path_factory.mktemp("toy")


# The longest test files (minutes each: they train the toy ControlNet and IP-Adapter recipes, run every shipped
# recipe on the meta device, and the published recipes' settings on the tiny model), then the rest of the files
# with slow tests, then the fast ones.
LONGEST_FILES = ("test_toy_controlnet.py", "test_toy_ip_adapter.py", "test_lcm.py", "test_device_dry_run.py",
                 "test_published_settings.py")


def pytest_collection_modifyitems(config, items):
    """Longest files first: ``make test`` (``--dist loadfile --no-loadscope-reorder``) hands whole files to the
    two workers in collection order. By default xdist orders files by test count instead, which put the two
    one-test toy files last, on the same worker, while the other one sat idle for minutes."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple[int, int]:
        if item.path.name in LONGEST_FILES:
            return 0, LONGEST_FILES.index(item.path.name)
        return (1 if item.path in slow_files else 2), 0

    items.sort(key=rank)  # stable: the order within each group is kept
