"""The records behind a presented key, read the same way by the check path and by the
admin API's /v1/models: the master key is a record of its own, a key's team is read
only when it has one, its owner only when it has no team (a user's models narrow its
personal keys, as in LiteLLM; a team key's owner is narrowed by its terms in the team,
which the team's record holds). Raises StoreUnavailable."""

from __future__ import annotations

from typing import Callable, NamedTuple

from extauthz.domain.record import MASTER, KeyRecord, Owner, TeamRecord, hash_token
from extauthz.records.store import RecordReader

MAX_LINE = 8  # keys replaced in a row, each still in its grace period


class Records(NamedTuple):
    key: KeyRecord | None
    team: TeamRecord | None
    # What narrows the key on its owner's behalf: its user record for a key without a
    # team; for a team's key, the owner's own terms in that team (a MemberScope), if any.
    owner: Owner | None


NONE = Records(None, None, None)


async def lookup(token: str | None, store: RecordReader, is_master: Callable[[str], bool], *,
                 token_hash: str | None = None) -> Records:
    """The records of a presented key (``token``), or of a key named by its hash (the
    admin API's /access/explain): the same reads either way."""
    if token_hash is None:
        if token is None:
            return NONE
        token_hash = hash_token(token)
    if is_master(token_hash):
        return Records(MASTER, None, None)
    key = await store.get_key(token_hash)
    if key is not None and key.retired_at is not None:  # (only a replaced key costs the call)
        key = await with_successors(key, store)
    if key is None:
        return NONE
    if key.team_id is not None:
        team = await store.get_team(key.team_id)
        return Records(key, team, team.member(key.user_id) if team is not None else None)
    owner = await store.get_user(key.user_id) if key.user_id is not None else None
    if owner is not None and owner.budget is not None:
        key = key._replace(user_budget=owner.budget)
    return Records(key, None, owner)


async def with_successors(key: KeyRecord, store: RecordReader, depth: int = 0) -> KeyRecord | None:
    """A key replaced with a grace period is decided with its successor's current record
    (and that one with its own, down the line): models, limits, budgets, routes, team and
    owner (and so admin powers) are the successor's; the successor gone, it is no key;
    blocked or expired, so is it; retired sooner, so is it. What an admin does to the new
    key (a budget of 0, a key_type, a block, a delete) reaches the old one at once."""
    # A retired key's first link is its successor; a line longer than rotations within one
    # grace period make is refused rather than followed.
    successor = await store.get_key(key.linked[0]) if depth < MAX_LINE else None
    if successor is not None and successor.retired_at is not None:
        successor = await with_successors(successor, store, depth + 1)
    if successor is None:
        return None
    expires = min((t for t in (key.expires_at, successor.expires_at) if t is not None), default=None)
    retired = min((t for t in (key.retired_at, successor.retired_at) if t is not None))
    return successor._replace(token_hash=key.token_hash, key_name=key.key_name, linked=key.linked,
                              blocked=key.blocked or successor.blocked, expires_at=expires, retired_at=retired)
