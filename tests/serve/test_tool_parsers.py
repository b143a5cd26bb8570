"""Tool-call families: final parse, streaming ≡ final parse, llguidance grammars, prompt messages."""

from __future__ import annotations

import json
import random

import pytest
from hearth.serve import tool_parsers
from hearth.serve.tool_parsers import base, generic, hermes, llama3, mistral
from hearth.serve.tool_parsers.base import ContentDelta, ToolCall, ToolCallDelta

from tests.conftest import CHATML, build_tiny_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters: any object
TOOLS = [WEATHER, ADD, PING]

FAMILIES = [hermes, llama3, mistral, generic]
W = ToolCall("get_weather", '{"city": "Paris"}')
A = ToolCall("add", '{"a": 1, "b": 2}')


def calls_of(msg):
    return [(c.name, json.loads(c.arguments)) for c in msg.tool_calls]


# ---- final parse, per family ----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_render_then_parse_roundtrip(family):
    for calls in ([W], [W, A], [ToolCall("ping", "{}")]):
        msg = family.parse(family.render_calls(calls), TOOLS)
        assert msg.content is None
        assert calls_of(msg) == [(c.name, json.loads(c.arguments)) for c in calls]
        assert all(c.id.startswith("call_") and len(c.id) == 29 and c.id[5:].isalnum() for c in msg.tool_calls)


def test_hermes_parse():
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
    assert calls_of(hermes.parse(one, TOOLS)) == [("get_weather", {"city": "Paris"})]
    assert calls_of(hermes.parse(two, TOOLS)) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    msg = hermes.parse("Let me look that up.\n\n" + one, TOOLS)
    assert msg.content == "Let me look that up." and len(msg.tool_calls) == 1
    # Qwen sometimes stops before the closing tag
    assert calls_of(hermes.parse(one[:-len("</tool_call>")], TOOLS)) == [("get_weather", {"city": "Paris"})]
    # unicode arguments are kept as characters
    assert hermes.parse(one.replace("Paris", "東京"), TOOLS).tool_calls[0].arguments == '{"city": "東京"}'


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',  # missing brace
    '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',             # unknown tool
    '<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>',                    # arguments not an object
    'Use <tool_call> tags to call tools.',
    'a < b and <tool_ is not a tag',
    '```json\n{"name": "launch_rockets", "arguments": {}}\n```',                         # unknown tool
    '```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\nThen add again.\n```',      # more than a call
    '```python\ncall({"name": "add", "arguments": {"a": 1, "b": 2}})\n```\nDone.',       # code, not a call
    '```python\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```',                     # not a JSON fence
    '```json\n{"name": "John", "age": 31}\n``` and ```json\n{"a": [1, 2]}\n```',
    '{"name": "John", "age": 31} is a JSON object.',                                       # not a tool
    'Sure: {"name": "add", "arguments": {"a": 1, "b": 2}}',                                # bare after text
    '```json\n{"name": "John", "ag',                                                      # a JSON answer cut short
    'Text ``` inline ``` and <b>```</b> ``',
    '{{"a": 1}} and {{"name": "add", "arguments": {}}}',
])
def test_hermes_lookalikes_stay_content(text):
    msg = hermes.parse(text, TOOLS)
    assert msg.tool_calls == [] and msg.content == text


# what Qwen2.5-Coder-1.5B-Instruct writes under tool_choice "auto" (3 of 3 weather prompts): no tags
QWEN_FENCED = '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```'


