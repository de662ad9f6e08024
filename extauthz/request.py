"""Turn a CheckRequest into Facts: the caller's key, the endpoint and the requested model.

Nothing a client sends can raise out of here: every malformed input becomes a
Problem that the decision turns into a deny.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from python_multipart.multipart import MultipartParser, parse_options_header

from extauthz.endpoints import MULTIPART, Endpoint, PassThrough, classify, split_query
from extauthz.facts import Facts, Problem
from extauthz.providers import CLIENT_KEY_HEADERS

MODEL_NAME_MAX = 256

NOT_JSON = Problem("invalid_request_body", "The request body must be a JSON object.")
NOT_MULTIPART = Problem("invalid_request_body", "This endpoint takes a multipart/form-data body.")
BAD_MULTIPART = Problem("invalid_request_body", "The multipart/form-data body is malformed.")
NO_MODEL = Problem("missing_model", "The request must name a 'model'.", param="model")
BAD_MODEL = Problem("invalid_model", "'model' must be a non-empty string.", param="model")
LONG_MODEL = Problem("invalid_model", f"'model' is longer than {MODEL_NAME_MAX} characters.", param="model")
CONTROL_MODEL = Problem("invalid_model", "'model' contains control characters.", param="model")
DUPLICATE_MODEL = Problem("invalid_model", "The form names 'model' more than once.", param="model")
MISMATCH = Problem("model_mismatch", "The path and the body name different models.", param="model")
PARTIAL_BODY = Problem("body_too_large", "The request body was truncated before the check; it cannot be authorized.",
                       status=413)
ENCODED_BODY = Problem("unsupported_content_encoding",
                       "Request bodies may be sent uncompressed or gzip-encoded only.", status=415)
NOT_BEARER = Problem("missing_api_key", "The Authorization header must use the Bearer scheme.", status=401)
CONFLICTING_KEYS = Problem("conflicting_api_keys", "Several different API keys were sent; send exactly one.",
                           status=401)


class PassThroughPaths:
    """The operator's pass-through paths: exact, or with every subpath when asked."""

    def __init__(self, entries: tuple[tuple[str, bool], ...] = ()) -> None:
        self.entries = entries

    def match(self, path: str) -> PassThrough | None:
        if not self.entries:
            return None
        route, query = split_query(path)
        for index, (prefix, subpaths) in enumerate(self.entries):
            if route == prefix or (subpaths and route.startswith(prefix + "/")):
                return PassThrough(index, route, query)
        return None


NO_PASS_THROUGH = PassThroughPaths()


def facts_from_check(check: Any, pass_through: PassThroughPaths = NO_PASS_THROUGH) -> Facts:
    http = check.attributes.request.http
    headers = http.headers
    token, token_problem = credentials(headers)
    path = http.path or headers.get(":path", "/")
    endpoint = pass_through.match(path) or classify(path)
    model, body_problem = None, None
    if isinstance(endpoint, Endpoint):
        model, body_problem = requested_model(endpoint, http, headers)
    return Facts(token=token, model=model, path=path, endpoint=endpoint,
                 token_problem=token_problem, body_problem=body_problem,
                 request_id=headers.get("x-request-id", ""), headers=headers)


def credentials(headers: Mapping[str, str]) -> tuple[str | None, Problem | None]:
    """The virtual key from ``Authorization: Bearer`` or one of the providers' key headers."""
    auth = headers.get("authorization")
    others = [v for v in map(headers.get, CLIENT_KEY_HEADERS[1:]) if v]
    if auth and not others and auth[:7].lower() == "bearer ":  # the common case, in short
        token = auth[7:].strip()
        if token:
            return token, None
    found: list[str] = []
    problem = None
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            found.append(value.strip())
        else:
            problem = NOT_BEARER
    found.extend(v.strip() for v in others if v.strip())
    if len(set(found)) > 1:
        return None, CONFLICTING_KEYS
    return (found[0], None) if found else (None, problem)


def requested_model(endpoint: Endpoint, http: Any, headers: Mapping[str, str]) -> tuple[str | None, Problem | None]:
    if headers.get("x-envoy-auth-partial-body") == "true":
        return None, PARTIAL_BODY
    if headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        return None, ENCODED_BODY
    body = http.raw_body or http.body.encode("utf-8")
    if endpoint.body == MULTIPART:
        body_model, problem = model_from_multipart(body, headers.get("content-type", ""))
    else:
        body_model, problem = model_from_json(body, required=endpoint.path_model is None)
    if problem is not None:
        return None, problem
    if endpoint.path_model is None:
        return body_model, None
    if body_model is not None and body_model != endpoint.path_model:
        return None, MISMATCH
    return checked_name(endpoint.path_model)


def checked_name(model: Any) -> tuple[str | None, Problem | None]:
    if model is None:
        return None, NO_MODEL
    if not isinstance(model, str) or not model:
        return None, BAD_MODEL
    if len(model) > MODEL_NAME_MAX:
        return None, LONG_MODEL
    if not model.isprintable():
        return None, CONTROL_MODEL
    return model, None


def model_from_json(body: bytes, required: bool = True) -> tuple[str | None, Problem | None]:
    if not body:
        return None, (NO_MODEL if required else None)
    try:
        # The whole body is parsed (C parser: 1.5 ms for a 1 MB image prompt): only a body
        # that is valid JSON is forwarded, so the provider reads the model that was checked.
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None, NOT_JSON
    if not isinstance(doc, dict):
        return None, NOT_JSON
    if "model" not in doc and not required:
        return None, None
    return checked_name(doc.get("model"))


def model_from_multipart(body: bytes, content_type: str) -> tuple[str | None, Problem | None]:
    try:
        kind, options = parse_options_header(content_type)
    except ValueError:  # e.g. characters outside latin-1
        return None, NOT_MULTIPART
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return None, NOT_MULTIPART
    form = _ModelField()
    try:
        parser = MultipartParser(boundary, form.callbacks())
        parser.write(body)
        parser.finalize()
    except Exception:  # the parser's own errors vary by version; any of them means malformed
        return None, BAD_MULTIPART
    if len(form.values) > 1:
        return None, DUPLICATE_MODEL
    if not form.values:
        return None, NO_MODEL
    try:
        return checked_name(form.values[0].decode("utf-8"))
    except UnicodeDecodeError:
        return None, BAD_MODEL


class _ModelField:
    """Collects the value of every part named "model"; other parts' data is only skipped."""

    def __init__(self) -> None:
        self.values: list[bytes] = []
        self._field, self._value = b"", b""
        self._disposition = b""
        self._in_model = False

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done, "on_part_data": self._data,
                "on_part_end": self._end}

    def _begin(self) -> None:
        self._disposition, self._in_model, self._current = b"", False, bytearray()
        self._field, self._value = b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            self._disposition = self._value
        self._field, self._value = b"", b""

    def _headers_done(self) -> None:
        _, params = parse_options_header(self._disposition)
        self._in_model = params.get(b"name") == b"model"

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._in_model and len(self._current) <= MODEL_NAME_MAX * 4:
            self._current += data[start:end]

    def _end(self) -> None:
        if self._in_model:
            self.values.append(bytes(self._current))
