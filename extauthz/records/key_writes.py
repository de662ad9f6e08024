"""Keys, written atomically: created with their alias and indexes, changed, rotated,
deleted."""

from __future__ import annotations

import json
import time
from typing import Callable

from extauthz.domain.record import (
    format_time,
)
from extauthz.records.store import (
    GRACE_MARGIN_MS,
    KEEP_TTL,
    RETIRED_CHANGES,
    Conflict,
    Doc,
    LimitReached,
    NotFound,
    alias_owner_field,
    retired_member,
    text,
)
from extauthz.records.write_base import Tx, WriterBase


class KeyWrites(WriterBase):

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

    async def delete_key(self, token_hash: str) -> bool:
        async def body(tx: Tx) -> bool:
            doc = await tx.read(self.key_id(token_hash))
            tx.pipe.multi()
            if doc is not None:
                self._queue_key_removal(tx, doc)
            return doc is not None

        return await self._transact(body, self.key_id(token_hash))