def test_hermes_fenced_and_bare_calls():
    assert calls_of(hermes.parse(QWEN_FENCED, TOOLS)) == [("get_weather", {"city": "Paris"})]
    assert hermes.parse(QWEN_FENCED, TOOLS).content is None
    msg = hermes.parse("Let me check.\n\n" + QWEN_FENCED + "\n", TOOLS)
    assert msg.content == "Let me check." and calls_of(msg) == [("get_weather", {"city": "Paris"})]
    bare = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    assert calls_of(hermes.parse("\n" + bare, TOOLS)) == [("add", {"a": 1, "b": 2})]
    assert calls_of(hermes.parse(bare + "\n" + bare, TOOLS)) == [("add", {"a": 1, "b": 2})] * 2
    tagged = "```\n" + hermes.render_calls([W, A]) + "\n```"
    assert calls_of(hermes.parse(tagged, TOOLS)) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    two = "```json\n" + bare + "\n" + bare + "\n```"
    assert calls_of(hermes.parse(two, TOOLS)) == [("add", {"a": 1, "b": 2})] * 2
    # a fence the model did not close before its end token still holds a whole call
    assert calls_of(hermes.parse("```json\n" + bare + "\n", TOOLS)) == [("add", {"a": 1, "b": 2})]
    # Qwen's template shows {{"name": ...}} (doubled braces) and the 1.5B copies them: `hearth agent run
    # "What is 1234 * 5678?" --tools calculator` got this back as its final answer
    doubled = '{{"name": "add", "arguments": {"a": 1, "b": 2}}}'
    for text in (doubled, "```json\n" + doubled + "\n```", "{ {" + bare[1:] + " }\n\n" + doubled, doubled[:-1]):
        msg = hermes.parse(text, TOOLS)
        assert msg.content is None and calls_of(msg) == [("add", {"a": 1, "b": 2})] * (2 if "\n\n" in text else 1)


@pytest.mark.parametrize("cut", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tok',
    '<tool_call>\n{"na',
    "<tool_call>",
    '```json\n{\n  "name": "get_weather",\n  "argu',
    '```json\n{"name": "get_',
    '```json\n{{"name": "add", "arguments": {"a"',
])
def test_hermes_call_cut_at_max_tokens_is_dropped(cut):
    # a forced call cut by max_tokens: the complete calls stay, the fragment never reaches content
    full = hermes.render_calls([W, A]) + "\n"
    assert hermes.parse(cut, TOOLS) == base.ParsedMessage("", [])
    msg = hermes.parse(full + cut, TOOLS)
    assert msg.content is None and calls_of(msg) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    msg = hermes.parse("Checking.\n" + cut, TOOLS)
    assert msg.content == "Checking.\n" and msg.tool_calls == []
    # a bare call is read only at the start of a reply, so only there is it cut
    for bare in ('{"name": "add", "arguments": {"a": 1', '{{"name": "add", "arguments": {"a": 1'):
        assert hermes.parse(bare, TOOLS) == base.ParsedMessage("", [])


def test_llama3_parse():
    one = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert calls_of(llama3.parse(one, TOOLS)) == [("get_weather", {"city": "Paris"})]
    assert calls_of(llama3.parse("<|python_tag|>" + one, TOOLS)) == [("get_weather", {"city": "Paris"})]
    both = one + '; {"name": "add", "arguments": {"a": 1, "b": 2}}'
    assert calls_of(llama3.parse(both, TOOLS)) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    # arguments double-encoded as a JSON string are decoded
    enc = '{"name": "add", "parameters": "{\\"a\\": 1, \\"b\\": 2}"}'
    assert calls_of(llama3.parse(enc, TOOLS)) == [("add", {"a": 1, "b": 2})]
    # text after the calls is content
    msg = llama3.parse(one + "\nDone.", TOOLS)
    assert msg.content == "Done." and len(msg.tool_calls) == 1


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "parameters": {"city": "Paris"}',   # unterminated
    '{"name": "rm_rf", "parameters": {}}',                       # unknown tool
    '{"city": "Paris"}',                                         # JSON, but no call
    'Sure: {"name": "get_weather", "parameters": {"city": "Paris"}}',  # calls must open the reply
    '<|python_tag|>print("hi")',
    '',
])
def test_llama3_lookalikes_stay_content(text):
    msg = llama3.parse(text, TOOLS)
    assert msg.tool_calls == [] and msg.content == text


