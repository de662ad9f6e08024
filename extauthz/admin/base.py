"""The admin API's shared floor: errors, the middlewares that count requests, answer errors
as JSON and decide who may call which route, and the helpers several resources use."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from extauthz.admin import schema
from extauthz.admin.access import (
    ROUTE_REFUSED,
    Acting,
    Refused,
    acting_from_headers,
    actor_from_headers,
    holders_after_change,
    key_owner_power,
)
from extauthz.check.enforcement import budget_counters
from extauthz.check.facts import Facts
from extauthz.check.policy import authenticate, route_denied, visible_models
from extauthz.check.request import credentials
from extauthz.check.responses import error_body
from extauthz.check.runtime import Runtime
from extauthz.domain import budgets, limits
from extauthz.domain.deny import Deny
from extauthz.domain.endpoints import MULTIPART, Endpoint
from extauthz.domain.model_names import NO_DEFAULT_MODELS
from extauthz.domain.record import (
    ANYONE,
    KeyRecord,
    format_time,
    hash_token,
    now_iso,
    secret_holders,
)
from extauthz.records.audit import Actor, Note
from extauthz.records.lookup import Records, lookup
from extauthz.records.store import (
    AuditUnwritable,
    Conflict,
    LimitReached,
    MissingTeam,
    NotFound,
    RecordReader,
    StoreUnavailable,
)
from extauthz.records.writer import RedisWriter
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


async def _nothing() -> None:
    return None


class AdminBase:
    """What every resource's routes share: the records, the middlewares (counting, errors,
    who may call what), reading a body, and the helpers several resources use."""

    def __init__(self, runtime: Callable[[], Runtime], store: RedisWriter,
                 stats: Callable[[], dict[str, Any]] = dict, records: RecordReader | None = None,
                 check: "AuthorizationService | None" = None,
                 models_changed: Callable[[], Awaitable[None]] | None = None) -> None:
        self.check = check  # the check path's decision, for /access/explain
        # Runtime models were written: this replica serves them before answering (the
        # others learn it from the invalidation channel).
        self.models_changed = models_changed or _nothing
        self.runtime = runtime
        self.store = store
        self.stats = stats
        # The check path's cached records: a flood of unknown keys costs no Redis read here either.
        self.records = records if records is not None else store.reader
        self.counters = RateCounters(store.redis, store, store.timeout)

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

    @staticmethod
    def key_view(doc: dict[str, Any], raw_key: str | None = None) -> dict[str, Any]:
        view = dict(doc)
        if raw_key is not None:
            view["key"] = raw_key
        view["not_enforced"] = schema.not_enforced(doc)
        return view

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
    def paging(request: web.Request, size_param: str = "size") -> tuple[int, int]:
        try:
            page = int(request.query.get("page", "1"))
            size = int(request.query.get(size_param, "100"))
        except ValueError:
            raise ApiError(400, "invalid_request", "'page' and 'size' must be integers") from None
        if page < 1 or not 1 <= size <= 1000:
            raise ApiError(400, "invalid_request", "'page' must be >= 1 and 'size' within 1..1000")
        return page, size

    @staticmethod
    def require_admin(request: web.Request, what: str) -> None:
        """The master key, or a proxy_admin (a JWT's role, or a management key's owner's)."""
        actor = request["audit"].actor
        if actor.kind != "master_key" and actor.role != "proxy_admin":
            raise Refused(f"Only the master key or a proxy_admin may {what}.", ROUTE_REFUSED)

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


