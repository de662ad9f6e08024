"""LiteLLM's own proxy, run in this process as an oracle for the differential test
(tests/test_litellm_differential.py): what LiteLLM 1.110.2 answers a request, from its
own code, with its database replaced by in-memory tables.

What runs is LiteLLM's: ``user_api_key_auth`` (its builder, the key/team/user/membership
loaders, ``common_checks``, its route checks, budget reservation and exception handler);
for a chat completion it admits, its v3 rate limiter's pre-call hook and ``route_request``
on a ``litellm.Router`` built from the gateway's model list, each deployment answering
with ``mock_response`` (no network), a failure turned into the client's error by
``ProxyBaseLLMRequestProcessing.handle_llm_api_exception``; for the read routes it admits,
their handlers (``info_key_fn``, ``list_team``, ``model_list``). The records are built by
LiteLLM's own request and table models (``GenerateKeyRequest`` through
``_effective_key_for_generate``, ``NewTeamRequest`` into ``LiteLLM_TeamTable``,
``LiteLLM_UserTable``, ``LiteLLM_TeamMembership`` with its ``LiteLLM_BudgetTable``).

What is stubbed is the database alone: ``prisma_client`` is a ``FakePrisma`` whose
``get_data(table_name="combined_view")`` joins a key with its team and membership as
LiteLLM's SQL view does, and whose ``db.<table>.find_unique/find_first/find_many``
answer from the same dicts (an unknown table is empty). LiteLLM reads them through its
own repositories and caches what it reads in its own ``UserApiKeyCache``. The handlers
of admin writes (``/team/new``, ``/key/generate``, ...) are not run: they write to the
database; LiteLLM's auth decides who may call them, and what it admits answers 200.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

# The modules LiteLLM's proxy imports that its core (litellm[cli]) does not bring.
PROXY_MODULES = ("fastapi", "starlette", "orjson", "backoff", "websockets", "apscheduler", "semver", "expression",
                 "fastapi_sso", "email_validator", "mcp", "sse_starlette", "soundfile", "prisma")

CHAT_ROUTES = ("/v1/chat/completions", "/chat/completions")

# proxy_server's globals the oracle sets, restored when it is closed.
GLOBALS = ("master_key", "prisma_client", "user_api_key_cache", "llm_router", "llm_model_list", "general_settings")
# litellm's callback lists, which a call through the router may fill; restored as well.
CALLBACK_LISTS = ("callbacks", "input_callback", "success_callback", "failure_callback", "service_callback",
                  "_async_input_callback", "_async_success_callback", "_async_failure_callback")


def import_proxy() -> Any:
    """litellm.proxy.proxy_server, imported without touching the network (the bundled
    price map) and leaving the environment and warning filters as they were."""
    missing = [m for m in PROXY_MODULES if _absent(m)]
    if missing:
        pytest.fail(f"LiteLLM's proxy needs {', '.join(missing)} (litellm[proxy]'s dependencies), which this "
                    "environment lacks: install them to run the differential test", pytrace=False)
    saved_env = os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP")
    saved_filters = list(warnings.filters)
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    try:
        from litellm.proxy import proxy_server
    finally:
        if saved_env is None:
            os.environ.pop("LITELLM_LOCAL_MODEL_COST_MAP", None)
        else:
            os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = saved_env
        warnings.filters[:] = saved_filters
    return proxy_server


def _absent(module: str) -> bool:
    import importlib.util
    return module not in sys.modules and importlib.util.find_spec(module) is None


# -- the database -----------------------------------------------------------------------------

class Row:
    """A row as Prisma returns one: attributes, ``dict()``, ``model_dump()``, iteration."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)

    def model_dump(self, **_: Any) -> dict[str, Any]:
        return dict(self.__dict__)

    dict = model_dump

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self.__dict__.items())


