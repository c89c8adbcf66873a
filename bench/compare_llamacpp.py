#!/usr/bin/env python3
"""kvlm vs llama.cpp on the same GGUF, the same threads and the same tests, plus the decode roofline.

Tests follow llama-bench: ppN @ dD (D untimed context tokens, then N prompt tokens timed, in
batches of -b) and tgN @ dD (D untimed context tokens, then N single-token decodes timed);
tokens/s = N / time. Both engines feed uniform random token ids (llama-bench does too); the ids
do not change the arithmetic.

The runs alternate, A B A B ... (--pairs, at least 5): A is llama.cpp (llama-cpp-python's
low-level API, in this process, CPU backend) running every test once; B is one
`kvlm bench --json -r 1` process running every test once (after its own untimed warm-up). Slow
drift of the machine (other jobs, thermal state) then hits both engines alike. The table gives
per-test medians over the pairs and the ratio kvlm / llama.cpp (> 1: kvlm faster).

Roofline: kvlm_membw measures main-memory bandwidth (STREAM triad, 24 B per element; and a
read-only sum). A decoded token must read every weight matrix once (kvlm's "weight_bytes") plus
the K/V rows of every cached position (kv_bytes_per_token x context). With a context growing from
D to D + N - 1 during tgN @ dD the mean is D + (N - 1) / 2, so
    bytes/token = weight_bytes + kv_bytes_per_token * (D + (N - 1) / 2)
    ceiling     = bandwidth / bytes/token    [tokens/s]
and each engine's decode rate is reported as a percentage of that ceiling.

Usage (from the repository root, after building kvlm and kvlm_membw):
  python3 bench/compare_llamacpp.py -p 512 -n 128 -d 0,1024 -t 2 --pairs 5
  python3 bench/compare_llamacpp.py -m models/bench/tinyllama-dims.Q4_0.gguf -p 64 -n 16 --json

Requires numpy and llama-cpp-python==0.3.36 (its bundled llama.cpp; see tools/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import llama_repack

kRepoRoot = Path(__file__).resolve().parent.parent
kDefaultModelFile = "SmolLM2-135M-Instruct.Q4_1.gguf"
kTokenSeed = 1234

# -ctk/-ctv names -> ggml type ids (llama_context_params.type_k / type_v).
kGgmlTypes = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 8}


def int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a comma-separated list of integers")
    if any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"'{s}': values must be >= 0")
    return vals


def default_model() -> Path:
    d = os.environ.get("KVLM_MODELS") or os.path.join(os.path.expanduser("~"), ".cache/kvlm/models")
    return Path(d) / kDefaultModelFile


def lscpu_summary() -> dict:
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
            "L1d cache", "L2 cache", "L3 cache", "CPU max MHz", "Hypervisor vendor")
    out = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return out
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in keep:
            out[k.strip()] = v.strip()
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("Flags:")), [])
    out["SIMD"] = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16")
                           if f in flags)
    try:
        mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
        out["Memory"] = f"{mem_kib / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    return out


class Test:
    """One llama-bench test: n_prompt > 0 (pp) or n_gen > 0 (tg), after `depth` context tokens."""

    def __init__(self, n_prompt: int, n_gen: int, depth: int):
        self.n_prompt, self.n_gen, self.depth = n_prompt, n_gen, depth

    @property
    def name(self) -> str:  # the same names `kvlm bench` prints
        s = f"pp{self.n_prompt}" if self.n_gen == 0 else f"tg{self.n_gen}"
        return f"{s} @ d{self.depth}" if self.depth else s

    @property
    def n_ctx(self) -> int:
        return self.depth + self.n_prompt + self.n_gen


def plan(args) -> list[Test]:
    """Same order as kvlm bench: every pp, then every tg; depth varies fastest."""
    tests = [Test(p, 0, d) for p in args.n_prompt if p > 0 for d in args.n_depth]
    tests += [Test(0, g, d) for g in args.n_gen if g > 0 for d in args.n_depth]
    return tests


# ---- llama.cpp -------------------------------------------------------------------------------


class LlamaCpp:
    """llama.cpp through llama-cpp-python's ctypes bindings: one model, one context per test."""

    def __init__(self, model_path: Path, n_threads: int, n_batch: int, type_k: int, type_v: int,
                 flash_attn: int, repack: bool, verbose: bool):
        import llama_cpp
        self.lc = llama_cpp
        self.version = llama_cpp.__version__
        if not verbose:
            # Keep a reference: ctypes must not free the callback while llama.cpp holds it.
            self._log_cb = llama_cpp.llama_log_callback(lambda level, text, user: None)
            llama_cpp.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = repack  # llama_repack.py
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            sys.exit(f"compare_llamacpp: error: llama.cpp could not load {model_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_threads, self.n_batch = n_threads, n_batch
        self.type_k, self.type_v, self.flash_attn = type_k, type_v, flash_attn
        self.contexts: dict[int, int] = {}  # n_ctx -> llama_context*
        self.system_info = llama_cpp.llama_print_system_info().decode(errors="replace")

    def context(self, n_ctx: int):
        if n_ctx not in self.contexts:
            lc = self.lc
            p = lc.llama_context_default_params()
            p.n_ctx = n_ctx
            p.n_batch = p.n_ubatch = self.n_batch
            p.n_seq_max = 1
            p.n_threads = p.n_threads_batch = self.n_threads
            p.type_k, p.type_v = self.type_k, self.type_v
            p.flash_attn_type = self.flash_attn
            p.no_perf = True
            ctx = lc.llama_init_from_model(self.model, p)
            if not ctx:
                sys.exit(f"compare_llamacpp: error: llama.cpp could not create a context of "
                         f"{n_ctx} tokens (type_k {self.type_k}, type_v {self.type_v}; quantized "
                         "V caches need flash attention: --flash-attn on)")
            self.contexts[n_ctx] = ctx
        return self.contexts[n_ctx]

    def _decode(self, ctx, ids: np.ndarray) -> None:
        """Decodes ids (int32) in batches of n_batch, continuing the sequence's positions."""
        for i in range(0, len(ids), self.n_batch):
            chunk = np.ascontiguousarray(ids[i:i + self.n_batch], dtype=np.int32)
            ptr = chunk.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
            batch = self.lc.llama_batch_get_one(ptr, len(chunk))  # logits for the last token only
            rc = self.lc.llama_decode(ctx, batch)
            if rc != 0:
                sys.exit(f"compare_llamacpp: error: llama_decode returned {rc}")

    def run(self, t: Test) -> float:
        """One repetition of t; returns the timed seconds."""
        ctx = self.context(t.n_ctx)
        rng = np.random.default_rng(kTokenSeed)
        context = rng.integers(0, self.n_vocab, t.depth, dtype=np.int32)
        prompt = rng.integers(0, self.n_vocab, t.n_prompt, dtype=np.int32)
        gen = rng.integers(0, self.n_vocab, t.n_gen, dtype=np.int32)
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)
        if t.depth:
            self._decode(ctx, context)
        self.lc.llama_synchronize(ctx)
        t0 = time.perf_counter()
        if t.n_prompt:
            self._decode(ctx, prompt)
        for i in range(t.n_gen):
            self._decode(ctx, gen[i:i + 1])
        self.lc.llama_synchronize(ctx)
        return time.perf_counter() - t0

    def warm_up(self, t: Test) -> None:
        """Untimed, as llama-bench: a pp test's whole prompt, or a tg test's context + 1 token."""
        self.run(t if t.n_gen == 0 else Test(0, 1, t.depth))


