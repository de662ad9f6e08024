"""Key and team records: what the decision reads, and their stored JSON form.

A record is stored as one JSON document (see docs/redis.md). The
decision needs only a few of its fields: those become a KeyRecord or TeamRecord; the
admin API reads the documents themselves.
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime, timezone
from typing import Any, NamedTuple
from urllib.parse import quote

from extauthz.domain import budgets, limits, route_access
from extauthz.domain.budgets import Budget
from extauthz.domain.limits import Limits

# Fields LiteLLM accepts that are stored and returned but not enforced yet.
NOT_ENFORCED = (
    "organization_id", "tags", "guardrails", "permissions", "aliases", "config",
    "allowed_cache_controls", "spend", "send_invite_email",
    "object_permission", "model_aliases", "budget_id", "enforced_params",
    "user_alias", "sso_user_id", "auto_create_key",
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


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def team_members(team: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A team document's members that read as members (a record written by hand may hold anything)."""
    found = (team or {}).get("members_with_roles")
    return [m for m in found if isinstance(m, dict)] if isinstance(found, list) else []


def masked_key(raw_key: str) -> str:
    """A key's name as records and listings show it: its last four characters (LiteLLM's)."""
    return f"sk-...{raw_key[-4:]}"


UNREADABLE_HOLDERS = frozenset({"<unreadable secret_holders>"})  # a field written by hand: no admin powers
# A value returned to the master key's holder (or a proxy admin) for a key with no owner:
# who was handed it is not known (a team key is often shared), so it is nobody's alone.
ANYONE = "*"


def secret_holders(key: dict[str, Any]) -> frozenset[str]:
    """The users who were given the key's value, or showed they hold it; ``*`` when that
    is not known. The master key's holder and proxy admins, who hold every power already,
    are not counted when they make a key for its owner. A record from before the field:
    whoever made it (``created_by``), else its owner, else anyone."""
    found = key.get("secret_holders")
    if found is None:
        made_by = key.get("created_by")
        first = made_by if made_by is not None else key.get("user_id")
        return frozenset((first if isinstance(first, str) and first else ANYONE,))
    if not isinstance(found, list) or not all(isinstance(h, str) for h in found):
        return UNREADABLE_HOLDERS
    return frozenset(found) or frozenset((ANYONE,))


def new_key_doc(raw_key: str, **fields: Any) -> dict[str, Any]:
    """A key's stored document: its hash, never the key itself."""
    stamp = now_iso()
    return {"token": hash_token(raw_key), "key_name": masked_key(raw_key), "key_alias": None, "models": [],
            "team_id": None, "expires": None, "blocked": False, "metadata": {}, "created_at": stamp,
            "updated_at": stamp, **fields}


def new_team_doc(team_id: str, **fields: Any) -> dict[str, Any]:
    """A team's stored document, as /team/new (or team_id_upsert) creates it."""
    stamp = now_iso()
    return {"team_id": team_id, "team_alias": None, "models": [], "blocked": False, "metadata": {},
            "members_with_roles": [], "created_at": stamp, "updated_at": stamp, **fields}


