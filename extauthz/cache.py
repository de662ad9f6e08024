"""A bounded local cache of key and team records in front of the Redis store.

Entries are dropped by Redis's own invalidation messages (see invalidation.py), so the
cache is consulted only while that channel is live; otherwise every lookup reads Redis.
Unknown keys are cached too, briefly, so floods of bad keys do not reach Redis.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable

from extauthz.records import KeyRecord, TeamRecord
from extauthz.store import RedisStore

MISS = object()


class RecordCache:
    def __init__(self, max_entries: int, negative_ttl_s: float) -> None:
        self.max_entries = max_entries
        self.negative_ttl_s = negative_ttl_s
        # Redis key -> record, or the monotonic deadline of a "no such record" entry.
        self._entries: OrderedDict[str, object] = OrderedDict()
        # Bumped by every invalidation: a read that overlapped one must not fill the cache
        # with what may be the value from before the change.
        self.epoch = 0
        self.trusted = False
        self.hits = self.misses = self.evictions = self.invalidations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, redis_key: str) -> object:
        entry = self._entries.get(redis_key, MISS)
        if entry is MISS:
            self.misses += 1
            return MISS
        if type(entry) is float:
            if entry < time.monotonic():
                del self._entries[redis_key]
                self.misses += 1
                return MISS
            entry = None
        self._entries.move_to_end(redis_key)
        self.hits += 1
        return entry

    def put(self, redis_key: str, record: object | None, epoch: int) -> None:
        if epoch != self.epoch or not self.trusted or self.max_entries <= 0:
            return
        self._entries[redis_key] = record if record is not None else time.monotonic() + self.negative_ttl_s
        self._entries.move_to_end(redis_key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def invalidate(self, redis_keys: list[str] | None) -> None:
        """Drop these keys, or everything (``None``: Redis was flushed)."""
        self.epoch += 1
        self.invalidations += 1
        if redis_keys is None:
            self._entries.clear()
            return
        for redis_key in redis_keys:
            self._entries.pop(redis_key, None)

    def distrust(self) -> None:
        """The invalidation channel is down: forget everything and stop serving from memory."""
        self.trusted = False
        self.invalidate(None)


class CachedStore:
    """A RecordStore that answers from the cache when it can, from Redis otherwise."""

    def __init__(self, store: RedisStore, cache: RecordCache) -> None:
        self.store = store
        self.cache = cache

    async def _lookup(self, redis_key: str, load: Callable[[], Awaitable[Any]]) -> Any:
        cache = self.cache
        if cache.trusted:
            entry = cache.get(redis_key)
            if entry is not MISS:
                return entry
        epoch = cache.epoch
        record = await load()
        cache.put(redis_key, record, epoch)
        return record

    async def get_key(self, token_hash: str) -> KeyRecord | None:
        return await self._lookup(self.store.key_id(token_hash), lambda: self.store.get_key(token_hash))

    async def get_team(self, team_id: str) -> TeamRecord | None:
        return await self._lookup(self.store.team_id(team_id), lambda: self.store.get_team(team_id))