def _matches(row: dict[str, Any], where: dict[str, Any] | None) -> bool:
    for name, wanted in (where or {}).items():
        if name == "user_id_team_id":           # Prisma's compound unique key
            if not _matches(row, wanted):
                return False
        elif isinstance(wanted, dict):
            if set(wanted) != {"in"}:
                raise NotImplementedError(f"FakePrisma: filter {name}={wanted!r}")
            if row.get(name) not in wanted["in"]:
                return False
        elif row.get(name) != wanted:
            return False
    return True


class FakeTable:
    def __init__(self, rows: list[dict[str, Any]], relations: dict[str, Any] | None = None) -> None:
        self.rows = rows
        self.relations = relations or {}

    def _row(self, row: dict[str, Any], include: dict[str, Any] | None) -> Row:
        data = dict(row)
        for name in include or {}:
            data[name] = self.relations.get(name, lambda r: None)(row)
        return Row(data)

    async def find_unique(self, where: dict[str, Any], include: dict[str, Any] | None = None, **_: Any) -> Row | None:
        found = [r for r in self.rows if _matches(r, where)]
        return self._row(found[0], include) if found else None

    find_first = find_unique

    async def find_many(self, where: dict[str, Any] | None = None, include: dict[str, Any] | None = None,
                        take: int | None = None, **_: Any) -> list[Row]:
        found = [self._row(r, include) for r in self.rows if _matches(r, where)]
        return found[:take] if take is not None else found

    async def count(self, where: dict[str, Any] | None = None, **_: Any) -> int:
        return len([r for r in self.rows if _matches(r, where)])


class FakeDb:
    def __init__(self, store: Store) -> None:
        self.store = store

    def __getattr__(self, name: str) -> FakeTable:
        if not name.startswith("litellm_"):
            raise AttributeError(name)
        store = self.store
        if name == "litellm_teamtable":
            return FakeTable(list(store.teams.values()), {"litellm_model_table": lambda r: None})
        if name == "litellm_usertable":
            return FakeTable(list(store.users.values()), {"organization_memberships": lambda r: []})
        if name == "litellm_teammembership":
            return FakeTable(list(store.memberships.values()),
                             {"litellm_budget_table": lambda r: r.get("litellm_budget_table")})
        if name == "litellm_verificationtoken":
            return FakeTable(list(store.keys.values()), {"litellm_budget_table": lambda r: None})
        return FakeTable([])


class FakePrisma:
    """The stand-in for LiteLLM's PrismaClient: what the auth path reads, from dicts."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = self.writer_db = FakeDb(store)

    async def get_data(self, token: str | None = None, table_name: str | None = None, **_: Any) -> Any:
        if table_name == "combined_view" and token is not None:
            return self.store.key_view(token)
        return None


class Store:
    """LiteLLM's tables: keys by hashed token, teams, users, team memberships."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, Any]] = {}
        self.teams: dict[str, dict[str, Any]] = {}
        self.users: dict[str, dict[str, Any]] = {}
        self.memberships: dict[tuple[str, str], dict[str, Any]] = {}

    def key_view(self, hashed: str) -> Any:
        """LiteLLM_VerificationTokenView of a key, as PrismaClient.get_data builds it from
        its combined_view query (the key, its team's columns, the member's spend)."""
        from litellm.proxy._types import LiteLLM_VerificationTokenView
        from litellm.proxy.utils import _team_member_for_user
        key = self.keys.get(hashed)
        if key is None:
            return None
        team = self.teams.get(key.get("team_id") or "", {})
        member = self.memberships.get((key.get("user_id") or "", key.get("team_id") or ""), {})
        member_budget = member.get("litellm_budget_table") or {}
        row = {**key,
               "team_spend": team.get("spend"), "team_max_budget": team.get("max_budget"),
               "team_soft_budget": team.get("soft_budget"), "team_model_max_budget": team.get("model_max_budget"),
               "team_tpm_limit": team.get("tpm_limit"), "team_rpm_limit": team.get("rpm_limit"),
               "team_tpd_limit": team.get("tpd_limit"), "team_models": team.get("models"),
               "team_metadata": team.get("metadata"), "team_blocked": team.get("blocked"),
               "team_alias": team.get("team_alias"), "team_members_with_roles": team.get("members_with_roles"),
               "team_object_permission_id": team.get("object_permission_id"), "org_id": team.get("organization_id"),
               "team_member_spend": member.get("spend") if member else None,
               "team_member_tpm_limit": member_budget.get("tpm_limit"),
               "team_member_rpm_limit": member_budget.get("rpm_limit")}
        if row["team_models"] is None:
            row["team_models"] = []
        if row["team_blocked"] is None:
            row["team_blocked"] = False
        row["team_member"] = _team_member_for_user(row)
        view = LiteLLM_VerificationTokenView(**row, last_refreshed_at=time.time())
        if view.expires is not None and isinstance(view.expires, datetime):
            view.expires = view.expires.isoformat()
        return view


