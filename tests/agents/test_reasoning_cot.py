"""Zero-shot CoT, few-shot CoT with similarity-chosen demos, and self-consistency, on scripted models.

    nice -n 10 .venv/bin/python -m pytest tests/agents/test_reasoning_cot.py -q
"""

from __future__ import annotations

import pytest

from hearth.agents.embed import HashingEmbedder
from hearth.agents.model import ChatReply, ScriptedChatModel
from hearth.agents.reasoning import (ANSWER_TRIGGER, STEP_TRIGGER, Demo, DemoPool, Sampling, few_shot_cot,
                                     self_consistency, zero_shot_cot)
from hearth.agents.types import AgentInputError, Budget, Trace


def _texts(call) -> str:
    return "\n".join(str(m["content"]) for m in call["messages"])


async def test_zero_shot_cot_two_stages():
    reasoning = "Each pen costs 3 yuan, and 14 pens cost 14 × 3 = 42 yuan."
    model = ScriptedChatModel([reasoning, ChatReply("42 yuan.", usage={"prompt_tokens": 9, "completion_tokens": 2,
                                                                        "total_tokens": 11})])
    result = await zero_shot_cot(model, "A pen costs 3 yuan. How much do 14 pens cost?")
    assert result.answer == "42" and result.stopped == "answer"
    assert len(model.calls) == 2
    first, second = model.calls
    assert first["messages"][-1]["content"].endswith(STEP_TRIGGER)
    assert first["messages"][-1]["content"].startswith("A pen costs 3 yuan.")
    # stage 2 shows the question, the stage-1 reasoning, and ends on the answer trigger
    assert "A pen costs 3 yuan." in _texts(second) and reasoning in _texts(second)
    assert second["messages"][-1]["content"].endswith(ANSWER_TRIGGER)
    assert "arabic numerals" in second["messages"][-1]["content"]
    assert [s.kind for s in result.steps] == ["thought", "answer"]
    assert result.usage["total_tokens"] == 11


async def test_zero_shot_cot_keeps_history_and_reads_the_reasoning_when_stage_two_has_no_answer():
    model = ScriptedChatModel(["所以答案是 (B)。", "I am not sure."])
    task = [{"role": "system", "content": "Be careful."},
            {"role": "user", "content": "哪个是质数？ (A) 21 (B) 29 (C) 33"}]
    result = await zero_shot_cot(model, task)
    assert result.answer == "B" and result.extra["answer_type"] == "choice"
    assert model.calls[0]["messages"][0] == {"role": "system", "content": "Be careful."}
    assert "A, B, C" in model.calls[1]["messages"][-1]["content"]


async def test_zero_shot_cot_budget():
    model = ScriptedChatModel(["reasoning", "42"])
    result = await zero_shot_cot(model, "What is 6*7?", trace=Trace(Budget(max_steps=1)))
    assert result.stopped == "max_steps" and result.answer is None and len(model.calls) == 1


def test_demo_pool_picks_the_similar_demos():
    pool = DemoPool.bundled(HashingEmbedder())
    picked = pool.select("小华有20元，买了两支每支6元的笔，还剩多少元？", 3)
    assert len(picked) == 3
    # the closest is last, right before the question; a Chinese shopping problem picks the Chinese one
    assert picked[-1][0].question.startswith("小明有15元")
    assert [s for _, s in picked] == sorted(s for _, s in picked)
    assert pool.select("anything", 0) == []
    assert DemoPool.bundled(pool.embedder) is pool  # embedded once per embedder


