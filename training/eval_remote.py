"""Multiple choice against a model behind an OpenAI-compatible URL (hearth's own server, vLLM, llama.cpp's,
a hosted API), so a checkpoint, its quantized artifact as served and a peer server land in one table.

    scorer = RemoteScorer("http://127.0.0.1:8000", "my-model", api_key=None, timeout_s=120, max_retries=3)
    probs, shots_used = scorer(question, shots)

`logprobs` asks /v1/completions for one token at temperature 0 with the top 20 logprobs and reads the four
letters' log-probabilities there; when a letter is not among them, it sends the prompt once per letter with
echo, logprobs and max_tokens 0 (what lm-eval-harness sends; hearth supports it) and reads the letter's
tokens. Either way: the same softmax over A/B/C/D that a checkpoint's logits give. A server that refuses that (chat-only APIs) is scored by
`generate`: the first letter it writes at temperature 0 counts as its answer.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np

from .eval_openai import TeacherError, base_url

LETTERS = ("A", "B", "C", "D")
TOP_LOGPROBS = (20, 5)
"""Next-token logprobs asked for: vLLM's usual cap, then OpenAI's legacy one (hearth's)."""
_LETTER = re.compile(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])")


def say(msg: str) -> None:
    print(f"eval: {msg}", file=sys.stderr, flush=True)


def sync_client(url: str, api_key: str | None, timeout_s: float, max_retries: int):
    try:
        import openai
    except ImportError:
        raise TeacherError("this command needs the `openai` package: pip install openai") from None
    key = api_key or os.environ.get("OPENAI_API_KEY") or "no-key"
    return openai.OpenAI(base_url=base_url(url), api_key=key, timeout=timeout_s, max_retries=max_retries)


def only_model(client) -> str:
    """The one chat model a server lists (for a URL given without a model name); embedding models that
    hearth lists beside it (type: embedding) do not count."""
    import openai

    try:
        names = [m.id for m in client.models.list() if getattr(m, "type", None) != "embedding"]
    except openai.APIError as e:
        raise TeacherError(f"{client.base_url}: cannot list its models ({type(e).__name__}); give --model-name") \
            from None
    if len(names) != 1:
        raise TeacherError(f"{client.base_url} serves {len(names)} models ({', '.join(names[:10])}); "
                           "say which with --model-name")
    return names[0]


def letter_of(reply: str) -> int | None:
    """The first standalone A-D in a reply ("B", " (C) ...", "答案：D"), as 0-3; None if it names none."""
    m = _LETTER.search(reply or "")
    return LETTERS.index(m.group(1)) if m else None


def _too_long(err: Exception) -> bool:
    text = str(err).lower()
    return "context length" in text or "too long" in text or "maximum context" in text


class _NoLogprobs(Exception):
    """The server answered without the prompt logprobs asked for."""


class RemoteScorer:
    """Letter probabilities from a server; `scoring` says how they were read (logprobs or generate)."""

    def __init__(self, url: str, model: str | None, api_key: str | None, timeout_s: float = 120.0,
                 max_retries: int = 3, scoring: str = "auto"):
        from .eval import AnswerTokens

        self.client = sync_client(url, api_key, timeout_s, max_retries)
        self.model = model or only_model(self.client)
        self.auto = scoring == "auto"
        self.top: tuple[int, ...] = TOP_LOGPROBS
        self.echoed = 0
        """Questions scored by the echo path (a letter was not among the next token's top logprobs)."""
        self.scoring = "generate" if scoring == "generate" else "logprobs"
        # the text a prompt ends with and the letter's prefix: " A" after "Answer:", "A" after "答案："
        self.cues = {False: AnswerTokens(" ", "", (0, 1, 2, 3)), True: AnswerTokens("", "", (0, 1, 2, 3))}

    def __call__(self, q, shots: list) -> tuple[np.ndarray | None, int]:
        import openai

        from .eval import _cue, build_prompt, is_chinese

        at = self.cues[is_chinese(_cue(q))]
        while True:
            prompt = build_prompt(q, shots, at)
            try:
                if self.scoring == "logprobs":
                    return self._logprobs(prompt, at.sep), len(shots)
                return self._generate(prompt), len(shots)
            except openai.BadRequestError as e:
                if shots and _too_long(e):  # as a checkpoint: fewer shots rather than a cut prompt
                    shots = shots[:-1]
                    continue
                self._fall_back(e)
            except (openai.NotFoundError, openai.UnprocessableEntityError, _NoLogprobs) as e:
                self._fall_back(e)
            except openai.APIError as e:
                raise TeacherError(f"{self.client.base_url} (model {self.model}): {type(e).__name__}: {e}") from e

    def _fall_back(self, err: Exception) -> None:
        if not (self.auto and self.scoring == "logprobs"):
            raise TeacherError(f"{self.client.base_url} (model {self.model}), scoring {self.scoring}: "
                               f"{type(err).__name__}: {err}") from err
        say(f"{self.client.base_url} does not score prompts ({type(err).__name__}); reading the letter the model "
            "writes instead (scoring: generate)")
        self.scoring = "generate"

    def _logprobs(self, prompt: str, sep: str) -> np.ndarray:
        x = self._next_token(prompt, sep)
        if x is None:
            self.echoed += 1
            x = self._echo(prompt, sep)
        e = np.exp(x - x.max())
        return e / e.sum()

    def _next_token(self, prompt: str, sep: str) -> np.ndarray | None:
        """The letters' logprobs among the next token's top ones (one short request); None if one is missing."""
        import openai

        while True:
            if not self.top:
                return None
            try:
                resp = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=1, temperature=0,
                                                      logprobs=self.top[0])
                break
            except openai.BadRequestError:  # a server with a lower cap: the next one, at last echo alone
                self.top = self.top[1:]
        lp = resp.choices[0].logprobs if resp.choices else None
        top = (lp.top_logprobs or [None])[0] if lp is not None else None
        if not top or any(sep + L not in top for L in LETTERS):
            return None
        return np.asarray([top[sep + L] for L in LETTERS], dtype=np.float64)

    def _echo(self, prompt: str, sep: str) -> np.ndarray:
        resp = self.client.completions.create(model=self.model, prompt=[prompt + sep + L for L in LETTERS],
                                              echo=True, logprobs=1, max_tokens=0, temperature=0)
        choices = sorted(resp.choices, key=lambda c: c.index)
        if len(choices) != 4:
            raise _NoLogprobs(f"{len(choices)} choices for 4 prompts")
        totals = []
        for ch in choices:
            lp = ch.logprobs
            if lp is None or not lp.text_offset or not lp.token_logprobs:
                raise _NoLogprobs("no prompt logprobs in the reply")
            # the tokens that cover the appended letter: from the last one starting at or before its offset
            k = max(i for i, off in enumerate(lp.text_offset) if off <= len(prompt))
            if any(v is None for v in lp.token_logprobs[k:]):
                raise _NoLogprobs("a letter token without a logprob")
            totals.append(sum(lp.token_logprobs[k:]))
        return np.asarray(totals, dtype=np.float64)

    def _generate(self, prompt: str) -> np.ndarray | None:
        import openai

        try:
            resp = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=4, temperature=0)
            text = resp.choices[0].text if resp.choices else ""
        except openai.NotFoundError:  # a chat-only API
            resp = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0)
            text = (resp.choices[0].message.content or "") if resp.choices else ""
        k = letter_of(text)
        return None if k is None else np.eye(4)[k]

    def close(self) -> None:
        self.client.close()
