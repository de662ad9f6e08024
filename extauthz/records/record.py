"""Key and team records: what the decision reads, and their stored JSON form.

A record is stored as one JSON document (see the README's schema section). The
decision needs only a few of its fields: those become a KeyRecord or TeamRecord; the
admin API reads the documents themselves.
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime, timezone
from typing import Any, NamedTuple

# Fields LiteLLM accepts that are stored and returned but not enforced yet.
NOT_ENFORCED = (
    "max_budget", "budget_duration", "soft_budget", "max_parallel_requests", "rpm_limit",
    "tpm_limit", "model_rpm_limit", "model_tpm_limit", "model_max_budget", "user_id",
    "organization_id", "tags", "guardrails", "permissions", "aliases", "config",
    "allowed_cache_controls", "spend", "send_invite_email", "key_type",
    "allowed_routes", "object_permission", "members_with_roles", "members",
    "team_member_permissions", "model_aliases", "budget_id", "enforced_params",
)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_time(value: Any) -> float | None:
    if not value:
        return None
    stamp = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def format_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


_SHARED: dict[tuple[str, ...], tuple[str, ...]] = {}
_SHARED_MAX = 50_000


def _shared(models: Any) -> tuple[str, ...]:
    """One tuple object per distinct allowed-models list: 100,000 keys share a handful."""
    value = tuple(sys.intern(m) if isinstance(m, str) else m for m in (models or ()))
    found = _SHARED.get(value)
    if found is not None:
        return found
    if len(_SHARED) < _SHARED_MAX:
        _SHARED[value] = value
    return value


def _name(value: Any) -> Any:
    return sys.intern(value) if isinstance(value, str) else value


# Records are named tuples of strings, numbers and tuples: small, and cheap for the
# cycle collector (a cache of 100,000 records costs it no pause worth measuring).
class KeyRecord(NamedTuple):
    token_hash: str
    key_alias: str | None
    models: tuple[str, ...]
    team_id: str | None
    expires_at: float | None
    blocked: bool
    key_name: str | None = None

    @property
    def label(self) -> str:
        return self.key_alias or self.key_name or self.token_hash[:12]

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> "KeyRecord":
        return cls(doc["token"], doc.get("key_alias"), _shared(doc.get("models")), _name(doc.get("team_id")),
                   parse_time(doc.get("expires")), bool(doc.get("blocked")), doc.get("key_name"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> "KeyRecord":
        return cls.from_document(json.loads(raw))


class TeamRecord(NamedTuple):
    team_id: str
    team_alias: str | None
    models: tuple[str, ...]
    blocked: bool

    @property
    def label(self) -> str:
        return self.team_alias or self.team_id

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> "TeamRecord":
        return cls(_name(doc["team_id"]), doc.get("team_alias"), _shared(doc.get("models")), bool(doc.get("blocked")))

    @classmethod
    def from_json(cls, raw: bytes | str) -> "TeamRecord":
        return cls.from_document(json.loads(raw))


# The master key acts as a key that may call every model, as in LiteLLM.
MASTER = KeyRecord("master", "master key", (), None, None, False)
