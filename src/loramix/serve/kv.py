"""RowCache: the key-value cache of a running batch whose rows join and leave between decoding steps.

Rows are right-aligned: each row's tokens end at the last column and `mask` (B, L) marks its real ones, so one
decoding step appends one column for every row. A row that joins is left-padded to the batch's length (or the
batch to the row's); a row that leaves is dropped, and columns that no remaining row uses are cut from the left.
Positions are kept per row (`lengths`), since a row's position is its count of real tokens, not its column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache


class RowCache:
    """A DynamicCache of full-attention layers with its 2-D attention mask and each row's token count."""

    def __init__(self, cache: DynamicCache, mask: Tensor) -> None:
        if any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise ValueError(f"the server keeps full-attention key-value caches only; this model's has {kinds}")
        self.cache, self.mask = cache, mask
        self.lengths = mask.sum(-1)

    def step_inputs(self) -> tuple[Tensor, Tensor]:
        """(attention mask, position ids) of a decoding step that adds one token to every row."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = self.lengths.unsqueeze(-1)
        self.lengths = self.lengths + 1
        return self.mask, positions

    def keep(self, rows: Tensor) -> None:
        """Keep only the batch rows `rows` (in that order), and cut the columns none of them uses."""
        mask = self.mask[rows]
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        self.mask, self.lengths = mask[:, start:], self.lengths[rows]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[rows, :, start:], layer.values[rows, :, start:]

    @staticmethod
    def join(caches: Sequence[RowCache]) -> RowCache:
        """The rows of `caches` one after the other in one cache, right-aligned (the shorter ones left-padded)."""
        if len(caches) == 1:
            return caches[0]
        length = max(cache.mask.shape[1] for cache in caches)
        layers = []
        for index in range(len(caches[0].cache.layers)):
            parts = [cache.cache.layers[index] for cache in caches]
            keys = torch.cat([_left_pad(part.keys, length) for part in parts])
            values = torch.cat([_left_pad(part.values, length) for part in parts])
            layers.append((keys, values))
        mask = torch.cat([F.pad(cache.mask, (length - cache.mask.shape[1], 0)) for cache in caches])
        return RowCache(DynamicCache(layers), mask)


def _left_pad(states: Tensor, length: int) -> Tensor:
    """(B, heads, T, d) states with zeros before them up to `length` positions."""
    return F.pad(states, (0, 0, length - states.shape[2], 0))
