"""Which vocabulary rows each rank of the group holds: contiguous shards in rank order, sizes may differ."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

Tensor = torch.Tensor

#: The largest vocabulary: ids travel as floats in the top-K exchange (exact below 2**24 in float32).
MAX_VOCAB = 2**24


@dataclass(frozen=True)
class ShardLayout:
    """This rank's place in the vocabulary group: rank ``rank`` of ``world`` holds global rows
    [offset, offset + local) of a vocabulary of ``vocab = sum(sizes)`` rows."""

    group: Any
    rank: int
    world: int
    sizes: tuple[int, ...]

    @property
    def offset(self) -> int:
        """The global id of this rank's first row."""
        return sum(self.sizes[: self.rank])

    @property
    def local(self) -> int:
        """This rank's number of rows (V_r)."""
        return self.sizes[self.rank]

    @property
    def vocab(self) -> int:
        """The whole vocabulary (V)."""
        return sum(self.sizes)

    def topk_widths(self, k: int) -> list[int]:
        """Each rank's local top-K width min(k, V_r): a global top-k takes at most that many of its rows."""
        return [min(k, size) for size in self.sizes]

    def localize(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Global ids -> (local row ids, clamped into [0, V_r) so that gathers stay in range; owned mask)."""
        local = ids - self.offset
        owned = (local >= 0) & (local < self.local)
        return torch.where(owned, local, 0), owned


# Shard sizes per group and local size, learnt from the last exchange (validation.py); read when
# ``check_values=False`` skips the exchange, so that a trusted call costs no host synchronisation.
_SIZES: "weakref.WeakKeyDictionary[Any, dict[int, tuple[int, ...]]]" = weakref.WeakKeyDictionary()


def cached_sizes(group: Any, local: int) -> Optional[tuple[int, ...]]:
    """The shard sizes last exchanged on ``group`` by a call whose local shard had ``local`` rows, or None."""
    return _SIZES.get(group, {}).get(local)


def remember_sizes(group: Any, sizes: tuple[int, ...], rank: int) -> None:
    """Store ``sizes`` for later calls on ``group`` with the same local shard size."""
    _SIZES.setdefault(group, {})[sizes[rank]] = sizes
