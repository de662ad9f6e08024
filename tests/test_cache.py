"""The record cache's rules, fast: an in-memory store and a clock the test moves.

The same rules run against real Redis in test_cache_invalidation.py and test_reliability.py;
here each one is shown alone, without waiting for a timer.
"""

from __future__ import annotations

import asyncio

import pytest

from extauthz.records.cache import FAILURES_BEFORE_FAIL_FAST, RETRY_AFTER_FAILURE_S, CachedStore, RecordCache
from extauthz.domain.record import KeyRecord, TeamRecord
from extauthz.records.store import StoreUnavailable

KEY = KeyRecord("h1", "alias", ("gpt-4",), None, None, False)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryStore:
    """The store protocol over a dict; ``down`` makes every read fail as Redis would."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyRecord] = {}
        self.reads = 0
        self.down = False
        self.gate: asyncio.Event | None = None  # when set, a read waits for it

    def key_id(self, token_hash: str) -> str:
        return f"key:{token_hash}"

    def team_id(self, team_id: str) -> str:
        return f"team:{team_id}"

    async def get_key(self, token_hash: str) -> KeyRecord | None:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StoreUnavailable("down")
        return self.keys.get(token_hash)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        return None


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def parts(clock: Clock) -> tuple[MemoryStore, RecordCache, CachedStore]:
    store, cache = MemoryStore(), RecordCache(100, negative_ttl_s=5.0, max_stale_s=60.0, clock=clock)
    cache.mark_trusted()
    return store, cache, CachedStore(store, cache)


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_cached_key_costs_one_read(parts) -> None:
    store, _, cached = parts
    store.keys["h1"] = KEY
    assert [run(cached.get_key("h1")) for _ in range(5)] == [KEY] * 5
    assert store.reads == 1


def test_an_unknown_key_is_remembered_for_the_negative_ttl(parts, clock: Clock) -> None:
    store, _, cached = parts
    assert run(cached.get_key("nope")) is None
    clock.now += 4.9
    assert run(cached.get_key("nope")) is None and store.reads == 1
    clock.now += 0.2
    assert run(cached.get_key("nope")) is None and store.reads == 2


def test_a_read_that_overlaps_an_invalidation_does_not_fill_the_cache(parts) -> None:
    store, cache, cached = parts
    store.keys["h1"] = KEY

    async def scenario() -> None:
        store.gate = asyncio.Event()
        reading = asyncio.create_task(cached.get_key("h1"))
        await asyncio.sleep(0)
        cache.invalidate(["key:h1"])  # the record changed while it was being read
        store.gate.set()
        assert await reading == KEY
        store.gate = None
        await cached.get_key("h1")

    run(scenario())
    assert store.reads == 2  # the value read across the change was not kept


def test_while_distrusted_every_lookup_reads_the_store(parts) -> None:
    store, cache, cached = parts
    store.keys["h1"] = KEY
    run(cached.get_key("h1"))
    cache.distrust()
    run(cached.get_key("h1"))
    run(cached.get_key("h1"))
    assert store.reads == 3


def test_cached_records_answer_within_the_stale_window_only(parts, clock: Clock) -> None:
    store, cache, cached = parts
    store.keys["h1"] = KEY
    run(cached.get_key("h1"))
    cache.distrust()
    store.down = True
    clock.now += 59
    assert run(cached.get_key("h1")) == KEY and cache.stale_served == 1
    with pytest.raises(StoreUnavailable):
        run(cached.get_key("unknown"))  # nothing cached: fail closed
    clock.now += 2
    with pytest.raises(StoreUnavailable):
        run(cached.get_key("h1"))  # past max_stale_s


def test_after_repeated_failures_the_store_is_not_tried_for_a_moment(parts, clock: Clock) -> None:
    store, cache, cached = parts
    cache.distrust()
    store.down = True
    for _ in range(FAILURES_BEFORE_FAIL_FAST):
        with pytest.raises(StoreUnavailable):
            run(cached.get_key("h1"))
    assert store.reads == FAILURES_BEFORE_FAIL_FAST and cache.redis_down()
    with pytest.raises(StoreUnavailable):
        run(cached.get_key("h1"))
    assert store.reads == FAILURES_BEFORE_FAIL_FAST  # failed fast, no wait for a timeout
    clock.now += RETRY_AFTER_FAILURE_S + 0.01
    store.down = False
    store.keys["h1"] = KEY
    assert run(cached.get_key("h1")) == KEY and not cache.redis_down()


def test_trust_returns_with_an_empty_cache(parts) -> None:
    store, cache, cached = parts
    store.keys["h1"] = KEY
    run(cached.get_key("h1"))
    cache.distrust()
    cache.mark_trusted()  # invalidations may have been missed meanwhile
    assert len(cache) == 0 and cache.times_trusted == 2
    run(cached.get_key("h1"))
    assert store.reads == 2


def test_the_cache_stays_within_its_size(clock: Clock) -> None:
    store, cache = MemoryStore(), RecordCache(3, 5.0, clock=clock)
    cache.mark_trusted()
    cached = CachedStore(store, cache)
    for n in range(10):
        run(cached.get_key(f"k{n}"))
    assert len(cache) == 3 and cache.evictions == 7
