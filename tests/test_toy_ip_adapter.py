"""The toy IP-Adapter (``recipes/toy/ip-adapter.yaml``, image encoder ``toy``): an image prompt's colour
carried over when the text names none. Its own file for the same reason as test_toy_controlnet.py."""
from __future__ import annotations

import pytest

from cascade_studio.demo import ip_colour_share, toy_shapes, train_toy_recipe

SHAPES_MEASURED = 50


# Text prompts name no colour ("a large circle"); the image prompt is a rendered test shape. Measured on the cells
# of `compare --preset toy --columns base ip:<adapter> --image-prompt <shape.png>` (one comparison per test shape,
# seed 0): the base draws the image prompt's colour in 18% of samples (by chance), the IP-Adapter in 80%.
@pytest.mark.slow
def test_toy_ip_adapter_passes_on_the_image_prompts_colour(toy_workspace):
    adapter = train_toy_recipe("ip-adapter.yaml", toy_workspace, "control")
    base, prompted = ip_colour_share(adapter, toy_shapes().sample_specs("test")[:SHAPES_MEASURED], toy_workspace,
                                     toy_workspace / "compare")
    assert base < 0.4, f"image prompt's colour in {base:.0%} of samples without the IP-Adapter"
    assert prompted >= 0.7, f"image prompt's colour in {prompted:.0%} of samples with the IP-Adapter"
