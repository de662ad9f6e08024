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
import time
from typing import Any, Awaitable, Callable, Protocol, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AskError, MovedError, RedisClusterException, RedisError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError

from extauthz.domain.record import (
    KeyRecord,
    TeamRecord,
    UserRecord,
    format_time,
    now_iso,
    secret_holders,
    team_members,
    with_terms,
)
from extauthz.records import audit
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


class Tx:
    """One attempt of a write transaction: its pipeline, and the records it read and wrote,
    which make its audit entry (records/audit.py)."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.read_docs: dict[str, Doc | None] = {}
        self.written: dict[str, Doc | None] = {}

    async def read(self, redis_key: str) -> Doc | None:
        raw = await self.pipe.get(redis_key)
        doc = None if raw is None else json.loads(raw)
        self.read_docs.setdefault(redis_key, doc)
        return doc

    def put(self, redis_key: str, doc: Doc, expire_at_ms: int | None = None) -> None:
        """Queue a record's new document (``expire_at_ms``: when Redis drops it; KEEP_TTL:
        the expiry it has)."""
        value = json.dumps(doc, separators=(",", ":"))
        if expire_at_ms == KEEP_TTL:
            self.pipe.set(redis_key, value, keepttl=True)
        else:
            self.pipe.set(redis_key, value, pxat=expire_at_ms)
        self.written[redis_key] = doc

    def drop(self, redis_key: str) -> None:
        self.pipe.delete(redis_key)
        self.written[redis_key] = None


class RedisWriter(Keyspace):
    """The admin API's side: whole documents, listings and atomic WATCH/MULTI writes, on
    the reader's connections. Every write carries a ``Note`` (``by``): its audit entry is
    appended in the same transaction."""

    def __init__(self, reader: RedisReader, audit_max_entries: int = 100_000,
                 note: audit.Note | None = None, wait_replicas: int = 0, wait_timeout_ms: int = 1000,
                 client: aioredis.Redis | None = None, client_timeout: float | None = None,
                 node_clients: dict[tuple[str, int], aioredis.Redis] | None = None,
                 audit_max_bytes: int = 64 * 1024 * 1024) -> None:
        super().__init__(reader.counter_prefix, reader.cluster)
        self.reader = reader
        # Its own client where given: listings of a million keys take longer than a lookup's timeout.
        self.redis = client if client is not None else reader.redis
        self.timeout = reader.timeout
        self.client_timeout = client_timeout if client_timeout is not None else reader.timeout
        # Cluster: a client per primary that has held the records' slot, for transactions.
        self.node_clients = node_clients if node_clients is not None else {}
        self.audit_max_entries = audit_max_entries
        self.audit_max_bytes = audit_max_bytes
        self.note = note
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        # The fewest replicas that acknowledged one of this writer's writes (None: none waited for).
        self.replicated: int | None = None

    def by(self, note: audit.Note) -> "RedisWriter":
        """This writer, its writes made by ``note``'s actor through ``note``'s route."""
        return RedisWriter(self.reader, self.audit_max_entries, note, self.wait_replicas, self.wait_timeout_ms,
                           self.redis, self.client_timeout, self.node_clients, self.audit_max_bytes)

    async def close(self) -> None:
        for client in self.node_clients.values():
            await client.aclose()
        self.node_clients.clear()

    async def _transaction_client(self, refresh: bool = False) -> aioredis.Redis:
        """Where a transaction runs: the Redis, or in a cluster the primary that holds the
        records' slot now (WATCH/MULTI is one connection's: a cluster client cannot carry it).
        ``refresh``: the slot map is read again first (the slot moved, or its primary failed)."""
        if not self.cluster:
            return self.redis
        cluster: Any = self.redis
        if refresh:
            await cluster.nodes_manager.initialize()
        await cluster.initialize()
        node = cluster.get_node_from_key(self.audit_id)
        address = (node.host, int(node.port))
        if address not in self.node_clients:
            self.node_clients[address] = self.reader.node_client(*address, self.client_timeout)
        return self.node_clients[address]

    async def _wait_for_replicas(self) -> None:
        """How many replicas have this writer's last write (Redis WAIT). WAIT counts the writes
        of the connection it is sent on, and the transaction's went back to the pool with it:
        so a probe write, then WAIT, on one connection held here. Replication is one ordered
        stream: a replica that has the probe has the transaction. A failure to ask counts as
        none (the write itself is committed: it is not retried)."""
        connection = None
        try:  # (never raises: the write is committed, and must not be run again)
            pool = (await self._transaction_client()).connection_pool
            connection = await pool.get_connection()
            await connection.send_command("INCR", f"{self.prefix}replication_probe")
            await connection.read_response(timeout=self.timeout)
            await connection.send_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            acknowledged = int(await connection.read_response(timeout=self.wait_timeout_ms / 1000 + self.timeout))
        except (*REDIS_FAILURES, ValueError, TypeError) as e:
            log.warning("redis: could not ask the replicas for a write: %s", type(e).__name__)
            acknowledged = 0
            if connection is not None:
                await connection.disconnect()
        finally:
            if connection is not None:
                await pool.release(connection)
        self.replicated = acknowledged if self.replicated is None else min(self.replicated, acknowledged)

    @property
    def audit_bytes_id(self) -> str:
        return f"{self.prefix}audit_bytes"

    @property
    def audit_id(self) -> str:
        return f"{self.prefix}audit"

    # -- admin reads ----------------------------------------------------------------------

    async def key_doc(self, token_hash: str) -> Doc | None:
        raw = await self.reader.get(self.key_id(token_hash))
        return None if raw is None else json.loads(raw)

    async def team_doc(self, team_id: str) -> Doc | None:
        raw = await self.reader.get(self.team_id(team_id))
        return None if raw is None else json.loads(raw)

    async def team_docs(self, team_ids: list[str]) -> list[Doc | None]:
        """Several teams in one round trip (a token may name many)."""
        if not team_ids:
            return []
        try:
            raws = await asyncio.wait_for(self.redis.mget([self.team_id(t) for t in team_ids]), self.timeout)
        except REDIS_FAILURES as e:
            raise StoreUnavailable(type(e).__name__) from None
        return [None if r is None else json.loads(r) for r in raws]

    async def user_doc(self, user_id: str) -> Doc | None:
        raw = await self.reader.get(self.user_id(user_id))
        return None if raw is None else json.loads(raw)

    async def alias_keys(self, alias: str) -> list[str]:
        """The hashes of the keys holding an alias now (one per owner): each index entry
        checked against its key's record, so an entry a change left behind names nothing."""
        try:
            held = await asyncio.wait_for(self.redis.hgetall(self.alias_id(alias)), self.timeout)
            legacy = await self.reader.get(self.legacy_alias_id(alias))
        except REDIS_FAILURES as e:
            raise StoreUnavailable(type(e).__name__) from None
        found = [*held.values(), *([legacy] if legacy is not None else [])]
        hashes = sorted({v.decode() if isinstance(v, bytes) else str(v) for v in found})
        return [d["token"] for d in await self.key_docs(hashes)
                if d.get("key_alias") == alias and not d.get("rotated_to")]

    async def _members(self, set_key: str) -> list[str]:
        """A listing set's members, sorted (a million of them is one SMEMBERS, not a million
        documents)."""
        try:
            return sorted(text(m) for m in await self.redis.smembers(set_key))
        except REDIS_FAILURES as e:
            raise StoreUnavailable(type(e).__name__) from None

    async def _docs_of(self, ids: list[str], id_of: Callable[[str], str]) -> list[Doc]:
        """These records' documents, in order (one deleted meanwhile is left out), read in
        batches so no single reply is huge."""
        docs: list[Doc] = []
        try:
            for start in range(0, len(ids), LIST_BATCH):
                raws = await self.redis.mget([id_of(i) for i in ids[start:start + LIST_BATCH]])
                docs.extend(json.loads(r) for r in raws if r is not None)
        except REDIS_FAILURES as e:
            raise StoreUnavailable(type(e).__name__) from None
        return docs

    async def _docs(self, set_key: str, id_of: Callable[[str], str]) -> list[Doc]:
        return await self._docs_of(await self._members(set_key), id_of)

    async def key_hashes(self, team_id: str | None = None, user_id: str | None = None) -> list[str]:
        """The hashes a key listing starts from, sorted: a team's, a user's or every key's."""
        return await self._members(self.team_keys_id(team_id) if team_id else self.user_keys_id(user_id)
                                   if user_id else f"{self.prefix}keys")

    async def key_docs(self, hashes: list[str]) -> list[Doc]:
        return await self._docs_of(hashes, self.key_id)

    async def list_keys(self, team_id: str | None = None, user_id: str | None = None) -> list[Doc]:
        docs = await self.key_docs(await self.key_hashes(team_id, user_id))
        return [d for d in docs if d.get("user_id") == user_id] if team_id and user_id else docs

    async def list_teams(self) -> list[Doc]:
        return await self._docs(f"{self.prefix}teams", self.team_id)

    async def list_users(self) -> list[Doc]:
        return await self._docs(f"{self.prefix}users", self.user_id)

    async def audit_entries(self, before: str, count: int) -> list[tuple[str, Doc]]:
        """Up to ``count`` audit entries older than stream id ``before`` ("+" for the
        newest), newest first, each with its stream id."""
        end = "+" if before == "+" else f"({before}"
        try:
            raws = await asyncio.wait_for(self.redis.xrevrange(self.audit_id, end, "-", count), self.timeout)
        except REDIS_FAILURES as e:
            raise StoreUnavailable(type(e).__name__) from None
        entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", raws)  # (bytes: decode_responses is off)
        return [(sid.decode(), json.loads(fields[b"entry"])) for sid, fields in entries]

    # -- atomic writes --------------------------------------------------------------------

    async def _transact(self, body: Callable[[Tx], Awaitable[Any]], *watch: str) -> Any:
        """Run ``body`` under WATCH; it reads with the transaction, calls ``multi()`` and
        queues writes. A concurrent change to a watched key reruns it from the start. The
        audit entry of what it wrote is queued last, in the same MULTI."""
        if self.note is None:  # a write nobody answers for is a bug: refused, nothing written
            raise RuntimeError("a record write without its audit note")
        try:
            try:
                return await self._attempts(await self._transaction_client(), body, watch)
            except (MovedError, AskError, RedisConnectionError):
                if not self.cluster:
                    raise
                # The records' slot moved, or its primary failed over: once more where it is now.
                # Nothing was committed: a redirection refuses the whole MULTI, and a connection
                # lost during EXEC itself is answered 503 by _attempts, not retried.
                return await self._attempts(await self._transaction_client(refresh=True), body, watch)
        except REDIS_ERRORS as e:
            raise StoreUnavailable(type(e).__name__) from None

    async def _attempts(self, redis: aioredis.Redis, body: Callable[[Tx], Awaitable[Any]],
                        watch: tuple[str, ...]) -> Any:
        note = self.note
        assert note is not None
        async with redis.pipeline(transaction=True) as pipe:
            for _ in range(TRANSACTION_ATTEMPTS):
                try:
                    if watch:
                        await pipe.watch(*watch)
                    tx = Tx(pipe)
                    if await redis.type(self.audit_id) not in (b"none", b"stream"):
                        # XADD would fail inside EXEC while the record writes commit: refuse first.
                        raise AuditUnwritable(f"{self.audit_id} is not a stream: no admin write can be recorded")
                    result = await body(tx)
                    found = audit.entry(note, tx.read_docs, tx.written, self.prefix, time.time())
                    if found is not None:
                        pipe.eval(APPEND_AUDIT, 2, self.audit_id, self.audit_bytes_id, audit.encode(found),
                                  self.audit_max_entries, self.audit_max_bytes)
                    try:
                        await pipe.execute()
                    except WatchError as e:
                        if not lost_connection(e):
                            continue  # a watched key changed: nothing was written, run it again
                        # committed or not, nobody can tell, so no rerun
                        raise StoreUnavailable("connection lost during EXEC") from None
                    except REDIS_FAILURES:  # the same, or the answer lost: no retry
                        raise StoreUnavailable("connection lost during EXEC") from None
                    if self.wait_replicas:
                        await self._wait_for_replicas()
                    if found is not None:
                        audit.logged(found)
                    return result
                except WatchError:
                    continue
                finally:
                    await pipe.reset()
        raise Conflict("too many concurrent changes to the same record; try again")

    async def _team_for(self, tx: Tx, team_id: str | None) -> Doc | None:
        if team_id is None:
            return None
        await tx.pipe.watch(self.team_id(team_id))
        team = await tx.read(self.team_id(team_id))
        if team is None:
            raise MissingTeam(f"team_id {team_id!r} does not exist")
        return team

    async def _claim_alias(self, tx: Tx, doc: Doc, *also: str) -> None:
        """A key's alias free among its owner's keys, or held by this key (or one of
        ``also``, the key it replaces). Aliases are unique per owner: a user's choice can
        neither reserve a name for everyone nor learn that another owner uses it."""
        alias, token_hash = doc.get("key_alias"), doc["token"]
        if alias is None:
            return
        owner = alias_owner_field(doc)
        await tx.pipe.watch(self.alias_id(alias), self.legacy_alias_id(alias))
        found = await tx.pipe.hget(self.alias_id(alias), owner)
        legacy = await tx.pipe.get(self.legacy_alias_id(alias))
        for holder in {text(h) for h in (found, legacy) if h is not None} - {token_hash, *also}:
            await tx.pipe.watch(self.key_id(holder))
            other = await tx.read(self.key_id(holder))
            if other is not None and other.get("key_alias") == alias and not other.get("rotated_to") \
                    and alias_owner_field(other) == owner:
                raise Conflict(f"key_alias {alias!r} is already in use by another key of "
                               f"{'this owner' if owner else 'the keys without an owner'}")

    async def create_key(self, doc: Doc, check_team: Callable[[Doc, Doc | None], None],
                         max_user_keys: int = 0) -> Doc:
        """Store a new key; ``check_team(key, team)`` raises to refuse it (runs under WATCH).
        With ``max_user_keys``, refused (LimitReached) when its owner has that many already."""
        token_hash = doc["token"]

        async def body(tx: Tx) -> Doc:
            if await tx.pipe.exists(self.key_id(token_hash)):
                raise Conflict("This key already exists.")
            await self._check_key_count(tx, doc, max_user_keys)
            team = await self._team_for(tx, doc.get("team_id"))
            check_team(doc, team)
            await self._claim_alias(tx, doc)
            tx.pipe.multi()
            self._queue_key(tx, doc, None)
            return doc

        return await self._transact(body, self.key_id(token_hash))

    async def _check_key_count(self, tx: Tx, doc: Doc, max_user_keys: int) -> None:
        """A key given to an owner who has ``max_user_keys`` already is refused (0: no bound)."""
        owner = doc.get("user_id")
        if not max_user_keys or not isinstance(owner, str) or not owner:
            return
        await tx.pipe.watch(self.user_keys_id(owner))
        if await tx.pipe.scard(self.user_keys_id(owner)) >= max_user_keys:
            raise LimitReached(f"User {owner!r} owns {max_user_keys} keys, the most a user may "
                               "(extauthz_settings.max_keys_per_user): delete one first.", "user_id")

    async def update_key(self, token_hash: str, change: Callable[[Doc], Doc],
                         check_team: Callable[[Doc, Doc | None], None], max_user_keys: int = 0) -> Doc:
        async def body(tx: Tx) -> Doc:
            old = await tx.read(self.key_id(token_hash))
            if old is None:
                raise NotFound("key not found")
            new = change(dict(old))
            team = await self._team_for(tx, new.get("team_id"))
            check_team(new, team)
            if new.get("user_id") != old.get("user_id"):
                await self._check_key_count(tx, new, max_user_keys)
            retired = bool(old.get("rotated_to"))
            if retired and {k for k in new.keys() | old.keys() if new.get(k) != old.get(k)} - RETIRED_CHANGES:
                # (it is decided as its successor: a change here would change nothing, or hide one)
                raise Conflict("This key was regenerated: it is decided with the key that replaced it "
                               f"({old['rotated_to']}); change that one, or delete or block this one.")
            if not retired:
                await self._claim_alias(tx, new)
            tx.pipe.multi()
            if retired:  # a key in its grace period: its indexes stay as they are
                tx.put(self.key_id(token_hash), new, KEEP_TTL)
            else:
                self._queue_key(tx, new, old)
            return new

        return await self._transact(body, self.key_id(token_hash))

    async def rotate_key(self, old_hash: str, new_hash: str, change: Callable[[Doc], Doc],
                         check_team: Callable[[Doc, Doc | None], None],
                         grace_until: float | None, max_user_keys: int = 0) -> tuple[Doc, str | None]:
        """Replace a key by a new one (/key/regenerate): the new record is the old one with
        ``change`` applied, under the new hash, sharing its counters (``counter_id``: its
        spend and rate windows go on). The old record stops at once, or stays usable until
        ``grace_until`` and then expires (it is no longer listed). Returns the new record and
        when the old key stops (None: it has); a repeated call (the same new key) answers as
        the first one did, changing nothing."""
        old_id, new_id = self.key_id(old_hash), self.key_id(new_hash)

        async def body(tx: Tx) -> tuple[Doc, str | None]:
            old, existing = await tx.read(old_id), await tx.read(new_id)
            if existing is not None and existing.get("regenerated_from") == old_hash \
                    and (old is None or old.get("rotated_to") == new_hash):
                if existing.get("rotated_to"):
                    raise Conflict("The key this regeneration made was regenerated since; regenerate its successor.")
                tx.pipe.multi()  # the same answer as the first time: its grace, not this call's
                return existing, (old or {}).get("grace_until")
            if old is None:
                raise NotFound("key not found")
            if old.get("rotated_to"):
                raise Conflict("This key was regenerated already; regenerate the key that replaced it.")
            if existing is not None:
                raise Conflict("new_key is already a key.")
            new = change(dict(old))
            new.update(token=new_hash, regenerated_from=old_hash, counter_id=old.get("counter_id") or old_hash)
            new.pop("rotated_to", None)
            new.pop("grace_until", None)
            team = await self._team_for(tx, new.get("team_id"))
            check_team(new, team)
            if grace_until is not None or new.get("user_id") != old.get("user_id"):  # one more key for the owner
                await self._check_key_count(tx, new, max_user_keys)
            await self._claim_alias(tx, new, old_hash)
            now = time.time()
            ended = [json.loads(m) for m in await tx.pipe.zrangebyscore(self.retired_id, "-inf", now)
                     if isinstance(m, (bytes, str))]
            tx.pipe.multi()
            for gone in ended:  # keys whose grace has ended (their records dropped by Redis): unindexed
                self._queue_index_removal(tx, gone[0], gone[1], gone[2])
            tx.pipe.zremrangebyscore(self.retired_id, "-inf", now)
            if grace_until is not None:  # the old key, listed with its grace_until, usable until it expires
                retired = dict(old, rotated_to=new_hash, grace_until=format_time(grace_until),
                               counter_id=new["counter_id"])
                tx.put(old_id, retired, int(grace_until * 1000) + GRACE_MARGIN_MS)
                tx.pipe.zadd(self.retired_id, {retired_member(retired): grace_until + GRACE_MARGIN_MS / 1000})
            else:
                self._queue_key_removal(tx, old)
            self._queue_key(tx, new, None)
            return new, format_time(grace_until) if grace_until is not None else None

        return await self._transact(body, old_id, new_id)

    def _queue_key(self, tx: Tx, new: Doc, old: Doc | None) -> None:
        token_hash = new["token"]
        pipe = tx.pipe
        tx.put(self.key_id(token_hash), new)
        pipe.sadd(f"{self.prefix}keys", token_hash)
        old_alias, old_team = (old or {}).get("key_alias"), (old or {}).get("team_id")
        if old is not None and old_alias and (old_alias, alias_owner_field(old)) != (
                new.get("key_alias"), alias_owner_field(new)):
            pipe.hdel(self.alias_id(old_alias), alias_owner_field(old))
        if new.get("key_alias"):
            pipe.hset(self.alias_id(new["key_alias"]), alias_owner_field(new), token_hash)
        if old_team and old_team != new.get("team_id"):
            pipe.srem(self.team_keys_id(old_team), token_hash)
        if new.get("team_id"):
            pipe.sadd(self.team_keys_id(new["team_id"]), token_hash)
        old_user = (old or {}).get("user_id")
        if old_user and old_user != new.get("user_id"):
            pipe.srem(self.user_keys_id(old_user), token_hash)
        if new.get("user_id"):
            pipe.sadd(self.user_keys_id(new["user_id"]), token_hash)

    async def delete_key(self, token_hash: str) -> bool:
        async def body(tx: Tx) -> bool:
            doc = await tx.read(self.key_id(token_hash))
            tx.pipe.multi()
            if doc is not None:
                self._queue_key_removal(tx, doc)
            return doc is not None

        return await self._transact(body, self.key_id(token_hash))

    def _queue_key_removal(self, tx: Tx, doc: Doc) -> None:
        token_hash = doc["token"]
        tx.drop(self.key_id(token_hash))
        if doc.get("key_alias") and not doc.get("rotated_to"):  # (a retired key's alias is its successor's)
            tx.pipe.hdel(self.alias_id(doc["key_alias"]), alias_owner_field(doc))
        if doc.get("rotated_to"):
            tx.pipe.zrem(self.retired_id, retired_member(doc))
        self._queue_index_removal(tx, token_hash, doc.get("team_id"), doc.get("user_id"))

    def _queue_index_removal(self, tx: Tx, token_hash: str, team_id: Any, user_id: Any) -> None:
        tx.pipe.srem(f"{self.prefix}keys", token_hash)
        if isinstance(team_id, str) and team_id:
            tx.pipe.srem(self.team_keys_id(team_id), token_hash)
        if isinstance(user_id, str) and user_id:
            tx.pipe.srem(self.user_keys_id(user_id), token_hash)

    async def create_team(self, doc: Doc, exists_ok: bool = False) -> Doc:
        """Store a new team; with ``exists_ok`` (an upsert) an existing one is left as it is."""
        async def body(tx: Tx) -> Doc:
            if await tx.pipe.exists(self.team_id(doc["team_id"])):
                if exists_ok:
                    tx.pipe.multi()
                    return doc
                raise Conflict(f"team_id {doc['team_id']!r} already exists")
            tx.pipe.multi()
            tx.put(self.team_id(doc["team_id"]), doc)
            tx.pipe.sadd(f"{self.prefix}teams", doc["team_id"])
            return doc

        return await self._transact(body, self.team_id(doc["team_id"]))

    async def update_team(self, team_id: str, change: Callable[[Doc], Doc]) -> Doc:
        async def body(tx: Tx) -> Doc:
            old = await tx.read(self.team_id(team_id))
            if old is None:
                raise NotFound(f"team_id {team_id!r} does not exist")
            new = change(dict(old))
            tx.pipe.multi()
            tx.put(self.team_id(team_id), new)
            return new

        return await self._transact(body, self.team_id(team_id))

    async def _watched_keys(self, tx: Tx, set_key: str) -> list[Doc]:
        """The key documents a set names, watched: a concurrent change to one of them
        (a new alias, another team) reruns the transaction instead of leaving an index behind."""
        hashes = [text(m) for m in await tx.pipe.smembers(set_key)]
        if hashes:
            await tx.pipe.watch(*(self.key_id(h) for h in hashes))
        return [d for d in [await tx.read(self.key_id(h)) for h in hashes] if d is not None]

    async def delete_team(self, team_id: str) -> int:
        """Delete a team, every key of the team and its members' memberships; returns how
        many keys went with it."""
        async def body(tx: Tx) -> int:
            team = await tx.read(self.team_id(team_id))
            if team is None:
                raise NotFound(f"team_id {team_id!r} does not exist")
            docs = await self._watched_keys(tx, self.team_keys_id(team_id))
            users = []
            for member in team_members(team):
                if isinstance(member.get("user_id"), str):
                    await tx.pipe.watch(self.user_id(member["user_id"]))
                    users.append(await tx.read(self.user_id(member["user_id"])))
            tx.pipe.multi()
            for doc in docs:
                self._queue_key_removal(tx, doc)
            for user in users:
                if user is not None:
                    self._queue_user(tx, dict(user, teams=[t for t in user.get("teams") or [] if t != team_id]))
            tx.drop(self.team_id(team_id))
            tx.pipe.delete(self.team_keys_id(team_id))
            tx.pipe.srem(f"{self.prefix}teams", team_id)
            return len(docs)

        return await self._transact(body, self.team_id(team_id), self.team_keys_id(team_id))

    # -- users and team members -----------------------------------------------------------

    async def create_user(self, doc: Doc, exists_ok: bool = False) -> Doc:
        """Store a new user, and add it to the members of the teams it names (which must exist)."""
        user_id = doc["user_id"]

        async def body(tx: Tx) -> Doc:
            if await tx.pipe.exists(self.user_id(user_id)):
                if exists_ok:
                    tx.pipe.multi()
                    return doc
                raise Conflict(f"user_id {user_id!r} already exists")
            teams = [(t, await self._team_for(tx, t)) for t in doc.get("teams") or []]
            tx.pipe.multi()
            for team_id, team in teams:
                self._queue_member(tx, team_id, team, {"user_id": user_id, "user_email": doc.get("user_email"),
                                                       "role": "user"})
            self._queue_user(tx, doc)
            return doc

        return await self._transact(body, self.user_id(user_id))

    async def update_user(self, user_id: str, change: Callable[[Doc], Doc]) -> Doc:
        async def body(tx: Tx) -> Doc:
            old = await tx.read(self.user_id(user_id))
            if old is None:
                raise NotFound(f"user_id {user_id!r} does not exist")
            new = change(dict(old))
            tx.pipe.multi()
            self._queue_user(tx, new)
            return new

        return await self._transact(body, self.user_id(user_id))

    async def delete_user(self, user_id: str) -> int:
        """Delete a user, the keys it owns and its team memberships; returns how many keys went."""
        async def body(tx: Tx) -> int:
            doc = await tx.read(self.user_id(user_id))
            if doc is None:
                raise NotFound(f"user_id {user_id!r} does not exist")
            keys = await self._watched_keys(tx, self.user_keys_id(user_id))
            teams = []
            for team_id in [t for t in doc.get("teams") or [] if isinstance(t, str)]:
                await tx.pipe.watch(self.team_id(team_id))
                teams.append((team_id, await tx.read(self.team_id(team_id))))
            tx.pipe.multi()
            for key in keys:
                self._queue_key_removal(tx, key)
            for team_id, team in teams:
                if team is not None:
                    self._queue_team(tx, team_id, dict(team, members_with_roles=[
                        m for m in team_members(team) if m.get("user_id") != user_id]))
            tx.drop(self.user_id(user_id))
            tx.pipe.delete(self.user_keys_id(user_id))
            tx.pipe.srem(f"{self.prefix}users", user_id)
            return len(keys)

        return await self._transact(body, self.user_id(user_id), self.user_keys_id(user_id))

    async def add_member(self, team_id: str, member: Doc, user: Doc, terms: Doc | None = None) -> Doc:
        """Add (or re-role) a member of a team, with its own terms there when given;
        ``user`` is the user record to create when the member has none. Returns the team."""
        user_id = member["user_id"]

        async def body(tx: Tx) -> Doc:
            team = await self._team_for(tx, team_id)
            assert team is not None
            await tx.pipe.watch(self.user_id(user_id))
            existing = await tx.read(self.user_id(user_id))
            tx.pipe.multi()
            new_team = self._queue_member(tx, team_id, with_terms(team, user_id, terms or {}), member)
            stored = existing or user
            self._queue_user(tx, dict(stored, teams=[*(t for t in stored.get("teams") or [] if t != team_id),
                                                     team_id]))
            return new_team

        return await self._transact(body)

    async def remove_member(self, team_id: str, user_id: str) -> tuple[Doc, list[str], list[str]]:
        """Remove a member from a team, delete its keys in that team (as LiteLLM does) and
        block the team's keys of others whose value it holds (one it made for a member):
        leaving a team ends what it could do there. Returns the team and the deleted and
        the blocked keys' hashes (the audit entry names each)."""
        async def body(tx: Tx) -> tuple[Doc, list[str], list[str]]:
            team = await self._team_for(tx, team_id)
            assert team is not None
            members = team_members(team)
            if not any(m.get("user_id") == user_id for m in members):
                raise NotFound(f"user_id {user_id!r} is not a member of team {team_id!r}")
            await tx.pipe.watch(self.user_id(user_id))
            user = await tx.read(self.user_id(user_id))
            keys = [k for k in await self._watched_keys(tx, self.user_keys_id(user_id)) if k.get("team_id") == team_id]
            held = [k for k in await self._watched_keys(tx, self.team_keys_id(team_id))
                    if k.get("user_id") != user_id and user_id in secret_holders(k) and not k.get("blocked")]
            tx.pipe.multi()
            # (Its terms in the team stay: a token's groups may still name the team, and
            # one who joins again must not come back wider than it left.)
            new_team = dict(team, members_with_roles=[m for m in members if m.get("user_id") != user_id])
            self._queue_team(tx, team_id, new_team)
            if user is not None:
                self._queue_user(tx, dict(user, teams=[t for t in user.get("teams") or [] if t != team_id]))
            for key in keys:
                self._queue_key_removal(tx, key)
            for key in held:
                tx.put(self.key_id(key["token"]), dict(key, blocked=True, updated_at=now_iso()), KEEP_TTL)
            return new_team, [k["token"] for k in keys], [k["token"] for k in held]

        return await self._transact(body, self.user_keys_id(user_id), self.team_keys_id(team_id))

    async def update_member(self, team_id: str, user_id: str, role: str | None, terms: Doc) -> Doc:
        """A member's role and its own terms in a team (those given). Returns the team."""
        async def body(tx: Tx) -> Doc:
            team = await self._team_for(tx, team_id)
            assert team is not None
            found = [m for m in team_members(team) if m.get("user_id") == user_id]
            if not found:
                raise NotFound(f"user_id {user_id!r} is not a member of team {team_id!r}")
            tx.pipe.multi()
            member = dict(found[0], role=role) if role is not None else found[0]
            return self._queue_member(tx, team_id, with_terms(team, user_id, terms), member)

        return await self._transact(body)

    def _queue_member(self, tx: Tx, team_id: str, team: Doc | None, member: Doc) -> Doc:
        members = [m for m in team_members(team) if m.get("user_id") != member["user_id"]]
        new_team = dict(team or {}, members_with_roles=[*members, member])
        self._queue_team(tx, team_id, new_team)
        return new_team

    def _queue_team(self, tx: Tx, team_id: str, doc: Doc) -> None:
        tx.put(self.team_id(team_id), doc)

    def _queue_user(self, tx: Tx, doc: Doc) -> None:
        tx.put(self.user_id(doc["user_id"]), doc)
        tx.pipe.sadd(f"{self.prefix}users", doc["user_id"])
