"""The admin HTTP API, compatible with LiteLLM's key and team management routes.

Every route but /v1/models, /model_group/info and /health/* needs the master key. Errors use the same
JSON shape as the gateway's denies.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from aiohttp import web

from extauthz.admin import schema
from extauthz.check import listing
from extauthz.telemetry import metrics
from extauthz.check.facts import Facts
from extauthz.check.decision import Deny
from extauthz.check.policy import authenticate, visible_models
from extauthz.records.lookup import lookup
from extauthz.records.record import hash_token
from extauthz.check.request import credentials
from extauthz.check.routing import ACTING_ROUTES, ACTING_TEAMS_HEADER, ACTING_USER_HEADER
from extauthz.check.runtime import Runtime
from extauthz.check.responses import error_body
from extauthz.records.store import Conflict, MissingTeam, NotFound, RedisWriter, StoreUnavailable

log = logging.getLogger("extauthz.admin")

MAX_BODY_BYTES = 1024 * 1024
HASH = re.compile(r"[0-9a-f]{64}")
# An internal_user comes through the check with its JWT swapped for the master key and its
# user and teams in ACTING_* headers, which only narrow what the master key may do.
OPEN_ROUTES = ("/v1/models", "/models", "/model_group/info", "/health/")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.deny = Deny(status, code, message, param)


def error_response(deny: Deny) -> web.Response:
    return web.Response(status=deny.status, text=error_body(deny), content_type="application/json")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def applying(changes: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A record update; it runs inside the store's transaction, on the current record."""
    def change(doc: dict[str, Any]) -> dict[str, Any]:
        doc.update(changes)
        doc["updated_at"] = now_iso()
        return doc
    return change


