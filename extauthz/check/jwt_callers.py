"""A caller whose JWT Envoy verified, decided as its teams' keys would be: the key a team
stands for, what a caller of several teams may call, the route and team claims a token
must carry, the admin API by its role, the listings the check answers itself."""

from __future__ import annotations

import json
from typing import Any

from extauthz.check import listing
from extauthz.check.catalog import Catalog
from extauthz.check.decision import Allow, Reply
from extauthz.check.facts import Facts
from extauthz.check.identity import ADMIN_ROLES, Identity, claim, strings
from extauthz.check.policy import Decision, visible_models
from extauthz.check.routing import ACTING_ROUTES
from extauthz.check.runtime import Runtime
from extauthz.config import JwtAuth
from extauthz.domain import route_access
from extauthz.domain.deny import Deny
from extauthz.domain.envoy_names import (
    ACTING_TEAMS_HEADER,
    ACTING_USER_HEADER,
    ADMIN_ACTOR_HEADER,
)
from extauthz.domain.model_names import ALL_TEAM_MODELS
from extauthz.domain.record import KeyRecord, TeamRecord

JWT_OFF = Deny(401, "jwt_not_accepted", "This gateway no longer accepts JWTs; use a virtual key.")
JWT_NOT_FOR_US = Deny(401, "invalid_jwt", "The token's issuer or audience is not one this gateway accepts.")
NO_ROLE = Deny(403, "no_role", "The token maps to no role, and this gateway requires one (enforce_rbac).")
# A token's teams and ids, bounded: Entra ID puts at most 200 groups in a token.
MAX_TOKEN_TEAMS = 200
MAX_ID_CHARS = 256


def team_key(user_id: str | None, label: str, models: tuple[str, ...] | None, team: TeamRecord) -> KeyRecord:
    """A JWT caller as a key of one of its teams: the team's models, narrowed by its scopes."""
    return KeyRecord(f"jwt:{label}", label, models if models is not None else (ALL_TEAM_MODELS,), team.team_id,
                     None, False, None, user_id)


def teams_visible(user_id: str | None, label: str, models: tuple[str, ...] | None, teams: list[TeamRecord],
                  catalog: Catalog) -> list[str]:
    """What a caller of these teams may call, as one list (a JWT's /v1/models, a user acting
    for itself on /model/info): each usable team's models, as a key of it would see them,
    narrowed by the caller's own terms there."""
    names: list[str] = []
    for team in teams:
        if not team.blocked:
            visible = visible_models(team_key(user_id, label, models, team), team, catalog, team.member(user_id))
            names.extend(n for n in visible if n not in names)
    return names


def route_refusal(identity: Identity, jwt: JwtAuth, facts: Facts) -> Deny | None:
    """LiteLLM's admin_allowed_routes (admin roles) and team_allowed_routes (the others)."""
    allowed = jwt.admin_allowed_routes if identity.role in ADMIN_ROLES else jwt.team_allowed_routes
    if allowed is None or route_access.permits(allowed, facts.path, facts.endpoint):
        return None
    which = "admin_allowed_routes" if identity.role in ADMIN_ROLES else "team_allowed_routes"
    return Deny(403, "route_not_allowed", f"A token with role {identity.role} may not call "
                f"{facts.path.partition('?')[0]!r} ({which}: {list(allowed)}).")


def missing_team(identity: Identity, claims: Any, jwt: JwtAuth, needs_team: bool) -> Deny | None:
    """A token that names no team is refused (401, as LiteLLM refuses one it requires a
    team of); with ``team_id_jwt_field`` set, LiteLLM requires that claim itself, even when
    ``team_ids_jwt_field`` names teams (``team_id_default`` stands in for it). Without
    ``needs_team`` (the admin routes), only that requirement."""
    required = jwt.team_id_jwt_field is not None and not jwt.team_id_default \
        and not strings(claim(claims, jwt.team_id_jwt_field))
    if (identity.teams or not needs_team) and not required:
        return None
    fields = " and ".join(f"{n} {f!r}" for n, f in (("team_id field", jwt.team_id_jwt_field),
                                                    ("team_ids field", jwt.team_ids_jwt_field)) if f)
    return Deny(401, "missing_team", f"No team found in token. Checked {fields or 'no team field (none is set)'}.")


def list_reply(listed: tuple[str, str | None], names: list[str], runtime: Runtime) -> Decision:
    kind, model = listed
    if kind == "groups":
        return Reply(200, json.dumps(listing.group_info(runtime.catalog, names)))
    if kind == "models":
        return Reply(200, json.dumps(listing.models_page(runtime.catalog, names)))
    if model not in names:
        return Deny(404, "model_not_found", f"The model {model!r} does not exist or this token cannot use it.")
    return Reply(200, json.dumps(listing.model_entry(runtime.catalog, model)))


def admin_access(identity: Any, label: str, method: str, path: str, runtime: Runtime) -> Decision:
    scoped = bool(runtime.config.jwt and runtime.config.jwt.scope_mappings)
    """The admin API for a JWT caller: proxy_admin every route, proxy_admin_viewer the
    read routes (GET); other roles none. Allowed, the request reaches the admin API
    with the master key in place of the token."""
    acting: tuple[tuple[str, str], ...] = ()
    route = path.partition("?")[0]
    viewer = identity.role == "internal_user_viewer"
    if identity.role in ("internal_user", "internal_user_viewer") and identity.user_id \
            and identity.user_id.strip() and route in ACTING_ROUTES and (method == "GET" or not viewer):
        if route in ("/key/generate", "/key/update", "/key/regenerate") and scoped:
            # A key of its team's models would reach more than the token's scopes allow.
            return Deny(403, "admin_not_allowed", "With scope_mappings, a token cannot create or change keys.")
        # Its own keys only: the admin API narrows the master key to this user and teams.
        acting = ((ACTING_USER_HEADER, json.dumps(identity.user_id)),
                  (ACTING_TEAMS_HEADER, json.dumps(list(identity.teams))))
    allowed = identity.role == "proxy_admin" or (identity.role == "proxy_admin_viewer" and method == "GET") \
        or bool(acting)
    if not allowed:  # (LiteLLM: 403 for a viewer's write, 401 for a route a role may not use)
        return Deny(403 if identity.role == "proxy_admin_viewer" else 401, "admin_not_allowed",
                    f"The token's role ({identity.role}) may not use this admin route.")
    if runtime.admin_route is None:
        return Deny(403, "admin_not_allowed", "The admin API needs general_settings.master_key.")
    meta = {"key_alias": label, "role": identity.role, "deployment": "admin_api"}
    if identity.user_id:
        meta["user_id"] = identity.user_id
    actor = ((ADMIN_ACTOR_HEADER, json.dumps({"user_id": identity.user_id or label, "role": identity.role})),)
    return Allow(runtime.admin_route, acting + actor, meta)  # type: ignore[arg-type]
