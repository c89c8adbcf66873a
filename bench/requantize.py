#!/usr/bin/env python3
"""Requantizes a GGUF model with llama.cpp's own quantizer, to run kvlm on weight types the
default model does not have (Q4_K_M, Q6_K, IQ4_XS, ...).

  python3 bench/requantize.py IN.gguf OUT.gguf Q4_K_M     # any LLAMA_FTYPE_MOSTLY_* suffix

Requantizing an already quantized model (allow_requantize) loses a little quality against
quantizing the original weights, but the file is a real mixture of the types llama.cpp picks for
that file type: for SmolLM2-135M (n_embd 576, not a multiple of 256) Q4_K_M gives Q5_0 for the
576-wide rows, Q4_K and Q6_K for ffn_down. Then compare the engines on it, e.g.
  python3 bench/kv_quality.py -m OUT.gguf --tokens 2048 --ctx 512 --no-default-kvlm-configs

Requires llama-cpp-python==0.3.36 (see tools/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("ftype", help="Q4_K_M, Q6_K, IQ4_XS, Q5_0, ... (llama.h's LLAMA_FTYPE_MOSTLY_*)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()

    import llama_cpp

    name = "LLAMA_FTYPE_MOSTLY_" + args.ftype.upper()
    if not hasattr(llama_cpp, name):
        sys.exit(f"requantize: llama_cpp has no {name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, name)
    params.nthread = args.threads
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(args.src.encode(), args.dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"requantize: llama_model_quantize returned {rc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
