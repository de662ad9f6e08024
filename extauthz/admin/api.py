"""The admin HTTP API, compatible with LiteLLM's key, team, user and team-member routes.

Every route but /v1/models, /model_group/info and /health/* needs the master key, or a
caller access.py lets act (a JWT's user through the check, a virtual key by its owner's
role). Errors use the same JSON shape as the gateway's denies.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from extauthz.admin import key_params, schema
from extauthz.admin.access import (
    ROUTE_REFUSED,
    Acting,
    Refused,
    acting_from_headers,
    actor_from_headers,
    holders_after_change,
    holders_of_new_value,
    key_owner_power,
)
from extauthz.check import explain, listing
from extauthz.check.enforcement import budget_counters
from extauthz.check.facts import Facts
from extauthz.check.jwt_callers import teams_visible
from extauthz.check.policy import authenticate, route_denied, visible_models
from extauthz.check.request import credentials
from extauthz.check.responses import error_body
from extauthz.check.runtime import Runtime
from extauthz.domain import budgets, limits
from extauthz.domain.deny import Deny
from extauthz.domain.endpoints import MULTIPART, Endpoint, classify
from extauthz.domain.envoy_names import USAGE_ID_LENGTH
from extauthz.domain.model_names import ALL_TEAM_MODELS, NO_DEFAULT_MODELS
from extauthz.domain.record import (
    ANYONE,
    MEMBER_TERMS,
    KeyRecord,
    TeamRecord,
    format_time,
    hash_token,
    masked_key,
    membership_entries,
    new_key_doc,
    new_team_doc,
    new_user_doc,
    now_iso,
    secret_holders,
    team_members,
)
from extauthz.records import audit
from extauthz.records.audit import Actor, Note
from extauthz.records.lookup import Records, lookup
from extauthz.records.store import (
    AuditUnwritable,
    Conflict,
    LimitReached,
    MissingTeam,
    NotFound,
    RecordReader,
    RedisWriter,
    StoreUnavailable,
)
from extauthz.telemetry import metrics
from extauthz.usage.counters import RateCounters

if TYPE_CHECKING:
    from extauthz.check.service import AuthorizationService

log = logging.getLogger("extauthz.admin")

MAX_BODY_BYTES = 1024 * 1024
HASH = re.compile(r"[0-9a-f]{64}")
# What an acting user may change on a key it may touch (blocked, expires... stay the admin's).
ACTING_KEY_CHANGES = {"key", "key_alias", "models", "metadata", "team_id", "user_id"}
MAX_MEMBERS_PER_CALL = 100
# A team admin's own terms are the bounds an admin set on it: it does not lift them.
OWN_TERMS = "A team admin does not set its own terms in the team (an admin does)."
# LiteLLM's per-member rate limits and budget raises: refused rather than stored unread.
MEMBER_TERMS_NOT_ENFORCED = ("tpm_limit", "rpm_limit", "temp_budget_increase", "temp_budget_expiry",
                             "model_max_budget")
# Headers Envoy sets on every request it passes on (x-forwarded-proto, x-request-id): such a
# request came through a listener, perhaps the public one.
PROXIED_HEADERS = ("x-forwarded-proto", "x-forwarded-for", "x-request-id", "x-envoy-expected-rq-timeout-ms",
                   "forwarded")
USER_GRACE_MAX_S = 3600     # the longest grace_period a user acting for itself may give its old key
REPLICATED_HEADER = "x-extauthz-replicas-acknowledged"
STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
AUDIT_PAGE = 500            # entries read from the stream per round trip
AUDIT_SCAN_MAX = 100_000    # entries one GET /audit looks through at most (then 'next' goes on)
# /internal/ is Envoy's (usage.lua), on the sidecar's own port: no Envoy route reaches it.
OPEN_ROUTES = ("/v1/models", "/models", "/model_group/info", "/health/", "/internal/")
# What any valid virtual key may read of itself, admin powers or not, as in LiteLLM: its
# own /key/info, and /model/info of the models it may call.
SELF_READ_ROUTES = ("/key/info", "/model/info", "/v1/model/info")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.deny = Deny(status, code, message, param)


def error_response(deny: Deny) -> web.Response:
    return web.Response(status=deny.status, text=error_body(deny), content_type="application/json")


def applying(changes: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A record update; it runs inside the store's transaction, on the current record."""
    def change(doc: dict[str, Any]) -> dict[str, Any]:
        doc.update(changes)
        doc["updated_at"] = now_iso()
        return doc
    return change


def holder_of(request: web.Request) -> str | None:
    """Who a key's value returned or named in this request is held by: the acting user,
    the proxy admin (by its key or its token); None for the master key's holder."""
    who = acting(request)
    if who is not None:
        return who.user_id
    actor: Actor = request["audit"].actor
    return actor.user_id if actor.kind != "master_key" else None


