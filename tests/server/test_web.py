#!/usr/bin/env python3
"""The web page of `kvlm serve` in a real browser: Debian's chromium, headless, driven through
chromium-driver by selenium (scripts/setup.sh, scripts/setup-python.sh). One server on the default
SmolLM2 model with an API key; the page asks for the key, chats with streaming, shows the KV
pool's blocks in use rise, a second conversation with the same system prompt sharing the first
one's blocks, and the blocks freed when both generations are stopped (the server cancels them).

Every check waits for its condition (a loaded 2-core machine is slow); nothing sleeps as an
assertion. Usage: test_web.py KVLM_BINARY TEST_DATA_DIR [unittest arguments]
"""
import re
import http.client
import json
import os
import shutil
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_server import MODEL, Server  # noqa: E402  (reads KVLM and DATA from sys.argv)

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    sys.exit("test_web.py: the `selenium` package is missing; run scripts/setup-python.sh")

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEY = "page-key"
# Long enough to fill several 16-token blocks, so a second chat's prompt shares full blocks.
SYSTEM = ("You are a patient teacher of computer science. You explain how transformer language "
          "models run inference: tokens, attention, the key-value cache, its memory per token, "
          "prefill and decode. Answer at length, with examples.")


def start_browser(width=1500, height=950):
    if not CHROMIUM or not os.path.exists(CHROMEDRIVER):
        sys.exit("test_web.py: chromium and chromium-driver are missing; run scripts/setup.sh")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def start_server(*extra, budget="4096tok"):
    return Server("-m", MODEL, "--api-key", KEY, "-np", "4", "-t", "2", "--kv-budget", budget,
                  *extra)


class Page:
    """The page's elements and the waits the tests and tools/screenshots.py share."""

    def __init__(self, driver, base, timeout=60):
        self.d = driver
        self.base = base
        self.timeout = timeout

    def el(self, css):
        return self.d.find_element(By.CSS_SELECTOR, css)

    def until(self, what, pred, timeout=None):
        """Waits for pred() to be truthy; fails naming `what` and showing the page's text and
        console. Returns pred's value."""
        try:
            return WebDriverWait(self.d, timeout or self.timeout, poll_frequency=0.05).until(
                lambda _: pred())
        except TimeoutException:
            logs = self.d.get_log("browser") if hasattr(self.d, "get_log") else []
            raise AssertionError(f"waited for {what}; the chat: {self.text('#chat')[-1500:]!r}; "
                                 f"the page: {self.text('body')[-2000:]!r}; "
                                 f"console: {logs}") from None

    def open(self):
        self.d.get(self.base + "/")
        # The first call the page makes gets 401: it asks for the key once.
        self.until("the API key dialog", lambda: self.el("#key-dialog").get_attribute("open"))
        self.el("#key-input").send_keys(KEY)
        self.el("#key-save").click()
        self.until("the KV view connected", lambda: "ok" in self.el("#conn").get_attribute("class"))

    def text(self, css):
        """An element's rendered text, read in one script (the page re-renders parts of itself
        every second, so a found element can go stale before its text is read)."""
        return self.d.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)

    def grid(self):
        return {k: int(v) for k, v in json.loads(self.d.execute_script(
            "return JSON.stringify(document.getElementById('kv-grid-0').dataset)")).items()}

    def set_field(self, css, value):
        self.d.execute_script(
            "const e = document.querySelector(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('change'));", css, value)

    def settings(self, system, max_tokens, temperature=0, ignore_eos=True):
        self.set_field("#system", system)
        self.set_field("#max-tokens", str(max_tokens))
        self.set_field("#temperature", str(temperature))
        if self.el("#ignore-eos").is_selected() != ignore_eos:
            self.el("#ignore-eos").click()

    def send(self, text):
        self.el("#input").send_keys(text)
        self.el("#send").click()

    def reply(self):
        """The last assistant message's text (its meta line aside)."""
        return self.d.execute_script(
            "const m = [...document.querySelectorAll('#messages .msg.assistant')].pop();"
            "return m && m.firstChild && m.firstChild.nodeType === 3 ? m.firstChild.nodeValue : '';")

    def streaming(self):
        return bool(self.d.find_elements(By.CSS_SELECTOR, "#messages .msg.streaming"))


class BrowserCase(unittest.TestCase):
    """One server (its KV budget BUDGET, more flags SERVER_ARGS) and one browser for the class's
    tests; the page is opened at the server's base URL."""
    BUDGET = "4096tok"
    TIMEOUT = 60
    SERVER_ARGS = ()

    @classmethod
    def base_url(cls, srv):
        return srv.base

    @classmethod
    def setUpClass(cls):
        cls.srv = start_server(*cls.SERVER_ARGS, budget=cls.BUDGET)
        cls.driver = start_browser()
        cls.page = Page(cls.driver, cls.base_url(cls.srv), timeout=cls.TIMEOUT)

    @classmethod
    def tearDownClass(cls):
        cls.driver.quit()
        rc = cls.srv.stop()
        assert rc == 0, f"kvlm serve exited {rc} on SIGTERM: {''.join(cls.srv.stderr)}"


