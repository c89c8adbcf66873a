#!/usr/bin/env python3
"""Goldens for the BPE pre-tokenizers that have no vocab test file in llama.cpp's sdist.

llama.cpp 0.3.36 knows pre-tokenizer names (tokenizer.ggml.pre) that no ggml-vocab-*.gguf in its
sdist carries. For each such name kvlm implements, this script takes a vocab-only GGUF from the
refdata directory whose vocabulary suits the regex (a base), rewrites its tokenizer.ggml.pre to
the name (retag(), a byte-level edit of that one string, which tests/tokenizer/test_pretok_names.cpp
repeats at test time, so no re-tagged file is committed; "set" lists other keys rewritten the
same way) and tokenizes a corpus with llama.cpp itself (llama-cpp-python, vocab_only):

  corpus   the texts once: {name, text}; the corpus of gen_vocab_goldens.py (invalid UTF-8 left
           out) plus texts aimed at these regexes (case changes, digit groups, the characters the
           regexes name) and random strings over them
  names    per pre-tokenizer name: its base vocabulary and
    off    per corpus text, an FNV-1a 64 hash of llama_tokenize(text, add_special=false,
           parse_special=false) (ids as u32 little-endian) and the id count
    on     one hash over the ids of every text with add_special and parse_special true
    detok  one hash over llama_detokenize(off ids, remove_special=False, unparse_special=True) of
           every text (the bytes, each followed by a 0 byte): clean_spaces and the like

Hashes keep the file small for ~40 names; on a mismatch the test prints kvlm's ids, and
`--show NAME TEXT_NAME` prints llama.cpp's. Never edit the output by hand; rerun:

    scripts/fetch-refdata.sh
    pip install llama-cpp-python==0.3.36
    python3 tools/gen_pretok_goldens.py
"""

import argparse
import os
import random
import struct
import sys
import tempfile

import llama_cpp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_tokenizer_goldens import CORPUS, as_bytes, is_utf8  # noqa: E402
from gen_vocab_goldens import EXTRA, FUZZ_ALPHABET, REFDATA, detokenize, fuzz_corpus, ids_fnv, \
    tokenize, write_json  # noqa: E402

# Pre-tokenizer name -> the refdata vocabulary it is tested on: llama-bpe for all (tiktoken-style,
# 128k tokens). Its multi-digit tokens show how digits are grouped and its merges of a space with
# a CJK lead byte show where a script run is cut off; qwen2's vocabulary, with single digits only
# and no such merges, hid both.
NAMES = [
    ("seed-coder", "llama-bpe"), ("minicpm5", "llama-bpe"), ("jais-2", "llama-bpe"),
    ("ufakzeka", "llama-bpe"), ("laguna", "llama-bpe"), ("bailingmoe", "llama-bpe"),
    ("bailingmoe2", "llama-bpe"), ("llada-moe", "llama-bpe"), ("kimi-k2", "llama-bpe"),
    ("gpt-4o", "llama-bpe"), ("llama4", "llama-bpe"), ("kanana2", "llama-bpe"),
    ("talkie", "llama-bpe"), ("minimax-m2", "llama-bpe"), ("tekken", "llama-bpe"),
    ("granite-embed-multi-97m", "llama-bpe"), ("tiny_aya", "llama-bpe"),
    ("cohere2moe", "llama-bpe"), ("youtu", "llama-bpe"), ("exaone-moe", "llama-bpe"),
    ("deepseek-v3", "llama-bpe"), ("hunyuan-dense", "llama-bpe"), ("hy_v4", "llama-bpe"),
    ("joyai-llm", "llama-bpe"), ("spark2_5", "llama-bpe"), ("afmoe", "llama-bpe"),
    ("bloom", "llama-bpe"), ("gpt3-finnish", "llama-bpe"), ("poro-chat", "llama-bpe"),
    ("viking", "llama-bpe"), ("chameleon", "llama-bpe"), ("superbpe", "llama-bpe"),
    ("sarvam-moe", "gemma-4"),
]
# Other metadata a name's base needs rewritten: Sarvam's BPE on UTF-8 with U+2581 for spaces is
# Gemma 4's vocabulary under the gpt2 model (as "gemma4" the model would force its own
# pre-tokenizer).
OVERRIDES = {"sarvam-moe": {"tokenizer.ggml.model": "gpt2"}}

