#!/usr/bin/env python3
"""Tool calls end to end: `kvlm serve` with `tools` and `tool_choice`, through the official
`openai` client, streaming and not.

- SmolLM2 with its own ChatML template (which renders no tools: kvlm gives the model a system
  prompt in Hermes's format): tool_choice "required" and a named function always give a call
  whose arguments parse and validate (the `jsonschema` package); "none" gives none; a whole
  conversation with a call and its result renders; bad tools are 400s naming the field.
- SmolLM2 with Qwen 2.5's template (--chat-template: Hermes's <tool_call> format rendered by the
  template) and the synthetic Llama 3 GGUF (random weights) with Llama 3.1's template (the JSON
  object format): the output is garbage, but a forced call must still parse and validate.

Usage: test_tools.py KVLM_BINARY TEST_DATA_DIR [unittest arguments]
"""
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_server import MODEL, Server, ServerCase  # noqa: E402  (the same server harness)

try:
    import jsonschema
    import openai
except ImportError:
    sys.exit("test_tools.py: `jsonschema` or `openai` is missing; run scripts/setup-python.sh")

REFDATA = os.path.join(os.environ.get("KVLM_REFDATA") or
                       os.path.expanduser("~/.cache/kvlm/refdata"), "llama.cpp-0.3.36")
TEMPLATES = os.path.join(REFDATA, "templates")
SYNTHETIC = os.environ.get("KVLM_SYNTHETIC") or os.path.expanduser("~/.cache/kvlm/synthetic")

