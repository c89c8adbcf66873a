#!/usr/bin/env python3
"""Screenshots of `kvlm serve`'s web page for docs/img (README and docs/SERVER.md show them).

Starts the server on the default model, drives the page in headless chromium exactly as
tests/server/test_web.py does (two chats with the same system prompt generating at once, so the
grid shows shared blocks), and saves:
  docs/img/web-chat.png    the chat and the KV view while both generate
  docs/img/web-layers.png  the per-layer view and the requests table after both are stopped
  docs/img/web-attention.png  the attention heatmap of one head of layer 20 over the first chat

Usage (from the repository root, with the test venv: scripts/setup-python.sh):
  build/venv/bin/python tools/screenshots.py [build/bin/kvlm] [docs/img]
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KVLM = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build/bin/kvlm")
OUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "docs/img")
sys.argv = [sys.argv[0], KVLM, os.path.join(ROOT, "tests/data")]
sys.path.insert(0, os.path.join(ROOT, "tests/server"))
from test_web import SYSTEM, Page, start_browser, start_server  # noqa: E402


def main():
    os.makedirs(OUT, exist_ok=True)
    srv = start_server()
    driver = start_browser(1500, 950)
    try:
        p = Page(driver, srv.base, timeout=120)
        p.open()
        p.settings(SYSTEM, 3000)
        p.send("What is stored in the KV cache?")
        p.until("streamed text", lambda: len(p.reply()) > 200)
        p.el("#new-conv").click()
        p.send("Why does the cache grow with every token?")
        p.until("shared blocks", lambda: p.grid()["shared"] > 0 and len(p.reply()) > 150)
        driver.save_screenshot(os.path.join(OUT, "web-chat.png"))
        p.el("#stop").click()
        driver.find_elements("css selector", "#conv-list li span")[1].click()
        if p.el("#stop").is_enabled():  # still generating (a loaded machine is slow to get here)
            p.el("#stop").click()
        p.until("the blocks freed", lambda: p.grid()["used"] == 0)
        p.until("the requests table", lambda: len(driver.find_elements(
            "css selector", "#kv-requests tbody tr")) >= 2)
        driver.execute_script("document.getElementById('kv-requests').scrollIntoView()")
        driver.save_screenshot(os.path.join(OUT, "web-layers.png"))
        # The heatmap of one head of a late layer over the first chat (its sink column shows).
        driver.execute_script("document.querySelector('#attn-layer').value = 20;"
                              "document.querySelector('#attn-head').value = 2;"
                              "document.querySelector('#attn-rows').value = 48;")
        p.el("#attn-go").click()
        p.until("the attention map", lambda: "Most attended" in p.text("#attn-note"))
        driver.execute_script("document.getElementById('attn-controls').scrollIntoView()")
        driver.save_screenshot(os.path.join(OUT, "web-attention.png"))
    finally:
        driver.quit()
        srv.stop()
    print(f"screenshots: {OUT}/web-chat.png, {OUT}/web-layers.png, {OUT}/web-attention.png")


if __name__ == "__main__":
    main()
