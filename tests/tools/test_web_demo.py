"""tools/web_demo.py: the request function, and the real page driven in headless Chromium (Playwright).

The browser test is skipped, with the reason, when Gradio, Playwright or a Chromium binary is missing;
``make web-test`` installs them and runs this file.
"""

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_detector import tiny_detector_opts
from tool_scripts import load_tool

from fiber_d2.engine.setup import load_config
from fiber_d2.predictor import FIBERPredictor

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/Demo/fine_tiny.yaml")
OPTS = tiny_detector_opts(pre_nms=20, detections=5)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

web_demo = load_tool("web_demo")


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return FIBERPredictor(load_config(CFG, OPTS))


def test_predict_returns_drawing_table_and_clear_errors(predictor):
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    drawn, rows, status = web_demo.predict(predictor, image, "categories", "red circle", "", 0.0)
    assert drawn.dtype == np.uint8 and min(drawn.shape[:2]) >= 512
    assert len(rows) == 5 and all(r[0] == "red circle" and 0 <= r[1] <= 1 for r in rows)
    assert status.startswith("5 detection(s)")
    caption = "a red circle left of a blue square"
    _, rows, _ = web_demo.predict(
        predictor, image, "caption", caption, "red circle; blue square", 0.0
    )
    assert {r[0] for r in rows} <= {"red circle", "blue square"} and rows
    _, rows, status = web_demo.predict(predictor, image, "caption", caption, "purple star", 0.0)
    assert rows == [] and "purple star" in status and status.startswith("**Error:**")
    assert web_demo.predict(predictor, None, "categories", "x", "", 0.3)[2].startswith("Upload")


def test_an_rgba_array_is_read_as_its_rgb_channels(predictor):
    """An array with an alpha channel (H, W, 4) gives the rows of its RGB channels alone."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (60, 80, 4), dtype=np.uint8)
    _, rows, _ = web_demo.predict(predictor, rgba, "categories", "red circle", "", 0.0)
    _, want, _ = web_demo.predict(
        predictor, rgba[..., :3].copy(), "categories", "red circle", "", 0.0
    )
    assert rows and rows == want


def test_uploaded_files_are_read_by_fiber_d2(predictor, tmp_path):
    """The page decoded uploads with Gradio: a 16-bit PNG came out white (no detections, no word)
    and an unreadable file was an empty error with the traceback in the server log. Now the file is
    read as the predictor reads files, and the error names it without the server's folder."""
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    from_file = web_demo.predict(predictor, str(path), "categories", "red circle", "", 0.0)
    from_array = web_demo.predict(predictor, image, "categories", "red circle", "", 0.0)
    assert from_file[1] == from_array[1] and from_file[2] == from_array[2]
    assert np.array_equal(from_file[0], from_array[0])
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((60, 80), 4000, np.uint16)).save(deep)
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    for bad, reason in [(deep, "16-bit"), (notes, "cannot read image notes.png")]:
        drawn, rows, status = web_demo.predict(predictor, str(bad), "categories", "x", "", 0.3)
        assert drawn is None and rows == [] and status.startswith("**Error:**")
        assert reason in status and str(tmp_path) not in status
    long_name = "x" * 5000
    status = web_demo.predict(predictor, str(path), "categories", long_name, "", 0.3)[2]
    assert status.startswith("**Error:**") and len(status) < 600
    # a vocabulary over --max-categories is refused before the model runs (a 3,000-name request
    # held the one-at-a-time server for about 250 s on a CPU)
    four = "red circle. blue square. green circle. red square"
    status = web_demo.predict(predictor, str(path), "categories", four, "", 0.3, 3)[2]
    assert status == (
        "**Error:** 4 categories; this server takes at most 3 per request (--max-categories)"
    )
    assert web_demo.predict(predictor, str(path), "categories", four, "", 0.0, 4)[1] != []
    with pytest.raises(SystemExit, match="--max-categories must be at least 1"):
        web_demo.main(["--max-categories", "0"])
    with pytest.raises(SystemExit, match="--max-upload-mb must be at least 1, got 0"):
        web_demo.main(["--max-upload-mb", "0"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_in_headless_chromium(predictor, tmp_path):
    pytest.importorskip("gradio", reason="Gradio not installed (pip install 'fiber_d2[web]')")
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright not installed")
    if CHROMIUM is None:
        pytest.skip("no Chromium binary (apt-get install chromium); `make web-test` installs it")
    image_path = tmp_path / "shapes.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(image_path)

    app = web_demo.build_app(predictor, threshold=0.0)
    port = _free_port()
    app.launch(server_name=web_demo.HOST, server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        assert web_demo.HOST == "127.0.0.1"
        assert app.local_url.startswith(f"http://127.0.0.1:{port}")
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            page = browser.new_page()
            page.goto(app.local_url, timeout=60_000)
            page.locator("#input-image input[type=file]").set_input_files(str(image_path))
            page.locator("#prompt textarea, #prompt input").first.fill("red circle. blue square")
            page.locator("#detect").click()
            page.locator("#status").get_by_text("detection(s)").wait_for(timeout=120_000)
            table = page.locator("#result-table")
            table.get_by_text("red circle").first.wait_for(timeout=30_000)
            assert "5 detection(s)" in page.locator("#status").inner_text()
            assert page.locator("#result-image img").count() >= 1
            browser.close()
    finally:
        app.close()
