#!/usr/bin/env python3
"""Serving benchmark: `kvlm serve` against llama.cpp's llama-server and llama-cpp-python's OpenAI
server, same GGUF, same threads.

Set-up (once; installs only the pinned PyPI packages that are missing, never rebuilds
llama-cpp-python when 0.3.36 is already there):
  scripts/setup-bench.sh
  scripts/build-llama-server.sh     # llama-server from the same pinned llama.cpp (engines llama-server*)

Usage (from the repository root, with a kvlm that has `serve`):
  python3 bench/serve_bench.py --quick                       # smoke test, ~1 minute
  python3 bench/serve_bench.py --json serve.json             # full: users 1,4,16,64, 4 turns, 64 tokens
  python3 bench/serve_bench.py --engines llama --quick       # llama_cpp.server only (no kvlm needed)
  python3 bench/serve_bench.py --engines kvlm,llama-server,llama-server-best -t 2 --users 16,64
  python3 bench/serve_bench.py --kvlm build/bin/kvlm -t 2 --users 16 --turns 4 --max-tokens 64
  python3 bench/serve_bench.py --kvlm build-server/bin/kvlm -t 2 --multi-turn 5   # TTFT by turn
  python3 bench/serve_bench.py --kvlm build/bin/kvlm -t 2 --engines kvlm --users 16 \
      --waste-users 0 --ratio-rounds 5    # the 16-user / one-at-a-time goal, 5 alternating pairs

Workload. Every simulated user talks to the same assistant: one shared system prompt (a few
hundred tokens of product-support text, identical for all users), then --turns turns. Each turn
appends a user message (varied per user, deterministic from --seed) to the history, which already
holds the assistant's real streamed replies of the earlier turns, and sends
  POST /v1/chat/completions {messages, max_tokens, temperature: 0, repeat_penalty: 1,
                             stream: true, stream_options: {include_usage: true}}
Users run concurrently (one thread each, stdlib http.client, one connection per request, no think
time); a user sends its next turn as soon as its previous reply has ended. All users send their
first request at once unless --ramp S spreads the first requests over S seconds.

Per request: TTFT = send -> first chunk with non-empty content; inter-token latency (ITL) = gaps
between consecutive content chunks; output tokens = usage.completion_tokens when the server sends
usage, else max_tokens when finish_reason is "length", else the number of content chunks
(llama_cpp.server sends no usage in streams; it yields one chunk per token except where it holds
back text that could start a stop string); errors = non-200 answers, exceptions, an error object
in the stream, a stream without a finish_reason or without [DONE]. Output tok/s = all output
tokens of the run / wall time of the run (first send to last byte).

Runs, each against a freshly started server (so caches and counters start empty), after one
short untimed warm-up request that shares nothing with the workload:
  * for every --users level: every engine of --engines (kvlm: `kvlm serve -np N`, N = users
    unless --np is given: every user is batched, none queue), alternating the order;
  * "kvlm 1-at-a-time": `kvlm serve -np 1` with the workload of the --baseline-users level (16)
    but the users served one after another: the baseline of the "16 users >= 3x" goal;
  * "kvlm waste check": kvlm at --waste-users (16) with --no-prefix-cache, for the paged-waste
    estimate (below); shared prefix blocks would hide waste, so the prefix cache is off there;
  * with --ratio-rounds R > 1: R - 1 more pairs of the kvlm --baseline-users run and its
    one-at-a-time baseline, alternating which goes first (baseline first in odd rounds). The goal
    line then gives each pair's ratio and their median: on a machine whose speed drifts between
    minutes (a shared VM), one pair can land its two runs in different phases.

Engines (--engines, run in this order at even --users levels, reversed at odd ones):
  * kvlm: `kvlm serve -np N -c CTX` (N = users unless --np);
  * llama-server: llama.cpp's own server (scripts/build-llama-server.sh builds it from the
    llama.cpp of the pinned llama-cpp-python sdist), with its defaults except the sizes:
    `llama-server -m MODEL -t T -tb T -np N -c N x CTX --metrics` (N slots batched
    continuously, each with CTX tokens of the -c total; prompt caching on, its default;
    --metrics only turns its /metrics endpoint on; -nr where repacking is off, see
    llama_repack.py);
  * llama-server-best: the same plus the flags that make it fastest here (--llama-server-best-args,
    default "-fa on --cache-reuse 256 -b 2048 -ub 512 --kv-unified"): flash attention, reuse of
    cached prompt chunks by KV shifting, explicit batch sizes, one KV buffer shared by all slots
    (then --kv-unified-per-slot CTX keeps the per-sequence limit);
  * llama (alias llama-cpp-python): llama_cpp.server, below.
The exact llama-server command lines are printed before the runs. llama-server's /metrics
(llamacpp:* samples) is polled like kvlm's and kept in --json; its prefix hit % is delta
prompt_tokens_cached_total / (that + delta prompt_tokens_total, which counts evaluated tokens
only); the KV columns are kvlm's only.

llama_cpp.server (llama-cpp-python[server]==0.3.36) holds one llama.cpp context and serves ONE
request at a time: an asyncio lock around the model queues the others. Its default
--interrupt_requests True makes a new request cut the stream being generated short (it sends
[DONE] early); this benchmark starts it with --interrupt_requests False so every request gets its
full reply and queued requests wait (their wait shows in TTFT). It reuses the KV of the longest
common prefix with the previous request (here the shared system prompt), its only prompt reuse.

kvlm's GET /metrics (Prometheus text) is polled every --poll seconds during kvlm runs; every
kvlm_* sample is parsed, absent ones are tolerated. Reported: KV peak (max kvlm_kv_blocks_used /
kvlm_kv_blocks_total), prefix hit % (delta kvlm_prompt_tokens_cached_total / delta
kvlm_prompt_tokens_total over the run), preemptions (delta kvlm_preemptions_total), and a
"passes" line per kvlm run: forward passes, their mean wall time and tokens, and the scheduler's
time per pass outside them (deltas of kvlm_scheduler_steps_total, kvlm_forward_seconds_total,
kvlm_batch_tokens_total, kvlm_scheduler_host_seconds_total; older servers: no line). Paged waste
(waste check run): at poll samples where no request is queued or in prefill and the server's
running count equals the client's decoding requests, waste = kvlm_kv_blocks_used x block size -
sum over those requests of (prompt tokens + tokens received so far); reported as the max per
sequence over the samples, to compare with one partly filled block (< block size tokens). The
client sees tokens a little after the server has them, so this overestimates by a token or two.
In runs with the prefix cache on, only samples with a single running sequence count (shared
blocks would make the difference meaningless); a run with no usable sample shows "—".

--multi-turn R (kvlm only, replaces the runs above): R times, a fresh `kvlm serve -np 4`, one
untimed request ("What is the capital of France?", as the server test suite sends first, so the
server is warm and the chat template's system block is cached), then one user's 10-turn chat (the
questions of tests/server/test_server.py, temperature 0, max_tokens 40, streamed, the real
replies in the history). Prints per turn the median TTFT, prompt and cached tokens, and the ratio
turn 10 / turn 1 of the medians (the issue's "turn 10 within 1.5x of turn 1").

Ctrl-C (or SIGTERM) stops the servers. Server logs go to a temporary directory (printed), kept
when a server fails. --json FILE writes the configuration, every request's timings and every
metrics sample. Exit status: 0, 1 (a run failed to start or a server died), 2 (bad usage).
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import platform
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import llama_repack

kRepoRoot = Path(__file__).resolve().parent.parent
kDefaultModelFile = "SmolLM2-135M-Instruct.Q4_1.gguf"
kLlamaCppPin = "0.3.36"

# --------------------------------------------------------------------------------------------------
# Workload

kSystemPrompt = """\
You are Aria, the customer support assistant of Northwind Home Energy, a company that sells and \
installs rooftop solar panels, home batteries and heat pumps in the United States and Canada. \
You answer questions from customers and from people who are thinking about becoming customers.

