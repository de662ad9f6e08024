"""A caller whose JWT Envoy verified: its claims checked against the running config, its
user and teams read (created first with the upsert settings), then decided as a key of
each of its teams would be (check/key_decision.py); the admin API by its role."""

from __future__ import annotations

import time
from dataclasses import replace

from extauthz.check import listing
from extauthz.check.decision import Allow
from extauthz.check.facts import Facts
from extauthz.check.identity import Identity, identify, issued_for, scope_models
from extauthz.check.jwt_callers import (
    JWT_NOT_FOR_US,
    JWT_OFF,
    MAX_ID_CHARS,
    MAX_TOKEN_TEAMS,
    NO_ROLE,
    admin_access,
    list_reply,
    missing_team,
    route_refusal,
    team_key,
    teams_visible,
)
from extauthz.check.key_decision import KeyDecision
from extauthz.check.policy import UNAVAILABLE, Decision, authenticate, visible_models
from extauthz.check.request import body_of
from extauthz.check.routing import jwt_admin_path
from extauthz.check.runtime import Runtime
from extauthz.config import JwtAuth
from extauthz.domain.deny import Deny
from extauthz.domain.record import KeyRecord, TeamRecord, UserRecord
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2
from extauthz.records.store import RecordReader, StoreUnavailable
from extauthz.records.upsert import Upserts


