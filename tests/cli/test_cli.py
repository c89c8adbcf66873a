#!/usr/bin/env python3
"""End-to-end tests of the kvlm binary: real runs and a bad-input table.

Every bad input must give exit code 1 or 2, never a signal, and exactly one line on stderr that
names the problem. Standard library only. Usage: test_cli.py KVLM_BINARY TEST_DATA_DIR
"""
import os
import re
import struct
import subprocess
import sys
import tempfile
import unittest

KVLM = sys.argv[1] if len(sys.argv) > 1 else "build/bin/kvlm"
DATA = sys.argv[2] if len(sys.argv) > 2 else "tests/data"
TINY = os.path.join(DATA, "tiny-llama.gguf")
# The second real model, as scripts/fetch-model.sh gemma3-270m places it (make test fetches it).
GEMMA = os.path.join(os.environ.get("KVLM_MODELS") or os.path.expanduser("~/.cache/kvlm/models"),
                     "gemma-3-270m-q4_k_m.gguf")


def run(*args, timeout=600):
    p = subprocess.run([KVLM, *args], capture_output=True, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def patched(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, f"expected one occurrence of {old!r}"
    return data.replace(old, new)


def write_file(d, name, text):
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


class BadInput(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        tiny = open(TINY, "rb").read()
        # general.architecture = "llama" -> "mamba" (same length: nothing else moves).
        cls.bad_arch = os.path.join(d, "bad-arch.gguf")
        open(cls.bad_arch, "wb").write(patched(tiny, gguf_string(b"llama"), gguf_string(b"mamba")))
        # output.weight's type id -> mxfp4 (39), which kvlm parses but has no kernels for. mxfp4
        # rows are smaller than the original type's, so the file stays valid GGUF.
        name = gguf_string(b"output.weight")
        i = tiny.index(name) + len(name)
        n_dims = struct.unpack_from("<I", tiny, i)[0]
        type_at = i + 4 + 8 * n_dims
        orig = struct.unpack_from("<I", tiny, type_at)[0]
        assert orig in (0, 1, 8), f"output.weight has type {orig}"
        bad_type = bytearray(tiny)
        struct.pack_into("<I", bad_type, type_at, 39)
        cls.bad_type = os.path.join(d, "bad-type.gguf")
        open(cls.bad_type, "wb").write(bad_type)
        cls.not_gguf = os.path.join(d, "not-a-model.gguf")
        open(cls.not_gguf, "wb").write(b"this is not a GGUF file at all\n" * 4)
        cls.truncated = os.path.join(d, "truncated.gguf")
        open(cls.truncated, "wb").write(tiny[: len(tiny) // 2])

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_inspect_lists_what_it_cannot_run(self):
        # The listing comes from the GGUF reader alone; Model::load's refusal follows it.
        for path, needles in ((self.bad_arch, ("general.architecture", '"mamba"', "output.weight",
                                               "cannot run: ", "unsupported architecture 'mamba'")),
                              (self.bad_type, ("output.weight", "mxfp4", "blk.0.attn_q.weight",
                                               "cannot run: ", "'output.weight' has type mxfp4"))):
            rc, out, err = run("inspect", "-m", path)
            self.assertEqual(rc, 0, err)
            for needle in needles:
                self.assertIn(needle, out, path)
            self.assertNotIn("config:", out)

    def check(self, args, codes, needle):
        rc, out, err = run(*args)
        self.assertGreaterEqual(rc, 0, f"killed by signal {-rc}: {args}")
        self.assertIn(rc, codes, f"{args}: exit {rc}, stderr {err!r}")
        lines = [l for l in err.splitlines() if l.strip()]
        self.assertEqual(len(lines), 1, f"{args}: expected one stderr line, got {err!r}")
        self.assertIn(needle.lower(), lines[0].lower(), f"{args}: {lines[0]!r}")

    def test_table(self):
        gen = ["generate", "-p", "hello", "-n", "4"]
        cases = [
            (["generate", "-m", "/nonexistent/model.gguf", "-p", "x"], (1,), "/nonexistent/model.gguf"),
            (["generate", "-m", self.tmp.name, "-p", "x"], (1,), self.tmp.name),
            (["generate", "-m", self.not_gguf, "-p", "x"], (1,), "magic"),
            (["generate", "-m", self.truncated, "-p", "x"], (1,), "truncated.gguf"),
            (["generate", "-m", self.bad_arch, "-p", "x"], (1,), "unsupported architecture 'mamba'"),
            (["generate", "-m", self.bad_type, "-p", "x"], (1,), "'output.weight' has type mxfp4"),
            (["inspect", "-m", self.not_gguf], (1,), "magic"),
            (["generate", "-m", TINY, "-c", "4", "-p", "one two three four five six seven"], (1,), "context"),
            (gen + ["-m", TINY, "--temp", "-1"], (2,), "temp"),
            (gen + ["-m", TINY, "--top-p", "1.5"], (2,), "top-p"),
            (gen + ["-m", TINY, "--min-p", "-0.1"], (2,), "min-p"),
            (gen + ["-m", TINY, "-t", "0"], (2,), "threads"),
            (gen + ["-m", TINY, "-t", "-3"], (2,), "threads"),
            (gen + ["-m", TINY, "-t", "two"], (2,), "threads"),
            (gen + ["-m", TINY, "-t", "99999999999"], (2,), "threads"),
            (gen + ["-m", TINY, "-c", "0"], (2,), "ctx"),
            (["generate", "-m", TINY, "-p", "x", "-n", "abc"], (2,), "abc"),
            (gen + ["-m", TINY, "--bogus-flag"], (2,), "bogus"),
            (gen + ["-m", TINY, "-ctk", "q9_9"], (1, 2), "q9_9"),
            (["generate", "-m", TINY], (2,), "prompt"),
            (["generate", "-m", TINY, "-p", ""], (1,), "empty"),
            (["frobnicate"], (2,), "frobnicate"),
            # KIVI (--kv-residual): K must be the 4-bit per-channel format; no eviction policies.
            (gen + ["-m", TINY, "--kv-residual", "8"], (1,), "-ctk q4_0"),
            (gen + ["-m", TINY, "-ctk", "q4_0", "--kv-residual", "8", "--kv-window", "16"], (1,), "--kv-window"),
            (gen + ["-m", TINY, "-ctk", "q4_0", "--kv-residual", "8", "--keep", "2"], (1,), "--keep"),
            (gen + ["-m", TINY, "-ctk", "q4_0", "--kv-residual", "-1"], (2,), "kv-residual"),
            (gen + ["-m", TINY, "-ctk", "q4_0", "-ctv", "q4_0", "--kv-residual", "8"], (1,), "head_dim"),
        ]
        for args, codes, needle in cases:
            with self.subTest(args=args):
                self.check(args, codes, needle)


class Threads(unittest.TestCase):
    """-t above the cores this process may run on (its affinity mask) is clamped to them with one
    note on stderr: a 1000-thread pool on 2 cores crawled (issue 25)."""

    NOTE = re.compile(r"^kvlm: note: -t (\d+) is more than the (\d+) cores this process may run "
                      r"on; using \2 threads$", re.M)

    def clamped(self, err, asked, cores):
        notes = [l for l in err.splitlines() if "note" in l]
        self.assertEqual(len(notes), 1, err)
        m = self.NOTE.match(notes[0])
        self.assertTrue(m, notes[0])
        self.assertEqual((int(m.group(1)), int(m.group(2))), (asked, cores))

    def test_every_command_that_runs_the_model(self):
        import json
        cores = len(os.sched_getaffinity(0))
        gen = ["generate", "-m", TINY, "-p", "hello", "-n", "4"]
        rc, _, err = run(*gen, "-t", "1000", timeout=120)
        self.assertEqual(rc, 0, err)
        self.clamped(err, 1000, cores)
        self.assertRegex(err, rf"threads:\s+{cores},")
        rc, out, err = run("bench", "-m", TINY, "-p", "8", "-n", "4", "-r", "1", "--json", "-t",
                           "1000", timeout=120)
        self.assertEqual(rc, 0, err)
        self.clamped(err, 1000, cores)
        self.assertEqual(json.loads(out)["threads"], cores)
        with tempfile.TemporaryDirectory() as d:
            text = os.path.join(d, "text.txt")
            open(text, "w").write("the quick brown fox jumps over the lazy dog " * 20)
            rc, out, err = run("perplexity", "-m", TINY, "-f", text, "--ctx", "64", "--chunks",
                               "1", "-t", "1000", timeout=120)
        self.assertEqual(rc, 0, err)
        self.clamped(err, 1000, cores)
        self.assertIn(f", {cores} threads", out)
        # As many as the cores, or fewer: no note.
        rc, _, err = run(*gen, "-t", str(cores))
        self.assertEqual(rc, 0, err)
        self.assertNotIn("note", err)
        self.assertRegex(err, rf"threads:\s+{cores},")

    def test_the_affinity_mask_counts(self):
        # Pinned to one CPU (taskset, a cgroup cpuset), the default and -t 2 use one thread.
        cpu = min(os.sched_getaffinity(0))
        for args, note in (([], False), (["-t", "2"], True)):
            with self.subTest(args=args):
                p = subprocess.run([KVLM, "generate", "-m", TINY, "-p", "hello", "-n", "4", *args],
                                   capture_output=True, timeout=120,
                                   preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
                err = p.stderr.decode()
                self.assertEqual(p.returncode, 0, err)
                self.assertRegex(err, r"threads:\s+1,")
                if note:
                    self.clamped(err, 2, 1)
                else:
                    self.assertNotIn("note", err)


class RealRuns(unittest.TestCase):
    def test_generate_default_model_stats(self):
        rc, out, err = run("generate", "-p", "The capital of France is", "-n", "12", "--temp", "0")
        self.assertEqual(rc, 0, err)
        self.assertTrue(out.startswith("The capital of France is"))
        self.assertGreater(len(out), len("The capital of France is") + 2)
        for needle in ("prompt tokens:", "generated tokens: 12", "prefill:", "decode:",
                       "kv cache:         on", "allocated"):
            self.assertIn(needle, err)

    def test_kivi_cache(self):
        # 8 prompt + 72 generated tokens: with residual 0 the first group of 64 tokens is sealed.
        rc, out, err = run("generate", "-p", "The capital of France is", "-n", "72", "--temp", "0",
                           "--ignore-eos", "-ctk", "q4_0", "-ctv", "q4_0", "--kv-residual", "0")
        self.assertEqual(rc, 0, err)
        self.assertTrue(out.startswith("The capital of France is"))
        self.assertIn("KIVI: K per channel in groups of 64, 64 sealed", err)
        rc, out, err = run("kv-size", "--ctx", "4096", "--kv-residual", "32", "--json")
        self.assertEqual(rc, 0, err)
        import json
        t = json.loads(out)["cache_types"]
        self.assertEqual(len(t), 1)
        self.assertEqual((t[0]["kivi_residual"], t[0]["bytes_per_token"], t[0]["bytes_per_seq"]),
                         (32, 6480, 28730880))  # 64 blocks of 64 + a 95-row f16 slot

    def test_kivi_cache_on_sliding_window_layers(self):
        # Gemma 3 270M: 15 of 18 layers attend over 512 tokens. 5 + 600 tokens cross the window
        # and seal 8 groups of 64 (residual 32); the window layers hold a bounded set of blocks.
        rc, out, err = run("generate", "-m", GEMMA, "-p", "Once upon a time", "-n", "600", "-c",
                           "1024", "--temp", "0", "--ignore-eos", "-ctk", "q4_0", "-ctv", "q4_0",
                           "--kv-residual", "32")
        self.assertEqual(rc, 0, err)
        self.assertTrue(out.startswith("Once upon a time"))
        self.assertIn("generated tokens: 600", err)
        self.assertIn("KIVI: K per channel in groups of 64, 512 sealed", err)
        # The planner's groups for that file with KIVI: blocks of 64 at 288 B per token and
        # layer (K 144 + V 144); 3 global layers x 32,768 tokens, 15 window layers x 17 blocks
        # (ceil((511 + 512) / 64) + 1), plus the 95-row f16 slot of 18 layers (K and V).
        rc, out, err = run("kv-size", "-m", GEMMA, "--ctx", "32768", "--kv-residual", "32",
                           "--json")
        self.assertEqual(rc, 0, err)
        import json
        t = json.loads(out)["cache_types"][0]
        self.assertEqual(t["groups"], [
            {"window": 0, "n_layer": 3, "tokens_per_seq": 32768, "bytes_per_seq": 3 * 32768 * 288},
            {"window": 512, "n_layer": 15, "tokens_per_seq": 17 * 64,
             "bytes_per_seq": 15 * 17 * 64 * 288}])
        self.assertEqual(t["bytes_per_seq"],
                         3 * 32768 * 288 + 15 * 17 * 64 * 288 + 95 * 256 * 2 * 2 * 18)

    def test_no_cache_gives_the_same_greedy_text(self):
        args = ["generate", "-p", "Water boils at", "-n", "16", "--temp", "0"]
        rc1, out1, err1 = run(*args)
        rc2, out2, err2 = run(*args, "--no-cache")
        self.assertEqual((rc1, rc2), (0, 0), err1 + err2)
        self.assertEqual(out1, out2)
        self.assertIn("kv cache:         off", err2)

    def test_seeded_sampling_is_reproducible(self):
        args = ["generate", "-p", "Once upon a time", "-n", "16", "--temp", "0.9", "--seed", "42"]
        a, b = run(*args), run(*args)
        self.assertEqual(a[0], 0, a[2])
        self.assertEqual(a[1], b[1])

    def test_chat(self):
        rc, out, err = run("generate", "--chat", "-p", "Say hello.", "-n", "16", "--temp", "0")
        self.assertEqual(rc, 0, err)
        self.assertNotIn("<|im_start|>", out)
        self.assertTrue(out.strip())

    def test_gpt2_model_runs(self):
        rc, out, err = run("generate", "-m", os.path.join(DATA, "tiny-gpt2.gguf"), "-p", "the", "-n", "8")
        self.assertEqual(rc, 0, err)

    def test_inspect_and_tokenize(self):
        rc, out, err = run("inspect")
        self.assertEqual(rc, 0, err)
        for needle in ("llama.block_count", "token_embd.weight", "q8_0", "q4_1", "23040 bytes/token"):
            self.assertIn(needle, out)
        # Every matrix the decode reads is Q4_1/Q8_0 with rows in multiples of 8, so the packed
        # copies are exactly the bytes read per token.
        read = re.search(r"weights read per decoded token: (.+)", out).group(1)
        packed = re.search(r"packed weight copies in memory: (.+)", out).group(1)
        self.assertEqual(read, packed)
        rc, out, err = run("tokenize", "-p", "Hello world")
        self.assertEqual(rc, 0, err)
        self.assertIn("'Hello'", out)


def refdata_dir():
    """llama.cpp's reference data, as tests/test_util.h's refdata_dir() finds it."""
    base = os.environ.get("KVLM_REFDATA") or os.path.join(os.path.expanduser("~"), ".cache", "kvlm", "refdata")
    return os.path.join(base, "llama.cpp-0.3.36")


class VocabOnly(unittest.TestCase):
    """`kvlm tokenize` on llama.cpp's vocab-only test GGUFs (no tensors), against llama.cpp's ids
    (tests/data/llama_vocab_goldens.json, tools/gen_vocab_goldens.py)."""

    def test_tokenize_matches_llama_cpp(self):
        import json
        with open(os.path.join(DATA, "llama_vocab_goldens.json")) as f:
            goldens = json.load(f)
        corpus = [c["name"] for c in goldens["corpus"]]
        for vocab in ("llama-spm", "gemma-4", "llama-bpe", "qwen2"):
            for name in ("hello_punct", "special_turn", "chinese"):
                text = goldens["corpus"][corpus.index(name)]["text"]
                case = goldens["vocabs"][vocab]["on"][corpus.index(name)]  # add/parse special
                path = os.path.join(refdata_dir(), f"ggml-vocab-{vocab}.gguf")
                rc, out, err = run("tokenize", "-m", path, "-p", text)
                self.assertEqual(rc, 0, err)
                ids = [int(line.split()[0]) for line in out.splitlines() if line.strip()]
                self.assertEqual(ids, case["ids"], f"{vocab}: {name}")

    def test_unsupported_vocabulary_is_one_line(self):
        for vocab, model in (("bert-bge", "bert"), ("nomic-bert-moe", "t5")):
            path = os.path.join(refdata_dir(), f"ggml-vocab-{vocab}.gguf")
            for cmd in (["tokenize", "-m", path, "-p", "x"], ["generate", "-m", path, "-p", "x", "-n", "1"]):
                rc, out, err = run(*cmd)
                self.assertIn(rc, (1, 2), err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                if cmd[0] == "tokenize":
                    self.assertIn(f"tokenizer.ggml.model is '{model}'", err)

    def test_generate_on_vocab_only_file_is_an_error(self):
        path = os.path.join(refdata_dir(), "ggml-vocab-llama-spm.gguf")
        rc, out, err = run("generate", "-m", path, "-p", "x", "-n", "1")
        self.assertIn(rc, (1, 2), err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        rc, out, err = run("inspect", "-m", path)
        self.assertIn(rc, (0, 1), err)


class KvSize(unittest.TestCase):
    """kvlm kv-size, the KV memory planner: the seeds' worked example, its three sources, bad input."""

    FLAGS_7B = ["--layers", "32", "--kv-heads", "32", "--head-dim", "128"]

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name

        def write(name, text):
            return write_file(d, name, text)

        # LLaMA-7B's config.json, trimmed to what the planner reads (and a field it ignores).
        cls.llama7b = write("llama7b.json", '{"model_type": "llama", "num_hidden_layers": 32, '
                            '"num_attention_heads": 32, "hidden_size": 4096, '
                            '"max_position_embeddings": 2048, "vocab_size": 32000}')
        # GQA with an explicit head_dim (and the language model under text_config).
        cls.gqa = write("gqa.json", '{"text_config": {"num_hidden_layers": 30, "num_attention_heads": 9, '
                        '"num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64}}')
        cls.broken = write("broken.json", '{"num_hidden_layers": 32,, }')
        cls.no_layers = write("no-layers.json", '{"num_attention_heads": 32, "hidden_size": 4096}')
        cls.zero_heads = write("zero-heads.json", '{"num_hidden_layers": 2, "num_attention_heads": 0, '
                               '"hidden_size": 64}')

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def kv_size(self, *args):
        rc, out, err = run("kv-size", *args)
        self.assertEqual(rc, 0, f"{args}: {err}")
        return out

    def kv_size_json(self, *args):
        import json
        return json.loads(self.kv_size(*args, "--json"))

    def test_llama7b_worked_example(self):
        j = self.kv_size_json(*self.FLAGS_7B, "--ctx", "4096", "-ctk", "f16", "-ctv", "f16")
        self.assertEqual(j["source"]["kind"], "flags")
        self.assertEqual((j["n_ctx"], j["n_seqs"], j["budget_bytes"]), (4096, 1, None))
        self.assertEqual(j["layer_groups"], [{"window": 0, "n_layer": 32, "n_kv_head": 32,
                                              "head_dim": 128}])
        self.assertEqual(j["layer_windows"], [0] * 32)
        self.assertEqual(len(j["cache_types"]), 1)
        t = j["cache_types"][0]
        self.assertEqual((t["type_k"], t["type_v"]), ("f16", "f16"))
        self.assertEqual(t["bytes_per_token"], 524288)
        self.assertEqual(t["bytes_per_token_layer"], 16384)
        self.assertEqual(t["k_bytes_per_token"], 262144)
        self.assertEqual(t["bytes_total"], 2147483648)  # 2 GiB at 4,096 tokens
        j = self.kv_size_json(*self.FLAGS_7B, "--ctx", "1024", "-ctk", "f16", "-ctv", "f16")
        self.assertEqual(j["cache_types"][0]["bytes_total"], 512 << 20)  # 512 MiB at 1,024 tokens

    def test_budget_questions(self):
        # 2 GiB holds 4,096 tokens for one user, or 4 users at 1,024 tokens; 3 users get 1,360
        # (85 whole blocks of 16 tokens).
        j = self.kv_size_json(*self.FLAGS_7B, "--ctx", "1024", "--budget", "2GiB", "-ctk", "f16",
                              "-ctv", "f16")
        t = j["cache_types"][0]
        self.assertEqual(j["budget_bytes"], 2147483648)
        self.assertEqual((t["max_ctx_for_budget"], t["max_seqs_for_budget"]), (4096, 4))
        t = self.kv_size_json(*self.FLAGS_7B, "--ctx", "512", "--seqs", "3", "--budget", "2GiB",
                              "-ctk", "f16", "-ctv", "f16")["cache_types"][0]
        self.assertEqual((t["max_ctx_for_budget"], t["max_seqs_for_budget"]), (1360, 8))
        self.assertEqual(t["bytes_total"], 3 * 512 * 524288)
        out = self.kv_size(*self.FLAGS_7B, "--ctx", "1024", "--budget", "2GiB", "-ctk", "f16",
                           "-ctv", "f16")
        for needle in ("f16/f16", "524288", "536870912", "4096", "max ctx", "max seqs"):
            self.assertIn(needle, out)

    def test_every_type_listed(self):
        j = self.kv_size_json(*self.FLAGS_7B, "--ctx", "1")
        types = [t["type_k"] for t in j["cache_types"]]
        self.assertEqual(types[:2], ["f32", "f16"])
        per_token = [t["bytes_per_token"] for t in j["cache_types"]]
        self.assertEqual(per_token, sorted(per_token, reverse=True))
        self.assertIn(1048576, per_token)

    def test_default_model_text(self):
        out = self.kv_size()
        for needle in ("23040", "46080", "f16/f16", "f32/f32", "layers 0-29", "3 KV heads x 64",
                       "% of f16", "200.0%", "53.1%"):  # f32 twice f16; q8_0 12,240 / 23,040
            self.assertIn(needle, out)
        t = self.kv_size_json("-ctk", "q8_0", "-ctv", "q4_0", "--ctx", "100")["cache_types"][0]
        self.assertEqual(t["pct_of_f16"], 100.0 * (204 + 108) / 768)
        self.assertEqual(t["layers"][0], {"layer": 0, "window": 0, "tokens": 112,  # 7 blocks
                                          "k_bytes": 112 * 204, "v_bytes": 112 * 108})

    def test_sliding_window_groups(self):
        # Gemma 3 270M's shape: 18 layers, 1 KV head x 256, window 512, every 6th layer global.
        j = self.kv_size_json("--layers", "18", "--kv-heads", "1", "--head-dim", "256",
                              "--kv-window", "512", "--kv-window-pattern", "6", "--ctx", "32768",
                              "-ctk", "f16", "-ctv", "f16")
        self.assertEqual(j["layer_windows"], [0 if il % 6 == 5 else 512 for il in range(18)])
        t = j["cache_types"][0]
        # 3 global layers x 32,768 tokens x 1,024 B = 96 MiB; 15 window layers hold the blocks of
        # 511 + 512 tokens (65 blocks of 16) each; every layer full would be 576 MiB.
        self.assertEqual(t["groups"], [
            {"window": 0, "n_layer": 3, "tokens_per_seq": 32768, "bytes_per_seq": 100663296},
            {"window": 512, "n_layer": 15, "tokens_per_seq": 1040, "bytes_per_seq": 15974400}])
        self.assertEqual(t["bytes_per_seq"], 100663296 + 15974400)
        # Layer by layer, K and V apart: the global layers hold 32,768 tokens, the others 1,040.
        self.assertEqual(len(t["layers"]), 18)
        self.assertEqual(t["layers"][5], {"layer": 5, "window": 0, "tokens": 32768,
                                          "k_bytes": 32768 * 512, "v_bytes": 32768 * 512})
        self.assertEqual(t["layers"][0]["tokens"], 1040)
        self.assertEqual(sum(l["k_bytes"] + l["v_bytes"] for l in t["layers"]), t["bytes_per_seq"])
        # llama.cpp: 15 x 1,024 SWA cells (512 + n_ubatch 512, padded to 256) beside 3 x 32,768.
        self.assertEqual(t["llama_cpp_iswa_bytes_per_seq"], (3 * 32768 + 15 * 1024) * 1024)
        out = self.kv_size("--layers", "18", "--kv-heads", "1", "--head-dim", "256",
                           "--kv-window", "512", "--kv-window-pattern", "6", "--ctx", "32768",
                           "-ctk", "f16", "-ctv", "f16")
        for needle in ("sliding window 512", "5, 11, 17", "576.00 MiB", "96.00 MiB"):
            self.assertIn(needle, out)

    def test_sliding_window_sources(self):
        # The GGUF's keys (tests/data/tiny-llama-swa.gguf: window 24, pattern 2) and a config's
        # layer_types give the same groups.
        j = self.kv_size_json("-m", os.path.join(DATA, "tiny-llama-swa.gguf"), "-ctk", "f16",
                              "-ctv", "f16", "--ctx", "1000")
        self.assertEqual(j["layer_windows"], [24, 0])
        import json, tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                       "hidden_size": 512, "sliding_window": 128,
                       "layer_types": ["sliding_attention", "full_attention"] * 2}, f)
        try:
            j = self.kv_size_json("--hf-config", f.name, "-ctk", "f16", "-ctv", "f16")
            self.assertEqual(j["layer_windows"], [128, 0, 128, 0])
            with open(f.name, "w") as g:
                json.dump({"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 512,
                           "sliding_window": 128, "use_sliding_window": False}, g)
            self.assertEqual(self.kv_size_json("--hf-config", f.name)["layer_windows"], [0] * 4)
            with open(f.name, "w") as g:
                json.dump({"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 512,
                           "sliding_window": "wide"}, g)
            self.check_error(["--hf-config", f.name], (1,), "'sliding_window' must be")
        finally:
            os.unlink(f.name)

    def test_gguf_agrees_with_inspect(self):
        # kv-size reads only the metadata; inspect goes through Model::load. They must agree.
        tiny = os.path.join(DATA, "tiny-llama.gguf")
        rc, out, err = run("inspect", "-m", tiny)
        self.assertEqual(rc, 0, err)
        line = next(l for l in out.splitlines() if l.strip().startswith("f16 ") and "bytes/token" in l)
        per_token = int(line.split()[1])
        j = self.kv_size_json("-m", tiny, "-ctk", "f16", "-ctv", "f16", "--ctx", "10")
        self.assertEqual(j["source"]["kind"], "gguf")
        self.assertEqual(j["cache_types"][0]["bytes_per_token"], per_token)
        self.assertEqual(j["cache_types"][0]["bytes_total"], 16 * per_token)  # one whole block

    def test_hf_config(self):
        j = self.kv_size_json("--hf-config", self.llama7b, "-ctk", "f16", "-ctv", "f16")
        self.assertEqual(j["source"]["arch"], "llama")
        self.assertEqual((j["n_ctx"], j["n_ctx_model"]), (2048, 2048))  # max_position_embeddings
        self.assertEqual(j["cache_types"][0]["bytes_per_token"], 524288)
        self.assertEqual(j["cache_types"][0]["bytes_total"], 1 << 30)
        # SmolLM2-135M's shape, as the default model gives it.
        j = self.kv_size_json("--hf-config", self.gqa, "-ctk", "f16", "-ctv", "f16")
        self.assertEqual(j["n_ctx"], 4096)  # no max_position_embeddings: the default
        self.assertEqual(j["cache_types"][0]["bytes_per_token"], 23040)

    def check_error(self, args, codes, needle):
        rc, out, err = run("kv-size", *args)
        self.assertGreaterEqual(rc, 0, f"killed by signal {-rc}: {args}")
        self.assertIn(rc, codes, f"{args}: exit {rc}, stderr {err!r}")
        lines = [l for l in err.splitlines() if l.strip()]
        self.assertEqual(len(lines), 1, f"{args}: expected one stderr line, got {err!r}")
        self.assertIn(needle.lower(), lines[0].lower(), f"{args}: {lines[0]!r}")

    def test_bad_inputs(self):
        f16 = ["-ctk", "f16", "-ctv", "f16"]
        tiny = os.path.join(DATA, "tiny-llama.gguf")
        cases = [
            (self.FLAGS_7B + ["--budget", "2XB"], (1,), "unknown unit 'XB'"),
            (self.FLAGS_7B + ["--budget", "lots"], (1,), "lots"),
            # CLI11 itself refuses an option given an empty value: a usage error naming the flag.
            (self.FLAGS_7B + ["--budget="], (2,), "--budget"),
            (self.FLAGS_7B + ["--budget=-1GiB"], (1,), "negative"),
            (self.FLAGS_7B + ["--budget", "99999999999TiB"], (1,), "2^64"),
            (["--budget", "1KiB"] + f16, (1,), "budget 1KiB (1024 bytes) cannot hold one block (16 tokens) of one sequence (needs 368640 bytes)"),
            # 2 x 524288 bytes is exactly 1MiB (a valid budget of one token each); one KiB less is not.
            (self.FLAGS_7B + ["--budget", "1023KiB", "--seqs", "2"] + f16, (1,), "needs 16777216 bytes"),
            (self.FLAGS_7B + ["-m", tiny], (2,), "excludes"),
            (self.FLAGS_7B + ["--hf-config", self.llama7b], (2,), "excludes"),
            (["-m", tiny, "--hf-config", self.llama7b], (2,), "excludes"),
            (["--layers", "32"], (2,), "requires"),
            (["--layers", "0", "--kv-heads", "32", "--head-dim", "128"], (2,), "layers"),
            (self.FLAGS_7B + ["--ctx", "0"], (2,), "ctx"),
            (self.FLAGS_7B + ["--seqs", "0"], (2,), "seqs"),
            (self.FLAGS_7B + ["-ctk", "q9_9"], (1,), "q9_9"),
            (["--layers", "2", "--kv-heads", "2", "--head-dim", "48", "-ctk", "q4_0"], (1,), "multiple of 32"),
            (self.FLAGS_7B + ["--ctx", "9223372036854775807"], (1,), "overflows"),
            (["--hf-config", self.broken], (1,), "invalid JSON"),
            (["--hf-config", self.no_layers], (1,), "missing field 'num_hidden_layers'"),
            (["--hf-config", self.zero_heads], (1,), "num_attention_heads"),
            (["--hf-config", "/nonexistent/config.json"], (1,), "/nonexistent/config.json"),
            (["--hf-config", self.tmp.name], (1,), "directory"),
            (["-m", "/nonexistent/model.gguf"], (1,), "/nonexistent/model.gguf"),
            (["-m", self.llama7b], (1,), "llama7b.json"),
        ]
        for args, codes, needle in cases:
            with self.subTest(args=args):
                self.check_error(args, codes, needle)


class Perplexity(unittest.TestCase):
    """kvlm perplexity: short runs on the tiny model, KL round trip, one-line errors."""

    TEXT = ("The hacker's lexicon grew out of small communities that shared machines, jokes and "
            "a taste for precise language. A program that works but nobody understands is magic; "
            "one that almost works is a kludge. ") * 4

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        cls.text = os.path.join(d, "text.txt")
        open(cls.text, "w").write(cls.TEXT)
        cls.short = os.path.join(d, "short.txt")
        open(cls.short, "w").write("too short")
        cls.gz = os.path.join(d, "text.txt.gz")
        open(cls.gz, "wb").write(b"\x1f\x8b\x08\x00" + b"\x00" * 32)
        cls.junk = os.path.join(d, "junk.kld")
        open(cls.junk, "wb").write(b"not a base file" * 8)
        cls.base = os.path.join(d, "base.kld")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def ppl(self, *args):
        return run("perplexity", "-m", TINY, "-f", self.text, "--ctx", "64", *args)

    def one_line_error(self, result, codes, needle):
        rc, out, err = result
        self.assertIn(rc, codes, f"exit {rc}, stderr {err!r}")
        lines = [l for l in err.splitlines() if l.strip()]
        self.assertEqual(len(lines), 1, f"expected one stderr line, got {err!r}")
        self.assertIn(needle.lower(), lines[0].lower())

    def test_tiny_run(self):
        rc, out, err = self.ppl("--chunks", "2")
        self.assertEqual(rc, 0, err)
        self.assertIn("[2/2] PPL", out)
        self.assertIn("PPL = ", out)
        self.assertIn("+/-", out)
        self.assertEqual(err.strip(), "")

    def test_cache_layout_flags(self):
        # The shared cache flags reach perplexity: a dynamic cache scores exactly like a static
        # one; a window smaller than the chunk evicts inside it and says so; a window that cannot
        # evict anything is an error.
        final = lambda out: [l for l in out.splitlines() if l.startswith("PPL = ")][0].split("(")[0]
        rc, out_static, err = self.ppl("--chunks", "2")
        self.assertEqual(rc, 0, err)
        rc, out_dyn, err = self.ppl("--chunks", "2", "--kv-alloc", "dynamic")
        self.assertEqual(rc, 0, err)
        self.assertIn("dynamic", out_dyn)
        self.assertEqual(final(out_static), final(out_dyn))
        rc, out_win, err = self.ppl("--chunks", "2", "--kv-window", "24", "--kv-sinks", "4", "-b", "8")
        self.assertEqual(rc, 0, err)
        self.assertIn("window 24 + 4 sinks", out_win)
        self.assertNotEqual(final(out_static), final(out_win))
        self.one_line_error(self.ppl("--kv-window", "64"), (1,), "smaller than the chunk")

    def test_stdin_gives_the_same_ppl(self):
        p = subprocess.run([KVLM, "perplexity", "-m", TINY, "-f", "-", "--ctx", "64"],
                           input=self.TEXT.encode(), capture_output=True, timeout=600)
        self.assertEqual(p.returncode, 0, p.stderr)
        rc, out, err = self.ppl()
        final = [l for l in out.splitlines() if l.startswith("PPL = ")]
        final_stdin = [l for l in p.stdout.decode().splitlines() if l.startswith("PPL = ")]
        self.assertEqual(final[0].split("(")[0], final_stdin[0].split("(")[0])

    def test_kl_round_trip(self):
        rc, out, err = self.ppl("--chunks", "2", "--kl-base-out", self.base)
        self.assertEqual(rc, 0, err)
        self.assertIn("KL base written", out)
        rc, out, err = self.ppl("--kl-base", self.base, "-ctk", "f32")
        self.assertEqual(rc, 0, err)
        self.assertIn("[2/2] PPL", out)  # chunk count taken from the base
        self.assertIn("mean KLD", out)
        self.assertIn("same top p", out)
        rc, out, err = self.ppl("--kl-base", self.base)
        self.assertEqual(rc, 0, err)
        self.assertIn("mean KLD      = 0.000000 +/- 0.000000", out)
        self.assertIn("same top p    = 100.000 %", out)
        self.one_line_error(run("perplexity", "-m", TINY, "-f", self.text, "--ctx", "32",
                                "--kl-base", self.base), (1,), "--ctx 64")

    def test_kl_ref_in_process(self):
        # The same cache as its reference: exactly 0, over the full vocabulary; another one: > 0
        # (the tiny model's 16-dim heads take no 32-value blocks: f32 against f16).
        rc, out, err = self.ppl("--chunks", "2", "--kl-ref", "f16")
        self.assertEqual(rc, 0, err)
        self.assertIn("over the full vocabulary", out)
        self.assertIn("mean KLD      = 0.000000 +/- 0.000000", out)
        rc, out, err = self.ppl("--chunks", "2", "-ctk", "f32", "--kl-ref", "f16")
        self.assertEqual(rc, 0, err)
        kld = float(re.search(r"mean KLD\s*=\s*([0-9.e+-]+)", out)[1])
        self.assertGreater(kld, 0)
        self.one_line_error(self.ppl("--kl-ref", "q9_9"), (1, 2), "q9_9")
        self.one_line_error(self.ppl("--kl-ref", "f16", "--kl-base", self.junk), (2,), "excludes")
        self.one_line_error(self.ppl("--kl-ref", "f16", "--kl-base-out", self.base), (2,),
                            "excludes")

    def test_bad_inputs(self):
        self.one_line_error(self.ppl_file("/nonexistent/text.txt"), (1,), "/nonexistent/text.txt")
        self.one_line_error(self.ppl_file(self.short), (1,), "fewer than one chunk")
        self.one_line_error(self.ppl_file(self.gz), (1,), "gzip")
        self.one_line_error(self.ppl("--kl-base", self.junk), (1,), "magic")
        self.one_line_error(self.ppl("--kl-base", self.tmp.name + "/none.kld"), (1,), "none.kld")
        self.one_line_error(self.ppl("--kl-base", self.junk, "--kl-base-out", self.base), (2,),
                            "excludes")
        self.one_line_error(run("perplexity", "-m", TINY, "-f", self.text, "--ctx", "2"), (2,),
                            "ctx")
        self.one_line_error(self.ppl("-ctk", "q9_9"), (1, 2), "q9_9")
        self.one_line_error(run("perplexity", "-m", TINY), (2,), "file")

    def ppl_file(self, path):
        return run("perplexity", "-m", TINY, "-f", path, "--ctx", "64")

    def test_default_model(self):
        rc, out, err = run("perplexity", "-f", self.text, "--ctx", "64", "--chunks", "1")
        self.assertEqual(rc, 0, err)
        self.assertIn("PPL = ", out)


class Bench(unittest.TestCase):
    """kvlm bench: structure of the JSON and of the table; never its speed."""

    def test_json_structure(self):
        import json
        rc, out, err = run("bench", "-m", TINY, "-p", "16", "-n", "8", "-d", "0,32", "-r", "2", "--json")
        self.assertEqual(rc, 0, err)
        doc = json.loads(out)
        self.assertGreater(doc["weight_bytes"], 0)
        self.assertGreater(doc["kv_bytes_per_token"], 0)
        self.assertEqual(doc["repetitions"], 2)
        self.assertTrue(doc["use_cache"])
        self.assertEqual([t["name"] for t in doc["tests"]], ["pp16", "pp16 @ d32", "tg8", "tg8 @ d32"])
        for t in doc["tests"]:
            with self.subTest(test=t["name"]):
                rate = t["tokens_per_s"]
                self.assertEqual(len(rate["samples"]), 2)
                self.assertEqual(len(t["seconds"]), 2)
                self.assertTrue(all(s > 0 for s in rate["samples"]))
                self.assertAlmostEqual(rate["mean"], sum(rate["samples"]) / 2, delta=1e-6 * rate["mean"])
                self.assertGreaterEqual(rate["sd"], 0)
                n_ctx = t["depth"] + t["n_prompt"] + t["n_gen"]
                self.assertEqual(t["kv_bytes"]["n_ctx"], n_ctx)
                # Whole blocks of 16 tokens.
                self.assertEqual(t["kv_bytes"]["allocated"],
                                 (n_ctx + 15) // 16 * 16 * doc["kv_bytes_per_token"])

    def test_table_and_no_cache(self):
        rc, out, err = run("bench", "-m", TINY, "-p", "8", "-n", "4", "-d", "8", "-r", "1",
                           "--no-cache", "-ctk", "f32", "--pg", "4,4")
        self.assertEqual(rc, 0, err)
        for needle in ("| pp8 @ d8 ", "| tg4 @ d8 ", "| pp4+tg4 @ d8 ", "cache off", "K f32 / V f16", "±"):
            self.assertIn(needle, out)

    def test_window_layout(self):
        import json
        rc, out, err = run("bench", "-m", TINY, "-p", "0", "-n", "8", "-d", "40", "-r", "1",
                           "--kv-window", "16", "--kv-sinks", "4", "--json")
        self.assertEqual(rc, 0, err)
        doc = json.loads(out)
        t = doc["tests"][0]
        self.assertEqual(t["name"], "tg8 @ d40")
        # Bounded: the 20 tokens of sinks + window, in whole blocks of 16.
        self.assertEqual(t["kv_bytes"]["allocated"], 32 * doc["kv_bytes_per_token"])

    def test_parallel_sequences(self):
        """-np S: S sequences decode together over one paged store, --shared tokens stored once."""
        import json
        rc, out, err = run("bench", "-m", TINY, "-p", "0", "-n", "4", "-d", "40", "-np", "1,3",
                           "--shared", "20", "-r", "2", "--json")
        self.assertEqual(rc, 0, err)
        doc = json.loads(out)
        self.assertIn(doc["kernels"], ("avx2-amx", "avx2-vnni", "avx2", "scalar"))
        one, three = doc["tests"]
        self.assertEqual(one["name"], "tg4 @ d40")
        self.assertEqual((one["n_seq"], one["shared"], one["n_tokens_timed"]), (1, 0, 4))
        self.assertEqual(three["name"], "tg4 x3 @ d40 (20 shared)")
        self.assertEqual((three["n_seq"], three["shared"], three["n_tokens_timed"]), (3, 20, 12))
        self.assertTrue(all(x > 0 for x in three["tokens_per_s"]["samples"]))
        # 16-token blocks: each sequence needs ceil(44 / 16) = 3; the first of them (20 shared
        # tokens hold one whole block) is stored once: 3 + 2 x 2 blocks of 16 positions.
        self.assertEqual(three["kv_bytes"]["allocated"], 7 * 16 * doc["kv_bytes_per_token"])
        rc, out, err = run("bench", "-m", TINY, "-p", "0", "-n", "4", "-d", "40", "-np", "3",
                           "--shared", "20", "-r", "1")
        self.assertEqual(rc, 0, err)
        self.assertIn("| tg4 x3 @ d40 (20 shared) ", out)

    def test_bad_input(self):
        bench = ["bench", "-m", TINY, "-p", "8", "-n", "4"]
        cases = [
            (bench + ["-d", "abc"], 2, "abc"),
            (bench + ["-d", "0,x"], 2, "x"),
            (bench + ["-r", "0"], 2, "repetitions"),
            (bench + ["-p", "-5"], 2, "-5"),
            (bench + ["--pg", "16"], 2, "16"),
            (bench + ["-t", "0"], 2, "threads"),
            (["bench", "-m", TINY, "-p", "0", "-n", "0"], 2, "nothing to run"),
            (bench + ["-ctk", "q9_9"], 1, "q9_9"),
            (["bench", "-m", "/nonexistent/model.gguf"], 1, "/nonexistent/model.gguf"),
            (bench + ["-np", "0"], 2, "parallel"),
            (bench + ["-np", "2", "--no-cache"], 1, "-np"),
            (bench + ["-np", "2", "--kv-window", "16"], 1, "-np"),
        ]
        for args, code, needle in cases:
            with self.subTest(args=args):
                rc, out, err = run(*args)
                self.assertEqual(rc, code, f"{args}: stderr {err!r}")
                lines = [l for l in err.splitlines() if l.strip()]
                self.assertEqual(len(lines), 1, f"{args}: expected one stderr line, got {err!r}")
                self.assertIn(needle.lower(), lines[0].lower())


LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


class ChatTemplateFlag(unittest.TestCase):
    """--chat-template FILE / --chat-template-file FILE on generate, chat and serve."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        def write(name, text):
            return write_file(cls.tmp.name, name, text)
        cls.llama3 = write("llama3.jinja", LLAMA3)
        # The user's text once, and five times: the prompt grows about fivefold.
        cls.plain = write("plain.jinja", "{% for m in messages %}{{ m.content ~ ' ' }}{% endfor %}")
        cls.repeat = write("repeat.jinja", "{% for m in messages %}{{ (m.content ~ ' ') * 5 }}{% endfor %}")
        cls.raising = write("raise.jinja", "{{ raise_exception('this template refuses everything') }}")
        cls.broken = write("broken.jinja", "line one\n{% for m in messages %}\n{{ m.content | frobnicate }}\n{% endfor %}")
        cls.syntax = write("syntax.jinja", "{% if %}")
        cls.no_system = write("no-system.jinja",
                              "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
                              "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def prompt_tokens(self, *args):
        rc, out, err = run("generate", "-m", TINY, "-p", "hello world", "-n", "1", "--temp", "0", "--chat", *args)
        self.assertEqual(rc, 0, err)
        m = re.search(r"prompt tokens:\s+(\d+)", err)
        self.assertIsNotNone(m, err)
        return int(m.group(1))

    def test_generate_uses_the_file(self):
        for flag in ("--chat-template", "--chat-template-file"):
            with self.subTest(flag=flag):
                once = self.prompt_tokens(flag, self.plain)
                five = self.prompt_tokens(flag, self.repeat)
                self.assertGreaterEqual(five, 4 * once, (once, five))
                self.assertGreater(self.prompt_tokens(flag, self.llama3), once)

    def one_line_error(self, args, needle, code=1, timeout=120):
        rc, out, err = run(*args, timeout=timeout)
        self.assertEqual(rc, code, f"{args}: stderr {err!r}")
        lines = [l for l in err.splitlines() if l.strip()]
        self.assertEqual(len(lines), 1, f"{args}: expected one stderr line, got {err!r}")
        self.assertIn(needle, lines[0])
        return lines[0]

    def test_generate_errors(self):
        gen = ["generate", "-m", TINY, "-p", "hi", "-n", "1", "--chat"]
        self.one_line_error(gen + ["--chat-template", self.raising], "this template refuses everything")
        self.one_line_error(gen + ["--chat-template", self.broken], "template line 3: unknown filter 'frobnicate'")
        self.one_line_error(gen + ["--chat-template", self.syntax], self.syntax)
        self.one_line_error(gen + ["--chat-template", "/nonexistent/t.jinja"], "/nonexistent/t.jinja")
        self.one_line_error(["generate", "-m", TINY, "-p", "hi", "--chat-template", self.llama3], "--chat")

    def test_chat_uses_the_file(self):
        p = subprocess.run([KVLM, "chat", "-m", TINY, "-n", "2", "--temp", "0", "--chat-template", self.raising],
                           input=b"hi\n", capture_output=True, timeout=120)
        self.assertIn(b"this template refuses everything", p.stderr)

    def test_serve_refuses_a_template_that_cannot_render(self):
        serve = ["serve", "-m", TINY, "--port", "0"]
        for path, needle in ((self.broken, "unknown filter 'frobnicate'"),
                             (self.raising, "this template refuses everything")):
            with self.subTest(path=path):
                line = self.one_line_error(serve + ["--chat-template", path], needle, timeout=60)
                self.assertIn("cannot render a plain conversation", line)
                self.assertIn(path, line)
        self.one_line_error(serve + ["--chat-template-file", self.syntax], "template line 1", timeout=60)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
