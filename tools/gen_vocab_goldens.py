#!/usr/bin/env python3
"""Goldens for kvlm's tokenizer on llama.cpp's vocab-only test GGUFs, from llama.cpp itself.

llama.cpp's own .inp/.out pairs (tests/tokenizer/test_llama_vocabs.cpp reads them directly) cover
45-50 texts per vocabulary. This script runs the wider corpus of gen_tokenizer_goldens.py (code,
whitespace runs, many scripts, combining marks, special-token text, invalid UTF-8) through every
vocabulary kvlm supports, with llama.cpp (llama-cpp-python, vocab_only) as the reference:

  corpus       the texts once: {name, text} or {name, hex} for invalid UTF-8
  vocabs       per vocabulary, "off" (add_special and parse_special false) and "on" (both
               true), a list with one entry per corpus text:
    ids        llama_tokenize(text, add_special, parse_special)
    detok      llama_detokenize(ids, remove_special=False, unparse_special=True), when != input
               (detok_hex instead when it is not valid UTF-8)
    plain      the same with unparse_special=False, when != detok (or plain_hex)
  big          the valid-UTF-8 corpus texts joined by "\n" and repeated (one long fragment, as
               SentencePiece sees a prompt): per vocabulary the id count and an FNV-1a 64 hash of
               the ids (u32 little-endian), add_special and parse_special off

Writes tests/data/llama_vocab_goldens.json. Never edit the output by hand; rerun:

    scripts/fetch-refdata.sh
    pip install llama-cpp-python==0.3.36 gguf jinja2
    python3 tools/gen_vocab_goldens.py
"""

import argparse
import ctypes
import json
import os
import random
import sys

import llama_cpp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_tokenizer_goldens import CORPUS, as_bytes, is_utf8  # noqa: E402

REFDATA = os.path.expanduser("~/.cache/kvlm/refdata/llama.cpp-0.3.36")

# The vocabularies tests/tokenizer/test_llama_vocabs.cpp lists as supported.
VOCABS = [
    "aquila", "baichuan", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4",
    "gpt-2", "gpt-neox", "llama-bpe", "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact",
    "starcoder",
]
FLAGS = [(False, False), (True, True)]

# Beyond the shared corpus: the chat markup of the families these vocabularies belong to (special
# tokens with whitespace around them, which Phi-3's tokens swallow on their right), SentencePiece's
# space handling, and text heavy in combining marks.
EXTRA = [
    ("phi3_turn", "<|user|>\n  Hello there<|end|>\n<|assistant|> Hi!<|end|>"),
    ("llama3_turn", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"),
    ("gemma_turn", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"),
    ("inst_turn", "<s>[INST] Hello [/INST] Hi</s> <s>[INST]  again [/INST]"),
    ("deepseek_turn", "<\uff5cbegin\u2581of\u2581sentence\uff5c>User: hi\n\nAssistant:"),
    ("space_mark", "a\u2581b \u2581 c\u2581\u2581"),
    ("spaces_around_special", "  </s>  <s>  <unk>  x"),
    ("devanagari_marks", "\u0915\u094d\u0937\u093f\u0924\u093f\u091c \u0936\u094d\u0930\u0940 \u0928\u093f\u0903"),
    ("stacked_marks", "a\u0300\u0301\u0302 b\u0308\u0323 \u0e01\u0e34\u0e48\u0e19"),
    ("clean_spaces", "Hello , world ! Is it ? Yes . I ' m sure it 's we 're they 've ' quoted '"),
]



def tokenize(vocab, data, add_special, parse_special):
    n_max = len(data) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    assert n >= 0, "token buffer too small"
    return list(buf[:n])


def detokenize(vocab, ids, unparse_special):
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 16 * len(ids)
    while True:
        text = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), text, size, False, unparse_special)
        if n >= 0:
            return text.raw[:n]
        size = -n


