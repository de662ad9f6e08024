"""Redis records: the lookups the Check path makes and the atomic writes of the admin API.

Layout (``<p>`` is the configured prefix, ``extauthz:`` by default; in a Redis Cluster
``{<p>}``, one hash slot for every record, index and the audit trail: records/keyspace.py):

- ``<p>key:<sha256 hex of the key>``  JSON key record (the raw key is never stored)
- ``<p>team:<team_id>``               JSON team record
- ``<p>alias_of:<key_alias>``         hash: owner (user_id, "" for none) to the key holding that alias
                                      (unique per owner); ``<p>alias:<key_alias>``, read only, from before
- ``<p>team_keys:<team_id>``          set of the hashes of the team's keys
- ``<p>user:<user_id>``               JSON user record
- ``<p>user_keys:<user_id>``          set of the hashes of the keys the user owns
- ``<p>keys`` / ``<p>teams`` / ``<p>users``  sets of every key hash / team id / user id (listing)

Reads cost one round trip per record (a budget's spend is read where a call is admitted
against it, usage/counters.py). Every write runs in a WATCH/MULTI transaction that retries
on conflict, so concurrent admin calls lose nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, WatchError

from extauthz.domain.record import (
    KeyRecord,
    TeamRecord,
    UserRecord,
)
from extauthz.records.connection import RedisTarget
from extauthz.records.keyspace import Keyspace
from extauthz.telemetry import tracing

log = logging.getLogger("extauthz.store")

# What a Redis call can fail with: a cluster client also raises RedisClusterException (no
# node answers, a slot not covered), which is no RedisError, and during a failover
# AttributeError (redis-py 8.1: a command sent on a connection that another coroutine
# tore down, "'NoneType' object has no attribute 'writelines'"). Each try around a
# Redis call holds that call only, so no error of ours is taken for Redis's (around more,
# such as a whole transaction with the admin API's code in it: REDIS_ERRORS).
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
REDIS_FAILURES = (*REDIS_ERRORS, AttributeError)
TRANSACTION_ATTEMPTS = 100
LIST_BATCH = 1000  # documents per MGET when listing
# A retired key's record outlives its grace period by this much in Redis: its own expiry
# (the check compares grace_until with the clock) decides, Redis's only clears it away.
GRACE_MARGIN_MS = 60_000
# What may change on a key in its grace period (it is decided with its successor's record).
RETIRED_CHANGES = frozenset({"blocked", "updated_at", "updated_by", "secret_holders"})
KEEP_TTL = -1  # Tx.put: the record keeps the expiry it has


def text(raw: bytes | str) -> str:
    """A name Redis returned (bytes: the clients do not decode), as text."""
    return raw.decode() if isinstance(raw, bytes) else raw


class StoreUnavailable(Exception):
    """Redis could not answer in time; the decision fails closed."""


class AuditUnwritable(Exception):
    """The audit trail's key holds something else: writes are refused, not made unrecorded."""


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class LimitReached(Exception):
    """A write would take its caller past a bound an operator sets (the setting named)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class MissingTeam(Exception):
    """A key names a team that does not exist."""


class RecordReader(Protocol):
    """What the check path reads; the cache (cache.CachedStore) is one, Redis another."""

    async def get_key(self, token_hash: str) -> KeyRecord | None: ...

    async def get_team(self, team_id: str) -> TeamRecord | None: ...

    async def get_user(self, user_id: str) -> UserRecord | None: ...


Doc = dict[str, Any]
Pipeline = aioredis.client.Pipeline


class RedisReader(Keyspace):
    """The check path's reads: one GET per record, within the lookup timeout."""

    def __init__(self, url: str | RedisTarget, timeout_ms: int, prefix: str = "extauthz:") -> None:
        self.target = url if isinstance(url, RedisTarget) else RedisTarget(url)
        super().__init__(prefix, self.target.cluster)
        timeout = self.timeout = timeout_ms / 1000
        self.redis = self.client(timeout)

    def client(self, socket_timeout: float) -> aioredis.Redis:
        """A client of this Redis: connects within the lookup timeout, waits for a reply up to
        ``socket_timeout``, and retries once on a broken connection only (a pooled connection
        from before a Redis restart); a timeout is not retried."""
        return self.target.client(socket_timeout=socket_timeout, socket_connect_timeout=self.timeout,
                                  retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), self.timeout))
        except REDIS_FAILURES:
            return False

    def node_client(self, host: str, port: int, socket_timeout: float) -> aioredis.Redis:
        """A client of one node of a cluster (see ``client``)."""
        return self.target.node_client(host, port, socket_timeout=socket_timeout, socket_connect_timeout=self.timeout,
                                       retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))

    async def primaries(self) -> list[tuple[str, int]]:
        """A cluster's primaries as the client's slot map has them (read on first use, kept
        current by redirections and failures)."""
        cluster: Any = self.redis
        await asyncio.wait_for(cluster.initialize(), self.timeout)
        return sorted({(n.host, int(n.port)) for n in cluster.get_primaries()})

    async def primary(self) -> str | None:
        """In sentinel mode, the primary the sentinels name now (host:port); else None."""
        if self.cluster:  # (readiness takes them from the invalidation channel: app.py)
            return None
        pool = self.redis.connection_pool
        manager = getattr(pool, "sentinel_manager", None)
        if manager is None:
            return None
        try:
            host, port = await asyncio.wait_for(manager.discover_master(pool.service_name),  # type: ignore[attr-defined]
                                                self.timeout)
        except REDIS_FAILURES:
            return None
        return f"{host}:{port}"

    async def safety_warnings(self) -> list[str]:
        """What in the server's own settings could lose records without a word: an eviction
        policy (an evicted key is a revoked key that reads as an unknown one, an evicted
        spend counter a budget lifted) and no persistence (a restart loses every key)."""
        if not self.cluster:
            return await self._safety_warnings(self.redis, "Redis")
        try:
            primaries = await self.primaries()
        except REDIS_FAILURES as e:
            return [f"could not read the Redis Cluster's nodes ({type(e).__name__}): make sure every primary's "
                    "maxmemory-policy is noeviction and that it persists its data"]
        found = []
        for host, port in primaries:  # each primary holds a share of the counters, one of them the records
            node = self.node_client(host, port, self.timeout)
            try:
                found.extend(await self._safety_warnings(node, f"Redis primary {host}:{port}"))
            finally:
                await node.aclose()
        return found

    async def _safety_warnings(self, redis: aioredis.Redis, server: str) -> list[str]:
        try:
            policy = await asyncio.wait_for(redis.config_get("maxmemory-policy"), self.timeout)
            persistence = await asyncio.wait_for(redis.config_get("save"), self.timeout)
            persistence.update(await asyncio.wait_for(redis.config_get("appendonly"), self.timeout))
        except REDIS_FAILURES as e:  # managed services often refuse CONFIG
            return [f"could not read the settings of {server} ({type(e).__name__}): make sure its "
                    "maxmemory-policy is noeviction and that it persists its data"]
        found = []
        evicting = policy.get("maxmemory-policy", "noeviction")
        if evicting != "noeviction":
            found.append(f"{server} maxmemory-policy is {evicting}: under memory pressure Redis may evict a key "
                         "record (the key then reads as unknown, not revoked) or a spend counter (its budget "
                         "lifted); set it to noeviction")
        if not persistence.get("save") and persistence.get("appendonly") != "yes":
            found.append(f"{server} persists nothing (no save points, appendonly no): a Redis restart loses every "
                         "key, team and spend counter; turn on AOF or RDB snapshots")
        return found

    async def get(self, redis_key: str) -> bytes | str | None:
        try:
            if tracing.enabled():
                with tracing.redis_span("GET"):
                    return await asyncio.wait_for(self.redis.get(redis_key), self.timeout)
            return await asyncio.wait_for(self.redis.get(redis_key), self.timeout)
        except REDIS_FAILURES as e:
            raise StoreUnavailable(type(e).__name__) from None

    async def get_key(self, token_hash: str) -> KeyRecord | None:
        raw = await self.get(self.key_id(token_hash))
        return None if raw is None else KeyRecord.from_json(raw)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        raw = await self.get(self.team_id(team_id))
        return None if raw is None else TeamRecord.from_json(raw)

    async def get_user(self, user_id: str) -> UserRecord | None:
        raw = await self.get(self.user_id(user_id))
        return None if raw is None else UserRecord.from_json(raw)


