"""Turn a CheckRequest into Facts: the caller's key, the endpoint and the requested model.

Two steps, so that a caller without a valid key costs no body parsing: ``facts_from_check``
reads the headers and the path; ``with_body`` reads the model from the body, once the
key is known. Nothing a client sends can raise out of here: every malformed input
becomes a Problem that the decision turns into a deny.
"""

from __future__ import annotations

from typing import Any, Mapping

from google.protobuf import json_format

from extauthz.check.facts import Facts, Problem
from extauthz.check.json_body import JsonModel, read_json_model
from extauthz.check.multipart_body import FormModel, form_model
from extauthz.domain.endpoints import MULTIPART, Endpoint, PassThrough, classify, split_query, unsafe_path
from extauthz.domain.envoy_names import JWT_FILTER, JWT_PAYLOAD
from extauthz.domain.providers import CLIENT_KEY_HEADERS

MODEL_NAME_MAX = 256

NO_MODEL = Problem("missing_model", "The request must name a 'model'.", param="model")
BAD_MODEL = Problem("invalid_model", "'model' must be a non-empty string.", param="model")
LONG_MODEL = Problem("invalid_model", f"'model' is longer than {MODEL_NAME_MAX} characters.", param="model")
CONTROL_MODEL = Problem("invalid_model", "'model' contains control characters.", param="model")
SPACED_MODEL = Problem("invalid_model", "'model' must not contain whitespace.", param="model")
EMPTY_SEGMENT = Problem("invalid_model", "'model' has an empty path segment ('//', or '/' at either end).",
                        param="model")
MISMATCH = Problem("model_mismatch", "The path and the body name different models.", param="model")
PARTIAL_BODY = Problem("body_too_large", "The request body was truncated before the check; it cannot be authorized.",
                       status=413)
# Bodies that arrived as text (TextBody): a form's file parts are binary, and a '!' in the
# model may stand for bytes the provider reads otherwise. Refused, never checked on a
# stand-in.
TEXT_FORM = Problem("body_not_bytes", "This gateway passes request bodies to the authorization check as text, "
                    "which cannot carry a multipart upload's bytes; send uploads through a gateway that passes "
                    "them as bytes (Envoy's with_request_body.pack_as_bytes, Istio's packAsBytes).", status=415)
TEXT_MODEL = Problem("body_not_bytes", "This gateway passes request bodies to the authorization check as text, "
                     "where bytes that are not UTF-8 read as '!': a 'model', or a top-level member name, "
                     "containing '!' cannot be checked.", param="model")
ENCODED_BODY = Problem("unsupported_content_encoding",
                       "Request bodies may be sent uncompressed or gzip-encoded only.", status=415)
NOT_BEARER = Problem("missing_api_key", "The Authorization header must use the Bearer scheme.", status=401)
CONFLICTING_KEYS = Problem("conflicting_api_keys", "Several different API keys were sent; send exactly one.",
                           status=401)
NOT_POST = Problem("method_not_allowed", "Model calls are POST requests.", status=405)
UNSAFE_PATH = Problem("invalid_path", "A pass-through path may not hold dot or empty segments, backslashes, ';' "
                      "or percent-escapes of anything but letters, digits, '-', '_' and '~'.", status=400)


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
    """What the headers and the path say; the body is read by ``with_body``."""
    http = check.attributes.request.http
    headers = http.headers
    token, token_problem = credentials(headers)
    path = http.path or headers.get(":path", "/")
    endpoint = pass_through.match(path) or classify(path)
    # Upstreams decode and resolve paths their own way: a pass-through's is taken only plain.
    body_problem = UNSAFE_PATH if isinstance(endpoint, PassThrough) and unsafe_path(endpoint.path) else None
    if isinstance(endpoint, Endpoint) and http.method not in ("POST", ""):
        body_problem = NOT_POST  # every model call is a POST; another method is no call this gateway checked
    return Facts(token=token, model=None, path=path, endpoint=endpoint,
                 token_problem=token_problem, body_problem=body_problem,
                 request_id=headers.get("x-request-id", ""), headers=headers, claims=verified_claims(check))




