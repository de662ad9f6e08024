"""The audit trail: one entry per admin write, naming who made it, through which route,
and each record it changed (field by field, before and after).

The entry is appended to a capped Redis stream (``<p>audit``) inside the write's own
MULTI/EXEC (records/store.py), so a change without its entry, or an entry without its
change, cannot exist; once the write is committed the same entry is logged as JSON
(logger ``extauthz.audit``). Records hold no raw keys and no provider credentials; a
metadata field whose name says it is a secret, or whose value looks like one (a provider
key, a JWT, a private key, a long random token), is shown as ``[redacted]`` all the same.
A large value is shown as its digest and size: an entry stays small whatever a record
holds, and the stream is bounded in bytes as well as in entries (records/store.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

log = logging.getLogger("extauthz.audit")

Doc = dict[str, Any]
# Record kinds, by the Redis key prefix their documents live under (store.Keyspace).
KINDS = ("key", "team", "user", "model")
# Bookkeeping every write changes: noise in a diff.
UNDIFFED = frozenset({"updated_at"})
REDACTED = "[redacted]"
# Names of values an admin may have put in a record's metadata that read as secrets.
SECRET_NAME = re.compile(r"key|secret|passw|passphrase|pwd|credential|token|auth|bearer|cookie|private|"
                         r"signature|session|jwt", re.I)
# Top-level fields that are not secrets although their names say key or token: the key's
# hash (its public id), its masked name (sk-...last 4), its alias, its type and routes.
PUBLIC_FIELDS = frozenset({"token", "key_name", "key_alias", "key_type", "allowed_routes", "metadata",
                           "secret_holders"})
# Top-level fields whose values are the gateway's own ids (key hashes, a masked key): not
# read for secret-looking values.
ID_FIELDS = frozenset({"token", "key_name", "counter_id", "regenerated_from", "rotated_to"})
# Values that are secrets whatever they are named: provider and platform key formats,
# a JWT, a PEM private key, a bearer credential.
SECRET_VALUE = re.compile(
    r"sk-[A-Za-z0-9_-]{12,}|sk_(?:live|test)_[A-Za-z0-9]{12,}|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{30,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|glpat-[A-Za-z0-9_-]{20,}|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|hf_[A-Za-z0-9]{30,}|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.|-----BEGIN [A-Z ]*PRIVATE KEY"
    r"|\b[Bb]earer\s+\S{8,}")
# A long run of random-looking characters (letters of both cases and digits, high entropy)
# reads as a token; hex digests and UUIDs (one case) are ids, not secrets.
TOKEN_RUN = re.compile(r"[A-Za-z0-9_+/=.~-]{32,}")
TOKEN_ENTROPY_BITS = 4.0
# A value whose JSON is longer is shown as its digest and size.
FIELD_MAX_BYTES = 1024


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


def looks_secret(text: str) -> bool:
    """A string that reads as a credential whatever field holds it."""
    if SECRET_VALUE.search(text):
        return True
    return any(_random(run) for run in TOKEN_RUN.findall(text))


def _random(run: str) -> bool:
    if not (any(c.isupper() for c in run) and any(c.islower() for c in run) and any(c.isdigit() for c in run)):
        return False
    counts = Counter(run)
    return -sum(n / len(run) * math.log2(n / len(run)) for n in counts.values()) >= TOKEN_ENTROPY_BITS


def scrub(value: Any, name: str = "") -> Any:
    """A value as the trail shows it: nested fields named like secrets, and strings that
    look like one, redacted."""
    if isinstance(value, dict):
        # (a name that is itself a secret is replaced too, numbered so that none collide)
        return {(f"{REDACTED}{i}" if isinstance(k, str) and looks_secret(k) else k):
                (REDACTED if isinstance(k, str) and (SECRET_NAME.search(k) or looks_secret(k)) else scrub(v, k))
                for i, (k, v) in enumerate(value.items())}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str) and looks_secret(value):
        return REDACTED
    return value


def bounded(value: Any) -> Any:
    """A value as an entry holds it: itself, or when its JSON is over FIELD_MAX_BYTES its
    digest and size (a record's large metadata would otherwise be stored twice per change)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raw = json.dumps(value, separators=(",", ":"), default=str, sort_keys=True).encode()
    if len(raw) <= FIELD_MAX_BYTES:
        return value
    return {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}


def _field(name: str, value: Any) -> Any:
    if name not in PUBLIC_FIELDS and SECRET_NAME.search(name):
        return REDACTED
    if name in ID_FIELDS:
        return value
    return bounded(scrub(value))


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
        alias = (after or before or {}).get({"key": "key_alias", "model": "model_name"}.get(kind, "team_alias"))
        if alias:
            shown["alias"] = scrub(alias)
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
