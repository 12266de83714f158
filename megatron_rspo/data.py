"""A resumable, epoch-shuffled stream of example indices, sharded over data-parallel ranks."""

from __future__ import annotations

import random


class ShuffledStream:
    """Endless stream of indices 0..n-1, reshuffled every epoch with ``seed + epoch``; rank r of w takes
    every w-th item. ``position`` (items consumed by all ranks together) is all a checkpoint needs."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n <= 0:
            raise ValueError("the data set is empty")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.position = 0
        self._epoch, self._order = -1, list(range(n))

    def _order_for(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(self.n))
            random.Random(self.seed + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, offset = divmod(self.position + self.rank, self.n)
            out.append(self._order_for(epoch)[offset])
            self.position += self.world
        return out