# Random strings over characters the pre-tokenizers treat differently (contraction letters, ASCII
# and Unicode spaces, digits and other numbers, punctuation and symbols, combining marks, CJK,
# Hangul, the space mark, special-token text), fixed seed. Valid UTF-8 only: on some invalid
# input (an overlong space) llama.cpp's Gemma 4 tokenizer aborts.
FUZZ_ALPHABET = (
    list("aZ'sStTmMdDlLrReEvV 0123456789.,!?-_/\\\"$+<=>^~|`()[]{}@#%&*:;\t\n\r\x0b\x0c")
    + ["\u00a0", "\u0085", "\u2000", "\u3000", "\u2028", "\u180e", "\u200b", "\u00e9", "e\u0301",
       "\u0301", "\u0915", "\u094d", "\u093f", "\u0e01", "\u0e48", "\u4e16", "\u754c", "\uac00",
       "\u0800", "\u3042", "\u0661", "\u00b2", "\u2160", "\uff11", "\uff21", "\uff01", "\u2018",
       "\u201c", "\u3001", "\u3002", "\u2581", "\U0001F600", "\u200d", "\ufe0f", "\u00b5", "\u01bb",
       "\u0391", "\u03b1", "\u0416", "\u10a0", "\u212a", "\u0130", "\u017f", "\U0001d400", "\u00bd",
       "\u2013", "\u00ab", "\u2026", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<unk>",
       "<|end|>", "  ", "\n\n", "'re", "'LL"])
FUZZ_COUNT = 40


def fuzz_corpus():
    rng = random.Random(23)
    return [("fuzz_%02d" % i, "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(1, 30))))
            for i in range(FUZZ_COUNT)]


BIG_REPEAT = 20
BIG_SEPARATOR = "\n"

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def big_text():
    texts = [as_bytes(t) for _, t in CORPUS + EXTRA + fuzz_corpus() if is_utf8(as_bytes(t))]
    sep = BIG_SEPARATOR.encode()
    return (sep.join(texts) + sep) * BIG_REPEAT


def ids_fnv(ids):
    h = FNV_OFFSET
    for t in ids:
        for b in int(t).to_bytes(4, "little", signed=True):
            h ^= b
            h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def put_bytes(case, key, data):
    """Text as itself when it is valid UTF-8 (the common case, half the size), else as hex."""
    if is_utf8(data):
        case[key] = data.decode("utf-8")
    else:
        case[key + "_hex"] = data.hex()


def corpus_entries():
    out = []
    for name, text in CORPUS + EXTRA + fuzz_corpus():
        data = as_bytes(text)
        out.append({"name": name, "text": data.decode("utf-8")} if is_utf8(data)
                   else {"name": name, "hex": data.hex()})
    return out


def vocab_cases(path):
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    cases = {}
    for key, (add_special, parse_special) in zip(("off", "on"), FLAGS):
        cases[key] = []
        for _, text in CORPUS + EXTRA + fuzz_corpus():
            data = as_bytes(text)
            ids = tokenize(vocab, data, add_special, parse_special)
            case = {"ids": ids}
            detok = detokenize(vocab, ids, True)
            plain = detokenize(vocab, ids, False)
            if detok != data:
                put_bytes(case, "detok", detok)
            if plain != detok:
                put_bytes(case, "plain", plain)
            cases[key].append(case)
    big = tokenize(vocab, big_text(), False, False)
    return cases, {"n_ids": len(big), "ids_fnv": ids_fnv(big)}


def write_json(path, obj):
    """Compact JSON, one line, UTF-8 text as itself."""
    with open(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--refdata", default=REFDATA)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                                  "llama_vocab_goldens.json"))
    args = ap.parse_args()
    out = {
        "reference": "llama-cpp-python %s (llama.cpp)" % llama_cpp.__version__,
        "corpus": corpus_entries(),
        "big": {"repeat": BIG_REPEAT, "separator": BIG_SEPARATOR, "n_bytes": len(big_text()),
                "vocabs": {}},
        "vocabs": {},
    }
    for name in VOCABS:
        path = os.path.join(args.refdata, "ggml-vocab-%s.gguf" % name)
        out["vocabs"][name], out["big"]["vocabs"][name] = vocab_cases(path)
        print("%-15s done" % name, file=sys.stderr)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
