"""Validation of admin API request bodies, in LiteLLM's field names.

Each parser takes the decoded JSON body and returns the fields to store, or raises
``Invalid`` with a message for a 400. Fields LiteLLM accepts that are not enforced
here are stored as given and reported back as ``not_enforced``.
"""

from __future__ import annotations

import json
import re
import time
from typing import AbstractSet, Any

from extauthz.check.catalog import Catalog, Resolution
from extauthz.check.policy import admits, list_admits
from extauthz.domain import budgets, limits, route_access
from extauthz.domain.model_names import ALL_MODELS, ALL_TEAM_MODELS, NO_DEFAULT_MODELS, SPECIAL_ENTRIES
from extauthz.domain.record import NOT_ENFORCED, format_time, parse_time
from extauthz.domain.wildcard import matches

DURATION = re.compile(r"([0-9]+)(s|m|h|d|w|mo)")
DURATION_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}
MAX_DURATION_DAYS = 36500  # 100 years: longer is a typo, and past year 9999 no expiry time can be written
MAX_DURATION_SECONDS = MAX_DURATION_DAYS * 86400
# Matching is linear whatever the count; the cap keeps allowed-models entries readable
# and bounds the work a stored pattern costs on every request.
MAX_PATTERN_STARS = 4
# Limits enforced on keys and teams (see domain/limits.py, domain/budgets.py); on users they
# are stored only.
RATE_FIELDS = {"rpm_limit", "model_rpm_limit", "tpm_limit", "model_tpm_limit", "max_parallel_requests"}
BUDGET_FIELDS = {"max_budget", "soft_budget", "budget_duration", "model_max_budget"}
LIMIT_FIELDS = RATE_FIELDS | BUDGET_FIELDS
KEY_FIELDS = LIMIT_FIELDS | {"models", "team_id", "key_alias", "duration", "expires", "metadata", "blocked", "user_id",
                             "key_type", "allowed_routes"}
TEAM_FIELDS = LIMIT_FIELDS | {"team_alias", "models", "blocked", "metadata", "members_with_roles",
                              "team_member_permissions", "default_team_member_models"}
USER_FIELDS = LIMIT_FIELDS | {"user_email", "user_role", "models", "teams", "metadata", "key_alias", "duration"}
USER_ROLES = ("proxy_admin", "proxy_admin_viewer", "internal_user", "internal_user_viewer")
MEMBER_ROLES = ("admin", "user")
# What a plain member may do with a team's keys (LiteLLM's team member permissions): its
# baseline, and what the team's team_member_permissions add to it.
BASELINE_MEMBER_ROUTES = frozenset({"/key/info", "/key/health"})
MEMBER_PERMISSIONS = frozenset({
    "/key/generate", "/key/update", "/key/delete", "/key/regenerate", "/key/service-account/generate",
    "/key/{key_id}/regenerate", "/key/block", "/key/unblock", "/key/bulk_update", "/team/key/bulk_update",
    "/key/{key_id}/reset_spend", "/key/access_group_assignment", "/auto_router/manage", "/key/info",
    "/key/health", "/key/list", "/key/aliases"})


