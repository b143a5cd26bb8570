"""Guided decoding (llguidance): JSON schema / JSON object / regex / Lark outputs always parse and
validate, on a tiny random model (transformers backend) and the default GGUF model (llama.cpp).
Also Engine.token_bytes on both backends."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading

import jsonschema
import numpy as np
import pytest

from tests.conftest import prompt_request

from hearth.runtime import (Engine, GenerationRequest, GuidedDecoding, InvalidRequestError, SamplingParams)
from hearth.runtime.backends.transformers import HFTokenizer, TransformersBackend
from hearth.runtime.guided import apply_guidance, compiler_for, lark_json
from hearth.runtime.sampling import SamplerState, sample

PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "tags"],
    "additionalProperties": False,
}
SMALL_PET = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                             "age": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["kind", "age"], "additionalProperties": False}
LARK_PET = 'start: "pet=" pet\npet: ' + lark_json(SMALL_PET)  # compact JSON inside the grammar
LARK_PET_FREE = 'start: "pet=" pet\npet: %json' + json.dumps(SMALL_PET)  # llguidance's default: free whitespace
TEXTS = ["The quick brown fox jumps over the lazy dog.", "你好，世界！今天天气很好。我们一起去喝茶吧。",
         "Emoji stream test: 🙂🔥🚀 and 👩‍👩‍👧 123", " two  spaces\n\ttab"]
PET_MESSAGES = [{"role": "user", "content": "Describe a pet as JSON with a name, kind, age and tags."}]


def schema_params(temperature=0.0, seed=None, max_tokens=256, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                          guided=GuidedDecoding("json_schema", PET_SCHEMA), **kw)


def assert_valid_pet(result):
    assert result.finish_reason == "stop", result.text
    jsonschema.validate(json.loads(result.text), PET_SCHEMA)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = Engine(TransformersBackend(tiny_llama, dtype="float32", device="cpu", kv_cache_gb=0.05))
    yield eng
    eng.shutdown()


# ---- the GuidedDecoding type --------------------------------------------------------------------
def test_guided_decoding_is_validated():
    assert SamplingParams(guided={"kind": "regex", "spec": "a+"}).guided == GuidedDecoding("regex", "a+")
    assert SamplingParams(guided={"kind": "json_object"}).guided.spec is None
    bad = [dict(kind="yaml"), dict(kind="json_schema", spec="{}"), dict(kind="json_schema"),
           dict(kind="json_object", spec={"type": "object"}), dict(kind="regex", spec=""),
           dict(kind="lark", spec=3), dict(kind="json_schema", spec={"x": {1, 2}}),
           dict(kind="regex", spec="a", extra=1), dict(spec="a")]
    for kw in bad:
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(guided=kw)
        assert e.value.param == "response_format", kw
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(guided="json")
    assert e.value.param == "response_format"


# ---- JSON whitespace: the styles models write, bounded, never without end ---------------------------
WS_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items":
             {"type": "integer"}}, "owner": {"type": "object", "properties": {"city": {"type": "string"}}}},
             "required": ["name", "tags", "owner"], "additionalProperties": False}
WS_VALUE = {"name": "Rex", "tags": [1, 2], "owner": {"city": "Oslo"}}


def ws_grammars():
    from hearth.runtime.guided import grammar_text

    for guided in (GuidedDecoding("json_schema", WS_SCHEMA), GuidedDecoding("json_object"),
                   GuidedDecoding("lark", "start: " + lark_json(WS_SCHEMA))):
        yield guided.kind, grammar_text(guided)


@pytest.fixture(params=["default", "with pretty"])
def json_style(request, monkeypatch):
    from hearth.runtime import guided

    if request.param == "with pretty":
        monkeypatch.setattr(guided, "JSON_STYLE", ("compact", "spaced", "pretty"))
    return request.param


def test_json_allows_the_whitespace_models_write(json_style):
    from tests.byte_grammar import accepts

    pretty = [json.dumps(WS_VALUE, indent=2), json.dumps(WS_VALUE, indent=4), json.dumps(WS_VALUE, indent="\t")]
    for kind, grammar in ws_grammars():
        # compact and json.dumps' default always; consistently pretty-printed documents (2, 4, a tab) when enabled
        for text in [json.dumps(WS_VALUE, separators=(",", ":")), json.dumps(WS_VALUE)]:
            assert accepts(grammar, text), (kind, text)
        for text in pretty:
            assert accepts(grammar, text) == (json_style == "with pretty"), (kind, text)


def test_json_whitespace_cannot_loop(json_style):
    from tests.byte_grammar import accepts

    pretty = json.dumps(WS_VALUE, indent=2)
    for kind, grammar in ws_grammars():
        for text in ('{' + "\n" * 50 + '"name": "Rex", "tags": [], "owner": {}}',   # a run of newlines
                     pretty.replace("\n", "\n\n", 1),                               # two newlines in one gap
                     pretty.replace("\n  ", "\n" + " " * 21, 1),                     # an indent over 20
                     '{"name": "Rex", "tags": [' + "\n " * 30 + '], "owner": {}}',   # gaps one after another
                     "\n" + pretty, pretty + "\n", pretty + " " * 50,              # outside the document
                     json.dumps(WS_VALUE, separators=(" , ", " : ")),                  # spaces before separators
                     json.dumps(WS_VALUE, separators=(",  ", ":  ")),                  # runs of spaces
                     '{"name":"Rex", "tags":[1,2], "owner":{"city":"Oslo"}}',         # a style not kept
                     pretty.replace(",\n  ", ", ", 1)):
            assert not accepts(grammar, text), (kind, text)


def test_a_schema_may_choose_its_own_whitespace():
    from tests.byte_grammar import accepts

    from hearth.runtime.guided import grammar_text

    own = {**WS_SCHEMA, "x-guidance": {"whitespace_flexible": True}}
    grammar = grammar_text(GuidedDecoding("json_schema", own))
    assert accepts(grammar, json.dumps(WS_VALUE, indent=2).replace("\n", "\n\n"))


# ---- the sampler: mask after penalties and bias, logprobs from the raw logits ---------------------
def test_mask_goes_after_logit_bias_and_logprobs_stay_raw(engine):
    tok = engine.tokenizer
    digits = [i for i in range(tok.vocab_size) if re.fullmatch(rb"[0-9]", tok.token_bytes(i))]
    letter = tok.encode("x", add_special_tokens=False)[0]
    guide = compiler_for(tok).matchers(GuidedDecoding("regex", "[0-9]"))[0]
    params = SamplingParams(temperature=0.0, logit_bias={letter: 100.0}, logprobs=True, top_logprobs=2)
    state = SamplerState(params, guide=guide)
    logits = np.random.default_rng(0).normal(size=(1, tok.vocab_size + 7)).astype(np.float32)  # padded row
    logits[0, -3] = 50.0  # a padding id past the tokenizer must never be picked
    raw = logits.copy()
    (t,), (lp,) = sample(logits, [state])
    assert t in digits
    assert np.array_equal(logits, raw)
    lse = np.log(np.exp(raw[0].astype(np.float64)).sum())
    assert abs(lp.logprob - (raw[0, t] - lse)) < 1e-4  # the model's distribution, not the masked one
    assert lp.top[0][0] == tok.vocab_size + 4
    state.append(t)
    assert guide.error is None
    work = np.zeros((1, tok.vocab_size), np.float32)
    apply_guidance(work, [0], [guide])  # the regex is complete: only EOS is left
    assert set(np.flatnonzero(np.isfinite(work[0]))) == set(tok.eos_token_ids)


# ---- the engine on a tiny random model (transformers backend) -------------------------------------
def test_json_schema_always_valid_tiny(engine):
    for seed in range(6):
        for temperature in (0.0, 1.0):
            res = engine.generate_sync(prompt_request(engine, prompt="The quick brown fox",
                                                         params=schema_params(temperature, seed)))[0]
            assert_valid_pet(res)


def test_json_object_regex_and_lark_tiny(engine):
    def run(guided, temperature=1.0, seed=0, prompt="hearth serves"):
        return engine.generate_sync(prompt_request(engine, prompt=prompt, params=SamplingParams(
            max_tokens=256, temperature=temperature, seed=seed, guided=guided)))[0]

    for seed in range(3):
        obj = run({"kind": "json_object"}, seed=seed)  # any object: a random model may ramble to the limit
        assert obj.text.startswith("{") and (obj.finish_reason == "length" or isinstance(json.loads(obj.text), dict))
        for pattern in (r"\d{3}-[a-z]{2}", r"[0-9]{3}-[a-z]{2}"):  # \d is ASCII, as in JSON Schema
            res = run({"kind": "regex", "spec": pattern}, seed=seed)
            assert res.finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2}", res.text), res.text
        for grammar in (LARK_PET, LARK_PET_FREE):
            res = run({"kind": "lark", "spec": grammar}, seed=seed)
            assert res.finish_reason == "stop" and res.text.startswith("pet="), res.text
            jsonschema.validate(json.loads(res.text[4:]), SMALL_PET)
            # bounded whitespace: one newline at most in a gap, then an indent of at most 20
            assert grammar is LARK_PET_FREE or not re.search(r"\n\s*\n|[ \t]{21}", res.text)


@pytest.mark.parametrize("guided", [
    {"kind": "json_schema", "spec": {"type": "wrong"}},
    {"kind": "json_schema", "spec": {"type": "string", "format": "not-a-format"}},
    {"kind": "json_schema", "spec": {"type": "object", "minProperties": "x"}},
    {"kind": "regex", "spec": "(abc"},
    {"kind": "lark", "spec": "start: undefined_rule"},
    {"kind": "lark", "spec": 'start: "a" %json{"type": "wrong"}'},
])
def test_bad_grammar_is_a_request_error_before_any_output(engine, guided):
    req = lambda: prompt_request(engine, prompt="hi", params=SamplingParams(max_tokens=8, guided=guided))
    with pytest.raises(InvalidRequestError) as e:
        engine.check_prompt(req())
    assert e.value.param == "response_format" and "invalid" in str(e.value)
    with pytest.raises(InvalidRequestError):
        engine.generate_sync(req())
    got = []

    async def stream():
        async for out in engine.generate(req()):
            got.append(out)
    with pytest.raises(InvalidRequestError):
        asyncio.run(stream())
    assert got == []
    st = engine.stats()
    assert st.running == 0 and st.waiting == 0


def test_grammar_cache_keeps_property_order(engine):
    props = list(PET_SCHEMA["properties"].items())
    reordered = {**PET_SCHEMA, "properties": dict(reversed(props)), "required": ["tags", "age", "kind", "name"]}
    for schema in (PET_SCHEMA, reordered):
        res = engine.generate_sync(prompt_request(engine, prompt="Tea is", params=SamplingParams(
            max_tokens=256, temperature=0.0, guided=GuidedDecoding("json_schema", schema))))[0]
        assert list(json.loads(res.text)) == list(schema["properties"])


def test_n2_choices_are_both_valid(engine):
    res = engine.generate_sync(prompt_request(engine, prompt="Tea is", params=schema_params(1.0, seed=5, n=2)))
    assert [r.index for r in res] == [0, 1]
    for r in res:
        assert_valid_pet(r)
    assert res[0].token_ids != res[1].token_ids


def test_constrained_and_unconstrained_in_one_batch(engine):
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = engine.generate_sync(prompt_request(engine, prompt="The quick brown fox", params=plain))[0].token_ids
    alone_json = engine.generate_sync(prompt_request(engine, prompt="lazy dog", params=schema_params()))[0].token_ids

    async def together():
        async def one(prompt, params):
            toks = []
            async for out in engine.generate(prompt_request(engine, prompt=prompt, params=params)):
                toks.extend(out.token_ids)
            return toks
        return await asyncio.gather(one("The quick brown fox", plain), one("lazy dog", schema_params()),
                                    one("hearth serves", schema_params(1.0, seed=2)))
    t_plain, t_json, t_json2 = asyncio.run(together())
    assert t_plain == alone
    assert t_json == alone_json
    assert_valid_pet(engine.generate_sync(prompt_request(engine, prompt="hearth serves",
                                                            params=schema_params(1.0, seed=2)))[0])


def test_ignore_eos_still_ends_when_the_grammar_is_done(engine):
    res = engine.generate_sync(prompt_request(engine, prompt="hi", params=SamplingParams(
        max_tokens=50, temperature=0.0, ignore_eos=True, guided={"kind": "regex", "spec": "[0-9]{4}"})))[0]
    assert res.finish_reason == "stop" and re.fullmatch("[0-9]{4}", res.text)
    assert res.token_ids[-1] in engine.tokenizer.eos_token_ids


def test_preemption_and_recompute_keep_guided_outputs(tiny_llama, engine):
    prompts = ["The quick brown fox " * 6, "hearth serves", "Tea is best", "你好，世界", "lazy dog", "brewed"]
    params = [schema_params(0.0), schema_params(1.0, seed=1), schema_params(0.0),
              schema_params(1.0, seed=3), schema_params(0.0), SamplingParams(max_tokens=40, temperature=0.0,
                                                                              ignore_eos=True)]
    ref = [engine.generate_sync(prompt_request(engine, prompt=p, params=q))[0] for p, q in zip(prompts, params)]
    # 12 blocks of 16 tokens for ~25 blocks of demand, 16-token steps: preemption and chunked prefill
    eng = Engine(TransformersBackend(tiny_llama, dtype="float32", device="cpu",
                                     kv_cache_gb=12 * 16 * 2 * 2 * 2 * 16 * 4 / 2**30),
                 max_num_batched_tokens=16)
    try:
        results = [None] * len(prompts)

        def run(i):
            results[i] = eng.generate_sync(prompt_request(eng, prompt=prompts[i], params=params[i]))[0]
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [r.token_ids for r in results] == [r.token_ids for r in ref]
        assert eng.scheduler.num_preemptions > 0
        for r in results[:-1]:
            assert_valid_pet(r)
    finally:
        eng.shutdown()


def test_failed_matcher_finishes_with_stop_and_engine_lives(engine, monkeypatch, caplog):
    compiler = compiler_for(engine.tokenizer)
    real = compiler.matchers

    def broken(guided, n=1):
        guides = real(guided, n)
        for g in guides:
            g.consume(engine.tokenizer.encode("x", add_special_tokens=False)[0])  # not a digit: error state
        return guides
    monkeypatch.setattr(compiler, "matchers", broken)
    with caplog.at_level(logging.WARNING, logger="hearth.engine"):
        res = engine.generate_sync(prompt_request(engine, prompt="hi", params=SamplingParams(
            max_tokens=20, temperature=1.0, guided={"kind": "regex", "spec": "[0-9]+"})))[0]
    assert res.finish_reason == "stop" and res.text == ""
    assert "guided decoding" in caplog.text
    monkeypatch.undo()
    assert engine.healthy
    assert_valid_pet(engine.generate_sync(prompt_request(engine, prompt="hi", params=schema_params()))[0])


# ---- token_bytes ------------------------------------------------------------------------------------
def test_token_bytes_transformers(engine):
    tok = engine.tokenizer
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        parts = engine.token_bytes(ids)
        assert all(isinstance(b, bytes) for b in parts)
        assert b"".join(parts).decode("utf-8") == tok.decode(ids)
    assert engine.token_bytes([tok.encode("<|im_end|>", add_special_tokens=False)[0]]) == [b""]
    # one emoji over several byte tokens: each token holds a part of its UTF-8
    ids = tok.encode("🚀", add_special_tokens=False)
    assert b"".join(engine.token_bytes(ids)) == "🚀".encode()


def test_token_bytes_sentencepiece_style_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import CORPUS
    raw = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>"))
    for text in TEXTS[:3]:
        ids = tok.encode(text, add_special_tokens=False)
        # the leading space decode strips from the very first piece stays in its bytes
        assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8") == " " + tok.decode(ids)


# ---- the default GGUF model (llama.cpp backend) -----------------------------------------------------
@pytest.fixture(scope="module")
def gguf_engine(smollm_gguf):
    eng = Engine.from_model(str(smollm_gguf), backend="llamacpp", n_ctx=4096, n_seq_max=16, n_threads=2,
                            batch_invariant=True)
    yield eng
    eng.shutdown()


@pytest.mark.slow
def test_json_schema_always_valid_gguf(gguf_engine):
    outs = []
    for seed in range(8):
        for temperature in ((0.0, 1.0) if seed < 2 else (1.0,)):
            res = gguf_engine.generate_sync(prompt_request(gguf_engine, messages=PET_MESSAGES,
                                                              params=schema_params(temperature, seed)))[0]
            assert_valid_pet(res)
            outs.append(res.text)
    assert len(set(outs)) > 3  # sampling still samples inside the grammar


@pytest.mark.slow
def test_json_object_regex_and_lark_gguf(gguf_engine):
    for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0)):
        def run(guided, content):
            return gguf_engine.generate_sync(prompt_request(gguf_engine,
                messages=[{"role": "user", "content": content}],
                params=SamplingParams(max_tokens=200, temperature=temperature, seed=seed, guided=guided)))[0]
        # any object: nothing bounds its numbers or nesting, so a prompt that asks for a small one
        obj = run({"kind": "json_object"}, "Describe a city as a JSON object with its name and country.")
        assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict), obj.text
        res = run({"kind": "regex", "spec": r"\d{3}-[a-z]{2}"}, "Make up a short code.")
        assert res.finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2}", res.text), res.text
        res = run({"kind": "lark", "spec": LARK_PET}, "Which pet do you like?")
        assert res.finish_reason == "stop" and res.text.startswith("pet="), res.text
        jsonschema.validate(json.loads(res.text[4:]), SMALL_PET)


@pytest.mark.slow
def test_bad_schema_errors_gguf(gguf_engine):
    with pytest.raises(InvalidRequestError) as e:
        gguf_engine.generate_sync(prompt_request(gguf_engine, messages=PET_MESSAGES, params=SamplingParams(
            guided={"kind": "json_schema", "spec": {"type": "object", "properties": {"a": {"type": 5}}}})))
    assert e.value.param == "response_format"


@pytest.mark.slow
def test_n2_and_mixed_batch_gguf(gguf_engine):
    res = gguf_engine.generate_sync(prompt_request(gguf_engine, messages=PET_MESSAGES, params=schema_params(1.0, 4, n=2)))
    for r in res:
        assert_valid_pet(r)
    plain = SamplingParams(max_tokens=24, temperature=0.0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    alone = gguf_engine.generate_sync(prompt_request(gguf_engine, messages=question, params=plain))[0].token_ids

    async def together():
        async def one(messages, params):
            toks = []
            async for out in gguf_engine.generate(prompt_request(gguf_engine, messages=messages, params=params)):
                toks.extend(out.token_ids)
            return toks
        return await asyncio.gather(one(question, plain), one(PET_MESSAGES, schema_params()))
    t_plain, _ = asyncio.run(together())
    assert t_plain == alone


@pytest.mark.slow
def test_token_bytes_llamacpp(gguf_engine):
    tok = gguf_engine.tokenizer
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(gguf_engine.token_bytes(ids)).decode("utf-8") == tok.decode(ids)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert b"".join(gguf_engine.token_bytes(ids)) == b"user\nhi"


def test_hf_logits_wider_than_tokenizer_are_masked(tmp_path):
    from tests.conftest import build_tiny_model
    path = build_tiny_model(tmp_path / "wide", vocab_size=450)  # logits padded past the 400 real tokens
    eng = Engine(TransformersBackend(path, dtype="float32", device="cpu", kv_cache_gb=0.02))
    forward = eng.backend.forward

    def favour_padding(work):  # padding ids become the model's favourites everywhere
        out = forward(work)
        for lg in out:
            if lg is not None:
                assert lg.shape[-1] == 450
                lg[..., 405] = lg[..., 440] = 1e4
        return out
    eng.backend.forward = favour_padding
    try:
        for seed in range(2):
            res = eng.generate_sync(prompt_request(eng, prompt="The quick", params=schema_params(1.0, seed)))[0]
            assert_valid_pet(res)
            assert max(res.token_ids) < 400
    finally:
        eng.shutdown()
