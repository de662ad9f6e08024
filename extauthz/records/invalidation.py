"""Redis server-assisted invalidation of the local record cache.

One connection subscribes to ``__redis__:invalidate``; a second turns on
``CLIENT TRACKING ... BCAST PREFIX <key prefix> PREFIX <team prefix> REDIRECT <id of the first>``.
In broadcast mode Redis reports every change to a key under those prefixes, whoever made
it: the admin API of any replica, redis-cli, a migration script, an expiry. Tracking lives
as long as the second connection, so both are watched; when either fails the cache is
flushed and distrusted until tracking is on again.

In a Redis Cluster each primary reports only the changes it makes, so there is a pair on
every primary (every node that calls itself a primary, with slots or not yet), and the
cache is trusted only while every pair is up and every tracked primary sees the same
primaries and moves no slot. Each heartbeat asks every tracked primary (CLUSTER NODES): a
primary added, removed, promoted or demoted, a node that sees the cluster otherwise (a
partition), or a slot being migrated (its keys are written on two primaries, by ASK
redirections, for as long as it lasts) ends the channel; it opens again once the view is
one and settled, and until then lookups read Redis.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from redis.asyncio.connection import AbstractConnection, ConnectionPool

from extauthz.records.cache import RecordCache
from extauthz.records.connection import RedisTarget

log = logging.getLogger("extauthz.invalidation")

CHANNEL = "__redis__:invalidate"
SLOTS = 16384  # a Redis Cluster's hash slots
HEARTBEAT_S = 1.0
# Reconnects back off to one a second: a failover's new primary is tracked (and the cache
# trusted) within a second of its promotion, at one connection attempt a second per sidecar.
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 1.0


class Invalidator:
    def __init__(self, redis_url: str | RedisTarget, prefixes: tuple[str, ...], cache: RecordCache,
                 timeout_s: float, watch: tuple[str, Callable[[], None]] | None = None) -> None:
        """``watch``: a prefix and what to call when a key under it changes, and each time the
        channel is up again (a change while it was down was not reported): runtime models."""
        # RESP2: invalidations arrive as ordinary pub/sub replies on the subscriber, which
        # this loop reads itself (RESP3 would divert them to a push handler). No socket
        # timeout: the subscriber waits for messages as long as there are none (a quiet
        # channel is healthy; the heartbeat on the tracking connection detects a dead one).
        target = self.target = redis_url if isinstance(redis_url, RedisTarget) else RedisTarget(redis_url)
        self.pool = target.pool(socket_connect_timeout=timeout_s, socket_timeout=None, protocol=2)
        self.node_pools: dict[tuple[str, int], ConnectionPool] = {}  # cluster: per node
        self.primaries: list[tuple[str, int]] = []                  # cluster: those tracked now
        self.tracked: list[str] = []  # where the channel is up now (host:port), for the metric
        self.watch = watch
        self.prefixes = prefixes + ((watch[0],) if watch is not None else ())
        self.cache = cache
        self.timeout_s = timeout_s
        self.reconnects = 0
        self.stopping = False

    async def close(self) -> None:
        await self.pool.disconnect()
        for pool in self.node_pools.values():
            await pool.disconnect()

    def _node_pool(self, address: tuple[str, int]) -> ConnectionPool:
        if address not in self.node_pools:
            self.node_pools[address] = self.target.node_pool(*address, socket_connect_timeout=self.timeout_s,
                                                             socket_timeout=None, protocol=2)
        return self.node_pools[address]

    async def _pools(self) -> list[ConnectionPool]:
        """Where to track: the one Redis, or every primary of the cluster."""
        if not self.target.cluster:
            return [self.pool]
        self.primaries = await self._cluster_primaries()
        return [self._node_pool(a) for a in self.primaries]

    async def _cluster_primaries(self) -> list[tuple[str, int]]:
        """The cluster's primaries, asked of the primaries last seen, then the seeds (every
        tracked primary is asked again before the cache is trusted: ``_settled``)."""
        failure: Exception = ConnectionError("no cluster node answered")
        for address in dict.fromkeys([*self.primaries, *self.target.cluster_nodes]):
            conn = self._node_pool(address).make_connection()
            try:
                await asyncio.wait_for(conn.connect(), self.timeout_s)
                return primaries_of(await self._command(conn, "CLUSTER", "NODES"), address[0])[0]
            except Exception as e:  # that node is down or no cluster node: ask the next
                failure = e
            finally:
                await conn.disconnect()
        raise failure

    async def _settled(self, tracker: AbstractConnection, address: tuple[str, int]) -> None:
        """This primary sees the primaries tracked, is one of them, and moves no slot; else
        ConnectionError (the channel opens again on the cluster as it is then)."""
        primaries, moving = primaries_of(await self._command(tracker, "CLUSTER", "NODES"), address[0])
        if primaries != self.primaries:
            raise ConnectionError(f"the cluster's primaries changed: {len(self.primaries)} tracked, "
                                  f"{len(primaries)} seen by {address[0]}:{address[1]}")
        if moving:
            raise ConnectionError(f"a slot is migrating to or from {address[0]}:{address[1]}")

    def stop(self) -> None:
        """Ends ``run`` at its next turn even if a cancellation is lost: Python 3.11's
        ``asyncio.wait_for`` can swallow one that races with the connect it waits for,
        which once left a stopped process reconnecting every 5 s forever."""
        self.stopping = True

    async def run(self) -> None:
        """Keep the channel up for as long as the process runs (``stop`` and cancel to end it)."""
        backoff = BACKOFF_MIN_S
        while not self.stopping:
            pairs: list[tuple[AbstractConnection, AbstractConnection]] = []
            try:
                for pool in await self._pools():
                    pairs.append((pool.make_connection(), pool.make_connection()))
                    await self._open(*pairs[-1])
                if self.target.cluster:
                    for (_, tracker), address in zip(pairs, self.primaries, strict=False):
                        await self._settled(tracker, address)
                self.cache.mark_trusted()
                if self.watch is not None:
                    self.watch[1]()
                self.tracked = [_address(tracker) for _, tracker in pairs]
                log.info("invalidation channel up%s; cache trusted",
                         f" on {len(pairs)} primaries" if self.target.cluster else "")
                backoff = BACKOFF_MIN_S
                await self._serve(pairs)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure of any connection: start over
                if self.cache.trusted:
                    log.warning("invalidation channel lost (%s: %s); cache flushed until it is back",
                                type(e).__name__, e)
            finally:
                self.cache.distrust()
                self.tracked = []
                for pair in pairs:
                    for conn in pair:
                        await conn.disconnect()
            self.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _command(self, conn: AbstractConnection, *args: str) -> object:
        await conn.send_command(*args)
        return await asyncio.wait_for(conn.read_response(), self.timeout_s)

    async def _open(self, subscriber: AbstractConnection, tracker: AbstractConnection) -> None:
        await asyncio.wait_for(subscriber.connect(), self.timeout_s)
        await asyncio.wait_for(tracker.connect(), self.timeout_s)
        client_id = await self._command(subscriber, "CLIENT", "ID")
        await self._command(subscriber, "SUBSCRIBE", CHANNEL)
        prefixes = [arg for p in self.prefixes for arg in ("PREFIX", p)]
        await self._command(tracker, "CLIENT", "TRACKING", "ON", "REDIRECT", str(client_id), "BCAST", *prefixes)

    async def _serve(self, pairs: list[tuple[AbstractConnection, AbstractConnection]]) -> None:
        watched = self.primaries if self.target.cluster else [None] * len(pairs)
        closed = asyncio.Event()
        tasks = [asyncio.create_task(job) for (subscriber, tracker), address in zip(pairs, watched, strict=False)
                 for job in (self._listen(subscriber, closed), self._heartbeat(tracker, address, closed))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise ConnectionError("invalidation channel closed")
        finally:
            # Distrust first, then stop the others: Python 3.11's wait_for can swallow a
            # cancellation that meets a reply (every heartbeat asks at the same moment), and a
            # task that lives on must not keep a cache trusted whose channel is half gone.
            self.cache.distrust()
            closed.set()
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=HEARTBEAT_S + self.timeout_s)

    async def _listen(self, subscriber: AbstractConnection, closed: asyncio.Event) -> None:
        while not closed.is_set():
            message = await subscriber.read_response()
            if not isinstance(message, list) or len(message) != 3 or message[0] != b"message":
                continue
            keys = None if message[2] is None else [k.decode() for k in message[2]]
            self.cache.invalidate(keys)
            if self.watch is not None and (keys is None or any(k.startswith(self.watch[0]) for k in keys)):
                self.watch[1]()

    async def _heartbeat(self, tracker: AbstractConnection, address: tuple[str, int] | None,
                         closed: asyncio.Event) -> None:
        # Tracking ends silently with its connection, so that connection is probed; and in a
        # cluster (``address``: the primary it is on) that primary's view is compared.
        while not closed.is_set():
            await asyncio.sleep(HEARTBEAT_S)
            if address is None:
                await self._command(tracker, "PING")
            else:
                await self._settled(tracker, address)


def _address(conn: AbstractConnection) -> str:
    host, port = getattr(conn, "host", None), getattr(conn, "port", None)
    return f"{host}:{port}" if host else str(getattr(conn, "path", "") or "?")


def primaries_of(nodes: object, asked: str) -> tuple[list[tuple[str, int]], bool]:
    """From a CLUSTER NODES answer: every node that is a primary now (slots or not; one
    marked failed or still in the handshake left out), and whether the node asked is moving
    a slot (``[slot->-id]`` or ``[slot-<-id]`` on its own line). An empty host is the node asked."""
    text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
    found, moving, covered = set(), False, 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        flags = fields[2].split(",")
        if "myself" in flags and any(f.startswith("[") for f in fields[8:]):
            moving = True
        if "master" not in flags or {"fail", "handshake", "noaddr"} & set(flags):
            continue
        host, _, port = fields[1].split("@")[0].rpartition(":")
        found.add((host or asked, int(port)))
        for held in fields[8:]:
            if not held.startswith("["):
                low, _, high = held.partition("-")
                covered += int(high or low) - int(low) + 1
    if covered < SLOTS:
        # A primary failed and its replica is not promoted yet: nothing is written to its
        # slots, but a channel opened now would flush the cache (and the records kept for
        # an outage) only to close again at the promotion.
        raise ConnectionError(f"the cluster's live primaries hold {covered} of {SLOTS} slots")
    return sorted(found), moving