WEATHER = {"type": "object", "properties": {
    "location": {"type": "string", "description": "The city"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["location", "unit"], "additionalProperties": False}
# Values a random model ends quickly: no free strings.
COUNTER = {"type": "object", "properties": {
    "step": {"type": "integer"}, "up": {"type": "boolean"},
    "mode": {"enum": ["fast", "slow"]}}, "required": ["step", "up", "mode"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "count", "description": "Move a counter",
                                      "parameters": COUNTER}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def check_call(test, call, names=None):
    """A tool call as OpenAI returns it, whose arguments parse and validate."""
    test.assertTrue(call.id.startswith("call_"), call.id)
    test.assertEqual(call.type, "function")
    test.assertIn(call.function.name, names or SCHEMAS)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def collect_stream(stream):
    """-> (content, [{"id", "name", "arguments"}], finish_reason) from a chat stream's deltas,
    checking OpenAI's order: a call's first delta has id, type, name and "" arguments."""
    content, calls, finish = "", [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        finish = ch.finish_reason or finish
        content += ch.delta.content or ""
        for tc in ch.delta.tool_calls or []:
            if tc.id is not None:
                assert tc.index == len(calls), (tc.index, len(calls))
                assert tc.type == "function" and tc.function.arguments == "", tc
                calls.append({"id": tc.id, "name": tc.function.name, "arguments": ""})
            else:
                assert tc.index == len(calls) - 1, tc
                calls[-1]["arguments"] += tc.function.arguments
    return content, calls, finish


class ToolsChatML(ServerCase):
    """SmolLM2's own template (no tools in it)."""
    ARGS = ("-m", MODEL, "-np", "4", "-c", "2048")

    def chat(self, **kw):
        kw.setdefault("model", self.model)
        kw.setdefault("messages", ASK)
        kw.setdefault("tools", TOOLS)
        kw.setdefault("max_tokens", 120)
        kw.setdefault("temperature", 0)
        return self.client.chat.completions.create(**kw)

    def test_required_gives_a_valid_call(self):
        for seed in range(1, 5):
            r = self.chat(tool_choice="required", temperature=1.0, seed=seed)
            c = r.choices[0]
            if c.finish_reason == "length":
                continue  # cut off before the call closed, as OpenAI may be
            self.assertEqual(c.finish_reason, "tool_calls", c.message)
            self.assertEqual(len(c.message.tool_calls), 1)
            check_call(self, c.message.tool_calls[0])
            self.assertIsNone(c.message.content)

    def test_named_function(self):
        r = self.chat(tool_choice={"type": "function", "function": {"name": "count"}})
        c = r.choices[0]
        self.assertEqual(c.finish_reason, "tool_calls", c.message)
        self.assertEqual(c.message.tool_calls[0].function.name, "count")
        check_call(self, c.message.tool_calls[0], ["count"])

    def test_required_streaming(self):
        stream = self.chat(tool_choice={"type": "function", "function": {"name": "get_weather"}},
                           stream=True)
        content, calls, finish = collect_stream(stream)
        self.assertEqual(finish, "tool_calls")
        self.assertEqual(content, "")
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0]["name"], "get_weather")
        self.assertTrue(calls[0]["id"].startswith("call_"))
        jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)
        # The same greedy request, not streamed, makes the same call.
        r = self.chat(tool_choice={"type": "function", "function": {"name": "get_weather"}})
        self.assertEqual(json.loads(r.choices[0].message.tool_calls[0].function.arguments),
                         json.loads(calls[0]["arguments"]))

    def test_none_makes_no_call(self):
        r = self.chat(tool_choice="none", max_tokens=40)
        c = r.choices[0]
        self.assertIsNone(c.message.tool_calls)
        self.assertIn(c.finish_reason, ("stop", "length"))
        self.assertIsInstance(c.message.content, str)
        # The model is not shown the tools: the prompt is the one without them.
        plain = self.client.chat.completions.create(model=self.model, messages=ASK, max_tokens=1)
        self.assertEqual(r.usage.prompt_tokens, plain.usage.prompt_tokens)

    def test_auto_shows_the_tools(self):
        r = self.chat(max_tokens=60)
        plain = self.client.chat.completions.create(model=self.model, messages=ASK, max_tokens=1)
        self.assertGreater(r.usage.prompt_tokens, plain.usage.prompt_tokens + 50)
        c = r.choices[0]
        if c.message.tool_calls:  # whatever the small model says, it is well formed
            self.assertEqual(c.finish_reason, "tool_calls")
            for call in c.message.tool_calls:
                check_call(self, call)
        else:
            self.assertIn(c.finish_reason, ("stop", "length"))

    def test_auto_streaming_matches_non_streaming(self):
        for choice in ("auto", "required"):
            r = self.chat(tool_choice=choice, max_tokens=80)
            content, calls, finish = collect_stream(self.chat(tool_choice=choice, max_tokens=80,
                                                              stream=True))
            m = r.choices[0].message
            self.assertEqual(finish, r.choices[0].finish_reason, choice)
            self.assertEqual(content, m.content or "", choice)
            self.assertEqual([(c["name"], c["arguments"]) for c in calls],
                             [(c.function.name, c.function.arguments)
                              for c in m.tool_calls or []], choice)

    def test_conversation_with_a_call_and_its_result(self):
        r = self.chat(tool_choice="required", temperature=1.0, seed=3)
        call = r.choices[0].message.tool_calls[0] if r.choices[0].message.tool_calls else None
        if call is None:
            self.skipTest("the call was cut off")
        messages = ASK + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"}]
        r2 = self.chat(messages=messages, tool_choice="none", max_tokens=30)
        self.assertIsInstance(r2.choices[0].message.content, str)
        # The call and the result are in the prompt (written in Hermes's form for ChatML).
        before = self.chat(tool_choice="none", max_tokens=1)
        self.assertGreater(r2.usage.prompt_tokens, before.usage.prompt_tokens + 20)
        r3 = self.chat(messages=messages, max_tokens=30)  # auto: tools shown again
        self.assertGreater(r3.usage.prompt_tokens, r2.usage.prompt_tokens)

    def test_n_choices_each_make_a_call(self):
        r = self.chat(tool_choice="required", temperature=1.0, seed=11, n=3)
        self.assertEqual(len(r.choices), 3)
        for c in r.choices:
            if c.finish_reason == "tool_calls":
                check_call(self, c.message.tool_calls[0])
            else:
                self.assertEqual(c.finish_reason, "length")

    def test_bad_values_name_the_parameter(self):
        for kw, param in [
                ({"tools": [{"type": "function"}]}, "tools[0].function"),
                ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
                 "tools[0].function.name"),
                ({"tool_choice": "sometimes"}, "tool_choice"),
                ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
                 "tool_choice"),
                ({"tools": [{"type": "function", "function": {
                    "name": "f", "parameters": {"type": "object", "properties": {
                        "n": {"type": "integer", "minimum": 1}}}}}], "tool_choice": "required"},
                 "tools"),
                ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
                ({"parallel_tool_calls": "yes"}, "parallel_tool_calls")]:
            with self.assertRaises(openai.BadRequestError) as cm:
                self.chat(**kw)
            self.assertEqual(cm.exception.status_code, 400)
            self.assertEqual(cm.exception.body.get("param"), param, cm.exception.message)