How to answer:
- Be friendly, clear and brief. Prefer short paragraphs or a short list of steps.
- If a question needs account details (an order, an invoice, an installation date), explain what \
the customer can check in the Northwind app under Account > My System, or offer to connect them \
with a human agent. Never invent order numbers, prices or dates.
- Explain technical ideas in plain words first, then give one concrete example with numbers.
- Safety comes first: for smells of burning, sparks, water near the battery or a tripped breaker \
that trips again, tell the customer to switch the system off at the main disconnect and call the \
24-hour line at once.

What you know:
- Solar panels: 400 W monocrystalline modules, 25-year performance warranty (at least 84% of the \
rated output after 25 years), 12-year product warranty. Output depends on roof angle, shading, \
season and dust; a 6 kW system makes roughly 7,000 to 9,000 kWh a year in most of the US.
- Batteries: the Northwind Cell 13 stores 13.5 kWh, delivers 5 kW continuous, has a 10-year \
warranty and can back up essential circuits during an outage. It charges from solar first and \
from the grid only when the customer allows it in the app.
- Heat pumps: ducted and ductless models, rated down to -15 C, about three units of heat for one \
unit of electricity in mild weather, less in deep cold.
- Billing: net metering rules differ by utility; the app shows production, consumption and \
export for every hour. Financing is available with 10, 15 or 20 year terms.
- Service: remote monitoring alerts our team when output drops by more than 20% for three days; \
a technician visit is free during the warranty period.
"""

kTopics = [
    ("my solar panels", "produced less power this month than last month"),
    ("the Cell 13 battery", "drains overnight even when the house uses little power"),
    ("my heat pump", "makes a clicking noise when it starts"),
    ("net metering", "shows a negative export number in the app"),
    ("the Northwind app", "does not show yesterday's production"),
    ("a new installation", "needs a permit from the city"),
    ("financing", "has a 15 year term I might want to pay off early"),
    ("backup power", "did not turn on during the last outage"),
    ("snow on the panels", "stays for days after a storm"),
    ("my electricity bill", "went up after the heat pump was installed"),
    ("the warranty", "may not cover damage from a hail storm"),
    ("an inverter light", "is blinking orange"),
]
kOpeners = [
    "Hi, I have a question about {topic}: it {issue}. What could cause that?",
    "Hello! {topic_cap} {issue}. Is that normal?",
    "Good morning. I noticed that {topic} {issue}. What should I check first?",
    "Hey Aria, quick one: {topic} {issue}. Should I be worried?",
]
kFollowUps = [
    "Thanks. Can you explain that with a concrete example with numbers?",
    "What would a technician check during a visit for this?",
    "Is there anything I can do myself before calling support?",
    "How does that compare with what other customers usually see?",
    "Could this affect my warranty in any way?",
    "Can you summarize the steps in a short list?",
    "Does the season or the weather change the answer?",
    "What setting in the app should I look at for this?",
    "And if that does not help, what is the next step?",
    "How long does it usually take to fix something like this?",
]


def warmup_text() -> str:
    """The system prompt's words in a shuffled order: same length, a different prefix."""
    words = kSystemPrompt.split()
    random.Random(0).shuffle(words)
    return "Ignore this text. " + " ".join(words)


def user_messages(seed: int, user: int, turns: int) -> list[str]:
    """The user's messages of every turn: deterministic from (seed, user), varied between users."""
    rng = random.Random(seed * 1_000_003 + user)
    topic, issue = kTopics[rng.randrange(len(kTopics))]
    first = kOpeners[rng.randrange(len(kOpeners))].format(
        topic=topic, topic_cap=topic[0].upper() + topic[1:], issue=issue)
    follow = rng.sample(kFollowUps, k=min(turns - 1, len(kFollowUps))) if turns > 1 else []
    while len(follow) < turns - 1:
        follow.append(kFollowUps[rng.randrange(len(kFollowUps))])
    return [first] + follow


# --------------------------------------------------------------------------------------------------
# Small helpers


def die(msg: str, code: int = 1) -> None:
    print(f"serve_bench: {msg}", file=sys.stderr)
    sys.exit(code)


def warn(msg: str) -> None:
    sys.stdout.flush()
    print(f"serve_bench: {msg}", file=sys.stderr, flush=True)


