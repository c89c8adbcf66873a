#!/usr/bin/env python3
"""KV-cache quality table: perplexity and KL divergence of quantized KV caches, kvlm vs llama.cpp.

Both engines score the same tokens of the same text (the Jargon File, Debian's jargon-text
package) with llama.cpp's perplexity scheme, which kvlm's `perplexity` command mirrors (see
src/engine/perplexity.h): the first N tokens (--tokens) are split into K = N // CTX
non-overlapping chunks of CTX tokens (--ctx); each chunk is evaluated from an empty cache, its
first token replaced by BOS when the vocabulary adds one (SmolLM2's does not); logits at positions
CTX/2 .. CTX-2 predict tokens CTX/2+1 .. CTX-1 and are scored. PPL = exp(mean NLL), error =
PPL x the standard error of the mean NLL (llama.cpp's). For every cache type, against the same
engine's f16 run: delta PPL, mean / 99th-percentile KL(P_f16 || Q_type) and top-1 agreement.

  llama.cpp (llama-cpp-python's low-level API, CPU backend, in this process): f16, q8_0 and q4_0
    K/V caches, flash attention ON for every run (llama.cpp needs it for a quantized V cache, so
    the f16 reference uses it too). The chunk is evaluated by the three contexts in lockstep and
    KL is computed over the full vocabulary from exact f32 logits (llama-perplexity's own
    --kl-divergence-base stores them uint16-quantized; here they never leave memory). Memory:
    two [CTX/2, n_vocab] f32 logit blocks at a time (~400 MB at CTX 2048).
  kvlm (the binary, one `kvlm perplexity` process per configuration): the first configuration is
    the reference and writes a KL base file (--kl-base-out); the others compare with it
    (--kl-base). kvlm's KL is then over the base's top-32 tokens plus one bucket for the rest, a
    lower bound of the full-vocabulary KL (perplexity.h), so compare kvlm's KL with kvlm's and
    llama.cpp's with llama.cpp's. With --kvlm-kl full the others instead evaluate every chunk a
    second time with an f16 cache in the same process (--kl-ref f16) and report the exact
    full-vocabulary KL, the quantity llama.cpp's rows report (twice the time). A configuration
    that fails (a flag perplexity does not take yet) gets its error in its table row.

The text kvlm reads is the shortest prefix of the Jargon File whose (llama.cpp) tokenization starts
with the same N tokens as the whole text's, plus a small margin; the llama.cpp side tokenizes that
same prefix. kvlm's KL base file records an FNV-1a hash of the tokens it evaluated; the script checks
it against the tokens llama.cpp evaluated, so the two engines provably score identical tokens.

Usage (from the repository root, after building kvlm; run on a quiet machine):
  python3 bench/kv_quality.py --tokens 20480 --ctx 2048 --json kv_quality.json \\
      --kvlm-config "kivi=-ctk q4_0 -ctv q4_0 --kv-residual 64" \\
      --kvlm-config "win1024_s0=--kv-window 1024 --kv-sinks 0"
  python3 bench/kv_quality.py --tokens 1024 --ctx 256          # smoke test, about a minute
  python3 bench/kv_quality.py --no-llama ...                   # kvlm rows only

Requires numpy and llama-cpp-python==0.3.36 (its bundled llama.cpp; see tools/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gzip
import json
import math
import os
import platform
import re
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import llama_repack

kRepoRoot = Path(__file__).resolve().parent.parent
kDefaultModelFile = "SmolLM2-135M-Instruct.Q4_1.gguf"
kJargonGz = "/usr/share/doc/jargon-text/jargon.txt.gz"

# ggml type ids (llama_context_params.type_k / type_v) and bytes per value.
kGgmlTypes = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 8}
kBytesPerValue = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32}
kLlamaTypes = ("f16", "q8_0", "q4_0")  # the first is the reference
kDefaultKvlmConfigs = [("f16", "-ctk f16 -ctv f16"), ("q8_0", "-ctk q8_0 -ctv q8_0"),
                       ("q4_0", "-ctk q4_0 -ctv q4_0")]
kFlashAttnEnabled = 1  # LLAMA_FLASH_ATTN_TYPE_ENABLED
kMarginTokens = 16     # extra tokens kept past N in the text prefix
kRowBlock = 64         # logits rows per numpy block (64 x 49152 x 8 B = 25 MB in f64)

# kvlm's KL base header (perplexity.h, KlBaseHeader): 64 bytes, little-endian.
kKlHeader = struct.Struct("<8sIIIHHqqqQQ")
kFnvOffset, kFnvPrime = 14695981039346656037, 1099511628211


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def fnv1a64(data: bytes) -> int:
    h = kFnvOffset
    for b in data:
        h = ((h ^ b) * kFnvPrime) & 0xFFFFFFFFFFFFFFFF
    return h


def default_model() -> Path:
    d = os.environ.get("KVLM_MODELS") or os.path.join(os.path.expanduser("~"), ".cache/kvlm/models")
    return Path(d) / kDefaultModelFile


def lscpu_model_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "?"
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k.strip() == "Model name":
            return v.strip()
    return "?"


def git_head() -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(kRepoRoot), "rev-parse", "HEAD"], capture_output=True,
                           text=True)
        return p.stdout.strip() or None if p.returncode == 0 else None
    except OSError:
        return None


def mean_err(x: np.ndarray) -> tuple[float, float]:
    """Mean and llama.cpp's standard error of the mean, sqrt(var / (n - 1))."""
    n = len(x)
    if n == 0:
        return 0.0, 0.0
    m = float(np.sum(x)) / n
    var = float(np.sum(x * x)) / n - m * m
    return m, (math.sqrt(var / (n - 1)) if n > 1 and var > 0 else 0.0)


