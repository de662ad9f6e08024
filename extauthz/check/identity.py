"""Who a JWT caller is: the verified claims (Envoy's jwt_authn, passed as the check's
metadata) mapped to a user, teams, a role and scopes, the way LiteLLM's
``litellm_jwtauth`` reads them. Pure: the claims come in, an Identity comes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from extauthz.config import JwtAuth

# Internal roles, most powerful first: a token mapping to several gets the first.
ROLES = ("proxy_admin", "proxy_admin_viewer", "internal_user", "internal_user_viewer", "team")
# The roles LiteLLM's admin_allowed_routes applies to; team_allowed_routes applies to the others.
ADMIN_ROLES = ("proxy_admin", "proxy_admin_viewer")


@dataclass(frozen=True)
class Identity:
    user_id: str | None
    email: str | None
    teams: tuple[str, ...]
    role: str | None            # None: enforce_rbac and no role mapped
    scopes: tuple[str, ...]
    # A proxy admin by admin_jwt_scope: every model, as LiteLLM's admin scope. A role
    # mapped to proxy_admin (role_mappings) feeds the admin routes only, as in LiteLLM:
    # its models are its teams'.
    every_model: bool = False


def claim(claims: Mapping[str, Any], path: str | None) -> Any:
    """A claim by its dotted path (``realm_access.roles``); a top-level claim whose own
    name has dots (``https://example.com/groups``) is found first."""
    if not path:
        return None
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str) and v)
    return ()


def identify(claims: Mapping[str, Any], jwt: JwtAuth) -> Identity:
    teams = strings(claim(claims, jwt.team_ids_jwt_field)) + strings(claim(claims, jwt.team_id_jwt_field))
    if not teams and jwt.team_id_default:
        teams = (jwt.team_id_default,)
    scope_claim = claims.get("scope", claims.get("scp"))
    scopes = tuple(scope_claim.split()) if isinstance(scope_claim, str) else strings(scope_claim)
    mapped = {internal for role, internal in jwt.role_mappings
              if role in strings(claim(claims, jwt.roles_jwt_field))}
    admin_scope = bool(jwt.admin_jwt_scope and jwt.admin_jwt_scope in scopes)
    if admin_scope:
        mapped.add("proxy_admin")
    role = next((r for r in ROLES if r in mapped), None)
    if role is None and not jwt.enforce_rbac:
        role = "team"
    user = claim(claims, jwt.user_id_jwt_field)
    email = claim(claims, jwt.user_email_jwt_field)
    return Identity(user if isinstance(user, str) else None, email if isinstance(email, str) else None,
                    tuple(dict.fromkeys(teams)), role, scopes, admin_scope)


def issued_for(claims: Mapping[str, Any], jwt: JwtAuth) -> bool:
    """Whether the token names an issuer and an audience this config accepts."""
    issuer = claims.get("iss")
    audience = claims.get("aud")
    audiences = {audience} if isinstance(audience, str) else set(strings(audience))
    return (isinstance(issuer, str) and any(issuer.rstrip("/") == i.rstrip("/") for i in jwt.issuers)
            and not audiences.isdisjoint(jwt.audiences))


def scope_models(identity: Identity, jwt: JwtAuth) -> tuple[str, ...] | None:
    """With ``scope_mappings``: the models and access groups the token's scopes grant (to
    be intersected with its team's); None when no mapping is configured."""
    if not jwt.scope_mappings:
        return None
    granted: list[str] = []
    for scope, models in jwt.scope_mappings:
        if scope in identity.scopes:
            granted.extend(m for m in models if m not in granted)
    return tuple(granted)