def new_user_doc(user_id: str, **fields: Any) -> dict[str, Any]:
    """A user's stored document, as /user/new (or user_id_upsert, or adding a member) creates it."""
    stamp = now_iso()
    return {"user_id": user_id, "user_email": None, "user_role": "internal_user", "models": [], "teams": [],
            "metadata": {}, "created_at": stamp, "updated_at": stamp, **fields}


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
    user_id: str | None = None          # the key's owner (a user record may narrow its models)
    allowed_routes: tuple[str, ...] | None = None   # None: every route its kind of caller may use
    limits: Limits | None = None        # None: no enforced limit (no counter to take)
    budget: Budget | None = None        # None: no budget (its spend is still counted)
    # A regenerated key's counters are those of the key it replaced (the first of its line).
    counter_id: str | None = None
    # A key regenerated with a grace period: when it stops (then it is an invalid key).
    retired_at: float | None = None
    # The other records sharing its counters while one is in its grace period: a retired
    # key's successor first, then the key it replaced itself, if any.
    linked: tuple[str, ...] = ()
    # A personal key's owner's budget (records/lookup.py sets it from the user record, as
    # LiteLLM applies a user's max_budget to its keys without a team): spent at the user's scope.
    user_budget: Budget | None = None

    @property
    def label(self) -> str:
        return self.key_alias or self.key_name or self.token_hash[:12]

    @property
    def account(self) -> str:
        """Whose counters (rate windows, in-flight places, spend) this key takes."""
        return self.counter_id or self.token_hash

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> "KeyRecord":
        user_id = doc.get("user_id")
        return cls(doc["token"], doc.get("key_alias"), _shared(doc.get("models")), _name(doc.get("team_id")),
                   parse_time(doc.get("expires")), bool(doc.get("blocked")), doc.get("key_name"),
                   _name(user_id) if isinstance(user_id, str) and user_id else None, _allowed_routes(doc),
                   limits.read(doc), budgets.read(doc), _text(doc.get("counter_id")), _retired_at(doc),
                   tuple(h for h in (_text(doc.get("rotated_to")), _text(doc.get("regenerated_from"))) if h))

    @classmethod
    def from_json(cls, raw: bytes | str) -> "KeyRecord":
        return cls.from_document(json.loads(raw))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _retired_at(doc: dict[str, Any]) -> float | None:
    """When a regenerated key's grace period ends (a time that does not read: already)."""
    if not doc.get("rotated_to"):
        return None
    try:
        return parse_time(doc.get("grace_until")) or 0.0
    except (ValueError, TypeError):
        return 0.0


UNREADABLE_ROUTES = ("<unreadable allowed_routes>",)  # admits no route: a key written by hand fails closed


def _allowed_routes(doc: dict[str, Any]) -> tuple[str, ...] | None:
    """A key's allowed_routes as the check reads them: a record from before they were
    enforced may hold a string, or only a key_type (LiteLLM stores both; its preset then)."""
    value = doc.get("allowed_routes")
    if value in (None, []):
        key_type = doc.get("key_type")
        return route_access.KEY_TYPES.get(key_type) if isinstance(key_type, str) else None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return UNREADABLE_ROUTES
    return _shared(value)


class MemberScope(NamedTuple):
    """A member's own terms in a team (LiteLLM's team membership): its ``allowed_models``
    narrow the team's keys it owns (and its tokens' calls through the team), and its
    ``max_budget_in_team`` is what they may spend together there."""

    user_id: str
    team_id: str
    models: tuple[str, ...]
    budget: Budget | None = None
    limits: None = None     # (a member has no rate limits of its own: settlement reads none)

    @property
    def narrows(self) -> str:
        return f"its user {self.user_id!r} in team {self.team_id!r}"

    @property
    def spend_scope(self) -> str:
        """Its spend counters' scope: the team's (one slot in a cluster), then the member."""
        return f"{limits.scope('team', self.team_id)}:member:{quote(self.user_id, safe='')}"


# A membership stored by hand that does not read narrows every member to no model and no
# budget: it refuses, rather than lifts, what it stood for.
# (Its key is no user id: a membership names a non-empty one.)
ANY_MEMBER = ""
UNREADABLE_MEMBERSHIP = ("<unreadable team_memberships>",)


