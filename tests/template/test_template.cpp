// Unit tests of kvlm's Jinja interpreter: constructs one at a time (expected texts are what
// jinja2 3.1.6 renders for them with trim_blocks and lstrip_blocks, as HF's environment does),
// errors that must name the line, and hostile templates that must fail cleanly, never crash or
// hang.

#include <gtest/gtest.h>

#include <string>

#include "base/error.h"
#include "template/chat_template.h"
#include "template/template.h"

namespace kvlm::tmpl {
namespace {

std::string render(const std::string& src, const Limits& limits = {}) {
  return Template::parse(src, {}, limits).render(Value::make_dict());
}

// The error message of rendering src ("" if it renders).
std::string error_of(const std::string& src, const Limits& limits = {}) {
  try {
    render(src, limits);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

struct Case {
  const char* src;
  const char* want;
};

const Case kCases[] = {
    {"{{ 'a' ~ 1 ~ none ~ true }}",
     "a1NoneTrue"},
    {"{{ [1, 'x', none, 1.5, {'k': [true]}] }}",
     "[1, 'x', None, 1.5, {'k': [True]}]"},
    {"{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 1 + 1.0 }}",
     "3 -4 2 3.5 1024 2.0"},
    {"{{ 'héllo wörld'[1:4] }}|{{ 'abc'[::-1] }}|{{ [1,2,3,4,5][::2] }}|{{ [1,2,3][-1] }}|{{ 'abc'[5] }}",
     "éll|cba|[1, 3, 5]|3|"},
    {"{% for x in [1,2,3] %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.first }}{{ loop.last }}{{ loop.length }};{% endfor %}",
     "103TrueFalse3;212FalseFalse3;321FalseTrue3;"},
    {"{% for x in [1,2,3,4] if x is even %}{{ x }}{{ loop.index }},{% else %}none{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}",
     "21,42,|empty"},
    {"{% set ns = namespace(n=0) %}{% for x in range(5) %}{% set ns.n = ns.n + x %}{% set local = x %}{% endfor %}{{ ns.n }}{{ local is defined }}",
     "10False"},
    {"{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Bob') }} {{ greet('Al', punct='?') }}",
     "Hi Bob! Hi Al?"},
    {"{% set x %}  block {{ 1 + 2 }}{% endset %}[{{ x }}]",
     "[  block 3]"},
    {"{{ '  padded  ' | trim }}|{{ 'a,b,,c'.split(',') }}|{{ ' a  b '.split() }}|{{ 'xxhixx'.strip('x') }}|{{ 'Hello'.startswith('He') }}|{{ 'hello world'.title() }}|{{ 'hello-world x' | title }}",
     "padded|['a', 'b', '', 'c']|['a', 'b']|hi|True|Hello World|Hello-World X"},
    {"{{ {'b': 1, 'a': [1, 'é']} | tojson }}|{{ {'a': {'b': 2}} | tojson(indent=2) }}|{{ 'x\"y\\n' | tojson }}",
     "{\"b\": 1, \"a\": [1, \"é\"]}|{\n  \"a\": {\n    \"b\": 2\n  }\n}|\"x\\\"y\\n\""},
    {"{{ {'k': 'é世🌍'} | tojson(ensure_ascii=true) }}|{{ 'é' | tojson(ensure_ascii=false) }}|{{ '\x7f' | tojson(ensure_ascii=true) }}",
     "{\"k\": \"\\u00e9\\u4e16\\ud83c\\udf0d\"}|\"é\"|\"\\u007f\""},
    {"{{ undefined_thing }}|{{ undefined_thing is defined }}|{{ undefined_thing | default('dflt') }}|{{ '' | default('e', true) }}|{{ none is none }}|{{ 3 is number }}|{{ 'a' is string }}|{{ {} is mapping }}|{{ [1] is iterable }}",
     "|False|dflt|e|True|True|True|True|True"},
    {"{{ [{'a': 1, 'b': 'x'}, {'a': 2}, {'a': 3, 'b': 'y'}] | selectattr('b', 'defined') | map(attribute='a') | list }}|{{ [{'r': 'u'}, {'r': 's'}] | rejectattr('r', 'equalto', 's') | list | length }}",
     "[1, 3]|1"},
    {"{{ 'a' in 'cat' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 'z' not in 'cat' }} {{ 1 < 2 < 3 }} {{ not false and (true or false) }}",
     "True True True True True True"},
    {"{{ 'yes' if 1 > 2 else 'no' }}|{{ 'x' if false }}|{{ {'a': 1}.get('a') }}{{ {'a': 1}.get('b', 'd') }}{{ {'a': 1}.get('b') }}",
     "no||1dNone"},
    {"{%- for k, v in {'x': 1, 'y': 2}.items() -%}\n  {{ k }}={{ v }}\n{%- endfor %}",
     "x=1y=2"},
    {"  {% if true %}\n    kept\n  {% endif %}\ntail",
     "    kept\ntail"},
    {"{{ 'Hello {} and {name}'.format('A', name='B') }}|{{ [3, 1, 2] | sort }}|{{ ['b', 'A', 'c'] | sort }}|{{ [1, 2, 3] | join('-') }}|{{ 'abc' | upper }}|{{ 'ABC' | lower }}|{{ 'hello' | capitalize }}|{{ 'aXbXc' | replace('X', '.') }}",
     "Hello A and B|[1, 2, 3]|['A', 'b', 'c']|1-2-3|ABC|abc|Hello|a.b.c"},
    {"{{ [1, 2] | first }}{{ [1, 2] | last }}{{ 'abc' | list }}{{ {'a': 1} | items | list }}{{ '42' | int + 1 }}{{ 3.7 | int }}{{ 1 | string ~ 'x' }}",
     "12['a', 'b', 'c'][('a', 1)]4331x"},
    {"{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 5 %}{% break %}{% endif %}{{ i }}{% endfor %}",
     "0134"},
    {"{{ 1.5e300 }}|{{ 1e16 }}|{{ 123456789.0 }}|{{ 0.0001 }}|{{ 0.00001 }}|{{ -2.5 }}",
     "1.5e+300|1e+16|123456789.0|0.0001|1e-05|-2.5"},
    {"{{ '%s' }}|{{ 'a\tb' }}|{{ \"q'\" }}|{{ ['it\\'s', \"x\"] }}|{{ 1e3 }}|{{ 0.1 + 0.2 }}|{{ 10 / 4 }}",
     "%s|a\tb|q'|[\"it's\", 'x']|1000.0|0.30000000000000004|2.5"},
    {"{#- comment -#}  x  {#- c2 #}\ny",
     "xy"},
    {"{{ 'ab' * 3 }}|{{ [0] * 2 }}|{{ -(3) }}|{{ (1, 2) }}|{{ 'lorem ipsum dolor' | wordcount }}|{{ 'x' | indent(2) }}|{{ 'a\nb\n\nc' | indent(2, first=true) }}",
     "ababab|[0, 0]|-3|(1, 2)|3|x|  a\n  b\n\n  c"},
    {"{{ {'b': 2, 'a': 1} | dictsort }}|{{ [1, 2, 2, 3] | unique | list }}|{{ [1, 5, 3] | max }}|{{ [1, 5, 3] | min }}|{{ [1, 2] | sum }}|{{ '<a>' | escape }}",
     "[('a', 1), ('b', 2)]|[1, 2, 3]|5|1|3|&lt;a&gt;"},
    {"{% macro outer() %}[{{ caller() }}]{% endmacro %}{% call outer() %}inside{% endcall %}",
     "[inside]"},
    {"{% filter upper %}shout {{ 'this' }}{% endfilter %}",
     "SHOUT THIS"},
    {"{{ true == 1 }} {{ 1 == 1.0 }} {{ [1, 'a'] == [1, 'a'] }} {{ none == none }} {{ 'a' < 'b' }}",
     "True True True True True"},
};

TEST(Template, RendersAsJinja2) {
  for (const Case& c : kCases) {
    std::string out;
    try {
      out = render(c.src);
    } catch (const Error& e) {
      ADD_FAILURE() << c.src << "\n  threw " << e.what();
      continue;
    }
    EXPECT_EQ(out, c.want) << c.src;
  }
}

TEST(Template, ContextVariablesAndCallables) {
  Value ctx = Value::make_dict();
  Value msgs = Value::make_list();
  for (const char* role : {"system", "user"}) {
    Value m = Value::make_dict();
    m.dict->set("role", Value::string(role));
    m.dict->set("content", Value::string(std::string(" ") + role + " text "));
    msgs.list->push_back(m);
  }
  ctx.dict->set("messages", msgs);
  ctx.dict->set("twice", Value::callable("twice", [](Interp&, const Args& a) {
                  return Value::string(to_str(a.pos.at(0)) + to_str(a.pos.at(0)));
                }));
  const Template t = Template::parse(
      "{% for m in messages %}<{{ m.role }}>{{ m['content'] | trim }}{% endfor %}"
      "{{ twice('ab') }}{{ messages[0].missing is defined }}");
  EXPECT_EQ(t.render(ctx), "<system>system text<user>user textababFalse");
}

TEST(Template, ErrorsNameTheLine) {
  EXPECT_NE(error_of("line one\n{% if true %}\n{{ raise_exception('bad turn order') }}\n{% endif %}")
                .find("template line 3: raise_exception: bad turn order"),
            std::string::npos);
  EXPECT_NE(error_of("a\nb\n{{ x | frobnicate }}").find("template line 3: unknown filter 'frobnicate'"),
            std::string::npos);
  EXPECT_NE(error_of("\n{% include 'other.j2' %}").find("template line 2: unsupported statement"),
            std::string::npos);
  EXPECT_NE(error_of("{{ missing.attr }}").find("template line 1: 'missing' is undefined"),
            std::string::npos);
  EXPECT_NE(error_of("{% for x in xs %}").find("missing '{% endfor %}'"), std::string::npos);
  EXPECT_NE(error_of("x\n\n{{ 1 +  }}").find("template line 3"), std::string::npos);
  EXPECT_NE(error_of("{{ 'abc }}").find("unterminated string"), std::string::npos);
  EXPECT_NE(error_of("{% set d = {} %}{% set d.x = 1 %}").find("only on a namespace()"),
            std::string::npos);
  EXPECT_NE(error_of("{% set l = [] %}{{ l.append(1) }}").find("immutable sandbox"),
            std::string::npos);
  EXPECT_NE(error_of("{% for x in none %}{% endfor %}").find("not iterable"), std::string::npos);
  EXPECT_NE(error_of("{{ 1 / 0 }}").find("division by zero"), std::string::npos);
  EXPECT_NE(error_of("{% for x in [1] recursive %}{% endfor %}").find("recursive"),
            std::string::npos);
}

// ---- hostile templates: each must end with a kvlm::Error, quickly ------------------------------

TEST(TemplateHostile, DeepNestingIsRefused) {
  EXPECT_NE(error_of("{{ " + std::string(100000, '(') + "1" + std::string(100000, ')') + " }}")
                .find("nested more than"),
            std::string::npos);
  std::string ifs;
  for (int k = 0; k < 5000; ++k) ifs += "{% if true %}";
  EXPECT_NE(error_of(ifs).find("nested more than"), std::string::npos);
  EXPECT_NE(error_of("{{ " + std::string(100000, '[') + " }}").find("template line 1"),
            std::string::npos);
  EXPECT_NE(error_of("{{ " + std::string(50000, '-') + "1 }}").find("nested more than"),
            std::string::npos);
  EXPECT_NE(error_of(std::string(50000, '{') + std::string(50000, '}')).find("template line"),
            std::string::npos);
}

TEST(TemplateHostile, UnboundedRecursionIsRefused) {
  EXPECT_NE(error_of("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
                .find("macro calls nested more than"),
            std::string::npos);
}

TEST(TemplateHostile, LongLoopsStopAtTheStepLimit) {
  Limits l;
  l.max_steps = 200000;
  EXPECT_NE(error_of("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", l)
                .find("steps"),
            std::string::npos);
  EXPECT_NE(error_of("{% for i in range(1000000000000) %}{% endfor %}", l).find("steps"),
            std::string::npos);
}

TEST(TemplateHostile, HugeOutputAndValuesAreRefused) {
  Limits l;
  l.max_output = 1 << 20;
  EXPECT_NE(error_of("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", l)
                .find("output passed"),
            std::string::npos);
  EXPECT_NE(error_of("{{ 'x' * 100000000000 }}", l).find("grew past"), std::string::npos);
  EXPECT_NE(error_of("{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                     "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", l)
                .find("grew past"),
            std::string::npos);
  EXPECT_NE(error_of("{{ [1] * 100000000000 }}", l).find("grew past"), std::string::npos);
}

TEST(TemplateHostile, GarbageNeverCrashes) {
  // Truncations of a real-looking template at every byte: each parses or fails with an Error.
  const std::string src =
      "{%- set ns = namespace(first=true) -%}{% for m in messages if m.role != 'x' %}"
      "{{- '<|' ~ m['role'] ~ '|>' + (m.content | trim)[::-1] -}}{#- c -#}"
      "{% if loop.last and add_generation_prompt %}{{ bos_token }}{% endif %}{% endfor %}";
  for (size_t n = 0; n <= src.size(); ++n) {
    try {
      render(src.substr(0, n));
    } catch (const Error&) {
    }
  }
}

TEST(ChatTemplate, RendersWithTokensAndDate) {
  ChatEnv env{"<s>", "</s>", 1722000000};  // 2024-07-26 (UTC)
  const ChatTemplate t(
      "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}"
      "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
      "{{ strftime_now('%Y') }}{{ tools is none }}",
      env);
  EXPECT_EQ(t.apply({{"user", "hi"}}, true), "<s>[user]hi</s>[assistant]2024True");
  EXPECT_EQ(t.apply({{"user", "hi"}}, false), "<s>[user]hi</s>2024True");
  EXPECT_EQ(t.check(), "");
}

TEST(ChatTemplate, ErrorsAreOneLineNamingTheTemplate) {
  EXPECT_THROW(ChatTemplate("", {}), Error);
  try {
    ChatTemplate("{% if %}", {});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("chat template: template line 1"), std::string::npos);
  }
  const ChatTemplate strict(
      "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
      "{% endif %}ok",
      {});
  EXPECT_EQ(strict.apply({{"user", "x"}}, true), "ok");
  try {
    strict.apply({{"system", "s"}, {"user", "x"}}, true);
    FAIL();
  } catch (const TemplateRaised& e) {
    EXPECT_EQ(std::string(e.what()),
              "chat template: template line 1: raise_exception: System role not supported");
  }
  // Refusing the system turn is the template's choice: a note, not a failure.
  EXPECT_NE(strict.check().find("refuses a system message"), std::string::npos);
  // A template that cannot render a plain [user] turn fails the check.
  const ChatTemplate broken("{{ messages[0].content.nosuchmethod() }}", {});
  EXPECT_THROW(broken.check(), Error);
  const ChatTemplate undefined_var("{{ messages | frob }}", {});
  EXPECT_THROW(undefined_var.check(), Error);
}

}  // namespace
}  // namespace kvlm::tmpl