class WebPage(BrowserCase):
    def state(self):
        status, s = self.srv.json("GET", "/kv/state", headers={"Authorization": "Bearer " + KEY})
        self.assertEqual(status, 200, s)
        return s

    def test_chat_grid_share_and_stop(self):
        p = self.page
        t0 = time.time()
        p.open()
        self.assertEqual(p.grid()["used"], 0)
        p.settings(SYSTEM, 3900)  # long enough to be still generating when stopped, usually
        p.send("What is stored in the KV cache?")
        # Streamed: text is seen while the reply is still being generated, and it grows.
        first = p.until("the first streamed text", lambda: p.streaming() and p.reply())
        p.until(f"more streamed text than {len(first)} characters",
                lambda: p.streaming() and len(p.reply()) > len(first))
        # The grid shows this chat's blocks in use.
        p.until("blocks in use in the grid", lambda: p.grid()["used"] > 0 and p.grid()["mine"] > 0)
        used_one = p.grid()["used"]

        # A second conversation with the same system prompt, while the first still generates:
        # its prompt's full blocks are the first one's (shared: refcount 2).
        self.el_click("#new-conv")
        p.send("And why does it grow with every token?")
        p.until("shared blocks in the grid", lambda: p.grid()["shared"] > 0, timeout=90)
        cached_blocks = p.until("the second chat's sequence", lambda: self.driver.execute_script(
            "const e = document.querySelector('#kv-seqs .seq.mine');"
            "return e && Number(e.dataset.cachedBlocks) + 1;")) - 1
        self.assertGreater(cached_blocks, 0)
        self.assertGreater(p.grid()["used"], used_one - p.grid()["shared"])
        s = self.state()
        self.assertEqual(len(s["running"]), 2, s["running"])

        # Stop both: aborting the fetches cancels the requests server-side and frees the blocks.
        p.until("a stop button to press", lambda: p.el("#stop").is_enabled())
        self.el_click("#stop")
        self.d_click_conv(1)
        p.until("the first chat's stop button", lambda: p.el("#stop").is_enabled())
        self.el_click("#stop")
        p.until("the blocks freed", lambda: p.grid()["used"] == 0)
        s = self.state()
        self.assertEqual(s["running"], [])
        self.assertGreater(s["groups"][0]["n_cached_free"], 0)  # the prefix stays reusable
        status, _, metrics = self.srv.request("GET", "/metrics",
                                              headers={"Authorization": "Bearer " + KEY})
        # Both were stopped; the first may have reached its max tokens first on a fast machine
        # (it generates while the second is set up), so it counts as cancelled or as length.
        def count(reason):
            m = re.search(r'kvlm_requests_total\{finish_reason="%s"\} (\d+)\n' % reason,
                          metrics.decode())
            return int(m.group(1)) if m else 0
        self.assertGreaterEqual(count("cancelled"), 1, metrics.decode())
        self.assertEqual(count("cancelled") + count("length"), 2, metrics.decode())
        self.assertFalse(p.streaming())
        # The conversation on screen is the first one: "stopped" if it was cancelled, else its
        # usage line for the 3900 tokens it reached.
        shown = p.text("#messages")
        if count("cancelled") == 2:
            self.assertIn("stopped", shown)
        else:
            self.assertIn("3900 generated", shown)
        # The per-layer view shows this conversation's K/V shapes ([positions, kv_heads x dim]).
        layers = p.text("#kv-layers")
        self.assertIn("Grouped-query attention", layers)
        self.assertRegex(layers, r"\[\d+, 3×64\]")
        # The attention heatmap of the conversation shown: one head of the last layer over its
        # positions, drawn into the canvas; the note names the positions most attended.
        self.driver.execute_script(
            "const s = document.querySelector('#attn-layer'); s.value = s.options.length - 1;")
        self.set_rows(16)
        self.el_click("#attn-go")
        note = p.until("the attention map", lambda: "Most attended" in p.text("#attn-note")
                       and p.text("#attn-note"))
        self.assertRegex(note, r"layer 29 \(full attention\), head 0 \(reads K/V head 0\): "
                               r"rows are positions (\d+)–(\d+)")
        size = self.driver.execute_script(
            "const c = document.querySelector('#attn-map'); return [c.width, c.height];")
        self.assertEqual(size[1], 16 * 8)  # 16 rows of 8 pixels
        self.assertGreater(size[0], 16)
        # Conversations survive a reload (localStorage).
        self.driver.refresh()
        p.until("the two conversations after a reload",
                lambda: len(self.driver.find_elements(By.CSS_SELECTOR, "#conv-list li")) == 2)
        print(f"test_web: {time.time() - t0:.1f} s in the browser", file=sys.stderr)

    def set_rows(self, n):
        e = self.page.el("#attn-rows")
        e.clear()
        e.send_keys(str(n))

    def el_click(self, css):
        self.page.el(css).click()

    def d_click_conv(self, index):
        self.driver.find_elements(By.CSS_SELECTOR, "#conv-list li span")[index].click()


