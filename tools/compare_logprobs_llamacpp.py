#!/usr/bin/env python3
"""kvlm serve's completions logprobs against llama.cpp's log-softmax of the same logits.

For a few prompts (token ids from kvlm's /tokenize, so both see the same tokens) it asks kvlm
serve for one greedy token with logprobs=5 and llama-cpp-python for the last position's logits,
and prints both top-5 lists. The differences are the two engines' logits (quantized kernels),
not the softmax: a check by eye, writing nothing.

Usage: build/venv/bin/python tools/compare_logprobs_llamacpp.py [--kvlm build/bin/kvlm]
         [--ref-python /work/venv-ref/bin/python] [--model PATH]
The reference interpreter needs llama-cpp-python==0.3.36 and numpy (tools/README.md).
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "server"))

REF = """
import json, sys, numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, logits_all=True, verbose=False, n_threads=1)
ids = json.loads(sys.argv[2])
llm.eval(ids)
l = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
lp = l - (l.max() + np.log(np.exp(l - l.max()).sum()))
print(json.dumps([[llm.detokenize([int(i)]).decode("utf-8", "replace"), float(lp[i])]
                  for i in np.argsort(-lp)[:5]]))
"""
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvlm", default="build/bin/kvlm")
    ap.add_argument("--ref-python", default="/work/venv-ref/bin/python")
    ap.add_argument("--model")
    a = ap.parse_args()
    sys.argv = [sys.argv[0], a.kvlm, "tests/data"]  # test_server reads its binary from argv
    import test_server as ts
    model = a.model or ts.MODEL
    srv = ts.Server("-m", model, "-t", "1")
    try:
        c = srv.client()
        name = c.models.list().data[0].id
        for text in PROMPTS:
            _, _, body = srv.request("POST", "/tokenize", {"content": text, "add_special": True})
            ids = json.loads(body)["tokens"]
            k = c.completions.create(model=name, prompt=ids, max_tokens=1, temperature=0,
                                     logprobs=5)
            mine = sorted(k.choices[0].logprobs.top_logprobs[0].items(), key=lambda kv: -kv[1])
            ref = json.loads(subprocess.check_output(
                [a.ref_python, "-c", REF, model, json.dumps(ids)]))
            print(repr(text))
            for (mt, ml), (rt, rl) in zip(mine, ref):
                print(f"  kvlm {mt!r:14} {ml:9.4f}   llama.cpp {rt!r:14} {rl:9.4f}   "
                      f"diff {ml - rl:+.4f}")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