def percentile(xs: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for an empty list."""
    if not xs:
        return None
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def http_get(host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def http_post_json(host: str, port: int, path: str, body: dict, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


kPromLine = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)(?:\s+-?\d+)?\s*$")


def parse_prometheus(text: str, prefix: str = "kvlm_") -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value} for the samples named prefix*."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or not line.startswith(prefix):
            continue
        m = kPromLine.match(line)
        if not m:
            continue
        try:
            out[m.group(1)] = float(m.group(2))
        except ValueError:
            pass
    return out


# --------------------------------------------------------------------------------------------------
# Servers

_live_servers: list["Server"] = []
_live_lock = threading.Lock()


def stop_all_servers() -> None:
    with _live_lock:
        servers = list(_live_servers)
    for s in servers:
        s.stop()


class Server:
    """A server process in its own session (so Ctrl-C reaches only us; we stop it)."""

    name = "server"
    host = "127.0.0.1"

    def __init__(self, logdir: Path, label: str):
        self.logdir = logdir
        self.label = label
        self.log_path = logdir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.model_id: str | None = None
        self.cmd: list[str] = []

    def log_tail(self, n: int = 8) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        return "\n".join("    " + l for l in lines[-n:]) or "    (empty)"

    def _spawn(self, cmd: list[str], **kw) -> None:
        self.cmd = cmd
        self._log = open(self.log_path, "wb")
        if kw.get("stdout") == "log":
            kw["stdout"] = self._log
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        except OSError as e:
            raise RuntimeError(f"cannot start {cmd[0]}: {e}") from None
        with _live_lock:
            _live_servers.append(self)

    def _wait_http_ready(self, paths: list[str], deadline: float) -> None:
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with status {self.proc.returncode} while "
                                   f"starting; log {self.log_path}:\n{self.log_tail()}")
            for p in paths:
                try:
                    st, body = http_get(self.host, self.port, p, timeout=5)
                    if st == 200:
                        if p == "/v1/models":
                            self._set_model_id(body)
                        return
                    last = f"GET {p}: HTTP {st}"
                except (OSError, http.client.HTTPException) as e:
                    last = f"GET {p}: {e}"
            time.sleep(0.2)
        raise RuntimeError(f"{self.label} not ready after the start timeout ({last}); log "
                           f"{self.log_path}:\n{self.log_tail()}")

    def _set_model_id(self, body: bytes) -> None:
        try:
            self.model_id = json.loads(body)["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            self.model_id = None

    def fetch_model_id(self) -> None:
        if self.model_id is None:
            st, body = http_get(self.host, self.port, "/v1/models", timeout=30)
            if st == 200:
                self._set_model_id(body)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # Servers told their port on the command line: spawned with stdout and stderr into the log,
    # ready when the first of ready_paths answers 200.
    ready_paths = ["/v1/models"]

    def start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._spawn(self._argv, stdout="log", stderr=subprocess.STDOUT)
        self._wait_http_ready(self.ready_paths, deadline)
        self.fetch_model_id()

    def metrics(self) -> dict[str, float] | None:
        return None

    def _scrape(self, prefix: str) -> dict[str, float] | None:
        """GET /metrics (Prometheus text), the samples named prefix*; None when unavailable."""
        try:
            st, body = http_get(self.host, self.port, "/metrics", timeout=10)
        except (OSError, http.client.HTTPException):
            return None
        if st != 200:
            return None
        return parse_prometheus(body.decode(errors="replace"), prefix)

    def stop(self) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                p.wait(timeout=10)
        self.proc = None
        pump = getattr(self, "_pump", None)
        if pump is not None:
            pump.join(2)
        try:
            self._log.close()
        except Exception:
            pass
        with _live_lock:
            if self in _live_servers:
                _live_servers.remove(self)


class KvlmServer(Server):
    name = "kvlm"
    kListening = re.compile(r"listening on http://([^:/\s]+):(\d+)")

    def __init__(self, logdir, label, binary, model, threads, np_, ctx, kv_budget, prefix_cache,
                 extra):
        super().__init__(logdir, label)
        self.np = np_
        self.prefix_cache = prefix_cache
        cmd = [str(binary), "serve", "-m", str(model), "--port", "0", "-t", str(threads),
               "-np", str(np_), "-c", str(ctx)]
        if kv_budget:
            cmd += ["--kv-budget", kv_budget]
        if not prefix_cache:
            cmd += ["--no-prefix-cache"]
        cmd += extra
        self._argv = cmd

    def start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._spawn(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        found = threading.Event()

        def pump(stream, log):  # stderr -> log file; catch the "listening on" line
            for raw in iter(stream.readline, b""):
                try:
                    log.write(raw)
                    log.flush()
                except (ValueError, OSError):  # log closed by stop()
                    return
                if not found.is_set():
                    m = self.kListening.search(raw.decode(errors="replace"))
                    if m:
                        self.port = int(m.group(2))
                        found.set()
        self._pump = threading.Thread(target=pump, args=(self.proc.stderr, self._log), daemon=True)
        self._pump.start()
        while not found.is_set():
            if self.proc.poll() is not None:
                time.sleep(0.1)  # let the pump write the last lines
                raise RuntimeError(f"{self.label} exited with status {self.proc.returncode} while "
                                   f"starting; log {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} printed no 'listening on' line within {timeout:.0f}"
                                   f" s; log {self.log_path}:\n{self.log_tail()}")
            found.wait(0.1)
        self._wait_http_ready(["/health"], deadline)
        self.fetch_model_id()

    def metrics(self) -> dict[str, float] | None:
        return self._scrape("kvlm_")


class LlamaCppServer(Server):
    name = "llama_cpp.server"

    def __init__(self, logdir, label, python, model, threads, ctx, repack, extra):
        super().__init__(logdir, label)
        self.np = 1
        self.prefix_cache = None
        self.port = free_port()
        # Repacking off: the launcher of llama_repack.py (the server has no option for it).
        launch = ["-m", "llama_cpp.server"] if repack else ["-c", llama_repack.server_launcher()]
        self._argv = [python, *launch, "--model", str(model),
                      "--n_threads", str(threads), "--n_threads_batch", str(threads),
                      "--n_ctx", str(ctx), "--host", self.host, "--port", str(self.port),
                      "--interrupt_requests", "False"] + extra


# llama-server-best: the flags that make llama-server fastest for this workload on CPU (see the
# module doc); --llama-server-best-args replaces them.
kLlamaServerBestArgs = "-fa on --cache-reuse 256 -b 2048 -ub 512 --kv-unified"


def default_llama_server() -> Path:
    """Where scripts/build-llama-server.sh puts llama-server."""
    cache = Path(os.environ.get("KVLM_BENCH_CACHE", Path.home() / ".cache/kvlm/bench"))
    return cache / f"llama.cpp-{kLlamaCppPin}" / "build/bin/llama-server"


class LlamaServer(Server):
    """llama.cpp's llama-server: -np slots batched continuously, -c = slots x per-sequence
    context, prompt caching on (its default). best: the extra flags of llama-server-best; with
    --kv-unified, --kv-unified-per-slot keeps each sequence's limit at the per-sequence ctx."""
    ready_paths = ["/health"]  # 503 while the model loads, 200 once the slots are ready

    def __init__(self, logdir, label, binary, model, threads, np_, ctx, repack, best: list[str],
                 extra):
        super().__init__(logdir, label)
        self.name = "llama-server-best" if best else "llama-server"
        self.np = np_
        self.prefix_cache = None
        self.port = free_port()
        self._argv = [str(binary), "-m", str(model), "--host", self.host, "--port", str(self.port),
                      "-t", str(threads), "-tb", str(threads), "-np", str(np_),
                      "-c", str(np_ * ctx), "--metrics"] + best
        if "--kv-unified" in best or "-kvu" in best:
            self._argv += ["--kv-unified-per-slot", str(ctx)]
        if not repack:
            self._argv += ["-nr"]
        self._argv += extra

    def metrics(self) -> dict[str, float] | None:
        return self._scrape("llamacpp:")


# --------------------------------------------------------------------------------------------------
# Streaming client


def stream_chat(host: str, port: int, body: dict, timeout: float) -> dict:
    """One streaming chat completion; returns its timings (perf_counter seconds) and outcome."""
    r = {"status": None, "error": None, "t_send": None, "t_first": None, "t_end": None,
         "chunk_times": [], "content": "", "finish_reason": None, "usage": None, "done": False}
    data = json.dumps(body).encode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    parts: list[str] = []
    try:
        r["t_send"] = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=data,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        r["status"] = resp.status
        if resp.status != 200:
            text = resp.read(600).decode(errors="replace").strip().replace("\n", " ")
            r["error"] = f"HTTP {resp.status}: {text[:300]}"
            return r
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line or line.startswith(b":") or not line.startswith(b"data:"):
                continue  # blank separators, SSE comments/pings, event:/id: fields
            payload = line[5:].strip()
            if payload == b"[DONE]":
                r["done"] = True
                break
            now = time.perf_counter()
            try:
                ev = json.loads(payload)
            except ValueError:
                r["error"] = f"bad SSE data: {payload[:120]!r}"
                break
            if not isinstance(ev, dict):
                continue
            if "error" in ev and ev["error"]:
                r["error"] = f"error event: {json.dumps(ev['error'])[:300]}"
                break
            if ev.get("usage"):
                r["usage"] = ev["usage"]
            for ch in ev.get("choices") or []:
                delta = ch.get("delta") or {}
                c = delta.get("content")
                if c:
                    if r["t_first"] is None:
                        r["t_first"] = now
                    r["chunk_times"].append(now)
                    parts.append(c)
                if ch.get("finish_reason"):
                    r["finish_reason"] = ch["finish_reason"]
        if r["error"] is None:
            if not r["done"]:
                r["error"] = "stream ended without [DONE]"
            elif r["finish_reason"] is None:
                r["error"] = "stream without a finish_reason (cut short)"
    except (OSError, http.client.HTTPException, ValueError) as e:
        r["error"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    finally:
        r["t_end"] = time.perf_counter()
        r["content"] = "".join(parts)
        conn.close()
    return r


def output_tokens(r: dict, max_tokens: int) -> tuple[int, str]:
    u = r.get("usage") or {}
    if isinstance(u.get("completion_tokens"), int):
        return u["completion_tokens"], "usage"
    if r.get("finish_reason") == "length":
        return max_tokens, "length"
    return len(r["chunk_times"]), "chunks"


# --------------------------------------------------------------------------------------------------
# One run


class MetricsPoller(threading.Thread):
    def __init__(self, server: Server, interval: float):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.samples: list[tuple[float, dict]] = []
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            t0 = time.perf_counter()
            m = self.server.metrics()
            t1 = time.perf_counter()
            if m is not None:
                self.samples.append(((t0 + t1) / 2, m))
            self.stop_ev.wait(max(0.0, self.interval - (t1 - t0)))


class KvWatcher(threading.Thread):
    """What the web page costs the server while open (--watch-kv S): GET /kv/state every S
    seconds and one /kv/events stream read to its end, as the page does."""

    def __init__(self, server: Server, interval: float, timeout: float):
        super().__init__(daemon=True)
        self.server, self.interval, self.timeout = server, interval, timeout
        self.n_ok = self.n_bad = self.n_events = 0
        self.stop_ev = threading.Event()
        threading.Thread(target=self.events, daemon=True).start()

    def events(self):
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=self.timeout)
        try:
            conn.request("GET", "/kv/events")
            resp = conn.getresponse()
            while not self.stop_ev.is_set():
                line = resp.readline()
                if not line:
                    return
                self.n_events += line.startswith(b"data:")
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()

    def run(self):
        while not self.stop_ev.wait(self.interval):
            try:
                st, _ = http_get(self.server.host, self.server.port, "/kv/state", self.timeout)
            except (OSError, http.client.HTTPException):
                st = 0
            if st == 200:
                self.n_ok += 1
            else:
                self.n_bad += 1


def run_workload(server: Server, args, users: int, sequential: bool) -> dict:
    server.fetch_model_id()
    common = {"max_tokens": args.max_tokens, "temperature": 0, "repeat_penalty": 1.0,
              "stream": True, "stream_options": {"include_usage": True}}
    if server.model_id:
        common["model"] = server.model_id

    # Warm-up: a prompt as long as the system prompt (so a full-batch prefill has run once) that
    # shares no prefix with the workload beyond the chat template's first tokens.
    try:
        st, body = http_post_json(server.host, server.port, "/v1/chat/completions",
                                  {**({"model": server.model_id} if server.model_id else {}),
                                   "messages": [{"role": "system", "content": warmup_text()},
                                                {"role": "user", "content": "Say hello."}],
                                   "max_tokens": 8, "temperature": 0}, timeout=args.timeout)
        if st != 200:
            warn(f"{server.label}: warm-up request: HTTP {st}: {body[:200]!r}")
    except (OSError, http.client.HTTPException) as e:
        warn(f"{server.label}: warm-up request failed: {e}")

    m_before = server.metrics()
    poller = MetricsPoller(server, args.poll) if m_before is not None else None

    results: list[dict] = []
    res_lock = threading.Lock()
    barrier = threading.Barrier(1 if sequential else users)

    def one_user(u: int):
        msgs = [{"role": "system", "content": kSystemPrompt}]
        for turn, text in enumerate(user_messages(args.seed, u, args.turns)):
            msgs.append({"role": "user", "content": text})
            r = stream_chat(server.host, server.port, {**common, "messages": list(msgs)},
                            args.timeout)
            r["user"], r["turn"] = u, turn
            with res_lock:
                results.append(r)
            # The real reply goes into the history (partial or empty after an error).
            msgs.append({"role": "assistant", "content": r["content"]})

    def worker(u_list: list[int]):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        if not sequential and args.ramp > 0:  # user u starts at u / users of the ramp
            time.sleep(args.ramp * u_list[0] / users)
        for u in u_list:
            one_user(u)

    watcher = (KvWatcher(server, args.watch_kv, args.timeout)
               if args.watch_kv > 0 and isinstance(server, KvlmServer) else None)
    cpu0 = os.times()
    if poller:
        poller.start()
    if watcher:
        watcher.start()
    t_start = time.perf_counter()
    if sequential:
        threads = [threading.Thread(target=worker, args=(list(range(users)),), daemon=True)]
    else:
        threads = [threading.Thread(target=worker, args=([u],), daemon=True) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:  # join with a timeout so Ctrl-C is handled promptly
        while t.is_alive():
            t.join(0.2)
            if not server.alive():
                barrier.abort()
                raise RuntimeError(f"{server.label} died during the run (status "
                                   f"{server.proc.returncode if server.proc else '?'}); log "
                                   f"{server.log_path}:\n{server.log_tail()}")
    t_stop = time.perf_counter()
    cpu1 = os.times()
    if poller:
        poller.stop_ev.set()
        poller.join(5)
    if watcher:
        watcher.stop_ev.set()
        watcher.join(5)
    m_after = server.metrics()
    wall = max((r["t_end"] for r in results), default=t_stop) - t_start

    s = summarize(server, args, users, sequential, results, t_start, wall, m_before, m_after,
                  poller.samples if poller else [],
                  (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system))
    if watcher:
        s["kv_watch"] = {"interval_s": args.watch_kv, "state_ok": watcher.n_ok,
                         "state_failed": watcher.n_bad, "events": watcher.n_events}
        print(f"  /kv/state every {args.watch_kv} s: {watcher.n_ok} answered, {watcher.n_bad} "
              f"failed; /kv/events: {watcher.n_events} events", file=sys.stderr)
    return s


def summarize(server, args, users, sequential, results, t0, wall, m_before, m_after, samples,
              client_cpu) -> dict:
    ok = [r for r in results if r["error"] is None]
    errors = [r for r in results if r["error"] is not None]
    ttft = [(r["t_first"] - r["t_send"]) * 1e3 for r in ok if r["t_first"] is not None]
    itl: list[float] = []
    tokens_total = 0
    prompt_tokens: list[int] = []
    sources: set[str] = set()
    for r in results:
        n, src = output_tokens(r, args.max_tokens)
        r["output_tokens"], r["tokens_from"] = n, src
        tokens_total += n
        sources.add(src)
        ct = r["chunk_times"]
        if r["error"] is None:
            itl += [(b - a) * 1e3 for a, b in zip(ct, ct[1:])]
        pt = (r.get("usage") or {}).get("prompt_tokens")
        if isinstance(pt, int):
            prompt_tokens.append(pt)

    s = {
        "engine": server.name, "label": server.label, "users": users,
        "sequential": sequential, "np": server.np, "prefix_cache": server.prefix_cache,
        "cmd": server.cmd, "requests": len(results), "errors": len(errors),
        "error_samples": sorted({r["error"] for r in errors})[:5],
        "output_tokens": tokens_total, "tokens_from": sorted(sources), "wall_s": wall,
        "output_tok_s": tokens_total / wall if wall > 0 else 0.0,
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "ttft_ms_max": max(ttft) if ttft else None,
        "itl_ms_p50": percentile(itl, 50), "itl_ms_p99": percentile(itl, 99),
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
        "mean_output_tokens": tokens_total / len(results) if results else None,
        "client_cpu_s": client_cpu,
        "kv_peak_blocks": None, "kv_blocks_total": None, "kv_peak_pct": None,
        "kv_peak_bytes": None, "prefix_hit_pct": None, "preemptions": None,
        "waste_tokens_per_seq_max": None, "waste_samples": 0, "block_size": None,
        "metrics_before": m_before, "metrics_after": m_after,
    }

    if m_after is not None:
        def delta(name):
            if name in m_after:
                return m_after[name] - (m_before or {}).get(name, 0.0)
            return None
        all_m = [m for _, m in samples] + [m_after]
        used = [m["kvlm_kv_blocks_used"] for m in all_m if "kvlm_kv_blocks_used" in m]
        if used:
            s["kv_peak_blocks"] = int(max(used))
        if "kvlm_kv_blocks_total" in m_after:
            s["kv_blocks_total"] = int(m_after["kvlm_kv_blocks_total"])
        if s["kv_peak_blocks"] is not None and s["kv_blocks_total"]:
            s["kv_peak_pct"] = 100.0 * s["kv_peak_blocks"] / s["kv_blocks_total"]
        by = [m["kvlm_kv_bytes_used"] for m in all_m if "kvlm_kv_bytes_used" in m]
        if by:
            s["kv_peak_bytes"] = int(max(by))
        cached, prompt = delta("kvlm_prompt_tokens_cached_total"), delta("kvlm_prompt_tokens_total")
        if cached is not None and prompt:
            s["prefix_hit_pct"] = 100.0 * cached / prompt
        elif "kvlm_prefix_cache_hit_rate" in m_after:
            s["prefix_hit_pct"] = 100.0 * m_after["kvlm_prefix_cache_hit_rate"]
        # llama-server: its prompt_tokens_total counts the evaluated tokens only, without the
        # cached ones (2 users x 2 turns: 511 + 503 + 25 + 23 evaluated, 1050 cached).
        cached, evald = (delta("llamacpp:prompt_tokens_cached_total"),
                         delta("llamacpp:prompt_tokens_total"))
        if cached is not None and evald is not None and cached + evald > 0:
            s["prefix_hit_pct"] = 100.0 * cached / (cached + evald)
        pre = delta("kvlm_preemptions_total")
        if pre is not None:
            s["preemptions"] = int(pre)
        for k in ("kvlm_generated_tokens_total", "kvlm_prompt_tokens_total",
                  "kvlm_scheduler_steps_total", "kvlm_requests_rejected_total"):
            d = delta(k)
            if d is not None:
                s[k.replace("kvlm_", "server_").replace("_total", "")] = int(d)
        # Where the server's scheduler thread spent the run (kvlm >= the metrics that count it):
        # forward passes, their mean time and tokens, and the step time outside the passes
        # (admission, sampling, handing tokens to the HTTP threads).
        steps, fwd = delta("kvlm_scheduler_steps_total"), delta("kvlm_forward_seconds_total")
        host, btok = delta("kvlm_scheduler_host_seconds_total"), delta("kvlm_batch_tokens_total")
        if steps and fwd is not None and host is not None and btok is not None:
            s["passes"] = {"n": int(steps), "forward_s": fwd, "host_s": host,
                           "pass_ms_mean": 1e3 * fwd / steps,
                           "host_ms_per_pass": 1e3 * host / steps,
                           "tokens_per_pass": btok / steps}
        s["peak_running"] = max((m.get("kvlm_requests_running", 0) for m in all_m), default=None)
        s["peak_waiting"] = max((m.get("kvlm_requests_waiting", 0) for m in all_m), default=None)
        bs = m_after.get("kvlm_kv_block_size_tokens")
        if bs:
            s["block_size"] = int(bs)
            waste = paged_waste(results, samples, int(bs), single_only=bool(server.prefix_cache))
            if waste:
                s["waste_tokens_per_seq_max"] = max(waste)
                s["waste_samples"] = len(waste)

    # Raw per-request data, times relative to the start of the run.
    s["request_log"] = [{
        "user": r["user"], "turn": r["turn"], "status": r["status"], "error": r["error"],
        "t_send": r["t_send"] - t0, "t_end": r["t_end"] - t0,
        "ttft_ms": (r["t_first"] - r["t_send"]) * 1e3 if r["t_first"] is not None else None,
        "chunk_times": [round(t - t0, 6) for t in r["chunk_times"]],
        "finish_reason": r["finish_reason"], "usage": r["usage"],
        "output_tokens": r["output_tokens"], "tokens_from": r["tokens_from"],
        "content": r["content"],
    } for r in sorted(results, key=lambda r: (r["user"], r["turn"]))]
    s["metrics_samples"] = [{"t": round(t - t0, 4), **{k: v for k, v in m.items()
                                                       if not k.startswith(("kvlm_time_",
                                                                            "kvlm_inter_",
                                                                            "kvlm_request_dur"))}}
                            for t, m in samples]
    return s


def paged_waste(results: list[dict], samples: list[tuple[float, dict]], bs: int,
                single_only: bool) -> list[float]:
    """Per poll sample where the client knows every running sequence's length: the KV tokens
    allocated but unfilled, per running sequence (see the module doc). With the prefix cache on,
    sequences share blocks, which hides waste: then only samples with one running sequence."""
    reqs = [r for r in results if r["error"] is None and r["t_first"] is not None
            and isinstance((r.get("usage") or {}).get("prompt_tokens"), int)]
    if len(reqs) != len([r for r in results if r["error"] is None]):
        return []  # some request's prompt length is unknown
    out = []
    for t, m in samples:
        if "kvlm_kv_blocks_used" not in m or "kvlm_requests_running" not in m:
            continue
        if m.get("kvlm_requests_waiting", 0) != 0:
            continue
        if any(r["t_send"] <= t < r["t_first"] for r in reqs):
            continue  # a request queued or in prefill: its KV length is unknown here
        decoding = [r for r in reqs if r["t_first"] <= t < r["chunk_times"][-1]]
        if not decoding or len(decoding) != int(m["kvlm_requests_running"]):
            continue
        if single_only and len(decoding) != 1:
            continue
        held = sum(r["usage"]["prompt_tokens"] + sum(1 for c in r["chunk_times"] if c <= t)
                   for r in decoding)
        out.append((m["kvlm_kv_blocks_used"] * bs - held) / len(decoding))
    return out


# --------------------------------------------------------------------------------------------------
# Report


def fmt(v, spec: str = ".0f", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def print_table(runs: list[dict]) -> None:
    head = ["engine", "users", "-np", "requests", "errors", "out tok", "wall s", "out tok/s",
            "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "KV peak", "prefix hit",
            "preempt", "waste tok/seq"]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |")
    for s in runs:
        kv = "—"
        if s["kv_peak_blocks"] is not None:
            kv = f"{s['kv_peak_blocks']}/{s['kv_blocks_total'] or '?'}"
            if s["kv_peak_pct"] is not None:
                kv += f" ({s['kv_peak_pct']:.1f}%)"
        waste = "—"
        if s["waste_tokens_per_seq_max"] is not None:
            waste = f"{s['waste_tokens_per_seq_max']:.1f} (bs {s['block_size']}, n={s['waste_samples']})"
        row = [s["label"], str(s["users"]) + (" seq" if s["sequential"] else ""),
               "1 (lock)" if s["engine"] == "llama_cpp.server" else str(s["np"]),
               str(s["requests"]), str(s["errors"]), str(s["output_tokens"]), fmt(s["wall_s"], ".1f"),
               fmt(s["output_tok_s"], ".1f"), fmt(s["ttft_ms_p50"]), fmt(s["ttft_ms_p99"]),
               fmt(s["itl_ms_p50"], ".1f"), fmt(s["itl_ms_p99"], ".1f"), kv,
               fmt(s["prefix_hit_pct"], ".1f") + ("%" if s["prefix_hit_pct"] is not None else ""),
               fmt(s["preemptions"], "d"), waste]
        print("| " + " | ".join(row) + " |")


def print_goals(runs: list[dict], baseline_users: int) -> None:
    def all_of(engine, users, seq=False, prefix=True):  # in plan order
        return [s for s in runs if s["engine"] == engine and s["users"] == users
                and s["sequential"] == seq and (engine != "kvlm" or s["prefix_cache"] == prefix)]
    def find(engine, users, seq=False):
        found = all_of(engine, users, seq)
        return found[0] if found else None
    kv = find("kvlm", baseline_users)
    peers = [p for p in (find(e, baseline_users) for e in ("llama-server-best", "llama-server",
                                                           "llama_cpp.server")) if p]
    lines = []
    # Pairs in plan order (--ratio-rounds): the i-th users run with the i-th baseline run.
    pairs = [(a, b) for a, b in zip(all_of("kvlm", baseline_users),
                                    all_of("kvlm", baseline_users, seq=True)) if b["output_tok_s"]]
    if len(pairs) > 1:
        ratios = [a["output_tok_s"] / b["output_tok_s"] for a, b in pairs]
        r = statistics.median(ratios)
        lines.append(f"kvlm {baseline_users} users / kvlm one user at a time: median {r:.2f}x "
                     f"over {len(pairs)} alternating pairs (" + ", ".join(
                         f"{x:.2f}x = {a['output_tok_s']:.1f} / {b['output_tok_s']:.1f}"
                         for x, (a, b) in zip(ratios, pairs))
                     + f" tok/s); goal >= 3x: {'met' if r >= 3 else 'NOT met'}")
    elif pairs:
        a, b = pairs[0]
        r = a["output_tok_s"] / b["output_tok_s"]
        lines.append(f"kvlm {baseline_users} users / kvlm one user at a time: {r:.2f}x "
                     f"({a['output_tok_s']:.1f} / {b['output_tok_s']:.1f} tok/s; goal >= 3x: "
                     f"{'met' if r >= 3 else 'NOT met'})")
    for ll in peers:
        if kv and ll["output_tok_s"]:
            r = kv["output_tok_s"] / ll["output_tok_s"]
            lines.append(f"kvlm {baseline_users} users / {ll['label']} {baseline_users} users: "
                         f"{r:.2f}x ({kv['output_tok_s']:.1f} / {ll['output_tok_s']:.1f} tok/s)")
    for s in [kv] + peers:
        if s and s["ttft_ms_p99"] is not None:
            lines.append(f"TTFT p99 at {baseline_users} users, {s['label']}: {s['ttft_ms_p99']:.0f} ms"
                         f" (max {s['ttft_ms_max']:.0f} ms)")
    for s in runs:
        p = s.get("passes")
        if p:
            lines.append(f"passes ({s['label']}, {s['users']} users): {p['n']} in "
                         f"{p['forward_s']:.2f} s of {s['wall_s']:.2f} s, "
                         f"{p['pass_ms_mean']:.1f} ms and "
                         f"{p['tokens_per_pass']:.1f} tokens each, {p['host_ms_per_pass']:.2f} ms "
                         f"per pass outside them")
    w = [s for s in runs if s["waste_tokens_per_seq_max"] is not None and s["prefix_cache"] is False]
    for s in w:
        lines.append(f"paged waste ({s['label']}, {s['users']} users, {s['waste_samples']} samples):"
                     f" max {s['waste_tokens_per_seq_max']:.1f} tokens per sequence, block size "
                     f"{s['block_size']} (goal < {s['block_size']}: "
                     f"{'met' if s['waste_tokens_per_seq_max'] < s['block_size'] else 'NOT met'})")
    if lines:
        print()
        for l in lines:
            print("- " + l)


# --------------------------------------------------------------------------------------------------
# Main


kMultiTurnQuestions = ["Hi! What is a cat?", "And a dog?", "Which one is bigger?",
                       "Name a famous cat.", "Name a famous dog.", "What do cats eat?",
                       "What do dogs eat?", "Can they be friends?", "Thanks. Summarise.",
                       "Goodbye!"]


def run_multi_turn(args, logdir: Path, extra: list[str]) -> int:
    """--multi-turn: TTFT by turn of one 10-turn chat, args.multi_turn fresh servers."""
    ttft: list[list[float]] = [[] for _ in kMultiTurnQuestions]  # [turn][rep] ms
    usage: list[tuple[int, int]] = [(0, 0)] * len(kMultiTurnQuestions)  # (prompt, cached)
    for rep in range(args.multi_turn):
        srv = KvlmServer(logdir, f"kvlm multi-turn {rep}", args.kvlm, args.model, args.threads,
                         args.np or 4, args.ctx, args.kv_budget, True, extra)
        try:
            srv.start(args.start_timeout)
            base = {"model": srv.model_id, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            r = stream_chat(srv.host, srv.port, {**base, "max_tokens": 48, "messages": [
                {"role": "user", "content": "What is the capital of France?"}]}, args.timeout)
            messages = []
            for turn, q in enumerate(kMultiTurnQuestions):
                messages.append({"role": "user", "content": q})
                r = stream_chat(srv.host, srv.port, {**base, "max_tokens": 40, "messages": messages},
                                args.timeout)
                if r["error"] or r["t_first"] is None:
                    raise RuntimeError(f"turn {turn + 1}: {r['error'] or 'no content'}")
                ttft[turn].append((r["t_first"] - r["t_send"]) * 1e3)
                u = r["usage"] or {}
                usage[turn] = (u.get("prompt_tokens", 0),
                               (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
                messages.append({"role": "assistant", "content": r["content"]})
        except RuntimeError as e:
            warn(f"multi-turn run {rep}: {e}")
            return 1
        finally:
            srv.stop()
        print(f"  run {rep}: TTFT turn 1 {ttft[0][-1]:.1f} ms, turn 10 {ttft[-1][-1]:.1f} ms",
              flush=True)
    print("\n| turn | prompt | cached | TTFT median ms | TTFT all runs ms |\n|---:|---:|---:|---:|---|")
    for turn, xs in enumerate(ttft):
        print(f"| {turn + 1} | {usage[turn][0]} | {usage[turn][1]} | {statistics.median(xs):.1f} | "
              + ", ".join(f"{x:.0f}" for x in xs) + " |")
    print(f"\nTTFT turn 10 / turn 1 (medians): "
          f"{statistics.median(ttft[-1]) / statistics.median(ttft[0]):.2f}")
    return 0


def int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a comma-separated list of integers")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"'{s}': values must be >= 1")
    return vals


def find_kvlm() -> Path | None:
    for cand in (kRepoRoot / "build-server/bin/kvlm", kRepoRoot / "build/bin/kvlm"):
        if has_serve(cand):
            return cand
    return None


def has_serve(binary: Path) -> bool:
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return False
    try:
        p = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and "--parallel" in p.stdout + p.stderr


def check_llama_cpp_server(python: str) -> None:
    code = ("import importlib.metadata as m, sys\n"
            "v = m.version('llama_cpp_python')\n"
            "import llama_cpp.server.app, uvicorn, fastapi, sse_starlette, starlette_context, "
            "pydantic_settings\n"
            "print(v)\n")
    p = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        die(f"{python} cannot run llama_cpp.server ({last}); run scripts/setup-bench.sh")
    v = p.stdout.strip()
    if v != kLlamaCppPin:
        warn(f"llama-cpp-python is {v}, the benchmark pins {kLlamaCppPin}")


kEngines = ("kvlm", "llama", "llama-server", "llama-server-best")
kEngineAlias = {"llama-cpp-python": "llama", "llama_cpp.server": "llama"}


def check_llama_server(binary: Path) -> None:
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        die(f"llama-server not found at {binary}; run scripts/build-llama-server.sh or pass "
            "--llama-server PATH", 2)
    try:
        p = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        die(f"{binary} --help failed: {e}", 2)
    if p.returncode != 0 or "--parallel" not in p.stdout + p.stderr:
        die(f"{binary}: not a llama-server (--help has no --parallel)", 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (head of this file) for details.")
    models = Path(os.environ.get("KVLM_MODELS", Path.home() / ".cache/kvlm/models"))
    ap.add_argument("-m", "--model", type=Path, default=models / kDefaultModelFile)
    ap.add_argument("--kvlm", type=Path, help="kvlm binary with `serve` (default: build-server/bin "
                    "or build/bin, whichever has it)")
    ap.add_argument("--python", default=sys.executable, help="Python that runs llama_cpp.server")
    ap.add_argument("--engines", default="kvlm,llama",
                    help="comma list of " + ", ".join(kEngines) + " (llama-cpp-python = llama)")
    ap.add_argument("--llama-server", type=Path, default=default_llama_server(),
                    help="llama-server binary (default: scripts/build-llama-server.sh's, %(default)s)")
    ap.add_argument("--llama-server-args", default="",
                    help="extra arguments of both llama-server engines, one string")
    ap.add_argument("--llama-server-best-args", default=kLlamaServerBestArgs,
                    help="the flags of llama-server-best on top of llama-server's (default: "
                    "'%(default)s')")
    ap.add_argument("--users", type=int_list, help="concurrency levels (default 1,4,16,64)")
    ap.add_argument("--turns", type=int, help="turns per user (default 4)")
    ap.add_argument("--max-tokens", type=int, help="max_tokens of every request (default 64)")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("-c", "--ctx", type=int, default=2048, help="context per sequence, both engines")
    ap.add_argument("--np", type=int, default=0, help="kvlm -np (default: = users of each run)")
    ap.add_argument("--kv-budget", default="", help="kvlm --kv-budget (default: kvlm's)")
    ap.add_argument("--baseline-users", type=int, default=0,
                    help="users of the kvlm one-at-a-time baseline (default 16, or the largest "
                    "--users level when 16 is not one; 0 with --no-baseline)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-at-a-time run")
    ap.add_argument("--ratio-rounds", type=int, default=1, metavar="R",
                    help="alternating pairs (users run, one-at-a-time run) for the 3x goal; the "
                    "goal line reports each pair's ratio and their median (default 1)")
    ap.add_argument("--waste-users", type=int, default=-1,
                    help="users of the --no-prefix-cache waste run (default: the baseline users; 0: skip)")
    ap.add_argument("--kvlm-args", default="", help="extra kvlm serve arguments, one string: --kvlm-args='-b 256 -ctk q8_0'")
    llama_repack.add_argument(ap)
    ap.add_argument("--llama-args", default="", help="extra llama_cpp.server arguments, one string: --llama-args='--flash_attn True'")
    ap.add_argument("--ramp", type=float, default=0.0,
                    help="spread the users' first requests over this many seconds (default 0: "
                    "all at once, the worst case for TTFT and for prefix sharing)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--poll", type=float, default=0.1, help="kvlm /metrics poll interval, s")
    ap.add_argument("--watch-kv", type=float, default=0, metavar="S",
                    help="during kvlm runs, GET /kv/state every S seconds and hold a /kv/events "
                         "stream open, as the web page does (0: off)")
    ap.add_argument("--timeout", type=float, default=900, help="per-request socket timeout, s")
    ap.add_argument("--start-timeout", type=float, default=180, help="server readiness timeout, s")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: defaults become 1 turn, 16 tokens, users 1,4")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--multi-turn", type=int, default=0, metavar="R",
                    help="only the multi-turn TTFT run, R fresh servers (see the top of the file)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the server logs of a clean run")
    args = ap.parse_args()

    for name, full, quick in (("turns", 4, 1), ("max_tokens", 64, 16), ("users", [1, 4, 16, 64], [1, 4])):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if (args.turns < 1 or args.max_tokens < 1 or args.threads < 1 or args.ctx < 1 or args.poll <= 0
            or args.ratio_rounds < 1):
        ap.error("--turns, --max-tokens, --threads, --ctx, --poll and --ratio-rounds must be "
                 "positive")
    if args.ramp < 0:
        ap.error("--ramp must be >= 0")
    engines = [kEngineAlias.get(e.strip(), e.strip()) for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in kEngines for e in engines):
        ap.error("--engines: a comma list of " + ", ".join(kEngines))
    engines = list(dict.fromkeys(engines))
    if not args.model.is_file():
        die(f"model {args.model} not found (scripts/fetch-model.sh fetches it)", 2)
    if "kvlm" in engines:
        if args.kvlm is None:
            args.kvlm = find_kvlm()
            if args.kvlm is None:
                die("no kvlm binary with `serve` in build-server/bin or build/bin; pass --kvlm BIN "
                    "or --engines llama", 2)
        elif not has_serve(args.kvlm):
            die(f"{args.kvlm}: not a kvlm binary with a `serve` subcommand", 2)
    if args.multi_turn:
        engines = ["kvlm"]
    if "llama" in engines:
        check_llama_cpp_server(args.python)
    if {"llama-server", "llama-server-best"} & set(engines):
        check_llama_server(args.llama_server)
    if args.no_baseline or "kvlm" not in engines:
        baseline_users = 0
    elif args.baseline_users:
        baseline_users = args.baseline_users
    else:
        baseline_users = 16 if 16 in args.users else max(args.users)
    ref_users = baseline_users or (16 if 16 in args.users else max(args.users))
    waste_users = ref_users if args.waste_users < 0 else args.waste_users
    if "kvlm" not in engines:
        waste_users = 0
    kvlm_extra, llama_extra = args.kvlm_args.split(), args.llama_args.split()
    ls_extra, ls_best = args.llama_server_args.split(), args.llama_server_best_args.split()

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    # Also when started from a shell that ignores SIGINT in background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit.register(stop_all_servers)

    logdir = Path(tempfile.mkdtemp(prefix="serve_bench."))
    if args.multi_turn:
        la0 = loadavg()
        print(f"serve_bench: multi-turn, {args.multi_turn} runs of {args.kvlm}, {args.threads} "
              f"threads; load average {la0}; {os.cpu_count()} CPUs; logs in {logdir}", flush=True)
        try:
            rc = run_multi_turn(args, logdir, kvlm_extra)
        except KeyboardInterrupt:
            rc = 130
        finally:
            stop_all_servers()
        print(f"serve_bench: load average {la0} before, {loadavg()} after")
        return rc
    plan: list[tuple[str, int, dict]] = []  # (engine, users, options)
    for i, u in enumerate(args.users):
        order = engines if i % 2 == 0 else engines[::-1]
        for e in order:
            plan.append((e, u, {}))
        if u == baseline_users:
            plan.append(("kvlm", u, {"sequential": True}))
        if u == waste_users:
            plan.append(("kvlm", u, {"prefix_cache": False}))
    if baseline_users and baseline_users not in args.users:
        plan.append(("kvlm", baseline_users, {"sequential": True}))
    if waste_users and waste_users not in args.users:
        plan.append(("kvlm", waste_users, {"prefix_cache": False}))
    for r in range(1, args.ratio_rounds if baseline_users else 1):
        pair = [("kvlm", baseline_users, {}), ("kvlm", baseline_users, {"sequential": True})]
        plan.extend(pair[::-1] if r % 2 else pair)

    print(f"serve_bench: model {args.model.name}, {args.threads} threads, ctx {args.ctx}, "
          f"{args.turns} turns x {args.max_tokens} tokens per user, seed {args.seed}")
    llama_repack_on = llama_repack.repack(args.llama_repack)
    print(f"serve_bench: kvlm {args.kvlm if 'kvlm' in engines else '-'}; llama_cpp.server via "
          f"{args.python if 'llama' in engines else '-'}"
          f"{' (repack ' + llama_repack.describe(llama_repack_on) + ')' if 'llama' in engines else ''}"
          f"; logs in {logdir}")
    for e in ("llama-server", "llama-server-best"):
        if e in engines:  # the command line of the first run (its -np, -c and port vary by run)
            srv = LlamaServer(logdir, e, args.llama_server, args.model, args.threads,
                              args.np or args.users[0], args.ctx, llama_repack_on,
                              ls_best if e == "llama-server-best" else [], ls_extra)
            print(f"serve_bench: {e}: {shlex.join(srv._argv)}")
    la0 = loadavg()
    print(f"serve_bench: {len(plan)} runs; load average {la0}; {os.cpu_count()} CPUs")
    sys.stdout.flush()

    runs: list[dict] = []
    failed = False
    t_all = time.monotonic()
    try:
        for engine, users, opt in plan:
            seq = opt.get("sequential", False)
            prefix = opt.get("prefix_cache", True)
            if engine == "kvlm":
                np_ = 1 if seq else (args.np or users)
                label = "kvlm 1-at-a-time" if seq else (
                    "kvlm" if prefix else "kvlm waste check (no prefix cache)")
                srv = KvlmServer(logdir, f"{label} u{users}", args.kvlm, args.model, args.threads,
                                 np_, args.ctx, args.kv_budget, prefix, kvlm_extra)
                srv.label = label
            elif engine == "llama":
                srv = LlamaCppServer(logdir, f"llama_cpp.server u{users}", args.python, args.model,
                                     args.threads, args.ctx, llama_repack_on, llama_extra)
                srv.label = "llama_cpp.server"
            else:
                srv = LlamaServer(logdir, f"{engine} u{users}", args.llama_server, args.model,
                                  args.threads, args.np or users, args.ctx, llama_repack_on,
                                  ls_best if engine == "llama-server-best" else [], ls_extra)
                srv.label = engine
            t0 = time.monotonic()
            try:
                srv.start(args.start_timeout)
                s = run_workload(srv, args, users, seq)
            except RuntimeError as e:
                warn(f"{srv.label}, {users} user{'s' if users != 1 else ''}: {e}")
                failed = True
                continue
            finally:
                srv.stop()
            runs.append(s)
            errs = f", {s['errors']} errors: {s['error_samples'][0]}" if s["errors"] else ""
            print(f"  {s['label']:<36} users {users:>3}{' (one at a time)' if seq else ''}: "
                  f"{s['output_tok_s']:7.1f} out tok/s, TTFT p99 {fmt(s['ttft_ms_p99'])} ms "
                  f"({time.monotonic() - t0:.0f} s incl. start){errs}", flush=True)
    except KeyboardInterrupt:
        warn("interrupted; stopping servers")
        stop_all_servers()
        return 130
    finally:
        stop_all_servers()

    la1 = loadavg()
    print(f"\nserve_bench: done in {time.monotonic() - t_all:.0f} s; load average {la0} before, "
          f"{la1} after\n")
    if runs:
        print_table(runs)
        print_goals(runs, ref_users)
        print("\nTokens: " + "; ".join(sorted({f"{s['label']}: {'/'.join(s['tokens_from'])}"
                                                for s in runs}))
              + " (usage = server's usage.completion_tokens; length = max_tokens on "
              "finish_reason length; chunks = content chunks).")
        if any(s["engine"] == "llama_cpp.server" for s in runs):
            print("llama_cpp.server serves one request at a time (others queue on its model lock;"
                  " started with --interrupt_requests False).")
    if args.json:
        out = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "baseline_users": baseline_users, "waste_users": waste_users,
            "llama_repack": llama_repack.describe(llama_repack_on),
            "system_prompt": kSystemPrompt,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_before": la0, "loadavg_after": la1,
                        "date": time.strftime("%Y-%m-%d %H:%M:%S")},
            "runs": runs,
        }
        args.json.write_text(json.dumps(out, indent=1))
        print(f"serve_bench: raw results in {args.json}")
    if failed:
        warn(f"some runs failed; server logs kept in {logdir}")
        return 1
    if args.keep_logs:
        print(f"serve_bench: server logs in {logdir}")
        return 0
    try:  # logs of a clean run are not needed
        for p in logdir.iterdir():
            p.unlink()
        logdir.rmdir()
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