class Invalid(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def expect(body: dict[str, Any], name: str, kind: type | tuple[type, ...], nullable: bool = True) -> Any:
    value = body.get(name)
    if value is None and nullable:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise Invalid(f"'{name}' must be {names}, got {type(value).__name__}", name)
    return value


MAX_ALIAS_CHARS = 256


def check_metadata(value: Any, max_bytes: int, max_depth: int) -> None:
    """A record's metadata within the operator's bounds (extauthz_settings)."""
    if not isinstance(value, dict):
        return  # (the field's own check says what it must be)
    size = len(json.dumps(value, separators=(",", ":"), default=str).encode())
    if size > max_bytes:
        raise Invalid(f"'metadata' is {size} bytes of JSON, over {max_bytes} (extauthz_settings.max_metadata_bytes)",
                      "metadata")
    level: list[dict | list] = [value]
    depth = 1
    while level:
        level = [v for each in level for v in (each.values() if isinstance(each, dict) else each)
                 if isinstance(v, (dict, list))]
        if level:
            depth += 1
        if depth > max_depth:
            raise Invalid(f"'metadata' is nested deeper than {max_depth} levels "
                          "(extauthz_settings.max_metadata_depth)", "metadata")


def reject_unknown(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(k for k in body if k not in allowed and k not in NOT_ENFORCED)
    if unknown:
        raise Invalid(f"Unknown field(s): {', '.join(unknown)}", unknown[0])


def not_enforced(doc: dict[str, Any], user: bool = False) -> list[str]:
    # (a user's budget binds its personal keys; its rate limits are stored only)
    stored_only = NOT_ENFORCED + tuple(RATE_FIELDS) if user else NOT_ENFORCED
    # "spend" is counted (a view shows the counted one); one an admin sets is not used.
    return sorted(k for k in doc if k in stored_only and doc[k] is not None and k != "spend")


def duration_seconds(text: str) -> int:
    """Seconds in a LiteLLM duration, from 1s up to 100 years; Invalid for anything else."""
    m = DURATION.fullmatch(text.strip())
    if not m:
        raise Invalid(f"'duration' must look like 30s, 5m, 1h, 7d, 2w or 1mo, got {text!r}", "duration")
    digits, unit = m.group(1).lstrip("0") or "0", m.group(2)
    # Only short numbers are converted: int() of thousands of digits is slow, then refused.
    seconds = int(digits) * DURATION_SECONDS[unit] if len(digits) <= 12 else MAX_DURATION_SECONDS + 1
    if seconds == 0:
        raise Invalid(f"'duration' must be longer than zero, got {text!r}; use null for a key that never expires",
                      "duration")
    if seconds > MAX_DURATION_SECONDS:
        raise Invalid(f"'duration' must be at most {MAX_DURATION_DAYS}d (100 years), got {text!r}", "duration")
    return seconds


MAX_GRACE_DAYS = 90


def grace_seconds(text: str | None) -> int:
    """A regeneration's grace period in seconds (0: none), at most MAX_GRACE_DAYS: an old
    key kept working for years would be a second key nobody rotates."""
    if text is None or text.strip() in ("", "0", "0s"):
        return 0
    try:
        seconds = duration_seconds(text)
    except Invalid as e:
        raise Invalid(str(e).replace("'duration'", "'grace_period'"), "grace_period") from None
    if seconds > MAX_GRACE_DAYS * 86_400:
        raise Invalid(f"'grace_period' must be at most {MAX_GRACE_DAYS}d, got {text!r}", "grace_period")
    return seconds


def expires_time(text: str) -> str:
    """An ``expires`` value as stored: ISO 8601 in UTC. Invalid when it is not a time
    (an empty string included: it is neither a time nor the null that means "never")
    or names one that cannot be written back (before year 1 or after 9999 in UTC)."""
    try:
        epoch = parse_time(text) if text.strip() else None
        if epoch is not None:
            return format_time(epoch)
    except (ValueError, OverflowError, OSError):
        pass
    raise Invalid(f"'expires' must be an ISO 8601 time between years 1 and 9999 such as 2030-01-31T00:00:00Z, "
                  f"got {text!r}; use null for a key that never expires", "expires")


def models_list(body: dict[str, Any], catalog: Catalog) -> list[str] | None:
    models = expect(body, "models", list)
    if models is None:
        return None
    if not all(isinstance(m, str) and m for m in models):
        raise Invalid("'models' must be a list of non-empty strings", "models")
    too_many_stars = [m for m in models if m.count("*") > MAX_PATTERN_STARS]
    if too_many_stars:
        raise Invalid(f"Pattern(s) {too_many_stars} have more than {MAX_PATTERN_STARS} '*'", "models")
    unknown = [m for m in models if not catalog.knows_entry(m)]
    if unknown:
        raise Invalid(
            f"Unknown model(s) {unknown}. Valid entries: models {catalog.model_names()}, "
            f"access groups {sorted(catalog.access_groups)}, {sorted(SPECIAL_ENTRIES)}, "
            "or a pattern with '*'", "models")
    return models


def record_fields(body: dict[str, Any], catalog: Catalog, allowed: set[str]) -> dict[str, Any]:
    """The fields keys and teams share: models, metadata, blocked and the not-enforced ones."""
    reject_unknown(body, allowed)
    out: dict[str, Any] = {k: body[k] for k in body if k in NOT_ENFORCED}
    for name in LIMIT_FIELDS & body.keys():
        try:
            (limits if name in RATE_FIELDS else budgets).parse({name: body[name]})
        except ValueError as e:
            raise Invalid(str(e), name) from None
        out[name] = body[name]
    models = models_list(body, catalog)
    if models is not None:
        out["models"] = models
    if "metadata" in body:
        out["metadata"] = expect(body, "metadata", dict) or {}
    if "blocked" in body:
        out["blocked"] = bool(expect(body, "blocked", bool))
    return out


def key_fields(body: dict[str, Any], catalog: Catalog, extra: AbstractSet[str] = frozenset()) -> dict[str, Any]:
    """The stored fields a /key/generate or /key/update body sets (only those present)."""
    out = record_fields(body, catalog, KEY_FIELDS | extra)
    for name in ("team_id", "key_alias", "user_id"):
        if name in body:
            value = expect(body, name, str)
            if value == "":
                raise Invalid(f"'{name}' must not be empty", name)
            out[name] = value
    if body.get("duration") is not None:
        out["expires"] = format_time(time.time() + duration_seconds(expect(body, "duration", str)))
    elif "expires" in body:
        expires = expect(body, "expires", str)
        out["expires"] = None if expires is None else expires_time(expires)
    elif "duration" in body:
        out["expires"] = None
    if "allowed_routes" in body:
        allowed = expect(body, "allowed_routes", list)
        problem = route_access.problem(allowed) if allowed else None
        if problem:
            raise Invalid(f"'allowed_routes': {problem}", "allowed_routes")
        out["allowed_routes"] = allowed or None
    if body.get("key_type") is not None:
        key_type = expect(body, "key_type", str)
        if key_type not in route_access.KEY_TYPES:
            raise Invalid(f"'key_type' must be one of {list(route_access.KEY_TYPES)}, got {key_type!r}", "key_type")
        out["key_type"] = key_type
        preset = route_access.KEY_TYPES[key_type]
        if preset is not None:  # as LiteLLM: the type's routes replace any given
            out["allowed_routes"] = list(preset)
    return out


def user_fields(body: dict[str, Any], catalog: Catalog, extra: AbstractSet[str] = frozenset()) -> dict[str, Any]:
    """The stored fields a /user/new or /user/update body sets."""
    out = record_fields(body, catalog, USER_FIELDS | extra)
    out.pop("blocked", None)
    if "models" in body and NO_DEFAULT_MODELS in (out.get("models") or []) and len(out["models"]) > 1:
        raise Invalid(f"'{NO_DEFAULT_MODELS}' stands alone in 'models'", "models")
    if "user_email" in body:
        out["user_email"] = expect(body, "user_email", str)
    if body.get("user_role") is not None:
        role = expect(body, "user_role", str)
        if role not in USER_ROLES:
            raise Invalid(f"'user_role' must be one of {list(USER_ROLES)}, got {role!r}", "user_role")
        out["user_role"] = role
    if "teams" in body:
        teams = expect(body, "teams", list) or []
        if not all(isinstance(t, str) and t for t in teams):
            raise Invalid("'teams' must be a list of team ids", "teams")
        out["teams"] = list(dict.fromkeys(teams))
    return out


def member(value: Any) -> dict[str, Any]:
    """One team member, as LiteLLM's /team/member_add takes it: a role, and a user_id or a
    user_email."""
    if not isinstance(value, dict):
        raise Invalid("'member' must be an object with 'role' and 'user_id' or 'user_email'", "member")
    reject_unknown(value, {"role", "user_id", "user_email"})
    role = value.get("role", "user")
    if role not in MEMBER_ROLES:
        raise Invalid(f"a member's 'role' must be one of {list(MEMBER_ROLES)}, got {role!r}", "member")
    user_id, email = expect(value, "user_id", str), expect(value, "user_email", str)
    if not user_id and not email:
        raise Invalid("a member needs a 'user_id' or a 'user_email'", "member")
    return {"role": role, "user_id": user_id or None, "user_email": email or None}


def member_terms(body: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    """A member's own terms in a team, as /team/member_add and /team/member_update take
    them (those present; ``allowed_models: []`` lifts the member's narrowing, as in LiteLLM)."""
    out: dict[str, Any] = {}
    if "max_budget_in_team" in body:
        try:
            out["max_budget_in_team"] = budgets.usd(body["max_budget_in_team"], "max_budget_in_team")
        except ValueError as e:
            raise Invalid(str(e), "max_budget_in_team") from None
    if "budget_duration" in body:
        try:
            budgets.period(body["budget_duration"])
        except ValueError as e:
            raise Invalid(str(e), "budget_duration") from None
        out["budget_duration"] = body["budget_duration"]
    if "allowed_models" in body:
        try:
            models = models_list({"models": body["allowed_models"]}, catalog)
        except Invalid as e:
            raise Invalid(str(e).replace("'models'", "'allowed_models'"), "allowed_models") from None
        out["allowed_models"] = models or []
    return out


def team_fields(body: dict[str, Any], catalog: Catalog, extra: AbstractSet[str] = frozenset()) -> dict[str, Any]:
    out = record_fields(body, catalog, TEAM_FIELDS | extra)
    if "team_alias" in body:
        out["team_alias"] = expect(body, "team_alias", str)
    if body.get("members_with_roles") is not None:
        out["members_with_roles"] = [member(m) for m in expect(body, "members_with_roles", list)]
    if "team_member_permissions" in body:
        granted = expect(body, "team_member_permissions", list)
        unknown = [g for g in granted or [] if g not in MEMBER_PERMISSIONS]
        if unknown:
            raise Invalid(f"'team_member_permissions' holds unknown route(s) {unknown}; known: "
                          f"{sorted(MEMBER_PERMISSIONS)}", "team_member_permissions")
        out["team_member_permissions"] = granted
    if "default_team_member_models" in body:  # (a new member's allowed_models when it is given none)
        try:
            out["default_team_member_models"] = models_list({"models": body["default_team_member_models"]},
                                                            catalog) or []
        except Invalid as e:
            raise Invalid(str(e).replace("'models'", "'default_team_member_models'"),
                          "default_team_member_models") from None
    return out


def check_key_against_team(key: dict[str, Any], team: dict[str, Any] | None, catalog: Catalog) -> None:
    """Refuse key models the team does not grant: the decision intersects both lists
    anyway, but a key that promises more than its team can deliver is an admin error."""
    models = key.get("models") or []
    if team is None:
        if ALL_TEAM_MODELS in models:
            raise Invalid("'all-team-models' needs a team_id", "models")
        return
    team_models = tuple(team.get("models") or ())
    outside = [m for m in models if not within(m, team_models, catalog)]
    if outside:
        raise Invalid(f"Key models {outside} are not in the models of team "
                      f"{team.get('team_alias') or team['team_id']!r}: {list(team_models)}", "models")


def within(entry: str, team_models: tuple[str, ...], catalog: Catalog) -> bool:
    if not team_models or any(m in ALL_MODELS for m in team_models) or entry in (ALL_TEAM_MODELS, NO_DEFAULT_MODELS):
        return True
    if entry in ALL_MODELS:
        return False
    if entry in team_models:
        return True
    if entry in catalog.access_groups:
        return all(admits(team_models, Resolution(name, catalog.groups[name]))
                   for name in catalog.access_groups[entry])
    if "*" in entry:
        return any("*" in t and matches(t, entry) for t in team_models)
    resolution = catalog.resolve(entry)
    return resolution is not None and list_admits(team_models, resolution)
