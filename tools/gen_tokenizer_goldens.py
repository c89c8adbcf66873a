#!/usr/bin/env python3
"""Tokenizer goldens for kvlm from the independent reference, llama.cpp (via llama-cpp-python).

Writes tests/data/tokenizer_goldens.json:
  - cases: token ids from llama.cpp's llama_tokenize for a varied corpus (English, code, numbers,
    whitespace runs, emoji, CJK/Arabic/Cyrillic/Indic scripts, contractions, special-token text,
    invalid UTF-8), each with add_bos/special flags and llama.cpp's detokenized bytes;
  - variants: the same corpus tokenized with the model's vocabulary under other
    tokenizer.ggml.pre values ("gpt-2", "default") and with add_bos_token=true, produced by
    rewriting the model's metadata into a vocab-only GGUF that llama.cpp loads;
  - vocab: llama.cpp's EOG ids, token attributes of the special tokens, and an FNV-1a hash over
    every token's piece (special rendered and not) so that token_bytes is checked for the whole
    vocabulary without storing it;
  - chat: expected chat-template renderings by jinja2 (the renderer Hugging Face uses, with its
    trim_blocks/lstrip_blocks settings) for the model's template and two other ChatML templates.

Bytes are stored as hex ("hex" fields) because some inputs are deliberately invalid UTF-8.
Never edit the output by hand; rerun:

    pip install llama-cpp-python==0.3.36 gguf jinja2
    python3 tools/gen_tokenizer_goldens.py [--model PATH] [--out tests/data/tokenizer_goldens.json]
"""

import argparse
import ctypes
import json
import os
import sys
import tempfile

import gguf
import jinja2
import jinja2.sandbox
import llama_cpp

DEFAULT_MODEL = os.path.expanduser("~/.cache/kvlm/models/SmolLM2-135M-Instruct.Q4_1.gguf")

PY_CODE = '''def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


class Foo(object):
    """Docstring."""

    def __init__(self, x: int = 3) -> None:
        self._x = x  # comment
\tprint(f"{i}: {fib(i)}")  # tab-indented
'''

C_CODE = '''#include <stdio.h>

int main(int argc, char **argv) {
    for (int i = 0; i < argc; ++i) {
        printf("%s\\n", argv[i]);
    }
    return 0;
}
'''

PARAGRAPH = (
    "Byte-pair encoding (BPE) was first described in 1994 by Philip Gage as a data compression "
    "technique. It replaces the most frequent pair of bytes in a text with a byte that does not "
    "occur in it; the table of replacements is needed to rebuild the original data. Modern "
    "language models use a variant: the vocabulary starts from the 256 byte values, and merges "
    "learned from a corpus (e.g. 'th' + 'e' -> 'the') are applied in the order they were "
    "learned. GPT-2's tokenizer first splits text with a regular expression, so that merges "
    "never cross word boundaries -- letters, digits and punctuation end up in separate pieces, "
    "and a single leading space stays attached to the word that follows it. That's why \" the\" "
    "and \"the\" are different tokens! Numbers such as 3.14159, 2,718,281 or 1e-10 are split "
    "digit by digit by SmolLM's pre-tokenizer, which helps arithmetic. Whitespace runs are kept "
    "whole except for the last space before a word.\n\nQuestions? Email bpe@example.com or see "
    "https://en.wikipedia.org/wiki/Byte_pair_encoding#Modified_algorithm (accessed 2024-05-01)."
)