class JwtDecision:
    """A JWT caller's decision; its teams' keys are decided by ``keys``."""

    def __init__(self, keys: KeyDecision, store: RecordReader, upserts: Upserts | None) -> None:
        self.keys = keys
        self.store = store
        self.upserts = upserts

    async def decide(self, facts: Facts, request: external_auth_pb2.CheckRequest, runtime: Runtime) -> Decision:
        """A caller whose JWT Envoy verified: its teams' records decide, as a key of each
        team would be decided (any team that allows the model allows the request)."""
        jwt = runtime.config.jwt
        if jwt is None:  # claims from an Envoy rendered for JWTs, a config without them now
            return JWT_OFF
        if facts.token_problem is not None:  # a second, different credential beside the token
            problem = facts.token_problem
            return Deny(problem.status, problem.code, problem.message)
        if runtime.refusal is not None:
            return runtime.refusal
        claims = facts.claims or {}
        # Envoy checked these against the config it was rendered from; the sidecar checks
        # them against the one it runs now (a reload that drops an IdP takes effect here).
        if not issued_for(claims, jwt):
            return JWT_NOT_FOR_US
        identity = identify(claims, jwt)
        if identity.role is None:
            return NO_ROLE
        refused = route_refusal(identity, jwt, facts)
        if refused is not None:
            return refused
        if len(identity.teams) > MAX_TOKEN_TEAMS or any(len(t) > MAX_ID_CHARS for t in identity.teams) \
                or len(identity.user_id or "") > MAX_ID_CHARS:
            # Each team costs a lookup (and with team_id_upsert a write) on this request's path.
            return Deny(403, "too_many_teams", f"The token names more than {MAX_TOKEN_TEAMS} teams, or an id over "
                        f"{MAX_ID_CHARS} characters.")
        admin_route = facts.endpoint is None and jwt_admin_path(facts.path)
        missing = None if identity.every_model else missing_team(identity, claims, jwt, not admin_route)
        if missing is not None:
            return missing
        try:
            user = await self.token_user(identity, jwt)
        except StoreUnavailable:
            return UNAVAILABLE
        if isinstance(user, Deny):
            return user
        if user is not None and user.user_role == "proxy_admin" and jwt.user_id_field_set:
            # LiteLLM's other proxy admin by JWT (it reads a user record only when the
            # config names the claim: a "sub" alone shares no namespace with the records).
            identity = replace(identity, role="proxy_admin", every_model=True)
        body = body_of(request)
        label = identity.user_id or identity.email or "jwt"
        if admin_route:
            return admin_access(identity, label, request.attributes.request.http.method, facts.path, runtime)
        listed = listing.listing(facts.path) if facts.endpoint is None else None
        if identity.every_model:  # admin_jwt_scope: every model, like the master key, logged as who it is
            admin = KeyRecord(f"jwt:{label}", label, (), None, None, False, None, identity.user_id)
            if listed is not None:
                return list_reply(listed, visible_models(admin, None, runtime.catalog), runtime)
            decision, _ = await self.keys.with_body(facts, body, admin, None, runtime)
            if isinstance(decision, Allow):
                decision.metadata["role"] = identity.role
            return decision
        models = scope_models(identity, jwt)
        if models == ():
            return Deny(403, "scope_not_allowed", "None of the token's scopes grants a model.")
        try:
            teams = [t for t in [await self.team_of(team_id, jwt) for team_id in identity.teams] if t is not None]
        except StoreUnavailable:
            return UNAVAILABLE
        if not teams:
            named = ", ".join(repr(t) for t in identity.teams)
            return Deny(404, "team_not_found", f"Team doesn't exist in db. Team={named}. Create the team via "
                        "`/team/new` call (or set team_id_upsert).")
        if listed is not None:  # what any of its usable teams allows, as one list
            return list_reply(listed, teams_visible(identity.user_id, label, models, teams, runtime.catalog), runtime)
        denials = []
        for team in teams:
            key = team_key(identity.user_id, label, models, team)
            refused = authenticate(facts, key, team, time.time())
            decision, read = (refused, facts) if refused is not None else await self.keys.with_body(
                facts, body, key, team, runtime, team.member(identity.user_id))
            if isinstance(decision, Allow):
                decision.metadata["role"] = identity.role
                return await self.keys.enforced(decision, read, key, team, runtime)
            denials.append((decision, read, key, team))
        first, read, key, team = denials[0]
        if len(denials) > 1 and all(isinstance(d, Deny) and d.code == "model_not_allowed" for d, _, _, _ in denials):
            each = "; ".join(f"team {t.label!r}: {list(t.models) or 'all models'}" for t in teams)
            first = Deny(403, "model_not_allowed", f"No team of the token may use {facts.model!r}. {each}.", "model",
                         first.metadata)
        # The request itself is wrong, or no team may use the model: its refusal (or, in
        # shadow mode, the first team's allow with that refusal recorded).
        return await self.keys.enforced(first, read, key, team, runtime) if isinstance(first, Deny) \
            and first.code == "model_not_allowed" else first


    async def token_user(self, identity: Identity, jwt: JwtAuth) -> UserRecord | Deny | None:
        """The user record of a token's user: created first with user_id_upsert; without
        it, with user_id_jwt_field set, a token's user with no record is refused, as in
        LiteLLM (an admin_jwt_scope token excepted)."""
        if identity.user_id is None:
            if jwt.user_record_required and not identity.every_model:  # (stricter than LiteLLM: see the docs)
                return Deny(401, "user_not_found", f"The token has no {jwt.user_id_jwt_field!r} claim, and this "
                            "gateway admits only users with a record (user_id_jwt_field is set).")
            return None
        if jwt.user_id_upsert and self.upserts is not None:
            await self.upserts.user(identity.user_id, identity.email)
        if not jwt.user_id_field_set:
            return None  # (no record is read: a "sub" alone only names the caller)
        user = await self.store.get_user(identity.user_id)
        if user is None and jwt.user_record_required and not identity.every_model:
            return Deny(401, "user_not_found", f"User doesn't exist in db. 'user_id'={identity.user_id}. Create "
                        "the user via `/user/new` call (or set user_id_upsert).")
        return user

    async def team_of(self, team_id: str, jwt: JwtAuth) -> TeamRecord | None:
        """A token's team; with team_id_upsert, one that does not exist yet is created (with
        no models: an admin grants them)."""
        team = await self.store.get_team(team_id)
        if team is None and jwt.team_id_upsert and self.upserts is not None:
            team = await self.upserts.team(team_id)
        return team
