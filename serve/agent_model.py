"""The served model as the agents' ChatModel: each call runs the /v1/chat/completions path in process.

    model = ServedChatModel(router, "smollm2-135m-instruct", metrics, deadline=time.monotonic() + 60)
    replies = await model.chat([{"role": "user", "content": "2+2?"}], tools=registry.schemas())

The router's clients are the in-process ModelServices (`--no-ray`) or Ray Serve deployment handles (inside
the agents deployment), so agent loops reach the models exactly as HTTP clients do: same chat template,
tool rendering and parsing, guided decoding for forced tool calls, limits and metrics.
"""

from __future__ import annotations

import time
from typing import Any

from hearth.agents.model import ChatReply, replies_from_response, request_fields
from hearth.agents.types import AgentError
from hearth.runtime.errors import HearthError
from pydantic import ValidationError

from . import chat as chat_route
from . import errors
from .common import Run, start_all
from .metrics import Metrics
from .protocol import ChatCompletionRequest
from .router import Router


class ServedChatModel:
    """agents.model.ChatModel over one served chat model, with a deadline shared by every call of a run."""

    def __init__(self, router: Router, model: str, metrics: Metrics, deadline: float):
        self.router, self.model, self.metrics, self.deadline = router, model, metrics, deadline
        self.client, self.info = router.chat_model(model)  # an unknown model is a 404 before anything runs

    async def chat(self, messages, *, tools=None, tool_choice=None, temperature=None, top_p=None,
                   max_tokens=None, n=1, seed=None, stop=None, response_format=None) -> list[ChatReply]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "n": n,
                                **request_fields(tools=tools, tool_choice=tool_choice, temperature=temperature,
                                                 top_p=top_p, max_tokens=max_tokens, seed=seed, stop=stop,
                                                 response_format=response_format)}
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as e:  # the agent built it: a bug or a bad tool schema, not the client's fault
            raise AgentError(f"an agent step built an invalid chat request: {e.errors()[0].get('msg')}") from None
        try:
            plan = chat_route.plan_chat(req, self.info)
        except HearthError as e:
            raise errors.from_exception(e) from None
        run = Run(self.client, plan.request, model=self.model, metrics=self.metrics, t0=time.monotonic(),
                  deadline=self.deadline)
        try:
            await start_all([run])
            resp = await chat_route.complete(run, plan, self.model)
        finally:
            await run.close()
        return replies_from_response(resp)
