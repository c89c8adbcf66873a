#!/usr/bin/env python3
"""kvlm chat, the KV-cache features of generate (--trace, windows, context shift, dynamic
allocation) end to end. Standard library only. Usage: test_chat.py KVLM_BINARY TEST_DATA_DIR"""
import os
import json
import re
import struct
import subprocess
import sys
import tempfile
import unittest

KVLM = sys.argv[1] if len(sys.argv) > 1 else "build/bin/kvlm"
DATA = sys.argv[2] if len(sys.argv) > 2 else "tests/data"
TINY = os.path.join(DATA, "tiny-llama.gguf")


def run(args, stdin="", timeout=600):
    p = subprocess.run([KVLM, *args], input=stdin.encode(), capture_output=True, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def stats(err):
    """Parses the [stats] lines of chat's stderr into dicts."""
    out = []
    for m in re.finditer(r"\[stats\] turns (\d+) \| cache (\d+) of (\d+) tokens .* tokens reused (\d+), "
                         r"prefilled (\d+) \| evicted (\d+)", err):
        out.append(dict(zip(("turns", "cache", "ctx", "reused", "prefilled", "evicted"), map(int, m.groups()))))
    return out


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 (the session files' checksum), from its specification, standard library only."""
    p1, p2, p3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
    p4, p5, m = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5, (1 << 64) - 1

    def rotl(x, r):
        return ((x << r) | (x >> (64 - r))) & m

    def rnd(acc, lane):
        return (rotl((acc + lane * p2) & m, 31) * p1) & m

    n, i = len(data), 0
    if n >= 32:
        v = [(seed + p1 + p2) & m, (seed + p2) & m, seed, (seed - p1) & m]
        while i + 32 <= n:
            v = [rnd(a, lane) for a, lane in zip(v, struct.unpack_from("<4Q", data, i))]
            i += 32
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & m
        for a in v:
            h = ((h ^ rnd(0, a)) * p1 + p4) & m
    else:
        h = (seed + p5) & m
    h = (h + n) & m
    while i + 8 <= n:
        h = (rotl(h ^ rnd(0, struct.unpack_from("<Q", data, i)[0]), 27) * p1 + p4) & m
        i += 8
    if i + 4 <= n:
        h = (rotl(h ^ ((struct.unpack_from("<I", data, i)[0] * p1) & m), 23) * p2 + p3) & m
        i += 4
    for b in data[i:]:
        h = (rotl(h ^ ((b * p5) & m), 11) * p1) & m
    h = ((h ^ (h >> 33)) * p2) & m
    h = ((h ^ (h >> 29)) * p3) & m
    return h ^ (h >> 32)


def with_meta(session: bytes, meta: bytes) -> bytes:
    """The session file with its metadata replaced and the checksum recomputed (layout:
    src/engine/session_file.cpp; the metadata length is the u64 at byte 48)."""
    body = session[:-8]
    assert struct.unpack("<Q", session[-8:])[0] == xxh64(body), "xxh64 disagrees with kvlm"
    (meta_len,) = struct.unpack_from("<Q", body, 48)
    body = body[:48] + struct.pack("<Q", len(meta)) + meta + body[56 + meta_len:]
    return body + struct.pack("<Q", xxh64(body))


class Chat(unittest.TestCase):
    def test_turns_reuse_the_cache(self):
        rc, out, err = run(["chat", "--temp", "0", "-n", "12"],
                           "Name a colour.\n/stats\nName another one.\n/stats\nAnd a third?\n/stats\n/quit\n")
        self.assertEqual(rc, 0, err)
        s = stats(err)
        self.assertEqual([x["turns"] for x in s[:3]], [1, 2, 3])
        # Turn 2 and 3 reuse everything the cache held: only the new message is prefilled.
        self.assertEqual(s[1]["reused"], s[0]["cache"])
        self.assertEqual(s[2]["reused"] - s[1]["reused"], s[1]["cache"])
        self.assertLess(s[2]["prefilled"] - s[1]["prefilled"], 30)
        self.assertIn("[turn 3: prefilled", err)

    def test_save_and_load(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s.kvs")
            rc, _, err = run(["chat", "--temp", "0", "-n", "8"], f"Hello!\n/save {path}\n/quit\n")
            self.assertEqual(rc, 0, err)
            saved = stats(err)[-1]["cache"]
            rc, _, err = run(["chat", "--temp", "0", "-n", "8"], f"/load {path}\n/stats\n/quit\n")
            self.assertEqual(rc, 0, err)
            self.assertIn(f"[loaded {saved} tokens, 2 messages]", err)  # user + assistant
            # A different cache type, a corrupt file, a missing file: clear errors, chat goes on.
            rc, _, err = run(["chat", "-ctk", "q8_0"], f"/load {path}\n/quit\n")
            self.assertEqual(rc, 0, err)
            self.assertIn("cache shape or types differ", err)
            data = bytearray(open(path, "rb").read())
            data[len(data) // 2] ^= 0xFF
            bad = os.path.join(d, "bad.kvs")
            open(bad, "wb").write(data)
            rc, _, err = run(["chat"], f"/load {bad}\n/load {d}/missing.kvs\n/load {DATA}/tiny-llama.gguf\n/quit\n")
            self.assertEqual(rc, 0, err)
            self.assertIn("checksum mismatch", err)
            self.assertIn("cannot open session file", err)
            self.assertIn("not a kvlm session file", err)
            # (Another model's session: tests/model/test_model.cpp, Session.SaveLoad.)

    def test_refused_load_leaves_the_conversation_as_it_was(self):
        # Checksum-valid files whose metadata kvlm did not write, and paths that are no files:
        # each is one error line, and the conversation (cache and messages) goes on untouched.
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s.kvs")
            rc, _, err = run(["chat", "--temp", "0", "-n", "8"], f"Hello!\n/save {path}\n/quit\n")
            self.assertEqual(rc, 0, err)
            saved = open(path, "rb").read()
            metas = [
                b"not json", b"[1, 2]", b"{}", json.dumps({"messages": "hi"}).encode(),
                json.dumps({"messages": [["user", "hi"]]}).encode(),
                json.dumps({"messages": [{"role": 1, "content": "hi"}]}).encode(),
                json.dumps({"messages": [{"role": "user"}]}).encode(),
                json.dumps({"messages": [{"role": "user", "content": ["hi"]}]}).encode(),
                json.dumps({"messages": [], "held_text": 5}).encode(),
                b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            ]
            bad = []
            for k, meta in enumerate(metas):
                bad.append(os.path.join(d, f"bad{k}.kvs"))
                open(bad[-1], "wb").write(with_meta(saved, meta))
            # The file's own metadata, rewritten the same way, loads: the rewrite is sound.
            (meta_len,) = struct.unpack_from("<Q", saved, 48)
            good = os.path.join(d, "good.kvs")
            open(good, "wb").write(with_meta(saved, saved[56:56 + meta_len]))
            n_saved = int(re.search(r"\[saved (\d+) tokens", err).group(1))
            not_files = [d, "/dev/zero"]
            loads = "".join(f"/load {p}\n" for p in [*bad, *not_files])
            rc, _, err = run(["chat", "--temp", "0", "-n", "8"],
                             f"Name a colour.\n/stats\n{loads}/stats\nAnother?\n/stats\n"
                             f"/load {good}\n/quit\n")
            self.assertEqual(rc, 0, err)
            errors = [l for l in err.splitlines() if "error:" in l]
            self.assertEqual(len(errors), len(bad) + len(not_files), err)
            for line, p in zip(errors, [*bad, *not_files]):
                self.assertIn(p, line)
            self.assertIn("a directory", errors[-2])
            s = stats(err)
            self.assertEqual(s[1], s[0])  # the cache as it was
            # The next turn reuses the whole cache and renders the same messages: it continues
            # this conversation.
            self.assertEqual(s[2]["turns"], 2)
            self.assertEqual(s[2]["reused"] - s[1]["reused"], s[1]["cache"])
            self.assertIn(f"[loaded {n_saved} tokens, 2 messages]", err)

    def test_context_shift_keeps_chatting(self):
        rc, out, err = run(["chat", "--temp", "0", "-n", "40", "-c", "96"],
                           "Tell me about cats.\nAnd dogs?\nAnd birds?\n/stats\n/quit\n")
        self.assertEqual(rc, 0, err)
        s = stats(err)[0]
        self.assertEqual(s["turns"], 3)
        self.assertGreater(s["evicted"], 0)
        self.assertLessEqual(s["cache"], 96)

    def test_context_shift_on_a_windowed_model_fits_its_keep(self):
        # tiny-llama-swa's layers have a 24-token window: an eviction leaves kept + 23 positions,
        # so a 40-token context keeps 16 of a long system prompt (a note says so) instead of
        # refusing a --keep that was never given; a context below the window turns the shift off.
        with tempfile.TemporaryDirectory() as d:
            tmpl = os.path.join(d, "chatml.jinja")
            with open(tmpl, "w") as f:
                f.write("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                        "<|im_start|>assistant\n{% endif %}")
            base = ["chat", "-m", os.path.join(DATA, "tiny-llama-swa.gguf"), "--chat-template", tmpl,
                    "--temp", "0", "-n", "30"]
            rc, _, err = run([*base, "-c", "40", "--system",
                              "You are a helpful assistant who answers briefly and well."],
                             "hi\nand more\n/stats\n/quit\n")
            self.assertEqual(rc, 0, err)
            self.assertRegex(err, r"the context shift keeps 16 of the system prompt's \d+ tokens")
            s = stats(err)[0]
            self.assertEqual(s["turns"], 2)
            self.assertGreater(s["evicted"], 0)
            rc, _, err = run([*base, "-c", "20"], "/quit\n")
            self.assertEqual(rc, 0, err)
            self.assertIn("no context shift: this model's sliding window of 24 tokens needs a "
                          "context of at least 24, got 20", err)

    def test_threads_above_the_cores_are_clamped(self):
        cores = len(os.sched_getaffinity(0))
        rc, _, err = run(["chat", "-t", "1000"], "/quit\n")
        self.assertEqual(rc, 0, err)
        self.assertIn(f"kvlm: note: -t 1000 is more than the {cores} cores this process may run "
                      f"on; using {cores} threads", err)

    def test_unknown_command(self):
        rc, _, err = run(["chat"], "/frob\n/quit\n")
        self.assertEqual(rc, 0)
        self.assertIn("unknown command '/frob'", err)


class GenerateCache(unittest.TestCase):
    def test_trace(self):
        rc, _, err = run(["generate", "-p", "Hi", "-n", "3", "--temp", "0", "--trace"])
        self.assertEqual(rc, 0, err)
        lines = [l for l in err.splitlines() if "[trace]" in l]
        self.assertEqual(len(lines), 6)  # prefill + 2 decode passes, two lines each
        # What each pass computed, at which positions, as text; then the cache as it stands.
        self.assertRegex(lines[0], r'\[trace\] step 0 positions \[0, (\d+)\) "Hi"$')
        n = int(re.search(r"\[0, (\d+)\)", lines[0]).group(1))
        self.assertRegex(lines[2], rf'\[trace\] step 1 positions \[{n}, {n + 1}\) ".+"$')
        self.assertIn("prefill", lines[1])
        self.assertIn("per layer K [", lines[3])
        self.assertIn("x 30 layers", lines[3])

    def test_trace_shows_what_an_eviction_dropped(self):
        rc, _, err = run(["generate", "-m", TINY, "-p", "the", "-n", "40", "--kv-window", "16",
                          "--kv-sinks", "4", "--kv-evict-chunk", "4", "--seed", "3",
                          "--ignore-eos", "--trace"])
        self.assertEqual(rc, 0, err)
        dropped = re.findall(r"evicted positions \[(\d+), (\d+)\)", err)
        self.assertTrue(dropped, err[-2000:])
        self.assertTrue(all((a, b) == ("4", "8") for a, b in dropped))  # after the 4 sinks

    def test_llama_cpp_spellings(self):
        # -f FILE for the prompt; -ngl and -fa accepted with a one-line note each.
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("Water boils at")
        try:
            a = run(["generate", "-f", f.name, "-n", "4", "--temp", "0", "-ngl", "99", "-fa"])
            b = run(["generate", "-p", "Water boils at", "-n", "4", "--temp", "0"])
            self.assertEqual((a[0], b[0]), (0, 0), a[2])
            self.assertEqual(a[1], b[1])
            self.assertIn("CPU only; -ngl 99 is ignored", a[2])
            self.assertIn("-fa changes nothing", a[2])
            # --chat wraps the file's text as it wraps -p's.
            c1 = run(["generate", "--chat", "-f", f.name, "-n", "4", "--temp", "0"])
            c2 = run(["generate", "--chat", "-p", "Water boils at", "-n", "4", "--temp", "0"])
            self.assertEqual((c1[0], c1[1]), (0, c2[1]), c1[2])
            rc, _, err = run(["generate", "-p", "x", "-f", f.name])
            self.assertEqual(rc, 2)
            self.assertIn("excludes", err)
        finally:
            os.unlink(f.name)
        rc, _, err = run(["generate", "-n", "2"])
        self.assertEqual(rc, 2)
        self.assertIn("-p TEXT or -f FILE", err)
        rc, _, err = run(["generate", "-p", "x", "-fa", "maybe"])
        self.assertEqual(rc, 2)
        self.assertIn("flash-attn", err)

    def test_compare_cache(self):
        rc, out, err = run(["generate", "-m", TINY, "-p", "the cat", "-n", "20", "--seed", "4",
                            "--ignore-eos", "--compare-cache"])
        self.assertEqual(rc, 0, err)
        self.assertIn("texts identical: yes (20 tokens generated each way)", out)
        m = re.search(r"tokens computed +(\d+) +(\d+)", out)
        on, off = int(m.group(1)), int(m.group(2))
        p = on - 19  # the prompt's tokens: the cached run computes them, then one per decode
        self.assertEqual(off, sum(p + i for i in range(20)))  # recomputing the history each step
        self.assertRegex(out, r"forward passes +20 +20")
        rc, _, err = run(["generate", "-p", "x", "--compare-cache", "--no-cache"])
        self.assertEqual(rc, 1)
        self.assertIn("drop --no-cache", err)

    def test_stop_token(self):
        # Greedy SmolLM2 lists colors one per line: the newline (198) ends it after the first.
        args = ["generate", "-p", "List three colors, one per line:", "-n", "60", "--temp", "0"]
        rc, out, err = run(args + ["--stop-token", "198"])
        self.assertEqual(rc, 0, err)
        self.assertIn("(stop: stop token)", err)
        rc2, out2, _ = run(args)
        self.assertGreater(len(out2), len(out))
        self.assertTrue(out2.startswith(out.rstrip("\n")))
        rc, _, err = run(args + ["--stop-token", "9999999"])
        self.assertEqual(rc, 1)
        self.assertIn("--stop-token 9999999 is not in the vocabulary", err)

    def test_json_output(self):
        # --json-schema on SmolLM2: greedy and seeded draws print JSON with the schema's fields
        # and types, and end when the object is whole (stdout is the output alone with --chat).
        schema = {"type": "object", "properties": {
            "name": {"type": "string"}, "age": {"type": "integer"},
            "pet": {"enum": ["cat", "dog", "none"]}}, "required": ["name", "age", "pet"],
            "additionalProperties": False}
        args = ["generate", "--chat", "-p", "Describe a person as JSON.", "-n", "200",
                "--json-schema", json.dumps(schema)]
        for extra in (["--temp", "0"], ["--temp", "1", "--seed", "3"], ["--temp", "1", "--seed", "4"]):
            rc, out, err = run(args + extra)
            self.assertEqual(rc, 0, err)
            if "(stop: length)" in err:
                continue
            self.assertRegex(err, r"\(stop: (grammar complete|end of generation)\)")
            obj = json.loads(out)
            self.assertEqual(sorted(obj), ["age", "name", "pet"], out)
            self.assertIsInstance(obj["name"], str)
            self.assertIsInstance(obj["age"], int)
            self.assertIn(obj["pet"], ("cat", "dog", "none"))
        rc, out, err = run(["generate", "--chat", "-p", "A cat as JSON.", "-n", "200", "--temp", "0",
                            "--json"])
        self.assertEqual(rc, 0, err)
        if "(stop: length)" not in err:
            self.assertIsInstance(json.loads(out), dict)
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            f.write(json.dumps(schema))
            f.flush()
            rc, out, err = run(["generate", "--chat", "-p", "A person as JSON.", "-n", "200",
                                "--temp", "0", "--json-schema-file", f.name])
            self.assertEqual(rc, 0, err)
        # Bad schemas: one line naming the flag (and the keyword); two sources: a usage error.
        for bad, needle in (('{"type": "string", "pattern": "a+"}', "pattern"), ("{", "JSON"),
                            ('[1, 2]', "object")):
            rc, _, err = run(["generate", "-p", "x", "--json-schema", bad])
            self.assertEqual(rc, 1, err)
            lines = [l for l in err.splitlines() if l.strip()]
            self.assertEqual(len(lines), 1, err)
            self.assertIn("--json-schema:", lines[0])
            self.assertIn(needle.lower(), lines[0].lower())
        rc, _, err = run(["generate", "-p", "x", "--json", "--json-schema", "{}"])
        self.assertEqual(rc, 2, err)

    def test_window_runs_past_the_training_context(self):
        # tiny-llama was trained for 128 positions; 600 tokens with a 32 + 4 window.
        rc, _, err = run(["generate", "-m", TINY, "-p", "the", "-n", "600", "--kv-window", "32",
                          "--kv-sinks", "4", "--seed", "3", "--ignore-eos"])
        self.assertEqual(rc, 0, err)
        self.assertIn("generated tokens: 600", err)
        self.assertIn("window 32 + 4 sinks", err)
        m = re.search(r"kv bytes: +\S+ \S+ used, (\S+ \S+) allocated", err)
        self.assertEqual(m.group(1), "12.00 KiB")  # 36 tokens in 3 blocks of 16 x 256 bytes: bounded

    def test_dynamic_allocation_allocates_less(self):
        base = ["generate", "-p", "Hi", "-n", "4", "--temp", "0"]
        _, _, static_err = run(base)
        rc, _, dyn_err = run(base + ["--kv-alloc", "dynamic"])
        self.assertEqual(rc, 0, dyn_err)
        self.assertIn("90.00 MiB allocated", static_err)   # 4096 x 23,040 bytes
        self.assertIn("5.62 MiB allocated", dyn_err)       # one 256-token chunk

    def test_bad_cache_flags(self):
        cases = [
            (["--kv-window", "0"], 2, "kv-window"),
            (["--kv-alloc", "sometimes"], 2, "sometimes"),
            (["--kv-window", "64", "--keep", "4"], 1, "choose one"),
            (["--kv-window", "64", "-c", "128"], 1, "drop -c"),
            (["--kv-window", "8", "--kv-evict-chunk", "9"], 1, "larger than the window"),
            (["--keep", "5000"], 1, "keep"),
        ]
        for extra, code, needle in cases:
            with self.subTest(extra=extra):
                rc, _, err = run(["generate", "-p", "Hi", "-n", "2"] + extra)
                self.assertEqual(rc, code, err)
                lines = [l for l in err.splitlines() if l.strip()]
                self.assertEqual(len(lines), 1, err)
                self.assertIn(needle.lower(), lines[0].lower())


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
