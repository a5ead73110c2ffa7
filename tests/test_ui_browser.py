"""End to end in a real browser: ``cascade-studio ui`` in a subprocess, driven by headless Chromium (Playwright).

Launches the tiny LoRA recipe from the Launch page, waits for it to finish, finds its loss chart on the Runs page,
compares base vs the new adapter on the Compare page and sees the grid, exports it, and screenshots every page to
test-artifacts/ (and the README's docs/screenshots/ when CASCADE_STUDIO_UPDATE_SCREENSHOTS=1). Debian's chromium is
required (``apt-get install -y chromium``; .ci/run installs it): without it this test fails, it never skips.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cascade_studio.ui.jobs import JobQueue, group_alive
from cascade_studio.ui.workspace import REPO_ROOT, Workspace

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Debian's chromium, which .ci/run installs
CHROMIUM = shutil.which("chromium") or "chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO_ROOT / "test-artifacts"
README_SHOTS = {"runs.png", "compare.png"}
# A short run that still checkpoints and renders previews, so every page has something to show.
OVERRIDES = "\n".join(["train.max_steps=6", "train.checkpoint_every=3", "preview.every=3", "preview.steps=4",
                       "preview.prompts=[a small red circle]", "preview.seeds=[0]"])
JOB_TIMEOUT_MS = 240_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the studio did not answer at {url} within {timeout:.0f} s")


def _shot(page, name: str) -> None:
    """Screenshot the whole page. Streamlit scrolls an inner container, so a full-page screenshot would stop at
    the viewport: the viewport is stretched to the content's height for the shot instead."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_timeout(800)  # let charts and images finish their layout
    size = page.viewport_size
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], min(int(height) + 40, 4000))})
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / name))
    page.set_viewport_size(size)
    if os.environ.get("CASCADE_STUDIO_UPDATE_SCREENSHOTS") == "1" and name in README_SHOTS:
        (REPO_ROOT / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTIFACTS / name, REPO_ROOT / "docs" / "screenshots" / name)


