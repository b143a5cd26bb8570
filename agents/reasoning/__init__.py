"""hearth.agents.reasoning: chain-of-thought, self-consistency, ReAct as text, plan-and-execute,
Tree-of-Thought and plan memory, all against the ChatModel interface and recorded in a Trace.

    from hearth.agents.reasoning import zero_shot_cot, self_consistency, react, extract_answer
    result = await self_consistency(model, "What is 17 * 23?", n=5)

Most callers want hearth.agents.strategies.run_strategy, which picks one of these by name.
"""

from .common import BudgetStop, Sampling, call_model, numbered_items, split_task
from .cot import (ANSWER_TRIGGER, STEP_TRIGGER, Demo, DemoPool, few_shot_cot, load_demos, majority_vote,
                  self_consistency, zero_shot_cot)
from .extract import (ANSWER_TYPES, canonical_number, chinese_numeral, choice_letters, detect_answer_type,
                      extract_answer, extract_choice, extract_number, extract_text, normalize_answer)
from .memory import PlanMemory, PlanRecord, format_memories
from .plan import parse_plan, plan_and_execute
from .react import Parsed, parse_react, react, tool_arguments
from .tot import parse_score, tot_model_calls, tree_of_thought

__all__ = ["ANSWER_TRIGGER", "ANSWER_TYPES", "STEP_TRIGGER", "BudgetStop", "Demo", "DemoPool", "Parsed",
           "PlanMemory", "PlanRecord", "Sampling", "call_model", "canonical_number", "chinese_numeral",
           "choice_letters", "detect_answer_type", "extract_answer", "extract_choice", "extract_number",
           "extract_text", "few_shot_cot", "format_memories", "load_demos", "majority_vote",
           "normalize_answer", "numbered_items", "parse_plan", "parse_react", "parse_score",
           "plan_and_execute", "react", "self_consistency", "split_task", "tool_arguments",
           "tot_model_calls", "tree_of_thought", "zero_shot_cot"]