def quantile(x: np.ndarray, q: float) -> float:
    """kvlm's quantile (perplexity.cpp): element round(q * (n - 1)) of the sorted values."""
    if len(x) == 0:
        return 0.0
    k = min(len(x) - 1, int(q * (len(x) - 1) + 0.5))
    return float(np.partition(x, k)[k])


def cache_types_in_flags(flags: list[str]) -> tuple[str, str]:
    """-ctk/-ctv (or --cache-type-k/-v, also with '=') of a kvlm flag list; f16 when absent."""
    found = {"k": "f16", "v": "f16"}
    for i, f in enumerate(flags):
        for kv in ("k", "v"):
            for name in (f"-ct{kv}", f"--cache-type-{kv}"):
                if f == name and i + 1 < len(flags):
                    found[kv] = flags[i + 1]
                elif f.startswith(name + "="):
                    found[kv] = f.split("=", 1)[1]
    return found["k"], found["v"]


class KvShape:
    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int):
        self.n_layer, self.n_kv_head, self.head_dim = n_layer, n_kv_head, head_dim

    def bytes_per_token(self, ctk: str, ctv: str) -> int | None:
        if ctk not in kBytesPerValue or ctv not in kBytesPerValue:
            return None
        per = self.n_layer * self.n_kv_head * self.head_dim
        return round(per * (kBytesPerValue[ctk] + kBytesPerValue[ctv]))


# ---- llama.cpp ---------------------------------------------------------------------------------