# Texts aimed at what these regexes distinguish: case changes inside words (ASCII and not),
# contractions after words, digit groups, slashes after punctuation, the characters Bloom's and
# DeepSeek V3's regexes name, Han and kana, Chameleon's sentinel and image-token syntax.
PRETOK_EXTRA = [
    ("camel", "HelloWorld XMLHttpRequest getHTTPResponseCode iPhone McDonald's ABCdef"),
    ("caps_nonascii", "\u00c9COLE \u00c9cole \u00e9COLE \u00c0bc \u0394\u03b5\u03bb\u03c4\u03b1 "
                      "\u0416\u0416\u0436 STRA\u00dfE \u01c5a \u1e9e\u00df"),
    ("contraction_suffix", "don't DON'T we'RE They'LL it's IT'S o'clock rock'n'roll x'y"),
    ("marks_in_words", "Cafe\u0301 A\u0301B e\u0301\u0300x \u0915\u093f\u0915 \u0301A \u0301a"),
    ("digit_groups", "1 12 123 1234 12345 123456 1234567 12345678 a1b22c333d4444 "
                     "\u0661\u0662\u0663\u0664"),
    ("digits_mixed", "12\u00b2345 \uff11\uff12\uff13\uff14 3.14159 1,234,567 x=100000"),
    ("slashes", "a/b //c http://x.y/z ./run.sh \\/ +/\n// \n/*\n*/"),
    ("bloom_punct", "Hello, world. Yes! No? Wait\u2026 \u4f60\u597d\u3002\u4e16\u754c\uff0c"
                    "\u554a\u3001\u0928\u092e\u0964 \u06d4\u060c (a|b) x(y) a.b,c"),
    ("han_kana", "\u4e2d\u6587\u65e5\u672c\u8a9e\u3072\u3089\u304c\u306a\u30ab\u30bf\u30ab\u30ca"
                 "\u3400\u4e00\u9fa5\u9fff\uf900 \ud55c\uad6d\uc5b4abc\u4e2dDEF"),
    ("sentinels", "<sentinel:0> <sentinel:12>x<sentinel:>IMGIMGABZ IMGIMGAZ IMGIMGABCDEZ IMGIMGJZ"),
    ("tabs_spaces", "a\tb\t\tc  d    e     f\n\n  g\r\n h"),
    ("punct_letters", "(Hello [World] {x} .abc ,Def -ghi _jkl 'mno \"pqr\" $var @user #tag"),
    ("ascii_punct_words", "!abc #Def $x %y &z *w +v ,u -t .s /r :q ;p <o =n >m ?l @k [j \\i ]h "
                          "^g _f `e {d |c }b ~a"),
    ("turkish", "Ankara'da T\u00fcrkiye'nin \u0130stanbul'a gidiyorum"),
    ("symbols_words", "\u00a9Copyright \u20acEuro \u00b1x \u2192arrow \u2264y \u00d7z"),
    ("afmoe_ranges", "x \ua000\ua001 y \ue000 z \uf8ff \ud7b0 \u0e01\u0e40 \u0e81 \uac00 "
                     "\u1780 \u1000 \u2f00 \uff66 \u3400 \u4e2d"),
    ("glued_tokens", "xIMGIMGABZy a<sentinel:7>b 12IMGIMGIZ3 a  b   c    d"),
]

# Random strings over the old alphabet plus the characters above (fixed seed).
PRETOK_ALPHABET = FUZZ_ALPHABET + [
    "\u00c9", "\u00e9", "\u0394", "\u03b4", "\u01c5", "\u4e2d", "\u3072", "\u30ab", "\u3400",
    "\uf900", "\ud55c", "\u3131", "\u0964", "\u06d4", "\u060c", "\u3001", "\uff0c", "\u2026",
    "<sentinel:3>", "IMGIMG", "Z", "A", "B", "'", "/", "  ", "    ", "\t", "12", "345", "\u00a9",
    "\u20ac", "\u00b1", "\u2192", "X", "Y", "x", "y", "\u0301", "(", ")", "|",
]
PRETOK_FUZZ_COUNT = 40


