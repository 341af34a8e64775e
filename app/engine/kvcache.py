"""Key/value caches: an LRU of recent prompts' caches under a byte budget, the decode batch's layers, and helpers."""
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


def cache_from_tensors(tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A new DynamicCache over the given per-layer keys and values (referenced, not copied)."""
    cache = DynamicCache()
    for keys, values in tensors:
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

    def prompts(self) -> list[tuple[int, ...]]:
        """The token ids of every cached prompt, most recently used last."""
        with self._lock:
            return list(self.entries)

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


class BatchLayer(DynamicLayer):
    """One layer of the decode batch's cache: rows that join and leave without copying the others.

    Rows live in buffers with spare rows and columns. Every row ends at the same column
    (the next token of every row is written there); shorter rows are zero on the left and
    masked. A joining sequence is written into the next free rows (its own tokens only:
    before, each join copied the whole batch, ~1 s per join beside one 3,000-token row);
    a leaving one is overwritten by moving up the rows after it; columns only padding uses
    are dropped by moving ``start``, without a copy.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        margin = keys.shape[2] // 8
        self._key_buffer, self._value_buffer = self._allocate(keys, values, keys.shape[0], keys.shape[2], margin)
        self.rows, self.start = 0, margin + keys.shape[2]
        self.end = self.start
        self._refresh()
        self.add_rows(keys, values)

    @staticmethod
    def _allocate(keys, values, rows: int, columns: int, margin: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers for ``rows`` rows and ``columns`` columns, ``margin`` spare on the left.

        Left uninitialised: every region becomes visible only after it is written or zeroed
        (a batch-1 request paid ~0.3 s at its first token zeroing spare rows and columns).
        """
        # A quarter more columns to append into before the buffers move again (every copy is of
        # the whole batch), and the caller's margin on the left for a longer row to join.
        column_capacity = margin + columns + max(64, columns // 4)
        return (keys.new_empty((rows, keys.shape[1], column_capacity, keys.shape[3])),
                values.new_empty((rows, values.shape[1], column_capacity, values.shape[3])))

    def _refresh(self) -> None:
        self.keys = self._key_buffer[:self.rows, :, self.start:self.end]
        self.values = self._value_buffer[:self.rows, :, self.start:self.end]

    def _regrow(self, rows: int, length: int) -> None:
        """Move the rows into buffers with room for ``rows`` rows of ``length`` columns (an eighth spare on the left)."""
        margin = length // 8
        keys, values = self._allocate(self.keys, self.values, rows, length, margin)
        start = margin + length - (self.end - self.start)
        keys[:self.rows, :, start:margin + length] = self.keys
        values[:self.rows, :, start:margin + length] = self.values
        self._key_buffer, self._value_buffer = keys, values
        self.start, self.end = start, margin + length
        self._refresh()

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows ([rows, heads, length, head_dim]; a view such as ``expand`` is fine) ending at ``end``."""
        count, length = keys.shape[0], keys.shape[2]
        needed = max(length, self.end - self.start)
        if self.rows + count > self._key_buffer.shape[0] or length > self.end:
            # Room for twice the rows: a batch growing to 8 rows moves its cache 3 times, not 7.
            self._regrow(max(self.rows + count, 2 * self._key_buffer.shape[0]), needed)
        start = min(self.start, self.end - length)
        # Columns newly inside the window may hold what earlier rows left there.
        self._key_buffer[:self.rows, :, start:self.start] = 0
        self._value_buffer[:self.rows, :, start:self.start] = 0
        new = slice(self.rows, self.rows + count)
        self._key_buffer[new, :, start:self.end - length] = 0
        self._value_buffer[new, :, start:self.end - length] = 0
        self._key_buffer[new, :, self.end - length:self.end] = keys
        self._value_buffer[new, :, self.end - length:self.end] = values
        self.rows, self.start = self.rows + count, start
        self._refresh()

    def keep_rows(self, rows: Sequence[int], drop_columns: int = 0) -> None:
        """Keep the given rows (ascending), moved up in place; drop the first ``drop_columns`` columns."""
        self.start += drop_columns
        for target, source in enumerate(rows):
            if source != target:  # source > target (ascending): never overwrites a row still to move
                self._key_buffer[target, :, self.start:self.end] = self._key_buffer[source, :, self.start:self.end]
                self._value_buffer[target, :, self.start:self.end] = self._value_buffer[source, :, self.start:self.end]
        self.rows = len(rows)
        self._refresh()

    def extend(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's keys and values with ``columns`` more at the end, for the caller to fill in place."""
        if self.end + columns > self._key_buffer.shape[2]:
            self._regrow(self._key_buffer.shape[0], self.end - self.start + columns)
        self.end += columns
        self._refresh()
        return self.keys, self.values

    def drop_last(self, columns: int) -> None:
        """Forget the last ``columns`` columns of every row (drafts no row accepted)."""
        self.end -= columns
        self._refresh()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append positions to every row; return all keys and values."""
        keys, values = self.extend(key_states.shape[2])
        keys[:, :, -key_states.shape[2]:] = key_states
        values[:, :, -value_states.shape[2]:] = value_states
        return keys, values
