"""Redis records: the lookups the Check path makes and the atomic writes of the admin API.

Layout (``<p>`` is the configured prefix, ``extauthz:`` by default):

- ``<p>key:<sha256 hex of the key>``  JSON key record (the raw key is never stored)
- ``<p>team:<team_id>``               JSON team record
- ``<p>alias:<key_alias>``            the hash of the key holding that alias (uniqueness)
- ``<p>team_keys:<team_id>``          set of the hashes of the team's keys
- ``<p>keys`` / ``<p>teams``          sets of every key hash / team id (listing)

Reads cost one round trip per record. Every write runs in a WATCH/MULTI transaction
that retries on conflict, so concurrent admin calls lose nothing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError

from extauthz.telemetry import tracing
from extauthz.records.record import KeyRecord, TeamRecord

TRANSACTION_ATTEMPTS = 100


class StoreUnavailable(Exception):
    """Redis could not answer in time; the decision fails closed."""


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class MissingTeam(Exception):
    """A key names a team that does not exist."""


class RecordReader(Protocol):
    """What the check path reads; the cache (cache.CachedStore) is one, Redis another."""

    async def get_key(self, token_hash: str) -> KeyRecord | None: ...

    async def get_team(self, team_id: str) -> TeamRecord | None: ...


Doc = dict[str, Any]
Pipeline = aioredis.client.Pipeline


class Keyspace:
    """Where each record lives in Redis (see the README's schema section)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def key_id(self, token_hash: str) -> str:
        return f"{self.prefix}key:{token_hash}"

    def team_id(self, team_id: str) -> str:
        return f"{self.prefix}team:{team_id}"

    def alias_id(self, alias: str) -> str:
        return f"{self.prefix}alias:{alias}"

    def team_keys_id(self, team_id: str) -> str:
        return f"{self.prefix}team_keys:{team_id}"


class RedisReader(Keyspace):
    """The check path's reads: one GET per record, within the lookup timeout."""

    def __init__(self, url: str, timeout_ms: int, prefix: str = "extauthz:") -> None:
        super().__init__(prefix)
        timeout = self.timeout = timeout_ms / 1000
        # One retry, on a broken connection only (a pooled connection from before a Redis
        # restart); a timeout is not retried: the caller's deadline is the lookup timeout.
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), self.timeout))
        except (RedisError, OSError, asyncio.TimeoutError):
            return False

    async def get(self, redis_key: str) -> bytes | None:
        try:
            if tracing.enabled():
                with tracing.redis_span("GET"):
                    return await asyncio.wait_for(self.redis.get(redis_key), self.timeout)
            return await asyncio.wait_for(self.redis.get(redis_key), self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from None

    async def get_key(self, token_hash: str) -> KeyRecord | None:
        raw = await self.get(self.key_id(token_hash))
        return None if raw is None else KeyRecord.from_json(raw)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        raw = await self.get(self.team_id(team_id))
        return None if raw is None else TeamRecord.from_json(raw)


class RedisWriter(Keyspace):
    """The admin API's side: whole documents, listings and atomic WATCH/MULTI writes, on
    the reader's connections."""

    def __init__(self, reader: RedisReader) -> None:
        super().__init__(reader.prefix)
        self.reader = reader
        self.redis = reader.redis
        self.timeout = reader.timeout

    # -- admin reads ----------------------------------------------------------------------

    async def key_doc(self, token_hash: str) -> Doc | None:
        raw = await self.reader.get(self.key_id(token_hash))
        return None if raw is None else json.loads(raw)

    async def team_doc(self, team_id: str) -> Doc | None:
        raw = await self.reader.get(self.team_id(team_id))
        return None if raw is None else json.loads(raw)

    async def alias_owner(self, alias: str) -> str | None:
        raw = await self.reader.get(self.alias_id(alias))
        return None if raw is None else raw.decode()

    async def _docs(self, set_key: str, id_of: Callable[[str], str]) -> list[Doc]:
        try:
            members = sorted(m.decode() for m in await self.redis.smembers(set_key))
            raws = await self.redis.mget([id_of(m) for m in members]) if members else []
        except (RedisError, OSError) as e:
            raise StoreUnavailable(type(e).__name__) from None
        return [json.loads(r) for r in raws if r is not None]

    async def list_keys(self, team_id: str | None = None) -> list[Doc]:
        source = self.team_keys_id(team_id) if team_id else f"{self.prefix}keys"
        return await self._docs(source, self.key_id)

    async def list_teams(self) -> list[Doc]:
        return await self._docs(f"{self.prefix}teams", self.team_id)

    # -- atomic writes --------------------------------------------------------------------

    async def _transact(self, body: Callable[[Pipeline], Awaitable[Any]], *watch: str) -> Any:
        """Run ``body`` under WATCH; it reads with the pipeline, calls ``multi()`` and queues
        writes. A concurrent change to a watched key reruns it from the start."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for _ in range(TRANSACTION_ATTEMPTS):
                    try:
                        if watch:
                            await pipe.watch(*watch)
                        result = await body(pipe)
                        await pipe.execute()
                        return result
                    except WatchError:
                        continue
                    finally:
                        await pipe.reset()
        except (RedisError, OSError) as e:
            raise StoreUnavailable(type(e).__name__) from None
        raise Conflict("too many concurrent changes to the same record; try again")

    @staticmethod
    async def _read(pipe: Pipeline, redis_key: str) -> Doc | None:
        raw = await pipe.get(redis_key)
        return None if raw is None else json.loads(raw)

    async def _team_for(self, pipe: Pipeline, team_id: str | None) -> Doc | None:
        if team_id is None:
            return None
        await pipe.watch(self.team_id(team_id))
        team = await self._read(pipe, self.team_id(team_id))
        if team is None:
            raise MissingTeam(f"team_id {team_id!r} does not exist")
        return team

    async def _claim_alias(self, pipe: Pipeline, alias: str | None, token_hash: str) -> None:
        if alias is None:
            return
        await pipe.watch(self.alias_id(alias))
        owner = await pipe.get(self.alias_id(alias))
        if owner is not None and owner.decode() != token_hash:
            raise Conflict(f"key_alias {alias!r} is already in use")

    async def create_key(self, doc: Doc, check_team: Callable[[Doc, Doc | None], None]) -> Doc:
        """Store a new key; ``check_team(key, team)`` raises to refuse it (runs under WATCH)."""
        token_hash = doc["token"]

        async def body(pipe: Pipeline) -> Doc:
            team = await self._team_for(pipe, doc.get("team_id"))
            check_team(doc, team)
            await self._claim_alias(pipe, doc.get("key_alias"), token_hash)
            pipe.multi()
            self._queue_key(pipe, doc, None)
            return doc

        return await self._transact(body)

    async def update_key(self, token_hash: str, change: Callable[[Doc], Doc],
                         check_team: Callable[[Doc, Doc | None], None]) -> Doc:
        async def body(pipe: Pipeline) -> Doc:
            await pipe.watch(self.key_id(token_hash))
            old = await self._read(pipe, self.key_id(token_hash))
            if old is None:
                raise NotFound("key not found")
            new = change(dict(old))
            team = await self._team_for(pipe, new.get("team_id"))
            check_team(new, team)
            await self._claim_alias(pipe, new.get("key_alias"), token_hash)
            pipe.multi()
            self._queue_key(pipe, new, old)
            return new

        return await self._transact(body)

    def _queue_key(self, pipe: Pipeline, new: Doc, old: Doc | None) -> None:
        token_hash = new["token"]
        pipe.set(self.key_id(token_hash), json.dumps(new, separators=(",", ":")))
        pipe.sadd(f"{self.prefix}keys", token_hash)
        old_alias, old_team = (old or {}).get("key_alias"), (old or {}).get("team_id")
        if old_alias and old_alias != new.get("key_alias"):
            pipe.delete(self.alias_id(old_alias))
        if new.get("key_alias"):
            pipe.set(self.alias_id(new["key_alias"]), token_hash)
        if old_team and old_team != new.get("team_id"):
            pipe.srem(self.team_keys_id(old_team), token_hash)
        if new.get("team_id"):
            pipe.sadd(self.team_keys_id(new["team_id"]), token_hash)

    async def delete_key(self, token_hash: str) -> bool:
        async def body(pipe: Pipeline) -> bool:
            doc = await self._read(pipe, self.key_id(token_hash))
            pipe.multi()
            if doc is not None:
                self._queue_key_removal(pipe, doc)
            return doc is not None

        return await self._transact(body, self.key_id(token_hash))

    def _queue_key_removal(self, pipe: Pipeline, doc: Doc) -> None:
        token_hash = doc["token"]
        pipe.delete(self.key_id(token_hash))
        pipe.srem(f"{self.prefix}keys", token_hash)
        if doc.get("key_alias"):
            pipe.delete(self.alias_id(doc["key_alias"]))
        if doc.get("team_id"):
            pipe.srem(self.team_keys_id(doc["team_id"]), token_hash)

    async def create_team(self, doc: Doc) -> Doc:
        async def body(pipe: Pipeline) -> Doc:
            if await pipe.exists(self.team_id(doc["team_id"])):
                raise Conflict(f"team_id {doc['team_id']!r} already exists")
            pipe.multi()
            pipe.set(self.team_id(doc["team_id"]), json.dumps(doc, separators=(",", ":")))
            pipe.sadd(f"{self.prefix}teams", doc["team_id"])
            return doc

        return await self._transact(body, self.team_id(doc["team_id"]))

    async def update_team(self, team_id: str, change: Callable[[Doc], Doc]) -> Doc:
        async def body(pipe: Pipeline) -> Doc:
            old = await self._read(pipe, self.team_id(team_id))
            if old is None:
                raise NotFound(f"team_id {team_id!r} does not exist")
            new = change(dict(old))
            pipe.multi()
            pipe.set(self.team_id(team_id), json.dumps(new, separators=(",", ":")))
            return new

        return await self._transact(body, self.team_id(team_id))

    async def delete_team(self, team_id: str) -> int:
        """Delete a team and every key of the team; returns how many keys went with it."""
        async def body(pipe: Pipeline) -> int:
            if not await pipe.exists(self.team_id(team_id)):
                raise NotFound(f"team_id {team_id!r} does not exist")
            hashes = [m.decode() for m in await pipe.smembers(self.team_keys_id(team_id))]
            docs = [await self._read(pipe, self.key_id(h)) for h in hashes]
            pipe.multi()
            for doc in docs:
                if doc is not None:
                    self._queue_key_removal(pipe, doc)
            pipe.delete(self.team_id(team_id), self.team_keys_id(team_id))
            pipe.srem(f"{self.prefix}teams", team_id)
            return sum(d is not None for d in docs)

        return await self._transact(body, self.team_id(team_id), self.team_keys_id(team_id))
