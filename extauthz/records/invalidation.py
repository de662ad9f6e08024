"""Redis server-assisted invalidation of the local record cache.

One connection subscribes to ``__redis__:invalidate``; a second turns on
``CLIENT TRACKING ... BCAST PREFIX <key prefix> PREFIX <team prefix> REDIRECT <id of the first>``.
In broadcast mode Redis reports every change to a key under those prefixes, whoever made
it: the admin API of any replica, redis-cli, a migration script, an expiry. Tracking lives
as long as the second connection, so both are watched; when either fails the cache is
flushed and distrusted until tracking is on again.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio.connection import AbstractConnection

from extauthz.records.cache import RecordCache
from extauthz.records.connection import RedisTarget

log = logging.getLogger("extauthz.invalidation")

CHANNEL = "__redis__:invalidate"
HEARTBEAT_S = 1.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 5.0


class Invalidator:
    def __init__(self, redis_url: str | RedisTarget, prefixes: tuple[str, ...], cache: RecordCache,
                 timeout_s: float) -> None:
        # RESP2: invalidations arrive as ordinary pub/sub replies on the subscriber, which
        # this loop reads itself (RESP3 would divert them to a push handler). No socket
        # timeout: the subscriber waits for messages as long as there are none (a quiet
        # channel is healthy; the heartbeat on the tracking connection detects a dead one).
        target = redis_url if isinstance(redis_url, RedisTarget) else RedisTarget(redis_url)
        self.pool = target.pool(socket_connect_timeout=timeout_s, socket_timeout=None, protocol=2)
        self.prefixes = prefixes
        self.cache = cache
        self.timeout_s = timeout_s
        self.reconnects = 0
        self.stopping = False

    async def close(self) -> None:
        await self.pool.disconnect()

    def stop(self) -> None:
        """Ends ``run`` at its next turn even if a cancellation is lost: Python 3.11's
        ``asyncio.wait_for`` can swallow one that races with the connect it waits for,
        which once left a stopped process reconnecting every 5 s forever."""
        self.stopping = True

    async def run(self) -> None:
        """Keep the channel up for as long as the process runs (``stop`` and cancel to end it)."""
        backoff = BACKOFF_MIN_S
        while not self.stopping:
            subscriber = self.pool.make_connection()
            tracker = self.pool.make_connection()
            try:
                await self._open(subscriber, tracker)
                backoff = BACKOFF_MIN_S
                await self._serve(subscriber, tracker)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure of either connection: start over
                if self.cache.trusted:
                    log.warning("invalidation channel lost (%s); cache flushed until it is back", type(e).__name__)
            finally:
                self.cache.distrust()
                for conn in (subscriber, tracker):
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
        self.cache.mark_trusted()
        log.info("invalidation channel up; cache trusted")

    async def _serve(self, subscriber: AbstractConnection, tracker: AbstractConnection) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(tracker))
        listen = asyncio.create_task(self._listen(subscriber))
        try:
            done, _ = await asyncio.wait({heartbeat, listen}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise ConnectionError("invalidation channel closed")
        finally:
            for task in (heartbeat, listen):
                task.cancel()
            await asyncio.gather(heartbeat, listen, return_exceptions=True)

    async def _listen(self, subscriber: AbstractConnection) -> None:
        while True:
            message = await subscriber.read_response()
            if not isinstance(message, list) or len(message) != 3 or message[0] != b"message":
                continue
            keys = message[2]
            self.cache.invalidate(None if keys is None else [k.decode() for k in keys])

    async def _heartbeat(self, tracker: AbstractConnection) -> None:
        # Tracking ends silently with its connection, so that connection is probed.
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self._command(tracker, "PING")