# (name, text as str or bytes)
CORPUS = [
    ("empty", ""),
    ("space", " "),
    ("two_spaces", "  "),
    ("tab", "\t"),
    ("newline", "\n"),
    ("newlines3", "\n\n\n"),
    ("crlf", "\r\n"),
    ("hello", "Hello world"),
    ("hello_punct", "Hello, world! How are you doing today?"),
    ("fox", "The quick brown fox jumps over the lazy dog."),
    ("leading_space", " leading space"),
    ("trailing_space", "trailing space "),
    ("two_leading", "  two leading spaces"),
    ("multi_spaces", "multiple   spaces   between   words"),
    ("contractions", "I'm sure you'll see they've done it; we'd say it's John's and we're fine. Don't!"),
    ("contractions_upper", "IT'S JOHN'S 'S 'T 'RE 'Ve 'LL 'D 'M"),
    ("apostrophes", "'s ' '' 'hello' rock'n'roll ''s '''re"),
    ("mixed_case", "HELLO World hELLo CamelCaseIdentifier snake_case_name"),
    ("python", PY_CODE),
    ("c_code", C_CODE),
    ("long_number", "1234567890123"),
    ("pi", "3.14159"),
    ("million", "1,000,000"),
    ("zero_pad", "0 007 0.5 -42 +7"),
    ("datetime", "Call 555-1234 at 10:30pm on 2024-01-15."),
    ("sci", "x=1e-9, y=-42.0, z=6.022e23"),
    ("arabic_digits", "\u0661\u0662\u0663\u0664 \u0665\u0666\u0667"),
    ("other_numbers", "x\u00b2 + y\u00b3 \u00bd \u2153 \u216b \u2460"),
    ("fullwidth", "\uff11\uff12\uff13 \uff21\uff22\uff23"),
    ("tab_between", "a\tb"),
    ("space_tab_space", "a \t b"),
    ("indented", "    indented"),
    ("lines", "line1\nline2\n\nline4"),
    ("space_newline_runs", "   \n   \n"),
    ("tabs_x", "\t\t\tx"),
    ("x_spaces", "x   "),
    ("nbsp", "a\u00a0b\u00a0\u00a0c"),
    ("ideographic_space", "a\u3000b"),
    ("line_separator", "a\u2028b\u2029c"),
    ("nel", "a\u0085b"),
    ("zwsp", "a\u200bb"),
    ("mongolian_vs", "a\u180eb"),
    ("em_space", "a\u2003\u2003b"),
    ("spaces_100", " " * 100),
    ("a_spaces_b", "a" + " " * 50 + "b"),
    ("ws_mixture", " \t \n \r\n  \t x \n\n\t y\r\r"),
    ("newline_runs_words", "a\n\n\nb\n \nc \n d"),
    ("emoji", "\U0001F600"),
    ("emoji_words", "Hello \U0001F600 world"),
    ("skin_tone", "\U0001F44D\U0001F3FD thumbs"),
    ("zwj_family", "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466"),
    ("rainbow_flag", "\U0001F3F3\ufe0f\u200d\U0001F308"),
    ("heart_vs16", "\u2764\ufe0f"),
    ("flags", "\U0001F1FA\U0001F1F8\U0001F1EF\U0001F1F5"),
    ("emoji_glued", "emoji\U0001F642text\U0001F916\U0001F980\U0001F40D"),
    ("chinese", "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002"),
    ("japanese", "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c\u3002\u30ab\u30bf\u30ab\u30ca\u3068\u3072\u3089\u304c\u306a\u3001\u6f22\u5b57\u3002"),
    ("korean", "\uc548\ub155\ud558\uc138\uc694 \uc138\uacc4"),
    ("arabic", "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645"),
    ("hebrew", "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd"),
    ("russian", "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u041a\u0430\u043a \u0434\u0435\u043b\u0430?"),
    ("greek", "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5"),
    ("hindi", "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e"),
    ("thai", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01"),
    ("vietnamese", "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u"),
    ("german", "Gr\u00fc\u00dfe aus K\u00f6ln, Stra\u00dfe"),
    ("french", "\u00c7a va? Tr\u00e8s bien, merci."),
    ("combining", "e\u0301 vs \u00e9, n\u0303"),
    ("mixed_scripts", "Hello \u4e16\u754c \u043c\u0438\u0440 \U0001F30D 123 \u0645\u0631\u062d\u0628\u0627"),
    ("json", '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}'),
    ("markdown", "# Title\n\n- item 1\n- item 2\n\n**bold** _it_ `code`\n\n```py\nx = 1\n```\n"),
    ("url", "https://example.com/path?q=1&r=2#frag user@example.org"),
    ("repeat_a", "a" * 50),
    ("repeat_bang", "!" * 12),
    ("repeat_eq", "=" * 60),
    ("punct_runs", "... --- ?!?! (([[{{<>}}]])) $$$ @#%^&*"),
    ("symbols", "\u00a9 \u00ae \u2122 \u20ac100 \u00a35 \u00a5 \u00b0C \u00b1 \u00d7 \u00f7 \u2192 \u2264 \u221e"),
    ("special_turn", "<|im_start|>user\nhi<|im_end|>"),
    ("special_conv", "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>assistant\n"),
    ("special_eot", "<|endoftext|>"),
    ("special_inline", "text<|endoftext|>more"),
    ("special_adjacent", "<|im_start|><|im_end|>"),
    ("special_partial", "<|im_start"),
    ("special_twice", "<|im_end|><|im_end|>"),
    ("special_fim", "x<reponame>y<filename>z"),
    ("special_spaced", "< |im_start| >"),
    ("special_jupyter", "<jupyter_code>print(1)<jupyter_output>1<empty_output>"),
    ("special_space_after", "<|im_start|> user"),
    ("special_newlines", "<|im_start|>\n\n"),
    ("special_nested", "<|im_<|im_end|>start|>"),
    ("control_chars", "\x00\x01\x02\x1b[0m\x7f"),
    ("paragraph", PARAGRAPH),
    ("invalid_ff", b"\xff"),
    ("invalid_cont", b"abc\x80def"),
    ("invalid_trunc2", b"\xc3"),
    ("invalid_trunc3", b"\xe2\x82"),
    ("invalid_trunc_emoji", b"\xf0\x9f\x98"),
    ("invalid_trunc_mid", b"a\xc3(b"),
    ("overlong_nul", b"\xc0\x80"),
    ("surrogate", b"\xed\xa0\x80"),
    ("invalid_f8", b"\xf8\x88\x80\x80\x80"),
    ("invalid_fe", b"x\xfe\xffy"),
    ("invalid_mix", b"ok \xe2\x82\xac \xe2\x82 \xf0\x9f\x98\x80\xf0 end"),
]

# Cases run with these (add_bos, special) flags; add_bos=True also everywhere a BOS matters.
FLAGS = [(False, False), (False, True), (True, True)]

# The stress text for the timing test: these cases joined and repeated (built identically by the
# C++ test from the cases above), so only its id count and hash are stored.
BIG_REPEAT = 45
BIG_SEPARATOR = "\n"

SPECIAL_IDS = list(range(0, 17))

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a64(data, h=FNV_OFFSET):
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def as_bytes(text):
    return text if isinstance(text, bytes) else text.encode("utf-8")


def piece(vocab, token, special):
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def load(path):
    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


def tokenize_cases(llm, flags, with_detok=True):
    vocab = llm._model.vocab
    out = []
    for name, text in CORPUS:
        data = as_bytes(text)
        for add_bos, special in flags:
            ids = llm.tokenize(data, add_bos=add_bos, special=special)
            case = {"name": name, "add_bos": add_bos, "special": special}
            # Readable text where possible; hex where the input is deliberately invalid UTF-8.
            if is_utf8(data):
                case["text"] = data.decode("utf-8")
            else:
                case["hex"] = data.hex()
            case["ids"] = ids
            if with_detok:
                # Omitted when equal to the input (the common case) / to the special rendering.
                detok = b"".join(piece(vocab, t, True) for t in ids)
                detok_plain = b"".join(piece(vocab, t, False) for t in ids)
                if detok != data:
                    case["detok_hex"] = detok.hex()
                if detok_plain != detok:
                    case["detok_plain_hex"] = detok_plain.hex()
            out.append(case)
    return out


def is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def vocab_summary(llm):
    vocab = llm._model.vocab
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    h_special = FNV_OFFSET
    h_plain = FNV_OFFSET
    for t in range(n):
        for special in (True, False):
            p = piece(vocab, t, special)
            rec = len(p).to_bytes(4, "little") + p
            if special:
                h_special = fnv1a64(rec, h_special)
            else:
                h_plain = fnv1a64(rec, h_plain)
    return {
        "n_vocab": n,
        "bos": llama_cpp.llama_vocab_bos(vocab),
        "eos": llama_cpp.llama_vocab_eos(vocab),
        "eog_ids": [t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)],
        # llama_token_attr bits: 4 NORMAL, 8 CONTROL, 16 USER_DEFINED, ...
        "attrs": {str(t): int(llama_cpp.llama_vocab_get_attr(vocab, t)) for t in SPECIAL_IDS},
        # FNV-1a 64 over (u32 little-endian length, bytes) of every token's piece, in id order.
        "pieces_fnv_special": "%016x" % h_special,
        "pieces_fnv_plain": "%016x" % h_plain,
    }