def verified_claims(check: Any) -> dict[str, Any] | None:
    """The claims Envoy's jwt_authn verified (its metadata, which no client can set), or
    None: no JWT, or an Envoy without the filter (the bearer is then a virtual key)."""
    attributes = check.attributes
    if not attributes.HasField("metadata_context"):
        return None
    found = attributes.metadata_context.filter_metadata.get(JWT_FILTER)
    if found is None or JWT_PAYLOAD not in found.fields:
        return None
    payload = found.fields[JWT_PAYLOAD]
    if payload.WhichOneof("kind") != "struct_value":
        return None
    return json_format.MessageToDict(payload.struct_value)


class TextBody(bytes):
    """A body the proxy sent as text (``body``, not ``raw_body``: Envoy Gateway, or an Envoy
    without ``pack_as_bytes``). Envoy puts '!' for every byte that is not UTF-8 there, so
    these are not always the bytes the provider will read."""


def body_of(check: Any) -> bytes:
    http = check.attributes.request.http
    if http.raw_body or not http.body:
        return http.raw_body
    return TextBody(http.body.encode("utf-8"))


def with_body(facts: Facts, body: bytes) -> Facts:
    """``facts`` with the model the request names (body, or path), or the body's problem."""
    endpoint = facts.endpoint
    if not isinstance(endpoint, Endpoint) or facts.body_problem is not None:
        return facts  # not a model call, or refused whatever its body says
    headers = facts.headers
    if headers.get("x-envoy-auth-partial-body") == "true":
        return facts._replace(body_problem=PARTIAL_BODY)
    if headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        return facts._replace(body_problem=ENCODED_BODY)
    json_model: JsonModel | None = None
    form: FormModel | None = None
    if endpoint.body == MULTIPART:
        if isinstance(body, TextBody):
            return facts._replace(body_problem=TEXT_FORM)
        read_form = form_model(body, headers.get("content-type", ""))
        if isinstance(read_form, Problem):
            return facts._replace(body_problem=read_form)
        form, body_model = read_form, read_form.model
        if body_model is None and endpoint.path_model is None:
            return facts._replace(body_problem=NO_MODEL)
    elif not body:
        if endpoint.path_model is None:
            return facts._replace(body_problem=NO_MODEL)
        body_model = None
    else:
        as_text = isinstance(body, TextBody)
        read_json = read_json_model(body, as_text)
        if isinstance(read_json, Problem):
            return facts._replace(body_problem=read_json)
        json_model = read_json
        if not json_model.present and endpoint.path_model is None:
            return facts._replace(body_problem=NO_MODEL)
        body_model = json_model.model
        if as_text and json_model.bang:
            return facts._replace(body_problem=TEXT_MODEL)
    if endpoint.path_model is None:
        model, problem = checked_name(body_model)
    elif body_model is not None and body_model != endpoint.path_model:
        model, problem = None, MISMATCH
    else:
        model, problem = checked_name(endpoint.path_model)
    # Built whole: on the hot path, NamedTuple._replace costs several times more.
    return Facts(facts.token, model, facts.path, endpoint, facts.token_problem, problem, facts.request_id,
                 headers, json_model, form, facts.claims)


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


def checked_name(model: Any) -> tuple[str | None, Problem | None]:
    if model is None:
        return None, NO_MODEL
    if not isinstance(model, str) or not model:
        return None, BAD_MODEL
    if len(model) > MODEL_NAME_MAX:
        return None, LONG_MODEL
    if not model.isprintable():  # every Unicode space but ' ' is unprintable too
        return None, CONTROL_MODEL
    if " " in model:
        return None, SPACED_MODEL
    if "//" in model or model[0] == "/" or model[-1] == "/":
        return None, EMPTY_SEGMENT
    return model, None