def pretok_fuzz():
    rng = random.Random(2336)
    return [("pfuzz_%02d" % i,
             "".join(rng.choice(PRETOK_ALPHABET) for _ in range(rng.randint(1, 40))))
            for i in range(PRETOK_FUZZ_COUNT)]


def corpus():
    texts = CORPUS + EXTRA + fuzz_corpus() + PRETOK_EXTRA + pretok_fuzz()
    return [(name, as_bytes(t)) for name, t in texts if is_utf8(as_bytes(t))]


KEY_PRE = "tokenizer.ggml.pre"
GGUF_TYPE_STRING = 8
GGUF_HEADER = 24  # magic, version, tensor count (u64), metadata count (u64)


def retag(data, key, value):
    """The GGUF image with string metadata `key` set to `value`: its value rewritten in place, or
    the pair inserted first (and the metadata count raised) when the file lacks it. The refdata
    vocab files hold no tensors, so nothing after the metadata moves with it."""
    k = key.encode()
    v = value.encode()
    head = struct.pack("<Q", len(k)) + k + struct.pack("<I", GGUF_TYPE_STRING)
    at = data.find(head)
    if at < 0:
        (n_kv,) = struct.unpack_from("<Q", data, 16)
        return (data[:16] + struct.pack("<Q", n_kv + 1) + head + struct.pack("<Q", len(v)) + v +
                data[GGUF_HEADER:])
    at += len(head)
    (old_len,) = struct.unpack_from("<Q", data, at)
    return data[:at] + struct.pack("<Q", len(v)) + v + data[at + 8 + old_len:]


def load_retagged(refdata, base, name, tmpdir):
    with open(os.path.join(refdata, "ggml-vocab-%s.gguf" % base), "rb") as f:
        data = f.read()
    for key, value in list(OVERRIDES.get(name, {}).items()) + [(KEY_PRE, name)]:
        data = retag(data, key, value)
    path = os.path.join(tmpdir, "%s.gguf" % name)
    with open(path, "wb") as f:
        f.write(data)
    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


def fnv_bytes(chunks):
    h = 0xCBF29CE484222325
    for chunk in chunks:
        for b in chunk:
            h ^= b
            h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def name_cases(vocab, texts):
    off, on_ids, detoks = [], [], []
    for _, data in texts:
        ids = tokenize(vocab, data, False, False)
        off.append([ids_fnv(ids), len(ids)])
        on_ids += tokenize(vocab, data, True, True)
        detoks.append(detokenize(vocab, ids, True) + b"\0")
    return {"off": off, "on": ids_fnv(on_ids), "detok": fnv_bytes(detoks)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--refdata", default=REFDATA)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                                  "pretok_goldens.json"))
    ap.add_argument("--show", nargs=2, metavar=("NAME", "TEXT_NAME"),
                    help="print llama.cpp's ids for one corpus text under one name and exit")
    args = ap.parse_args()
    texts = corpus()
    bases = dict(NAMES)
    with tempfile.TemporaryDirectory() as tmpdir:
        if args.show:
            vocab = load_retagged(args.refdata, bases[args.show[0]], args.show[0], tmpdir)
            data = dict(texts)[args.show[1]]
            print(tokenize(vocab._model.vocab, data, False, False))
            return
        out = {
            "reference": "llama-cpp-python %s (llama.cpp)" % llama_cpp.__version__,
            "corpus": [{"name": n, "text": d.decode("utf-8")} for n, d in texts],
            "names": {},
        }
        for name, base in NAMES:
            llm = load_retagged(args.refdata, base, name, tmpdir)
            out["names"][name] = dict(base=base, set=OVERRIDES.get(name, {}),
                                      **name_cases(llm._model.vocab, texts))
            del llm
            print("%-26s done" % name, file=sys.stderr)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