def membership_entries(doc: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A team document's ``team_memberships`` entries that read as entries (the admin API's
    view of a record written by hand; the check reads the whole field, see memberships)."""
    found = (doc or {}).get("team_memberships")
    return [m for m in found if isinstance(m, dict)] if isinstance(found, list) else []


def memberships(doc: dict[str, Any]) -> dict[str, MemberScope] | None:
    """A team document's ``team_memberships`` (members with terms of their own), by user id;
    None when no member has any."""
    found, team_id = doc.get("team_memberships"), doc["team_id"]
    if found in (None, []):
        return None
    out = {}
    try:
        for entry in found:
            user_id, models = entry["user_id"], entry.get("allowed_models", [])
            models = [] if models is None else models
            if not isinstance(user_id, str) or not user_id or not isinstance(models, list) \
                    or not all(isinstance(m, str) and m for m in models):
                raise ValueError("a membership that does not read")
            budget = budgets.parse({"max_budget": entry.get("max_budget_in_team"),
                                    "budget_duration": entry.get("budget_duration")})
            out[_name(user_id)] = MemberScope(_name(user_id), _name(team_id), _shared(models), budget)
    except (ValueError, TypeError, KeyError, OverflowError):
        return {ANY_MEMBER: MemberScope(ANY_MEMBER, _name(team_id), UNREADABLE_MEMBERSHIP, budgets.UNREADABLE)}
    return out


MEMBER_TERMS = ("max_budget_in_team", "budget_duration", "allowed_models")


def with_terms(team: dict[str, Any], user_id: str, terms: dict[str, Any] | None) -> dict[str, Any]:
    """A team document with a member's own terms set over those it has (None: removed).
    A member left without a term has no entry; ``allowed_models: []`` is no narrowing."""
    entries = membership_entries(team)
    if terms == {}:
        return team
    old = next((m for m in entries if m.get("user_id") == user_id), {})
    merged = {} if terms is None else {k: v for k, v in {**old, **terms}.items()
                                       if k in MEMBER_TERMS and v not in (None, [])}
    kept = [m for m in entries if m.get("user_id") != user_id]
    return dict(team, team_memberships=[*kept, {"user_id": user_id, **merged}] if merged else kept)


class TeamRecord(NamedTuple):
    team_id: str
    team_alias: str | None
    models: tuple[str, ...]
    blocked: bool
    limits: Limits | None = None
    budget: Budget | None = None
    shadow: bool = False    # metadata "enforcement": "shadow": its denials recorded, not enforced
    members: dict[str, MemberScope] | None = None   # members with terms of their own, by user id

    @property
    def label(self) -> str:
        return self.team_alias or self.team_id

    def member(self, user_id: str | None) -> MemberScope | None:
        """The terms of a member in this team, None when it has none of its own."""
        if self.members is None or user_id is None:
            return None
        found = self.members.get(user_id)
        return found if found is not None else self.members.get(ANY_MEMBER)

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> "TeamRecord":
        metadata = doc.get("metadata")
        return cls(_name(doc["team_id"]), doc.get("team_alias"), _shared(doc.get("models")), bool(doc.get("blocked")),
                   limits.read(doc), budgets.read(doc),
                   isinstance(metadata, dict) and metadata.get("enforcement") == "shadow", memberships(doc))

    @classmethod
    def from_json(cls, raw: bytes | str) -> "TeamRecord":
        return cls.from_document(json.loads(raw))


class UserRecord(NamedTuple):
    """A user (LiteLLM's /user/new): its models narrow the keys it owns that have no team,
    and its budget is what they may spend together (as in LiteLLM, not its team keys')."""

    user_id: str
    user_role: str | None
    models: tuple[str, ...]
    budget: Budget | None = None    # max_budget (and its period, model_max_budget): its personal keys'
    limits: None = None             # (a user's rate limits are stored only: settlement reads none)

    @property
    def narrows(self) -> str:
        return f"its user {self.user_id!r}"

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> "UserRecord":
        return cls(_name(doc["user_id"]), doc.get("user_role"), _shared(doc.get("models")), budgets.read(doc))

    @classmethod
    def from_json(cls, raw: bytes | str) -> "UserRecord":
        return cls.from_document(json.loads(raw))


# What narrows a key on its owner's behalf (records/lookup.py): the user record of a key
# without a team, or the owner's terms in the key's team.
Owner = UserRecord | MemberScope

# The master key acts as a key that may call every model, as in LiteLLM.
MASTER = KeyRecord("master", "master key", (), None, None, False)