def lost_connection(e: WatchError) -> bool:
    """redis-py reports a connection lost under WATCH as a WatchError raised while handling
    the connection's error; a watched key that changed is one raised on its own."""
    return isinstance(e.__context__, REDIS_FAILURES) and not e.__suppress_context__


# An audit entry appended, and the stream trimmed from its oldest end until it holds at
# most ARGV[2] entries and ARGV[3] bytes of entries (its newest entry always stays). Each
# entry carries its size ("n"); KEYS[2] keeps the stream's total. Queued in the write's
# MULTI, so the entry and the change it records commit together.
APPEND_AUDIT = """
local size = #ARGV[1]
redis.call('XADD', KEYS[1], '*', 'entry', ARGV[1], 'n', size)
local total = redis.call('INCRBY', KEYS[2], size)
local count = redis.call('XLEN', KEYS[1])
local max_entries, max_bytes = tonumber(ARGV[2]), tonumber(ARGV[3])
while count > 1 and (count > max_entries or total > max_bytes) do
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 100)
  for _, e in ipairs(oldest) do
    if count <= 1 or (count <= max_entries and total <= max_bytes) then break end
    local fields, n = e[2], nil
    for i = 1, #fields, 2 do
      if fields[i] == 'n' then n = tonumber(fields[i + 1]) end
    end
    if n == nil then  -- an entry from before sizes were kept
      for i = 1, #fields, 2 do
        if fields[i] == 'entry' then n = #fields[i + 1] end
      end
    end
    redis.call('XDEL', KEYS[1], e[1])
    total = total - (n or 0)
    count = count - 1
  end
end
if total < 0 then total = 0 end
redis.call('SET', KEYS[2], total)
return total
"""


def alias_owner_field(doc: Doc) -> str:
    """Whose aliases a key's alias is unique among: its owner's ("" for keys without one)."""
    owner = doc.get("user_id")
    return owner if isinstance(owner, str) else ""


def retired_member(doc: Doc) -> str:
    """A key in its grace period in the ``retired`` index: its hash and the indexes that
    name it, to unindex it once Redis has dropped its record."""
    return json.dumps([doc["token"], doc.get("team_id"), doc.get("user_id")], separators=(",", ":"))


