#!/usr/bin/env python3
"""Write random-weight Llama-3.2-1B- or LLaMA-7B-shaped GGUFs in the mixes people download.

--shape 1b (default): 16 layers, n_embd 2048, 32 query heads / 8 KV heads (head_dim 64),
  n_ff 8192, vocab 128256 (Llama 3's tokenizer, copied from llama.cpp's vocab-only test file
  ggml-vocab-llama-bpe.gguf in the pinned sdist, which scripts/fetch-refdata.sh unpacks, as is
  the 7b's), tied embeddings (no output.weight),
  as Llama-3.2-1B (1.24 B parameters). The pre-tokenizer name is rewritten from 'llama-bpe',
  which kvlm does not implement yet, to 'starcoder' (same length, so in place; both engines know
  it): token ids, not text, drive the benchmarks, and both engines see the same regex.
--shape 7b: LLaMA-7B / Llama-2-7B, 32 layers, n_embd 4096, 32 heads (no GQA, head_dim 128),
  n_ff 11008, vocab 32000 (Llama 2's SentencePiece vocabulary, from ggml-vocab-llama-spm.gguf),
  a separate output.weight (not tied), rope base 10000, n_ctx 4096 (6.74 B parameters: F16
  13.5 GB, Q4_K_M ~4.1 GB). The F16 file is written tensor by tensor (peak memory ~ the largest
  tensor, not the file).

First an F16 file written with the gguf package (the same N(0, 0.02^2) numpy weights as
tools/make_bench_gguf.py, norms ~1 in F32), then llama.cpp's own quantizer
(llama_cpp.llama_model_quantize from the pinned llama-cpp-python) turns it into each requested
ftype, so the per-tensor type mixes (Q4_K_M: Q4_K with Q6_K for some tensors, etc.) are exactly
llama.cpp's. The weights are noise: these files measure speed, never quality.

Output goes to ~/.cache/kvlm/bench/ (or --out), built once: an existing file is kept.

Usage (with the llama-cpp-python venv, e.g. /work/venv-ref):
  python3 tools/make_kquant_bench_gguf.py                         # F16 + every ftype below
  python3 tools/make_kquant_bench_gguf.py --ftypes q4_k_m --check
  python3 tools/make_kquant_bench_gguf.py --shape 7b --ftypes q4_k_m   # llama-7b-dims-random.*
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_bench_gguf as mb  # noqa: E402 (copy_tokenizer, check_with_llama_cpp, seeds)

kRefdata = Path.home() / ".cache/kvlm/refdata/llama.cpp-0.3.36"

# Per shape: hyperparameters, file name stem, vocab-only GGUF whose tokenizer.* keys are copied,
# whether output.weight is tied to token_embd, and the pre-tokenizer rewrite (old, new) or None.
kShapes = {
    # Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json); context cut to 8192 (no rope scaling: the
    # weights are random, only the shapes matter).
    "1b": {"stem": "llama3.2-1b-dims-random", "title": "Llama-3.2-1B",
           "vocab": kRefdata / "ggml-vocab-llama-bpe.gguf", "tied": True,
           "pre": ("llama-bpe", "starcoder"),
           "hp": {"n_layer": 16, "n_embd": 2048, "n_head": 32, "n_head_kv": 8, "n_ff": 8192,
                  "n_ctx": 8192, "rope_freq_base": 500000.0, "norm_rms_eps": 1e-5}},
    # LLaMA-7B dims with Llama 2's context, eps and vocabulary (Llama-2-7b-hf config.json).
    "7b": {"stem": "llama-7b-dims-random", "title": "LLaMA-7B",
           "vocab": kRefdata / "ggml-vocab-llama-spm.gguf", "tied": False, "pre": None,
           "hp": {"n_layer": 32, "n_embd": 4096, "n_head": 32, "n_head_kv": 32, "n_ff": 11008,
                  "n_ctx": 4096, "rope_freq_base": 10000.0, "norm_rms_eps": 1e-5}},
}

kFtypes = {  # name -> llama.cpp's LLAMA_FTYPE_MOSTLY_* (llama.h)
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
    "iq4_xs": 30,
    "q3_k_m": 12,  # Q3_K with Q4_K / Q5_K / Q6_K for some tensors
    "q2_k": 10,    # Q2_K with Q3_K / Q4_K / Q6_K for some tensors
}


def tensor_specs(hp: dict, n_vocab: int, tied: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape [rows, cols]) in llama.cpp's converter order; 1-D tensors are norms."""
    E, F, L, V = hp["n_embd"], hp["n_ff"], hp["n_layer"], n_vocab
    kv_dim = E // hp["n_head"] * hp["n_head_kv"]
    specs = [("token_embd.weight", (V, E))]
    for il in range(L):
        b = f"blk.{il}."
        specs += [(b + "attn_norm.weight", (E,)), (b + "attn_q.weight", (E, E)),
                  (b + "attn_k.weight", (kv_dim, E)), (b + "attn_v.weight", (kv_dim, E)),
                  (b + "attn_output.weight", (E, E)), (b + "ffn_norm.weight", (E,)),
                  (b + "ffn_gate.weight", (F, E)), (b + "ffn_up.weight", (F, E)),
                  (b + "ffn_down.weight", (E, F))]
    specs += [("output_norm.weight", (E,))]
    if not tied:  # tied: the output reuses token_embd
        specs += [("output.weight", (V, E))]
    return specs


