#!/usr/bin/env python3
"""Random-weight GGUFs of the model families kvlm runs, at their real dimensions, and their
llama.cpp goldens.

One file per family, 2 layers each, with the family's real vocabulary (every tokenizer.* key
copied from llama.cpp's vocab-only test file, ~/.cache/kvlm/refdata/llama.cpp-0.3.36/):

  llama  Llama-3.2-1B: 2048 hidden, 32/8 heads x 64, ffn 8192, vocab 128256 (llama-bpe), RoPE
         base 500000 with a rope_freqs tensor (random factors in [1, 32], see llama3_factors), tied
  qwen2  Qwen2.5-0.5B: 896 hidden, 14/2 heads x 64, ffn 4864, vocab 151936, Q/K/V biases, tied
  qwen3  Qwen3-0.6B: 1024 hidden, 16/8 heads x 128 (key_length), ffn 3072, vocab 151936 (qwen2's),
         per-head Q/K norms, tied
  phi3   Phi-3-mini: 3072 hidden, 32/32 heads x 96, ffn 8192, vocab 32064 (phi-3), fused
         attn_qkv and gate/up, separate output, sliding_window 2047 (ignored by llama.cpp)
  qwen2-yarn         qwen2's dims with Qwen2.5's long-context rope_scaling: yarn, factor 4,
                     original context 32768 (training context 131072)
  qwen2-yarn-orig32  the same with original context 32, so the prompts run past it and the ramp
                     interpolates most pairs (a real file's 32768 is beyond a test's prompts)
  phi3-128k          phi3's dims as Phi-3-mini-128k: LongRoPE rope_factors_long/short [48]
                     (random, log-uniform in [1, 64] and [1, 2]), original context 4096,
                     training context 131072, attn_factor sqrt(1 + ln 32 / ln 4096); goldens at
                     n_ctx 128 (the short factors) and 8192 (the long ones: phi3-128k-long)

Token embeddings (and Phi-3's output) are Q4_0, attention matrices Q8_0, FFN matrices Q4_0, norms
and biases F32: 95-280 MB a file, ~1.2 GB in all, written to ~/.cache/kvlm/synthetic/ (or
$KVLM_SYNTHETIC), never to the repository. Weights come from numpy's default_rng seeded per
(family, tensor) and gguf's own quantizers, streamed a tensor at a time, so the files are the same
bytes on every machine with the pinned gguf==0.19.0 and numpy (scripts/setup-python.sh).

Modes:
  python3 tools/make_family_ggufs.py            # build: skip files whose sha256 matches the
                                                #   goldens, else (re)write and check them
  python3 tools/make_family_ggufs.py --goldens  # build, then run llama.cpp (llama-cpp-python
                                                #   0.3.36) and write tests/data/family_goldens.json
  python3 tools/make_family_ggufs.py --goldens --only qwen2-yarn   # rerun llama.cpp for these
                                                #   families only, keeping the other records

The goldens (never edited by hand) hold each file's sha256 and, per prompt of random token ids
(the tokenizer is not involved), per position: argmax, top-8 (id, logit), logsumexp of the row and
the logits at 32 fixed probe ids; then an 8-step greedy continuation (one decode call a step)
with each step's top-1/top-2 gap. llama.cpp runs with flash attention off; the same prompts with
flash attention on give llama.cpp's own spread (max |dlogit| over whole rows, argmax flips), which
tests/model/test_families.cpp uses to set its bounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

kRepoRoot = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(kRepoRoot / "tools"))
sys.path.insert(0, str(kRepoRoot / "bench"))
from make_bench_gguf import copy_tokenizer  # noqa: E402 (tokenizer.* keys, verbatim)

kGoldens = kRepoRoot / "tests" / "data" / "family_goldens.json"
kRefdata = Path(os.environ.get("KVLM_REFDATA") or Path.home() / ".cache/kvlm/refdata") / "llama.cpp-0.3.36"
kOutDir = Path(os.environ.get("KVLM_SYNTHETIC") or Path.home() / ".cache/kvlm/synthetic")
kSeed = 20260123
kLayers = 2
kChunkRows = 8192  # rows generated and quantized at a time (memory stays ~100 MB a chunk)

# name, arch, vocab file, hyper-parameters, first special id (prompts draw ids below it)
kFamilies = [
    dict(name="llama3", arch="llama", vocab="llama-bpe", n_embd=2048, n_head=32, n_head_kv=8,
         head_dim=64, n_ff=8192, n_ctx=131072, rope_base=500000.0, eps=1e-5, tied=True,
         rope_freqs=True, n_text=128000),
    dict(name="qwen2", arch="qwen2", vocab="qwen2", n_embd=896, n_head=14, n_head_kv=2,
         head_dim=64, n_ff=4864, n_ctx=32768, rope_base=1e6, eps=1e-6, tied=True, qkv_bias=True,
         n_text=151643),
    dict(name="qwen3", arch="qwen3", vocab="qwen2", n_embd=1024, n_head=16, n_head_kv=8,
         head_dim=128, n_ff=3072, n_ctx=40960, rope_base=1e6, eps=1e-6, tied=True, qk_norm=True,
         key_length=True, n_text=151643),
    dict(name="phi3", arch="phi3", vocab="phi-3", n_embd=3072, n_head=32, n_head_kv=32,
         head_dim=96, n_ff=8192, n_ctx=4096, rope_base=10000.0, eps=1e-5, tied=False,
         fused=True, sliding_window=2047, n_text=32000),
    dict(name="qwen2-yarn", arch="qwen2", vocab="qwen2", n_embd=896, n_head=14, n_head_kv=2,
         head_dim=64, n_ff=4864, n_ctx=131072, rope_base=1e6, eps=1e-6, tied=True, qkv_bias=True,
         n_text=151643, yarn=(4.0, 32768)),
    dict(name="qwen2-yarn-orig32", arch="qwen2", vocab="qwen2", n_embd=896, n_head=14,
         n_head_kv=2, head_dim=64, n_ff=4864, n_ctx=131072, rope_base=1e6, eps=1e-6, tied=True,
         qkv_bias=True, n_text=151643, yarn=(4.0, 32)),
    dict(name="phi3-128k", arch="phi3", vocab="phi-3", n_embd=3072, n_head=32, n_head_kv=32,
         head_dim=96, n_ff=8192, n_ctx=131072, rope_base=10000.0, eps=1e-5, tied=False,
         fused=True, sliding_window=262144, n_text=32000, longrope=4096,
         runs=(("phi3-128k", 128), ("phi3-128k-long", 8192))),
]
kRunCtx = 128  # llama.cpp's n_ctx for a family without runs


def file_name(fam: dict) -> str:
    return f"{fam['name']}-dims-random-{kLayers}l.gguf"


def llama3_factors(fam: dict) -> np.ndarray:
    """rope_freqs.weight [head_dim / 2]: factors log-uniform in [1, 32] for every pair. Real Llama 3
    files slow only the long wavelengths (factor 32 past 8192 positions, 1 below 2048, a ramp
    between), which moves logits at a 64-token prompt by less than llama.cpp's own noise; factors
    on every pair make a forward pass that ignores them fail at any position."""
    rng = np.random.default_rng([kSeed, kFamilies.index(fam), 999])
    return np.exp(rng.uniform(0.0, np.log(32.0), fam["head_dim"] // 2)).astype(np.float32)


def longrope_factors(fam: dict, which: int) -> np.ndarray:
    """rope_factors_long (which 0: log-uniform in [1, 64]) or _short (1: in [1, 2]) [head_dim / 2].
    Real Phi-3 128k sets are smooth in the pair index; random ones make every pair count, and
    sets this far apart make a forward pass that picks the wrong one fail."""
    rng = np.random.default_rng([kSeed, kFamilies.index(fam), 998 - which])
    hi = 64.0 if which == 0 else 2.0
    return np.exp(rng.uniform(0.0, np.log(hi), fam["head_dim"] // 2)).astype(np.float32)


def tensor_specs(fam: dict, n_vocab: int) -> list[tuple[str, tuple[int, ...], QT, float]]:
    """(name, numpy shape = reversed GGUF ne, type, std) in file order; std 0 marks a norm weight
    (1 + 0.1 N), std < 0 a fixed tensor (-1 rope_freqs, -2 rope_factors_long, -3 _short)."""
    E, F, hd = fam["n_embd"], fam["n_ff"], fam["head_dim"]
    Q, KV = fam["n_head"] * hd, fam["n_head_kv"] * hd
    s = [("token_embd.weight", (n_vocab, E), QT.Q4_0, 3.0 / np.sqrt(E)),
         ("output_norm.weight", (E,), QT.F32, 0.0)]
    if not fam["tied"]:
        s.append(("output.weight", (n_vocab, E), QT.Q4_0, 3.0 / np.sqrt(E)))
    if fam.get("rope_freqs"):
        s.append(("rope_freqs.weight", (hd // 2,), QT.F32, -1.0))
    if fam.get("longrope"):
        s += [("rope_factors_long.weight", (hd // 2,), QT.F32, -2.0),
              ("rope_factors_short.weight", (hd // 2,), QT.F32, -3.0)]
    for il in range(kLayers):
        b = f"blk.{il}."
        s.append((b + "attn_norm.weight", (E,), QT.F32, 0.0))
        if fam.get("fused"):
            s.append((b + "attn_qkv.weight", (Q + 2 * KV, E), QT.Q8_0, 1.0 / np.sqrt(E)))
        else:
            s += [(b + "attn_q.weight", (Q, E), QT.Q8_0, 1.0 / np.sqrt(E)),
                  (b + "attn_k.weight", (KV, E), QT.Q8_0, 1.0 / np.sqrt(E)),
                  (b + "attn_v.weight", (KV, E), QT.Q8_0, 1.0 / np.sqrt(E))]
        if fam.get("qkv_bias"):
            s += [(b + "attn_q.bias", (Q,), QT.F32, 0.5), (b + "attn_k.bias", (KV,), QT.F32, 0.5),
                  (b + "attn_v.bias", (KV,), QT.F32, 0.5)]
        if fam.get("qk_norm"):
            s += [(b + "attn_q_norm.weight", (hd,), QT.F32, 0.0),
                  (b + "attn_k_norm.weight", (hd,), QT.F32, 0.0)]
        s.append((b + "attn_output.weight", (E, Q), QT.Q8_0, 1.0 / np.sqrt(Q)))
        s.append((b + "ffn_norm.weight", (E,), QT.F32, 0.0))
        if fam.get("fused"):  # rows: gate (silu'd), then up
            s.append((b + "ffn_up.weight", (2 * F, E), QT.Q4_0, 1.0 / np.sqrt(E)))
        else:
            s += [(b + "ffn_gate.weight", (F, E), QT.Q4_0, 1.0 / np.sqrt(E)),
                  (b + "ffn_up.weight", (F, E), QT.Q4_0, 1.0 / np.sqrt(E))]
        s.append((b + "ffn_down.weight", (E, F), QT.Q4_0, 1.0 / np.sqrt(F)))
    return s


def tensor_data(fam: dict, idx: int, shape: tuple[int, ...], qtype: QT, std: float) -> np.ndarray:
    rng = np.random.default_rng([kSeed, kFamilies.index(fam), idx])
    if std == -1.0:
        return llama3_factors(fam)
    if std < 0:
        return longrope_factors(fam, 0 if std == -2.0 else 1)
    if std == 0:
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if qtype == QT.F32:
        return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    parts = []
    for r0 in range(0, shape[0], kChunkRows):
        x = rng.standard_normal((min(kChunkRows, shape[0] - r0), shape[1]), dtype=np.float32)
        x *= np.float32(std)
        parts.append(gguf.quants.quantize(x, qtype))
    return np.concatenate(parts, axis=0)


def write_family(fam: dict, path: Path) -> None:
    src = gguf.GGUFReader(kRefdata / f"ggml-vocab-{fam['vocab']}.gguf")
    a = fam["arch"]
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, a)
    w.add_name(f"kvlm random {fam['name']} dims, {kLayers} layers")
    w.add_description(f"random weights, numpy seed {kSeed}; written by kvlm tools/make_family_ggufs.py")
    w.add_context_length(fam["n_ctx"])
    w.add_embedding_length(fam["n_embd"])
    w.add_block_count(kLayers)
    w.add_feed_forward_length(fam["n_ff"])
    w.add_head_count(fam["n_head"])
    w.add_head_count_kv(fam["n_head_kv"])
    w.add_layer_norm_rms_eps(fam["eps"])
    w.add_rope_freq_base(fam["rope_base"])
    w.add_rope_dimension_count(fam["head_dim"])
    if fam.get("key_length"):
        w.add_key_length(fam["head_dim"])
        w.add_value_length(fam["head_dim"])
    if "sliding_window" in fam:
        w.add_uint32(f"{a}.attention.sliding_window", fam["sliding_window"])
    if "yarn" in fam:  # as convert_hf_to_gguf.py writes a rope_scaling {type: yarn} config
        factor, orig = fam["yarn"]
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(orig)
    if "longrope" in fam:  # as its Phi3MiniModel writes a 128k model: no scaling type key
        orig = fam["longrope"]
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(
            float(np.sqrt(1.0 + np.log(fam["n_ctx"] / orig) / np.log(orig))))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    n_vocab = copy_tokenizer(w, src)
    w.add_vocab_size(n_vocab)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    specs = tensor_specs(fam, n_vocab)
    for name, shape, qtype, _ in specs:
        if qtype == QT.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            bshape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            w.add_tensor_info(name, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for idx, (name, shape, qtype, std) in enumerate(specs):
        w.write_tensor_data(tensor_data(fam, idx, shape, qtype, std))
    w.close()
    tmp.rename(path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def build(out_dir: Path) -> dict[str, Path]:
    """Writes the files that are missing or differ from the goldens' sha256; exits non-zero when a
    fresh file still differs (another gguf or numpy than the pinned ones)."""
    want = {}
    if kGoldens.exists():
        want = {f["file"]: f["sha256"] for f in json.loads(kGoldens.read_text())["families"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fam in kFamilies:
        path = out_dir / file_name(fam)
        paths[fam["name"]] = path
        # Without a recorded sha256 (making the first goldens), an existing file is kept.
        if path.exists() and (path.name not in want or sha256(path) == want[path.name]):
            print(f"make_family_ggufs: {path} up to date")
            continue
        t0 = time.time()
        print(f"make_family_ggufs: writing {path} ...", flush=True)
        write_family(fam, path)
        got = sha256(path)
        print(f"make_family_ggufs: {path}: {path.stat().st_size / 1e6:.0f} MB in "
              f"{time.time() - t0:.0f} s, sha256 {got}")
        if path.name in want and got != want[path.name]:
            sys.exit(f"make_family_ggufs: {path}: sha256 {got} differs from {want[path.name]} in "
                     f"{kGoldens.relative_to(kRepoRoot)}; use the pinned gguf==0.19.0 and numpy "
                     "(scripts/setup-python.sh)")
    return paths


# ----------------------------------------------------------------------------
# llama.cpp goldens

kPromptLens = (16, 48)
kTopK = 8
kNumProbe = 32
kNumGenerate = 8


def round_list(xs) -> list[float]:
    return [float(f"{float(v):.6g}") for v in xs]


def logsumexp(row: np.ndarray) -> float:
    r = row.astype(np.float64)
    m = float(np.max(r))
    return m + float(np.log(np.sum(np.exp(r - m))))


def runs(fam: dict) -> tuple[tuple[str, int], ...]:
    """(goldens name, llama.cpp n_ctx) of each golden record made from this family's file."""
    return fam.get("runs", ((fam["name"], kRunCtx),))


