"""The built-in web page in a real browser: headless Chromium driven by Playwright loads `/`, sends a
chat message, sees the answer stream in (and equal the API's answer for the same request), and sees the
live panel's heatmap update from the server's telemetry.

Needs the ``browser`` extra (``pip install -e '.[browser]'``) and a system Chromium
(``apt-get install -y chromium``; no browser download). Skipped, with the reason, where either is absent.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from haqmoe.reliability.live import ThreadedServer

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[browser]')")

CHROMIUM = os.environ.get("HAQMOE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (apt-get install -y chromium, or set "
                                                         "HAQMOE_CHROMIUM to its path)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
KEY = "page-test-key-0123456789"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig
    from haqmoe.serve.fixtures import tiny_chat_moe
    from haqmoe.sources import load_model

    ckpt = tiny_chat_moe(tmp_path_factory.mktemp("page") / "m")
    return CollaborativeEngine(load_model(str(ckpt), progress=False),
                               EngineConfig(emulate_gpu=True, slots_per_layer=4))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_page_chats_streams_and_shows_live_heatmap(engine, browser):
    from haqmoe.runtime.engine import SamplingConfig
    from haqmoe.serve.app import ServeConfig, create_app

    cfg = ServeConfig(model_name="tiny", max_tokens_limit=64, max_batch=4, api_keys=(KEY,))
    with ThreadedServer(create_app(engine, cfg)) as srv:
        page = browser.new_page()
        outside = []
        page.on("request", lambda r: None if r.url.startswith(srv.url) else outside.append(r.url))
        page.goto(srv.url + "/")
        page.wait_for_function("document.getElementById('key-state').textContent.includes('needs an API key')",
                               timeout=20_000)  # telemetry is behind the key: the page says so
        page.fill("#api-key", KEY)
        page.click("#key-form button")
        page.wait_for_function("document.querySelectorAll('#heatmap .cell').length === 16", timeout=20_000)
        calls_before = int(page.get_attribute("#heatmap", "data-total-calls"))
        # a MutationObserver counts how many times the answer's text changed while it streamed
        page.evaluate("""() => { window.__changes = 0; new MutationObserver(() => window.__changes++)
            .observe(document.getElementById('messages'), {subtree: true, characterData: true, childList: true}); }""")
        page.fill("#max-tokens", "24")
        page.fill("#temperature", "0")
        page.fill("#prompt", "Name three colors.")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
        answer = page.inner_text(".msg.assistant .body")
        meta = page.inner_text(".msg.assistant .meta")
        ref = engine.generate([{"role": "user", "content": "Name three colors."}], SamplingConfig(max_new_tokens=24))
        assert answer == ref.text and answer, (answer, ref.text)
        assert f"{len(ref.tokens)} tokens" in meta and "finish: " in meta
        assert page.evaluate("window.__changes") >= 3  # streamed: the text grew piece by piece, not at once
        page.wait_for_function(f"parseInt(document.getElementById('heatmap').dataset.totalCalls) > {calls_before}",
                               timeout=20_000)
        assert page.locator("#heatmap .cell.resident").count() > 0
        assert int(page.inner_text("#m-tokens")) >= len(ref.tokens)
        assert page.inner_text("#m-batch").endswith("/ 4") or "/ 4 " in page.inner_text("#m-batch")
        assert not outside, outside  # nothing fetched from anywhere but the server
        shot = os.environ.get("HAQMOE_PAGE_SCREENSHOT")
        if shot:
            page.set_viewport_size({"width": 1400, "height": 900})
            time.sleep(1.2)
            page.screenshot(path=shot, full_page=True)
        page.close()