def lower_headers(request: web.Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


def acting(request: web.Request) -> tuple[str, tuple[str, ...]] | None:
    """Who an internal_user request acts as (JSON in the headers: no trimming, no
    separators to confuse); either header present at all means acting, and a value that
    does not read as a user refuses the request rather than leave the master key whole."""
    if ACTING_USER_HEADER not in request.headers and ACTING_TEAMS_HEADER not in request.headers:
        return None
    try:
        user = json.loads(request.headers.get(ACTING_USER_HEADER, ""))
        teams = json.loads(request.headers.get(ACTING_TEAMS_HEADER, "[]"))
    except ValueError:
        user, teams = None, []
    if not isinstance(user, str) or not user.strip() or not isinstance(teams, list):
        raise ApiError(403, "admin_not_allowed", "The acting user is unreadable.")
    return user, tuple(t for t in teams if isinstance(t, str))


def token_hash_of(value: Any) -> str:
    """Admin calls name a key by its raw value or by its hash (what /key/list returns)."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, "invalid_request", "'key' must be a key (sk-...) or its hash", "key")
    return value if HASH.fullmatch(value) else hash_token(value)


class AdminApi:
    def __init__(self, runtime: Callable[[], Runtime], store: RedisWriter,
                 stats: Callable[[], dict[str, Any]] = dict) -> None:
        self.runtime = runtime
        self.store = store
        self.stats = stats

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self.count, self.errors, self.auth])
        post, get = app.router.add_post, app.router.add_get
        post("/key/generate", self.key_generate)
        post("/key/update", self.key_update)
        post("/key/delete", self.key_delete)
        post("/key/block", self.key_block)
        post("/key/unblock", self.key_unblock)
        get("/key/info", self.key_info)
        get("/key/list", self.key_list)
        post("/team/new", self.team_new)
        post("/team/update", self.team_update)
        post("/team/delete", self.team_delete)
        post("/team/block", self.team_block)
        post("/team/unblock", self.team_unblock)
        get("/team/info", self.team_info)
        get("/team/list", self.team_list)
        get("/model/info", self.model_info)
        get("/v1/model/info", self.model_info)  # LiteLLM serves both (its CLI calls this one)
        get("/model_group/info", self.model_group_info)
        for prefix in ("/v1", ""):
            get(f"{prefix}/models", self.models)
            get(prefix + "/models/{model_id:.+}", self.model)
        get("/health/liveliness", self.liveliness)
        get("/health/readiness", self.readiness)
        return app

    # -- middlewares ----------------------------------------------------------------------

    @web.middleware
    async def count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        metrics.ADMIN_REQUESTS.labels(name, str(response.status)).inc()
        return response

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return error_response(e.deny)
        except schema.Invalid as e:
            return error_response(Deny(400, "invalid_request", str(e), e.param))
        except MissingTeam as e:
            return error_response(Deny(400, "invalid_request", str(e), "team_id"))
        except NotFound as e:
            return error_response(Deny(404, "not_found", str(e)))
        except Conflict as e:
            return error_response(Deny(409, "conflict", str(e)))
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
            log.exception("admin %s %s failed", request.method, request.path)
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
            if token is None or not self.runtime().is_master(hash_token(token)):
                raise ApiError(401, "unauthorized", "This route needs the master key as 'Authorization: Bearer'.")
            if acting(request) is not None and request.path not in ACTING_ROUTES:
                raise ApiError(403, "admin_not_allowed", "An internal_user manages its own keys only.")
        return await handler(request)

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    async def body(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):
            raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
        return body

    def check_team(self, key: dict[str, Any], team: dict[str, Any] | None) -> None:
        schema.check_key_against_team(key, team, self.runtime().catalog)

    @staticmethod
    def key_view(doc: dict[str, Any], raw_key: str | None = None) -> dict[str, Any]:
        view = dict(doc)
        if raw_key is not None:
            view["key"] = raw_key
        view["not_enforced"] = schema.not_enforced(doc)
        return view

    async def update_key(self, request: web.Request, fixed: dict[str, Any] | None = None) -> web.Response:
        body = await self.body(request)
        token_hash = token_hash_of(body.get("key"))
        changes = fixed if fixed is not None else schema.key_fields(body, self.runtime().catalog, {"key"})
        doc = await self.store.update_key(token_hash, applying(changes), self.check_team)
        return web.json_response(self.key_view(doc))

    async def update_team(self, request: web.Request, fixed: dict[str, Any] | None = None) -> web.Response:
        body = await self.body(request)
        team_id = schema.expect(body, "team_id", str, nullable=False)
        changes = fixed if fixed is not None else schema.team_fields(body, self.runtime().catalog, {"team_id"})
        doc = await self.store.update_team(team_id, applying(changes))
        return web.json_response(dict(doc, not_enforced=schema.not_enforced(doc)))

    # -- keys -----------------------------------------------------------------------------

    async def key_generate(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        fields = schema.key_fields(body, self.runtime().catalog, {"key"})
        raw_key = schema.expect(body, "key", str) or "sk-" + secrets.token_urlsafe(24)
        if len(raw_key) < 8:
            raise ApiError(400, "invalid_request", "'key' must be at least 8 characters", "key")
        stamp = now_iso()
        doc = {"token": hash_token(raw_key), "key_name": f"sk-...{raw_key[-4:]}", "key_alias": None,
               "models": [], "team_id": None, "expires": None, "blocked": False, "metadata": {},
               "created_at": stamp, "updated_at": stamp}
        doc.update(fields)
        who = acting(request)
        if who is not None:  # an internal_user's key: its own, in one of its teams
            user, teams = who
            if body.get("user_id") not in (None, user):
                raise ApiError(403, "admin_not_allowed", "An internal_user creates keys for itself only.", "user_id")
            if doc.get("team_id") not in teams:
                raise ApiError(403, "admin_not_allowed", f"Give a team_id of the token's teams: {list(teams)}.",
                               "team_id")
            doc["user_id"] = user
        if await self.store.key_doc(doc["token"]) is not None:
            raise ApiError(409, "conflict", "This key already exists.", "key")
        await self.store.create_key(doc, self.check_team)
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
        for alias in aliases:
            owner = await self.store.alias_owner(alias) if isinstance(alias, str) else None
            if owner is None:
                raise NotFound("no such key of this user" if acting(request) else f"no key with key_alias {alias!r}")
            hashes.append(owner)
        who = acting(request)
        if who is not None:  # all of them its own, or none is deleted (one answer: no oracle)
            for h in hashes:
                doc = await self.store.key_doc(h)
                if doc is None or doc.get("user_id") != who[0]:
                    raise NotFound("no such key of this user")
        deleted = [h for h in hashes if await self.store.delete_key(h)]
        if not deleted:
            raise NotFound("none of the given keys exist")
        return web.json_response({"deleted_keys": deleted})

    async def key_info(self, request: web.Request) -> web.Response:
        token_hash = token_hash_of(request.query.get("key"))
        doc = await self.store.key_doc(token_hash)
        who = acting(request)
        if doc is None or (who is not None and doc.get("user_id") != who[0]):
            raise NotFound("key not found")
        return web.json_response({"key": token_hash, "info": self.key_view(doc)})

    async def key_list(self, request: web.Request) -> web.Response:
        docs = await self.store.list_keys(request.query.get("team_id") or None)
        # LiteLLM's filters, each an exact match on the stored field.
        for param, field_name in (("key_alias", "key_alias"), ("key_hash", "token"), ("user_id", "user_id"),
                                  ("organization_id", "organization_id")):
            wanted = request.query.get(param)
            if wanted:
                docs = [d for d in docs if d.get(field_name) == wanted]
        who = acting(request)
        if who is not None:
            docs = [d for d in docs if d.get("user_id") == who[0]]
        page, size = self.paging(request)
        chunk = docs[(page - 1) * size: page * size]
        full = request.query.get("return_full_object", "").lower() == "true"
        return web.json_response({
            "keys": [self.key_view(d) for d in chunk] if full else [d["token"] for d in chunk],
            "total_count": len(docs), "current_page": page,
            "total_pages": max(1, math.ceil(len(docs) / size))})

    @staticmethod
    def paging(request: web.Request) -> tuple[int, int]:
        try:
            page = int(request.query.get("page", "1"))
            size = int(request.query.get("size", "100"))
        except ValueError:
            raise ApiError(400, "invalid_request", "'page' and 'size' must be integers") from None
        if page < 1 or not 1 <= size <= 1000:
            raise ApiError(400, "invalid_request", "'page' must be >= 1 and 'size' within 1..1000")
        return page, size

    # -- teams ----------------------------------------------------------------------------

    async def team_new(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        fields = schema.team_fields(body, self.runtime().catalog, {"team_id"})
        stamp = now_iso()
        doc = {"team_id": schema.expect(body, "team_id", str) or str(uuid.uuid4()), "team_alias": None,
               "models": [], "blocked": False, "metadata": {}, "created_at": stamp, "updated_at": stamp}
        doc.update(fields)
        await self.store.create_team(doc)
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
            deleted_keys += await self.store.delete_team(team_id)
        return web.json_response({"deleted_teams": team_ids, "deleted_keys": deleted_keys})

    async def team_info(self, request: web.Request) -> web.Response:
        team_id = request.query.get("team_id", "")
        doc = await self.store.team_doc(team_id) if team_id else None
        if doc is None:
            raise NotFound(f"team_id {team_id!r} does not exist")
        keys = await self.store.list_keys(team_id)
        return web.json_response({"team_id": team_id, "team_info": doc,
                                  "keys": [self.key_view(k) for k in keys]})

    async def team_list(self, request: web.Request) -> web.Response:
        return web.json_response(await self.store.list_teams())

    # -- models ---------------------------------------------------------------------------

    async def model_info(self, request: web.Request) -> web.Response:
        data = [{"model_name": d.model_name,
                 "litellm_params": {"model": f"{d.provider}/{d.provider_model}", "api_base": d.api_base or None,
                                    "api_version": d.api_version, "weight": d.weight},
                 "model_info": {"id": d.name, "access_groups": list(d.access_groups), "routable": d.routable,
                                **({"reason": d.unavailable} if not d.routable else {})}}
                for d in self.runtime().config.deployments]
        return web.json_response({"data": data})

    async def model_group_info(self, request: web.Request) -> web.Response:
        """The model groups the calling key may use (the same list as /v1/models), with
        their mode, pricing and access groups, as LiteLLM's /model_group/info gives them."""
        return web.json_response(listing.group_info(self.runtime().catalog, await self.visible(request)))

    async def visible(self, request: web.Request) -> list[str]:
        """What the calling virtual key may call, by the same rules as Check."""
        runtime = self.runtime()
        token, problem = credentials(lower_headers(request))
        facts = Facts(token=token, model=None, token_problem=problem)
        key, team = await lookup(token, self.store.reader, runtime.is_master)
        denied = authenticate(facts, key, team, time.time())
        if denied is not None:
            raise ApiError(denied.status, denied.code, denied.message)
        assert key is not None
        return visible_models(key, team, runtime.catalog)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(listing.models_page(self.runtime().catalog, await self.visible(request)))

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model_id"]
        if name not in await self.visible(request):
            raise ApiError(404, "model_not_found", f"The model {name!r} does not exist or this key cannot use it.")
        return web.json_response(listing.model_entry(self.runtime().catalog, name))

    # -- health ---------------------------------------------------------------------------

    async def liveliness(self, request: web.Request) -> web.Response:
        return web.json_response("I'm alive!")

    async def readiness(self, request: web.Request) -> web.Response:
        ok = await self.store.reader.ping()
        return web.json_response({"status": "healthy" if ok else "unhealthy",
                                  "redis": "connected" if ok else "unreachable", **self.stats()},
                                 status=200 if ok else 503)