def test_mistral_parse():
    arr = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}, "id": "abcdefghi"}]'
    assert calls_of(mistral.parse(arr, TOOLS)) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    new = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[CALL_ID]a1b2c3d4e[ARGS]{"a": 1, "b": 2}'
    assert calls_of(mistral.parse(new, TOOLS)) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    msg = mistral.parse('Checking.[TOOL_CALLS][{"name": "ping", "arguments": {}}]', TOOLS)
    assert msg.content == "Checking." and calls_of(msg) == [("ping", {})]
    # a decoder that skips special tokens drops [TOOL_CALLS]; a reply opening with the array still counts
    assert calls_of(mistral.parse(' [{"name": "ping", "arguments": {}}]', TOOLS)) == [("ping", {})]
    assert calls_of(mistral.parse('add{"a": 1, "b": 2}ping{}', TOOLS)) == [("add", {"a": 1, "b": 2}), ("ping", {})]


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}]',          # bad JSON
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {}}, {"name": "nope", "arguments": {}}]',  # one unknown
    '[TOOL_CALLS]nope[ARGS]{"x": 1}',
    '[TOOL_CALLS] is the marker Mistral uses',
    '[TOOL_CA',
    '[1] Introduction',
    '[{"name": "nope", "arguments": {}}]',
    'Text then [{"name": "ping", "arguments": {}}]',
    'ping me {"when": "later"}',
    'pin{}',
    'ping{"x": 1',
])
def test_mistral_lookalikes_stay_content(text):
    msg = mistral.parse(text, TOOLS)
    assert msg.tool_calls == [] and msg.content == text


def test_generic_parse():
    wrapped = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]}'
    assert calls_of(generic.parse(wrapped, TOOLS)) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert calls_of(generic.parse("  " + bare, TOOLS)) == [("get_weather", {"city": "Paris"})]
    fenced = "I'll check the weather.\n```json\n" + wrapped + "\n```\n"
    msg = generic.parse(fenced, TOOLS)
    assert msg.content == "I'll check the weather." and len(msg.tool_calls) == 2
    # OpenAI-shaped items are understood too
    openai_shape = '{"tool_calls": [{"type": "function", "function": {"name": "ping", "arguments": "{}"}}]}'
    assert calls_of(generic.parse(openai_shape, TOOLS)) == [("ping", {})]


@pytest.mark.parametrize("text", [
    '{"answer": 42}',
    '{"tool_calls": []}',
    '{"tool_calls": [{"name": "unknown_fn", "arguments": {}}]}',
    '{"name": "get_weather", "arguments": {"city": "Paris"}',
    'Here is code:\n```python\nprint({"name": "add"})\n```\nand ```json\n{"x": 1}\n``` done',
    'The call would be {"name": "ping", "arguments": {}} but I will not.',
    '```json\n{"name": "add", "arguments": {"a": 1, "b": 2}} trailing\n```',
])
def test_generic_lookalikes_stay_content(text):
    msg = generic.parse(text, TOOLS)
    assert msg.tool_calls == [] and msg.content == text


def test_plain_text_is_unchanged_for_every_family():
    text = "  Hello!\n\nThe answer is 42.  \n"
    for family in FAMILIES:
        assert family.parse(text, TOOLS) == base.ParsedMessage(text, [])


# ---- streaming ≡ final parse ----------------------------------------------------------------------

STREAM_TEXTS = {
    hermes: ['Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "days": 3}}\n</tool_call>\n'
             '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
             '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call> then <tool_call>\n{"name": "ping", "arguments": {}}',
             'no calls <tool but < and <tool_call>{broken</tool_call> here  \n',
             QWEN_FENCED + '\n\nDone.', '  {"name": "ping", "arguments": {}}{"name": "ping", "arguments": {}} ok',
             '{"name": "John"} ```python\nx = "<tool_call>"\n``` and ```json\n{"name": "ping", "arguments": {}}\n```',
             '```json\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n```  ```\n{"a": 1}```',
             hermes.render_calls([W]) + '\n<tool_call>\n{"name": "add", "arguments": {"a": 1', '``', '```json\n{"na',
             '{{"name": "ping", "arguments": {}}}\n{ {"name": "add", "arguments": {"a": 1, "b": 2}} } done', '{{"a": 1}}'],
    llama3: ['<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "add", "parameters": {"a": 1, "b": 2}}',
             '  {"name": "ping", "parameters": {}}\n{"name": "ping", "parameters": {}} and then text',
             '{"not": "a call"} text', '<|python_', '{"name": "add", "parameters": {"a": 1'],
    mistral: ['Sure [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "ping", "arguments": {}}] ok',
              '[TOOL_CALLS]add[CALL_ID]123456789[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]ping[ARGS]{}',
              '[TOOL_CALLS]nope[ARGS]{} [TOOL_CALLS]x y [TOOL_CALLS]', '[TOOL_CALLS][{"name": "add"',
              '\n[ {"name": "ping", "arguments": {}}] [TOOL_CALLS][{"name": "ping", "arguments": {}}]', '[ {"nam',
              'add{"a": 1, "b": 2}ping{} and text', 'pi', 'ping{}x{}'],
    generic: ['```json\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}\n```',
              '{"name": "add", "arguments": {"a": 1, "b": 2}}',
              'Text ``` inline ``` and\n```py\nx = {"name": "ping"}\n```\n```json\n{"name": "ping", "arguments": {}}\n``` end',
              '```json\n{"name": "ping", "arguments": {}}', '{"a": 1} ` `` ```'],
}