def _stop(server: subprocess.Popen, workspace: Workspace) -> None:
    """Stop the server's process group, then every job the studio started (each has its own group)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(server.pid, signal.SIGKILL)
    if workspace.jobs_dir.is_dir():
        for job in JobQueue(workspace).jobs():
            if job.pid is not None and group_alive(job.pid):
                os.killpg(job.pid, signal.SIGKILL)


def test_studio_end_to_end_in_chromium(tmp_path: Path) -> None:
    assert shutil.which("chromium"), "Debian's chromium is missing: apt-get install -y chromium (.ci/run does this)"
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # the first scan imports torch in the server; CI machines are slow

    workspace = Workspace(tmp_path / "ws")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "cascade_studio.cli", "ui", "--workspace", str(workspace.root),
                               "--port", str(port)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        _wait_http(f"{url}/_stcore/health", 90)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(60_000)

            page.goto(f"{url}/")  # the default page (Recipes) lives at the root URL
            expect(page.get_by_text("Valid recipe.", exact=True)).to_be_visible()
            _shot(page, "recipes.png")

            page.goto(f"{url}/data")
            expect(page.get_by_text("Usable images")).to_be_visible()
            expect(page.get_by_text("small red circle").first).to_be_visible()
            _shot(page, "data.png")

            # Launch: the tiny LoRA recipe is the default choice; shorten it with validated overrides.
            page.goto(f"{url}/launch")
            expect(page.get_by_text("Ready:")).to_be_visible()
            overrides = page.get_by_label("Overrides (optional)", exact=True)
            overrides.fill(OVERRIDES)
            overrides.press("Control+Enter")
            expect(page.get_by_text("Ready:")).to_be_visible()
            page.get_by_role("button", name="Queue training").click()
            expect(page.get_by_text("Queued train tiny-lora")).to_be_visible()
            expect(page.get_by_text(re.compile(r"step [1-6]/6")).first).to_be_visible(timeout=JOB_TIMEOUT_MS)
            _shot(page, "launch.png")
            expect(page.get_by_text("train tiny-lora (shipped: tiny/lora.yaml) · finished")).to_be_visible(
                timeout=JOB_TIMEOUT_MS)
            job = JobQueue(workspace).jobs()[0]
            assert job.status == "finished", JobQueue(workspace).log_tail(job, 60)

            page.goto(f"{url}/runs")
            expect(page.get_by_text("Training loss")).to_be_visible()
            expect(page.locator("[data-testid='stVegaLiteChart']").first).to_be_visible()
            expect(page.get_by_text("Preview at step")).to_be_visible()
            expect(page.get_by_role("button", name="Download tiny-lora-comfyui.safetensors")).to_be_visible()
            _shot(page, "runs.png")

            # Compare base vs the new adapter (the run's exported LoRA), one prompt, one seed, few steps.
            page.goto(f"{url}/compare")
            runs_box = page.get_by_label("Runs (their exported adapter, else the latest checkpoint)", exact=True)
            runs_box.click()
            page.get_by_role("option", name="tiny-lora").click()
            page.keyboard.press("Escape")
            steps = page.get_by_label("Stage C steps", exact=True)
            steps.fill("4")
            steps.press("Enter")
            expect(page.get_by_role("button", name="Run comparison")).to_be_enabled()
            page.get_by_role("button", name="Run comparison").click()
            expect(page.get_by_text("Column 2: lora tiny-lora")).to_be_visible(timeout=JOB_TIMEOUT_MS)
            grid = page.locator("[data-testid='stImage'] img").first
            expect(grid).to_be_visible()
            assert grid.evaluate("img => img.naturalWidth") > 0
            _shot(page, "compare.png")
            assert len(list(workspace.comparisons_dir.glob("*/grid.png"))) == 1

            page.goto(f"{url}/export")
            page.get_by_role("button", name="Export", exact=True).click()
            expect(page.get_by_text("Exported tiny-lora-step6-comfyui.safetensors")).to_be_visible(timeout=120_000)
            _shot(page, "export.png")
            browser.close()
    finally:
        _stop(server, workspace)
        log.close()
    server_log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in server_log, server_log[-3000:]


def _served_image(page, base_url: str, img):
    """The pixels of an <img> exactly as the studio served them to the browser."""
    import io
    from urllib.parse import urljoin

    import numpy as np
    from PIL import Image

    response = page.request.get(urljoin(base_url + "/", img.get_attribute("src")))
    assert response.ok, f"{img.get_attribute('src')}: HTTP {response.status}"
    with Image.open(io.BytesIO(response.body())) as image:
        return np.asarray(image.convert("RGB"))


def test_compare_page_shows_the_same_grid_as_the_compare_command(toy_workspace: Path, tmp_path: Path) -> None:
    """The demo's LoRA (trained by the demo's own function) compared with the toy base on the Compare page in
    Chromium, and with ``cascade-studio compare`` in a fresh process: the grid the page shows is the command's
    grid, pixel for pixel (no channel of any pixel more than 2/255 apart; both processes sample with one torch
    thread, so the tolerance only absorbs rounding). The page's <img> is fetched as the browser received it."""
    assert shutil.which("chromium"), "Debian's chromium is missing: apt-get install -y chromium (.ci/run does this)"
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    from cascade_studio.demo import DEMO_SEEDS, LORA_PROMPTS, train_lora

    expect.set_options(timeout=60_000)
    adapter = train_lora(toy_workspace)
    workspace = Workspace(toy_workspace)
    # One torch thread in both processes that sample (the studio's job and the command), as conftest.py sets here.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cli_out = tmp_path / "cli"
    done = subprocess.run([str(Path(sys.executable).with_name("cascade-studio")), "compare", "--preset", "toy",
                           "--columns", "base", f"lora:{adapter}", *[f"--prompt={p}" for p in LORA_PROMPTS],
                           "--seeds", *map(str, DEMO_SEEDS), "--out", str(cli_out), "--workspace", str(toy_workspace),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with Image.open(cli_out / "grid.png") as image:
        cli_grid = np.asarray(image.convert("RGB"))

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "cascade_studio.cli", "ui", "--workspace", str(workspace.root),
                               "--port", str(port)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, env=env)
    try:
        _wait_http(f"{url}/_stcore/health", 90)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{url}/compare")
            files_box = page.get_by_label("Adapter files", exact=True)
            files_box.click()
            page.get_by_role("option", name=str(adapter.relative_to(workspace.root))).click()
            page.keyboard.press("Escape")
            prompts = page.get_by_label("Prompts (one per line)", exact=True)
            prompts.fill("\n".join(LORA_PROMPTS))
            prompts.press("Control+Enter")
            seeds = page.get_by_label("Seeds", exact=True)
            seeds.fill(" ".join(map(str, DEMO_SEEDS)))
            seeds.press("Enter")
            page.get_by_role("button", name="Run comparison").click()
            expect(page.get_by_text(f"Column 2: lora {adapter.stem} x1")).to_be_visible(timeout=JOB_TIMEOUT_MS)
            grid = page.locator("[data-testid='stImage'] img").first
            expect(grid).to_be_visible()
            shown = _served_image(page, url, grid)
            _shot(page, "compare-toy-lora.png")
            browser.close()
    finally:
        _stop(server, workspace)
        log.close()
    saved = list(workspace.comparisons_dir.glob("*/grid.png"))
    assert len(saved) == 1, saved
    with Image.open(saved[0]) as image:
        page_grid = np.asarray(image.convert("RGB"))
    for name, grid_pixels in (("the grid the page saved", page_grid), ("the grid the page shows", shown)):
        assert grid_pixels.shape == cli_grid.shape, f"{name}: {grid_pixels.shape} vs the command's {cli_grid.shape}"
        difference = np.abs(grid_pixels.astype(int) - cli_grid.astype(int)).max()
        assert difference <= 2, f"{name} differs from the command's grid by up to {difference}/255"
    server_log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in server_log, server_log[-3000:]
