"""The Generate page (issue 18 item 5), driven with Streamlit's AppTest: one adapter (a run's, or a file under
an allowed folder) with a prompt, seed, steps and strength, queued as the studio's own compare job and drawn by
the real job runner on the tiny preset; the page shows the images and where they were saved."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade_studio.ui import jobs as jobs_module
from cascade_studio.ui.commands import Column, CompareRequest
from cascade_studio.ui.jobs import TERMINAL, JobQueue
from cascade_studio.ui.workspace import Workspace
from test_ui_pages import make_run, page, texts, ws  # noqa: F401 - ws is a fixture


@pytest.mark.slow  # about 15-25 s: a real compare job (torch import, tiny cascade)
def test_generate_draws_the_base_and_the_runs_adapter_through_the_compare_job(ws, monkeypatch) -> None:
    run_dir = make_run(ws, "tiny-lora", "a" * 32)
    # the real job runner (the ws fixture puts a stand-in there for the other pages)
    monkeypatch.setattr(jobs_module, "_default_runner", lambda: [sys.executable, "-m", "cascade_studio.ui.runner"])
    at = page("generate")
    assert at.selectbox(key="gen_run").value == str(run_dir)
    at.text_area(key=f"gen_prompt-{run_dir}").set_value("a large blue square")
    at.number_input(key="gen_seed").set_value(3)
    at.number_input(key="gen_steps").set_value(2)
    at.number_input(key="gen_strength").set_value(4.0)
    at.run()
    assert not at.error and not at.button(key="gen_go").disabled
    at.button(key="gen_go").click().run()
    [job] = JobQueue(ws).jobs()
    request = CompareRequest.from_args(job.args)
    assert request.columns == (Column("base"), Column("run", str(run_dir), weight=4.0))
    assert (request.prompts, request.seeds, request.steps, request.preset) == (("a large blue square",), (3,), 2,
                                                                               "tiny")
    deadline = time.monotonic() + 180
    while JobQueue(ws).get(job.id).status not in TERMINAL and time.monotonic() < deadline:
        JobQueue(ws).pump()
        time.sleep(0.5)
    assert JobQueue(ws).get(job.id).status == "finished", JobQueue(ws).log_tail(job)
    at.run()
    out = Path(request.out)
    images = at.get("image")
    assert [i.caption for element in images for i in element.proto.imgs][0] == "base"
    assert len(images) == 2 and f"Saved in `{out}`" in texts(at.caption)
    base, adapted = (np.asarray(Image.open(p)).astype(int) for p in sorted((out / "cells").glob("r0_c*.png")))
    assert base.shape == adapted.shape and (base != adapted).any()  # the adapter (random, tiny) changed pixels


def test_an_adapter_file_must_lie_under_an_allowed_folder(ws: Workspace, tmp_path: Path, monkeypatch) -> None:
    run_dir = make_run(ws, "tiny-lora", "b" * 32)
    allowed, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    for folder in (allowed, elsewhere):
        folder.mkdir()
        shutil.copy(run_dir / "export" / "tiny-lora-comfyui.safetensors", folder / "mine.safetensors")
    monkeypatch.setenv("CASCADE_STUDIO_ALLOW_PATHS", str(allowed))
    at = page("generate")
    at.radio(key="gen_source").set_value("an adapter file").run()
    at.text_input(key="gen_file").set_value(str(elsewhere / "mine.safetensors")).run()
    assert "--allow-path" in texts(at.error) and at.button(key="gen_go").disabled
    at.text_input(key="gen_file").set_value(str(allowed / "mine.safetensors")).run()
    assert not at.error and not at.button(key="gen_go").disabled
    at.button(key="gen_go").click().run()
    [job] = JobQueue(ws).jobs()
    assert CompareRequest.from_args(job.args).columns[1] == Column("file", str(allowed / "mine.safetensors"))


def test_an_unguided_sampler_samples_the_adapters_image_at_its_own_steps(ws: Workspace) -> None:
    """The quick LCM-LoRA try: the adapter's image with the lcm sampler at 4 steps, the base image as published."""
    make_run(ws, "tiny-lora", "c" * 32)
    at = page("generate")
    at.selectbox(key="gen_sampler").set_value("lcm").run()
    assert at.number_input(key="gen_own_steps-lcm").value == 4
    at.button(key="gen_go").click().run()
    [job] = JobQueue(ws).jobs()
    base, adapter = CompareRequest.from_args(job.args).columns
    assert base.spec() == "base" and adapter.spec().endswith("::sampler=lcm,steps=4")