async def test_few_shot_cot_prompt_holds_the_nearest_demos():
    demos = [Demo("How many legs do 3 dogs have?", "Each dog has 4 legs: 3 × 4 = 12.", "12"),
             Demo("What is the capital of Italy?", "Italy's capital is Rome.", "Rome", type="text"),
             Demo("How many legs do 5 cats have?", "Each cat has 4 legs: 5 × 4 = 20.", "20")]
    pool = DemoPool(demos, HashingEmbedder())
    model = ScriptedChatModel(["Each bird has 2 legs: 7 × 2 = 14. The answer is 14."])
    result = await few_shot_cot(model, "How many legs do 7 birds have?", pool=pool, k=2)
    assert result.answer == "14" and len(model.calls) == 1
    msgs = model.calls[0]["messages"]
    assert msgs[0]["role"] == "system" and "The answer is" in msgs[0]["content"]
    shown = [m["content"] for m in msgs if m["role"] == "user"][:-1]
    assert sorted(shown) == ["How many legs do 3 dogs have?", "How many legs do 5 cats have?"]
    assert msgs[2] == {"role": "assistant", "content": pool.select("How many legs do 7 birds have?", 2)[0][0]
                       .solution()}
    assert msgs[-1] == {"role": "user", "content": "How many legs do 7 birds have?"}
    assert [s.kind for s in result.steps] == ["retrieval", "thought", "answer"]


async def test_self_consistency_votes_over_one_n_call():
    paths = ["6 × 7 = 42. The answer is 42.", "6 × 7 = 41. The answer is 41.", "So 42.",
             "The answer is 41", "I get 42"]
    model = ScriptedChatModel(paths)
    result = await self_consistency(model, "What is 6 × 7?", n=5)
    assert result.answer == "42" and result.stopped == "answer"
    assert result.extra["votes"] == {"42": 3, "41": 2} and result.extra["agreement"] == pytest.approx(0.6)
    assert [p["answer"] for p in result.extra["paths"]] == ["42", "41", "42", "41", "42"]
    assert len(model.calls) == 1 and model.calls[0]["n"] == 5 and model.calls[0]["temperature"] == 0.7
    kinds = [s.kind for s in result.steps]
    assert kinds == ["sample"] * 5 + ["vote", "answer"]


class _OneChoiceModel(ScriptedChatModel):
    """A server that ignores n and always returns one choice."""

    async def chat(self, messages, **kw):
        kw["n"] = 1
        return await super().chat(messages, **kw)


async def test_self_consistency_falls_back_to_one_call_per_path():
    model = _OneChoiceModel(["The answer is 7", "The answer is 8", "The answer is 8", "The answer is 7"])
    result = await self_consistency(model, "What is 3 + 4?", n=4, sampling=Sampling(0.9, 64, seed=10))
    # a 2-2 tie goes to the answer seen first
    assert result.answer == "7" and result.extra["agreement"] == 0.5
    assert len(model.calls) == 4
    assert [c["seed"] for c in model.calls] == [10, 11, 12, 13]
    assert all(c["temperature"] == 0.9 and c["max_tokens"] == 64 for c in model.calls)


async def test_self_consistency_budget_cuts_paths_and_votes_on_the_rest():
    model = _OneChoiceModel(["The answer is 5", "The answer is 5", "The answer is 6"])
    result = await self_consistency(model, "What is 2 + 3?", n=5, trace=Trace(Budget(max_steps=2)))
    assert result.stopped == "max_steps" and result.answer == "5"
    assert result.extra["votes"] == {"5": 2} and len(model.calls) == 2


async def test_self_consistency_with_no_answers_is_an_error():
    model = ScriptedChatModel(["no idea", "none", "hmm"])
    result = await self_consistency(model, "How many stars are there?", n=3, answer_type="number")
    assert result.answer is None and result.stopped == "error"
    assert result.steps[-1].kind == "error"


async def test_bad_task_and_answer_type():
    model = ScriptedChatModel([])
    with pytest.raises(AgentInputError) as e:
        await zero_shot_cot(model, "   ")
    assert e.value.param == "task"
    with pytest.raises(AgentInputError) as e:
        await zero_shot_cot(model, [{"role": "system", "content": "x"}])
    assert e.value.param == "messages"
    with pytest.raises(AgentInputError) as e:
        await zero_shot_cot(model, "What is 1+1?", answer_type="integer")
    assert e.value.param == "answer_type"
    assert model.calls == []