def run_llama(path: Path, prompts: list[list[int]], flash_attn: bool, n_ctx: int):
    """Per prompt: all prompt rows [n, n_vocab] and the greedy rows; one decode call a step."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=128, n_ubatch=128,
                          logits_all=True, n_threads=2, n_threads_batch=2, seed=0,
                          flash_attn=flash_attn, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        rows = np.array(llm.scores[: len(ids)], dtype=np.float32)
        gen, gen_rows = [], []
        row = rows[-1]
        for step in range(kNumGenerate):
            gen_rows.append(row)
            gen.append(int(np.argmax(row)))
            if step + 1 < kNumGenerate:
                llm.eval([gen[-1]])
                row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        out.append((rows, gen, np.stack(gen_rows)))
    del llm
    return out


def family_goldens(fam: dict, path: Path, name: str, n_ctx: int) -> dict:
    rng = np.random.default_rng([kSeed, 1000 + kFamilies.index(fam)])
    prompts = [rng.integers(0, fam["n_text"], size=n).tolist() for n in kPromptLens]
    ref = run_llama(path, prompts, flash_attn=False, n_ctx=n_ctx)
    fa = run_llama(path, prompts, flash_attn=True, n_ctx=n_ctx)
    n_vocab = ref[0][0].shape[1]
    probe_ids = sorted(int(i) for i in rng.choice(n_vocab, size=kNumProbe, replace=False))
    spread, flips, rec_prompts = 0.0, 0, []
    for ids, (rows, gen, gen_rows), (fa_rows, _, _) in zip(prompts, ref, fa):
        spread = max(spread, float(np.max(np.abs(rows - fa_rows))))
        flips += int(np.sum(np.argmax(rows, axis=1) != np.argmax(fa_rows, axis=1)))
        order = np.argsort(-rows, axis=1, kind="stable")[:, :kTopK]
        top2 = np.sort(gen_rows, axis=1)[:, -2:]
        rec_prompts.append({
            "ids": ids,
            "argmax": [int(i) for i in np.argmax(rows, axis=1)],
            "top_ids": order.tolist(),
            "top_logits": [round_list(r[o]) for r, o in zip(rows, order)],
            "logsumexp": round_list(logsumexp(r) for r in rows),
            "probe_logits": [round_list(r[probe_ids]) for r in rows],
            "generated": gen,
            "generated_top2_gap": round_list(top2[:, 1] - top2[:, 0]),
        })
    print(f"{name}: llama.cpp flash-attention on vs off: max |dlogit| {spread:.3g}, "
          f"{flips} argmax flips")
    return {"name": name, "arch": fam["arch"], "file": path.name, "sha256": sha256(path),
            "size": path.stat().st_size, "n_vocab": n_vocab, "n_ctx": n_ctx, "probe_ids": probe_ids,
            "fa_max_abs_logit_diff": float(f"{spread:.6g}"), "fa_argmax_flips": flips,
            "prompts": rec_prompts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=kOutDir, help=f"cache directory ({kOutDir})")
    ap.add_argument("--goldens", action="store_true",
                    help=f"also run llama.cpp and write {kGoldens.relative_to(kRepoRoot)}")
    ap.add_argument("--only", nargs="+", metavar="FAMILY",
                    help="with --goldens: rerun llama.cpp for these families only, keeping the "
                         "other records of the goldens file")
    args = ap.parse_args()
    for fam in kFamilies:
        v = kRefdata / f"ggml-vocab-{fam['vocab']}.gguf"
        if not v.exists():
            sys.exit(f"make_family_ggufs: {v} not found; run scripts/fetch-refdata.sh")
    paths = build(args.out)
    if not args.goldens:
        return 0
    import llama_cpp
    import llama_repack  # bench/llama_repack.py: repacking off on AMX CPUs
    if not llama_repack.repack("auto"):
        llama_repack.turn_off_in_defaults()
    out = {
        "generator": "tools/make_family_ggufs.py",
        "llama_cpp_version": llama_cpp.__version__,
        "seed": kSeed,
        "notes": ("llama.cpp CPU backend, flash attention off, f16 K/V, 2 threads, logits rounded "
                  "to 6 significant digits. Prompts are token ids. Per position: argmax, top-8 "
                  "(id, logit), logsumexp of the row, logits at the family's probe_ids; "
                  "'generated': 8 argmax steps, one decode call each, with each step's top-1 minus "
                  "top-2 gap. fa_max_abs_logit_diff / fa_argmax_flips: the same prompts with "
                  "flash attention on, over whole rows. Never edit by hand; rerun the script."),
        "families": [],
    }
    old = {}
    if args.only and kGoldens.exists():
        old = {f["name"]: f for f in json.loads(kGoldens.read_text())["families"]}
    for fam in kFamilies:
        for name, n_ctx in runs(fam):
            if args.only and fam["name"] not in args.only and name in old:
                out["families"].append(old[name])
            else:
                out["families"].append(family_goldens(fam, paths[fam["name"]], name, n_ctx))
    kGoldens.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {kGoldens.relative_to(kRepoRoot)}: {kGoldens.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