def holding(change: Callable[[dict[str, Any]], dict[str, Any]], holder: str | None,
            named_by_value: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A key's change, and who holds its value after it (admin/access.holders_after_change)."""
    def changed(doc: dict[str, Any]) -> dict[str, Any]:
        before = dict(doc)
        after = change(doc)
        after["secret_holders"] = holders_after_change(before, after, holder, named_by_value)
        return after
    return changed


def refuse_acting_fields(body: dict[str, Any], also: frozenset[str] = frozenset()) -> None:
    """Blocking, expiry, routes and limits are the admin's: a user does not lift them on its own key."""
    if set(body) - ACTING_KEY_CHANGES - also:
        raise Refused(f"A user may change only {sorted(ACTING_KEY_CHANGES - {'key'})} of a key.")


def route_name(request: web.Request) -> str:
    """The route as registered ("/key/{key}/regenerate"): no raw key from a path in the trail."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def lower_headers(request: web.Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


def acting(request: web.Request) -> Acting | None:
    """The acting user the auth middleware found, or None for the master key's full power."""
    return request.get("acting")


def token_hash_of(value: Any, param: str = "key") -> str:
    """Admin calls name a key by its raw value or by its hash (what /key/list returns)."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, "invalid_request", f"'{param}' must be a key (sk-...) or its hash", param)
    return value if HASH.fullmatch(value) else raw_hash(value, param)


def raw_hash(raw: str, param: str) -> str:
    try:
        return hash_token(raw)
    except UnicodeEncodeError:  # a lone surrogate from JSON's \ud800: no key
        raise ApiError(400, "invalid_request", f"'{param}' is not valid text", param) from None


def explained_body(endpoint: Any, model: str, max_tokens: int | None = None) -> tuple[str, bytes]:
    """The smallest request body naming ``model`` that the endpoint reads: a form for the
    multipart endpoints (audio), JSON for the others, none where the path names it; with
    ``max_tokens`` when given (what a budget or token window holds depends on it)."""
    extra = {"max_tokens": max_tokens} if max_tokens is not None else {}
    if isinstance(endpoint, Endpoint) and endpoint.body == MULTIPART:
        form = (f'--explain\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
                '--explain--\r\n')
        return "multipart/form-data; boundary=explain", form.encode("utf-8", "surrogatepass")
    if isinstance(endpoint, Endpoint) and endpoint.path_model is not None:
        return "application/json", json.dumps(extra).encode()
    return "application/json", json.dumps({"model": model, **extra}).encode()


NOT_MASTER = ApiError(401, "unauthorized", "This route needs the master key as 'Authorization: Bearer'.")
# The powers of a key reading its own records (SELF_READ_ROUTES): no team, no other key.
SELF_ONLY = Acting("<self>", ())


class AdminApi:
    def __init__(self, runtime: Callable[[], Runtime], store: RedisWriter,
                 stats: Callable[[], dict[str, Any]] = dict, records: RecordReader | None = None,
                 check: "AuthorizationService | None" = None) -> None:
        self.check = check  # the check path's decision, for /access/explain
        self.runtime = runtime
        self.store = store
        self.stats = stats
        # The check path's cached records: a flood of unknown keys costs no Redis read here either.
        self.records = records if records is not None else store.reader
        self.counters = RateCounters(store.redis, store, store.timeout)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self.count, self.errors, self.auth])
        post, get = app.router.add_post, app.router.add_get
        post("/key/generate", self.key_generate)
        post("/key/update", self.key_update)
        post("/key/delete", self.key_delete)
        post("/key/block", self.key_block)
        post("/key/unblock", self.key_unblock)
        post("/key/regenerate", self.key_regenerate)
        post("/key/{key}/regenerate", self.key_regenerate)
        get("/key/info", self.key_info)
        get("/key/list", self.key_list)
        post("/team/new", self.team_new)
        post("/team/update", self.team_update)
        post("/team/delete", self.team_delete)
        post("/team/block", self.team_block)
        post("/team/unblock", self.team_unblock)
        get("/team/info", self.team_info)
        get("/team/list", self.team_list)
        post("/team/member_add", self.team_member_add)
        post("/team/member_update", self.team_member_update)
        post("/team/member_delete", self.team_member_delete)
        post("/user/new", self.user_new)
        post("/user/update", self.user_update)
        post("/user/delete", self.user_delete)
        get("/user/info", self.user_info)
        get("/user/list", self.user_list)
        get("/audit", self.audit_trail)
        post("/access/explain", self.explain)
        get("/model/info", self.model_info)
        get("/v1/model/info", self.model_info)  # LiteLLM serves both (its CLI calls this one)
        get("/model_group/info", self.model_group_info)
        for prefix in ("/v1", ""):
            get(f"{prefix}/models", self.models)
            get(prefix + "/models/{model_id:.+}", self.model)
        post("/internal/usage/release", self.release)
        get("/health/liveliness", self.liveliness)
        get("/health/readiness", self.readiness)
        return app

    # -- middlewares ----------------------------------------------------------------------

    @web.middleware
    async def count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        writer = request.get("writer")
        if writer is not None and writer.replicated is not None:
            # redis_wait_replicas: how many replicas acknowledged the writes; fewer than asked,
            # the change is committed on the primary only (a failover now could lose it): 202.
            response.headers[REPLICATED_HEADER] = f"{writer.replicated}/{writer.wait_replicas}"
            if writer.replicated < writer.wait_replicas and response.status == 200:
                response.set_status(202)
        metrics.ADMIN_REQUESTS.labels(route_name(request), str(response.status)).inc()
        return response

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return error_response(e.deny)
        except Refused as e:
            code = "not_found" if e.status == 404 else "admin_not_allowed"
            return error_response(Deny(e.status, code, str(e), e.param))
        except schema.Invalid as e:
            return error_response(Deny(400, "invalid_request", str(e), e.param))
        except MissingTeam as e:
            return error_response(Deny(400, "invalid_request", str(e), "team_id"))
        except LimitReached as e:
            return error_response(Deny(400, "limit_reached", str(e), e.param))
        except NotFound as e:
            return error_response(Deny(404, "not_found", str(e)))
        except Conflict as e:
            return error_response(Deny(409, "conflict", str(e)))
        except AuditUnwritable as e:
            log.error("admin write refused: %s", e)
            return error_response(Deny(503, "audit_unavailable", "The audit trail cannot be written; nothing "
                                       "was changed."))
        except StoreUnavailable:
            return error_response(Deny(503, "store_unavailable", "The key store is unavailable; try again."))
        except web.HTTPRequestEntityTooLarge:
            return error_response(Deny(413, "request_too_large", f"Body over {MAX_BODY_BYTES} bytes."))
        except web.HTTPException as e:
            if e.status >= 400:
                return error_response(Deny(e.status, "http_error", e.reason))
            raise
        except Exception:
            # The traceback names code, not request values, so no key reaches the log.
            log.exception("admin %s %s failed", request.method, route_name(request))
            return error_response(Deny(500, "internal_error", "The admin API failed; nothing was changed."))

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = self.runtime().refusal
        if refusal is not None and not request.path.startswith("/health/"):
            # A restriction the config sets and the gateway does not enforce (allowed_ips...)
            # would be lifted here too: LiteLLM applies it to its admin routes as well.
            return error_response(refusal)
        if not request.path.startswith(OPEN_ROUTES):
            token, _ = credentials(lower_headers(request))
            if token is None:
                raise NOT_MASTER
            by_key = not self.runtime().is_master(hash_token(token))
            if by_key and request.method == "GET" and route_name(request) in SELF_READ_ROUTES:
                # (its own records: a key without admin powers reads them too; the handlers
                # narrow to them whatever the key's powers)
                request["self_reader"], _, _ = await self.caller(request, token, None, NOT_MASTER)
            if by_key:
                who, actor = await self.key_power(token, request, "self_reader" in request)
            else:
                who = acting_from_headers(request.headers)
                actor = actor_from_headers(request.headers, who)
            request["audit"] = Note(actor, route_name(request))
            if who is SELF_ONLY:
                request["acting"] = SELF_ONLY
            elif who is not None:
                if not who.may_use(request.method, route_name(request)):
                    raise Refused(f"A user acting for itself may not use {route_name(request)!r}.", ROUTE_REFUSED)
                # A token's teams are the IdP's word; a key owner's, its record's, each
                # confirmed by the team's own member list.
                request["acting"] = who.with_admin_teams(await self.store.team_docs(list(who.teams)),
                                                         members_only=by_key)
                if request.method != "GET":
                    await self.count_write(who.user_id)
        return await handler(request)

    async def count_write(self, user_id: str) -> None:
        """A user acting for itself makes at most admin_writes_per_minute writes a minute
        (each may add to the audit trail every tenant shares)."""
        bound = self.runtime().config.settings.admin_writes_per_minute
        if not bound:
            return
        now = time.time()
        if await self.counters.admin_write(user_id, now) > bound:
            raise ApiError(429, "rate_limit_exceeded", f"User {user_id!r} made {bound} admin writes this minute, the "
                           "most a user may (extauthz_settings.admin_writes_per_minute); try again in "
                           f"{int(60 - now % 60) + 1}s.")

    async def key_power(self, token: str, request: web.Request, reads_itself: bool = False) -> tuple[
            Acting | None, Actor]:
        """A virtual key on the admin API: its allowed_routes, then its owner's role; and
        the actor the audit trail names (the key's hash, its owner and the owner's role).
        ``reads_itself``: a key without admin powers reads its own records only."""
        key, _, _ = await self.caller(request, token, None, NOT_MASTER)
        doc = await self.store.key_doc(key.token_hash) if key is not None else None  # (its holders: the document's)
        if key is None or doc is None:
            raise NOT_MASTER
        owner = await self.store.user_doc(key.user_id) if key.user_id else None
        # A proxy admin that made or named the key holds every power already, while it is one.
        others = secret_holders(doc) - {key.user_id, ANYONE}
        admins = frozenset([h for h in others
                            if ((await self.store.user_doc(h)) or {}).get("user_role") == "proxy_admin"])
        actor = Actor("key", user_id=key.user_id, role=(owner or {}).get("user_role"), key_hash=key.token_hash)
        try:
            power = key_owner_power(doc, owner, request.method, admins)
        except Refused:
            if not reads_itself:
                raise
            return SELF_ONLY, actor
        if reads_itself and power in ("master", "read"):
            del request["self_reader"]  # an admin's key reads every record
        return (power if isinstance(power, Acting) else None), actor

    def writer(self, request: web.Request) -> RedisWriter:
        """The store, its writes made by this request's actor (their audit entries say so);
        one per request, which remembers how far its writes were replicated."""
        found = request.get("writer")
        if found is None:
            found = request["writer"] = self.store.by(request["audit"])
        return found

    # -- helpers --------------------------------------------------------------------------

    async def body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):
            raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
        settings = self.runtime().config.settings
        if body.get("metadata") is not None:  # what every replica caches, and the audit trail shows
            schema.check_metadata(body["metadata"], settings.max_metadata_bytes, settings.max_metadata_depth)
        for name in ("key_alias", "team_alias"):
            if isinstance(body.get(name), str) and len(body[name]) > schema.MAX_ALIAS_CHARS:
                raise ApiError(400, "invalid_request", f"'{name}' must be at most {schema.MAX_ALIAS_CHARS} "
                               "characters", name)
        return body

    def check_team(self, key: dict[str, Any], team: dict[str, Any] | None) -> None:
        schema.check_key_against_team(key, team, self.runtime().catalog)

    async def with_use(self, docs: list[dict[str, Any]], scope: str, id_field: str) -> list[dict[str, Any]]:
        """Each record with its ``spend`` this budget period (``model_spend`` per model budget,
        ``budget_reset_at``) and, when it has a rate limit, ``rpm_used`` and ``tpm_used`` (its
        rate windows this minute: only a rate-limited record's are counted, so a 0 shown for
        another would read as "not used")."""
        now = time.time()
        scopes = [limits.scope(scope, d.get("counter_id") or d[id_field]) for d in docs]
        used = await self.counters.used(scopes, now)
        counters = [budgets.spend_counters(where, budgets.read(d), None, now)
                    for where, d in zip(scopes, docs, strict=False)]
        values = iter(await self.counters.spent([c.suffix for each in counters for c in each]))
        out = []
        for doc, (rpm, tpm), each in zip(docs, used, counters, strict=False):
            amounts = [next(values) for _ in each]
            whole = each[0]
            view = dict(doc, spend=amounts[0],
                        model_spend={c.model: v for c, v in zip(each[1:], amounts[1:], strict=True)},
                        budget_reset_at=format_time(whole.reset_at) if whole.reset_at not in (
                            None, float("inf")) else None)
            found = limits.read(doc)
            if found is not None and found.rate_limited:
                view.update(rpm_used=rpm, tpm_used=tpm)
            out.append(view)
        return out

    @staticmethod
    def key_view(doc: dict[str, Any], raw_key: str | None = None) -> dict[str, Any]:
        view = dict(doc)
        if raw_key is not None:
            view["key"] = raw_key
        view["not_enforced"] = schema.not_enforced(doc)
        return view

    async def update_key(self, request: web.Request, fixed: dict[str, Any] | None = None) -> web.Response:
        body = key_params.bounded(await self.body(request), self.runtime().config.key_upperbounds, fill=False)
        token_hash = token_hash_of(body.get("key"))
        changes = fixed if fixed is not None else schema.key_fields(body, self.runtime().catalog, {"key"})
        change, check = applying(changes), self.check_team
        who = acting(request)
        if who is not None:
            if fixed is None:
                refuse_acting_fields(body)
            change, check = self.acting_key_rules(who, changes, "/key/update", await self.personal_key_refusal(who))
        named_by_value = token_hash != body.get("key")
        doc = await self.writer(request).update_key(
            token_hash, holding(change, holder_of(request), named_by_value), check,
            self.runtime().config.settings.max_keys_per_user if who is not None else 0)
        return web.json_response(self.key_view(doc))

    def acting_key_rules(self, who: Acting, changes: dict[str, Any], route: str,
                         personal_refused: Refused | None) -> tuple[
            Callable[[dict[str, Any]], dict[str, Any]], Callable[..., None]]:
        """An acting user's change of a key by ``route`` and the check of the result; both
        run in the transaction, on the stored key before and after (a key left without a
        team is a personal key: ``personal_refused`` says why the user may not have one)."""
        def change(doc: dict[str, Any]) -> dict[str, Any]:
            if not who.owns(doc):  # the same answer as a missing key
                raise NotFound("key not found")
            who.check_member_route(doc.get("team_id"), route)
            return applying(dict(changes, updated_by=who.user_id))(doc)

        def check(key: dict[str, Any], team: dict[str, Any] | None) -> None:
            if not who.owns(key):
                raise Refused("The key would leave the caller's keys.", param="user_id")
            who.check_new_key(key, key.get("user_id"), route)
            if key.get("team_id") is None and personal_refused is not None:
                raise personal_refused
            if "user_id" in changes:
                who.check_owner(key, team)
            self.check_team(key, team)

        return change, check

    async def update_team(self, request: web.Request, fixed: dict[str, Any] | None = None) -> web.Response:
        body = await self.body(request)
        team_id = schema.expect(body, "team_id", str, nullable=False)
        changes = fixed if fixed is not None else schema.team_fields(body, self.runtime().catalog, {"team_id"})
        if "members_with_roles" in changes:
            raise ApiError(400, "invalid_request", "Change members with /team/member_add and /team/member_delete.",
                           "members_with_roles")
        doc = await self.writer(request).update_team(team_id, applying(changes))
        return web.json_response(dict(doc, not_enforced=schema.not_enforced(doc)))

    # -- keys -----------------------------------------------------------------------------

    async def key_generate(self, request: web.Request) -> web.Response:
        config = self.runtime().config
        body = key_params.bounded(key_params.with_defaults(await self.body(request), config.key_defaults),
                                  config.key_upperbounds, fill=True)
        fields = schema.key_fields(body, self.runtime().catalog, {"key"})
        raw_key = schema.expect(body, "key", str) or "sk-" + secrets.token_urlsafe(24)
        if len(raw_key) < 8:
            raise ApiError(400, "invalid_request", "'key' must be at least 8 characters", "key")
        if self.runtime().is_master(raw_hash(raw_key, "key")):
            raise ApiError(400, "invalid_request", "'key' must not be the master key.", "key")
        doc = new_key_doc(raw_key)
        doc.update(fields)
        who = acting(request)
        if who is not None:  # its own key, in one of its teams (anyone's, in a team it administers)
            if "key" in body:
                # A secret the admin blocked or let expire must not come back through delete and create.
                raise Refused("A user does not choose the key: one is generated.", param="key")
            who.check_new_key(doc, body.get("user_id"))
            if doc.get("team_id") is None:
                refused = await self.personal_key_refusal(who)
                if refused is not None:
                    raise refused
            doc["user_id"] = doc.get("user_id") or who.user_id
            doc["created_by"] = who.user_id
        doc["secret_holders"] = holders_of_new_value(holder_of(request), doc.get("user_id"))
        if await self.store.key_doc(doc["token"]) is not None:
            raise ApiError(409, "conflict", "This key already exists.", "key")
        check = self.check_team
        if who is not None:
            def check(key: dict[str, Any], team: dict[str, Any] | None) -> None:
                who.check_owner(key, team)
                self.check_team(key, team)
        await self.writer(request).create_key(doc, check, self.runtime().config.settings.max_keys_per_user
                                              if who is not None else 0)
        return web.json_response(self.key_view(doc, raw_key))

    async def key_update(self, request: web.Request) -> web.Response:
        return await self.update_key(request)

    async def key_block(self, request: web.Request) -> web.Response:
        return await self.update_key(request, {"blocked": True})

    async def key_unblock(self, request: web.Request) -> web.Response:
        return await self.update_key(request, {"blocked": False})

    async def key_delete(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        schema.reject_unknown(body, {"keys", "key_aliases"})
        keys = schema.expect(body, "keys", list) or []
        aliases = schema.expect(body, "key_aliases", list) or []
        if not keys and not aliases:
            raise ApiError(400, "invalid_request", "Give 'keys' or 'key_aliases' to delete.", "keys")
        hashes = [token_hash_of(k) for k in keys]
        who = acting(request)
        for alias in aliases:
            found = await self.store.alias_keys(alias) if isinstance(alias, str) else []
            if who is not None:
                found = [h for h in found if who.owns(await self.store.key_doc(h))]
            if not found:
                raise NotFound("no such key of this user" if who is not None else f"no key with key_alias {alias!r}")
            if len(found) > 1:  # (aliases are unique per owner)
                raise ApiError(409, "conflict", f"Several keys have the key_alias {alias!r}, each of another owner: "
                               "name the one to delete in 'keys' (its hash, from /key/list).", "key_aliases")
            hashes.append(found[0])
        if who is not None:  # all of them its own, or none is deleted (one answer: no oracle)
            for h in hashes:
                doc = await self.store.key_doc(h)
                if doc is None or not who.owns(doc):
                    raise NotFound("no such key of this user")
                who.check_member_route(doc.get("team_id"), "/key/delete")
        deleted = [h for h in hashes if await self.writer(request).delete_key(h)]
        if not deleted:
            raise NotFound("none of the given keys exist")
        return web.json_response({"deleted_keys": deleted})

    async def key_regenerate(self, request: web.Request) -> web.Response:
        """A new key in place of one (LiteLLM's /key/regenerate and /key/{key}/regenerate):
        the same record under the new key, with any field updates the body gives, and the
        same counters (spend, rate windows). The old key stops at once, or at the end of
        ``grace_period``. Repeated with the same ``new_key``, it answers as the first time."""
        body = key_params.bounded(await self.body(request), self.runtime().config.key_upperbounds, fill=False)
        in_path = request.match_info.get("key")
        if in_path is not None and body.get("key") not in (None, in_path):
            raise ApiError(400, "invalid_request", "The key in the path and the body's 'key' differ.", "key")
        old_hash = token_hash_of(in_path if in_path is not None else body.get("key"))
        if body.get("new_master_key") is not None:
            raise ApiError(400, "invalid_request", "The master key is general_settings.master_key in the config; "
                           "change it there (see docs/operations.md).", "new_master_key")
        changes = schema.key_fields(body, self.runtime().catalog, {"key", "new_key", "grace_period",
                                                                  "new_master_key"})
        given = schema.expect(body, "new_key", str)
        if given is not None and len(given) < 8:
            raise ApiError(400, "invalid_request", "'new_key' must be at least 8 characters", "new_key")
        raw_key = given or "sk-" + secrets.token_urlsafe(24)
        new_hash = raw_hash(raw_key, "new_key")
        if new_hash == old_hash or self.runtime().is_master(new_hash):
            raise ApiError(400, "invalid_request", "'new_key' must be a new key (not this one, not the master key).",
                           "new_key")
        grace = schema.grace_seconds(schema.expect(body, "grace_period", str))
        if grace and grace > USER_GRACE_MAX_S and acting(request) is not None:
            # An old value kept for long by its own user would outlive what an admin does to the key.
            raise ApiError(400, "invalid_request", f"A user's grace_period is at most {USER_GRACE_MAX_S // 3600}h.",
                           "grace_period")
        grace_until = time.time() + grace if grace else None
        changes.update(key_name=masked_key(raw_key), regenerated_at=now_iso())
        change, check = applying(changes), self.check_team
        who = acting(request)
        if who is not None:  # its own key (or one of a team it administers), as /key/update allows
            if given is not None:
                raise Refused("A user does not choose the key: one is generated.", param="new_key")
            refuse_acting_fields(body, frozenset({"grace_period"}))
            change, check = self.acting_key_rules(who, changes, "/key/regenerate",
                                                  await self.personal_key_refusal(who))
        holder = holder_of(request)

        def regenerated(doc: dict[str, Any]) -> dict[str, Any]:  # a new value: only who it was returned to holds it
            new = change(doc)
            new["secret_holders"] = holders_of_new_value(holder, new.get("user_id"))
            return new

        doc, old_key_expires = await self.writer(request).rotate_key(
            old_hash, new_hash, regenerated, check, grace_until,
            self.runtime().config.settings.max_keys_per_user if who is not None else 0)
        return web.json_response(dict(self.key_view(doc, raw_key), old_key_expires=old_key_expires))

    async def key_info(self, request: web.Request) -> web.Response:
        """A key's record with its use; a key calling without ``?key=`` gets its own, as in
        LiteLLM (client tools read their remaining budget so)."""
        reader: KeyRecord | None = request.get("self_reader")
        given = request.query.get("key")
        if given is None and reader is not None:
            token_hash = reader.token_hash
        else:
            token_hash = token_hash_of(given)
        doc = await self.store.key_doc(token_hash)
        who = acting(request)
        if reader is not None and token_hash in (reader.token_hash, reader.account):
            who = None  # (itself; a replaced key in its grace period reads its line's first)
        elif who is SELF_ONLY:
            doc = None
        if doc is None or (who is not None and not who.owns(doc)):
            raise NotFound("key not found")
        (doc,) = await self.with_use([doc], "key", "token")
        return web.json_response({"key": token_hash, "info": self.key_view(doc)})

    async def key_list(self, request: web.Request) -> web.Response:
        """LiteLLM's filters, each an exact match on the stored field. The keys are first
        narrowed by an index (an alias, a hash, a team's or a user's set, an acting user's own
        and its teams'), so a page of a million keys reads one page of documents; only a filter
        no index answers (organization_id) reads every candidate."""
        query, who = request.query, acting(request)
        wanted: dict[str, str] = {field: query[param] for param, field in (
            ("team_id", "team_id"), ("key_alias", "key_alias"), ("key_hash", "token"), ("user_id", "user_id"),
            ("organization_id", "organization_id")) if query.get(param)}
        if "token" in wanted:
            hashes = [wanted["token"]]
        elif "key_alias" in wanted:
            hashes = await self.store.alias_keys(wanted["key_alias"])
        elif "team_id" in wanted or "user_id" in wanted:
            hashes = await self.store.key_hashes(wanted.get("team_id"), wanted.get("user_id"))
        elif who is not None:  # its own keys and those of the teams it administers
            mine = set(await self.store.key_hashes(user_id=who.user_id))
            for team_id in who.admin_teams:
                mine.update(await self.store.key_hashes(team_id=team_id))
            hashes = sorted(mine)
        else:
            hashes = await self.store.key_hashes()

        def selected(doc: dict[str, Any]) -> bool:
            return all(doc.get(field) == value for field, value in wanted.items()) and (who is None or who.owns(doc))

        page, size = self.paging(request)
        if set(wanted) - {"team_id", "user_id"} or len(wanted) > 1 or who is not None:
            docs = [d for d in await self.store.key_docs(hashes) if selected(d)]  # every candidate read
            total, chunk = len(docs), docs[(page - 1) * size: page * size]
        else:  # the index answered the filter: only the page is read
            total = len(hashes)
            chunk = [d for d in await self.store.key_docs(hashes[(page - 1) * size: page * size]) if selected(d)]
        if query.get("return_full_object", "").lower() == "true":
            chunk = await self.with_use(chunk, "key", "token")
            keys: list[Any] = [self.key_view(d) for d in chunk]
        else:
            keys = [d["token"] for d in chunk]
        return web.json_response({"keys": keys, "total_count": total, "current_page": page,
                                  "total_pages": max(1, math.ceil(total / size))})

    @staticmethod
    def paging(request: web.Request, size_param: str = "size") -> tuple[int, int]:
        try:
            page = int(request.query.get("page", "1"))
            size = int(request.query.get(size_param, "100"))
        except ValueError:
            raise ApiError(400, "invalid_request", "'page' and 'size' must be integers") from None
        if page < 1 or not 1 <= size <= 1000:
            raise ApiError(400, "invalid_request", "'page' must be >= 1 and 'size' within 1..1000")
        return page, size

    # -- teams ----------------------------------------------------------------------------

    async def team_new(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        fields = schema.team_fields(body, self.runtime().catalog, {"team_id"})
        members = fields.pop("members_with_roles", [])
        if len(members) > MAX_MEMBERS_PER_CALL:
            raise ApiError(400, "invalid_request", f"Give at most {MAX_MEMBERS_PER_CALL} members.",
                           "members_with_roles")
        doc = new_team_doc(schema.expect(body, "team_id", str) or str(uuid.uuid4()), **fields)
        await self.writer(request).create_team(doc)
        if members:
            doc, _ = await self.add_members(self.writer(request), doc["team_id"], members)
        return web.json_response(dict(doc, not_enforced=schema.not_enforced(doc)))

    async def team_update(self, request: web.Request) -> web.Response:
        return await self.update_team(request)

    async def team_block(self, request: web.Request) -> web.Response:
        return await self.update_team(request, {"blocked": True})

    async def team_unblock(self, request: web.Request) -> web.Response:
        return await self.update_team(request, {"blocked": False})

    async def team_delete(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        schema.reject_unknown(body, {"team_ids"})
        team_ids = schema.expect(body, "team_ids", list, nullable=False)
        if not team_ids or not all(isinstance(t, str) for t in team_ids):
            raise ApiError(400, "invalid_request", "'team_ids' must be a non-empty list of strings", "team_ids")
        deleted_keys = 0
        for team_id in team_ids:
            deleted_keys += await self.writer(request).delete_team(team_id)
        return web.json_response({"deleted_teams": team_ids, "deleted_keys": deleted_keys})

    async def team_info(self, request: web.Request) -> web.Response:
        team_id = request.query.get("team_id", "")
        who = acting(request)
        if who is not None:  # a member sees its team; the keys it may touch only
            who.check_team(team_id, manage=False)
        doc = await self.store.team_doc(team_id) if team_id else None
        if doc is None:
            raise NotFound(f"team_id {team_id!r} does not exist")
        keys = await self.store.list_keys(team_id)
        if who is not None:
            keys = [k for k in keys if who.owns(k)]
        memberships = await self.memberships(doc)
        (doc,) = await self.with_use([doc], "team", "team_id")
        return web.json_response({"team_id": team_id, "team_info": doc,
                                  "keys": [self.key_view(k) for k in keys], "team_memberships": memberships})

    async def memberships(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """A team's members with terms of their own, in LiteLLM's shape, with their spend
        this budget period."""
        try:
            members = TeamRecord.from_document(doc).members or {}
        except (KeyError, TypeError):
            return []
        now = time.time()
        counters = [budgets.spend_counters(m.spend_scope, m.budget, None, now)[0] for m in members.values()]
        spent = await self.counters.spent([c.suffix for c in counters]) if counters else []
        stored = {m.get("user_id"): m for m in membership_entries(doc)}
        return [{"user_id": m.user_id, "team_id": m.team_id, "spend": amount, "litellm_budget_table": {
                    "max_budget": m.budget.max if m.budget else None,
                    "budget_duration": stored.get(m.user_id, {}).get("budget_duration"),
                    "allowed_models": list(m.models),
                    "budget_reset_at": format_time(c.reset_at) if c.reset_at not in (None, float("inf")) else None}}
                for m, c, amount in zip(members.values(), counters, spent, strict=False)]

    async def team_list(self, request: web.Request) -> web.Response:
        """The teams; LiteLLM's ``user_id`` filter names a member. A user acting for itself
        lists its own teams (``user_id`` itself, or none), as in LiteLLM."""
        user_id, who = request.query.get("user_id"), acting(request)
        if who is not None:
            if user_id not in (None, who.user_id):
                raise Refused("A user lists its own teams only (user_id: itself).", ROUTE_REFUSED, param="user_id")
            mine = set(who.teams) | who.admin_teams
            teams = [t for t in await self.store.team_docs(sorted(mine)) if t is not None]
        else:
            teams = await self.store.list_teams()
        if user_id:  # LiteLLM's filter: the teams this user is a member of
            teams = [t for t in teams if any(m.get("user_id") == user_id for m in team_members(t))]
        return web.json_response(await self.with_use(teams, "team", "team_id"))

    # -- team members ---------------------------------------------------------------------

    async def add_members(self, writer: RedisWriter, team_id: str, given: list[dict[str, Any]],
                          terms: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
        """Add members (each with ``terms``, its own in the team, when given); one named by
        e-mail only is the one user with that e-mail, or a new one. Returns the team and the
        members' user ids."""
        by_email: dict[str, list[str]] = {}
        if any(m["user_id"] is None for m in given):
            for u in await self.store.list_users():
                if isinstance(u.get("user_email"), str):
                    by_email.setdefault(u["user_email"], []).append(u["user_id"])
        team: dict[str, Any] = {}
        ids = []
        for member in given:
            if member["user_id"] is None:
                known = by_email.get(member["user_email"], [])
                if len(known) > 1:
                    raise ApiError(400, "invalid_request", f"Several users have the e-mail {member['user_email']!r}: "
                                   "name the member by user_id.", "member")
                member = dict(member, user_id=known[0] if known else str(uuid.uuid4()))
            user = new_user_doc(member["user_id"], user_email=member["user_email"])
            team = await writer.add_member(team_id, member, user, terms)
            ids.append(member["user_id"])
        return team, ids

    async def team_member_add(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        schema.reject_unknown(body, {"team_id", "member", *MEMBER_TERMS})
        team_id = schema.expect(body, "team_id", str, nullable=False)
        terms = schema.member_terms(body, self.runtime().catalog)
        who = acting(request)
        if who is not None:
            who.check_team(team_id, manage=True)
        given = body.get("member")
        members = [schema.member(m) for m in (given if isinstance(given, list) else [given])]
        if not members or len(members) > MAX_MEMBERS_PER_CALL:
            raise ApiError(400, "invalid_request", f"Give 1 to {MAX_MEMBERS_PER_CALL} members.", "member")
        if who is not None:
            members = await self.addable_by_team_admin(members)
            if terms and any(m["user_id"] == who.user_id for m in members):
                raise Refused(OWN_TERMS, param="member")
        team = await self.store.team_doc(team_id)
        if team is None:
            raise MissingTeam(f"team_id {team_id!r} does not exist")
        default = team.get("default_team_member_models")
        if "allowed_models" not in terms and isinstance(default, list) and default:
            terms["allowed_models"] = default  # LiteLLM's fallback for a member given no models of its own
        doc, ids = await self.add_members(self.writer(request), team_id, members, terms)
        users = [u for u in [await self.store.user_doc(i) for i in dict.fromkeys(ids)] if u is not None]
        if who is not None:  # who they are in this team, not the rest of their records
            users = [{"user_id": u["user_id"]} for u in users]
        return web.json_response(dict(doc, updated_users=users))

    async def addable_by_team_admin(self, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A team admin adds existing internal users by user_id, and learns nothing of users
        outside its teams: one that does not exist and one it may not add (an admin) get
        the same answer; no user record is created; no e-mail is read or claimed."""
        if any(m["user_id"] is None for m in members):
            # By e-mail, a team admin would look users up across every team (and pull them in).
            raise Refused("A team admin adds members by user_id.", param="member")
        for m in members:
            user = await self.store.user_doc(m["user_id"])
            if user is None or user.get("user_role") in ("proxy_admin", "proxy_admin_viewer"):
                raise NotFound(f"No user a team admin may add has the user_id {m['user_id']!r}: a team admin adds "
                               "existing users (an admin creates them with /user/new).")
        return [dict(m, user_email=None) for m in members]

    async def team_member_update(self, request: web.Request) -> web.Response:
        """A member's role and its own terms in the team (LiteLLM's /team/member_update)."""
        body = await self.body(request)
        unsupported = sorted(k for k in body if k in MEMBER_TERMS_NOT_ENFORCED and body[k] not in (None, {}))
        if unsupported:  # restricting terms are enforced or refused, never stored unread
            raise ApiError(400, "invalid_request", f"{', '.join(unsupported)} on a team member is not enforced by "
                           "this gateway: set limits on the member's keys instead.", unsupported[0])
        schema.reject_unknown(body, {"team_id", "user_id", "user_email", "role", *MEMBER_TERMS,
                                     *MEMBER_TERMS_NOT_ENFORCED})
        team_id = schema.expect(body, "team_id", str, nullable=False)
        who = acting(request)
        if who is not None:
            who.check_team(team_id, manage=True)
        role = schema.expect(body, "role", str)
        if role is not None and role not in schema.MEMBER_ROLES:
            raise ApiError(400, "invalid_request", f"'role' must be one of {list(schema.MEMBER_ROLES)}, got {role!r}",
                           "role")
        terms = schema.member_terms(body, self.runtime().catalog)
        user_id = await self.member_named(team_id, body)
        if who is not None and terms and user_id == who.user_id:
            raise Refused(OWN_TERMS, param="user_id")
        team = await self.writer(request).update_member(team_id, user_id, role, terms)
        return web.json_response({"team_id": team_id, "user_id": user_id, "role": next(
            (m.get("role") for m in team_members(team) if m.get("user_id") == user_id), None),
            **next((m for m in membership_entries(team) if m.get("user_id") == user_id), {})})

    async def member_named(self, team_id: str, body: dict[str, Any]) -> str:
        """The member a body names by user_id, or by user_email among the team's members."""
        user_id, email = schema.expect(body, "user_id", str), schema.expect(body, "user_email", str)
        if user_id:
            return user_id
        team = await self.store.team_doc(team_id)
        if team is None:
            raise MissingTeam(f"team_id {team_id!r} does not exist")
        found = [m["user_id"] for m in team_members(team) if email and m.get("user_email") == email]
        if not found:
            raise NotFound(f"no member of team {team_id!r} with that user_id or user_email")
        return found[0]

    async def team_member_delete(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        schema.reject_unknown(body, {"team_id", "user_id", "user_email"})
        team_id = schema.expect(body, "team_id", str, nullable=False)
        who = acting(request)
        if who is not None:
            who.check_team(team_id, manage=True)
        user_id = await self.member_named(team_id, body)
        team, deleted, blocked = await self.writer(request).remove_member(team_id, user_id)
        return web.json_response(dict(team, deleted_keys=deleted, blocked_keys=blocked))

    # -- users ----------------------------------------------------------------------------

    async def user_new(self, request: web.Request) -> web.Response:
        """A user, and (LiteLLM's default, ``auto_create_key``) a personal key for it."""
        body = await self.body(request)
        fields = schema.user_fields(body, self.runtime().catalog, {"user_id", "auto_create_key"})
        for name in ("key_alias", "duration", "auto_create_key"):
            fields.pop(name, None)
        user_id = schema.expect(body, "user_id", str) or str(uuid.uuid4())
        doc = new_user_doc(user_id, **fields)
        key = raw_key = None
        if schema.expect(body, "auto_create_key", bool) is not False:  # checked before anything is written
            config = self.runtime().config  # (the key a user gets is bound as any key minted)
            key_body = key_params.bounded(key_params.with_defaults(
                {k: body[k] for k in ("key_alias", "duration") if body.get(k) is not None},
                tuple((k, v) for k, v in config.key_defaults if k not in ("user_id", "team_id"))),
                config.key_upperbounds, fill=True)
            raw_key = "sk-" + secrets.token_urlsafe(24)
            key = new_key_doc(raw_key, user_id=user_id, secret_holders=[user_id],
                              **schema.key_fields(key_body, self.runtime().catalog))  # (its alias: a new owner's)
        await self.writer(request).create_user(doc)
        out = dict(doc, not_enforced=schema.not_enforced(doc, user=True))
        if key is not None:
            await self.writer(request).create_key(key, self.check_team)
            out.update(key=raw_key, token=key["token"], key_name=key["key_name"], expires=key["expires"])
        return web.json_response(out)

    async def user_update(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        user_id = schema.expect(body, "user_id", str, nullable=False)
        changes = schema.user_fields(body, self.runtime().catalog, {"user_id"})
        if "teams" in changes:
            raise ApiError(400, "invalid_request", "Change a user's teams with /team/member_add and "
                           "/team/member_delete.", "teams")
        changes.pop("key_alias", None)
        changes.pop("duration", None)
        doc = await self.writer(request).update_user(user_id, applying(changes))
        return web.json_response(dict(doc, not_enforced=schema.not_enforced(doc, user=True)))

    async def user_delete(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        schema.reject_unknown(body, {"user_ids"})
        user_ids = schema.expect(body, "user_ids", list, nullable=False)
        if not user_ids or not all(isinstance(u, str) and u for u in user_ids):
            raise ApiError(400, "invalid_request", "'user_ids' must be a non-empty list of strings", "user_ids")
        missing = [u for u in user_ids if await self.store.user_doc(u) is None]
        if missing:  # all of them or none
            raise NotFound(f"user_id(s) {missing} do not exist")
        deleted_keys = 0
        for user_id in user_ids:
            deleted_keys += await self.writer(request).delete_user(user_id)
        return web.json_response({"deleted_users": user_ids, "deleted_keys": deleted_keys})

    async def user_info(self, request: web.Request) -> web.Response:
        who = acting(request)
        user_id = request.query.get("user_id") or (who.user_id if who is not None else "")
        if who is not None and user_id != who.user_id:
            raise NotFound("user not found")
        doc = await self.store.user_doc(user_id) if user_id else None
        if doc is None:
            raise NotFound(f"user_id {user_id!r} does not exist")
        keys = await self.store.list_keys(user_id=user_id)
        teams = [t for t in [await self.store.team_doc(t) for t in doc.get("teams") or []] if t is not None]
        (doc,) = await self.with_use([doc], "user", "user_id")  # (its spend: its personal keys')
        for name in ("rpm_used", "tpm_used"):  # (a user has no rate windows of its own)
            doc.pop(name, None)
        return web.json_response({"user_id": user_id,
                                  "user_info": dict(doc, not_enforced=schema.not_enforced(doc, user=True)),
                                  "keys": [self.key_view(k) for k in keys], "teams": teams})

    async def user_list(self, request: web.Request) -> web.Response:
        users = await self.store.list_users()
        role = request.query.get("role")
        if role:
            users = [u for u in users if u.get("user_role") == role]
        wanted = request.query.get("user_ids")
        if wanted:
            ids = set(wanted.split(","))
            users = [u for u in users if u["user_id"] in ids]
        page, size = self.paging(request, "page_size")
        return web.json_response({"users": users[(page - 1) * size: page * size], "total": len(users),
                                  "page": page, "page_size": size,
                                  "total_pages": max(1, math.ceil(len(users) / size))})

    # -- audit and explain ----------------------------------------------------------------

    @staticmethod
    def require_admin(request: web.Request, what: str) -> None:
        """The master key, or a proxy_admin (a JWT's role, or a management key's owner's)."""
        actor = request["audit"].actor
        if actor.kind != "master_key" and actor.role != "proxy_admin":
            raise Refused(f"Only the master key or a proxy_admin may {what}.", ROUTE_REFUSED)

    async def audit_trail(self, request: web.Request) -> web.Response:
        """The audit trail, newest first: ``target`` (a key, its hash or alias, a team or user
        id), ``actor`` (master_key, system, a user id or a key hash), ``role``, ``since`` (ISO 8601),
        ``limit`` (1..1000) and ``before`` (the ``next`` of the previous page)."""
        self.require_admin(request, "read the audit trail")
        query = request.query
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            raise ApiError(400, "invalid_request", "'limit' must be an integer within 1..1000", "limit")
        before = query.get("before") or "+"
        if before != "+" and not STREAM_ID.fullmatch(before):
            raise ApiError(400, "invalid_request", "'before' must be the 'next' of a previous page", "before")
        since_ms = 0
        if query.get("since"):
            try:
                since_ms = int(schema.parse_time(query["since"]) * 1000)  # type: ignore[operator]
            except (ValueError, TypeError, OverflowError):
                raise ApiError(400, "invalid_request", "'since' must be an ISO 8601 time", "since") from None
        target = query.get("target") or None
        targets = {target, hash_token(target)} if target else set()
        actor, role = query.get("actor") or None, query.get("role") or None
        entries: list[dict[str, Any]] = []
        cursor, scanned, more = before, 0, True
        while len(entries) < limit and scanned < AUDIT_SCAN_MAX:
            page = await self.store.audit_entries(cursor, AUDIT_PAGE)
            if not page:
                more = False
                break
            for stream_id, entry in page:
                cursor, scanned = stream_id, scanned + 1
                if int(stream_id.partition("-")[0]) < since_ms:
                    more = False
                    break
                if (not targets or any(t in targets for t in audit.targets(entry))) \
                        and audit.selected(entry, None, actor, role):
                    entries.append({"id": stream_id, **entry})
                    if len(entries) == limit:
                        break
            else:
                continue
            break
        return web.json_response({"entries": entries, "next": cursor if more and cursor != "+" else None})

    async def explain(self, request: web.Request) -> web.Response:
        """The decision the gateway would make now for a key (raw or hash) or a team's
        member, a model and an endpoint, and the steps behind it; nothing is called and no
        rate limit is taken."""
        self.require_admin(request, "explain decisions")
        if self.check is None:
            raise ApiError(503, "store_unavailable", "The check service is not running in this process.")
        body = await self.body(request)
        schema.reject_unknown(body, {"key", "team_id", "model", "endpoint", "max_tokens"})
        model = schema.expect(body, "model", str, nullable=False)
        max_tokens = schema.expect(body, "max_tokens", int)
        if max_tokens is not None and not 0 < max_tokens <= 10_000_000:
            raise ApiError(400, "invalid_request", "'max_tokens' must be a positive number of tokens", "max_tokens")
        path = schema.expect(body, "endpoint", str) or "/v1/chat/completions"
        if not path.startswith("/"):
            raise ApiError(400, "invalid_request", "'endpoint' must be a path such as /v1/chat/completions", "endpoint")
        runtime = self.runtime()
        if ("key" in body) == ("team_id" in body):
            raise ApiError(400, "invalid_request", "Give either 'key' (a key or its hash) or 'team_id'.", "key")
        if "key" in body:  # read as the check reads a presented key
            key, team, owner = await lookup(None, self.records, runtime.is_master,
                                            token_hash=token_hash_of(body["key"]))
        else:
            owner = None
            team_id = schema.expect(body, "team_id", str, nullable=False)
            team = await self.records.get_team(team_id)
            if team is None:
                raise NotFound(f"team_id {team_id!r} does not exist")
            # A member of the team: decided as the team's JWT callers are (its list decides).
            key = KeyRecord(f"team:{team_id}", None, (ALL_TEAM_MODELS,), team.team_id, None, False,
                            f"a member of team {team_id}")
        endpoint = runtime.pass_through.match(path) or classify(path)
        content_type, payload = explained_body(endpoint, model, max_tokens)
        facts = Facts(token="explain", model=None, path=path, endpoint=endpoint,
                      headers={"content-type": content_type})
        decision = await self.check.decide_key(facts, payload, runtime, key, team, owner, peek=True)
        if key is None:
            return web.json_response({**explain.outcome_view(decision),
                                      "steps": [{"step": "caller", "found": False}]})
        return web.json_response(explain.explain(decision, key, team, owner, runtime.catalog, model, endpoint))

    # -- models ---------------------------------------------------------------------------

    async def model_info(self, request: web.Request) -> web.Response:
        """The deployments: every one for an admin, those of the models it may call for a
        key or a user acting for itself (LiteLLM's filter)."""
        names: set[str] | None = None
        if request.get("self_reader") is not None:
            names = set(await self.visible(request))
        elif acting(request) is not None:
            names = await self.acting_models(acting(request))  # type: ignore[arg-type]
        data = [{"model_name": d.model_name,
                 "litellm_params": {"model": f"{d.provider}/{d.provider_model}", "api_base": d.api_base or None,
                                    "api_version": d.api_version, "weight": d.weight},
                 "model_info": {"id": d.name, "access_groups": list(d.access_groups), "routable": d.routable,
                                **({"reason": d.unavailable} if not d.routable else {})}}
                for d in self.runtime().config.deployments if names is None or d.model_name in names]
        return web.json_response({"data": data})

    async def personal_key_refusal(self, who: Acting) -> Refused | None:
        """Why a user acting for itself may not hold a key outside its teams, or None. Such a
        key is narrowed by the user's record only, so the record must name the models an
        admin granted the user: an empty list (every model, in LiteLLM's reading) is what
        a record made by member_add or user_id_upsert holds, and granted nothing."""
        user = await self.store.user_doc(who.user_id)
        models = user.get("models") if user is not None else None
        if isinstance(models, list) and models and NO_DEFAULT_MODELS not in models:
            return None
        return Refused("A personal key (no team_id) is for models an admin granted its user by name (the user "
                       "record's models); give a team_id of the caller's teams.", param="team_id")

    async def acting_models(self, who: Acting) -> set[str]:
        """The models a user acting for itself may call through any of its teams."""
        teams = [t for t in [await self.records.get_team(team_id) for team_id in who.teams] if t is not None]
        return set(teams_visible(who.user_id, who.user_id, None, teams, self.runtime().catalog))

    async def model_group_info(self, request: web.Request) -> web.Response:
        """The model groups the calling key may use (the same list as /v1/models), with
        their mode, pricing and access groups, as LiteLLM's /model_group/info gives them."""
        return web.json_response(listing.group_info(self.runtime().catalog, await self.visible(request)))

    async def visible(self, request: web.Request) -> list[str]:
        """What the calling virtual key may call, by the same rules as Check."""
        token, problem = credentials(lower_headers(request))
        key, team, owner = await self.caller(request, token, problem)
        assert key is not None  # (caller refuses a request without a valid key)
        await self.refuse_spent(key, team)
        return visible_models(key, team, self.runtime().catalog, owner)

    async def refuse_spent(self, key: KeyRecord, team: Any) -> None:
        """A key whose budget (or its team's) is spent gets budget_exceeded on the listing
        routes too, as in LiteLLM, whose budget check runs on every route."""
        now = time.time()
        counters = budget_counters(key, team, (), now, 0.0)
        if not counters:
            return
        refused = await self.counters.peek(counters, now)
        if refused is not None:
            error = ApiError(400, "budget_exceeded", "")
            error.deny = budgets.refusal(refused[0], refused[1], None, self.runtime().config.budget_exceeded_status)
            raise error

    async def caller(self, request: web.Request, token: str | None, problem: Any,
                     unknown: ApiError | None = None) -> Records:
        """The records of the key a request presents, judged as the check judges them
        (expiry, blocks, its team, its allowed_routes); ``unknown`` answers a key that does not exist."""
        facts = Facts(token=token, model=None, path=request.path, token_problem=problem)
        found = await lookup(token, self.records, self.runtime().is_master)
        if found.key is None and token is not None and unknown is not None:
            raise unknown
        denied = authenticate(facts, found.key, found.team, time.time()) or route_denied(facts, found.key)  # type: ignore[arg-type]
        if denied is not None:
            raise ApiError(denied.status, denied.code, denied.message)
        return found

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(listing.models_page(self.runtime().catalog, await self.visible(request)))

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model_id"]
        if name not in await self.visible(request):
            raise ApiError(404, "model_not_found", f"The model {name!r} does not exist or this key cannot use it.")
        return web.json_response(listing.model_entry(self.runtime().catalog, name))

    # -- usage ----------------------------------------------------------------------------

    async def release(self, request: web.Request) -> web.Response:
        """A call with max_parallel_requests has ended: its place is free. Only a request
        that knows the call's usage id (random, never shown to the client) frees it."""
        usage_id = request.headers.get("x-usage-id", "")
        if len(usage_id) != USAGE_ID_LENGTH:
            raise ApiError(400, "invalid_request", "x-usage-id is required")
        # x-key-id: the counters' key the check named (a regenerated key's line's; usage.lua).
        key_id, team_id = request.headers.get("x-key-id", ""), request.headers.get("x-team-id", "")
        scopes = [limits.scope(kind, ident) for kind, ident in (("key", key_id), ("team", team_id))
                  if ident and not ident.startswith("jwt:")]
        await self.counters.release(usage_id, limits.inflight_sets(scopes))
        return web.Response(status=204)

    # -- health ---------------------------------------------------------------------------

    async def liveliness(self, request: web.Request) -> web.Response:
        return web.json_response("I'm alive!")

    async def readiness(self, request: web.Request) -> web.Response:
        ok = await self.store.reader.ping()
        status = 200 if ok else 503
        if not await self.sees_details(request):
            return web.json_response({"status": "healthy" if ok else "unhealthy"}, status=status)
        primary = await self.store.reader.primary()
        return web.json_response({"status": "healthy" if ok else "unhealthy",
                                  "redis": "connected" if ok else "unreachable", **self.stats(),
                                  **({"redis_primary": primary} if primary is not None else {})},
                                 status=status)

    async def sees_details(self, request: web.Request) -> bool:
        """Readiness details (the Redis endpoint, warnings, counts) go to a caller on the
        admin port itself (a probe, an operator) or to an admin; a request a proxy passed
        on (Envoy sets these headers on every request) gets the status only."""
        headers = lower_headers(request)
        if not any(h in headers for h in PROXIED_HEADERS):
            return True
        token, _ = credentials(headers)
        if token is None:
            return False
        if self.runtime().is_master(hash_token(token)):
            return True
        try:
            who, _ = await self.key_power(token, request)
        except (ApiError, Refused, StoreUnavailable):
            return False
        return who is None  # a proxy_admin's key (or its viewer's)
