"""Key/value caches: an LRU of recent prompts' caches under a byte budget, and cache tensor helpers."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens two id sequences share."""
    size = 0
    for x, y in zip(a, b):
        if x != y:
            break
        size += 1
    return size


def block_bounds(length: int, big: int = 256, small: int = 32) -> list[int]:
    """Where prefill blocks start (and the prompt ends): big blocks first, small ones for the tail."""
    big_end = length - length % big
    return [*range(0, big_end, big), *range(big_end, length, small), length]


def reusable_bound(cached_ids: Sequence[int], cached_bounds: Sequence[int], ids: Sequence[int],
                   bounds: Sequence[int]) -> int:
    """Index into ``bounds`` of the last block bound up to which a cached prompt's keys/values can be kept.

    Reuse stops where the two prompts' tokens or block layouts part, and before the
    last token (which must be fed again to get the next token's logits).
    """
    limit = min(common_prefix_length(cached_ids, ids), len(ids) - 1)
    index = 0
    for i, (old, new) in enumerate(zip(cached_bounds, bounds)):
        if old != new or new > limit:
            break
        index = i
    return index


def layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer, each [batch, heads, length, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class GrowingLayer(DynamicLayer):
    """A cache layer that writes new positions into spare room instead of copying itself per token.

    transformers' DynamicLayer concatenates, so each decode step copies the layer's
    whole cache: with a 1000-token prompt that is more bytes than the weights of a
    small model. Here the buffer grows by half its size when full.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self._key_buffer = self._value_buffer = None
        self.keys, self.values = keys[:, :, :0], values[:, :, :0]
        self._append(keys, values)

    @classmethod
    def stacked(cls, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]], length: int) -> "GrowingLayer":
        """A layer holding ``blocks`` (keys and values, each [rows, heads, len, head_dim]) one under another,
        right-aligned at ``length`` and zero on the left, copied once into buffers with room to grow.

        Joining a sequence to the decode batch used to pad and concatenate every row (one copy)
        and then copy that into a growing layer (a second one): with one 3,000-token row in a
        batch of 8, each join moved ~2 GB and held 3.5× the batch's cache at once.
        """
        keys, values = blocks[0]
        rows = sum(k.shape[0] for k, _ in blocks)
        capacity = length + max(64, length // 2)
        # Zeros, not garbage, on the left: a masked position still multiplies its value by 0.
        key_buffer = keys.new_zeros((rows, keys.shape[1], capacity, keys.shape[3]))
        value_buffer = values.new_zeros((rows, values.shape[1], capacity, values.shape[3]))
        row = 0
        for block_keys, block_values in blocks:
            count, size = block_keys.shape[0], block_keys.shape[2]
            key_buffer[row:row + count, :, length - size:length] = block_keys
            value_buffer[row:row + count, :, length - size:length] = block_values
            row += count
        layer = cls.__new__(cls)
        DynamicLayer.__init__(layer)
        layer.lazy_initialization(keys, values)
        layer._key_buffer, layer._value_buffer = key_buffer, value_buffer
        layer.keys, layer.values = key_buffer[:, :, :length], value_buffer[:, :, :length]
        return layer

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        length = self.keys.shape[2]
        end = length + keys.shape[2]
        if self._key_buffer is None or end > self._key_buffer.shape[2]:
            capacity = end + max(64, end // 2)
            key_buffer = keys.new_empty((*keys.shape[:2], capacity, keys.shape[3]))
            value_buffer = values.new_empty((*values.shape[:2], capacity, values.shape[3]))
            key_buffer[:, :, :length] = self.keys
            value_buffer[:, :, :length] = self.values
            self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self._key_buffer[:, :, length:end] = keys
        self._value_buffer[:, :, length:end] = values
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions; return all keys and values."""
        self._append(key_states, value_states)
        return self.keys, self.values


def cache_from_tensors(tensors: Sequence[tuple[torch.Tensor, torch.Tensor]], growing: bool = False) -> DynamicCache:
    """A new DynamicCache over the given per-layer keys and values.

    Plain layers reference the tensors (no copy); ``growing`` layers copy them into
    buffers with room for the tokens still to come.
    """
    cache = DynamicCache()
    for keys, values in tensors:
        if growing:
            layer = GrowingLayer(keys, values)
        else:
            layer = DynamicLayer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by a cache's keys and values."""
    return sum(k.nbytes + v.nbytes for k, v in layer_tensors(cache))


def is_plain(cache: DynamicCache) -> bool:
    """Whether every layer is a full (not sliding-window or quantized) layer that can be cut and joined."""
    return all(layer.is_croppable and not layer.is_sliding for layer in cache.layers)


@dataclass
class Entry:
    """One cached prompt: its token ids, its prefill block bounds and its keys/values (batch 1)."""

    ids: tuple[int, ...]
    bounds: tuple[int, ...]
    cache: DynamicCache
    nbytes: int


class PrefixCache:
    """The keys/values of recent prompts, least recently used dropped first to stay under a byte budget.

    Editors send a new request at almost every keystroke, each prompt extending (or
    slightly editing) an earlier one; starting from the best cached prefix turns a
    full prefill into a few blocks of work. Entries are never changed in place: a
    reuse takes a prefix of the tensors, and the cache that grows from it is new.
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0
        self._lock = threading.Lock()  # prompt blocks may finish on the scheduler's helper thread

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, ids: Sequence[int], bounds: Sequence[int]) -> tuple[int, DynamicCache | None]:
        """Best reusable block index into ``bounds`` and a new cache holding that prefix (None: nothing)."""
        with self._lock:
            return self._lookup(ids, bounds)

    def _lookup(self, ids: Sequence[int], bounds: Sequence[int]) -> tuple[int, DynamicCache | None]:
        best, found = 0, None
        for entry in self.entries.values():
            index = reusable_bound(entry.ids, entry.bounds, ids, bounds)
            if index > best:
                best, found = index, entry
        if found is None:
            self.misses += 1
            return 0, None
        self.hits += 1
        self.entries.move_to_end(found.ids)
        length = bounds[best]
        return best, cache_from_tensors([(k[:, :, :length], v[:, :, :length]) for k, v in layer_tensors(found.cache)])

    def store(self, ids: Sequence[int], bounds: Sequence[int], cache: DynamicCache) -> None:
        """Keep ``cache`` (exactly the keys/values of ``ids``) for later prompts, evicting old ones."""
        with self._lock:
            self._store(ids, bounds, cache)

    def _store(self, ids: Sequence[int], bounds: Sequence[int], cache: DynamicCache) -> None:
        if not is_plain(cache):
            return
        key = tuple(ids)
        nbytes = cache_bytes(cache)
        if nbytes > self.budget:
            return
        bounds = tuple(bounds)
        # An entry whose tokens and block bounds both begin the new one offers nothing it does not.
        for old in [e for e in self.entries.values()
                    if e.ids == key[:len(e.ids)] and e.bounds == bounds[:len(e.bounds)]]:
            del self.entries[old.ids]
            self.nbytes -= old.nbytes
        self.entries[key] = Entry(key, bounds, cache, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget:
            _, evicted = self.entries.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self.entries.clear()
            self.nbytes = 0
