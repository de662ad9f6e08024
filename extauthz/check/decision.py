"""What a check comes to, in three steps: the policy's ``Grant`` (this caller may use this
deployment) or ``Deny``; routing turns a grant into an ``Allow`` (what the upstream
request becomes); responses.py encodes either as CheckResponse bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from extauthz.check.routing import PassThroughRoute, Route

Headers = tuple[tuple[str, str], ...]


class Grant(NamedTuple):
    """The policy's yes: the route (deployment or pass-through) chosen for this caller."""

    route: "Route | PassThroughRoute"
    capture: str | None        # what a wildcard model group's '*' matched
    metadata: dict[str, Any]   # for Envoy's access log: key hash and alias, team, model, deployment


class Allow(NamedTuple):
    """What the upstream request becomes: the route's fixed headers (pre-encoded in
    ``route.prefix``) plus those built for this request."""

    route: "Route | PassThroughRoute"
    dynamic_headers: Headers
    metadata: dict[str, Any]

    @property
    def route_id(self) -> str:
        return self.route.route_id

    @property
    def headers(self) -> Headers:
        return self.route.headers + self.dynamic_headers

    @property
    def headers_to_remove(self) -> tuple[str, ...]:
        return self.route.headers_to_remove


@dataclass(frozen=True)
class Deny:
    status: int
    code: str
    message: str
    param: str | None = None
    metadata: dict[str, Any] | None = None
    headers: Headers = ()           # sent to the client with the error (retry-after)
    error_type: str | None = None   # LiteLLM's own type where it has one (budget_exceeded)

    @property
    def type(self) -> str:
        return self.error_type or ERROR_TYPES.get(self.status, "api_error")


@dataclass(frozen=True)
class Reply:
    """An answer the check gives itself, not forwarded anywhere (a JWT caller's model list:
    only the check sees its claims). Sent as a denied response with this status and body."""

    status: int
    body: str
    metadata: dict[str, Any] | None = None


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    405: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "service_unavailable_error",
}
