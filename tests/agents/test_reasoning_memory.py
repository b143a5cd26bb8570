"""Plan memory: store, reopen, retrieve similar tasks only, refuse another embedder, survive a torn write.

    nice -n 10 .venv/bin/python -m pytest tests/agents/test_reasoning_memory.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hearth.agents.embed import HashingEmbedder
from hearth.agents.reasoning import PlanMemory, format_memories
from hearth.agents.reasoning.memory import PLANS_FILE, VECTORS_FILE
from hearth.agents.types import AgentError

APPLES = "What is the total cost of 3 apples at 2 dollars each?"


def test_round_trip_retrieves_the_similar_task_not_the_dissimilar_one(tmp_path):
    memory = PlanMemory(tmp_path / "mem", HashingEmbedder(), threshold=0.5)
    assert len(memory) == 0 and memory.search(APPLES) == []
    memory.add(APPLES, ["Multiply 3 by 2"], "6", strategy="plan_execute")
    memory.add("Write a haiku about the sea", ["Pick an image", "Write 5-7-5 lines"], "waves ...")
    files = sorted(p.name for p in (tmp_path / "mem").iterdir())
    assert files == ["meta.json", "plans.jsonl", "vectors.npy"]  # no temporary files left behind

    reopened = PlanMemory(tmp_path / "mem", HashingEmbedder(), threshold=0.5)
    assert len(reopened) == 2
    hits = reopened.search("What is the total cost of 5 apples at 3 dollars each?", k=2)
    assert [r.task for r, _ in hits] == [APPLES]
    assert hits[0][0].steps == ["Multiply 3 by 2"] and hits[0][0].strategy == "plan_execute"
    assert hits[0][1] > 0.8
    assert [r.task for r, _ in reopened.search("Write a short poem about the sea", k=1)] == [
        "Write a haiku about the sea"]
    assert reopened.search("Translate this contract into German", k=2) == []
    block = format_memories(hits)
    assert f"Task: {APPLES}" in block and "1. Multiply 3 by 2" in block and "Answer: 6" in block


def test_the_same_task_replaces_its_old_plan(tmp_path):
    memory = PlanMemory(tmp_path, HashingEmbedder())
    memory.add(APPLES, ["guess"], "5")
    memory.add("  what is the total cost of 3 apples at 2 dollars each? ", ["Multiply 3 by 2"], "6")
    assert len(memory) == 1 and memory.records[0].answer == "6"
    assert np.load(tmp_path / VECTORS_FILE).shape == (1, 256)


def test_another_embedder_is_refused(tmp_path):
    PlanMemory(tmp_path, HashingEmbedder(256)).add(APPLES, ["x"], "6")
    with pytest.raises(AgentError, match="hashing-256"):
        PlanMemory(tmp_path, HashingEmbedder(128))


def test_a_torn_write_drops_the_extra_vector_and_a_short_one_is_an_error(tmp_path):
    memory = PlanMemory(tmp_path, HashingEmbedder())
    memory.add(APPLES, ["Multiply 3 by 2"], "6")
    memory.add("Write a haiku about the sea", ["Write"], "waves")
    # a crash after the vectors were renamed in but before the plans were: one extra row
    lines = (tmp_path / PLANS_FILE).read_text().splitlines()
    (tmp_path / PLANS_FILE).write_text(lines[0] + "\n")
    reopened = PlanMemory(tmp_path, HashingEmbedder())
    assert len(reopened) == 1 and [r.task for r, _ in reopened.search(APPLES)] == [APPLES]
    # fewer vectors than plans cannot come from a crash: the directory is damaged
    (tmp_path / PLANS_FILE).write_text("\n".join(lines + [json.dumps({"task": "t", "steps": [], "answer": "a"})]))
    with pytest.raises(AgentError, match="do not match"):
        PlanMemory(tmp_path, HashingEmbedder())