class LlamaCpp:
    """llama.cpp through llama-cpp-python's ctypes bindings."""

    def __init__(self, model_path: Path, n_threads: int, repack: bool, verbose: bool):
        import llama_cpp
        self.lc = llama_cpp
        self.version = llama_cpp.__version__
        if not verbose:
            self._log_cb = llama_cpp.llama_log_callback(lambda level, text, user: None)
            llama_cpp.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = repack  # llama_repack.py
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self.model:
            sys.exit(f"kv_quality: error: llama.cpp could not load {model_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.n_threads = n_threads
        self.system_info = llama_cpp.llama_print_system_info().decode(errors="replace")

    def meta_int(self, key: str) -> int | None:
        buf = ctypes.create_string_buffer(64)
        n = self.lc.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        try:
            return int(buf.value.decode())
        except ValueError:
            return None

    def kv_shape(self) -> KvShape:
        lc = self.lc
        n_layer = lc.llama_model_n_layer(self.model)
        n_head = lc.llama_model_n_head(self.model)
        n_kv_head = lc.llama_model_n_head_kv(self.model)
        buf = ctypes.create_string_buffer(128)
        lc.llama_model_meta_val_str(self.model, b"general.architecture", buf, len(buf))
        head_dim = self.meta_int(f"{buf.value.decode()}.attention.key_length")
        if not head_dim:
            head_dim = lc.llama_model_n_embd(self.model) // n_head
        return KvShape(n_layer, n_kv_head, head_dim)

    def tokenize(self, text: bytes, add_bos: bool) -> np.ndarray:
        """As llama-perplexity: special-token texts are plain text (parse_special false)."""
        n_max = len(text) + 16
        buf = (ctypes.c_int32 * n_max)()
        n = self.lc.llama_tokenize(self.vocab, text, len(text), buf, n_max, add_bos, False)
        if n < 0:
            sys.exit(f"kv_quality: error: llama_tokenize needs {-n} tokens, more than {n_max}")
        return np.frombuffer(buf, dtype=np.int32, count=n).copy()

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            sys.exit(f"kv_quality: error: token {token}: piece longer than 256 bytes")
        return buf.raw[:n]

    def context(self, n_ctx: int, n_batch: int, type_k: int, type_v: int):
        p = self.lc.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = p.n_ubatch = n_batch
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = self.n_threads
        p.type_k, p.type_v = type_k, type_v
        p.flash_attn_type = kFlashAttnEnabled
        p.no_perf = True
        ctx = self.lc.llama_init_from_model(self.model, p)
        if not ctx:
            sys.exit(f"kv_quality: error: llama.cpp could not create a context of {n_ctx} tokens "
                     f"(type_k {type_k}, type_v {type_v}, flash attention on)")
        return ctx

    def eval_chunk(self, ctx, chunk: np.ndarray, first: int, n_batch: int) -> np.ndarray:
        """Evaluates chunk[0 .. n-2] from an empty cache in batches of n_batch (the last token is
        only a target); returns the logits [n - 1 - first, n_vocab] (f32) of positions
        first .. n-2."""
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        n = len(chunk) - 1
        out = np.empty((n - first, self.n_vocab), dtype=np.float32)
        batch = lc.llama_batch_init(n_batch, 0, 1)
        try:
            row = 0
            for b0 in range(0, n, n_batch):
                b1 = min(n, b0 + n_batch)
                n_out = 0
                for i in range(b0, b1):
                    j = i - b0
                    batch.token[j] = int(chunk[i])
                    batch.pos[j] = i
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    want = i >= first
                    batch.logits[j] = 1 if want else 0
                    n_out += want
                batch.n_tokens = b1 - b0
                rc = lc.llama_decode(ctx, batch)
                if rc != 0:
                    sys.exit(f"kv_quality: error: llama_decode returned {rc}")
                if n_out:
                    ptr = lc.llama_get_logits(ctx)
                    out[row:row + n_out] = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
                    row += n_out
            assert row == n - first
        finally:
            lc.llama_batch_free(batch)
        return out


def row_stats(logits: np.ndarray, targets: np.ndarray):
    """Per row of logits [n, V] (f32): lse (f64), NLL of targets, argmax (lowest id on ties)."""
    n = logits.shape[0]
    lse = np.empty(n)
    for r0 in range(0, n, kRowBlock):
        x = logits[r0:r0 + kRowBlock].astype(np.float64)
        mx = x.max(axis=1, keepdims=True)
        lse[r0:r0 + kRowBlock] = mx[:, 0] + np.log(np.exp(x - mx).sum(axis=1))
    nll = lse - logits[np.arange(n), targets].astype(np.float64)
    return lse, nll, logits.argmax(axis=1)


def kl_rows(base: np.ndarray, base_lse: np.ndarray, q: np.ndarray, q_lse: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row over the full vocabulary, from logits and their logsumexp, in f64."""
    n = base.shape[0]
    kl = np.empty(n)
    for r0 in range(0, n, kRowBlock):
        r1 = min(n, r0 + kRowBlock)
        lp = base[r0:r1].astype(np.float64) - base_lse[r0:r1, None]
        lq = q[r0:r1].astype(np.float64) - q_lse[r0:r1, None]
        kl[r0:r1] = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return np.maximum(kl, 0.0)  # rounding can leave -1e-17 for identical rows


def run_llama(llama: LlamaCpp, evaluated: np.ndarray, n_ctx: int, n_batch: int,
              kv: KvShape) -> list[dict]:
    n_chunks = len(evaluated) // n_ctx
    first = n_ctx // 2
    ctxs = {t: llama.context(n_ctx, n_batch, kGgmlTypes[t], kGgmlTypes[t]) for t in kLlamaTypes}
    acc = {t: {"nll": [], "kld": [], "same_top": [], "seconds": 0.0} for t in kLlamaTypes}
    try:
        for ic in range(n_chunks):
            chunk = evaluated[ic * n_ctx:(ic + 1) * n_ctx]
            targets = chunk[first + 1:]
            base = base_lse = base_top = None
            for t in kLlamaTypes:
                t0 = time.perf_counter()
                logits = llama.eval_chunk(ctxs[t], chunk, first, n_batch)
                acc[t]["seconds"] += time.perf_counter() - t0
                lse, nll, top = row_stats(logits, targets)
                acc[t]["nll"].append(nll)
                if base is None:
                    base, base_lse, base_top = logits, lse, top
                else:
                    acc[t]["kld"].append(kl_rows(base, base_lse, logits, lse))
                    acc[t]["same_top"].append(top == base_top)
                del logits
            msg = "  ".join(f"{t} PPL {math.exp(np.concatenate(acc[t]['nll']).mean()):.4f}"
                            for t in kLlamaTypes)
            log(f"llama.cpp [{ic + 1}/{n_chunks}] {msg}")
            del base
    finally:
        for c in ctxs.values():
            llama.lc.llama_free(c)

    rows = []
    base_nll = np.concatenate(acc[kLlamaTypes[0]]["nll"])
    base_ppl = math.exp(base_nll.mean())
    for t in kLlamaTypes:
        nll = np.concatenate(acc[t]["nll"])
        m, e = mean_err(nll)
        ppl = math.exp(m)
        row = {"engine": "llama.cpp", "config": t, "flags": f"type_k={t} type_v={t} flash_attn=on",
               "cache_type_k": t, "cache_type_v": t, "kv_bytes_per_token": kv.bytes_per_token(t, t),
               "n_scored": int(len(nll)), "nll_mean": m, "ppl": ppl, "ppl_err": ppl * e,
               "seconds": acc[t]["seconds"], "error": None}
        if t != kLlamaTypes[0]:
            kld = np.concatenate(acc[t]["kld"])
            km, ke = mean_err(kld)
            d = nll - base_nll
            dm, de = mean_err(d)
            row.update({"base_ppl": base_ppl, "delta_ppl": ppl - base_ppl,
                        "delta_ppl_pct": 100 * (ppl / base_ppl - 1),
                        "ln_ppl_ratio": dm, "ln_ppl_ratio_err": de,
                        "kld_mean": km, "kld_err": ke, "kld_median": quantile(kld, 0.5),
                        "kld_p99": quantile(kld, 0.99), "kld_max": float(kld.max()),
                        "same_top_pct": 100 * float(np.concatenate(acc[t]["same_top"]).mean())})
        rows.append(row)
    return rows


# ---- kvlm --------------------------------------------------------------------------------------

kNum = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf|-nan|-inf))"
kKvlmPatterns = {
    "text": re.compile(r"^text:\s+.*?: (\d+) bytes, (\d+) tokens", re.M),
    "ppl": re.compile(rf"^PPL = {kNum} \+/- {kNum}\s+\((\d+) tokens scored; (\d+) evaluated in "
                      rf"{kNum} s", re.M),
    "kld_mean": re.compile(rf"^\s*mean KLD\s*=\s*{kNum} \+/- {kNum}", re.M),
    "kld_q": re.compile(rf"^\s*median KLD\s*=\s*{kNum}, 99% {kNum}, max {kNum}", re.M),
    "same_top": re.compile(rf"^\s*same top p\s*=\s*{kNum} %", re.M),
    "base_ppl": re.compile(rf"^\s*base PPL\s*=\s*{kNum}", re.M),
    "ln_ratio": re.compile(rf"^\s*ln\(PPL/base\)\s*=\s*{kNum} \+/- {kNum}", re.M),
    "cache": re.compile(r"^model:.*cache K (\S+) / V (\S+)", re.M),
}


def kvlm_error(p: subprocess.CompletedProcess) -> str:
    lines = [l.strip() for l in (p.stderr + "\n" + p.stdout).splitlines() if l.strip()]
    errs = [l for l in lines if "error" in l.lower()]
    msg = (errs or lines or [f"exited {p.returncode}"])[-1 if not errs else 0]
    return f"exit {p.returncode}: {msg}"


def wait_for(path: Path, seconds: float) -> bool:
    """The lead may be rebuilding kvlm: wait for the binary to come back."""
    deadline = time.monotonic() + seconds
    while not (path.exists() and os.access(path, os.X_OK)):
        if time.monotonic() > deadline:
            return False
        log(f"kvlm: {path} missing, waiting")
        time.sleep(10)
    return True


def run_kvlm_config(args, name: str, flags: str, textfile: Path, base_file: Path, is_base: bool,
                    n_chunks: int, kv: KvShape) -> dict:
    try:
        extra = shlex.split(flags)
    except ValueError as e:
        extra, bad = [], str(e)
    else:
        bad = None
    ctk, ctv = cache_types_in_flags(extra)
    row = {"engine": "kvlm", "config": name, "flags": flags, "cache_type_k": ctk,
           "cache_type_v": ctv, "kv_bytes_per_token": kv.bytes_per_token(ctk, ctv), "error": None}
    if bad:
        row["error"] = f"bad flags: {bad}"
        return row
    # A config may set its own batch (a sliding window wants small batches: a batch of B tokens
    # leaves the first of them only W - B positions of context).
    own_batch = any(f in ("-b", "--batch-size") or f.startswith("--batch-size=") for f in extra)
    cmd = [str(args.kvlm), "perplexity", "-m", str(args.model), "-f", str(textfile),
           "-c", str(args.ctx), "--chunks", str(n_chunks), "-t", str(args.threads)]
    cmd += ([] if own_batch else ["-b", str(args.batch_size)]) + extra
    if is_base:
        cmd += ["--kl-base-out", str(base_file)]
    elif args.kvlm_kl == "full":
        cmd += ["--kl-ref", "f16"]
    else:
        cmd += ["--kl-base", str(base_file)]
    row["command"] = shlex.join(cmd)
    for attempt in range(3):
        if not wait_for(args.kvlm, args.kvlm_wait):
            row["error"] = f"{args.kvlm} not found"
            return row
        log(f"kvlm {name}: {row['command']}")
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # replaced mid-exec by a rebuild
            if attempt < 2:
                time.sleep(10)
                continue
            row["error"] = f"could not run: {e}"
            return row
        break
    row["wall_seconds"] = time.perf_counter() - t0
    if p.returncode != 0:
        row["error"] = kvlm_error(p)
        row["stderr_tail"] = p.stderr[-2000:]
        return row
    out = p.stdout
    row["stdout"] = out
    m = kKvlmPatterns["ppl"].search(out)
    if not m:
        row["error"] = "could not find 'PPL = ...' in kvlm's output"
        return row
    row.update({"ppl": float(m[1]), "ppl_err": float(m[2]), "n_scored": int(m[3]),
                "seconds": float(m[5])})
    if (m := kKvlmPatterns["text"].search(out)):
        row["text_bytes"], row["text_tokens"] = int(m[1]), int(m[2])
    if (m := kKvlmPatterns["cache"].search(out)):
        row["cache_type_k_reported"], row["cache_type_v_reported"] = m[1], m[2]
    if not is_base:
        got = {k: kKvlmPatterns[k].search(out) for k in ("kld_mean", "kld_q", "same_top",
                                                          "base_ppl", "ln_ratio")}
        missing = [k for k, v in got.items() if not v]
        if missing:
            row["error"] = f"could not parse {', '.join(missing)} from kvlm's output"
            return row
        row.update({"kld_mean": float(got["kld_mean"][1]), "kld_err": float(got["kld_mean"][2]),
                    "kld_median": float(got["kld_q"][1]), "kld_p99": float(got["kld_q"][2]),
                    "kld_max": float(got["kld_q"][3]), "same_top_pct": float(got["same_top"][1]),
                    "base_ppl": float(got["base_ppl"][1]),
                    "ln_ppl_ratio": float(got["ln_ratio"][1]),
                    "ln_ppl_ratio_err": float(got["ln_ratio"][2])})
        row["delta_ppl"] = row["ppl"] - row["base_ppl"]
        row["delta_ppl_pct"] = 100 * (row["ppl"] / row["base_ppl"] - 1)
    return row


def check_kl_base(base_file: Path, evaluated: np.ndarray, n_ctx: int, n_chunks: int) -> dict:
    """kvlm's base header against the tokens llama.cpp evaluated."""
    with open(base_file, "rb") as f:
        h = kKlHeader.unpack(f.read(kKlHeader.size))
    magic, _version, top_k, n_vocab, _dk, _dv, h_ctx, h_chunks, n_scored, _mh, tokens_hash = h
    want = fnv1a64(np.ascontiguousarray(evaluated, dtype="<i4").tobytes())
    return {"magic_ok": magic == b"KVLMKLB\0", "top_k": top_k, "n_vocab": n_vocab,
            "n_ctx": h_ctx, "n_chunks": h_chunks, "n_scored": n_scored,
            "tokens_hash": f"{tokens_hash:016x}", "llama_tokens_hash": f"{want:016x}",
            "same_tokens": tokens_hash == want and h_ctx == n_ctx and h_chunks == n_chunks}


# ---- report ------------------------------------------------------------------------------------


def fmt_row(r: dict) -> str:
    def f(key, spec, scale=1.0):
        v = r.get(key)
        return "-" if v is None else format(v * scale, spec)
    bpt = f"{r['kv_bytes_per_token']:,}" if r.get("kv_bytes_per_token") else "?"
    if r.get("error"):
        err = r["error"].replace("|", "\\|")
        return f"| {r['engine']} | {r['config']} | {bpt} | error: {err} | - | - | - | - | - |"
    ppl = f"{r['ppl']:.4f} ± {r['ppl_err']:.4f}"
    dpct = "(base)" if r.get("delta_ppl_pct") is None else f"{r['delta_ppl_pct']:+.3f} %"
    dabs = "-" if r.get("delta_ppl") is None else f"{r['delta_ppl']:+.4f}"
    return (f"| {r['engine']} | {r['config']} | {bpt} | {ppl} | {dabs} | {dpct} "
            f"| {f('kld_mean', '.6f')} | {f('kld_p99', '.6f')} | {f('same_top_pct', '.2f')} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("-m", "--model", type=Path, default=default_model())
    ap.add_argument("--text", type=Path, default=Path(kJargonGz),
                    help="text to score, plain or .gz (default: the Jargon File)")
    ap.add_argument("--tokens", type=int, default=20480, help="N: tokens of the text to use")
    ap.add_argument("--ctx", type=int, default=2048, help="tokens per chunk")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-b", "--batch-size", type=int, default=512,
                    help="tokens per forward pass, both engines (capped at --ctx)")
    ap.add_argument("--kvlm", type=Path, default=kRepoRoot / "build/bin/kvlm")
    ap.add_argument("--kvlm-wait", type=float, default=300,
                    help="seconds to wait for a missing kvlm binary (a rebuild) before giving up")
    ap.add_argument("--kvlm-config", action="append", default=[], metavar="NAME=FLAGS",
                    help="extra kvlm configuration, compared with kvlm's f16 run (repeatable)")
    ap.add_argument("--no-default-kvlm-configs", action="store_true",
                    help="run only the f16 base and the --kvlm-config ones")
    ap.add_argument("--kvlm-kl", choices=("top32", "full"), default="top32",
                    help="kvlm's KL: against the f16 run's top-32 base file (a lower bound), or "
                         "exact over the full vocabulary against an in-process f16 run (2x time)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp (kvlm rows only)")
    llama_repack.add_argument(ap)
    ap.add_argument("--no-kvlm", action="store_true", help="skip kvlm (llama.cpp rows only)")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for llama.cpp's OpenMP threads (shared machine)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write every number here")
    ap.add_argument("--keep-dir", type=Path, help="keep the text prefix and KL base file here")
    ap.add_argument("--verbose", action="store_true", help="keep llama.cpp's log on stderr")
    args = ap.parse_args()
    if args.ctx < 4 or args.tokens < args.ctx:
        ap.error("need --ctx >= 4 and --tokens >= --ctx")
    if args.threads < 1 or args.batch_size < 1:
        ap.error("-t and -b must be positive")
    if not args.model.exists():
        ap.error(f"model {args.model} not found (scripts/fetch-model.sh fetches the default)")
    configs = [kDefaultKvlmConfigs[0]] + ([] if args.no_default_kvlm_configs
                                          else kDefaultKvlmConfigs[1:])
    for c in args.kvlm_config:
        name, sep, flags = c.partition("=")
        if not sep or not name.strip():
            ap.error(f"--kvlm-config '{c}': expected NAME=FLAGS")
        configs.append((name.strip(), flags.strip()))
    n_batch = args.batch_size = min(args.batch_size, args.ctx)
    n_chunks = args.tokens // args.ctx
    n_used = n_chunks * args.ctx

    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when libgomp loads, i.e. at import
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    raw = args.text.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)

    # llama.cpp tokenizes both the whole text and (below) the prefix kvlm reads.
    repack = llama_repack.repack(args.llama_repack)
    llama = LlamaCpp(args.model, args.threads, repack, args.verbose)
    kv = llama.kv_shape()
    full = llama.tokenize(raw, llama.add_bos)
    if len(full) < n_used + kMarginTokens:
        sys.exit(f"kv_quality: error: {args.text} has {len(full)} tokens, fewer than "
                 f"{n_used + kMarginTokens}")
    skip = 1 if llama.add_bos else 0  # BOS has no text
    n_bytes = sum(len(llama.piece(int(t))) for t in full[skip:n_used + kMarginTokens])
    prefix = raw[:n_bytes]
    toks = llama.tokenize(prefix, llama.add_bos)
    if len(toks) < n_used or not np.array_equal(toks[:n_used], full[:n_used]):
        sys.exit("kv_quality: error: the text prefix does not tokenize to the text's first "
                 f"{n_used} tokens")
    evaluated = toks[:n_used].copy()
    if llama.add_bos:
        evaluated[::args.ctx] = llama.bos  # as llama-perplexity: every chunk starts with BOS
    log(f"text: {args.text}: first {len(prefix)} bytes -> {len(toks)} tokens (llama.cpp); "
        f"{n_chunks} chunks of {args.ctx}, scoring positions {args.ctx // 2}..{args.ctx - 2} "
        f"({n_chunks * (args.ctx - 1 - args.ctx // 2)} tokens); BOS {'added' if llama.add_bos else 'not added'}")

    rows: list[dict] = []
    if not args.no_llama:
        rows += run_llama(llama, evaluated, args.ctx, n_batch, kv)

    kvlm_version = None
    token_check = None
    if not args.no_kvlm:
        if wait_for(args.kvlm, args.kvlm_wait):
            p = subprocess.run([str(args.kvlm), "--version"], capture_output=True, text=True)
            kvlm_version = p.stdout.strip().removeprefix("kvlm ") or None
        tmp = tempfile.TemporaryDirectory(prefix="kv_quality.")
        work = args.keep_dir or Path(tmp.name)
        work.mkdir(parents=True, exist_ok=True)
        textfile, base_file = work / "text.txt", work / "base.kld"
        textfile.write_bytes(prefix)
        base_ok = False
        for i, (name, flags) in enumerate(configs):
            if i > 0 and not base_ok:
                try:
                    bpt = kv.bytes_per_token(*cache_types_in_flags(shlex.split(flags)))
                except ValueError:
                    bpt = None
                rows.append({"engine": "kvlm", "config": name, "flags": flags,
                             "kv_bytes_per_token": bpt,
                             "error": "no KL base: the f16 reference run failed"})
                continue
            r = run_kvlm_config(args, name, flags, textfile, base_file, i == 0, n_chunks, kv)
            rows.append(r)
            if i == 0 and not r.get("error"):
                base_ok = True
                token_check = check_kl_base(base_file, evaluated, args.ctx, n_chunks)
                token_check["kvlm_text_tokens"] = r.get("text_tokens")
                token_check["llama_text_tokens"] = int(len(toks))
                if not token_check["same_tokens"]:
                    log("WARNING: kvlm evaluated different tokens than llama.cpp: "
                        f"{token_check}")
            if r.get("error"):
                log(f"kvlm {name}: {r['error']}")
        tmp.cleanup()
    finished = datetime.datetime.now().astimezone()

    # ---- output
    lines = []
    lines.append(f"KV-cache quality: {args.model.name}, {args.text.name}: first {n_used} tokens "
                 f"({len(prefix)} bytes), {n_chunks} chunks of {args.ctx}, scoring positions "
                 f"{args.ctx // 2}..{args.ctx - 2} of each "
                 f"({n_chunks * (args.ctx - 1 - args.ctx // 2)} tokens), {args.threads} threads, "
                 f"batch {n_batch}")
    lines.append(f"machine: {lscpu_model_name()}, {platform.platform()}  |  "
                 f"llama-cpp-python {llama.version} (repack {llama_repack.describe(repack)}), kvlm {kvlm_version or '?'}  |  "
                 f"{started.isoformat(timespec='seconds')}")
    if token_check:
        lines.append("same tokens: " + ("yes (kvlm's KL base token hash "
                     f"{token_check['tokens_hash']} = llama.cpp's)" if token_check["same_tokens"]
                     else f"NO: {token_check}"))
    lines.append("")
    lines.append("| engine | config | KV B/token | PPL ± err | ΔPPL | ΔPPL % | mean KLD | 99% KLD "
                 "| top-1 agree % |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines += [fmt_row(r) for r in rows]
    lines.append("")
    lines.append("ΔPPL, KLD and top-1 agreement are against the same engine's f16 run. llama.cpp: "
                 "flash attention ON in every run (needed for its quantized V cache); KL over "
                 "the full vocabulary from exact f32 logits. kvlm: " + (
                     "KL over the full vocabulary against an in-process f16 run of every chunk "
                     "(--kl-ref f16), the same quantity as llama.cpp's. " if args.kvlm_kl == "full"
                     else "KL over the f16 run's top-32 "
                 "tokens + one bucket for the rest, a lower bound of the full KL "
                 "(src/engine/perplexity.h); compare kvlm with kvlm, llama.cpp with llama.cpp. ") +
                 "KV B/token: n_layer x 2 x n_kv_head x head_dim x bytes per value "
                 f"({kv.n_layer} x 2 x {kv.n_kv_head} x {kv.head_dim}; f16 2, q8_0 34/32, "
                 "q4_0 18/32), from the cache types only (other flags such as residual windows "
                 "are not counted).")
    text = "\n".join(lines)
    print(text)

    if args.json:
        for r in rows:
            r.pop("stdout", None)
        doc = {
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable] + sys.argv),
            "machine": {"platform": platform.platform(), "cpu": lscpu_model_name(),
                        "cpus": os.cpu_count(),
                        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()}},
            "versions": {"python": platform.python_version(), "numpy": np.__version__,
                         "llama_cpp_python": llama.version, "kvlm": kvlm_version,
                         "kvlm_git_head": git_head()},
            "model": str(args.model), "text": str(args.text), "text_prefix_bytes": len(prefix),
            "n_tokens": args.tokens, "n_tokens_used": n_used, "n_ctx": args.ctx,
            "n_chunks": n_chunks, "n_scored": n_chunks * (args.ctx - 1 - args.ctx // 2),
            "first_scored_position": args.ctx // 2, "last_scored_position": args.ctx - 2,
            "add_bos": llama.add_bos, "threads": args.threads, "n_batch": n_batch,
            "kv_shape": {"n_layer": kv.n_layer, "n_kv_head": kv.n_kv_head, "head_dim": kv.head_dim},
            "llama_cpp": {"flash_attn": "on", "kl": "full vocabulary, exact f32 logits",
                          "system_info": llama.system_info,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
            "kvlm": {"binary": str(args.kvlm),
                     "kl": ("full vocabulary, in-process f16 run (--kl-ref f16)"
                            if args.kvlm_kl == "full" else "top-32 + rest buckets (lower bound)"),
                     "configs": [{"name": n, "flags": f} for n, f in configs],
                     "token_check": token_check},
            "rows": rows,
            "table": text,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
