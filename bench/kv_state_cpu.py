#!/usr/bin/env python3
"""The server's CPU time per GET /kv/state and per GET /health (the HTTP exchange alone): a
`kvlm serve -np 16` process on an idle pool, 3000 keep-alive calls each, its utime + stime from
/proc before and after. With bench/kv_view_bench.cpp's full-pool figures this bounds what the web
page's polling costs a serving run (docs/bench-log/2026-12-07-kv-view-cost.md).
Usage: kv_state_cpu.py KVLM_BINARY MODEL.gguf
"""
import http.client, os, re, subprocess, sys, time, threading
kvlm, model = sys.argv[1], sys.argv[2]
p = subprocess.Popen([kvlm, "serve", "--port", "0", "-m", model, "-np", "16", "-t", "2"],
                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
port = None
for raw in p.stderr:
    m = re.search(rb"listening on http://[0-9.]+:(\d+) ", raw)
    if m: port = int(m.group(1)); break
threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
c = http.client.HTTPConnection("127.0.0.1", port)
def get(path):
    c.request("GET", path); r = c.getresponse(); b = r.read(); assert r.status == 200; return len(b)
get("/kv/state"); time.sleep(1)
for path, n in (("/health", 3000), ("/kv/state", 3000)):
    c0 = cpu(); t0 = time.monotonic()
    size = 0
    for _ in range(n): size = get(path)
    c1 = cpu(); t1 = time.monotonic()
    print(f"{path}: {n} calls, server CPU {1e6*(c1-c0)/n:.1f} us/call, wall {1e6*(t1-t0)/n:.0f} us/call, body {size} bytes")
p.terminate(); p.wait()
