"""The Check servicer: CheckRequest -> facts -> records -> decision -> CheckResponse bytes."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Collection

import grpc
from google.protobuf.message import DecodeError

from extauthz.check import listing
from extauthz.check import shadow as shadow_mode
from extauthz.check.catalog import Catalog
from extauthz.check.decision import Allow, Grant, Reply
from extauthz.check.facts import Facts
from extauthz.check.identity import ADMIN_ROLES, Identity, claim, identify, issued_for, scope_models, strings
from extauthz.check.policy import UNAVAILABLE, Decision, authenticate, authorize, forward, route_denied, visible_models
from extauthz.check.request import body_of, facts_from_check, with_body
from extauthz.check.responses import allow_bytes, deny_bytes, reply_bytes
from extauthz.check.routing import ACTING_ROUTES, STREAMED_USAGE, Route, jwt_admin_path, streams_unasked
from extauthz.check.runtime import Runtime
from extauthz.config import JwtAuth
from extauthz.domain import budgets, route_access
from extauthz.domain.deny import Deny
from extauthz.domain.endpoints import Endpoint
from extauthz.domain.envoy_names import (
    ACTING_TEAMS_HEADER,
    ACTING_USER_HEADER,
    ADMIN_ACTOR_HEADER,
    COUNTED,
    COUNTED_IN_FLIGHT,
    USAGE_HEADER,
    USAGE_ID,
    USAGE_ID_LENGTH,
    USAGE_UNASKED,
)
from extauthz.domain.limits import Counter, rate_counters, refusal, scope
from extauthz.domain.model_names import ALL_TEAM_MODELS
from extauthz.domain.record import KeyRecord, Owner, TeamRecord, UserRecord
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2
from extauthz.records.lookup import lookup
from extauthz.records.store import RecordReader, StoreUnavailable
from extauthz.records.upsert import Upserts
from extauthz.telemetry import logs, tracing
from extauthz.telemetry.metrics import CheckMetrics
from extauthz.usage.counters import RateCounters
from extauthz.usage.estimate import Estimate, estimate

log = logging.getLogger("extauthz.check")

SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
INTERNAL = Deny(500, "internal_error", "The authorization service failed to decide; the request was not forwarded.")
TOO_LARGE = Deny(413, "body_too_large", "The check request is larger than this gateway reads; the request "
                "was not forwarded.")
UNREADABLE = Deny(400, "invalid_check_request", "The check request could not be decoded; the request was "
                  "not forwarded.")
JWT_OFF = Deny(401, "jwt_not_accepted", "This gateway no longer accepts JWTs; use a virtual key.")
JWT_NOT_FOR_US = Deny(401, "invalid_jwt", "The token's issuer or audience is not one this gateway accepts.")
NO_ROLE = Deny(403, "no_role", "The token maps to no role, and this gateway requires one (enforce_rbac).")
DEADLINE_SLACK_S = 0.1
# A counted allow: Envoy's usage filter runs on its response, which must come
# uncompressed (Envoy does not inflate responses; usage in a gzip body could not be read).
COUNTED_HEADERS = ((USAGE_HEADER, COUNTED), ("accept-encoding", "identity"))
COUNTED_IN_FLIGHT_HEADERS = ((USAGE_HEADER, COUNTED_IN_FLIGHT), ("accept-encoding", "identity"))
# A token's teams and ids, bounded: Entra ID puts at most 200 groups in a token.
MAX_TOKEN_TEAMS = 200
MAX_ID_CHARS = 256
# Bodies larger than this are read on a thread of their own: the event loop goes on
# answering other checks meanwhile (the parser gives up the GIL between its steps).
INLINE_BODY_BYTES = 64 * 1024


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


def budget_counters(key: KeyRecord, team: TeamRecord | None, names: Collection[str], now: float,
                    cost: float) -> list[Counter]:
    """The budgets a call is admitted against, its key's, its owner's (a personal key's),
    its team's, then its owner's in that team (max_budget_in_team), each to hold ``cost``
    (0: only whether one is spent already), named as LiteLLM's refusal names them.
    ``names``: the model's every name (Catalog.same_model), for its model_max_budget."""
    counters = budgets.admission_counters(scope("key", key.account), f"Key={key.label!r}", key.budget, names, now,
                                          cost)
    if key.user_budget is not None and key.user_id is not None:  # (a personal key's owner's)
        counters += budgets.admission_counters(scope("user", key.user_id), f"User={key.user_id!r}",
                                               key.user_budget, names, now, cost)
    if team is not None:
        counters += budgets.admission_counters(scope("team", team.team_id), f"Team={team.label!r}", team.budget,
                                               names, now, cost)
        member = team.member(key.user_id)
        if member is not None:
            counters += budgets.admission_counters(member.spend_scope, f"User={member.user_id!r} in Team="
                                                   f"{team.label!r}", member.budget, names, now, cost)
    return counters


def budgeted(key: KeyRecord, team: TeamRecord | None) -> str | None:
    """Whose budget a call of this caller is admitted against, named (the key's, its
    owner's, its team's, or its owner's in the team), or None."""
    if budgets.binding(key.budget):
        return f"Key {key.label!r}"
    if budgets.binding(key.user_budget):
        return f"User {key.user_id!r}"
    if team is None:
        return None
    if budgets.binding(team.budget):
        return f"Team {team.label!r}"
    member = team.member(key.user_id)
    if member is not None and budgets.binding(member.budget):
        return f"User {member.user_id!r} in team {team.label!r}"
    return None


def list_reply(listed: tuple[str, str | None], names: list[str], runtime: Runtime) -> Decision:
    kind, model = listed
    if kind == "groups":
        return Reply(200, json.dumps(listing.group_info(runtime.catalog, names)))
    if kind == "models":
        return Reply(200, json.dumps(listing.models_page(runtime.catalog, names)))
    if model not in names:
        return Deny(404, "model_not_found", f"The model {model!r} does not exist or this token cannot use it.")
    return Reply(200, json.dumps(listing.model_entry(runtime.catalog, model)))


def decide_with_body(facts: Facts, body: bytes, key: Any, team: Any, runtime: Runtime, draw: float,
                     owner: Any = None) -> tuple[Decision, Facts]:
    """The model from the body, the decision (pure), then routing: what the upstream request
    becomes; with the facts the body added."""
    facts = with_body(facts, body)
    granted = authorize(facts, key, team, runtime.catalog, draw, owner)
    return (forward(granted, facts, counted(key, team, runtime)) if isinstance(granted, Grant) else granted), facts


# Operations whose responses report the tokens they cost; those free of charge; any other
# (images, audio) has no price per token, so a caller with a budget cannot be counted on it.
PRICED_OPERATIONS = frozenset({"chat/completions", "completions", "embeddings", "responses", "messages",
                               "generateContent", "streamGenerateContent", "invoke", "invoke-with-response-stream",
                               "rawPredict", "streamRawPredict"})
FREE_OPERATIONS = frozenset({"messages/count_tokens", "moderations"})


def unpriced(decision: Allow, facts: Facts, runtime: Runtime) -> str | None:
    """Why an allowed call's cost could not be counted, or None. A caller with a budget is
    refused such a call: letting it through uncounted would lift the budget."""
    endpoint = facts.endpoint
    if not isinstance(decision.route, Route) or not isinstance(endpoint, Endpoint):
        return "a pass-through path has no price"
    if endpoint.operation in FREE_OPERATIONS and (endpoint.operation != "moderations"
                                                  or decision.route.deployment.provider in ("openai", "azure")):
        return None  # (OpenAI's moderations are free; others' are not)
    if endpoint.operation not in PRICED_OPERATIONS:
        return f"{endpoint.operation!r} calls are not priced per token"
    if runtime.price(decision.route.route_id, str(decision.metadata.get("model", ""))) is None:
        return (f"its deployment ({decision.route.route_id}) has no price: set input_cost_per_token and "
                "output_cost_per_token on it")
    if endpoint.operation in STREAMED_USAGE and streams_unasked(facts.json_model) \
            and not decision.route.takes_stream_options:
        return (f"its deployment's API version ({decision.route.deployment.api_version}) does not report a "
                "stream's usage; send \"stream\": false, or use api_version 2024-09-01 or later")
    return None


def hide_asked_usage(decision: Allow, facts: Facts) -> Allow:
    """A counted stream whose usage only the gateway asked for (routing.usage_edit): Envoy's
    usage filter reads the usage, then takes out what the client did not ask for (the last
    chunk, "usage": null in the others), so the client gets the provider's stream as sent
    for its own request. The filter runs on its response even where nothing is settled (a
    shadow-mode allow past its limit, no Redis to count in)."""
    endpoint = facts.endpoint
    if isinstance(decision.route, Route) and isinstance(endpoint, Endpoint) and endpoint.operation in STREAMED_USAGE \
            and streams_unasked(facts.json_model) and decision.route.takes_stream_options:
        decision.metadata[USAGE_UNASKED] = "1"
        if all(name != USAGE_HEADER for name, _ in decision.dynamic_headers):
            return decision._replace(dynamic_headers=decision.dynamic_headers + COUNTED_HEADERS)
    return decision


def needs_reports(key: KeyRecord, team: TeamRecord | None) -> str | None:
    """The limit of a caller that only usage reports can enforce (a budget, tokens per
    minute, requests in flight), named, or None."""
    owner = budgeted(key, team)
    if owner is not None:
        return f"{owner}'s budget"
    for owner, record in ((f"Key {key.label!r}", key), (f"Team {team.label!r}" if team else "", team)):
        if record is None:
            continue
        found = record.limits
        if found is not None and (found.tpm is not None or found.model_tpm or found.parallel is not None):
            return f"{owner}'s {'max_parallel_requests' if found.parallel is not None else 'tpm_limit'}"
    return None


def counted(key: KeyRecord, team: TeamRecord | None, runtime: Runtime) -> bool:
    """Whether an allowed call's response is read for its usage: every call while spend is
    tracked (the default), else those of keys and teams with a rate limit or a budget;
    none where Envoy sends no usage reports."""
    settings = runtime.config.settings
    if not settings.usage_reports:
        return False
    return settings.spend_tracking or budgeted(key, team) is not None or any(
        r is not None and (r.budget is not None or r.limits is not None and r.limits.rate_limited)
        for r in (key, team))


class AuthorizationService:
    def __init__(self, runtime: Callable[[], Runtime], store: RecordReader, log_allowed: bool = False,
                 decision_log: logs.DecisionLog | None = None, max_message_bytes: int = 64 * 1024 * 1024,
                 upserts: Upserts | None = None, counters: RateCounters | None = None) -> None:
        self.max_message_bytes = max_message_bytes
        self.upserts = upserts
        self.counters = counters
        self.runtime = runtime
        self.store = store
        self.log_allowed = log_allowed
        self.metrics = CheckMetrics(SERVICE)
        self.decision_log = decision_log or logs.DecisionLog()
        self.last_store_warning = 0.0
        # One thread: large bodies queue for it rather than crowd the event loop out.
        self.body_reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extauthz-body")

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
        limited = await self.within_limits(decision, facts, key, team, runtime, peek)
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
            return self.admin_access(identity, label, request.attributes.request.http.method, facts.path, runtime)
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

    async def within_limits(self, decision: Decision, facts: Facts, key: KeyRecord, team: TeamRecord | None,
                             runtime: Runtime, peek: bool = False) -> Decision:
        """An allowed request within its rate windows and budgets, in one Redis round trip
        (for callers with a limit or a budget only), or refused: a call of a caller with a
        budget or a tpm_limit holds its estimate there until its usage report settles it.
        A counted one carries the id its usage report is settled under."""
        if not isinstance(decision, Allow):
            return decision
        now = time.time()
        # (LiteLLM skips budgets for a model its config prices at zero: a self-hosted one.)
        free = isinstance(decision.route, Route) and decision.route.route_id in runtime.free_routes
        owner = None if free else budgeted(key, team)
        if owner is not None:
            why = unpriced(decision, facts, runtime)
            if why is not None:
                spent = await self.spent(decision, key, team, runtime, now, peek)
                if spent is not None:
                    return spent
                return Deny(403, "unpriced_model", f"{owner} has a budget, and this call's cost cannot be counted: "
                            f"{why}.", "model", decision.metadata)
        if not runtime.config.settings.usage_reports:
            needing = needs_reports(key, team)
            if needing is not None:
                return Deny(403, "usage_not_reported", f"{needing} needs the usage providers report, and this "
                            "gateway's Envoy does not send it (extauthz_settings.usage_reports is false), so the "
                            "limit cannot be enforced.", None, decision.metadata)
        key_limits, team_limits = key.limits, team.limits if team is not None else None
        limited = (key_limits is not None and key_limits.rate_limited) or (
            team_limits is not None and team_limits.rate_limited) or owner is not None
        track = counted(key, team, runtime)
        if not (limited or track):
            return decision
        if self.counters is None:  # (no Redis to count in: a limit is never lifted for it)
            return UNAVAILABLE if limited else hide_asked_usage(decision, facts)
        # The id its usage report will be settled under: Envoy's request id is the client's
        # own on a trusted network, and one sent on every request would settle only once.
        decision.metadata[USAGE_ID] = secrets.token_hex(USAGE_ID_LENGTH // 2)
        # The whole hash, for the usage report's counters (the logs show its prefix only).
        decision.metadata["key_id"] = key.token_hash
        if key.counter_id is not None:  # a regenerated key: its line's counters, whatever becomes of its record
            decision.metadata["key_account"] = key.counter_id
        if limited:
            refused = await self.admitted(decision, facts, key, team, runtime, now, peek, owner is not None)
            if refused is not None:
                return refused
            if decision.metadata.get("inflight") == "1":  # Envoy frees the place as the response ends
                return hide_asked_usage(decision._replace(
                    dynamic_headers=decision.dynamic_headers + COUNTED_IN_FLIGHT_HEADERS), facts)
        if not track:  # no usage reports: its rpm window was counted, nothing else
            return decision
        return hide_asked_usage(decision._replace(dynamic_headers=decision.dynamic_headers + COUNTED_HEADERS), facts)

    async def spent(self, decision: Allow, key: KeyRecord, team: TeamRecord | None, runtime: Runtime, now: float,
                    peek: bool) -> Deny | None:
        """A budget already used up refuses as budget_exceeded before any question of price
        (as LiteLLM: a spent budget is the answer whatever the model)."""
        if self.counters is None:
            return UNAVAILABLE
        counters = budget_counters(key, team, runtime.catalog.same_model(str(decision.metadata.get("model", ""))),
                                   now, 0.0)
        try:
            refused = await self.counters.peek(counters, now)
        except StoreUnavailable:
            return UNAVAILABLE
        if refused is None:
            return None
        counter, value = refused
        if not peek:
            self.metrics.limited(counter.name, team.team_id if team is not None else None)
        return budgets.refusal(counter, value, decision.metadata, runtime.config.budget_exceeded_status)

    async def admitted(self, decision: Allow, facts: Facts, key: KeyRecord, team: TeamRecord | None,
                       runtime: Runtime, now: float, peek: bool, budgeted_call: bool) -> Deny | None:
        """The call admitted against every counter of its key and team (taking a place in
        each, and holding its estimate in its token windows and, when ``budgeted_call``, its
        budgets), or the refusal."""
        assert self.counters is not None
        model = str(decision.metadata.get("model", ""))
        scopes = [(scope("key", key.account), f"key {key.label!r}", key.limits)]
        if team is not None:
            scopes.append((scope("team", team.team_id), f"team {team.label!r}", team.limits))
        holds = any(limits is not None and (limits.tpm is not None or limits.model_tpm) for _, _, limits in scopes) \
            or budgeted_call
        estimate = self.estimate(decision, facts, runtime) if holds else None
        names = runtime.catalog.same_model(model)  # (an alias takes its model's limits)
        counters = rate_counters(scopes, names, now, estimate.tokens if estimate is not None else 0)
        if budgeted_call:
            counters += budget_counters(key, team, names, now, estimate.cost or 0.0 if estimate is not None else 0.0)
        try:
            refused = await (self.counters.peek(counters, now) if peek else
                             self.counters.admit(counters, decision.metadata[USAGE_ID], now, estimate))
        except StoreUnavailable:
            return UNAVAILABLE
        if refused is not None:
            counter, value = refused
            if not peek:
                self.metrics.limited(counter.name, team.team_id if team is not None else None)
            metadata = {k: v for k, v in decision.metadata.items() if k != USAGE_ID}
            return budgets.refusal(counter, value, metadata, runtime.config.budget_exceeded_status) \
                if counter.kind == "b" else refusal(counter, now, metadata)
        if estimate is not None:  # its settlement trues up what it held, in the windows it held it in
            decision.metadata["hold"] = "1"
            decision.metadata["admitted"] = repr(now)
        if any(c.kind == "s" for c in counters):
            decision.metadata["inflight"] = "1"
        return None

    @staticmethod
    def estimate(decision: Allow, facts: Facts, runtime: Runtime) -> Estimate:
        """What the call may cost (usage/estimate.py), at its route's price."""
        route, endpoint, body, form = decision.route, facts.endpoint, facts.json_model, facts.form
        price = runtime.price(route.route_id, str(decision.metadata.get("model", ""))) \
            if isinstance(route, Route) else None
        size = len(body.body) if body is not None else form.size if form is not None else 0
        return estimate(body.doc if body is not None else None, size,
                        endpoint.operation if isinstance(endpoint, Endpoint) else None, price,
                        runtime.config.settings.default_max_output_tokens, form.counts if form is not None else ())

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

    @staticmethod
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

    async def with_body(self, facts: Facts, body: bytes, key: KeyRecord, team: TeamRecord | None,
                        runtime: Runtime, owner: Owner | None = None) -> tuple[Decision, Facts]:
        if len(body) <= INLINE_BODY_BYTES:
            return decide_with_body(facts, body, key, team, runtime, random.random(), owner)
        return await asyncio.get_running_loop().run_in_executor(
            self.body_reader, decide_with_body, facts, body, key, team, runtime, random.random(), owner)

    def close(self) -> None:
        self.body_reader.shutdown(wait=False, cancel_futures=True)
