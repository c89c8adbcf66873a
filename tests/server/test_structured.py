#!/usr/bin/env python3
"""Structured output end to end: `kvlm serve` on SmolLM2 with response_format json_object and
json_schema, through the official `openai` client. Many schemas x seeds at temperature 1: every
answer that ends with finish_reason "stop" parses and validates against its schema (the
`jsonschema` package); one that reaches max_tokens first ("length") may be cut off, as with
OpenAI. Bad schemas are 400s naming the keyword.

Usage: test_structured.py KVLM_BINARY TEST_DATA_DIR [unittest arguments]
"""
import json
import os
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_server import MODEL, ServerCase  # noqa: E402  (the same server harness)

try:
    import jsonschema
    import openai
except ImportError:
    sys.exit("test_structured.py: `jsonschema` or `openai` is missing; run scripts/setup-python.sh")

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}

SCHEMAS = [
    ("Describe a person.", PERSON),
    ("Pick a colour and say how much you like it from 1 to 5.",
     {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                       "score": {"type": "integer"}, "why": {"type": "string"}},
      "required": ["colour", "score"]}),
    ("List a few fruits.",
     {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string"},
                                                  "minItems": 1, "maxItems": 4}},
      "required": ["fruits"], "additionalProperties": False}),
    ("Give a temperature reading.",
     {"type": "object", "properties": {"celsius": {"type": "number"}, "ok": {"type": "boolean"},
                                       "unit": {"const": "C"}, "note": {"type": ["string", "null"]}},
      "required": ["celsius", "ok", "unit", "note"]}),
    ("Describe a pet, which may be a dog or a fish.",
     {"type": "object", "properties": {"pet": {"anyOf": [
         {"$ref": "#/$defs/dog"},
         {"type": "object", "properties": {"fins": {"type": "integer"}}, "required": ["fins"],
          "additionalProperties": False}]}},
      "required": ["pet"], "$defs": {"dog": {"type": "object", "properties": {
          "name": {"type": "string"}, "good": {"type": "boolean"}}, "required": ["name", "good"],
          "additionalProperties": False}}}),
    ("Write a tiny tree of topics.",
     {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
         "topic": {"type": "string"},
         "sub": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
         "required": ["topic", "sub"], "additionalProperties": False}}}),
    ("Give a list of small numbers.",
     {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5}),
    ("Answer yes or no, as JSON.",
     {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
      "required": ["answer"], "title": "Answer", "description": "a verdict"}),
]
SEEDS = range(1, 9)
MAX_TOKENS = 160


def response_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


class Structured(ServerCase):
    ARGS = ("-m", MODEL, "-np", "8", "-c", "2048", "--kv-budget", "16384tok")

    def chat(self, ask, fmt, seed, max_tokens=MAX_TOKENS, **kw):
        return self.client.chat.completions.create(
            model=self.model, temperature=1.0, seed=seed, max_tokens=max_tokens,
            messages=[{"role": "user", "content": ask}], response_format=fmt, **kw)

    def test_schemas_and_seeds_validate(self):
        jobs = [(ask, schema, seed) for ask, schema in SCHEMAS for seed in SEEDS]
        results = [None] * len(jobs)

        def run(i):
            ask, schema, seed = jobs[i]
            try:
                results[i] = self.chat(ask, response_format(schema), seed)
            except Exception as e:  # reported below, on the test's thread
                results[i] = e
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stopped = 0
        for (ask, schema, seed), r in zip(jobs, results):
            self.assertNotIsInstance(r, Exception, f"{ask} seed {seed}: {r!r}")
            choice = r.choices[0]
            text = choice.message.content
            if choice.finish_reason == "length":
                self.assertEqual(r.usage.completion_tokens, MAX_TOKENS)
                continue
            self.assertEqual(choice.finish_reason, "stop", text)
            value = json.loads(text)
            jsonschema.validate(value, schema)
            stopped += 1
        print(f"\n[structured] {stopped}/{len(jobs)} finished with stop and validate",
              file=sys.stderr)
        self.assertGreaterEqual(stopped, len(jobs) // 2)

    def test_json_object(self):
        for seed in SEEDS:
            r = self.chat("Describe the weather as JSON.", {"type": "json_object"}, seed)
            if r.choices[0].finish_reason == "stop":
                self.assertIsInstance(json.loads(r.choices[0].message.content), dict)

    def test_n_choices_each_validate(self):
        # Each choice forks the parent's grammar state with its blocks.
        r = self.chat("Describe a person.", response_format(PERSON), 5, n=3)
        self.assertEqual(len(r.choices), 3)
        for c in r.choices:
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.message.content), PERSON)
            else:
                self.assertEqual(c.finish_reason, "length")

    def test_streaming(self):
        stream = self.chat("Describe a person.", response_format(PERSON), 3, stream=True)
        text, finish = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        if finish == "stop":
            jsonschema.validate(json.loads(text), PERSON)
        else:
            self.assertEqual(finish, "length")

    def test_greedy_completions(self):
        r = self.client.completions.create(
            model=self.model, prompt="A person, as JSON:", temperature=0, max_tokens=MAX_TOKENS,
            extra_body={"response_format": response_format(PERSON)})
        self.assertEqual(r.choices[0].finish_reason, "stop", r.choices[0].text)
        jsonschema.validate(json.loads(r.choices[0].text), PERSON)

    def test_properties_come_in_the_schemas_order(self):
        # Not alphabetical: the request body's key order is kept (OpenAI's strict mode).
        schema = {"type": "object", "properties": {"zeta": {"type": "boolean"},
                                                   "alpha": {"enum": ["a", "b"]},
                                                   "mid": {"type": "integer"}},
                  "required": ["zeta", "alpha", "mid"], "additionalProperties": False}
        finished = 0
        for seed in SEEDS:
            r = self.chat("Fill in the form.", response_format(schema), seed)
            if r.choices[0].finish_reason != "stop":
                continue
            value = json.loads(r.choices[0].message.content)
            self.assertEqual(list(value), ["zeta", "alpha", "mid"])
            finished += 1
        self.assertGreater(finished, 0)

    def test_length_may_cut_the_json(self):
        r = self.chat("Describe a person.", response_format(PERSON), 1, max_tokens=3)
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertEqual(r.usage.completion_tokens, 3)

    def test_bad_schemas_name_the_keyword(self):
        for schema, keyword in [
                ({"type": "string", "pattern": "^a"}, "pattern"),
                ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}},
                 "minimum"),
                ({"oneOf": [{"type": "string"}]}, "oneOf"),
                ({"type": "array", "maxItems": 10 ** 6}, "maxItems"),
                ({"$ref": "https://example.com/s.json"}, "$ref")]:
            with self.assertRaises(openai.BadRequestError) as cm:
                self.chat("hi", response_format(schema), 1)
            self.assertEqual(cm.exception.status_code, 400)
            self.assertIn(f"'{keyword}'", cm.exception.message)
            self.assertEqual(cm.exception.body.get("param"), "response_format")


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], *sys.argv[3:]], verbosity=2)
