#!/usr/bin/env python3
"""Soak test of `kvlm serve`: many concurrent clients for a long time, then the server must be
exactly where it started.

Usage (from the repository root, with the build's venv; standard library only):
  build/venv/bin/python bench/soak.py                          # 10 minutes, 64 clients
  build/venv/bin/python bench/soak.py --duration 60 --json soak.json
  build/venv/bin/python bench/soak.py --kvlm build-asan/bin/kvlm --duration 120

Workload: --clients threads (64), each sending requests back to back until --duration seconds
have passed: chat or completion, streaming or not (half each), max_tokens 4..64, temperature 0
or 0.8. Prompts start with one of four shared prefixes (a few hundred tokens each, so the prefix
cache shares blocks) and end with text of their own. A fraction of the requests is abandoned on
purpose: --disconnect of the streams close the connection after a few chunks, --cancel of the
non-streaming requests close it after a short wait without reading the answer (the server sees
both as cancelled clients). The server runs with a small --kv-budget (default 1536 tokens for
-np 16 sequences of up to ~700 tokens) so the scheduler preempts and recomputes requests.

Checks (the exit status is 1 if any fails):
  * no 5xx answer, and no answer other than 200;
  * every request either completed (200; a finish_reason; streams end with [DONE]) or was
    abandoned by the client on purpose: none failed, broke off or timed out;
  * the server's own count agrees: kvlm_requests_total over every finish reason equals the
    requests sent, none finished with "error", kvlm_requests_rejected_total is 0, and at least one
    preemption happened (else the budget did not bite);
  * once idle, the KV pool is back where it started: no block in use (GET /kv/state: every group's
    n_used is 0) and no request running or waiting;
  * RSS and open file descriptors (/proc/PID) flat: sampled every --sample seconds; the mean of the
    last minute of the load within 10% of the mean of the first minute after --warmup seconds;
    once idle after the run, no more descriptors open than when idle after one first request (RSS
    idle values reported).
"""
import argparse
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

PREFIXES = [
    "You are a support assistant for a company that sells espresso machines. " * 12,
    "You are a travel agent who plans trips through the Alps by train and by bus. " * 12,
    "You answer questions about the history of mathematics, briefly and precisely. " * 12,
    "You are a cooking assistant; every answer lists ingredients before the steps. " * 12,
]
WORDS = ("why how what when kv cache block token prefix stream model server time memory "
         "fast slow train bus coffee number proof bread oven").split()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kvlm", default="build/bin/kvlm")
    p.add_argument("--model", default=None, help="GGUF (default: kvlm's default model)")
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--np", type=int, default=16, help="kvlm serve -np")
    p.add_argument("--ctx", type=int, default=1024, help="kvlm serve -c")
    p.add_argument("--kv-budget", default="1536tok", help="kvlm serve --kv-budget (small: preemption)")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--disconnect", type=float, default=0.15, help="fraction of streams abandoned")
    p.add_argument("--cancel", type=float, default=0.15, help="fraction of non-streams abandoned")
    p.add_argument("--warmup", type=float, default=60, help="seconds before the flatness baseline")
    p.add_argument("--sample", type=float, default=2, help="seconds between /proc samples")
    p.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


def start_server(a):
    cmd = [a.kvlm, "serve", "--port", "0", "-np", str(a.np), "-c", str(a.ctx), "--kv-budget",
           a.kv_budget, "-t", str(a.threads), "--max-queue", str(4 * a.clients)]
    if a.model:
        cmd += ["-m", a.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        sys.stderr.write(line)
        m = re.search(r"listening on http://[^:]+:(\d+)", line)
        if m:
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(m.group(1)), " ".join(cmd)
    raise SystemExit(f"soak: the server exited ({proc.wait()}) before listening")


def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read().decode()
    c.close()
    if r.status != 200:
        raise RuntimeError(f"GET {path}: {r.status} {body[:200]}")
    return body


def metrics(port):
    out = {}
    for line in get(port, "/metrics").splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def proc_sample(pid):
    with open(f"/proc/{pid}/status") as f:
        rss_kb = int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))
    return rss_kb * 1024, len(os.listdir(f"/proc/{pid}/fd"))


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}  # outcome -> n
        self.statuses = {}  # HTTP status -> n
        self.failures = []  # first few failure descriptions

    def add(self, outcome, status=None, why=None):
        with self.lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            if status is not None:
                self.statuses[status] = self.statuses.get(status, 0) + 1
            if why and len(self.failures) < 20:
                self.failures.append(why)


