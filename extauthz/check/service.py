"""The Check servicer: CheckRequest -> facts -> records -> decision -> CheckResponse bytes."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from extauthz.check import listing
from extauthz.check import shadow as shadow_mode
from extauthz.check.decision import Allow, Grant, Reply
from extauthz.check.enforcement import LimitEnforcement, counted, hide_asked_usage
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
from extauthz.check.policy import UNAVAILABLE, Decision, authenticate, authorize, forward, route_denied, visible_models
from extauthz.check.request import body_of, facts_from_check, with_body
from extauthz.check.responses import allow_bytes, deny_bytes, reply_bytes
from extauthz.check.routing import jwt_admin_path
from extauthz.check.runtime import Runtime
from extauthz.config import JwtAuth
from extauthz.domain.deny import Deny
from extauthz.domain.envoy_names import (
    USAGE_ID,
)
from extauthz.domain.record import KeyRecord, Owner, TeamRecord, UserRecord
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2
from extauthz.records.lookup import lookup
from extauthz.records.store import RecordReader, StoreUnavailable
from extauthz.records.upsert import Upserts
from extauthz.telemetry import logs, tracing
from extauthz.telemetry.metrics import CheckMetrics
from extauthz.usage.counters import RateCounters

log = logging.getLogger("extauthz.check")

SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
INTERNAL = Deny(500, "internal_error", "The authorization service failed to decide; the request was not forwarded.")
TOO_LARGE = Deny(413, "body_too_large", "The check request is larger than this gateway reads; the request "
                "was not forwarded.")
UNREADABLE = Deny(400, "invalid_check_request", "The check request could not be decoded; the request was "
                  "not forwarded.")
DEADLINE_SLACK_S = 0.1
# Bodies larger than this are read on a thread of their own: the event loop goes on
# answering other checks meanwhile (the parser gives up the GIL between its steps).
INLINE_BODY_BYTES = 64 * 1024


def decide_with_body(facts: Facts, body: bytes, key: Any, team: Any, runtime: Runtime, draw: float,
                     owner: Any = None) -> tuple[Decision, Facts]:
    """The model from the body, the decision (pure), then routing: what the upstream request
    becomes; with the facts the body added."""
    facts = with_body(facts, body)
    granted = authorize(facts, key, team, runtime.catalog, draw, owner)
    return (forward(granted, facts, counted(key, team, runtime)) if isinstance(granted, Grant) else granted), facts


class AuthorizationService:
    def __init__(self, runtime: Callable[[], Runtime], store: RecordReader, log_allowed: bool = False,
                 decision_log: logs.DecisionLog | None = None, max_message_bytes: int = 64 * 1024 * 1024,
                 upserts: Upserts | None = None, counters: RateCounters | None = None) -> None:
        self.max_message_bytes = max_message_bytes
        self.upserts = upserts
        self.runtime = runtime
        self.store = store
        self.log_allowed = log_allowed
        self.metrics = CheckMetrics(SERVICE)
        self.decision_log = decision_log or logs.DecisionLog()
        self.last_store_warning = 0.0
        # One thread: large bodies queue for it rather than crowd the event loop out.
        self.body_reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extauthz-body")
        self.limits = LimitEnforcement(counters, self.metrics)

    def add_to(self, server: grpc.aio.Server) -> None:
        # Registered by hand so Check can return bytes it assembled (see responses.py)
        # instead of a message gRPC would serialize again.
        handler = grpc.unary_unary_rpc_method_handler(
            self.Check, request_deserializer=self.read_request, response_serializer=bytes)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Check": handler}),))

    def read_request(self, data: bytes) -> external_auth_pb2.CheckRequest | Deny:
        """gRPC's deserializer: a check too large or unreadable becomes a deny here, where
        it is answered and counted, rather than a gRPC error Envoy turns into a bare 503."""
        if len(data) > self.max_message_bytes:
            return TOO_LARGE
        try:
            return external_auth_pb2.CheckRequest.FromString(data)
        except DecodeError:
            return UNREADABLE

    async def Check(self, request: external_auth_pb2.CheckRequest | Deny, context: Any) -> bytes:
        if isinstance(request, Deny):
            self.metrics.record("deny", request.code, 0.0)
            self.decision_log.write("deny", request.code, request.status, None, "", 0.0)
            return deny_bytes(request)
        try:
            if tracing.enabled():
                with tracing.check_span(request.attributes.request.http.headers):
                    return await self.check(request)
            return await self.check(request)
        except asyncio.CancelledError:
            # Envoy gave up (its timeout) or went away: no answer is sent, but it is counted.
            # A client that times out resets the stream at its own deadline, which reaches
            # here a little before the deadline this side computed: near it means timed out.
            remaining = context.time_remaining() if context is not None else None
            timed_out = remaining is not None and remaining <= DEADLINE_SLACK_S
            self.metrics.aborted("DEADLINE_EXCEEDED" if timed_out else "CANCELLED")
            raise

    async def check(self, request: external_auth_pb2.CheckRequest) -> bytes:
        started = time.perf_counter()
        runtime = self.runtime()
        request_id = ""
        try:
            facts = facts_from_check(request, runtime.pass_through)
            request_id = facts.request_id
            decision = await self.decide(facts, request, runtime)
            if isinstance(decision, Reply):
                self.metrics.record("reply", str(decision.status), time.perf_counter() - started)
                return reply_bytes(decision)
            if isinstance(decision, Allow):
                answer = allow_bytes(decision)
                seconds = time.perf_counter() - started
                shadowed = decision.metadata.get(shadow_mode.SHADOW_DENY)
                if shadowed is not None:  # allowed, and logged as the denial it stands for
                    self.metrics.record(shadow_mode.SHADOW_DENY, shadowed, seconds)
                    self.decision_log.write(shadow_mode.SHADOW_DENY, shadowed, 200, decision.metadata, request_id,
                                            seconds)
                    return answer
                self.metrics.record("allow", "ok", seconds)
                if self.log_allowed:
                    self.decision_log.write("allow", "ok", 200, decision.metadata, request_id, seconds)
                return answer
        except Exception:
            # A bug must still answer with a deny, never a gRPC error that Envoy might fail open on.
            log.exception("check failed")
            decision = INTERNAL
        seconds = time.perf_counter() - started
        self.metrics.record("deny", decision.code, seconds)
        self.decision_log.write("deny", decision.code, decision.status, decision.metadata, request_id, seconds)
        return deny_bytes(decision)

    async def decide(self, facts: Facts, request: external_auth_pb2.CheckRequest, runtime: Runtime) -> Decision:
        if facts.claims is not None:
            return await self.decide_jwt(facts, request, runtime)
        try:
            key, team, owner = await lookup(facts.token, self.store, runtime.is_master)
        except StoreUnavailable as e:
            now = time.monotonic()
            if now - self.last_store_warning >= 1.0:  # one line a second, not one per request of an outage
                self.last_store_warning = now
                log.warning("store unavailable: %s", e)
            return UNAVAILABLE
        return await self.decide_key(facts, body_of(request), runtime, key, team, owner)

    async def decide_key(self, facts: Facts, body: bytes, runtime: Runtime, key: KeyRecord | None,
                         team: TeamRecord | None, owner: Owner | None, peek: bool = False) -> Decision:
        """A virtual key's decision, from its records (also /access/explain's, with ``peek``:
        its rate limits looked at, nothing taken)."""
        now = time.time()
        # The key first: a caller without a valid one never costs a body parse.
        denied = authenticate(facts, key, team, now) or route_denied(facts, key)  # type: ignore[arg-type]
        if denied is not None:
            return denied
        if runtime.refusal is not None:
            return runtime.refusal
        # Reading the body, and a rewrite's plan over it, on the body thread when large.
        decision, facts = await self.with_body(facts, body, key, team, runtime, owner)  # type: ignore[arg-type]
        return await self.enforced(decision, facts, key, team, runtime, peek)  # type: ignore[arg-type]

    async def enforced(self, decision: Decision, facts: Facts, key: KeyRecord, team: TeamRecord | None,
                       runtime: Runtime, peek: bool = False) -> Decision:
        """The decision within the caller's limits; in shadow mode a model or limit denial is
        recorded on an allow instead (check/shadow.py)."""
        shadow = shadow_mode.shadowed(runtime.config.settings.enforcement, team)
        if shadow and isinstance(decision, Deny) and decision.code in shadow_mode.MODEL_CODES:
            permitted = shadow_mode.as_permitted(decision, facts, key, runtime.catalog, random.random(),
                                                 counted(key, team, runtime))
            decision = permitted if permitted is not None else decision
        limited = await self.limits.within_limits(decision, facts, key, team, runtime, peek)
        if shadow and isinstance(limited, Deny) and limited.code in shadow_mode.LIMIT_CODES \
                and isinstance(decision, Allow):
            decision.metadata.pop(USAGE_ID, None)  # let through uncounted: its limit said no
            read = hide_asked_usage(decision, facts) if counted(key, team, runtime) else decision
            return shadow_mode.mark(read, limited)
        return limited

    async def decide_jwt(self, facts: Facts, request: external_auth_pb2.CheckRequest, runtime: Runtime) -> Decision:
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
            decision, _ = await self.with_body(facts, body, admin, None, runtime)
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
            decision, read = (refused, facts) if refused is not None else await self.with_body(
                facts, body, key, team, runtime, team.member(identity.user_id))
            if isinstance(decision, Allow):
                decision.metadata["role"] = identity.role
                return await self.enforced(decision, read, key, team, runtime)
            denials.append((decision, read, key, team))
        first, read, key, team = denials[0]
        if len(denials) > 1 and all(isinstance(d, Deny) and d.code == "model_not_allowed" for d, _, _, _ in denials):
            each = "; ".join(f"team {t.label!r}: {list(t.models) or 'all models'}" for t in teams)
            first = Deny(403, "model_not_allowed", f"No team of the token may use {facts.model!r}. {each}.", "model",
                         first.metadata)
        # The request itself is wrong, or no team may use the model: its refusal (or, in
        # shadow mode, the first team's allow with that refusal recorded).
        return await self.enforced(first, read, key, team, runtime) if isinstance(first, Deny) \
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


    async def with_body(self, facts: Facts, body: bytes, key: KeyRecord, team: TeamRecord | None,
                        runtime: Runtime, owner: Owner | None = None) -> tuple[Decision, Facts]:
        if len(body) <= INLINE_BODY_BYTES:
            return decide_with_body(facts, body, key, team, runtime, random.random(), owner)
        return await asyncio.get_running_loop().run_in_executor(
            self.body_reader, decide_with_body, facts, body, key, team, runtime, random.random(), owner)

    def close(self) -> None:
        self.body_reader.shutdown(wait=False, cancel_futures=True)
