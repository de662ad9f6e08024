"""The audit trail: one entry per admin write, naming who made it, through which route,
and each record it changed (field by field, before and after).

The entry is appended to a capped Redis stream (``<p>audit``) inside the write's own
MULTI/EXEC (records/store.py), so a change without its entry, or an entry without its
change, cannot exist; once the write is committed the same entry is logged as JSON
(logger ``extauthz.audit``). Records hold no raw keys and no provider credentials; a
metadata field whose name says it is a secret is shown as ``[redacted]`` all the same.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

log = logging.getLogger("extauthz.audit")

Doc = dict[str, Any]
# Record kinds, by the Redis key prefix their documents live under (store.Keyspace).
KINDS = ("key", "team", "user")
# Bookkeeping every write changes: noise in a diff.
UNDIFFED = frozenset({"updated_at"})
REDACTED = "[redacted]"
# Names of values an admin may have put in a record's metadata that read as secrets.
SECRET_NAME = re.compile(r"key|secret|passw|credential|token|auth|cookie|private", re.I)
# Top-level fields that are not secrets although their names say key or token: the key's
# hash (its public id), its masked name (sk-...last 4), its alias, its type and routes.
PUBLIC_FIELDS = frozenset({"token", "key_name", "key_alias", "key_type", "allowed_routes", "metadata"})


@dataclass(frozen=True)
class Actor:
    """Who made a change: ``master_key``; ``jwt`` (the token's user and role, the check
    having let it through); ``key`` (a management key, by its hash, and its owner);
    ``system`` (a record the check path created, such as team_id_upsert's)."""

    kind: str
    user_id: str | None = None
    role: str | None = None
    key_hash: str | None = None

    def view(self) -> Doc:
        return {k: v for k, v in (("type", self.kind), ("user_id", self.user_id), ("role", self.role),
                                  ("key_hash", self.key_hash)) if v is not None}


MASTER_KEY = Actor("master_key")


@dataclass(frozen=True)
class Note:
    """What every write carries: its actor and the route (or process) that made it."""

    actor: Actor
    route: str


def scrub(value: Any, name: str = "") -> Any:
    """A value as the trail shows it: nested fields named like secrets redacted."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and SECRET_NAME.search(k) else scrub(v, k)
                for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def _field(name: str, value: Any) -> Any:
    if name not in PUBLIC_FIELDS and SECRET_NAME.search(name):
        return REDACTED
    return scrub(value)


def changes(before: Doc | None, after: Doc | None) -> Doc:
    """Field by field, what differs: ``{"field": {"before": x, "after": y}}``."""
    old, new = before or {}, after or {}
    out = {}
    for name in sorted(set(old) | set(new)):
        if name in UNDIFFED or old.get(name) == new.get(name):
            continue
        out[name] = {"before": _field(name, old.get(name)), "after": _field(name, new.get(name))}
    return out


def record_of(redis_key: str, prefix: str) -> tuple[str, str] | None:
    """("key", hash), ("team", id), ("user", id) for a record's Redis key."""
    rest = redis_key[len(prefix):] if redis_key.startswith(prefix) else ""
    kind, _, ident = rest.partition(":")
    return (kind, ident) if kind in KINDS and ident else None


def entry(note: Note, read: dict[str, Doc | None], written: dict[str, Doc | None], prefix: str,
          now: float) -> Doc | None:
    """The entry for one transaction: every record it wrote, diffed against what it read
    (a record it did not read was created). None when nothing changed (an upsert that
    found the record there)."""
    records = []
    for redis_key, after in written.items():
        found = record_of(redis_key, prefix)
        if found is None:
            continue
        before = read.get(redis_key)
        diff = changes(before, after)
        if not diff:
            continue
        kind, ident = found
        op = "create" if before is None else "delete" if after is None else "update"
        shown: Doc = {"type": kind, "id": ident, "op": op}
        alias = (after or before or {}).get("key_alias" if kind == "key" else "team_alias")
        if alias:
            shown["alias"] = alias
        shown["changes"] = diff
        records.append(shown)
    if not records:
        return None
    return {"time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
            "actor": note.actor.view(), "route": note.route, "records": records}


def encode(found: Doc) -> str:
    return json.dumps(found, separators=(",", ":"), default=str)


def logged(found: Doc) -> None:
    log.info("admin change", extra={"fields": {"audit": found}})


def targets(found: Doc) -> Iterable[str]:
    for record in found.get("records") or ():
        yield record.get("id", "")
        if record.get("alias"):
            yield record["alias"]


def selected(found: Doc, target: str | None, actor: str | None, role: str | None = None) -> bool:
    """A GET /audit filter: ``target`` any record's id or alias; ``actor`` the actor's user
    id or key hash, or the type ``master_key`` / ``system``; ``role`` its role. (Each its own
    field: a user named "master_key" is not the master key.)"""
    if target and target not in targets(found):
        return False
    who = found.get("actor") or {}
    if actor and actor not in (who.get("user_id"), who.get("key_hash")) \
            and not (who.get("type") in ("master_key", "system") and actor == who.get("type")):
        return False
    return not role or role == who.get("role")
