"""End to end in a real browser: ``cascade-studio ui`` in a subprocess, driven by headless Chromium (Playwright).

The walk: edit a caption on the Data page, launch the toy LoRA recipe, get told it finished, the run's actions on
the Runs page, compare base vs the adapter (the taught colour measured on the cells), generate on the Generate page,
export; every page is screenshotted to test-artifacts/ (and the README's docs/screenshots/ when
CASCADE_STUDIO_UPDATE_SCREENSHOTS=1). Debian's chromium is
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
from tests.subprocess_env import child_env
from cascade_studio.ui.workspace import REPO_ROOT, Workspace

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Debian's chromium, which .ci/run installs
CHROMIUM = shutil.which("chromium") or "chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO_ROOT / "test-artifacts"
# Every page the walk visits; the README's studio section shows them.
README_SHOTS = {"recipes.png", "data.png", "launch.png", "runs.png", "compare.png", "generate.png", "export.png"}
WALK_PROMPTS = ("a large purple circle", "a large purple square", "a small purple triangle", "a large purple triangle")
JOB_TIMEOUT_MS = 600_000  # the toy LoRA trains 300 steps: about a minute and a half on 2 idle cores


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


def _settle(page) -> None:
    """Wait until the app has finished its rerun (Streamlit's running indicator is gone), so elements of the
    previous run are no longer on the page."""
    from playwright.sync_api import expect

    page.wait_for_timeout(300)
    expect(page.get_by_test_id("stStatusWidget")).to_be_hidden(timeout=60_000)


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


def test_studio_walk_in_chromium(tmp_path: Path) -> None:
    """The walk a new user takes: edit a caption on the Data page, launch the toy LoRA recipe on the purple split
    from the Launch page, get told when it finishes, find the run's actions on the Runs page, compare base vs the
    new adapter (the LoRA column shows the colour it was taught, measured on the cells' pixels), generate one
    image on the Generate page and export. The grid the page shows is the grid `cascade-studio compare` makes.
    Every page is screenshotted on the way (docs/screenshots/ when
    CASCADE_STUDIO_UPDATE_SCREENSHOTS=1)."""
    assert shutil.which("chromium"), "Debian's chromium is missing: apt-get install -y chromium (.ci/run does this)"
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    from cascade_studio.demo import held_out_share, toy_shapes

    expect.set_options(timeout=60_000)  # the first scan imports torch in the server; CI machines are slow
    workspace = Workspace(tmp_path / "ws")
    data = toy_shapes().ensure_split("purple", workspace.root / "datasets")
    captions_before = {p.name: p.read_text() for p in sorted(data.glob("*.txt"))}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    # One torch thread in the studio and every job it starts (accelerate takes OMP_NUM_THREADS), as in the other
    # test processes: two threads per process on 2 busy cores stall in OpenMP's waits.
    server = subprocess.Popen([sys.executable, "-m", "cascade_studio.cli", "ui", "--workspace", str(workspace.root),
                               "--port", str(port)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, env={**child_env(), "PYTHONUNBUFFERED": "1"})
    try:
        _wait_http(f"{url}/_stcore/health", 90)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(60_000)

            page.goto(f"{url}/")  # the default page (Recipes) lives at the root URL
            expect(page.get_by_text("Valid recipe.", exact=True)).to_be_visible()
            _shot(page, "recipes.png")

            # Data: open the purple split and edit one caption in place.
            page.goto(f"{url}/data")
            folder_box = page.get_by_label("Or type a folder path", exact=True)
            folder_box.fill(str(data))
            folder_box.press("Enter")
            expect(page.get_by_text("Usable images")).to_be_visible()
            page.get_by_role("tab", name="Edit captions").click()
            caption = page.get_by_label("Caption", exact=True)
            expect(caption).to_be_visible()
            edited = caption.input_value().strip() + ", flat colours"
            caption.fill(edited)
            caption.press("Control+Enter")
            page.get_by_role("button", name="Save caption").click()
            expect(page.get_by_text(re.compile("Saved"))).to_be_visible()
            _shot(page, "data.png")
            changed = {p.name: p.read_text().strip() for p in sorted(data.glob("*.txt"))
                       if p.read_text() != captions_before[p.name]}
            assert list(changed.values()) == [edited], changed

            # Launch the toy LoRA recipe on that folder; the end of the job is announced on whatever page is open.
            page.goto(f"{url}/launch")
            page.get_by_label("Recipe", exact=True).click()
            page.get_by_role("option", name="shipped: toy/lora.yaml").click()
            overrides = page.get_by_label("Overrides (optional)", exact=True)
            overrides.fill(f"data.path={data}")
            overrides.press("Control+Enter")
            expect(page.get_by_text("Ready:")).to_be_visible()
            page.get_by_role("button", name="Queue training").click()
            expect(page.get_by_text(re.compile(r"Queued train toy-lora-purple"))).to_be_visible()
            expect(page.get_by_text(re.compile(r"step \d+/300")).first).to_be_visible(timeout=JOB_TIMEOUT_MS)
            _shot(page, "launch.png")
            expect(page.get_by_test_id("stToast").filter(has_text="toy-lora-purple")).to_contain_text(
                "finished", timeout=JOB_TIMEOUT_MS)
            job = JobQueue(workspace).jobs()[0]
            assert job.status == "finished", JobQueue(workspace).log_tail(job, 60)

            page.goto(f"{url}/runs")
            expect(page.get_by_text("Training loss")).to_be_visible()
            for action in ("Train further", "Clone into the recipe editor", "Delete this run"):
                expect(page.get_by_role("button", name=action)).to_be_visible()
            _shot(page, "runs.png")

            # Compare base vs the new adapter on purple prompts (a colour the toy base never saw).
            page.goto(f"{url}/compare")
            runs_box = page.get_by_label("Runs (their exported adapter, else the latest checkpoint)", exact=True)
            runs_box.click()
            page.get_by_role("option", name="toy-lora-purple").click()
            page.keyboard.press("Escape")
            # The prompts box is keyed on the first chosen run: the rerun draws a new one and drops the old one.
            expect(page.get_by_label("Strength: run toy-lora-purple", exact=True)).to_be_visible()
            _settle(page)
            prompts = page.get_by_label("Prompts (one per line)", exact=True)
            expect(prompts).to_have_count(1)
            prompts.fill("\n".join(WALK_PROMPTS))
            prompts.press("Control+Enter")
            seeds = page.get_by_label("Seeds", exact=True)
            seeds.fill("0 1")
            seeds.press("Enter")
            page.get_by_role("button", name="Run comparison").click()
            expect(page.get_by_text(re.compile("Column 2: lora toy-lora-purple"))).to_be_visible(
                timeout=JOB_TIMEOUT_MS)
            shown_grid = page.locator("[data-testid='stImage'] img").first
            expect(shown_grid).to_be_visible()
            shown = _served_image(page, url, shown_grid)
            _shot(page, "compare.png")
            [grid] = list(workspace.comparisons_dir.glob("*/grid.png"))
            _assert_same_grid_as_the_command(grid, shown, workspace, tmp_path / "cli")
            columns = [[np.asarray(Image.open(p).convert("RGB")) for p in sorted(grid.parent.glob(f"cells/r*_c{c}.png"))]
                       for c in (0, 1)]
            assert len(columns[1]) == 2 * len(WALK_PROMPTS)
            base_share, lora_share = (held_out_share(column, "purple") for column in columns)
            assert lora_share >= 0.6 and base_share <= 0.25, (base_share, lora_share)

            # Generate one image with the run's adapter.
            page.goto(f"{url}/generate")
            prompt = page.get_by_label("Prompt", exact=True)
            prompt.fill("a large purple circle")
            prompt.press("Control+Enter")
            page.get_by_role("button", name="Generate", exact=True).click()
            generate_job = lambda: [j for j in JobQueue(workspace).jobs() if j.label.startswith("generate")]  # noqa: E731
            expect(page.locator("[data-testid='stImage'] img").first).to_be_visible(timeout=JOB_TIMEOUT_MS)
            _shot(page, "generate.png")
            [done] = generate_job()
            assert done.status == "finished", JobQueue(workspace).log_tail(done, 60)
            cells = sorted(Path(done.run_dir).glob("cells/*.png"))
            assert cells and all(Image.open(p).size[0] > 0 for p in cells), cells

            page.goto(f"{url}/export")
            page.get_by_role("button", name="Export", exact=True).click()
            expect(page.get_by_text(re.compile(r"Exported toy-lora-purple-step300-comfyui.safetensors"))).to_be_visible(
                timeout=120_000)
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


def _assert_same_grid_as_the_command(page_grid: Path, shown, workspace: Workspace, out: Path) -> None:
    """The grid the Compare page saved and the one the browser received are the grid ``cascade-studio compare``
    makes in a fresh process with the same columns, prompts and seeds: no channel of any pixel more than 2/255
    apart (both processes sample with one torch thread, child_env's; the tolerance only absorbs rounding)."""
    import json

    import numpy as np
    from PIL import Image

    manifest = json.loads((page_grid.parent / "manifest.json").read_text())
    prompts, seeds = manifest["prompts"], [str(seed) for seed in manifest["seeds"]]
    [run_dir] = [p for p in workspace.runs_dir.iterdir() if p.is_dir()]
    done = subprocess.run([str(Path(sys.executable).with_name("cascade-studio")), "compare", "--preset", "toy",
                           "--columns", "base", f"run:{run_dir}", *[f"--prompt={p}" for p in prompts],
                           "--seeds", *seeds, "--out", str(out), "--workspace", str(workspace.root), "--no-progress"],
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with Image.open(out / "grid.png") as image:
        cli_grid = np.asarray(image.convert("RGB"))
    with Image.open(page_grid) as image:
        saved = np.asarray(image.convert("RGB"))
    for name, pixels in (("the grid the page saved", saved), ("the grid the page shows", shown)):
        assert pixels.shape == cli_grid.shape, f"{name}: {pixels.shape} vs the command's {cli_grid.shape}"
        difference = np.abs(pixels.astype(int) - cli_grid.astype(int)).max()
        assert difference <= 2, f"{name} differs from the command's grid by up to {difference}/255"
