"""NaViT-style packing: whole videos of mixed sizes into fixed token budgets.

Streaming first-fit-decreasing: keep a lookahead buffer of videos, sort it by token count
(largest first), and place each into the first open bin with room. A bin is emitted when
the buffer cannot fill it further. Padding is only added up to a multiple (what sequence
parallelism needs) and the remainder of the budget of a final, partial bin.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator


@dataclass
class Item:
    """One video as the packer sees it: its token count and an opaque payload."""
    key: str
    tokens: int
    payload: Any = None


@dataclass
class Bin:
    budget: int
    items: list[Item] = field(default_factory=list)
    used: int = 0

    def room(self) -> int:
        return self.budget - self.used

    def add(self, it: Item) -> None:
        self.items.append(it)
        self.used += it.tokens


class Packer:
    """Streaming FFD packer. `push` items, `pop_ready` full bins, `flush` at the end.

    State (the buffered items and open bins) is plain data so the loader can checkpoint it.
    """

    def __init__(self, budget: int, lookahead: int = 64, max_open: int = 4, fill: float = 0.98):
        if budget < 1:
            raise ValueError(f"train.tokens_per_batch must be positive, got {budget}")
        self.budget, self.lookahead, self.max_open, self.fill = budget, lookahead, max_open, fill
        self.buffer: list[Item] = []
        self.open: list[Bin] = []

    def push(self, it: Item) -> None:
        if it.tokens > self.budget:
            raise ValueError(f"video {it.key!r} has {it.tokens} tokens, more than the micro-batch budget "
                             f"train.tokens_per_batch={self.budget}: raise the budget, use sequence "
                             f"parallelism with a larger budget, or drop tokens (data.drop_tokens)")
        self.buffer.append(it)

    def _place(self, force: bool) -> list[Bin]:
        ready = []
        self.buffer.sort(key=lambda i: -i.tokens)
        rest = []
        for it in self.buffer:
            for b in self.open:
                if b.room() >= it.tokens:
                    b.add(it)
                    break
            else:
                if len(self.open) < self.max_open or force:
                    b = Bin(self.budget)
                    b.add(it)
                    self.open.append(b)
                else:
                    rest.append(it)
        self.buffer = rest
        # emit bins that are full enough, or the fullest when too many are open
        keep = []
        for b in sorted(self.open, key=lambda b: -b.used):
            smallest = min((i.tokens for i in self.buffer), default=self.budget + 1)
            if b.used >= self.fill * self.budget or b.room() < smallest and self.buffer or force:
                ready.append(b)
            else:
                keep.append(b)
        self.open = keep
        return ready

    def pop_ready(self) -> list[Bin]:
        if len(self.buffer) < self.lookahead:
            return []
        return self._place(force=False)

    def flush(self) -> list[Bin]:
        out = []
        while self.buffer or self.open:
            out += self._place(force=True)
        return out


def pack_all(items: Iterable[Item], budget: int, lookahead: int = 64) -> Iterator[Bin]:
    p = Packer(budget, lookahead)
    for it in items:
        p.push(it)
        yield from p.pop_ready()
    yield from p.flush()
