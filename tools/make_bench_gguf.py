#!/usr/bin/env python3
"""Write random-weight GGUF models with TinyLlama-1.1B's dimensions, for benchmarks only.

  22 layers, n_embd 2048, 32 query heads / 4 KV heads (head_dim 64), n_ff 5632, context 2048,
  vocab 49152 (SmolLM2's tokenizer, copied from the default model so llama.cpp accepts the file),
  separate token_embd and output matrices (1.17 B parameters in all).

One file per type, every 2-D matrix (embedding and output included) in that type, norms in F32:
  tinyllama-dims-random.Q4_0.gguf  ~0.66 GB    tinyllama-dims-random.Q4_1.gguf  ~0.73 GB
  tinyllama-dims-random.Q8_0.gguf  ~1.24 GB
The float weights are the same in every file (numpy default_rng seeded per tensor index) and
quantized with the gguf package's own quantizers (gguf.quants.quantize, numpy-vectorized), so the
files differ only in quantization. The weights are N(0, 0.02^2), so the model's text is noise:
these files measure speed, never quality.

Output goes outside the repository by default (~/.cache/kvlm/bench/, or --out); the files are
large and are never committed. Each tensor is generated, quantized and written in turn (streamed),
so memory stays near one tensor per type. About a minute per file on 2 cores.

Usage:
  python3 tools/make_bench_gguf.py                      # all three types
  python3 tools/make_bench_gguf.py --types q4_0 --check # one type, then load it with llama.cpp
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import llama_repack  # noqa: E402 (bench/llama_repack.py: repacking off on AMX CPUs)

kSeed = 20250101
kStd = 0.02
kDefaultSource = Path(os.environ.get("KVLM_MODELS") or Path.home() / ".cache/kvlm/models") / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
kDefaultOut = Path.home() / ".cache/kvlm/bench"

# TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json), except the
# vocabulary, which is SmolLM2's so that a tokenizer llama.cpp accepts can be copied.
kHp = {"n_layer": 22, "n_embd": 2048, "n_head": 32, "n_head_kv": 4, "n_ff": 5632, "n_ctx": 2048,
       "rope_freq_base": 10000.0, "norm_rms_eps": 1e-5}

kTypes = {  # name -> (ggml type, general.file_type as llama.cpp's LLAMA_FTYPE_MOSTLY_*)
    "q4_0": (QT.Q4_0, 2),
    "q4_1": (QT.Q4_1, 3),
    "q8_0": (QT.Q8_0, 7),
}


def tensor_specs(n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape [rows, cols]) in llama.cpp's converter order; 1-D tensors are norms."""
    E, F, L = kHp["n_embd"], kHp["n_ff"], kHp["n_layer"]
    kv_dim = E // kHp["n_head"] * kHp["n_head_kv"]
    specs = [("token_embd.weight", (n_vocab, E))]
    for il in range(L):
        b = f"blk.{il}."
        specs += [(b + "attn_norm.weight", (E,)),
                  (b + "attn_q.weight", (E, E)),
                  (b + "attn_k.weight", (kv_dim, E)),
                  (b + "attn_v.weight", (kv_dim, E)),
                  (b + "attn_output.weight", (E, E)),
                  (b + "ffn_norm.weight", (E,)),
                  (b + "ffn_gate.weight", (F, E)),
                  (b + "ffn_up.weight", (F, E)),
                  (b + "ffn_down.weight", (E, F))]
    specs += [("output_norm.weight", (E,)), ("output.weight", (n_vocab, E))]
    return specs


def copy_tokenizer(w: gguf.GGUFWriter, src: gguf.GGUFReader) -> int:
    """Copies every tokenizer.* key; returns the vocabulary size."""
    n_vocab = 0
    for name, f in src.fields.items():
        if not name.startswith("tokenizer."):
            continue
        val = f.contents()
        if f.types[0] == VT.ARRAY:
            w.add_key_value(name, val, VT.ARRAY, sub_type=f.types[1])
        else:
            w.add_key_value(name, val, f.types[0])
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(val)
    if n_vocab == 0:
        sys.exit(f"make_bench_gguf: error: the source GGUF has no tokenizer.ggml.tokens")
    return n_vocab