def make_request(rng):
    prefix = rng.choice(PREFIXES)
    own = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    body = {"max_tokens": rng.randint(4, 64), "temperature": rng.choice([0, 0.8]),
            "stream": rng.random() < 0.5}
    if rng.random() < 0.5:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "system", "content": prefix}, {"role": "user", "content": own}]
    else:
        path = "/v1/completions"
        body["prompt"] = prefix + "\nQuestion: " + own + "\nAnswer:"
    return path, body


def one_request(port, rng, a, st):
    """Sends one request; records completed / abandoned / failed."""
    path, body = make_request(rng)
    stream = body["stream"]
    abandon = rng.random() < (a.disconnect if stream else a.cancel)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=a.timeout)
    try:
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        if abandon and not stream:
            time.sleep(rng.uniform(0.05, 1.0))  # the server is computing; leave without reading
            c.sock.shutdown(socket.SHUT_RDWR)
            st.add("abandoned")
            return
        r = c.getresponse()
        if r.status != 200:
            st.add("failed", r.status, f"{path} -> {r.status}: {r.read()[:200]!r}")
            return
        if not stream:
            d = json.loads(r.read())
            if not d.get("choices") or not d["choices"][0].get("finish_reason"):
                st.add("failed", 200, f"{path}: no finish_reason: {str(d)[:200]}")
            else:
                st.add("completed", 200)
            return
        read_stream(r, rng, abandon, st, path)
    except (OSError, http.client.HTTPException, ValueError) as e:
        st.add("failed", None, f"{path}: {type(e).__name__}: {e}")
    finally:
        c.close()


def read_stream(r, rng, abandon, st, path):
    stop_after = rng.randint(1, 6) if abandon else None
    n_chunks, finish, done = 0, None, False
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        d = json.loads(data)
        if "error" in d:
            st.add("failed", 200, f"{path}: error in stream: {data[:200]}")
            return
        for ch in d.get("choices", []):
            finish = ch.get("finish_reason") or finish
        n_chunks += 1
        if stop_after is not None and n_chunks >= stop_after:
            st.add("abandoned", 200)
            return  # closing the connection (finally) is the cancel
    if done and finish:
        st.add("completed", 200)
    elif abandon:
        st.add("completed", 200)  # ended before the planned disconnect
    else:
        st.add("failed", 200, f"{path}: stream ended without finish_reason/[DONE] ({n_chunks} chunks)")


def client(port, idx, a, st, deadline):
    rng = random.Random(a.seed * 1000 + idx)
    sent = 0
    while time.time() < deadline:
        one_request(port, rng, a, st)
        sent += 1
    return sent


