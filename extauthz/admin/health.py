"""Liveness, readiness, and Envoy's release of an in-flight place (/internal/usage/release)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from extauthz.admin.access import (
    Refused,
)
from extauthz.check.request import credentials
from extauthz.domain import limits
from extauthz.domain.envoy_names import USAGE_ID_LENGTH
from extauthz.domain.record import (
    hash_token,
)
from extauthz.records.store import (
    StoreUnavailable,
)

if TYPE_CHECKING:
    pass
from extauthz.admin.base import (
    PROXIED_HEADERS,
    AdminBase,
    ApiError,
    lower_headers,
)


class HealthRoutes(AdminBase):
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
