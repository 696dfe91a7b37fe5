"""The cache of an M2 model's filter spectra: one `FilterCache` per model, shared by all its implicit filters.

A filter's kernel spectrum depends on its weights and the sequence length only, not on the input, so in inference it
can be computed once per length and reused; at long lengths it is large (``hidden x (L + 1)`` complex values per
filter: 100 MB for hidden 768 at 16384 tokens, 2.4 GB for the 24 filters of M2-BERT-base). The cache therefore has a
byte budget (the config's ``filter_cache_bytes``): what does not fit is computed when a layer needs it and freed after
the layer.

Entries are validated on every lookup against everything a spectrum depends on: the length and kind of the entry,
each parameter and buffer of the filter (identity, in-place version, shape, dtype, device), and the autocast dtype
(under which the filter MLP runs in lower precision). Nothing is read from or written to the cache while autograd
records the filter (training): the spectra must then be computed with the graph.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from .configuration_m2_common import DEFAULT_FILTER_CACHE_BYTES, check_filter_cache_bytes
from .m2_mixer import HyenaFilter, filter_dependencies

__all__ = ["DEFAULT_FILTER_CACHE_BYTES", "FilterCache", "FilterCacheMixin", "filter_dependencies"]


class _Entry(NamedTuple):
    owner: weakref.ref
    dependencies: tuple
    value: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.value.numel() * self.value.element_size()


class FilterCache:
    """Filter spectra reused across inference forwards, within ``max_bytes`` (None: no limit).

    When a new entry does not fit, entries of other lengths are evicted, least recently used first. Entries of the
    same length are not evicted for each other: a forward visits every filter in turn, so evicting the least recently
    used would keep none; instead the first filters of a forward stay cached and the rest are computed per forward.
    """

    def __init__(self, max_bytes: Optional[int] = DEFAULT_FILTER_CACHE_BYTES) -> None:
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.max_bytes = max_bytes

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) starts empty: the entries belong to the original's filters.
        return {"_max_bytes": self._max_bytes, "_entries": OrderedDict()}

    @property
    def max_bytes(self) -> Optional[int]:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: Optional[int]) -> None:
        check_filter_cache_bytes(value)
        self._max_bytes = value
        while self._entries and not self._fits(0):
            self._entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry (their memory is freed once no forward uses them)."""
        self._entries.clear()

    def discard(self, owner: nn.Module) -> None:
        """Drop the entries of one filter."""
        for slot in [slot for slot, entry in self._entries.items() if entry.owner() is owner]:
            del self._entries[slot]

    def get_or_compute(self, owner: nn.Module, kind: str, length: int, compute: Callable[[], torch.Tensor]):
        """``owner``'s tensor ``kind`` for ``length`` tokens: the cached one while nothing it depends on has changed,
        else ``compute()``, stored if the budget allows. Skipped while torch.compile or torch.export traces (tracing
        sees no real tensors, and a compiled graph must not depend on Python-side state)."""
        if torch.compiler.is_compiling():
            return compute()
        dependencies = filter_dependencies(owner)
        if dependencies is None:
            return compute()
        slot = (id(owner), kind, length)
        entry = self._entries.get(slot)
        if entry is not None and entry.owner() is owner and entry.dependencies == dependencies:
            self._entries.move_to_end(slot)
            return entry.value
        self._entries.pop(slot, None)  # stale, or left by a filter that no longer exists
        value = compute()
        self._store(slot, _Entry(weakref.ref(owner), dependencies, value))
        return value

    def _fits(self, extra: int) -> bool:
        return self._max_bytes is None or self.nbytes + extra <= self._max_bytes

    def _store(self, slot: tuple, entry: _Entry) -> None:
        length = slot[2]
        for other in [s for s in self._entries if s[2] != length]:  # least recently used first
            if self._fits(entry.nbytes):
                break
            del self._entries[other]
        if self._fits(entry.nbytes):
            self._entries[slot] = entry


class FilterCacheMixin:
    """Gives a model one `FilterCache` (budget: ``config.filter_cache_bytes``), attached to every implicit filter
    it contains, including those of a backbone that has its own (the outermost model's wins)."""

    def post_init(self) -> None:
        super().post_init()
        budget = getattr(self.config, "filter_cache_bytes", DEFAULT_FILTER_CACHE_BYTES)
        cache = FilterCache(budget)
        for module in self.modules():
            if isinstance(module, HyenaFilter):
                module.filter_cache = cache
            elif isinstance(module, FilterCacheMixin):
                module._filter_cache = cache

    @property
    def filter_cache(self) -> FilterCache:
        """The cache of this model's filter spectra (set ``max_bytes`` to change its budget)."""
        return self._filter_cache

    def clear_filter_cache(self) -> None:
        """Free the cached filter spectra, for example before moving on to other work in the same process."""
        self._filter_cache.clear()
