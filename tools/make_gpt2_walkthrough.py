#!/usr/bin/env python3
"""Write a GPT-2-small-shaped GGUF with random weights and the real GPT-2 vocabulary, for the
seeds' walkthrough: watch the per-layer past_key_values grow with `kvlm generate --trace`.

Shape: "gpt2" architecture, 12 layers, 12 heads x 64 (n_embd 768), n_ff 3072, 1,024 learned
positions, GPT-2's 50,257-token vocabulary and merges, taken from llama.cpp's vocab-only test
file `ggml-vocab-gpt-2.gguf` inside the pinned llama-cpp-python==0.3.36 sdist (downloaded once
with `pip download --no-deps --no-binary :all:`, only that file is extracted). The weights are
numpy's default_rng(seed) in make_synthetic_gguf.py's mix of types, so the text is nonsense; the
cache's shapes and bytes are GPT-2's. Written to ~/.cache/kvlm/bench/gpt2-small-random.gguf
(~250 MB; outside the repository, never part of `make test`).

Usage (a venv with the gguf package, as tools/README.md says):
    python3 tools/make_gpt2_walkthrough.py
    build/bin/kvlm generate -m ~/.cache/kvlm/bench/gpt2-small-random.gguf -p "Hello" -n 8 \\
        --trace --stop-token 198
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic_gguf as syn  # noqa: E402  (the tiny models' tensor and writer helpers)

kPin = "llama-cpp-python==0.3.36"
kVocabMember = "vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf"
kHp = dict(n_embd=768, n_head=12, n_layer=12, n_ctx=1024, n_ff=3072, norm_eps=1e-5)


def find_vocab(cache: Path) -> Path:
    """The vocab-only GGUF: an unpacked sdist in the cache, else extracted from a download."""
    for p in cache.glob("**/" + kVocabMember):
        return p
    out = cache / "ggml-vocab-gpt-2.gguf"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", "--quiet", "-d", tmp, kPin], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(kVocabMember))
            out.write_bytes(tar.extractfile(member).read())
    return out


def read_vocab(path: Path):
    """(tokens, token_types, merges, eot_id) as make_synthetic_gguf's writer takes them."""
    r = gguf.GGUFReader(str(path))

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    types = r.fields["tokenizer.ggml.token_type"]
    token_types = [int(types.parts[i][0]) for i in types.data]
    eos = r.fields["tokenizer.ggml.eos_token_id"]
    return strings("tokenizer.ggml.tokens"), token_types, strings("tokenizer.ggml.merges"), \
        int(eos.parts[eos.data[0]][0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path.home() / ".cache" / "kvlm" / "bench"
    ap.add_argument("-o", "--output", type=Path, default=cache / "gpt2-small-random.gguf")
    ap.add_argument("--seed", type=int, default=syn.kSeed)
    args = ap.parse_args()
    vocab = read_vocab(find_vocab(cache))
    print(f"vocab: {len(vocab[0])} tokens, {len(vocab[2])} merges, <|endoftext|> = {vocab[3]}")
    tensors = syn.gpt2_tensors(np.random.default_rng(args.seed), len(vocab[0]), kHp)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    syn.write_model(args.output, "gpt2", kHp, tensors, vocab)
    print(f"wrote {args.output}: {args.output.stat().st_size} bytes, {len(tensors)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
