"""Launching a run at any size through accelerate: the shipped config files and the ``accelerate launch`` command.

``cascade-studio train --accelerate-config FILE|NAME recipe.yaml`` and ``accelerate launch --config_file FILE -m
cascade_studio.train recipe.yaml`` start the same processes; the CLI only checks the file first (a typo fails
here, in one line, not in N tracebacks) and picks a shipped file by name. Imports no torch (the CLI's ``--help``
and the studio's launch page stay cheap).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "assets" / "accelerate"

# The accelerate distributed types a run supports: one process, DDP (GPUs; CPUs over gloo) and FSDP.
SUPPORTED_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP")


class LaunchConfigError(ValueError):
    """An accelerate config file that cannot launch a run; the message says what to change."""


def shipped_configs() -> dict[str, Path]:
    """The accelerate config files shipped with the studio, by name (file name without ``.yaml``)."""
    return {path.stem: path for path in sorted(ACCELERATE_CONFIGS.glob("*.yaml"))}


def resolve_accelerate_config(value: str | os.PathLike[str]) -> Path:
    """The config file ``value`` names: an existing file, else a shipped one by name (``fsdp``, ``fsdp.yaml``)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml") if path.parent == Path(".") else None
    if name in shipped:
        return shipped[name]
    raise LaunchConfigError(f"--accelerate-config {value}: no such file, and not a shipped config; give a file made "
                            f"by `accelerate config` or one of: {', '.join(shipped)} (in {ACCELERATE_CONFIGS})")


def check_accelerate_config(path: Path) -> dict:
    """The config file's settings, or a LaunchConfigError listing every problem with what to write instead."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise LaunchConfigError(f"{path}: not a readable YAML/JSON accelerate config ({exc})") from exc
    if not isinstance(config, dict):
        raise LaunchConfigError(f"{path}: an accelerate config is a mapping of settings (distributed_type, "
                                "num_processes, ...); start from a shipped one: " + ", ".join(shipped_configs()))
    problems = []
    kind = str(config.get("distributed_type", "NO"))
    if kind not in SUPPORTED_TYPES:
        problems.append(f"distributed_type: {kind!r} is not supported; use one of {', '.join(SUPPORTED_TYPES)} "
                        "(FSDP shards the frozen Stage C)")
    counts = {}
    for key in ("num_processes", "num_machines"):
        value = config.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{key}: {value!r} must be a whole number >= 1")
        else:
            counts[key] = value
    machines = counts.get("num_machines", 1)
    if machines > 1:
        rank = config.get("machine_rank")
        if not isinstance(rank, int) or not 0 <= rank < machines:
            problems.append(f"machine_rank: {rank!r} must be 0 on the main machine and 1..{machines - 1} on the others")
        if not config.get("main_process_ip"):
            problems.append("main_process_ip: missing; set the main machine's address (every machine reaches it)")
        if counts.get("num_processes", machines) < machines:
            problems.append(f"num_processes: {counts['num_processes']} counts the processes of all {machines} "
                            "machines together; it cannot be fewer than num_machines")
    port = config.get("main_process_port")
    if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
        problems.append(f"main_process_port: {port!r} must be a TCP port number (1-65535)")
    if problems:
        raise LaunchConfigError(f"{path}: " + "; ".join(problems))
    return config


def accelerate_command(recipe: str, overrides: Sequence[str], processes: int | None = 1, resume: bool = False,
                       config_file: str | os.PathLike[str] | None = None, no_progress: bool = False) -> list[str]:
    """The ``accelerate launch`` command line for a recipe (what the studio UI runs, too).

    Without ``config_file``, the launcher flags for ``processes`` on this machine. STACK.md: ``--cpu
    --num_processes 2`` starts one process; two CPU processes need ``--multi_gpu`` with ``ACCELERATE_USE_CPU=true``
    (gloo DDP), which :func:`launch_env` (and the run itself, :func:`use_cpu_without_cuda`) provides. With a
    config file, ``processes`` (if given) overrides its ``num_processes``.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
        if processes is not None:
            cmd += ["--num_processes", str(processes)]
        config = _read_config(config_file)
        if int(config.get("num_machines", 1) or 1) == 1 and "main_process_port" not in config:
            cmd += ["--main_process_port", str(free_port())]
    else:
        processes = processes or 1
        cmd += ["--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
                "--num_processes", str(processes)]
        if processes > 1:
            cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
        elif not has_cuda():
            cmd.append("--cpu")
    cmd += ["-m", "cascade_studio.train", recipe, *overrides]
    if resume:
        cmd.append("--resume")
    if no_progress:
        cmd.append("--no-progress")
    return cmd


def free_port() -> int:
    """A TCP port free on this machine now, for a one-machine launch's rendezvous: torchrun's default (29500) is
    taken by any other multi-process run on the machine (two trainings on different GPUs, or the studio's job
    beside a command-line run), and the second launch then fails with "address already in use"."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _read_config(path: str | os.PathLike[str]) -> dict:
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}  # accelerate reports an unreadable file itself
    return config if isinstance(config, dict) else {}


def launch_env(processes: int | None, config_file: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The launcher's environment: on a machine without CUDA, several processes (or any config file) run on the
    CPU over gloo."""
    env = dict(os.environ)
    if ((processes or 1) > 1 or config_file is not None) and not has_cuda():
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def use_cpu_without_cuda() -> None:
    """In a process of a multi-process launch on a machine without CUDA, make accelerate use the CPU over gloo.

    accelerate only forms a process group on the CPU when told (``ACCELERATE_USE_CPU``); without it each process of
    ``accelerate launch --config_file multi-gpu.yaml`` would find no GPU and train alone, N runs in one folder.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_cuda():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def fsdp_requested() -> bool:
    """Whether the launcher was given an FSDP config (accelerate sets ``ACCELERATE_USE_FSDP`` from it)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False