def wait_idle(port, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = metrics(port)
        if m.get("kvlm_requests_running", 1) == 0 and m.get("kvlm_requests_waiting", 1) == 0:
            return m
        time.sleep(0.5)
    raise RuntimeError("the server did not become idle within 120 s")


def kv_used(port):
    state = json.loads(get(port, "/kv/state"))
    return sum(g["n_used"] for g in state["groups"]), sum(g["n_blocks"] for g in state["groups"])


def sampler(pid, port, a, samples, stop):
    t0 = time.time()
    while not stop.is_set():
        try:
            rss, fds = proc_sample(pid)
        except (OSError, AttributeError):
            return
        samples.append((time.time() - t0, rss, fds))
        stop.wait(a.sample)


def flat(samples, a, idx):
    """(first-minute mean after warm-up, last-minute mean) of column idx, both while the clients
    still send (the drain after the deadline has fewer connections open)."""
    load = [s for s in samples if s[0] <= a.duration] or samples
    end = load[-1][0]
    first = [s[idx] for s in load if a.warmup <= s[0] < a.warmup + 60]
    last = [s[idx] for s in load if s[0] >= end - 60]
    return statistics.mean(first or [samples[0][idx]]), statistics.mean(last)


def main():
    a = parse_args()
    proc, port, cmd = start_server(a)
    checks, res = [], {"command": " ".join(sys.argv), "server": cmd}
    try:
        get(port, "/health")
        used0, total = kv_used(port)
        # One request first: the compute pool opens a /proc schedstat file per thread on its
        # first jobs (base/thread_pool.cpp), descriptors the idle baseline must include.
        one_request(port, random.Random(0), argparse.Namespace(disconnect=0, cancel=0, timeout=a.timeout),
                    Stats())
        wait_idle(port)
        idle_rss0, idle_fds0 = proc_sample(proc.pid)
        samples, stop = [], threading.Event()
        smp = threading.Thread(target=sampler, args=(proc.pid, port, a, samples, stop))
        smp.start()
        st = Stats()
        deadline = time.time() + a.duration
        threads = [threading.Thread(target=client, args=(port, i, a, st, deadline)) for i in range(a.clients)]
        t_start = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t_start
        m = wait_idle(port)
        time.sleep(2)  # connections the server is still closing
        idle_rss, idle_fds = proc_sample(proc.pid)
        stop.set()
        smp.join()
        used1, _ = kv_used(port)
        sent = sum(st.counts.values()) + 1  # the server also counts the first request
        by_reason = {r: int(m.get(f'kvlm_requests_total{{finish_reason="{r}"}}', 0))
                     for r in ("stop", "length", "cancelled", "error")}
        rss_first, rss_last = flat(samples, a, 1)
        fds_first, fds_last = flat(samples, a, 2)
        warm = [s for s in samples if a.warmup <= s[0] <= a.duration]
        res.update({
            "duration_s": round(wall, 1), "clients": a.clients, "requests": sent,
            "outcomes": st.counts, "statuses": {str(k): v for k, v in st.statuses.items()},
            "server_finished": by_reason, "rejected": int(m.get("kvlm_requests_rejected_total", 0)),
            "preemptions": int(m.get("kvlm_preemptions_total", 0)),
            "prompt_tokens": int(m.get("kvlm_prompt_tokens_total", 0)),
            "prompt_tokens_cached": int(m.get("kvlm_prompt_tokens_cached_total", 0)),
            "generated_tokens": int(m.get("kvlm_generated_tokens_total", 0)),
            "kv_blocks": total, "kv_used_before": used0, "kv_used_after": used1,
            "rss_mib": {"first_min": round(rss_first / 2**20, 1), "last_min": round(rss_last / 2**20, 1),
                        "max_after_warmup": round(max(s[1] for s in warm or samples) / 2**20, 1),
                        "idle_before": round(idle_rss0 / 2**20, 1), "idle_after": round(idle_rss / 2**20, 1)},
            "fds": {"first_min": round(fds_first, 1), "last_min": round(fds_last, 1),
                    "idle_before": idle_fds0, "idle_after": idle_fds},
            "failures": st.failures,
        })
        checks += [
            ("no 5xx", not any(k and k >= 500 for k in st.statuses)),
            ("no request failed", st.counts.get("failed", 0) == 0),
            ("server finished every request sent", sum(by_reason.values()) == sent),
            ("no request finished with error", by_reason["error"] == 0 and res["rejected"] == 0),
            ("the budget preempted", res["preemptions"] > 0),
            ("KV blocks back to idle", used1 == used0),
            ("RSS flat (last minute within 10% of the first after warm-up)",
             abs(rss_last - rss_first) <= 0.1 * rss_first),
            ("fds flat (last minute within 10% of the first after warm-up)",
             abs(fds_last - fds_first) <= 0.1 * fds_first),
            ("idle fds after the run as before it", idle_fds <= idle_fds0),
        ]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    res["checks"] = {name: ok for name, ok in checks}
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    bad = [name for name, ok in checks if not ok]
    print("soak: " + ("FAILED: " + "; ".join(bad) if bad else "every check passed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