def _stream(family, text, rng):
    parser, out, i = family.StreamParser(TOOLS), [], 0
    while i < len(text):
        k = rng.randint(1, 7)
        out += parser.feed(text[i:i + k])
        i += k
    return out + parser.finish()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
@pytest.mark.parametrize("seed", range(8))
def test_stream_equals_final_parse(family, seed):
    rng = random.Random(seed)
    for text in STREAM_TEXTS[family] + [family.render_calls([W, A]), "plain reply  "]:
        deltas = _stream(family, text, rng)
        final = family.parse(text, TOOLS)
        streamed = base.assemble(deltas)
        assert streamed.content == final.content, text
        assert [(c.name, c.arguments) for c in streamed.tool_calls] == [(c.name, c.arguments) for c in final.tool_calls]
        seen = set()
        for d in deltas:  # the id/name delta of each call comes before its arguments
            if isinstance(d, ToolCallDelta):
                if d.index not in seen:
                    assert d.id and d.name and d.arguments == ""
                    seen.add(d.index)
                else:
                    assert d.id is None and d.name is None
        assert seen == set(range(len(final.tool_calls)))


def test_stream_emits_content_early():
    p = hermes.StreamParser(TOOLS)
    assert p.feed("Hello wor") == [ContentDelta("Hello wor")]
    assert p.feed("ld <tool_") == [ContentDelta("ld")]  # "<tool_" may start a call; the space waits too
    assert p.feed("box> x") == [ContentDelta(" <tool_box> x")]
    assert p.feed("\n<tool_call>\n{\"name\": \"ping\", \"arguments\": {}}") == []
    out = p.feed("\n</tool_call>")
    assert [type(d) for d in out] == [ToolCallDelta, ToolCallDelta] and out[0].name == "ping"
    assert p.finish() == []


# ---- grammars -------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tool-tok"))


@pytest.fixture(scope="module")
def lltok(hf_tok):
    import llguidance.hf
    return llguidance.hf.from_tokenizer(hf_tok)


@pytest.fixture(scope="module")
def special_tok(tmp_path_factory):
    """Markers as single added tokens: non-special like Qwen's <tool_call>, special like Mistral's."""
    import llguidance.hf
    tok = build_tiny_tokenizer(tmp_path_factory.mktemp("tool-tok-special"))
    tok.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=False)
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]", "[ARGS]"]})
    return tok, llguidance.hf.from_tokenizer(tok)


def _matcher(lltok, grammar):
    from llguidance import LLMatcher
    lark = LLMatcher.grammar_from_lark(grammar)
    assert LLMatcher.validate_grammar(lark, lltok) == "", grammar
    m = LLMatcher(lltok, lark, log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def accepts(lltok, grammar, text=None, tokens=None):
    m = _matcher(lltok, grammar)
    tokens = lltok.tokenize_str(text) if tokens is None else tokens
    return m.consume_tokens(tokens) and m.is_accepting()


def render(family, *calls):
    return family.render_calls([ToolCall(n, json.dumps(a)) for n, a in calls])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_grammar_required(family, lltok):
    g = family.grammar(TOOLS, "required", parallel_tool_calls=True)
    assert accepts(lltok, g, render(family, ("get_weather", {"city": "Paris", "days": 2})))
    assert accepts(lltok, g, render(family, ("ping", {"anything": [1, {"x": None}]})))
    assert accepts(lltok, g, render(family, ("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": -2})))
    assert not accepts(lltok, g, render(family, ("launch", {"city": "Paris"})))        # unknown name
    assert not accepts(lltok, g, render(family, ("get_weather", {"city": 3})))          # string required
    assert not accepts(lltok, g, render(family, ("add", {"a": "1", "b": 2})))           # integer required
    assert not accepts(lltok, g, render(family, ("add", {"a": 1})))                     # missing required
    assert not accepts(lltok, g, render(family, ("add", {"a": 1, "b": 2, "c": 3})))     # additionalProperties
    assert not accepts(lltok, g, "Sure, here you go.")                                   # no free text
    spaced = render(family, ("add", {"a": 1, "b": 2})).replace('{"a": 1', '{"a":  1')
    assert not accepts(lltok, g, spaced)                                                 # compact JSON only


