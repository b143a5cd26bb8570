"""hearth.agents.tools: tools the model may call, their registry, and the built-ins.

    from hearth.agents.tools import default_registry, tool, ToolRegistry
    registry = default_registry()                          # calculator, solve_equation, current_datetime + plugins
    registry = default_registry(rag_index=index, sandbox=True, plugins=False)   # + rag_search, python
    result = await registry.call("calculator", '{"expression": "2 + 2"}')      # ToolResult(content="4", ok=True)

Third-party packages add tools through the "hearth.tools" entry-point group (see registry.py).
"""

from __future__ import annotations

from typing import Any

from .calculator import CalculatorError, calculate, calculator_tool
from .clock import current_datetime, current_datetime_tool
from .rag_search import format_hits, rag_search_tool
from .registry import Tool, ToolError, ToolRegistry, ToolResult, parse_arguments, tool
from .sandbox import (SandboxLimits, SandboxResult, SandboxUnavailable, python_sandbox_tool, run_python,
                      sandbox_unavailable_reason)
from .schema import ArgumentError, function_schema, validate_arguments
from .solver import SolverError, solve, solve_equation_tool

__all__ = ["Tool", "ToolError", "ToolRegistry", "ToolResult", "tool", "parse_arguments", "default_registry",
           "ArgumentError", "function_schema", "validate_arguments",
           "calculator_tool", "calculate", "CalculatorError", "solve_equation_tool", "solve", "SolverError",
           "current_datetime_tool", "current_datetime", "rag_search_tool", "format_hits",
           "python_sandbox_tool", "run_python", "SandboxLimits", "SandboxResult", "SandboxUnavailable",
           "sandbox_unavailable_reason", "BUILTIN_TOOLS"]

BUILTIN_TOOLS = ("calculator", "solve_equation", "current_datetime")
"""Always registered by default_registry; rag_search needs an index, python needs sandbox=True."""


def default_registry(*, rag_index: Any = None, sandbox: bool | SandboxLimits = False,
                     plugins: bool = True) -> ToolRegistry:
    """The built-in tools, plus `rag_search` over `rag_index` when given, the `python` sandbox when
    `sandbox` is True (or SandboxLimits), and the installed "hearth.tools" plugins when `plugins`."""
    registry = ToolRegistry([calculator_tool, solve_equation_tool, current_datetime_tool])
    if rag_index is not None:
        registry.register(rag_search_tool(rag_index))
    if sandbox:
        registry.register(python_sandbox_tool(sandbox if isinstance(sandbox, SandboxLimits) else None))
    if plugins:
        registry.load_entry_points()
    return registry
