"""Data mixtures shared by pretraining and SFT: sources as endless seeded streams, an interleaved schedule that
keeps each source at its weighted share, and the effective epochs per source (GPT-3's table).

    sources = [PackedSource("web", docs, eos_id, block_size=256, seed=0),       # plain text, packed blocks
               ExampleSource("belle", rows, seed=0)]                            # one example per record
    schedule = mixture_schedule([0.7, 0.3], num_items=1000, seed=0)            # [(source, index in it), ...]
    item = sources[s].item(i) for s, i in schedule
    print(format_mixture([0.7, 0.3], effective_epochs(sources, schedule)))

A source's item i comes from pass i // size over it, each pass in its own seeded order, so which item trains
at which step depends only on the seed: a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any, Sequence


class PackedSource:
    """One corpus as an endless token stream: in epoch e its documents in a seeded order, each followed by EOS.
    Block i is tokens [i*L, (i+1)*L) of the stream: every block is full, nothing is dropped."""

    def __init__(self, name: str, docs: list[list[int]], eos_id: int, block_size: int, seed: int):
        if not docs:
            raise ValueError(f"source {name!r} has no documents")
        self.name, self.block_size, self.seed = name, block_size, seed
        self.docs = [list(d) + [eos_id] for d in docs]
        self.tokens = sum(len(d) for d in self.docs)
        """Tokens in one epoch, EOS included."""
        self.size = max(1, self.tokens // block_size)
        """Blocks in about one epoch."""
        self._epochs: dict[int, list[int]] = {}

    def epoch_stream(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            order = list(range(len(self.docs)))
            random.Random(f"hearth-pretrain:{self.seed}:{self.name}:{epoch}").shuffle(order)
            if len(self._epochs) >= 2:  # blocks are read in order: the two newest epochs suffice
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = [t for i in order for t in self.docs[i]]
        return self._epochs[epoch]

    def block(self, index: int) -> list[int]:
        out: list[int] = []
        pos = index * self.block_size
        while len(out) < self.block_size:
            epoch, offset = divmod(pos + len(out), self.tokens)
            out.extend(self.epoch_stream(epoch)[offset:offset + self.block_size - len(out)])
        return out

    def item(self, index: int) -> list[int]:
        return self.block(index)

    def drawn_tokens(self, count: int) -> int:
        return count * self.block_size


class ExampleSource:
    """A list of examples (SFT rows) as an endless stream: pass e over them in a seeded order of its own."""

    def __init__(self, name: str, examples: Sequence[Any], seed: int):
        if not examples:
            raise ValueError(f"source {name!r} has no examples")
        self.name, self.examples, self.seed = name, examples, seed
        self.size = len(examples)
        self._order: tuple[int, list[int]] = (-1, [])

    def item(self, index: int) -> Any:
        epoch, pos = divmod(index, self.size)
        if self._order[0] != epoch:
            order = list(range(self.size))
            random.Random(f"hearth-mix-source:{self.seed}:{self.name}:{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self.examples[self._order[1][pos]]

    @property
    def tokens(self) -> int:
        return sum(len(row[0]) for row in self.examples)

    def drawn_tokens(self, count: int) -> int:
        return round(count * self.tokens / self.size)


def mixture_schedule(weights: list[float], num_items: int, seed: int) -> list[tuple[int, int]]:
    """(source, item index in that source) for items 0..num_items-1. Each item is drawn at random among the
    sources below their weighted share so far, with odds equal to how far below they are: the order is random,
    yet at every point each source's count is within about one item of its share. The first n entries do not
    depend on num_items, so a run extended on resume sees the same data up to where it stopped."""
    total = sum(weights)
    share = [w / total for w in weights]
    counts = [0] * len(share)
    rng = random.Random(f"hearth-mix:{seed}")
    schedule = []
    for t in range(num_items):
        behind = [max(0.0, share[k] * (t + 1) - counts[k]) for k in range(len(share))]  # these sum to >= 1
        s = rng.choices(range(len(share)), weights=behind)[0]
        schedule.append((s, counts[s]))
        counts[s] += 1
    return schedule


def effective_epochs(sources: list[Any], schedule: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """Per source: tokens in it, tokens the schedule draws from it, and their ratio (GPT-3's 'epochs')."""
    count = [0] * len(sources)
    for s, _ in schedule:
        count[s] += 1
    out = {}
    for i, src in enumerate(sources):
        drawn = src.drawn_tokens(count[i])
        out[src.name] = {"tokens": src.tokens, "drawn": drawn, "items": count[i],
                         "epochs": round(drawn / src.tokens, 3) if src.tokens else 0.0}
    return out


def format_mixture(weights: list[float], table: dict[str, dict[str, float]]) -> str:
    """The mixture as a table: each source's share, its tokens, the tokens drawn and the effective epochs."""
    total = sum(weights)
    rows = [["source", "weight", "tokens", "tokens drawn", "epochs"]]
    for w, (name, r) in zip(weights, table.items()):
        rows.append([name, f"{w / total:.3f}", str(r["tokens"]), str(r["drawn"]), f"{r['epochs']:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def mixture_counts(sizes: list[int], weights: list[float | None], epochs: list[float | None]) -> list[float]:
    """Items per source for one run through a mixture whose sources give either a number of passes (`epochs`)
    or a share of the whole (`weight`), as the SFT recipe's sources do. A source with epochs e contributes
    e * size items; the weighted sources then fill the given fractions of the total (OPT-IML: text 0.05 beside
    instruction sets taken once each). With no epochs source at all the weights are relative shares of one pass
    over everything."""
    fixed = sum(e * n for n, e in zip(sizes, epochs) if e is not None)
    weighted = [w for w in weights if w is not None]
    if fixed == 0:
        total_w = sum(weighted)
        whole = sum(sizes)
        return [whole * w / total_w for w in weights]  # type: ignore[operator]
    frac = sum(weighted)
    if frac >= 1:
        raise ValueError(f"sources: beside sources with `epochs`, the weights are fractions of the mixture "
                         f"and must sum below 1; they sum to {frac:g}")
    whole = fixed / (1 - frac)
    return [e * n if e is not None else whole * w for n, w, e in zip(sizes, weights, epochs)]  # type: ignore[operator]
