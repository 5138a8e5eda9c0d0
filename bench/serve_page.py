"""Screenshot of `haqmoe serve`'s web page under load -> docs/serve-page.png.

A `haqmoe serve` subprocess (``--max-batch 8``, GPU tier emulated) is kept busy by ``--clients``
background chat clients while headless Chromium (Playwright, the ``browser`` extra, a system
Chromium: no browser download) opens the page, sends a chat message, waits for the streamed answer
and the live panel's next update, and takes the screenshot.

    python bench/serve_page.py [--model smollm2-moefied] [--clients 5] [--out docs/serve-page.png]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from serve import PROMPTS, free_port, start_server  # noqa: E402  (bench/serve.py)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-moefied")
    ap.add_argument("--clients", type=int, default=5, help="background chat clients keeping the batch busy")
    ap.add_argument("--message", default="Write a haiku about the sea.")
    ap.add_argument("--out", default=str(ROOT / "docs/serve-page.png"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    import openai
    from playwright.sync_api import sync_playwright

    from haqmoe.models.embedded import EMBEDDED, ensure_embedded

    ckpt = ensure_embedded(args.model, progress=False) if args.model in EMBEDDED else args.model
    name = Path(str(args.model)).name
    port = free_port()
    proc = start_server(ckpt, port, ("--max-batch", "8"), name, threads=2)
    stop = threading.Event()
    url = f"http://127.0.0.1:{port}"

    def client(c: int) -> None:
        cl = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        i = c
        while not stop.is_set():
            msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            try:
                for _ in cl.chat.completions.create(model=name, messages=msgs, max_tokens=48, temperature=0.7,
                                                    seed=i, stream=True):
                    if stop.is_set():
                        break
            except Exception:  # the server going away at the end
                return
            i += args.clients

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
    try:
        for t in threads:
            t.start()
        time.sleep(3)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "/")
            page.wait_for_selector("#heatmap .cell", timeout=60_000)
            page.fill("#max-tokens", "48")
            page.fill("#prompt", args.message)
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=300_000)
            time.sleep(2.5)  # the live panel's next polls, the batch still busy
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            print("answer:", page.inner_text(".msg.assistant"))
            print("batch:", page.inner_text("#m-batch"), "tok/s:", page.inner_text("#m-toks"))
            browser.close()
    finally:
        stop.set()
        proc.terminate()
        proc.wait(60)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
