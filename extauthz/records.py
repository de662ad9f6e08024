"""Key and team records: what the decision reads, and their stored JSON form.

A record is stored as one JSON document (see the README's schema section). The
decision needs only a few fields, which are lifted into typed attributes; the
document itself is kept for the admin API.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

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


@dataclass(frozen=True)
class KeyRecord:
    token_hash: str
    key_alias: str | None
    models: tuple[str, ...]
    team_id: str | None
    expires_at: float | None
    blocked: bool
    document: dict[str, Any] = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return self.key_alias or self.document.get("key_name") or self.token_hash[:12]

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> "KeyRecord":
        return cls(
            token_hash=doc["token"],
            key_alias=doc.get("key_alias"),
            models=tuple(doc.get("models") or ()),
            team_id=doc.get("team_id"),
            expires_at=parse_time(doc.get("expires")),
            blocked=bool(doc.get("blocked")),
            document=doc,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> "KeyRecord":
        return cls.from_document(json.loads(raw))


@dataclass(frozen=True)
class TeamRecord:
    team_id: str
    team_alias: str | None
    models: tuple[str, ...]
    blocked: bool
    document: dict[str, Any] = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return self.team_alias or self.team_id

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> "TeamRecord":
        return cls(
            team_id=doc["team_id"],
            team_alias=doc.get("team_alias"),
            models=tuple(doc.get("models") or ()),
            blocked=bool(doc.get("blocked")),
            document=doc,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> "TeamRecord":
        return cls.from_document(json.loads(raw))


# The master key acts as a key that may call every model, as in LiteLLM.
MASTER = KeyRecord("master", "master key", (), None, None, False, {})