# ---- kvlm -------------------------------------------------------------------------------------


def kvlm_run(args, tests: list[Test]) -> dict:
    cmd = [str(args.kvlm), "bench", "-m", str(args.model), "--json", "-r", "1",
           "-t", str(args.threads), "-b", str(args.batch_size), "-ctk", args.ctk, "-ctv", args.ctv,
           "-p", ",".join(map(str, args.n_prompt)), "-n", ",".join(map(str, args.n_gen)),
           "-d", ",".join(map(str, args.n_depth))]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"compare_llamacpp: error: {' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    doc = json.loads(p.stdout)
    names = [t["name"] for t in doc["tests"]]
    if names != [t.name for t in tests]:
        sys.exit(f"compare_llamacpp: error: kvlm bench ran {names}, expected {[t.name for t in tests]}")
    return doc


def membw_run(args) -> dict | None:
    if args.no_membw:
        return None
    if not Path(args.membw).exists():
        print(f"note: {args.membw} not found (build the kvlm_membw target); no roofline",
              file=sys.stderr)
        return None
    cmd = [str(args.membw), "--json", "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"compare_llamacpp: error: {' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    return json.loads(p.stdout)


# ---- report -----------------------------------------------------------------------------------


def fmt_rate(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=default_model())
    ap.add_argument("-p", "--n-prompt", type=int_list, default=[512])
    ap.add_argument("-n", "--n-gen", type=int_list, default=[128])
    ap.add_argument("-d", "--n-depth", type=int_list, default=[0])
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    ap.add_argument("-ctk", "--cache-type-k", dest="ctk", choices=sorted(kGgmlTypes), default="f16")
    ap.add_argument("-ctv", "--cache-type-v", dest="ctv", choices=sorted(kGgmlTypes), default="f16")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's flash attention (kvlm has none; quantized V needs it on)")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for llama.cpp's OpenMP threads (use when other "
                         "work shares the CPUs: spinning threads then collapse; kvlm's pool sleeps)")
    llama_repack.add_argument(ap)
    ap.add_argument("--pairs", type=int, default=5, help="A B pairs (>= 5)")
    ap.add_argument("--kvlm", type=Path, default=kRepoRoot / "build/bin/kvlm")
    ap.add_argument("--membw", type=Path, default=kRepoRoot / "build/bench/kvlm_membw")
    ap.add_argument("--no-membw", action="store_true", help="skip the bandwidth probe and roofline")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument("--verbose", action="store_true", help="keep llama.cpp's log on stderr")
    args = ap.parse_args()
    if args.pairs < 5:
        ap.error("--pairs must be at least 5")
    if args.threads < 1 or args.batch_size < 1:
        ap.error("-t and -b must be positive")
    if not args.model.exists():
        ap.error(f"model {args.model} not found (scripts/fetch-model.sh fetches the default)")
    if not args.kvlm.exists():
        ap.error(f"{args.kvlm} not found (build kvlm first, or pass --kvlm)")
    tests = plan(args)
    if not tests:
        ap.error("nothing to run: -p and -n are all 0")

    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when libgomp loads, i.e. at import
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    fa = {"auto": -1, "off": 0, "on": 1}[args.flash_attn]
    repack = llama_repack.repack(args.llama_repack)
    llama = LlamaCpp(args.model, args.threads, args.batch_size, kGgmlTypes[args.ctk],
                     kGgmlTypes[args.ctv], fa, repack, args.verbose)

    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load_before[0]:.2f} on {os.cpu_count()} CPUs: other work is "
              "running. llama.cpp's OpenMP threads spin-wait at every barrier, so competing "
              "processes slow it far more than kvlm (seen: 290 -> 5 t/s); use --omp-passive or "
              "-t 1, or wait for an idle machine", file=sys.stderr, flush=True)
    membw = membw_run(args)
    log(f"llama.cpp warm-up ({len(tests)} tests)")
    for t in tests:
        llama.warm_up(t)
    samples = {t.name: {"kvlm": [], "llama.cpp": []} for t in tests}
    kvlm_doc = None
    for i in range(args.pairs):
        log(f"pair {i + 1}/{args.pairs}: llama.cpp")
        for t in tests:
            samples[t.name]["llama.cpp"].append((t.n_prompt + t.n_gen) / llama.run(t))
        log(f"pair {i + 1}/{args.pairs}: kvlm")
        kvlm_doc = kvlm_run(args, tests)
        for r in kvlm_doc["tests"]:
            samples[r["name"]]["kvlm"].append(r["tokens_per_s"]["mean"])
    membw_after = membw_run(args)
    load_after = os.getloadavg()
    finished = datetime.datetime.now().astimezone()

    rows = []
    for t in tests:
        s = samples[t.name]
        mk, ml = statistics.median(s["kvlm"]), statistics.median(s["llama.cpp"])
        rows.append({"name": t.name, "n_prompt": t.n_prompt, "n_gen": t.n_gen, "depth": t.depth,
                     "kvlm": {"median": mk, "samples": s["kvlm"]},
                     "llama_cpp": {"median": ml, "samples": s["llama.cpp"]},
                     "ratio": mk / ml if ml > 0 else None})

    roofline = []
    if membw and kvlm_doc:
        # Two probes, before and after; the better one is the less disturbed measurement.
        bw = {k: max(m[k] for m in (membw, membw_after) if m) for k in ("triad_gbs", "read_gbs")}
        w = kvlm_doc["weight_bytes"]
        kv_pt = kvlm_doc["kv_bytes_per_token"]
        for row in rows:
            if row["n_gen"] == 0:
                continue
            mean_ctx = row["depth"] + (row["n_gen"] - 1) / 2
            bpt = w + kv_pt * mean_ctx
            ceil_triad = bw["triad_gbs"] * 1e9 / bpt
            ceil_read = bw["read_gbs"] * 1e9 / bpt
            roofline.append({"name": row["name"], "bytes_per_token": bpt,
                             "ceiling_triad": ceil_triad, "ceiling_read": ceil_read,
                             "kvlm_pct_triad": 100 * row["kvlm"]["median"] / ceil_triad,
                             "llama_cpp_pct_triad": 100 * row["llama_cpp"]["median"] / ceil_triad,
                             "kvlm_pct_read": 100 * row["kvlm"]["median"] / ceil_read})

    doc = {
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "machine": lscpu_summary(),
        "platform": platform.platform(),
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "model": str(args.model),
        "threads": args.threads, "n_batch": args.batch_size,
        "cache_type_k": args.ctk, "cache_type_v": args.ctv,
        "pairs": args.pairs,
        "llama_cpp": {"package": "llama-cpp-python", "version": llama.version,
                      "flash_attn": args.flash_attn, "repack": llama_repack.describe(repack),
                      "system_info": llama.system_info,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp default)")},
        "kvlm": {k: kvlm_doc.get(k) for k in ("model", "weight_bytes", "kv_bytes_per_token",
                                              "n_batch", "threads", "kernels")} if kvlm_doc else None,
        "membw": {"before": membw, "after": membw_after},
        "tests": rows,
        "roofline": roofline,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0

    m = doc["machine"]
    print(f"model: {args.model}  |  {args.threads} threads, batch {args.batch_size}, "
          f"K {args.ctk} / V {args.ctv}  |  {args.pairs} A/B pairs, medians")
    print(f"machine: {m.get('Model name', '?')}, {m.get('CPU(s)', '?')} CPUs, L3 {m.get('L3 cache', '?')}"
          f"  |  llama-cpp-python {llama.version} (flash attn {args.flash_attn}, repack {doc['llama_cpp']['repack']}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')})  |  {doc['started']}")
    # What each engine runs on this CPU: kvlm's kernel variant (KVLM_KERNELS can force one) and
    # the instruction sets llama.cpp was compiled for (its system info, features "= 1").
    feats = [f.split("=")[0].strip() for f in llama.system_info.split("|") if f.strip().endswith("= 1")]
    print(f"kvlm kernels: {(doc['kvlm'] or {}).get('kernels') or '?'}  |  llama.cpp CPU features: "
          f"{' '.join(feats) or '?'}")
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}\n")
    print("| test | kvlm t/s | llama.cpp t/s | kvlm / llama.cpp |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        print(f"| {r['name']} | {fmt_rate(r['kvlm']['median'])} | {fmt_rate(r['llama_cpp']['median'])} "
              f"| {ratio} |")
    if roofline:
        bw = {k: max(mm[k] for mm in (membw, membw_after) if mm) for k in ("triad_gbs", "read_gbs")}
        print(f"\nbandwidth (kvlm_membw, {args.threads} threads, best of before/after): triad "
              f"{bw['triad_gbs']:.2f} GB/s (24 B/element, STREAM convention), read-only "
              f"{bw['read_gbs']:.2f} GB/s")
        print(f"weights read per decoded token: {kvlm_doc['weight_bytes'] / 2**20:.2f} MiB; "
              f"KV read per cached position: {kvlm_doc['kv_bytes_per_token']} B\n")
        print("| test | bytes/token | ceiling t/s (triad) | kvlm % | llama.cpp % | ceiling t/s (read) | kvlm % |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in roofline:
            print(f"| {r['name']} | {r['bytes_per_token'] / 2**20:.2f} MiB | {r['ceiling_triad']:.1f} "
                  f"| {r['kvlm_pct_triad']:.1f} | {r['llama_cpp_pct_triad']:.1f} "
                  f"| {r['ceiling_read']:.1f} | {r['kvlm_pct_read']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
