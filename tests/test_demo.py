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
import math
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
    assert "open http://127.0.0.1:" in log_path.read_text()  # bound to loopback only
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
    assert "Steps must be a whole number from 1 to 1000, got 0" in status

    _set(page, "steps", QUICK_STEPS)
    _set(page, "sag_scale", "-2")
    page.click("#generate")
    status = _wait_status(page, "SAG scale")
    assert "SAG scale must be a number in [0, 100], got -2" in status

    _set(page, "sag_scale", "0.75")
    _set(page, "seg_sigma", "abc")  # a Textbox (a gr.Number cannot hold SEG's default, inf)
    page.click("#generate")
    status = _wait_status(page, "SEG sigma")
    assert "SEG sigma must be a number > 0, or inf (every query is the mean query), got 'abc'." in status

    _set(page, "seg_sigma", "inf")
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

    page.locator("#methods").get_by_text("Methods", exact=True).click()  # the accordion opens
    table = page.locator("#methods table")
    table.wait_for(timeout=10_000)
    rows = table.locator("tbody tr").all_inner_texts()
    names = [
        "SAG",
        "blur",
        "PAG",
        "SEG",
        "TPG",
        "SLG",
        "PLADIS",
        "CFG",
        "NAG",
        "APG",
        "CFG-Zero*",
        "TCFG",
        "FDG",
        "guidance",
    ]
    assert [r.split()[0] for r in rows] == names
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
    """The form's values in the order the demo takes them (``FORM_FIELDS``), with ``change``; a field of
    a term not named here takes its form default."""
    from attnguide.apps.demo import FORM_FIELDS, TERM_FIELDS

    form = dict(
        method="SAG",
        sag_scale=0.75,
        pag_scale=1.0,
        cfg_scale=3.0,
        sag_sigma=1.0,
        seg_scale=3.0,
        seg_sigma="inf",
        tpg_scale=1.0,
        slg_scale=1.0,
        layer=model.default_layer,
        steps=2,
        scheduler="ddim",
        seed=0,
        label="3",
        prompt="",
        num_images=2,
    )
    form.update(change)
    defaults = {name: setting.app_default for name, _, setting in TERM_FIELDS}
    return [form[name] if name in form else defaults[name] for name in FORM_FIELDS]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "Steps must be a whole number from 1 to 1000, got 0."),
        ({"steps": 2.5}, "Steps must be a whole number"),
        ({"steps": None}, "Steps is empty"),
        ({"sag_scale": -1}, "SAG scale must be a number in [0, 100], got -1."),
        ({"pag_scale": float("nan")}, "PAG scale must be a number"),
        ({"cfg_scale": 1e9}, "CFG scale must be a number from 0.0 to 100.0"),
        ({"sag_sigma": 0}, "Blur sigma must be a number"),
        ({"seg_scale": -1}, "SEG scale must be a number in [0, 100], got -1."),
        ({"seg_sigma": 0}, "SEG sigma must be a number > 0, or inf (every query is the mean query), got 0."),
        (
            {"seg_sigma": -1},
            "SEG sigma must be a number > 0, or inf (every query is the mean query), got -1.",
        ),
        ({"seg_sigma": "-inf"}, "SEG sigma must be a number > 0, or inf"),
        ({"seg_sigma": "nan"}, "SEG sigma must be a number > 0, or inf"),
        (
            {"seg_sigma": "abc"},
            "SEG sigma must be a number > 0, or inf (every query is the mean query), got 'abc'.",
        ),
        ({"seg_sigma": " "}, "SEG sigma is empty: enter a number > 0, or inf"),
        ({"tpg_scale": 101}, "TPG scale must be a number in [0, 100], got 101."),
        ({"slg_scale": "x"}, "SLG scale must be a number in [0, 100], got 'x'."),
        ({"method": "CFG+SEG", "label": "unconditional (null label)"}, "CFG needs a class label"),
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


@pytest.mark.parametrize(
    ("text", "sigma"),
    [("inf", math.inf), (" INF ", math.inf), ("Infinity", math.inf), ("2.5", 2.5), (4, 4.0)],
)
def test_seg_sigma_accepts_inf_and_positive_numbers(tiny_model, text, sigma):
    from attnguide.apps.demo import validate

    s = validate(tiny_model, *_form(tiny_model, seg_sigma=text, seg_scale=2.0, tpg_scale=0.5, slg_scale=4))
    assert (s.seg_sigma, s.seg_scale, s.tpg_scale, s.slg_scale) == (sigma, 2.0, 0.5, 4.0)


def test_arms_of_the_new_methods_carry_the_form_scales(tiny_model):
    from attnguide.apps.arms import Arm
    from attnguide.apps.demo import validate

    form = dict(cfg_scale=2.0, sag_scale=0.5, pag_scale=1.5, seg_scale=2.5, tpg_scale=0.7, slg_scale=1.2)
    s = validate(tiny_model, *_form(tiny_model, method="CFG+SEG", seg_sigma="4", **form))
    arm = s.arm("CFG+SEG")
    assert arm == Arm(cfg_scale=2.0, seg_scale=2.5, seg_sigma=4.0)  # nothing of SAG, PAG, TPG, SLG
    assert arm.terms == {"cfg", "seg"}
    kwargs = arm.pipeline_kwargs()
    assert (kwargs["guidance_scale"], kwargs["seg_scale"], kwargs["seg_sigma"]) == (2.0, 2.5, 4.0)
    assert kwargs["sag_scale"] == kwargs["pag_scale"] == 0 and "tpg_scale" not in kwargs
    s = validate(tiny_model, *_form(tiny_model, method="CFG+SEG", **form))  # seg_sigma "inf"
    assert s.arm("CFG+SEG").seg_sigma is None and s.arm("CFG+SEG").pipeline_kwargs()["seg_sigma"] == math.inf
    assert s.arm("CFG+TPG") == Arm(cfg_scale=2.0, tpg_scale=0.7)
    assert s.arm("CFG+SLG") == Arm(cfg_scale=2.0, slg_scale=1.2)  # SLG's default window (0.01, 0.2)
    assert s.arm("CFG+SLG").slg_window == (0.01, 0.2)
    assert s.arm("SEG").cfg_scale is None and s.arm("SEG").terms == {"seg"}


