"""``attnguide demo`` in a real headless Chromium: generate, compare the two images, bad input.

The app runs as ``python -m attnguide demo`` on a free port of 127.0.0.1 with the bundled model (a
tiny random class-conditional UNet when the bundled model is absent). The browser is the system's
Chromium (Debian package ``chromium``), driven by Playwright's Python package: no browser download.
Skipped only when no Chromium is installed.

``ATTNGUIDE_DEMO_SCREENSHOT=docs/demo.png python -m pytest tests/test_demo.py -k generate_shows`` also
writes the screenshot there (64 colours), sampled with the app's default settings (more steps) instead
of the quick ones.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnguide.apps.loading import BUNDLED_MODEL

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
QUICK_STEPS = "5"
TIMEOUT_MS = 150_000  # one Generate (two sampling runs) on a busy 2-core CPU


def _chromium() -> str | None:
    for cand in (os.environ.get("ATTNGUIDE_CHROMIUM"), "/usr/bin/chromium"):
        if cand and os.access(cand, os.X_OK):
            return cand
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
needs_browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium installed (Debian: apt-get install chromium; or set ATTNGUIDE_CHROMIUM)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(tmp_root: Path) -> str:
    if (BUNDLED_MODEL / "training.json").exists():
        return str(BUNDLED_MODEL)
    from diffusers import DDPMScheduler

    from attnguide.pipelines import DDPMSAGPipeline
    from attnguide.tiny_models import tiny_unet_2d

    path = tmp_root / "tiny-ddpm"
    DDPMSAGPipeline(tiny_unet_2d(class_conditional=True), DDPMScheduler()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo app in a subprocess; yields its URL."""
    root = tmp_path_factory.mktemp("demo")
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["GRADIO_TEMP_DIR"] = str(root / "gradio")
    cmd = [sys.executable, "-m", "attnguide", "demo", "--model", _model_dir(root), "--port", str(port)]
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*cmd, "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root
        )
    url = f"http://127.0.0.1:{port}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with direct.open(url + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not start in 120 s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url, log_path, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")  # an empty --user-data-dir
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860},
        )
        try:
            yield ctx
        finally:
            ctx.close()


def _open(browser, url: str):
    """A fresh page of the app; the list it returns collects every request not to the app itself."""
    page = browser.new_page()
    outside: list[str] = []
    page.on(
        "request",
        lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url),
    )
    page.goto(url)
    page.wait_for_selector("#generate", timeout=60_000)
    return page, outside


