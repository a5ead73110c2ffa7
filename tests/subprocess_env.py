"""What the tests' child processes share: an offline, single-threaded environment, and whether a real full disk
can be made (a tmpfs mounted in a private mount namespace)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: offline, one torch thread (the machine is shared, and an in-process
    baseline with one thread keeps float reductions in the same order), unbuffered, synchronous MLflow."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "MLFLOW_ENABLE_ASYNC_LOGGING": "false", **extra}


def can_mount_tmpfs() -> bool:
    """True where ``unshare --mount`` may mount a tmpfs (root or user namespaces): a real full disk for a child."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def tmpfs_prefix(folder, size_kib: int) -> tuple[str, ...]:
    """A command prefix that runs the child with a ``size_kib`` tmpfs mounted at ``folder`` in a private mount
    namespace (the rest of the machine never sees it): a really full disk (needs :func:`can_mount_tmpfs`)."""
    return ("unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size={size_kib}k tmpfs {folder} && exec \"$@\"",
            "sh")
