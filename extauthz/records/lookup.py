"""The records behind a presented key, read the same way by the check path and by the
admin API's /v1/models: the master key is a record of its own, a key's team is read
only when it has one. Raises StoreUnavailable."""

from __future__ import annotations

from typing import Callable

from extauthz.records.store import RecordReader
from extauthz.records.record import MASTER, KeyRecord, TeamRecord, hash_token


async def lookup(token: str | None, store: RecordReader,
                 is_master: Callable[[str], bool]) -> tuple[KeyRecord | None, TeamRecord | None]:
    if token is None:
        return None, None
    token_hash = hash_token(token)
    if is_master(token_hash):
        return MASTER, None
    key = await store.get_key(token_hash)
    team = None
    if key is not None and key.team_id is not None:
        team = await store.get_team(key.team_id)
    return key, team
