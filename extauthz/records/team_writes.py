"""Teams, users and team members, written atomically with the keys a change reaches."""

from __future__ import annotations

from typing import Callable

from extauthz.domain.record import (
    now_iso,
    secret_holders,
    team_members,
    with_terms,
)
from extauthz.records.store import (
    KEEP_TTL,
    Conflict,
    Doc,
    NotFound,
    text,
)
from extauthz.records.write_base import Tx, WriterBase


class TeamWrites(WriterBase):
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
