"""Shadow mode, for rolling enforcement out on live traffic: a model or limit denial is
recorded (decision log and metrics, ``outcome="shadow_deny"`` with the code it would have
had) and the request goes on as if permitted. Authentication is always enforced: no key,
an unknown, expired or blocked key, a blocked team, a route the key may not use.

On for every caller with ``extauthz_settings.enforcement: shadow``, or for one team's
callers with ``"enforcement": "shadow"`` in the team's metadata. Pure.
"""

from __future__ import annotations

from typing import Any

from extauthz.check.decision import Allow, Grant
from extauthz.check.facts import Facts
from extauthz.check.policy import authorize, forward
from extauthz.domain.deny import Deny
from extauthz.domain.record import KeyRecord, TeamRecord

SHADOW, ENFORCE = "shadow", "enforce"
# What shadow mode lets through: the model the caller may not use, and its limits.
MODEL_CODES = frozenset({"model_not_allowed"})
LIMIT_CODES = frozenset({"rate_limit_exceeded", "budget_exceeded", "unpriced_model", "usage_not_reported"})
SHADOW_DENY = "shadow_deny"      # the metadata key (and metric outcome) of a shadowed denial


def shadowed(enforcement: str, team: TeamRecord | None) -> bool:
    return enforcement == SHADOW or (team is not None and team.shadow)


def as_permitted(denied: Deny, facts: Facts, key: KeyRecord, catalog: Any, draw: float,
                 counted: bool) -> Allow | None:
    """The allow a model denial would have been were every model permitted (the model
    resolved and routed as for a key with no model list), marked with the denial; None
    when even that cannot be routed (no such model, a body that cannot carry it)."""
    open_key = key._replace(models=(), user_id=None)
    granted = authorize(facts, open_key, None, catalog, draw)
    if not isinstance(granted, Grant):
        return None
    routed = forward(granted, facts, counted)
    if not isinstance(routed, Allow):
        return None
    return mark(routed, denied)


def mark(allow: Allow, denied: Deny) -> Allow:
    """An allow that records what enforcement would have answered."""
    allow.metadata[SHADOW_DENY] = denied.code
    allow.metadata["shadow_status"] = str(denied.status)  # metadata values are strings
    if denied.metadata and "limit" in denied.metadata:
        allow.metadata["limit"] = denied.metadata["limit"]
    return allow


def shadow_code(decision: Any) -> str | None:
    """The denial a shadow-allowed decision stands for, or None."""
    return decision.metadata.get(SHADOW_DENY) if isinstance(decision, Allow) else None

