"""Who an admin API request acts as, and which records that lets it touch.

Three kinds of caller reach the admin API:

- the master key: everything;
- a JWT the check allowed (it swapped the token for the master key and named the user
  and the token's teams in the acting headers), or a virtual key whose owner's
  ``user_role`` is ``internal_user`` / ``internal_user_viewer``: an ``Acting`` user, limited
  to its own keys and, in the teams where it is an ``admin`` member, the team's keys
  and members;
- a virtual key whose owner is ``proxy_admin`` (all) or ``proxy_admin_viewer`` (reads).

The rules are pure functions of the caller and the stored documents; api.py reads the
documents and applies them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from extauthz.admin.schema import BASELINE_MEMBER_ROUTES, USER_ROLES
from extauthz.check.routing import ACTING_ROUTES
from extauthz.domain import route_access
from extauthz.domain.envoy_names import ACTING_TEAMS_HEADER, ACTING_USER_HEADER, ADMIN_ACTOR_HEADER
from extauthz.domain.record import ANYONE, secret_holders, team_members
from extauthz.records.audit import MASTER_KEY, Actor

Doc = dict[str, Any]
READ_ROUTES = tuple(r for r in ACTING_ROUTES if r in route_access.INFO_ROUTES or r in route_access.MODEL_INFO_ROUTES)

# LiteLLM's status for a route the caller's role may not use at all (its "Only proxy admin
# can be used to ..."): 401. A record the caller may not touch is 403 (or 404, below).
ROUTE_REFUSED = 401


class Refused(Exception):
    """The caller may not do this (403, or 404 where saying more would tell what exists;
    ROUTE_REFUSED where its role may not use the route at all)."""

    def __init__(self, message: str, status: int = 403, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def member_routes(team: Doc | None) -> frozenset[str]:
    """The key routes a plain member of a team may use on the team's keys."""
    granted = (team or {}).get("team_member_permissions")
    if not isinstance(granted, list):
        return BASELINE_MEMBER_ROUTES
    found = BASELINE_MEMBER_ROUTES | frozenset(g for g in granted if isinstance(g, str))
    # (LiteLLM names regenerating by either of its paths; both are one route here)
    return found | {"/key/regenerate"} if "/key/{key_id}/regenerate" in found else found


@dataclass(frozen=True)
class Acting:
    user_id: str
    teams: tuple[str, ...]
    read_only: bool = False
    admin_teams: frozenset[str] = frozenset()   # teams where it is an "admin" member
    # In the other teams, the key routes the team grants its plain members (by team id).
    granted: tuple[tuple[str, frozenset[str]], ...] = ()

    def with_admin_teams(self, team_docs: list[Doc | None], members_only: bool = False) -> "Acting":
        """The teams where it is an admin member, from the teams' records. With
        ``members_only`` (a key's owner, whose teams come from its own record) only the teams
        whose records still list it count: a deleted and recreated team is not its team."""
        def role_in(doc: Doc | None) -> str | None:
            return next((m.get("role") for m in team_members(doc) if m.get("user_id") == self.user_id), None)
        pairs = list(zip(self.teams, team_docs, strict=False))
        admin = frozenset(t for t, d in pairs if role_in(d) == "admin")
        teams = tuple(t for t, d in pairs if role_in(d) is not None) if members_only else self.teams
        granted = tuple((t, member_routes(d)) for t, d in pairs if t not in admin)
        return Acting(self.user_id, teams, self.read_only, admin, granted)

    def may_use(self, method: str, route: str) -> bool:
        return route in (READ_ROUTES if self.read_only or method == "GET" else ACTING_ROUTES)

    def owns(self, key: Doc | None) -> bool:
        """A key it may read, change or delete: its own, or one of a team it administers."""
        return key is not None and (key.get("user_id") == self.user_id or key.get("team_id") in self.admin_teams)

    def check_new_key(self, key: Doc, requested_user: Any, route: str = "/key/generate") -> None:
        """A key it may create (or a key's state after an update by ``route``): its own
        personal key (no team: its user record narrows it), a key of one of its teams for
        itself where the team lets its members (team_member_permissions), or a key for
        anyone in a team it administers."""
        team_id = key.get("team_id")
        if team_id is not None and team_id not in self.teams and team_id not in self.admin_teams:
            raise Refused(f"Give a team_id of the caller's teams: {sorted(set(self.teams) | self.admin_teams)}.",
                          param="team_id")
        if requested_user not in (None, self.user_id) and (team_id is None or team_id not in self.admin_teams):
            raise Refused("A user creates keys for itself only (a team admin for the team's members).",
                          param="user_id")
        self.check_member_route(team_id, route)

    def check_member_route(self, team_id: Any, route: str) -> None:
        """A plain member uses a team's keys by the routes the team grants it (LiteLLM's
        team member permissions: /key/info and /key/health, and team_member_permissions)."""
        if team_id is None or team_id in self.admin_teams:
            return
        granted = dict(self.granted).get(team_id, BASELINE_MEMBER_ROUTES)
        if route not in granted:
            raise Refused(f"Team member does not have permissions for endpoint: {route}. You only have access to the "
                          f"following endpoints: {sorted(granted)} for team {team_id}. Ask an admin to add it to the "
                          "team's team_member_permissions.", ROUTE_REFUSED, param=route)

    def check_owner(self, key: Doc, team: Doc | None) -> None:
        """A key it gives to someone else goes to a member of the key's team: not to no one,
        nor to any user id (whose key count and aliases it would use up)."""
        owner = key.get("user_id")
        if owner == self.user_id:
            return
        if not isinstance(owner, str) or not any(m.get("user_id") == owner for m in team_members(team)):
            raise Refused("A team admin gives a team's keys to the team's members only.", param="user_id")

    def check_team(self, team_id: str, manage: bool) -> None:
        if team_id not in (self.admin_teams if manage else set(self.teams) | self.admin_teams):
            raise Refused("team not found" if not manage else "Only an admin member of the team may change its "
                          "members.", 404 if not manage else 403)


