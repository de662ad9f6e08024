"""What a request says about itself: the input of the decision, built by request.py."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

from extauthz.domain.endpoints import Endpoint, PassThrough

if TYPE_CHECKING:
    from extauthz.check.json_body import JsonModel
    from extauthz.check.multipart_body import FormModel


@dataclass(frozen=True)
class Problem:
    """Something wrong with the request itself; the decision turns it into a deny."""

    code: str
    message: str
    status: int = 400
    param: str | None = None


NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class ModelSpan(NamedTuple):
    """Where a JSON body names its model: the bytes the rewrite may replace, and no others.
    A body that names none gets an empty span just inside its opening brace, where a
    "model" member can be inserted when the path named the model (see routing.py)."""

    start: int         # byte offsets of the value's token, quotes included
    end: int
    original: bytes    # the token as the client wrote it; b"" when the body names no model
    body_length: int
    members_after: bool = False  # an insertion is followed by other members (needs a comma)


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
    # Read from the body once the key is known (see request.with_body); a JSON body's
    # bytes come along for the rewrite (routing.splice_plan).
    json_model: "JsonModel | None" = None
    form: "FormModel | None" = None  # a multipart body's model and the content type to forward
    # A JWT's claims as Envoy verified them (jwt_authn metadata); None for a virtual key.
    claims: Mapping[str, Any] | None = None