def _set(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(value)
    box.press("Tab")


def _status(page) -> str:
    return page.locator("#status").inner_text()


def _wait_status(page, text: str) -> str:
    page.wait_for_function(
        "t => document.querySelector('#status').innerText.includes(t)", arg=text, timeout=TIMEOUT_MS
    )
    return _status(page)


def _image(page, elem_id: str) -> np.ndarray:
    """The pixels of the image shown in ``elem_id``, fetched through the page's own URL for it."""
    img = page.locator(f"#{elem_id} img")
    img.wait_for(timeout=TIMEOUT_MS)
    src = img.get_attribute("src")
    assert src, f"#{elem_id} shows no image"
    body = page.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


@needs_browser
def test_generate_shows_different_unguided_and_guided_images(server, browser, tmp_path):
    url, log_path, _ = server
    assert "Running on local URL:  http://127.0.0.1:" in log_path.read_text()  # bound to loopback only
    page, outside = _open(browser, url)
    target = os.environ.get("ATTNGUIDE_DEMO_SCREENSHOT")
    if not target:
        _set(page, "steps", QUICK_STEPS)
    page.click("#generate")
    status = _wait_status(page, "Done in")
    unguided, guided = _image(page, "unguided"), _image(page, "guided")
    assert unguided.shape == guided.shape and unguided.shape[0] >= 112  # upscaled grid of the seeds
    assert np.abs(unguided.astype(int) - guided.astype(int)).max() > 0, "guidance changed nothing"
    mask = _image(page, "mask")  # SAG (the default method) records its masks
    assert mask.shape == guided.shape
    assert "Guided: SAG" in status
    assert outside == [], f"the page made requests outside the app: {outside}"

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.exists() and shot.stat().st_size > 10_000
    if target:  # the README's screenshot: 64 colours keep it small
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        small = (
            Image.open(shot).convert("RGB").quantize(64, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        )
        small.save(target, optimize=True)
    page.close()


@needs_browser
def test_bad_input_shows_a_message_and_the_app_keeps_serving(server, browser):
    url, _, proc = server
    page, outside = _open(browser, url)

    _set(page, "steps", "0")
    page.click("#generate")
    status = _wait_status(page, "Error")
    assert "Steps must be a whole number from 1 to 500, got 0" in status

    _set(page, "steps", QUICK_STEPS)
    _set(page, "sag_scale", "-2")
    page.click("#generate")
    status = _wait_status(page, "SAG scale")
    assert "SAG scale must be a number from 0.0 to 10.0, got -2" in status

    _set(page, "sag_scale", "0.75")
    layer = page.locator("#layer input")
    layer.fill("no_such_block.attentions.7")
    layer.press("Enter")
    layer.press("Tab")
    page.click("#generate")
    status = _wait_status(page, "Unknown self-attention layer")
    assert "no_such_block.attentions.7" in status

    text = page.locator("body").inner_text()
    assert "Traceback" not in text and 'File "' not in text
    assert proc.poll() is None, "the app died on bad input"

    page.reload()  # a fresh form (default layer), then a valid request still works
    page.wait_for_selector("#generate", timeout=60_000)
    _set(page, "steps", QUICK_STEPS)
    page.click("#generate")
    _wait_status(page, "Done in")
    assert _image(page, "guided").size > 0
    assert outside == [], f"the page made requests outside the app: {outside}"
    page.close()


# ------------------------------------------------------------------------------- without a browser
@pytest.fixture(scope="module")
def tiny_model():
    from diffusers import DDPMScheduler

    from attnguide.apps.demo import DemoModel
    from attnguide.pipelines import DDPMSAGPipeline
    from attnguide.tiny_models import tiny_unet_2d

    return DemoModel(DDPMSAGPipeline(tiny_unet_2d(class_conditional=True, sample_size=8), DDPMScheduler()))


def _form(model, **change):
    form = dict(
        method="SAG",
        sag_scale=0.75,
        pag_scale=1.0,
        cfg_scale=3.0,
        blur_sigma=1.0,
        layer=model.default_layer,
        steps=2,
        scheduler="ddim",
        seed=0,
        label="3",
        prompt="",
        num_images=2,
    )
    form.update(change)
    return list(form.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "Steps must be a whole number from 1 to 500, got 0."),
        ({"steps": 2.5}, "Steps must be a whole number"),
        ({"steps": None}, "Steps is empty"),
        ({"sag_scale": -1}, "SAG scale must be a number from 0.0 to 10.0, got -1."),
        ({"pag_scale": float("nan")}, "PAG scale must be a number"),
        ({"cfg_scale": 1e9}, "CFG scale must be a number from 1.0 to 30.0"),
        ({"blur_sigma": 0}, "Blur sigma must be a number"),
        ({"layer": "mid_block.attentions.9"}, "Unknown self-attention layer 'mid_block.attentions.9'"),
        ({"scheduler": "magic"}, "Unknown scheduler 'magic'"),
        ({"method": "XYZ"}, "Unknown method 'XYZ'"),
        ({"label": "12"}, "Unknown class label '12'"),
        ({"method": "CFG", "label": "unconditional (null label)"}, "CFG needs a class label"),
    ],
)
def test_bad_form_values_become_messages(tiny_model, change, message):
    from attnguide.apps.demo import generate

    base, guided, mask, status = generate(tiny_model, *_form(tiny_model, **change))
    assert base is None and guided is None and mask is None
    assert status.startswith("**Error:** ") and message in status
    assert "Traceback" not in status


def test_generate_in_process(tiny_model):
    from attnguide.apps.demo import TILE_PIXELS, generate

    seen = []
    base, guided, mask, status = generate(
        tiny_model, *_form(tiny_model), progress=lambda frac, desc: seen.append((frac, desc))
    )
    assert status.startswith("Done in") and "labels [3, 3]" in status
    assert base.size == guided.size == mask.size and base.size[1] >= TILE_PIXELS
    assert np.asarray(base).tobytes() != np.asarray(guided).tobytes()
    assert seen[0][0] == 0.0 and seen[-1] == (1.0, "SAG: step 2/2")
    # blur guidance: no attention mask, and says so
    _, _, mask, status = generate(tiny_model, *_form(tiny_model, method="blur"))
    assert mask is None and "blur guidance blurs the whole image" in status
