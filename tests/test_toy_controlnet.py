"""The toy ControlNet (``recipes/toy/controlnet.yaml``): a shape drawn where its edge image says. Separate from
test_toy.py so that pytest-xdist (``--dist loadfile``) trains it beside the IP-Adapter on the other worker."""
from __future__ import annotations

import pytest

from cascade_studio.demo import controlnet_iou, load_trained, toy_shapes, train_toy_recipe


# Prompts name size, colour and shape but not the place; only the edge image says where. Measured on these 50
# test shapes: IoU ~0.12 without the ControlNet (the base puts shapes anywhere), ~0.57 with it. The ceiling is
# well below 1: the toy previewer decodes 8x8 latents to soft-edged blobs (IoU ~0.8 for a plain
# encode -> decode round trip) and guidance at cfg 4 enlarges shapes.
@pytest.mark.slow
def test_toy_controlnet_puts_the_shape_where_the_edges_are(toy_workspace):
    adapter = train_toy_recipe("controlnet", toy_workspace, "control")
    scores = controlnet_iou(load_trained(adapter, name="controlnet"), "controlnet",
                            toy_shapes().sample_specs("test")[:50])
    assert scores[False] < 0.2, f"IoU {scores[False]:.2f} without the ControlNet"
    assert scores[True] >= 0.5, f"IoU {scores[True]:.2f} with the ControlNet"
