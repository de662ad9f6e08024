"""What the admin API reads: documents by id, the listings' members, the audit trail."""

from __future__ import annotations

import asyncio
import json
from typing import Callable, cast

from extauthz.records.store import (
    LIST_BATCH,
    REDIS_FAILURES,
    Doc,
    StoreUnavailable,
    text,
)
from extauthz.records.write_base import WriterBase


class AdminReads(WriterBase):
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
