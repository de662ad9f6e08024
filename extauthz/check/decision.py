"""What a check comes to, in three steps: the policy's ``Grant`` (this caller may use this
deployment) or ``Deny``; routing turns a grant into an ``Allow`` (what the upstream
request becomes); responses.py encodes either as CheckResponse bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from extauthz.domain.deny import Headers

if TYPE_CHECKING:
    from extauthz.check.routing import PassThroughRoute, Route

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
class Reply:
    """An answer the check gives itself, not forwarded anywhere (a JWT caller's model list:
    only the check sees its claims). Sent as a denied response with this status and body."""

    status: int
    body: str
    metadata: dict[str, Any] | None = None
