"""Render Hugging Face style Jinja2 chat templates, in a sandbox.

    text = render_chat_template(tokenizer.chat_template or DEFAULT_CHATML_TEMPLATE,
                                messages, tools=tools, add_generation_prompt=True,
                                bos_token="<s>", eos_token="</s>")

The environment mirrors transformers' `apply_chat_template` (trim_blocks, lstrip_blocks,
loopcontrols, a non-ASCII-keeping `tojson`, `raise_exception`, `strftime_now`, the
`{% generation %}` tag) so the same template gives the same text. Templates ship with model
checkpoints, so they are untrusted code: they run in jinja2's ImmutableSandboxedEnvironment with
output, memory and time caps (template_sandbox.py; `template_sandbox.LIMITS` sets them), and an
attempt to reach Python internals or to go past a cap raises UnsafeCheckpointError instead of running.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols

from . import template_sandbox
from .errors import HearthError, InvalidRequestError, ModelLoadError, UnsafeCheckpointError
from .template_sandbox import BoundedSandbox, bound_template, input_chars, render_budget

_MAX_STRFTIME_CHARS = 256

# ChatML, for models whose tokenizer has no template. Tools follow the Hermes/Qwen convention
# (<tools> in the system turn, <tool_call> JSON in assistant turns) that most tool parsers know.
DEFAULT_CHATML_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content if part is mapping and part.get('type') == 'text' -%}{{ part['text'] }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set system_first = messages and messages[0]['role'] == 'system' -%}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if system_first %}{{ render_content(messages[0]['content']) ~ '\\n\\n' }}{% endif %}
{{- 'You may call one or more functions. Function signatures are in <tools></tools>:\\n<tools>\\n' }}
{%- for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}
{{- '</tools>\\nFor each call, reply with a JSON object inside <tool_call></tool_call> tags:\\n' }}
{{- '<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if not (tools and system_first and loop.first) %}
{{- '<|im_start|>' ~ message['role'] ~ '\\n' }}
{%- if message['role'] == 'tool' %}
{{- '<tool_response>\\n' ~ render_content(message['content']) ~ '\\n</tool_response>' }}
{%- else %}
{{- render_content(message['content']) }}
{%- endif %}
{%- for call in message.get('tool_calls') or [] %}
{%- set fn = call['function'] if 'function' in call else call %}
{%- set args = fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson %}
{{- '\\n<tool_call>\\n{"name": ' ~ fn['name'] | tojson ~ ', "arguments": ' ~ args ~ '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}
"""

class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> NoReturn:
    # Templates call this to reject a conversation (e.g. roles that do not alternate): the request's fault.
    raise InvalidRequestError(f"chat template: {message}", param="messages")


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > _MAX_STRFTIME_CHARS:  # each %c writes ~24 characters
        raise UnsafeCheckpointError(f"the chat template is unsafe and was stopped: strftime_now takes a format "
                                    f"of at most {_MAX_STRFTIME_CHARS} characters")
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML and forces ASCII; prompts need the raw text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment() -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.bound_filters()
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> Any:
    """Compile each distinct template once; a server renders the same one for every request."""
    limits = template_sandbox.LIMITS
    if len(template) > limits.template_chars:
        raise UnsafeCheckpointError(f"the chat template is {len(template):,} characters, more than the limit "
                                    f"of {limits.template_chars:,}")
    env = _environment()
    try:
        return env.from_string(bound_template(env.parse(template)))
    except TemplateSyntaxError as e:
        raise ModelLoadError(f"the chat template does not parse (line {e.lineno}): {e.message}") from e
    except RecursionError as e:
        raise UnsafeCheckpointError("the chat template is nested too deeply to compile") from e


def render_chat_template(template: str, messages: list[dict], tools: list[dict] | None = None,
                         add_generation_prompt: bool = True, **extra: Any) -> str:
    """Render `messages` (and `tools`) with a chat template; extra keywords (bos_token, eos_token,
    documents, enable_thinking ...) become template variables, as in transformers."""
    if not isinstance(template, str) or not template:
        raise ModelLoadError("the chat template is empty; use DEFAULT_CHATML_TEMPLATE for models without one")
    compiled = _compile(template)
    try:
        with render_budget(template_sandbox.LIMITS, input_chars(messages, tools, extra)) as budget:
            pieces = []
            for piece in compiled.generate(messages=messages, tools=tools or None,
                                           add_generation_prompt=add_generation_prompt, **extra):
                budget.output(piece)
                pieces.append(piece)
            return "".join(pieces)
    except HearthError:
        raise
    except SecurityError as e:
        raise UnsafeCheckpointError(f"the chat template tried an unsafe operation and was stopped: {e}") from e
    except RecursionError as e:  # a macro that calls itself without end
        raise UnsafeCheckpointError("the chat template is unsafe and was stopped: it recursed too deeply") from e
    except (OverflowError, MemoryError) as e:
        raise UnsafeCheckpointError(f"the chat template is unsafe and was stopped: {type(e).__name__}: {e}") from e
    except TemplateError as e:
        raise InvalidRequestError(f"the chat template failed on these messages: {e}", param="messages") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        # The model's template met a message shape it does not handle (e.g. list content it concatenates).
        raise InvalidRequestError(f"the chat template failed on these messages: {type(e).__name__}: {e}",
                                  param="messages") from e
