"""A refusal as every floor words it: the HTTP status, LiteLLM's error code and message
that the client gets as {"error": {"message", "type", "param", "code"}}, and the
headers sent with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Headers = tuple[tuple[str, str], ...]


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