@pytest.mark.parametrize("family", FAMILIES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_grammar_arguments_take_only_declared_keys(family, lltok):
    # a small model copies the schema into the arguments when undeclared keys are allowed
    nested = {"type": "function", "function": {"name": "book", "parameters": {"type": "object", "properties": {
        "input": {"type": "integer"}, "room": {"type": "object", "properties": {"beds": {"type": "integer"}}},
        "extra": {"type": "object", "properties": {}, "additionalProperties": True}}, "required": ["input"]}}}
    g = family.grammar([WEATHER, nested], "required", parallel_tool_calls=False)
    assert accepts(lltok, g, render(family, ("get_weather", {"city": "Paris", "days": 2})))
    assert not accepts(lltok, g, render(family, ("get_weather", {"city": "Paris", "type": "string"})))
    assert accepts(lltok, g, render(family, ("book", {"input": 3, "room": {"beds": 2}, "extra": {"any": 1}})))
    assert not accepts(lltok, g, render(family, ("book", {"input": 3, "type": "integer"})))
    assert not accepts(lltok, g, render(family, ("book", {"input": 3, "room": {"beds": 2, "type": "integer"}})))
    # a tool without parameters still takes any object
    assert accepts(lltok, family.grammar([PING], "required", False), render(family, ("ping", {"x": 1})))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_grammar_named_and_single(family, lltok):
    g = family.grammar(TOOLS, "add", parallel_tool_calls=False)
    one = render(family, ("add", {"a": 1, "b": 2}))
    assert accepts(lltok, g, one)
    assert not accepts(lltok, g, render(family, ("get_weather", {"city": "Paris"})))
    assert not accepts(lltok, g, render(family, ("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})))
    # the OpenAI dict form names the same tool
    assert family.grammar(TOOLS, {"type": "function", "function": {"name": "add"}}, False) == g
    # a single call ends the grammar: only EOS may follow
    m = _matcher(lltok, g)
    assert m.consume_tokens(lltok.tokenize_str(one)) and m.is_stopped() and not m.is_error()
    par = family.grammar(TOOLS, "add", parallel_tool_calls=True)
    assert accepts(lltok, par, render(family, ("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})))
    assert not accepts(lltok, par, render(family, ("add", {"a": 1, "b": 2}), ("ping", {})))



def test_hermes_grammar_lets_the_turn_end_after_any_call(lltok):
    # Qwen writes "\n" after </tool_call> and then its end token; when that "\n" could only open another
    # call, a forced call ran on (Paris, London, Tokyo...) until max_tokens cut it
    one = render(hermes, ("get_weather", {"city": "Paris"}))
    for parallel in (True, False):
        g = hermes.grammar(TOOLS, "required", parallel_tool_calls=parallel)
        assert accepts(lltok, g, one)
        assert accepts(lltok, g, one + "\n") == parallel
    g = hermes.grammar(TOOLS, "required", parallel_tool_calls=True)
    assert accepts(lltok, g, one + "\n" + one + "\n")
    assert not accepts(lltok, g, one + "\n\n")

def test_grammar_rejects_bad_choice():
    for family in FAMILIES:
        with pytest.raises(ValueError, match="not one of the tools"):
            family.grammar(TOOLS, "nope", True)
        with pytest.raises(ValueError, match="needs no grammar"):
            family.grammar(TOOLS, "auto", True)
        with pytest.raises(ValueError, match="non-empty tools"):
            family.grammar([], "required", True)


def test_grammar_with_special_marker_tokens(special_tok):
    tok, lt = special_tok
    ids = tool_parsers.special_ids(hermes, lt)
    assert set(ids) == {"<tool_call>", "</tool_call>"}
    g = hermes.grammar(TOOLS, "required", True, special_ids=ids)
    assert "<[" in g
    text = render(hermes, ("add", {"a": 1, "b": 2}))
    tokens = tok.encode(text, add_special_tokens=False)
    assert tokens[0] == ids["<tool_call>"] and tokens[-1] == ids["</tool_call>"]
    assert accepts(lt, g, tokens=tokens)  # markers as single tokens
    # llguidance never matches an added token against a string literal, even a non-special one
    assert not accepts(lt, hermes.grammar(TOOLS, "required", True), tokens=tok.encode(text, add_special_tokens=False))

    mids = tool_parsers.special_ids(mistral, lt)
    assert set(mids) == {"[TOOL_CALLS]", "[ARGS]"}
    new_style = mistral.grammar(TOOLS, "required", True, special_ids=mids)
    text = '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]ping[ARGS]{}'
    assert accepts(lt, new_style, tokens=tok.encode(text, add_special_tokens=False))
    assert calls_of(mistral.parse(text, TOOLS)) == [("add", {"a": 1, "b": 2}), ("ping", {})]
    old_style = mistral.grammar(TOOLS, "required", True, special_ids={"[TOOL_CALLS]": mids["[TOOL_CALLS]"]})
    text = '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]'
    assert accepts(lt, old_style, tokens=tok.encode(text, add_special_tokens=False))


def test_grammar_schema_features(lltok):
    tool = {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "$defs": {"day": {"type": "string", "enum": ["mon", "tue"]}},
        "properties": {"day": {"$ref": "#/$defs/day"}, "url": {"type": "string", "format": "uri"},
                       "n": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["day"]}}}
    g = generic.grammar([tool], "required", False)
    assert accepts(lltok, g, render(generic, ("book", {"day": "mon", "n": 3})))
    assert not accepts(lltok, g, render(generic, ("book", {"day": "sun"})))
    assert not accepts(lltok, g, render(generic, ("book", {"day": "mon", "n": 10})))


# ---- tools validation, detection, registry --------------------------------------------------------

@pytest.mark.parametrize("tools, message", [
    ({"type": "function"}, "tools must be a list"),
    (["x"], r"tools\[0\] must be an object"),
    ([WEATHER, {"function": {"name": "f"}}], r"tools\[1\].type is required"),
    ([{"type": "retrieval", "function": {"name": "f"}}], r"tools\[0\].type must be 'function'"),
    ([{"type": "function"}], r"tools\[0\].function is required"),
    ([WEATHER, {"type": "function", "function": {"description": "d"}}], r"tools\[1\].function.name is required"),
    ([{"type": "function", "function": {"name": "has space"}}], r"tools\[0\].function.name must match"),
    ([WEATHER, WEATHER], r"tools\[1\].function.name 'get_weather' is used by an earlier tool"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], r"tools\[0\].function.description"),
    ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], r"tools\[0\].function.parameters"),
])
def test_tools_validation(tools, message):
    with pytest.raises(ValueError, match=message):
        base.normalize_tools(tools)


def test_tools_normalized_and_tool_choice():
    assert base.normalize_tools([PING]) == [{"name": "ping", "description": "", "parameters": {"type": "object"}}]
    assert base.normalize_tool_choice(None, TOOLS) == "auto"
    assert base.normalize_tool_choice(None, None) == "none"
    assert base.normalize_tool_choice({"type": "function", "function": {"name": "add"}}, TOOLS)["function"]["name"] == "add"
    with pytest.raises(ValueError, match="not one of the tools"):
        base.normalize_tool_choice({"type": "function", "function": {"name": "x"}}, TOOLS)
    with pytest.raises(ValueError, match="needs a non-empty tools list"):
        base.normalize_tool_choice("required", [])
    with pytest.raises(ValueError, match="tool_choice must be"):
        base.normalize_tool_choice("sometimes", TOOLS)


@pytest.mark.parametrize("template, family", [
    ("{% for tool_call in message.tool_calls %}{{ '<tool_call>\\n' }}{{ tool_call | tojson }}{% endfor %}", "hermes"),
    ("{%- if builtin_tools is defined or tools is not none %}Environment: ipython{% endif %}"
     "{{- '<|python_tag|>' + tool_call.name }}<|eom_id|>", "llama3"),
    ('Respond in the format {"name": function name, "parameters": dictionary}. <|start_header_id|>ipython', "llama3"),
    ("{%- if message.tool_calls %}{{- '[TOOL_CALLS] [' }}{% endif %}", "mistral"),
    (CHATML, "json"),
    (None, "json"),
    ("", "json"),
])
def test_detect_family(template, family):
    assert tool_parsers.detect_family(template) == family


def test_default_chatml_template_is_hermes():
    from hearth.runtime.chat_template import DEFAULT_CHATML_TEMPLATE
    assert tool_parsers.detect_family(DEFAULT_CHATML_TEMPLATE) == "hermes"


def test_get_parser():
    assert tool_parsers.get_parser("json") is generic
    assert set(tool_parsers.FAMILIES) == {"hermes", "llama3", "mistral", "json"}
    with pytest.raises(ValueError, match="supported: hermes, llama3, mistral, json"):
        tool_parsers.get_parser("qwen")
    for module in tool_parsers.FAMILIES.values():
        for attr in ("MARKERS", "parse", "StreamParser", "render_call", "render_calls", "grammar", "prepare_messages"):
            assert hasattr(module, attr), (module.__name__, attr)


# ---- prompt messages ------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris "}, {"type": "text", "text": "and 1+2?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_aaaaaaaaaaaaaaaaaaaaaaaa", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_bbbbbbbbbbbbbbbbbbbbbbbb", "type": "function",
         "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
    {"role": "tool", "tool_call_id": "call_aaaaaaaaaaaaaaaaaaaaaaaa", "content": '{"temp_c": 21}'},
    {"role": "tool", "tool_call_id": "call_bbbbbbbbbbbbbbbbbbbbbbbb", "content": "3"},
]


def test_generic_prepare_messages_renders_with_chatml():
    from hearth.runtime.chat_template import render_chat_template
    msgs = generic.prepare_messages([{"role": "system", "content": "Be brief."}] + CONVERSATION, [WEATHER, ADD], "auto")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert all(isinstance(m["content"], str) and set(m) == {"role", "content"} for m in msgs)
    assert msgs[0]["content"].startswith("Be brief.\n\n") and "get_weather" in msgs[0]["content"]
    assert '"tool_calls"' in msgs[0]["content"]
    assert msgs[1]["content"] == "Weather in Paris and 1+2?"
    assert calls_of(generic.parse(msgs[2]["content"], TOOLS)) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert msgs[3]["content"] == 'Tool result (get_weather): {"temp_c": 21}\nTool result (add): 3'
    text = render_chat_template(CHATML, msgs, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.") and text.endswith("<|im_start|>assistant\n")


def test_generic_system_prompt_modes():
    assert generic.prepare_messages([{"role": "user", "content": "hi"}], None, "none") == [{"role": "user", "content": "hi"}]
    assert generic.system_prompt([WEATHER], "none") == ""
    auto = generic.prepare_messages([{"role": "user", "content": "hi"}], [WEATHER], "auto")
    assert auto[0]["role"] == "system" and "Current weather in a city." in auto[0]["content"]
    assert '{"type":"object","properties":{"city":{"type":"string"}' in auto[0]["content"]
    assert "must call one or more" in generic.system_prompt([WEATHER], "required")
    assert '"name": "get_weather"' in generic.system_prompt([WEATHER], "get_weather")


@pytest.mark.parametrize("family", [hermes, llama3, mistral], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_native_prepare_messages(family):
    msgs = family.prepare_messages(CONVERSATION, [WEATHER, ADD], "auto")
    assert msgs[0]["content"] == "Weather in Paris and 1+2?"
    assert msgs[1]["content"] == "" and msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert CONVERSATION[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # input untouched
    if family is mistral:  # Mistral templates insist on 9-character ids, paired by the same mapping
        assert msgs[1]["tool_calls"][0]["id"] == msgs[2]["tool_call_id"] == "aaaaaaaaa"
    else:
        assert msgs[2]["tool_call_id"] == "call_aaaaaaaaaaaaaaaaaaaaaaaa"


def test_default_template_renders_native_calls():
    from hearth.runtime.chat_template import (
        DEFAULT_CHATML_TEMPLATE,
        render_chat_template,
    )
    msgs = hermes.prepare_messages(CONVERSATION, [WEATHER, ADD], "auto")
    text = render_chat_template(DEFAULT_CHATML_TEMPLATE, msgs, tools=[WEATHER, ADD], add_generation_prompt=True)
    body = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert calls_of(hermes.parse(body, TOOLS)) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
