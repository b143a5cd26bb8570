"""POST /tokenize and /detokenize, in vLLM's shapes: a prompt's token ids (or a chat request's prompt
token count, its template and tools applied) without generating, and token ids back to text.

    POST /tokenize   {"model", "prompt"} | {"model", "messages", "tools", "add_generation_prompt"}
                     -> {"count", "max_model_len", "tokens"}
    POST /detokenize {"model", "tokens"} -> {"prompt"}

Both take the API key and the request caps of chat and completions; the work runs in the model's
prompt worker pool (ModelService.prompt_ids / detokenize), through the deployment handle under Ray.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from hearth.runtime.errors import HearthError
from hearth.runtime.prompt import PromptRequest

from . import limits
from .chat import plan_chat
from .deps import AUTH, chat_model, current_router
from .errors import from_exception, invalid
from .protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest

router = APIRouter(dependencies=AUTH)


def _model(request: Request, body):
    if body.model is None:  # vLLM lets it out; fine while there is only one chat model
        chat = current_router(request.app).chat
        if len(chat) != 1:
            raise invalid("model is required: this server serves several chat models", "model")
        body.model = next(iter(chat))
    return chat_model(request.app, body, "tokenize")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    client, info = _model(request, body)
    config = request.app.state.config
    if (body.prompt is None) == (body.messages is None):
        raise invalid("give exactly one of prompt or messages", "prompt")
    try:
        if body.prompt is not None:
            limits.check_chars(len(body.prompt), config, "prompt")
            if not body.prompt:
                raise invalid("prompt must not be empty", "prompt")
            req = PromptRequest(prompt=body.prompt)
        else:
            chat = ChatCompletionRequest(model=body.model, messages=body.messages, tools=body.tools)
            limits.check_chat(chat, config, info.max_model_len)
            req = plan_chat(chat, info).request
            req.add_generation_prompt = body.add_generation_prompt
        ids = await client.prompt_ids(req)
    except HearthError as e:
        raise from_exception(e, "prompt" if body.prompt is not None else "messages") from None
    return {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids, "token_strs": None}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    client, info = _model(request, body)
    limits.check_chars(len(body.tokens), request.app.state.config, "tokens")
    bad = [t for t in body.tokens if t < 0 or t >= info.vocab_size]
    if bad:
        raise invalid(f"token id {bad[0]} is outside the vocabulary (size {info.vocab_size})", "tokens")
    try:
        text = await client.detokenize(list(body.tokens))
    except HearthError as e:
        raise from_exception(e, "tokens") from None
    return {"prompt": text}