def write_f16(path: Path, model: dict, vocab: Path) -> None:
    """Header first, then each tensor generated and written alone (the writer streams)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"random {model['title']} dims F16")
    w.add_description(f"random N(0, {mb.kStd}^2) weights, numpy seed {mb.kSeed}, for benchmarks "
                      "only; written by kvlm tools/make_kquant_bench_gguf.py")
    mb.add_llama_hparams(w, model["hp"])
    w.add_file_type(1)  # LLAMA_FTYPE_MOSTLY_F16
    n_vocab = mb.copy_tokenizer(w, gguf.GGUFReader(vocab))
    w.add_vocab_size(n_vocab)
    specs = tensor_specs(model["hp"], n_vocab, model["tied"])
    for name, shape in specs:
        dt = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.time()
    for idx, (name, shape) in enumerate(specs):
        rng = np.random.default_rng([mb.kSeed, idx])
        if len(shape) == 1:
            w.write_tensor_data((1.0 + 0.01 * rng.standard_normal(shape, dtype=np.float32))
                                .astype(np.float32))
        else:
            w.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * mb.kStd)
                                .astype(np.float16))
    w.close()
    print(f"{path}: {path.stat().st_size / 1e9:.3f} GB in {time.time() - t0:.0f} s", flush=True)


def set_pre_tokenizer(path: Path, old: str, new: str) -> None:
    """Rewrites the tokenizer.ggml.pre string in place (equal lengths: no offset moves)."""
    assert len(old) == len(new)
    key = b"tokenizer.ggml.pre"
    with open(path, "r+b") as f:
        head = f.read(1 << 20)  # the key sits among the first keys, before the vocabulary arrays
        i = head.find(key)
        if i < 0:
            sys.exit(f"make_kquant_bench_gguf: error: {path} has no {key.decode()}")
        # key, then u32 value type (8 = string), u64 length, the bytes
        at = i + len(key) + 4 + 8
        n = int.from_bytes(head[at - 8:at], "little")
        value = head[at:at + n].decode()
        if value == new:
            return
        if value != old:
            sys.exit(f"make_kquant_bench_gguf: error: {path}: pre-tokenizer {value!r}, not {old!r}")
        f.seek(at)
        f.write(new.encode())


def quantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = threads
    t0 = time.time()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p)
    if rc != 0:
        sys.exit(f"make_kquant_bench_gguf: error: llama_model_quantize({dst.name}) returned {rc}")
    print(f"{dst}: {dst.stat().st_size / 1e9:.3f} GB in {time.time() - t0:.0f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=kShapes, default="1b",
                    help="1b: Llama-3.2-1B dims (default); 7b: LLaMA-7B dims")
    ap.add_argument("--out", type=Path, default=mb.kDefaultOut)
    ap.add_argument("--ftypes", default=",".join(kFtypes), help=f"comma list of {', '.join(kFtypes)}")
    ap.add_argument("--vocab", type=Path,
                    help="GGUF whose tokenizer.* keys are copied (default: llama.cpp's Llama 3 "
                         "vocab file for 1b, its Llama 2 SentencePiece one for 7b)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--check", action="store_true", help="load each file with llama.cpp afterwards")
    args = ap.parse_args()
    names = [t.strip() for t in args.ftypes.split(",") if t.strip()]
    bad = [t for t in names if t not in kFtypes]
    if bad:
        ap.error(f"--ftypes: unknown {bad} (choose from {', '.join(kFtypes)})")
    shape = kShapes[args.shape]
    args.vocab = args.vocab or shape["vocab"]
    if not args.vocab.exists():
        ap.error(f"--vocab {args.vocab} not found (scripts/fetch-refdata.sh unpacks it)")
    args.out.mkdir(parents=True, exist_ok=True)
    f16 = args.out / f"{shape['stem']}.F16.gguf"
    # A missing F16 is not rewritten when every requested file exists: it would only be the
    # quantizer's input (the 7B's, 13.5 GB, is deleted after use); --ftypes '' writes it alone.
    done = names and all((args.out / f"{shape['stem']}.{q.upper()}.gguf").exists() for q in names)
    if not f16.exists() and done:
        print(f"{f16}: not written, every requested file exists")
    elif not f16.exists():
        tmp = f16.with_suffix(".tmp")
        write_f16(tmp, shape, args.vocab)
        tmp.rename(f16)
    if shape["pre"] and f16.exists():
        set_pre_tokenizer(f16, *shape["pre"])
    for q in names:
        dst = args.out / f"{shape['stem']}.{q.upper()}.gguf"
        if dst.exists():
            print(f"{dst}: exists, kept")
        else:
            tmp = dst.with_suffix(".tmp")
            quantize(f16, tmp, kFtypes[q], args.threads)
            tmp.rename(dst)
        if shape["pre"]:
            set_pre_tokenizer(dst, *shape["pre"])
        if args.check:
            mb.check_with_llama_cpp(dst, repack=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
