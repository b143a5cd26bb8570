"""The OpenAI API as the official client sees it, against the bundled default model (end to end)."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Name three colours."}]


def test_models_lists_chat_and_embedding_models(served):
    ids = {m.id for m in served.client().models.list().data}
    assert {MODEL, "all-minilm-l6-v2"} <= ids
    assert served.client().models.retrieve(MODEL).id == MODEL


def test_stream_equals_non_stream_and_finish_once(served):
    c = served.client()
    full = c.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=40)
    chunks = list(c.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=40,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content and text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    with_choices = [ch for ch in chunks if ch.choices]
    assert with_choices[-1].choices[0].finish_reason is not None  # in the last chunk
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    u = full.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens <= 40


def test_n_choices_seed_and_max_completion_tokens(served):
    c = served.client()
    r = c.chat.completions.create(model=MODEL, messages=HELLO, n=3, temperature=1.0, seed=7,
                                  max_completion_tokens=12)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    again = c.chat.completions.create(model=MODEL, messages=HELLO, n=3, temperature=1.0, seed=7,
                                      max_completion_tokens=12)
    assert [ch.message.content for ch in r.choices] == [ch.message.content for ch in again.choices]
    assert all(ch.finish_reason in ("stop", "length") for ch in r.choices)


def test_stop_string_is_not_in_output(served):
    c = served.client()
    base = c.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=30)
    text = base.choices[0].message.content
    word = text.split()[2] if len(text.split()) > 3 else text[:3]
    r = c.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=30, stop=[word])
    assert word not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_chat_logprobs(served):
    r = served.client().chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8,
                                                logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    joined = "".join(t.token for t in content)
    assert joined.startswith(r.choices[0].message.content[:5])
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4  # greedy picks the top token
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_completions_prompt_forms(served):
    c = served.client()
    one = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert one.object == "text_completion" and one.choices[0].text
    many = c.completions.create(model=MODEL, prompt=["One, two,", "Red, green,"], max_tokens=4,
                                temperature=0, n=2)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    ids = served.client().completions.create(model=MODEL, prompt=[504, 3575, 282], max_tokens=3,
                                             temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_completions_echo_logprobs_scoring(served):
    """What lm-eval-harness sends for a log-likelihood: echo + logprobs + max_tokens 0."""
    c = served.client()
    prompt = "The quick brown fox jumps over the lazy dog"
    r = c.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0, temperature=0)
    ch = r.choices[0]
    assert ch.text == prompt
    lp = ch.logprobs
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == r.usage.prompt_tokens and r.usage.completion_tokens == 0
    assert "".join(lp.tokens) == prompt
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(isinstance(d, dict) and len(d) >= 1 for d in lp.top_logprobs[1:])
    # echo while generating: the completion's entries follow the prompt's
    r2 = c.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0)
    assert r2.choices[0].text.startswith(prompt)
    assert len(r2.choices[0].logprobs.tokens) == r.usage.prompt_tokens + r2.usage.completion_tokens


def test_completions_stream(served):
    c = served.client()
    full = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    parts = list(c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                      stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text


def test_embeddings_float_and_base64(served):
    c = served.client()
    r = c.embeddings.create(model="all-minilm-l6-v2", input=["hello world", "你好"])  # client asks base64
    assert len(r.data) == 2 and len(r.data[0].embedding) == 384
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens
    f = c.embeddings.create(model="all-minilm-l6-v2", input="hello world", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-6)


def _error(exc_info) -> dict:
    return exc_info.value.body if isinstance(exc_info.value.body, dict) else {}


def test_errors_are_openai_shaped(served):
    c = served.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=HELLO)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=HELLO, temperature=5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # before any streaming starts
        list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}],
                                       stream=True))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError) as e:
        served.client(api_key="wrong").models.list()
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=HELLO, tool_choice="required")
    assert e.value.param == "tool_choice"


def test_raw_http_errors(served):
    with served.http() as h:
        r = h.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = h.post("/v1/chat/completions", json={"model": MODEL})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = h.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2,
                                                 "some_future_field": 1})
        assert r.status_code == 200  # unknown fields are ignored, not rejected
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": [10**9], "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.get(served.url + "/health").status_code == 200  # public
    assert httpx.get(served.url + "/metrics").status_code == 401


def test_metrics_after_traffic(served):
    served.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    with served.http() as h:
        text = h.get("/metrics").text
    for name in ("hearth_requests_total", "hearth_prompt_tokens_total", "hearth_completion_tokens_total",
                 "hearth_time_to_first_token_seconds_bucket", "hearth_inter_token_latency_seconds_bucket",
                 "hearth_queue_depth", "hearth_active_sequences", "hearth_kv_cache_usage_ratio"):
        assert name in text, name
    assert 'route="/v1/chat/completions",status="200"' in text


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_validates(served, choice):
    c = served.client()
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    for seed in range(3):
        r = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, TIME], tool_choice=choice,
                                      temperature=0.8, seed=seed, max_tokens=80)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls", ch
        call = ch.message.tool_calls[0]
        assert call.type == "function" and call.id
        if isinstance(choice, dict):
            assert call.function.name == "get_weather"
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_tool_round_trip_streamed(served):
    c = served.client()
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="required",
                                            temperature=0, max_tokens=80, stream=True))
    calls: dict[int, dict] = {}
    for ch in chunks:
        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            assert d.index is not None
            slot = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            slot["id"] = slot["id"] or d.id
            if d.function and d.function.name:
                slot["name"] = d.function.name
            if d.function and d.function.arguments:
                slot["arguments"] += d.function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] \
        == ["tool_calls"]
    call = calls[0]
    assert call["name"] == "get_weather" and call["id"]
    args = json.loads(call["arguments"])
    msgs += [{"role": "assistant", "content": None, "tool_calls": [
                {"id": call["id"], "type": "function",
                 "function": {"name": "get_weather", "arguments": call["arguments"]}}]},
             {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temp": 21, **args})}]
    final = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="none",
                                      temperature=0, max_tokens=40)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


class Person(BaseModel):
    name: str
    age: int
    languages: list[str]


def test_json_schema_and_parse(served):
    c = served.client()
    for prompt in ("Describe a programmer.", "Name a famous scientist.", "Who wrote Hamlet?"):
        r = c.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                     response_format=Person, temperature=0, max_tokens=200)
        assert isinstance(r.choices[0].message.parsed, Person)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give me JSON with a name."}],
                                  response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_sampled_structured_outputs_always_validate(served):
    """Sampling cannot break the schema: every answer that ends (not cut by max_tokens) validates."""
    c = served.client()
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "population", "tags"],
              "properties": {"city": {"type": "string", "maxLength": 40},
                             "population": {"type": "integer", "minimum": 0, "maximum": 50000000},
                             "tags": {"type": "array", "items": {"enum": ["old", "big", "coastal", "capital"]},
                                      "maxItems": 3}}}
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a city."}],
                                  n=12, temperature=1.0, seed=3, max_tokens=120, response_format={
                                      "type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    assert all(ch.finish_reason == "stop" for ch in r.choices)  # bounded schema: every answer ends
    for ch in r.choices:
        jsonschema.validate(json.loads(ch.message.content), schema)


async def test_async_client_concurrent(served):
    c = served.async_client()
    rs = await asyncio.gather(*(c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                                          temperature=0) for _ in range(4)))
    assert len({r.choices[0].message.content for r in rs}) == 1
    stream = await c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                            stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == rs[0].choices[0].message.content
    await c.close()

