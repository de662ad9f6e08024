"""What the admin API's writes share: a transaction (`Tx`: what it read and wrote), the
client that runs it (in a cluster, on the primary of the records' slot), the WATCH/MULTI
attempts, waiting for replicas, and the audit trail's names."""

from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import AskError, MovedError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError

from extauthz.domain.record import (
    team_members,
)
from extauthz.records import audit
from extauthz.records.keyspace import Keyspace
from extauthz.records.store import (
    APPEND_AUDIT,
    KEEP_TTL,
    REDIS_ERRORS,
    REDIS_FAILURES,
    TRANSACTION_ATTEMPTS,
    AuditUnwritable,
    Conflict,
    Doc,
    MissingTeam,
    Pipeline,
    RedisReader,
    StoreUnavailable,
    alias_owner_field,
    log,
    lost_connection,
    retired_member,
)


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


W = TypeVar("W", bound="WriterBase")


class WriterBase(Keyspace):
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

    def by(self: W, note: audit.Note) -> W:
        """This writer, its writes made by ``note``'s actor through ``note``'s route."""
        return type(self)(self.reader, self.audit_max_entries, note, self.wait_replicas, self.wait_timeout_ms,
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

    async def _team_for(self, tx: Tx, team_id: str | None) -> Doc | None:
        if team_id is None:
            return None
        await tx.pipe.watch(self.team_id(team_id))
        team = await tx.read(self.team_id(team_id))
        if team is None:
            raise MissingTeam(f"team_id {team_id!r} does not exist")
        return team
