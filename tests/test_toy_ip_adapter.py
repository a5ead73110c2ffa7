"""The toy IP-Adapter (``recipes/toy/ip-adapter.yaml``, image encoder ``toy``): an image prompt's colour
carried over when the text names none. Its own file for the same reason as test_toy_controlnet.py."""
from __future__ import annotations

import pytest

from cascade_studio.demo import ip_colour_share, load_trained, toy_shapes, train_toy_recipe


# Text prompts name no colour ("a large circle"); the image prompt is a rendered test shape. Measured: the base
# draws the image prompt's colour in about a fifth of samples by chance, the IP-Adapter in about four fifths.
@pytest.mark.slow
def test_toy_ip_adapter_passes_on_the_image_prompts_colour(toy_workspace):
    adapter = train_toy_recipe("ip-adapter", toy_workspace, "control")
    shares = ip_colour_share(load_trained(adapter, name="ip_adapter"), "ip_adapter",
                             toy_shapes().sample_specs("test")[:50])
    assert shares[False] < 0.4, f"image prompt's colour in {shares[False]:.0%} of samples without the IP-Adapter"
    assert shares[True] >= 0.7, f"image prompt's colour in {shares[True]:.0%} of samples with the IP-Adapter"
