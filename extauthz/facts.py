"""What a request says about itself: the input of the decision, built by request.py."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, NamedTuple

from extauthz.endpoints import Endpoint, PassThrough


@dataclass(frozen=True)
class Problem:
    """Something wrong with the request itself; the decision turns it into a deny."""

    code: str
    message: str
    status: int = 400
    param: str | None = None


NO_HEADERS: Mapping[str, str] = MappingProxyType({})


# A named tuple: built once per request, where a frozen dataclass costs several times more.
class Facts(NamedTuple):
    token: str | None
    model: str | None
    path: str = "/"
    endpoint: Endpoint | PassThrough | None = None
    token_problem: Problem | None = None
    body_problem: Problem | None = None
    request_id: str = ""
    # The client's headers, lower-case, as Envoy sent them (read-only).
    headers: Mapping[str, str] = NO_HEADERS
