#!/usr/bin/env python3
"""End-to-end tests of the kvlm binary: real runs and a bad-input table.

Every bad input must give exit code 1 or 2, never a signal, and exactly one line on stderr that
names the problem. Standard library only. Usage: test_cli.py KVLM_BINARY TEST_DATA_DIR
"""
import os
import struct
import subprocess
import sys
import tempfile
import unittest

KVLM = sys.argv[1] if len(sys.argv) > 1 else "build/bin/kvlm"
DATA = sys.argv[2] if len(sys.argv) > 2 else "tests/data"
TINY = os.path.join(DATA, "tiny-llama.gguf")


def run(*args, timeout=600):
    p = subprocess.run([KVLM, *args], capture_output=True, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def patched(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, f"expected one occurrence of {old!r}"
    return data.replace(old, new)


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
        # output.weight's type id -> q5_0 (6), which kvlm parses but has no kernels for. q5_0 rows
        # are smaller than the original type's, so the file stays valid GGUF.
        name = gguf_string(b"output.weight")
        i = tiny.index(name) + len(name)
        n_dims = struct.unpack_from("<I", tiny, i)[0]
        type_at = i + 4 + 8 * n_dims
        orig = struct.unpack_from("<I", tiny, type_at)[0]
        assert orig in (0, 1, 8), f"output.weight has type {orig}"
        bad_type = bytearray(tiny)
        struct.pack_into("<I", bad_type, type_at, 6)
        cls.bad_type = os.path.join(d, "bad-type.gguf")
        open(cls.bad_type, "wb").write(bad_type)
        cls.not_gguf = os.path.join(d, "not-a-model.gguf")
        open(cls.not_gguf, "wb").write(b"this is not a GGUF file at all\n" * 4)
        cls.truncated = os.path.join(d, "truncated.gguf")
        open(cls.truncated, "wb").write(tiny[: len(tiny) // 2])

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

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
            (["generate", "-m", self.bad_type, "-p", "x"], (1,), "q5_0"),
            (["inspect", "-m", self.bad_arch], (1,), "mamba"),
            (["generate", "-m", TINY, "-c", "4", "-p", "one two three four five six seven"], (1,), "context"),
            (gen + ["-m", TINY, "--temp", "-1"], (2,), "temp"),
            (gen + ["-m", TINY, "--top-p", "1.5"], (2,), "top-p"),
            (gen + ["-m", TINY, "--min-p", "-0.1"], (2,), "min-p"),
            (gen + ["-m", TINY, "-t", "0"], (2,), "threads"),
            (gen + ["-m", TINY, "-c", "0"], (2,), "ctx"),
            (["generate", "-m", TINY, "-p", "x", "-n", "abc"], (2,), "abc"),
            (gen + ["-m", TINY, "--bogus-flag"], (2,), "bogus"),
            (gen + ["-m", TINY, "-ctk", "q9_9"], (1, 2), "q9_9"),
            (["generate", "-m", TINY], (2,), "prompt"),
            (["generate", "-m", TINY, "-p", ""], (1,), "empty"),
            (["frobnicate"], (2,), "frobnicate"),
        ]
        for args, codes, needle in cases:
            with self.subTest(args=args):
                self.check(args, codes, needle)


class RealRuns(unittest.TestCase):
    def test_generate_default_model_stats(self):
        rc, out, err = run("generate", "-p", "The capital of France is", "-n", "12", "--temp", "0")
        self.assertEqual(rc, 0, err)
        self.assertTrue(out.startswith("The capital of France is"))
        self.assertGreater(len(out), len("The capital of France is") + 2)
        for needle in ("prompt tokens:", "generated tokens: 12", "prefill:", "decode:",
                       "kv cache:         on", "allocated"):
            self.assertIn(needle, err)

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
        rc, out, err = run("tokenize", "-p", "Hello world")
        self.assertEqual(rc, 0, err)
        self.assertIn("'Hello'", out)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
