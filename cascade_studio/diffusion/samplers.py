"""The samplers by name: what ``--sampler``, ``GenerateSettings.sampler``, ``preview.sampler`` and a compare
column's ``::sampler=`` choose from. Imports no torch (the schema and the command line read the names); each
record names the function that samples, imported on first use.

Every sampler function takes the arguments of :func:`cascade_studio.diffusion.sampler.sample` except ``eta``
(``model, shape, cond, uncond, steps, cfg, rho, shift`` and the keyword arguments ``x_init, t_start, generator,
noise, callback, return_x0, device``), so callers switch samplers by name only. A sampler that is not
``guided`` runs no classifier-free-guidance pass: it ignores ``uncond``, ``cfg`` and ``rho``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["SamplerInfo", "SAMPLERS", "DEFAULT_SAMPLER", "sampler_names", "get_sampler", "sample_with",
           "sampler_help"]


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler: its name, what it is, whether it runs a CFG pass and where its function is
    (``module:function``)."""

    name: str
    doc: str
    guided: bool
    function: str

    def load(self) -> Callable[..., Any]:
        module, _, attribute = self.function.partition(":")
        return getattr(importlib.import_module(module), attribute)


SAMPLERS: dict[str, SamplerInfo] = {info.name: info for info in (
    SamplerInfo("ddpm", "ancestral DDIM with eta 1, the official Stable Cascade default", True,
                "cascade_studio.diffusion.sampler:sample_ddpm"),
    SamplerInfo("ddim", "deterministic DDIM (eta 0)", True, "cascade_studio.diffusion.sampler:sample_ddim"),
    SamplerInfo("lcm", "multistep consistency sampling for LCM-LoRAs, 2-8 steps, no CFG pass", False,
                "cascade_studio.diffusion.lcm:sample_lcm"),
)}
# The published pipelines sample Stage C and Stage B with the ancestral ("DDPM", eta 1) sampler.
DEFAULT_SAMPLER = "ddpm"


def sampler_names() -> tuple[str, ...]:
    """Every registered sampler name, in registration order."""
    return tuple(SAMPLERS)


def sampler_help() -> str:
    """``ddpm (...), ddim (...)``: the samplers in words, for ``--help`` and field docs."""
    return ", ".join(f"{info.name} ({info.doc})" for info in SAMPLERS.values())


def get_sampler(name: str) -> SamplerInfo:
    """The record of sampler ``name``; an unknown name raises ValueError listing the registered ones."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def sample_with(name: str, *args: Any, **kwargs: Any) -> Any:
    """Sample with the sampler called ``name`` (arguments as for ``sampler.sample`` without ``eta``)."""
    return get_sampler(name).load()(*args, **kwargs)