def big_summary(llm):
    # Valid-UTF-8 cases only, so the text is the same whichever way a reader decodes it.
    texts = [as_bytes(t) for _, t in CORPUS if is_utf8(as_bytes(t))]
    sep = BIG_SEPARATOR.encode()
    big = (sep.join(texts) + sep) * BIG_REPEAT
    ids = llm.tokenize(big, add_bos=False, special=False)
    h = FNV_OFFSET
    for t in ids:
        h = fnv1a64(int(t).to_bytes(4, "little", signed=True), h)
    return {
        "repeat": BIG_REPEAT,
        "separator": BIG_SEPARATOR,
        "n_bytes": len(big),
        "n_words": len(big.split()),
        "n_ids": len(ids),
        "ids_fnv": "%016x" % h,
    }


def write_variant(reader, path, overrides, drop=()):
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(path, arch)
    seen = set()
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = overrides[name][1] if name in overrides else field.contents()
        if name in overrides:
            vtype = overrides[name][0]
            sub = None
        w.add_key_value(name, val, vtype, sub_type=sub)
        seen.add(name)
    for name, (vtype, val) in overrides.items():
        if name not in seen:
            w.add_key_value(name, val, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def chat_goldens(model_template):
    # Hugging Face renders chat templates with these settings (transformers' apply_chat_template).
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    # A plain ChatML template and a Qwen2-style one with an escaped default system prompt, as
    # published in those models' tokenizer_config.json.
    plain_chatml = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    qwen2 = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    templates = {"model": model_template, "plain_chatml": plain_chatml, "qwen2": qwen2}
    conversations = [
        [{"role": "user", "content": "Hello"}],
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
        [],
        [{"role": "assistant", "content": "only assistant"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],
        [{"role": "user", "content": "multi\nline\n\n  content \u4e16\u754c \U0001F600 <|im_end|>"}],
        [{"role": "user", "content": ""}],
    ]
    out = []
    for tname, tmpl in templates.items():
        compiled = env.from_string(tmpl)
        for messages in conversations:
            for gen in (False, True):
                out.append({
                    "template": tname,
                    "messages": messages,
                    "add_generation_prompt": gen,
                    "expected": compiled.render(messages=messages, add_generation_prompt=gen),
                })
    return {"templates": templates, "cases": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "data", "tokenizer_goldens.json"))
    args = ap.parse_args()

    reader = gguf.GGUFReader(args.model)
    llm = load(args.model)
    result = {
        "generator": "tools/gen_tokenizer_goldens.py",
        "reference": "llama-cpp-python %s (llama.cpp), jinja2 %s" % (llama_cpp.__version__, jinja2.__version__),
        "model": os.path.basename(args.model),
        "pre": reader.fields["tokenizer.ggml.pre"].contents(),
        "vocab": vocab_summary(llm),
        "cases": tokenize_cases(llm, FLAGS),
        "big": big_summary(llm),
    }

    # Variants: the same vocabulary and merges under another pre-tokenizer or add_bos flag.
    S = gguf.GGUFValueType.STRING
    B = gguf.GGUFValueType.BOOL
    variants = [
        ("gpt-2", {"tokenizer.ggml.pre": (S, "gpt-2")}, ()),
        ("default", {"tokenizer.ggml.pre": (S, "default")}, ()),
        ("absent", {}, ("tokenizer.ggml.pre",)),
        ("add_bos", {"tokenizer.ggml.add_bos_token": (B, True)}, ()),
    ]
    result["variants"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides, drop in variants:
            path = os.path.join(tmp, name + ".gguf")
            write_variant(reader, path, overrides, drop)
            vllm = load(path)
            flags = [(True, True), (True, False)] if name == "add_bos" else [(False, True)]
            result["variants"].append({
                "name": name,
                "pre": None if drop else overrides.get("tokenizer.ggml.pre", (S, result["pre"]))[1],
                "add_bos_token": name == "add_bos",
                "cases": tokenize_cases(vllm, flags, with_detok=False),
            })
            del vllm

    result["chat"] = chat_goldens(reader.fields["tokenizer.chat_template"].contents())

    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=True, indent=None, separators=(",", ":"))
        f.write("\n")
    n_cases = len(result["cases"]) + sum(len(v["cases"]) for v in result["variants"])
    print("wrote %s: %d tokenize cases, %d chat cases" % (args.out, n_cases, len(result["chat"]["cases"])),
          file=sys.stderr)


if __name__ == "__main__":
    main()
