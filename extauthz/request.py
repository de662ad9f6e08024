"""Turn a CheckRequest into Facts: the caller's key, the path and the requested model.

Nothing a client sends can raise out of here: every malformed input becomes a
Problem that the decision turns into a deny.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from extauthz.policy import Facts, Problem

MODEL_NAME_MAX = 256

NOT_JSON = Problem("invalid_request_body", "The request body must be a JSON object.")
NO_MODEL = Problem("missing_model", "The request body must name a 'model'.")
BAD_MODEL = Problem("invalid_model", "'model' must be a non-empty string.")
LONG_MODEL = Problem("invalid_model", f"'model' is longer than {MODEL_NAME_MAX} characters.")
CONTROL_MODEL = Problem("invalid_model", "'model' contains control characters.")
PARTIAL_BODY = Problem("body_too_large", "The request body was truncated before the check; it cannot be authorized.")
NOT_BEARER = Problem("missing_api_key", "The Authorization header must use the Bearer scheme.")
CONFLICTING_KEYS = Problem("conflicting_api_keys", "Several different API keys were sent; send exactly one.")


def facts_from_check(check: Any) -> Facts:
    http = check.attributes.request.http
    headers = http.headers
    token, token_problem = credentials(headers)
    body = http.raw_body or http.body.encode("utf-8")
    if headers.get("x-envoy-auth-partial-body") == "true":
        model, body_problem = None, PARTIAL_BODY
    else:
        model, body_problem = model_from_body(body)
    return Facts(
        token=token,
        model=model,
        path=http.path or "/",
        method=http.method,
        token_problem=token_problem,
        body_problem=body_problem,
        request_id=headers.get("x-request-id", ""),
    )


def credentials(headers: Mapping[str, str]) -> tuple[str | None, Problem | None]:
    """The virtual key from ``Authorization: Bearer``, ``x-api-key`` or ``api-key``."""
    found: list[str] = []
    problem = None
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            found.append(value.strip())
        else:
            problem = NOT_BEARER
    for name in ("x-api-key", "api-key"):
        value = headers.get(name, "").strip()
        if value:
            found.append(value)
    if len(set(found)) > 1:
        return None, CONFLICTING_KEYS
    return (found[0], None) if found else (None, problem)


def model_from_body(body: bytes) -> tuple[str | None, Problem | None]:
    if not body:
        return None, NO_MODEL
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None, NOT_JSON
    if not isinstance(doc, dict):
        return None, NOT_JSON
    model = doc.get("model")
    if model is None:
        return None, NO_MODEL
    if not isinstance(model, str) or not model:
        return None, BAD_MODEL
    if len(model) > MODEL_NAME_MAX:
        return None, LONG_MODEL
    if not model.isprintable():
        return None, CONTROL_MODEL
    return model, None