@pytest.mark.parametrize(
    ("method", "steps", "caption"),
    [
        ("SEG", 2, "Guided: SEG (SEG 3 with sigma inf)."),
        ("TPG", 2, "Guided: TPG (TPG 1)."),
        ("SLG", 6, "Guided: SLG (SLG 1 on step 2 of 6)."),  # window [0.01, 0.2): only step i = 1 (1/6)
        ("CFG+SEG", 2, "Guided: CFG+SEG (CFG 3, SEG 3 with sigma inf)."),
    ],
)
def test_generate_new_methods_in_process(tiny_model, method, steps, caption):
    from attnguide.apps.demo import generate

    base, guided, mask, status = generate(tiny_model, *_form(tiny_model, method=method, steps=steps))
    assert status.startswith("Done in") and caption in status, status
    assert mask is None and "No attention mask: the method has no SAG term." in status
    assert base.size == guided.size
    assert np.asarray(base).tobytes() != np.asarray(guided).tobytes(), f"{method} changed nothing"


def test_slg_outside_its_step_window_says_so(tiny_model):
    from attnguide.apps.demo import generate

    # 2 steps: 0/2 and 1/2 fall outside [0.01, 0.2), so SLG never runs and guided == unguided
    base, guided, _, status = generate(tiny_model, *_form(tiny_model, method="SLG", steps=2))
    assert np.asarray(base).tobytes() == np.asarray(guided).tobytes()
    assert "Guided: SLG (SLG 1)." in status
    # the first step count whose window holds a step: 1/6 < 0.2 (1/5 is not)
    assert "SLG's step window (1%-20% of the steps) holds none of the 2 steps" in status
    assert "take 6 steps or more." in status


def test_sag_at_scale_0_says_why_there_is_no_mask(tiny_model):
    from attnguide.apps.demo import generate

    base, guided, mask, status = generate(tiny_model, *_form(tiny_model, sag_scale=0, steps=1))
    assert mask is None and "No attention mask: SAG scale is 0." in status
    assert np.asarray(base).tobytes() == np.asarray(guided).tobytes()  # SAG off: the unguided run


def test_caption_names_only_the_method_terms(tiny_model):
    from attnguide.apps.demo import guided_caption, validate

    s = validate(tiny_model, *_form(tiny_model, method="CFG+SAG+PAG", seg_sigma="2"))
    text = guided_caption(s, s.arm(s.method), 25)
    layer = tiny_model.default_layer
    assert text == f"Guided: CFG+SAG+PAG (CFG 3, SAG 0.75 with blur sigma 1, PAG 1, layer `{layer}`)."
    s = validate(tiny_model, *_form(tiny_model, method="CFG+SLG", slg_scale=2.8))
    assert guided_caption(s, s.arm(s.method), 25) == "Guided: CFG+SLG (CFG 3, SLG 2.8 on steps 2-5 of 25)."
    s = validate(tiny_model, *_form(tiny_model, method="none"))
    assert guided_caption(s, s.arm(s.method), 25) == "Guided: none (no guidance term, as the unguided run)."


def test_methods_table_lists_every_dropdown_term():
    from attnguide.apps.arms import TERMS
    from attnguide.apps.demo import METHODS, METHODS_TABLE, dropdown_terms

    rows = [line for line in METHODS_TABLE.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]  # rows[0]: the header
    assert all(len(c) == 4 for c in cells), "a row of the table lost a cell"
    titles = [c[0].split(" (")[0] for c in cells]
    rules = ["NAG", "APG", "CFG-Zero*", "TCFG", "FDG", "guidance interval"]  # with CFG only, after CFG
    assert titles == ["SAG", "blur guidance", "PAG", "SEG", "TPG", "SLG", "PLADIS", "CFG", *rules]
    names = [
        *(c[0].split()[0].lower() for c in cells[:8]),
        "nag",
        "apg",
        "zerostar",
        "tcfg",
        "fdg",
        "interval",
    ]
    offered = set().union(*(dropdown_terms(m) for m in METHODS))
    assert offered == set(names) == set(TERMS)
    passes = dict(zip(names, (c[2] for c in cells), strict=True))
    assert passes["sag"].startswith("+1 model call") and passes["blur"].startswith("+1 model call")
    assert all(passes[t].startswith("+1 row block") for t in ("pag", "seg", "tpg", "slg", "cfg"))
    # the defaults of the form (and of `attnguide sample`)
    defaults = dict(zip(names, (c[3] for c in cells), strict=True))
    assert "SEG scale 3.0, SEG sigma inf" in defaults["seg"] and "TPG scale 0.2" in defaults["tpg"]
    assert "SLG scale 1.0" in defaults["slg"] and "window 1-20 % of the steps" in defaults["slg"]