class ToolsQwenTemplate(ServerCase):
    """SmolLM2 with Qwen 2.5's template: the template renders the tools (Hermes's format)."""
    ARGS = ("-m", MODEL, "-np", "2", "-c", "2048", "--chat-template",
            os.path.join(TEMPLATES, "Qwen-Qwen2.5-7B-Instruct.jinja"))

    def test_required_and_streamed(self):
        kw = dict(model=self.model, messages=ASK, tools=TOOLS, max_tokens=120, temperature=0)
        r = self.client.chat.completions.create(tool_choice="required", **kw)
        c = r.choices[0]
        self.assertEqual(c.finish_reason, "tool_calls", c.message)
        check_call(self, c.message.tool_calls[0])
        content, calls, finish = collect_stream(self.client.chat.completions.create(
            tool_choice="required", stream=True, **kw))
        self.assertEqual(finish, "tool_calls")
        self.assertEqual(calls[0]["arguments"], c.message.tool_calls[0].function.arguments)


class ToolsRandomLlama(unittest.TestCase):
    """The synthetic Llama 3 GGUF (random weights) with Llama 3.1's template: a forced call is
    garbage in its values but always parses and validates."""

    @classmethod
    def setUpClass(cls):
        path = os.path.join(SYNTHETIC, "llama3-dims-random-2l.gguf")
        if not os.path.exists(path):
            raise unittest.SkipTest(f"{path} is missing: run make synthetic")
        cls.srv = Server("-m", path, "-np", "4", "-c", "1024", "--chat-template",
                         os.path.join(TEMPLATES, "meta-llama-Llama-3.1-8B-Instruct.jinja"))
        cls.client = cls.srv.client()
        cls.model = cls.srv.model_id()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        assert cls.srv.stop() == 0

    def test_forced_calls_parse_and_validate(self):
        made = 0
        for seed in range(1, 7):
            for stream in (False, True):
                kw = dict(model=self.model, messages=ASK, tools=TOOLS, max_tokens=200,
                          temperature=1.0, seed=seed,
                          tool_choice={"type": "function", "function": {"name": "count"}})
                if stream:
                    content, calls, finish = collect_stream(
                        self.client.chat.completions.create(stream=True, **kw))
                    if finish == "length":
                        continue
                    self.assertEqual(finish, "tool_calls", content)
                    self.assertEqual(calls[0]["name"], "count")
                    jsonschema.validate(json.loads(calls[0]["arguments"]), COUNTER)
                else:
                    c = self.client.chat.completions.create(**kw).choices[0]
                    if c.finish_reason == "length":
                        continue
                    self.assertEqual(c.finish_reason, "tool_calls", c.message)
                    check_call(self, c.message.tool_calls[0], ["count"])
                made += 1
        self.assertGreater(made, 6)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], *sys.argv[3:]], verbosity=2)
