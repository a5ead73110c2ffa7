"""The dummy method's recipe section and catalog record (torch-free, like every method's config.py)."""
from __future__ import annotations

from dataclasses import dataclass

from cascade_studio.adapters.catalog import ExportFormat, Method, register
from cascade_studio.config.fields import setting


@dataclass(frozen=True)
class DummyBiasConfig:
    """A learned bias added to every channel of Stage C's output (zero at the start)."""

    scale: float = setting(1.0, "Multiplier on the learned bias at inference.", minimum=0, example=1.0)


def check(section: DummyBiasConfig, recipe, ok, add) -> None:
    if ok("adapter.dummy_bias.scale") and section.scale > 10:
        add("adapter.dummy_bias.scale", section.scale, "is implausibly large for a bias multiplier", "e.g. 1.0")


METHOD = register(Method(
    name="dummy_bias", label="Dummy bias", doc="a per-channel output bias (a test-only fourth method)",
    config=DummyBiasConfig,
    formats=(ExportFormat("bias", "one .safetensors file with dummy_bias.bias"),
             ExportFormat("bias_fp16", "the same tensor stored in fp16")),
    implementation="dummy_bias.method", aliases=("db",), weight_name="scale", weight_prefix="x", check=check))