def acting_from_headers(headers: Mapping[str, str]) -> Acting | None:
    """The acting headers the check set (JSON: no trimming, no separators to confuse);
    either one present at all means acting, and a value that does not read as a user
    refuses the request rather than leave the master key whole."""
    if ACTING_USER_HEADER not in headers and ACTING_TEAMS_HEADER not in headers:
        return None
    try:
        user = json.loads(headers.get(ACTING_USER_HEADER, ""))
        teams = json.loads(headers.get(ACTING_TEAMS_HEADER, "[]"))
    except ValueError:
        user, teams = None, []
    if not isinstance(user, str) or not user.strip() or not isinstance(teams, list):
        raise Refused("The acting user is unreadable.")
    return Acting(user, tuple(t for t in teams if isinstance(t, str)))


def actor_from_headers(headers: Mapping[str, str], acting: Acting | None) -> Actor:
    """Who the audit trail names for a master-key request: the JWT caller the check let
    through (its user and role, from the header it set), else the master key's holder."""
    raw = headers.get(ADMIN_ACTOR_HEADER)
    if raw is None:
        return Actor("jwt", user_id=acting.user_id) if acting is not None else MASTER_KEY
    try:
        found = json.loads(raw)
    except ValueError:
        found = None
    if not isinstance(found, dict) or not isinstance(found.get("user_id"), str) \
            or not isinstance(found.get("role"), str):
        raise Refused("The admin actor is unreadable.")
    return Actor("jwt", user_id=found["user_id"], role=found["role"])


def holders_after_change(before: Doc, after: Doc, holder: str | None, named_by_value: bool) -> list[str]:
    """Who holds the value of a changed key: those who did, its previous owner when the key
    is given to someone else (the value stays with it), and the user who made the change
    when it named the key by its value (not its hash)."""
    holders = set(secret_holders(before))
    previous = before.get("user_id")
    if isinstance(previous, str) and previous and after.get("user_id") != previous:
        holders.add(previous)
    if named_by_value and holder is not None:
        holders.add(holder)
    return sorted(holders)


def holders_of_new_value(holder: str | None, owner: Any) -> list[str]:
    """Who holds a value just generated: the user it was returned to (``holder``; None
    for the master key's holder) and the owner it is for, as if handed to it; for a key
    without an owner, anyone (a key given an owner later acts as it only once the owner
    has regenerated it)."""
    if not isinstance(owner, str) or not owner:
        return [ANYONE]
    return sorted({owner, holder} if holder else {owner})


def key_owner_power(key: Doc, owner: Doc | None, method: str, admins: frozenset[str] = frozenset()) -> Acting | str:
    """What a virtual key may do on the admin API, by its owner's role: "master" (a
    proxy_admin), "read" (a proxy_admin_viewer), an Acting user, or Refused. A key whose
    value another user was given or showed it holds (made for the owner by a team admin,
    reassigned, named by value in another user's call) has none, whatever edits follow: it
    would lend that user the owner's role. Its owner regenerating it gets them back. A
    holder that is a proxy admin now (``admins``) lends nothing; demoted, it would."""
    owner_id = owner.get("user_id") if owner is not None else None
    # (``admins``: the holders that are proxy admins now: they hold every power already)
    if not secret_holders(key) - admins <= {owner_id}:
        raise Refused("This key's value was given to someone other than its owner (made, reassigned or "
                      "regenerated by another user, or named by its value in another user's call): it has no admin "
                      "powers. Its owner gets them back by regenerating it.", ROUTE_REFUSED)
    role = owner.get("user_role") if owner is not None else None
    if owner is None or role not in USER_ROLES:
        raise Refused("This key's owner has no admin role (a key needs a user_id whose user has a user_role).",
                      ROUTE_REFUSED)
    if role == "proxy_admin":
        return "master"
    if role == "proxy_admin_viewer":
        if method != "GET":
            raise Refused("A proxy_admin_viewer's key may only read.")  # (LiteLLM's 403 for a viewer)
        return "read"
    teams = owner.get("teams")
    return Acting(owner["user_id"], tuple(t for t in teams if isinstance(t, str)) if isinstance(teams, list) else (),
                  read_only=role == "internal_user_viewer")