class WebPageFullPool(BrowserCase):
    """A pool too small for two long chats: one waits (preempted, or not admitted) and the page
    shows it queued, with no error in either chat."""
    BUDGET = "2048tok"
    TIMEOUT = 120

    def test_a_full_pool_shows_queued_requests(self):
        p = self.page
        p.open()
        # Each chat fits the 2048-token pool alone (prompt ~30 + 1900); both together do not:
        # once they fill it (near 1,000 tokens each), the newer one gives its blocks back and
        # waits for the other (about 900 tokens: seconds, so the page's one-second refresh sees
        # it). The other chat is an API client's, started right after the page's: started from
        # the page (a second conversation), it could begin when the first was nearly done on a
        # machine where the browser is slow beside the server, and the queue then lasted less
        # than a refresh (CI saw that). The page shows every sequence of the pool, not only its
        # own.
        self.driver.execute_script(
            "window.kvQueued = '';"
            "const box = document.getElementById('kv-seqs');"
            "new MutationObserver(() => {"
            "  if (!window.kvQueued && box.innerText.includes('queued #'))"
            "    window.kvQueued = box.innerText;"
            "}).observe(box, {childList: true, subtree: true, characterData: true});")
        p.settings("", 1900)
        p.send("Count.")
        stop, api = threading.Event(), {}

        def other_chat():  # streams until `stop`, then closes the connection (cancelled)
            conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=300)
            try:
                conn.request("POST", "/v1/chat/completions", body=json.dumps(
                    {"messages": [{"role": "user", "content": "Count again."}],
                     "max_tokens": 1900, "temperature": 0, "ignore_eos": True,
                     "stream": True}).encode(),
                    headers={"Content-Type": "application/json",
                             "Authorization": "Bearer " + KEY})
                r = conn.getresponse()
                api["status"] = r.status
                for raw in r:
                    if b'"error"' in raw:
                        api["error"] = raw
                    if stop.is_set():
                        break
            finally:
                conn.close()

        other = threading.Thread(target=other_chat, daemon=True)
        other.start()
        p.until("the first chat streaming", lambda: p.streaming() and p.reply())
        p.until("a request queued while the pool is full",
                lambda: self.driver.execute_script("return window.kvQueued"), timeout=180)
        self.assertRegex(self.driver.execute_script("return window.kvQueued"),
                         r"queued #\d+: \d+ prompt tokens \((preempted|waiting)")
        grid = p.grid()
        self.assertEqual(p.text("#chat-status"), "")
        self.assertNotIn("error", p.text("#messages"))
        # Stopping both frees the pool (the page's chat may have finished meanwhile: a loaded
        # machine can take longer to show the queue than it takes to generate the rest; the
        # API's stream ends at its next event, which closes the connection: cancelled).
        if p.el("#stop").is_enabled():
            p.el("#stop").click()
        stop.set()
        other.join(300)
        self.assertFalse(other.is_alive())
        self.assertEqual(api.get("status"), 200, api)
        self.assertNotIn("error", api)
        p.until("the blocks freed", lambda: p.grid()["used"] == 0, timeout=180)
        self.assertGreater(grid["used"], 0)


def own_address():
    """This machine's address on its outward interface (a UDP socket's connect sends nothing),
    else 127.0.0.2: either way not 127.0.0.1, where a server bound to loopback only listens."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1
            addr = s.getsockname()[0]
            if not addr.startswith("127."):
                return addr
    except OSError:
        pass
    return "127.0.0.2"


class WebPageAllInterfaces(BrowserCase):
    """--host 0.0.0.0 with the page opened at another address than 127.0.0.1: every call the
    page makes goes to the origin it came from (no address of the server's own written into it)."""
    SERVER_ARGS = ("--host", "0.0.0.0")

    @classmethod
    def base_url(cls, srv):
        return f"http://{own_address()}:{srv.port}"

    def test_chat_and_kv_view_at_another_address(self):
        p = self.page
        p.open()  # the key dialog, then /kv/state answered: "connected"
        self.assertFalse(p.base.startswith("http://127.0.0.1"), p.base)
        p.settings("", 24)
        p.send("Say hello.")
        p.until("the reply finished", lambda: not p.streaming() and p.reply())
        p.until("the request's end in the KV view's event stream",
                lambda: re.search(r"#\d+ (length|stop): \d+ prompt", p.text("#kv-events")))
        self.assertEqual(p.text("#chat-status"), "")
        self.assertNotIn("error", p.text("#messages"))


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0]] + sys.argv[3:], verbosity=2)