# -- requests ---------------------------------------------------------------------------------

def starlette_request(method: str, path: str, body: Any, key: str | None) -> Any:
    from starlette.requests import Request
    raw = b"" if body is None else json.dumps(body).encode()
    path, _, query = path.partition("?")
    headers = [(b"host", b"gateway"), (b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": query.encode(), "headers": headers, "client": ("127.0.0.1", 50000),
             "server": ("gateway", 80), "scheme": "http", "root_path": "", "http_version": "1.1"}
    return Request(scope, receive)


class Oracle:
    """LiteLLM's proxy over in-memory tables. ``answer`` gives the HTTP status a client
    of LiteLLM's proxy would get for a request."""

    def __init__(self, model_list: list[dict[str, Any]], master_key: str) -> None:
        self.ps = import_proxy()
        import litellm
        from litellm.caching.dual_cache import DualCache
        from litellm.proxy.common_utils.user_api_key_cache import UserApiKeyCache
        from litellm.proxy.hooks.parallel_request_limiter_v3 import (
            _PROXY_MaxParallelRequestsHandler_v3,
        )
        from litellm.proxy.utils import InternalUsageCache
        self.litellm = litellm
        self.store = Store()
        deployments = json.loads(json.dumps(model_list))
        for d in deployments:
            d["litellm_params"]["mock_response"] = "Hello from LiteLLM's mock"
        self.saved = {name: getattr(self.ps, name) for name in GLOBALS}
        self.saved_callbacks = {name: list(getattr(litellm, name)) for name in CALLBACK_LISTS
                                if isinstance(getattr(litellm, name, None), list)}
        self.saved_filters = list(warnings.filters)
        self.router = litellm.Router(model_list=deployments)
        self.limiter = _PROXY_MaxParallelRequestsHandler_v3(internal_usage_cache=InternalUsageCache(DualCache()))
        self.loop = asyncio.new_event_loop()
        # model_list's thread pool (a module global LiteLLM keeps for the proxy's life): one of
        # the oracle's own, shut down with it.
        from concurrent.futures import ThreadPoolExecutor

        from litellm.proxy.auth import model_checks
        self.model_checks, self.saved_pool = model_checks, model_checks._MODEL_LISTING_POOL
        model_checks._MODEL_LISTING_POOL = ThreadPoolExecutor(thread_name_prefix="litellm-oracle-model-listing")
        # proxy_server's globals, as its startup sets them from a config with a database.
        self.ps.master_key = master_key
        self.ps.prisma_client = FakePrisma(self.store)
        self.ps.user_api_key_cache = UserApiKeyCache()
        self.ps.llm_router = self.router
        self.ps.llm_model_list = deployments
        self.ps.general_settings = {"master_key": master_key}

    def close(self) -> None:
        """proxy_server's globals and litellm's callbacks as they were; the event loop
        (and whatever LiteLLM left running on it) ended."""
        for name, value in self.saved.items():
            setattr(self.ps, name, value)
        for name, callbacks in self.saved_callbacks.items():
            getattr(self.litellm, name)[:] = callbacks
        warnings.filters[:] = self.saved_filters
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()
        self.model_checks._MODEL_LISTING_POOL.shutdown(wait=True)
        self.model_checks._MODEL_LISTING_POOL = self.saved_pool

    # -- records, as LiteLLM's admin endpoints write them ----------------------------------------

    def key(self, raw: str, *, spend: float = 0.0, expires: str | None = None, **body: Any) -> str:
        """A key as /key/generate with ``body`` stores it (``spend`` and ``expires`` set on
        the row, as its spend tracking and an expired key's row have them)."""
        from litellm.proxy._types import hash_token
        from litellm.proxy.management_endpoints.key_management_endpoints import (
            _effective_key_for_generate,
        )
        from litellm.types.proxy.management_endpoints.key_requests import (
            GenerateKeyRequest,
        )
        row = _effective_key_for_generate(GenerateKeyRequest(**body), datetime.now(timezone.utc)).model_dump()
        row.update(token=hash_token(raw), spend=spend)
        if expires is not None:
            row["expires"] = datetime.fromisoformat(expires.replace("Z", "+00:00"))
        self.store.keys[row["token"]] = row
        return raw

    def team(self, team_id: str, *, spend: float = 0.0, **body: Any) -> str:
        """A team as /team/new with ``body`` stores it."""
        from litellm.models.team import LiteLLM_TeamTable
        from litellm.proxy._types import (
            LiteLLM_ManagementEndpoint_MetadataFields,
            LiteLLM_ManagementEndpoint_MetadataFields_Premium,
            NewTeamRequest,
        )
        from litellm.proxy.management_endpoints.common_utils import (
            set_object_metadata_field,
        )
        data = NewTeamRequest(team_id=team_id, **body)
        team = LiteLLM_TeamTable(**data.json(), model_id=None)
        for field in (*LiteLLM_ManagementEndpoint_MetadataFields_Premium, *LiteLLM_ManagementEndpoint_MetadataFields):
            if getattr(data, field, None) is not None:
                set_object_metadata_field(object_data=team, field_name=field, value=getattr(data, field))
        row = team.model_dump()
        row["spend"] = spend
        self.store.teams[team_id] = row
        return team_id

    def user(self, user_id: str, **fields: Any) -> str:
        from litellm.models.user import LiteLLM_UserTable
        self.store.users[user_id] = LiteLLM_UserTable(user_id=user_id, **fields).model_dump()
        return user_id

    def member(self, team_id: str, user_id: str, role: str = "user", *, spend: float = 0.0,
               max_budget_in_team: float | None = None, allowed_models: list[str] | None = None) -> None:
        """/team/member_add: the user (made if new) in the team's members_with_roles and
        teams, and a membership row with a budget row for the member's own terms."""
        from litellm.models.budget import LiteLLM_BudgetTable
        from litellm.models.team import Member
        team = self.store.teams[team_id]
        team["members_with_roles"] = [*(team.get("members_with_roles") or []),
                                      Member(role=role, user_id=user_id).model_dump()]
        if user_id not in self.store.users:
            self.user(user_id)
        user = self.store.users[user_id]
        user["teams"] = [*user["teams"], team_id]
        budget = None
        if max_budget_in_team is not None or allowed_models is not None:
            budget = LiteLLM_BudgetTable(budget_id=f"budget-{team_id}-{user_id}", max_budget=max_budget_in_team,
                                         allowed_models=allowed_models).model_dump()
        self.store.memberships[(user_id, team_id)] = {
            "user_id": user_id, "team_id": team_id, "spend": spend, "total_spend": spend,
            "budget_id": budget and budget["budget_id"], "litellm_budget_table": budget}

    def settle(self, raw: str, cost: float) -> None:
        """A call's cost, written as LiteLLM's spend tracking writes it: on the key, its
        user, its team and the user's membership in that team; what LiteLLM cached of
        them is dropped."""
        from litellm.proxy._types import hash_token
        key = self.store.keys[hash_token(raw)]
        key["spend"] += cost
        user_id, team_id = key.get("user_id"), key.get("team_id")
        if user_id in self.store.users:
            self.store.users[user_id]["spend"] += cost
        if team_id in self.store.teams:
            self.store.teams[team_id]["spend"] = (self.store.teams[team_id]["spend"] or 0.0) + cost
        member = self.store.memberships.get((user_id or "", team_id or ""))
        if member is not None:
            member["spend"] += cost
            member["total_spend"] += cost
        self.ps.user_api_key_cache.flush_cache()

    # -- answers ------------------------------------------------------------------------------

    def answer(self, method: str, path: str, key: str | None, body: Any = None) -> int:
        """The status LiteLLM's proxy answers: its auth's refusal, else (an LLM route) its
        rate limiter's and its router's answer, else 200."""
        return self.loop.run_until_complete(self._answer(method, path, key, body))

    async def _handle(self, method: str, route: str, query: dict[str, str], request: Any, auth: Any) -> None:
        """The handler of a read route LiteLLM's auth admitted, where it can run on the
        in-memory tables; an admitted write (/team/new, /key/generate, ...) is not run:
        its handler writes to the database, and LiteLLM's auth decided who may call it."""
        from litellm.proxy.management_endpoints.key_management_endpoints import (
            info_key_fn,
        )
        from litellm.proxy.management_endpoints.team_endpoints import list_team
        if (method, route) == ("GET", "/key/info"):
            await info_key_fn(key=query.get("key"), user_api_key_dict=auth)
        elif (method, route) == ("GET", "/team/list"):
            await list_team(http_request=request, user_id=query.get("user_id"), organization_id=None,
                            user_api_key_dict=auth)
        elif (method, route) in (("GET", "/v1/models"), ("GET", "/models")):
            await self.ps.model_list(request=request, user_api_key_dict=auth)

    async def _answer(self, method: str, path: str, key: str | None, body: Any) -> int:
        from fastapi import HTTPException
        from litellm.proxy._types import ProxyException
        from litellm.proxy.auth.user_api_key_auth import user_api_key_auth
        request = starlette_request(method, path, body, key)
        route, _, query = path.partition("?")
        try:
            # Its auth raises what the proxy answers: ProxyException (its ``code``) or
            # HTTPException (the route checks ahead of common_checks).
            # The headers FastAPI's Security dependencies read: Authorization alone is sent.
            auth = await user_api_key_auth(request=request, api_key=f"Bearer {key}" if key else None,
                                           azure_api_key_header=None, anthropic_api_key_header=None,
                                           google_ai_studio_api_key_header=None, azure_apim_header=None,
                                           custom_litellm_key_header=None)
            if route in CHAT_ROUTES:
                await self._chat(dict(body or {}), auth)
            else:
                try:
                    await self._handle(method, route, dict(p.split("=", 1) for p in query.split("&") if p),
                                       request, auth)
                except (ProxyException, HTTPException):
                    raise
                except Exception as e:  # noqa: BLE001 (the app's handler of anything else: 500, 503 for the DB)
                    return (await self.ps._unhandled_exception_response(request, e)).status_code
            return 200
        except ProxyException as e:         # proxy_server.openai_exception_handler
            return int(e.code) if e.code else 500
        except HTTPException as e:
            return e.status_code

    async def _chat(self, data: dict[str, Any], auth: Any) -> None:
        """What chat_completion does past auth, for the answer's status: its pre-call
        hooks (the v3 rate limiter), then route_request on the router; a failure is
        turned into the client's error by ProxyBaseLLMRequestProcessing."""
        from litellm.proxy.common_request_processing import (
            ProxyBaseLLMRequestProcessing,
        )
        from litellm.proxy.route_llm_request import route_request
        processor = ProxyBaseLLMRequestProcessing(data=data)
        try:
            await self.limiter.async_pre_call_hook(user_api_key_dict=auth, cache=self.ps.user_api_key_cache,
                                                   data=data, call_type="completion")
            response = await route_request(data=data, llm_router=self.router, user_model=None,
                                           route_type="acompletion", user_api_key_dict=auth)
            if asyncio.iscoroutine(response) or isinstance(response, asyncio.Future):
                await response
        except Exception as e:  # noqa: BLE001 (what chat_completion hands its error processing)
            await processor.handle_llm_api_exception(e, user_api_key_dict=auth,
                                                     proxy_logging_obj=self.ps.proxy_logging_obj)
