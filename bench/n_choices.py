#!/usr/bin/env python3
"""n choices of one prompt against n separate concurrent requests of the same prompt.

Starts `kvlm serve` (a fresh server per run, so no run finds another's prefix-cache blocks), then
either sends one request with `n` = N or N concurrent requests with `n` = 1, the same prompt of
about --prompt-tokens tokens, --max-tokens new tokens each (ignore_eos, so every choice generates
them all), temperature 0.8 and seeds: request i gets seed S + i, which is what choice i of the
n = N request samples with, so both modes must produce the same N texts (checked). Reports the
wall time of the whole exchange and, from /metrics, the prompt tokens the forward passes computed:
batch tokens minus the decode tokens (every generated token but each sequence's last).

Usage: bench/n_choices.py [--kvlm build/bin/kvlm] [-m MODEL] [--n 8] [--prompt-tokens 500]
       [--max-tokens 64] [--repeats 3] [--no-prefix-cache] [-- extra kvlm serve flags]
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

LISTENING = re.compile(r"kvlm serve: listening on http://127\.0\.0\.1:(\d+) ")
WORDS = ("the river carried old leaves past the mill while the miller counted sacks of grain and "
         "wondered whether the rain would hold until the market opened on the square").split()


def start(kvlm, args):
    proc = subprocess.Popen([kvlm, "serve", "--port", "0", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    for raw in proc.stderr:
        m = LISTENING.search(raw.decode("utf-8", "replace"))
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(m.group(1))
    sys.exit(f"kvlm serve {args} did not start")


def call(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body else None,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            sys.exit(f"{method} {path}: HTTP {r.status}: {data[:300]!r}")
        return data
    finally:
        conn.close()


def metrics(port):
    out = {}
    for line in call(port, "GET", "/metrics").decode().splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def run(a, mode):
    """-> (seconds, prompt tokens computed, [texts by choice], usage of the first response)"""
    flags = ["-m", a.model, "-np", str(max(a.n, 16)), "-t", str(a.threads), *a.serve_args]
    if a.no_prefix_cache:
        flags.append("--no-prefix-cache")
    proc, port = start(a.kvlm, flags)
    try:
        prompt = " ".join(WORDS[i % len(WORDS)] for i in range(a.prompt_tokens))
        # Trim the text to about --prompt-tokens tokens of this model.
        toks = json.loads(call(port, "POST", "/tokenize", {"content": prompt}))["tokens"]
        prompt_ids = toks[:a.prompt_tokens]
        body = {"prompt": prompt_ids, "max_tokens": a.max_tokens, "temperature": 0.8,
                "ignore_eos": True}
        m0 = metrics(port)
        t0 = time.perf_counter()
        if mode == "n":
            r = json.loads(call(port, "POST", "/v1/completions", dict(body, n=a.n, seed=a.seed)))
            texts = [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]
            usage = r["usage"]
        else:
            results = [None] * a.n

            def one(i):
                results[i] = json.loads(call(port, "POST", "/v1/completions",
                                             dict(body, seed=a.seed + i)))
            th = [threading.Thread(target=one, args=(i,)) for i in range(a.n)]
            for t in th:
                t.start()
            for t in th:
                t.join()
            texts = [r["choices"][0]["text"] for r in results]
            usage = results[0]["usage"]
        secs = time.perf_counter() - t0
        m1 = metrics(port)
        d = {k: m1[k] - m0.get(k, 0) for k in m1}
        computed = d["kvlm_batch_tokens_total"] - (d["kvlm_generated_tokens_total"] - a.n)
        engine = (f"{d['kvlm_scheduler_steps_total']:.0f} passes, "
                  f"{d['kvlm_forward_seconds_total']:.2f} s in them, "
                  f"{d['kvlm_scheduler_host_seconds_total']:.2f} s around them")
        return secs, int(computed), texts, usage, len(prompt_ids), engine
    finally:
        proc.terminate()
        proc.wait(60)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kvlm", default="build/bin/kvlm")
    p.add_argument("-m", "--model", default=os.path.expanduser(
        "~/.cache/kvlm/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("serve_args", nargs="*", help="extra kvlm serve flags (after --)")
    a = p.parse_args()
    rows = {"n": [], "separate": []}
    for rep in range(a.repeats):
        for mode in ("n", "separate") if rep % 2 == 0 else ("separate", "n"):
            secs, computed, texts, usage, n_prompt, engine = run(a, mode)
            rows[mode].append((secs, computed, texts))
            print(f"  run {rep} {mode:8s}: {secs:6.2f} s, {computed:5d} prompt tokens computed "
                  f"(prompt {n_prompt}; usage prompt_tokens {usage['prompt_tokens']}, "
                  f"completion_tokens {usage['completion_tokens']}); {engine}", flush=True)
    same = all(r[2] == rows["n"][0][2] for r in rows["n"] + rows["separate"])
    print(f"texts: n={a.n} choices == {a.n} separate requests with seeds seed + i: {same}")
    med = {k: statistics.median(r[0] for r in v) for k, v in rows.items()}
    comp = {k: statistics.median(r[1] for r in v) for k, v in rows.items()}
    print(f"median wall: n={a.n} {med['n']:.2f} s, {a.n} separate {med['separate']:.2f} s "
          f"(ratio {med['n'] / med['separate']:.2f})")
    print(f"prompt tokens computed: n={a.n} {comp['n']:.0f}, {a.n} separate {comp['separate']:.0f} "
          f"(ratio {comp['n'] / max(comp['separate'], 1):.3f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