def add_llama_hparams(w: gguf.GGUFWriter, hp: dict) -> None:
    """The llama.* keys of hp (kHp's fields); also used by tools/make_kquant_bench_gguf.py."""
    w.add_context_length(hp["n_ctx"])
    w.add_embedding_length(hp["n_embd"])
    w.add_block_count(hp["n_layer"])
    w.add_feed_forward_length(hp["n_ff"])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["n_head_kv"])
    w.add_rope_freq_base(hp["rope_freq_base"])
    w.add_layer_norm_rms_eps(hp["norm_rms_eps"])
    w.add_rope_dimension_count(hp["n_embd"] // hp["n_head"])


def open_writer(path: Path, qname: str, src: gguf.GGUFReader,
                specs_fn) -> tuple[gguf.GGUFWriter, list]:
    qtype, ftype = kTypes[qname]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"random TinyLlama-1.1B dims {qname.upper()}")
    w.add_description(f"random N(0, {kStd}^2) weights, numpy seed {kSeed}, for benchmarks only; "
                      "written by kvlm tools/make_bench_gguf.py")
    add_llama_hparams(w, kHp)
    w.add_file_type(ftype)
    n_vocab = copy_tokenizer(w, src)
    w.add_vocab_size(n_vocab)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    specs = specs_fn(n_vocab)
    for name, shape in specs:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w, specs


def check_with_llama_cpp(path: Path, repack: bool) -> None:
    """Loads the file with llama.cpp and decodes a few tokens; logits must be finite."""
    import ctypes
    import llama_cpp
    cb = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    mp = llama_cpp.llama_model_default_params()
    mp.use_extra_bufts = repack  # llama_repack.py
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        sys.exit(f"make_bench_gguf: error: llama.cpp could not load {path}")
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 64, 64, 64
    cp.n_threads = cp.n_threads_batch = os.cpu_count() or 1
    ctx = llama_cpp.llama_init_from_model(model, cp)
    ids = (ctypes.c_int32 * 8)(*[1, 100, 200, 300, 400, 500, 600, 700])
    rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ids, 8))
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
    ok = rc == 0 and bool(np.all(np.isfinite(logits)))
    print(f"  llama.cpp: loaded, decode rc {rc}, {n_vocab} logits, finite: {ok}, "
          f"max |logit| {float(np.max(np.abs(logits))):.3g}")
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    if not ok:
        sys.exit(f"make_bench_gguf: error: llama.cpp failed on {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=kDefaultOut, help=f"output directory ({kDefaultOut})")
    ap.add_argument("--types", default="q4_0,q4_1,q8_0", help="comma list of q4_0, q4_1, q8_0")
    ap.add_argument("--source", type=Path, default=kDefaultSource,
                    help="GGUF whose tokenizer.* keys are copied (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--check", action="store_true", help="load each file with llama.cpp afterwards")
    llama_repack.add_argument(ap)
    args = ap.parse_args()
    names = [t.strip() for t in args.types.split(",") if t.strip()]
    bad = [t for t in names if t not in kTypes]
    if bad or not names:
        ap.error(f"--types: unknown {bad} (choose from {', '.join(kTypes)})")
    if not args.source.exists():
        ap.error(f"--source {args.source} not found (scripts/fetch-model.sh fetches it)")
    args.out.mkdir(parents=True, exist_ok=True)
    src = gguf.GGUFReader(args.source)

    paths = {q: args.out / f"tinyllama-dims-random.{q.upper()}.gguf" for q in names}
    writers = {}
    specs = []
    for q in names:
        writers[q], specs = open_writer(paths[q], q, src, tensor_specs)

    t0 = time.time()
    n_params = 0
    for idx, (name, shape) in enumerate(specs):
        if len(shape) == 1:  # RMSNorm weights: 1 (+ small noise so no layer is special)
            rng = np.random.default_rng([kSeed, idx])
            x = (1.0 + 0.01 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
            for w in writers.values():
                w.write_tensor_data(x)
        else:
            rng = np.random.default_rng([kSeed, idx])
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= kStd
            for q, w in writers.items():
                w.write_tensor_data(gguf.quants.quantize(x, kTypes[q][0]))
        n_params += int(np.prod(shape))
        if idx % 20 == 0:
            print(f"  {idx + 1}/{len(specs)} tensors, {time.time() - t0:.0f} s", flush=True)
    for w in writers.values():
        w.close()
    print(f"{n_params / 1e9:.3f} B parameters in {time.time() - t0:.0f} s")

    for q, p in paths.items():
        r = gguf.GGUFReader(p)  # reads every tensor's offset and shape back
        assert len(r.tensors) == len(specs), f"{p}: {len(r.tensors)} tensors, expected {len(specs)}"
        print(f"{p}: {p.stat().st_size / 1e9:.3f} GB, {len(r.tensors)} tensors")
        if args.check:
            check_with_llama_cpp(p, llama_repack.repack(args.llama_repack))
    return 0


if __name__ == "__main__":
    sys.exit(main())
