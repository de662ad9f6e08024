"""A bounded local cache of key, team and user records in front of the Redis store.

Entries are dropped by Redis's own invalidation messages (see invalidation.py), so the
cache answers only while that channel is live; otherwise every lookup reads Redis.
Unknown keys are cached too, briefly, so floods of bad keys do not reach Redis.

When Redis cannot answer, a key already cached keeps being decided from its cached
record for at most ``max_stale_s`` after the channel went down (each such lookup is
counted); anything else fails closed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable, NamedTuple, Protocol

from extauthz.domain.record import KeyRecord, TeamRecord, UserRecord
from extauthz.records.store import RecordReader, StoreUnavailable

MISS = object()
RETRY_AFTER_FAILURE_S = 0.25
FAILURES_BEFORE_FAIL_FAST = 3
Clock = Callable[[], float]


class Absent(NamedTuple):
    """A cached "no such record", remembered until ``until`` (monotonic seconds)."""

    until: float


class RecordCache:
    """The cache's state, changed only through these methods; ``clock`` is injected so
    the rules (negative TTL, stale window, fail-fast) are testable without waiting."""

    def __init__(self, max_entries: int, negative_ttl_s: float, max_stale_s: float = 60.0,
                 clock: Clock = time.monotonic) -> None:
        self.max_entries = max_entries
        self.negative_ttl_s = negative_ttl_s
        self.max_stale_s = max_stale_s
        self.clock = clock
        self.untrusted_since = clock()
        # Redis key -> record row, or Absent.
        self._entries: OrderedDict[str, object] = OrderedDict()
        # Bumped by every invalidation: a read that overlapped one must not fill the cache
        # with what may be the value from before the change.
        self.epoch = 0
        self.trusted = False
        # Until then lookups do not try Redis (set after repeated failures, cleared when it is back).
        self.redis_down_until = 0.0
        self.consecutive_failures = 0
        self.hits = self.misses = self.evictions = self.invalidations = self.stale_served = 0
        self.redis_errors = 0
        self.times_trusted = 0  # how often the invalidation channel came (back) up

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, redis_key: str) -> object:
        entry = self._entries.get(redis_key, MISS)
        if entry is MISS:
            self.misses += 1
            return MISS
        if type(entry) is Absent:
            if entry.until < self.clock():
                del self._entries[redis_key]
                self.misses += 1
                return MISS
            entry = None
        self._entries.move_to_end(redis_key)
        self.hits += 1
        return entry

    def stale(self, redis_key: str) -> object:
        """A cached record to decide with while Redis is unreachable, within max_stale_s."""
        entry = self._entries.get(redis_key, MISS)
        if entry is MISS or type(entry) is Absent or self.trusted \
                or self.clock() - self.untrusted_since > self.max_stale_s:
            return MISS
        self.stale_served += 1
        return entry

    def put(self, redis_key: str, record: object | None, epoch: int) -> None:
        # Also while distrusted: a fresh read keeps the stale fallback as recent as possible
        # (a revocation read from Redis must not be undone by an older entry).
        if epoch != self.epoch or self.max_entries <= 0:
            return
        self._entries[redis_key] = record if record is not None else Absent(self.clock() + self.negative_ttl_s)
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

    def mark_trusted(self) -> None:
        """The invalidation channel is up: whatever changed while nobody listened is
        unknown, so start empty, then answer from memory."""
        self.invalidate(None)
        self.trusted = True
        self.times_trusted += 1
        self.redis_down_until = 0.0
        self.consecutive_failures = 0

    def distrust(self) -> None:
        """The invalidation channel is down: stop answering from memory. Entries stay, as
        the fallback while Redis is unreachable; they are flushed before trust returns."""
        if self.trusted:
            self.untrusted_since = self.clock()
        self.trusted = False
        self.epoch += 1

    def redis_down(self) -> bool:
        """Whether lookups should skip Redis for now (fail fast)."""
        return self.clock() < self.redis_down_until

    def record_failure(self) -> None:
        """A Redis lookup failed: after a few in a row, stop trying for a moment instead of
        making every check wait for the timeout."""
        self.redis_errors += 1
        self.consecutive_failures += 1
        if self.consecutive_failures >= FAILURES_BEFORE_FAIL_FAST:
            self.redis_down_until = self.clock() + RETRY_AFTER_FAILURE_S

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def stats(self) -> dict[str, int | bool]:
        return {"entries": len(self._entries), "trusted": self.trusted, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "invalidations": self.invalidations,
                "stale_served": self.stale_served, "redis_errors": self.redis_errors,
                "times_trusted": self.times_trusted}


class BackingStore(RecordReader, Protocol):
    """A reader whose records have ids, which the cache keys its entries by."""

    def key_id(self, token_hash: str) -> str: ...

    def team_id(self, team_id: str) -> str: ...

    def user_id(self, user_id: str) -> str: ...


class CachedStore:
    """A RecordReader that answers from the cache when it can, from the store otherwise."""

    def __init__(self, store: BackingStore, cache: RecordCache) -> None:
        self.store = store
        self.cache = cache

    async def _lookup(self, redis_key: str, load: Callable[[], Awaitable[Any]], make: Callable[[Any], Any]) -> Any:
        cache = self.cache
        if cache.trusted:
            row = cache.get(redis_key)
            if row is not MISS:
                return None if row is None else make(row)
        epoch = cache.epoch
        if cache.redis_down():
            # What is cached still answers, within max_stale_s.
            return self._stale_or_raise(redis_key, make)
        try:
            record = await load()
        except StoreUnavailable:
            cache.record_failure()
            return self._stale_or_raise(redis_key, make)
        cache.record_success()
        # Stored as a plain tuple: the cycle collector skips those, so a large cache adds
        # no collection pauses.
        cache.put(redis_key, None if record is None else tuple(record), epoch)
        return record

    def _stale_or_raise(self, redis_key: str, make: Callable[[Any], Any]) -> Any:
        row = self.cache.stale(redis_key)
        if row is MISS:
            raise StoreUnavailable("redis unreachable")
        return make(row)

    async def get_key(self, token_hash: str) -> KeyRecord | None:
        return await self._lookup(self.store.key_id(token_hash), lambda: self.store.get_key(token_hash),
                                  KeyRecord._make)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        return await self._lookup(self.store.team_id(team_id), lambda: self.store.get_team(team_id),
                                  TeamRecord._make)

    async def get_user(self, user_id: str) -> UserRecord | None:
        return await self._lookup(self.store.user_id(user_id), lambda: self.store.get_user(user_id),
                                  UserRecord._make)
