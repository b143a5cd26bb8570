"""Plan-and-execute: the model writes a numbered plan, each step is carried out in turn with the results
so far, and a last call puts the results together.

    result = await plan_and_execute(model, "Convert 3 miles to km and add 10 km", tools=default_registry())
    result.extra["plan"]            # ["Convert 3 miles to km", "Add 10 km to the result"]
    result.extra["step_results"]    # ["4.828 km", "14.828 km"]

With a tool registry each step runs through the tool loop (`run_tool_agent`, its steps forwarded into
this trace tagged with `plan_step`); without one each step is a plain model call. A step that fails
(no result) triggers one replan of the remaining work. With a PlanMemory, plans of similar solved tasks
are shown to the planner, and a plan that reached an answer is remembered.
"""

from __future__ import annotations

import re
from typing import Any

from ..model import ChatModel
from ..types import AgentResult, Budget, Step, Trace
from .common import BudgetStop, Sampling, ask, numbered_items, split_task, user, with_system
from .cot import resolve_answer_type
from .extract import choice_letters, extract_answer
from .memory import PlanMemory, format_memories

PLAN_EXECUTE_CALLS = 24
_FINAL = re.compile(r"(?:final\s+answer|最终答案)\s*[:：]\s*", re.IGNORECASE)


def planner_prompt(max_steps: int, tool_names: list[str], memories: str) -> str:
    tools = f" The steps can use these tools: {', '.join(tool_names)}." if tool_names else ""
    prompt = (f"You plan how to solve a task. Write a numbered plan of at most {max_steps} short steps, one "
              f'line each ("1. ..."), each small enough to do with one tool call or a little reasoning.'
              f"{tools} Write only the plan.")
    return f"{prompt}\n\n{memories}" if memories else prompt


def parse_plan(text: str, max_steps: int) -> list[str]:
    """The plan's steps (numbered or bulleted lines; a plan with neither is one step), at most max_steps."""
    steps = numbered_items(text) or ([text.strip()] if text.strip() else [])
    return steps[:max_steps]


def final_answer(text: str, answer_type: str, letters: str = "ABCDE") -> str | None:
    """For text answers everything after "Final Answer:" (or the whole reply); numbers and letters are
    extracted as for CoT."""
    if answer_type != "text":
        return extract_answer(text, answer_type, letters=letters)
    marks = list(_FINAL.finditer(text))
    return (text[marks[-1].end():] if marks else text).strip() or None


def _results_block(plan: list[str], results: list[str]) -> str:
    return "\n".join(f"Step {i} ({plan[i - 1]}): {r}" for i, r in enumerate(results, 1))


async def _run_step_with_tools(model: ChatModel, trace: Trace, messages: list[dict[str, Any]], tools: Any,
                               sampling: Sampling, index: int) -> str | None:
    """One plan step through the tool loop, on a child trace that forwards its steps and shares the budget."""
    from ..loop import run_tool_agent  # the tool loop lives beside this package; imported when used

    left = trace.budget.max_steps - trace.model_calls
    if left < 1 or trace.time_left() <= 0:
        raise BudgetStop(trace.out_of_budget() or "max_steps")

    def forward(step: Step) -> None:
        # the loop's own "answer" is this step's result, recorded below as an observation
        if step.kind != "answer":
            data = {k: v for k, v in step.data.items() if k not in ("kind", "content")}
            trace.add(step.kind, step.content, **data, plan_step=index)

    # keep one call back for the final synthesis when the budget allows
    child = Trace(Budget(max_steps=max(1, left - 1), time_s=trace.time_left()), on_step=forward)
    kw = {k: v for k, v in sampling.kwargs().items() if v is not None}
    result = await run_tool_agent(model, messages, tools, budget=child.budget, trace=child,
                                  sampling=kw or None)
    trace.model_calls += child.model_calls
    for k in trace.usage:
        trace.usage[k] += child.usage.get(k, 0)
    if result.stopped == "time_budget" or trace.time_left() <= 0:
        raise BudgetStop("time_budget")
    return result.answer if result.stopped == "answer" and result.answer else None


