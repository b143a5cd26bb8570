"""Reward models behind the chat extension `"best_of_n"`: sample n answers, score each (prompt + answer)
with a reward model trained by `hearth train rm`, answer with the best (the LaMDA pattern).

    rewards = RewardModels(config.reward_models, config.base_dir)      # app.state.rewards
    spec = rewards.check(body.best_of_n)                               # 400s before any generation
    scores = await rewards.score(spec.name, conversations)

A reward model is loaded on first use, in the process that serves chat, and scores one batch at a time
in a worker thread, so the event loop keeps answering while it runs.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RewardModelConfig
from .errors import APIError, invalid, unavailable

log = logging.getLogger("hearth.serve")


@dataclass(frozen=True)
class BestOfN:
    name: str
    n: int


class RewardModels:
    def __init__(self, configs: list[RewardModelConfig], base_dir: Path | None = None):
        self.configs = {c.name: c for c in configs}
        self.base_dir = base_dir
        self._scorers: dict[str, Any] = {}
        self._failed: set[str] = set()
        self._lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hearth-reward")

    def check(self, spec: Any) -> BestOfN:
        """The reward model and n of a request's `best_of_n`, or a 400 naming what is wrong."""
        if not self.configs:
            raise invalid("best_of_n needs a reward model, and this server has none (reward_models in "
                          "models.yaml)", "best_of_n")
        name = spec.reward_model
        if name is None:
            if len(self.configs) > 1:
                raise invalid(f"best_of_n.reward_model is needed: this server has {', '.join(self.configs)}",
                              "best_of_n.reward_model")
            name = next(iter(self.configs))
        cfg = self.configs.get(name)
        if cfg is None:
            raise invalid(f"unknown reward model {name!r}; this server has {', '.join(self.configs)}",
                          "best_of_n.reward_model")
        if spec.n > cfg.max_n:
            raise invalid(f"best_of_n.n is at most {cfg.max_n} for {name} (max_n); got {spec.n}", "best_of_n.n")
        return BestOfN(name, spec.n)

    async def _scorer(self, name: str):
        async with self._lock:
            if name in self._scorers:
                return self._scorers[name]
            if name in self._failed:
                raise unavailable(f"the reward model {name!r} failed to load; see the server log")
            cfg = self.configs[name]
            path = Path(cfg.path)
            if not path.is_absolute() and self.base_dir is not None:
                path = self.base_dir / path

            def load():
                from hearth.runtime.reward import RewardScorer

                return RewardScorer.load(path, device="auto", max_length=cfg.max_length)

            try:
                scorer = await asyncio.get_running_loop().run_in_executor(self._pool, load)
            except Exception:  # the log has the whole error; the client gets its name only
                log.exception("loading the reward model %s failed", name)
                self._failed.add(name)
                raise unavailable(f"the reward model {name!r} failed to load; see the server log") from None
            self._scorers[name] = scorer
            return scorer

    async def score(self, name: str, conversations: list[list[dict[str, Any]]]) -> list[float]:
        scorer = await self._scorer(name)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, scorer.score_chats, conversations)
        except APIError:
            raise
        except Exception as e:
            log.exception("scoring with the reward model %s failed", name)
            raise invalid(f"the reward model {name!r} could not score these answers: {type(e).__name__}",
                          "best_of_n") from None
