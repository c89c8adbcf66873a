#!/usr/bin/env python3
"""Chat-template goldens for kvlm's Jinja interpreter, rendered by jinja2 (Debian's python3-jinja2).

Renders a fixed set of conversations through every templates/*.jinja of llama.cpp's reference
data (scripts/fetch-refdata.sh unpacks them into ~/.cache/kvlm/refdata/llama.cpp-0.3.36/) in the
environment Hugging Face's apply_chat_template builds:
  - ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the loopcontrols
    extension and a {% generation %} block that renders its body (HF's AssistantTracker);
  - tojson as json.dumps(x, ensure_ascii=False, indent=indent, ...) (HF overrides jinja2's);
  - raise_exception(msg) raising TemplateError, strftime_now(fmt) formatting a fixed date;
  - variables messages, tools=None, documents=None, add_generation_prompt, bos_token, eos_token.
Conversations with tools (OpenAI's request shapes: "tools", assistant "tool_calls" with the
arguments as a JSON string, "tool" messages with "tool_call_id") are rendered as llama.cpp's
server and transformers pass them: tools as the list, each call's arguments parsed into an object,
and firefunction-v2's `functions` (json.dumps(tools, indent=2)) and `datetime` ("%b %d %Y
%H:%M:%S GMT" of the fixed date). The goldens keep the request shapes (arguments as strings).
A rendering that raises is recorded with the exception's type and message: kvlm must raise too.

Writes tests/data/template_goldens.json. Never edit it by hand; rerun:

    python3 tools/gen_template_goldens.py [--templates DIR] [--out tests/data/template_goldens.json]
"""

import argparse
import datetime
import glob
import json
import os

import jinja2
import jinja2.ext
import jinja2.sandbox

BOS = "<s>"
EOS = "</s>"
DATE = datetime.datetime(2024, 7, 26, 9, 30, 0)

SYSTEM = "You are a helpful assistant."
CONVERSATIONS = [
    ("user", [("user", "Hello!")], True),
    ("system_user", [("system", SYSTEM), ("user", "What is 2+2?")], True),
    ("system_user_nogen", [("system", SYSTEM), ("user", "What is 2+2?")], False),
    ("multi_turn", [("system", SYSTEM), ("user", "Hi"), ("assistant", "Hello! How can I help?"),
                    ("user", "Tell me a joke.")], True),
    ("multi_turn_no_system", [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"),
                              ("assistant", "Goodbye."), ("user", "Wait")], True),
    ("ends_with_assistant", [("user", "Hi"), ("assistant", "Hello there.")], False),
    ("unicode_whitespace", [("system", "  Réponds en français.\n"),
                            ("user", "  Héllo 世界 🌍\n\n\ttabs\t and \"quotes\" 'x' {{ not }} {% code %}  "),
                            ("assistant", "\n Ça va ? 😀 \n"), ("user", "\n")], True),
    ("user_user", [("user", "first"), ("user", "second")], True),
]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "City, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["location"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Cherche sur le web — 世界.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query", "limit"]}}},
]


def call(id_, name, arguments):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


WEATHER_CALL = call("call_1", "get_weather", '{"location": "Paris", "unit": "celsius"}')
SEARCH_CALL = call("call_2", "search", '{"query": "kvlm \u00e9t\u00e9", "limit": 3}')
# (name, messages as a request sends them, add_generation_prompt, tools)
TOOL_CONVERSATIONS = [
    ("tools_user", [{"role": "user", "content": "What is the weather in Paris?"}], True, TOOLS),
    ("tools_system_user", [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": "Weather in Paris?"}], True, TOOLS),
    ("tool_call_and_result", [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21.5}'}], True, TOOLS),
    ("two_calls_then_answer", [
        {"role": "user", "content": "Weather in Paris, and search for kvlm."},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL, SEARCH_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21.5 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "3 results"},
        {"role": "assistant", "content": "It is 21.5 C in Paris."},
        {"role": "user", "content": "Thanks!"}], True, TOOLS),
    ("tool_result_no_tools", [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], True, None),
]


def plain(messages):
    return [{"role": r, "content": c} for r, c in messages]


def all_conversations():
    """(name, messages, add_generation_prompt, tools) of every golden conversation."""
    return ([(n, plain(m), g, None) for n, m, g in CONVERSATIONS] +
            [(n, m, g, t) for n, m, g, t in TOOL_CONVERSATIONS])


class Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: renders the body, as HF's AssistantTracker does
    when no assistant mask is asked for."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return DATE.strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def template_messages(messages):
    """The messages as templates see them: each call's arguments an object."""
    out = []
    for m in messages:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [dict(c, function=dict(c["function"], arguments=json.loads(
                c["function"]["arguments"]))) for c in m["tool_calls"]]
        out.append(m)
    return out


def render(env, source, messages, add_generation_prompt, tools):
    extra = {}
    if tools is not None:
        extra = {"functions": json.dumps(tools, ensure_ascii=False, indent=2),
                 "datetime": DATE.strftime("%b %d %Y %H:%M:%S GMT")}
    try:
        tmpl = env.from_string(source)
        text = tmpl.render(messages=template_messages(messages), tools=tools, documents=None,
                           add_generation_prompt=add_generation_prompt, bos_token=BOS,
                           eos_token=EOS, **extra)
        return {"text": text}
    except Exception as e:  # noqa: BLE001 - every failure is a golden: kvlm must fail too
        return {"error": type(e).__name__, "message": str(e)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--templates", default=os.path.expanduser(
        "~/.cache/kvlm/refdata/llama.cpp-0.3.36/templates"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                                  "template_goldens.json"))
    args = ap.parse_args()
    env = make_env()
    templates = {}
    for path in sorted(glob.glob(os.path.join(args.templates, "*.jinja"))):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        templates[os.path.basename(path)] = [render(env, source, m, g, t)
                                             for _, m, g, t in all_conversations()]
    out = {
        "notes": "written by tools/gen_template_goldens.py; do not edit",
        "jinja2": jinja2.__version__,
        "env": {"bos_token": BOS, "eos_token": EOS, "date": DATE.isoformat(),
                "trim_blocks": True, "lstrip_blocks": True, "tools": None, "documents": None},
        # tools as JSON text: this file is written with sorted keys, and a tool's properties
        # must reach the template in the order the request wrote them.
        "conversations": [dict({"name": n, "messages": m, "add_generation_prompt": g},
                               **({"tools": json.dumps(t, ensure_ascii=False)}
                                  if t is not None else {}))
                          for n, m, g, t in all_conversations()],
        "templates": templates,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.write("\n")
    n_err = sum(1 for t in templates.values() for r in t if "error" in r)
    print(f"{len(templates)} templates x {len(all_conversations())} conversations, {n_err} raise; "
          f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