async def plan_and_execute(model: ChatModel, task: str | list[dict[str, Any]], *, tools: Any = None,
                           trace: Trace | None = None, sampling: Sampling | None = None,
                           memory: PlanMemory | None = None, answer_type: str = "auto",
                           max_plan_steps: int = 6, replan: bool = True) -> AgentResult:
    """Plan, execute each step (tools through the tool loop, else a model call), synthesise the answer."""
    # each step may take several calls through the tool loop: a larger default than one call per step
    trace = trace or Trace(Budget(max_steps=PLAN_EXECUTE_CALLS, time_s=300.0))
    sampling = sampling or Sampling()
    history, question = split_task(task)
    kind = resolve_answer_type(answer_type, question)
    letters = choice_letters(question) or "ABCDE"
    tool_names = list(tools.names()) if tools is not None else []
    hits = memory.search(question) if memory is not None else []
    if hits:
        trace.add("retrieval", "\n".join(r.task for r, _ in hits), source="plan_memory",
                  similarities=[round(s, 4) for _, s in hits])
    planner = with_system(history, planner_prompt(max_plan_steps, tool_names, format_memories(hits)))
    plan: list[str] = []
    results: list[str] = []
    replanned = False

    def extra() -> dict[str, Any]:
        return {"plan": list(plan), "step_results": list(results), "replanned": replanned, "answer_type": kind}

    try:
        plan = parse_plan(await ask(model, trace, [*planner, user(f"Task: {question}")], sampling=sampling),
                          max_plan_steps)
        if not plan:
            trace.add("error", "the model wrote no plan")
            return trace.finish(None, "error", **extra())
        trace.add("plan", "\n".join(f"{i}. {s}" for i, s in enumerate(plan, 1)), steps=list(plan))
        i = 0
        while i < len(plan):
            numbered = "\n".join(f"{j}. {s}" for j, s in enumerate(plan, 1))
            done = _results_block(plan, results)
            context = (f"Task: {question}\n\nPlan:\n{numbered}\n\n"
                       + (f"Results so far:\n{done}\n\n" if done else "")
                       + f"Now carry out step {i + 1}: {plan[i]}\nReply with the result of this step only.")
            trace.add("action", plan[i], plan_step=i + 1)
            if tools is not None:
                msgs = [*with_system(history, "You carry out one step of a plan. Use the tools when they help, "
                                              "then reply with the step's result."), user(context)]
                result = await _run_step_with_tools(model, trace, msgs, tools, sampling, i + 1)
            else:
                msgs = [*with_system(history, "You carry out one step of a plan and reply with its result."),
                        user(context)]
                result = await ask(model, trace, msgs, sampling=sampling) or None
            if result is None and replan and not replanned:
                replanned = True
                trace.add("error", f"step {i + 1} gave no result; replanning", plan_step=i + 1)
                ask_again = (f"Task: {question}\n\nThe plan was:\n{numbered}\n\n"
                             + (f"Results so far:\n{done}\n\n" if done else "")
                             + f"Step {i + 1} ({plan[i]}) failed. Write a new numbered plan for the remaining "
                               f"work only.")
                new = parse_plan(await ask(model, trace, [*planner, user(ask_again)], sampling=sampling),
                                 max_plan_steps - i)
                if new:
                    plan = plan[:i] + new
                    trace.add("plan", "\n".join(f"{j}. {s}" for j, s in enumerate(plan, 1)), steps=list(plan),
                              replanned=True)
                    continue
            results.append(result or "(no result)")
            trace.add("observation", results[-1], plan_step=i + 1, ok=result is not None)
            i += 1
        synth = [*history, user(f"Task: {question}\n\nResults of the plan's steps:\n{_results_block(plan, results)}"
                                f'\n\nUsing these results, answer the task. End with "Final Answer: <answer>".')]
        text = await ask(model, trace, synth, sampling=sampling)
    except BudgetStop as stop:
        return trace.finish(None, stop.reason, **extra())
    trace.add("thought", text)
    answer = final_answer(text, kind, letters)
    if answer is None and not text:
        trace.add("error", "the final reply is empty")
        return trace.finish(None, "error", **extra())
    if memory is not None and answer is not None:
        memory.add(question, plan, answer, strategy="plan_execute")
    return trace.finish(answer or text, extracted=answer is not None, **extra())
