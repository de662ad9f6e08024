"""How an allowed request reaches its deployment: the headers Envoy applies on allow.

Everything that depends only on the deployment is computed once, at config load;
per request only the path and the provider-side model name are built.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode

from extauthz.check.facts import Facts, Problem
from extauthz.check.json_body import ABSENT, JsonModel, Member, members, model_span, removal_span
from extauthz.check.responses import allow_prefix
from extauthz.config import Deployment, PassThroughConfig
from extauthz.domain import providers
from extauthz.domain.endpoints import JSON, Endpoint, PassThrough, model_call_segment
from extauthz.domain.envoy_names import (
    CLUSTER_HEADER,
    DYNAMIC_CLUSTERS,
    INTERNAL_HEADERS,
    NO_SPLICE,
    SIGN_HEADER,
    SPLICE_HEADER,
    USAGE_HEADER,
)
from extauthz.tokens import NO_TOKENS, TokenHolder, Tokens

# The admin routes an acting user may use (its own keys; in a team where it is an admin
# member, the team's keys and members); the admin API narrows each to those records.
ACTING_ROUTES = ("/key/generate", "/key/list", "/key/delete", "/key/info", "/key/update", "/key/regenerate",
                 "/team/info", "/team/list", "/model/info", "/v1/model/info",
                 "/team/member_add", "/team/member_update", "/team/member_delete", "/user/info")
# The admin routes a JWT caller's request reaches through the check (Envoy's routes for
# them are rendered from these).
JWT_ADMIN_PREFIXES = ("/key/", "/team/", "/user/")
JWT_ADMIN_PATHS = ("/model/info", "/v1/model/info", "/v2/model/info", "/audit", "/access/explain", "/model/new",
                   "/model/update", "/model/delete")
# PATCH /model/{model_id}/update (not a prefix: /model/ is also Bedrock's InvokeModel path).
JWT_ADMIN_PATTERNS = (r"^/model/[^/]+/update$",)
_JWT_ADMIN_PATTERN = re.compile("|".join(JWT_ADMIN_PATTERNS))


def jwt_admin_path(path: str) -> bool:
    route = path.partition("?")[0]
    return route in JWT_ADMIN_PATHS or route.startswith(JWT_ADMIN_PREFIXES) \
        or _JWT_ADMIN_PATTERN.match(route) is not None
# Query parameters that address a provider, carry a key or pick who is billed (Google's
# userProject): the sidecar sets its own or none.
PROVIDER_QUERY = frozenset({"api-version", "key", "userproject", "$userproject",
                            # Google's system parameters that would strip usageMetadata from the
                            # answer or wrap it where it is not read (JSONP, another content type)
                            "fields", "$fields", "callback", "$callback", "$ct"})
# Google's response formats: JSON and events are read for their usage; others (alt=proto)
# are not, so the parameter is dropped and the answer comes as JSON.
READABLE_ALT = frozenset({"json", "sse"})

Headers = tuple[tuple[str, str], ...]


class Proxy(NamedTuple):
    """What the proxy in front does with an allow (settings.upstream_authority, body_rewrite):
    the rendered Envoy both keeps the host the allow sets and splices the body; a mesh's or
    a gateway's routes may set the host themselves, and may have no splice filter."""

    authority: bool = True      # the allow sets :authority to the provider's host
    body_rewrite: bool = True   # the proxy runs splice.lua: the body's model can be rewritten


# A call whose provider knows its model by another name, where nothing can write that name
# into the body: refused, never sent to the provider under the client's name.
REWRITE_UNAVAILABLE = Problem(
    "model_rewrite_unavailable", "This model's provider knows it by another name, which has to be written into the "
    "request body, and the gateway in front of this service cannot rewrite bodies; call the model by the "
    "provider's name, or ask the operator to add the body rewrite (deploy/README.md).", param="model")


def _static_headers(upstream: providers.Upstream, credential: Headers, per_request: tuple[str, ...] = (),
                    authority: bool = True, cluster: str | None = None) -> tuple[Headers, tuple[str, ...]]:
    """The headers every allow to this upstream sets, and those it removes: the client's
    keys and headers that choose what the operator's credential bills, unless the
    deployment sets them itself. ``per_request`` names headers each allow sets anew;
    ``authority``: the provider's host too (settings.upstream_authority)."""
    headers = ((CLUSTER_HEADER, cluster or upstream.cluster),) \
        + (((":authority", upstream.authority),) if authority else ()) + credential
    overwritten = {name for name, _ in headers} | set(per_request)
    # Envoy applies sets before removes: a header we overwrite must not also be removed.
    # USAGE_HEADER is set per request after this (enforcement.within_limits); a client's never
    # reaches here (removed early), and the routes remove the gateway's before the provider.
    remove = tuple(h for h in (*providers.CLIENT_KEY_HEADERS, *providers.CLIENT_ONLY_HEADERS, *INTERNAL_HEADERS)
                   if h not in overwritten and h != USAGE_HEADER)
    return headers, remove


# The few provider names, as JSON strings, without encoding one per request.
_json_string = lru_cache(maxsize=4096)(json.dumps)


def splice_plan(body: JsonModel | None, model: str, insert: bool) -> str:
    """The SPLICE_HEADER value that puts ``model`` where the body named its model, or,
    with ``insert``, adds a "model" member to a body that names none."""
    if body is None or (body.model == model if body.present else not insert):
        # Nothing to change: a name written with escapes ("gpt\u002d4") reads the same
        # to every parser once the body is known to be unambiguous.
        return NO_SPLICE
    span = model_span(body)
    token = _json_string(model)  # ASCII only, so it is a valid header value
    if not body.present:
        token = f'"model": {token}' + (", " if span.members_after else "")
    return f"{span.body_length} {span.start} {span.end} {span.original.hex()} {token}"


def _client_query(query: str) -> str:
    if not query:
        return ""
    # Names compared in lower case: a front end that reads them without regard to case
    # must not see one that was let through.
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() not in PROVIDER_QUERY
            and (k.lower() not in ("alt", "$alt") or v.lower() in READABLE_ALT)]
    return urlencode(kept)


def _join(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


_PATH_SAFE_CAPTURE = re.compile(r"(?!.*\.\.)[A-Za-z0-9._:@-]+")
_MODEL_IN_BODY = Problem("missing_model", "This model's provider reads the model from the request body, which "
                         "names none; send it in the body ('model').", param="model")


@dataclass(frozen=True)
class Fixed:
    """What every allow to one route shares, built once at load."""

    upstream: providers.Upstream
    headers: Headers
    headers_to_remove: tuple[str, ...]
    route_id: str  # also the "deployment" of the dynamic metadata
    prefix: bytes  # those headers as the CheckResponse part every allow to this route starts with


def _fixed(upstream: providers.Upstream, route_id: str, credential: Headers,
           per_request: tuple[str, ...] = (), authority: bool = True, dynamic: bool = False) -> dict[str, Any]:
    """The fields of ``Fixed`` for one upstream and its fixed headers; ``dynamic``: through
    Envoy's dynamic forward proxy, which goes where :authority says (so it is always set)."""
    cluster = DYNAMIC_CLUSTERS[upstream.scheme] if dynamic else None
    headers, remove = _static_headers(upstream, credential, per_request, authority or dynamic, cluster)
    return {"upstream": upstream, "headers": headers, "headers_to_remove": remove, "route_id": route_id,
            "prefix": allow_prefix(headers, remove)}


@dataclass(frozen=True)
class Route(Fixed):
    deployment: Deployment
    provider: providers.Provider
    token: TokenHolder | None = None  # a refreshed OAuth token, sent as Authorization: Bearer
    rewrites_body: bool = True  # the proxy in front can splice the body (Proxy.body_rewrite)

    @classmethod
    def of(cls, d: Deployment, tokens: Tokens = NO_TOKENS, proxy: Proxy = Proxy()) -> "Route":
        provider = providers.provider(d.provider, d.provider_model)
        credential: Headers = ()
        if d.api_key and d.key_is_bearer:
            credential = (("authorization", f"Bearer {d.api_key}"),)
        elif d.api_key and provider.credential_header:
            credential = (provider.credential(d.api_key),)
        if d.organization and provider.takes_organization:
            credential += (("openai-organization", d.organization),)
        if provider.aws_service and d.region:
            credential += ((SIGN_HEADER, signer(provider.aws_service, d.region)),)
        per_request = (SPLICE_HEADER, "authorization") if d.token else (SPLICE_HEADER,)
        return cls(**_fixed(providers.upstream(d.api_base), d.name, credential, per_request, proxy.authority,
                            d.dynamic),
                   deployment=d, provider=provider, token=tokens.holder(d.token) if d.token else None,
                   rewrites_body=proxy.body_rewrite)

    @property
    def api_format(self) -> str:
        return self.provider.api_format

    @property
    def takes_stream_options(self) -> bool:
        """Whether the deployment reads stream_options (Azure's older API versions refuse it)."""
        version = self.deployment.api_version
        return self.deployment.provider != "azure" or version is None or version >= AZURE_STREAM_OPTIONS

    def provider_model(self, capture: str | None) -> str:
        model = self.deployment.provider_model
        return model.replace("*", capture, 1) if capture is not None and "*" in model else model

    def path(self, endpoint: Endpoint, model: str, operation: str | None = None) -> str:
        path, provider_query = self.provider.build_path(self.upstream.base_path, operation or endpoint.operation,
                                                        model, self.deployment.api_version)
        return _join(path, "&".join(q for q in (provider_query, _client_query(endpoint.query)) if q))

    def forward_headers(self, facts: Facts, capture: str | None, counted: bool = False) -> Headers | Problem:
        """The per-request headers (``self.headers`` come with them), or why there are none.
        ``counted``: the response's usage is read (a streamed OpenAI call is asked to report it)."""
        endpoint, requested = facts.endpoint, facts.model or ""
        assert isinstance(endpoint, Endpoint)
        provider = self.provider
        if not provider.reads(endpoint.api_format) or (
                provider.operations is not None and endpoint.operation not in provider.operations):
            return Problem("unsupported_route", (
                f"{endpoint.operation!r} is an {endpoint.api_format} API request and model {requested!r} "
                f"is served by an {self.api_format} API deployment{_serving(provider)}; extauthz routes requests, "
                "it does not translate between API formats."))
        if capture is not None and provider.model_in_path and not _PATH_SAFE_CAPTURE.fullmatch(capture):
            # What a wildcard matched goes into the provider's path: no separators, escapes
            # or dot segments a provider's front end might resolve into another path.
            return Problem("invalid_model", f"{requested!r} cannot name a model in this provider's path: use "
                           "letters, digits and . _ : @ - only.", param="model")
        credential: Headers = ()
        if self.token is not None:
            bearer = self.token.bearer()
            if bearer is None:
                return Problem("credential_unavailable", f"The gateway has no valid credential for model "
                               f"{requested!r} right now; try again shortly.", status=503)
            credential = (("authorization", f"Bearer {bearer}"),)
        model = self.provider_model(capture)
        if provider.hosted_anthropic is not None:
            hosted = self.hosted_anthropic(facts, endpoint, model, provider.hosted_anthropic)
            if isinstance(hosted, Problem):
                return hosted
            return hosted + credential if self.rewrites_body else self.rewritable(hosted + credential)
        extra: Headers = ((":path", self.path(endpoint, model)),) + credential
        # A provider that reads the model from the body gets a body that names it (an
        # Azure-style path may send one that does not).
        body_names_model = not provider.model_in_path
        if endpoint.body == JSON:
            if facts.json_model is None and body_names_model:
                return _MODEL_IN_BODY
            # The provider is told it reads JSON, as the body was checked, whatever the client
            # declared; the model's bytes change only where the provider names it otherwise,
            # and a body naming none gets one where the provider reads it there.
            plan = splice_plan(facts.json_model, model, insert=body_names_model)
            if counted and endpoint.operation in STREAMED_USAGE and facts.json_model is not None:
                asked = usage_edit(facts.json_model)
                if isinstance(asked, Problem):
                    return asked
                if asked is not None and self.takes_stream_options:
                    plan = edits_plan(len(facts.json_model.body), sorted(
                        model_edits(facts.json_model, model, body_names_model) + [asked]))
            extra += (("content-type", "application/json"), (SPLICE_HEADER, plan))
        else:
            if body_names_model and (facts.form is None or facts.form.model is None):
                return _MODEL_IN_BODY
            if model != requested and body_names_model:
                return Problem("unsupported_route", (
                    f"Model {requested!r} is called {model!r} by its provider, and a multipart/form-data body "
                    "cannot be rewritten; name the model as the provider does."))
            # The boundary the body was checked with, as one header however the client sent it.
            extra += (("content-type", facts.form.content_type if facts.form else ""), (SPLICE_HEADER, NO_SPLICE))
        for name, value in provider.default_headers:
            if name not in facts.headers:
                extra += ((name, value),)
        return extra if self.rewrites_body else self.rewritable(extra)  # (no call on the usual path)

    def rewritable(self, headers: Headers) -> Headers | Problem:
        """``headers``, unless they plan a body rewrite the proxy cannot make."""
        return headers if dict(headers).get(SPLICE_HEADER, NO_SPLICE) == NO_SPLICE else REWRITE_UNAVAILABLE

    def hosted_anthropic(self, facts: Facts, endpoint: Endpoint, model: str,
                         hosted: providers.HostedAnthropic) -> Headers | Problem:
        """Anthropic models on Bedrock or Vertex: the path names the model and whether to
        stream. A body sent to the platform's own path goes as it is; an Anthropic Messages
        body becomes the platform's (its "model" member replaced by "anthropic_version",
        on Bedrock a "stream": false removed)."""
        if endpoint.api_format != providers.ANTHROPIC:
            plan, operation = NO_SPLICE, endpoint.operation
        else:
            edits = hosted_edits(facts.json_model, hosted)
            if isinstance(edits, Problem):
                return edits
            changes, streams = edits
            plan = edits_plan(len(facts.json_model.body), changes)  # type: ignore[union-attr]
            operation = hosted.operations[streams]
        streaming = operation == hosted.operations[1]
        accept = "application/vnd.amazon.eventstream" if streaming and not hosted.streams_sse else (
            "text/event-stream" if streaming else "application/json")
        return ((":path", self.path(endpoint, model, operation)), ("content-type", "application/json"),
                ("accept", accept), (SPLICE_HEADER, plan))


def signer(service: str, region: str) -> str:
    """The SIGN_HEADER value naming one AWS signing filter of the rendered Envoy."""
    return f"{service}:{region}"


def _serving(provider: providers.Provider) -> str:
    return f" (it serves {', '.join(provider.operations)})" if provider.operations else ""


_BEDROCK_STREAM = Problem("unsupported_route", "Bedrock streams in AWS's event-stream format, not server-sent "
                          "events; stream through Bedrock's own path (/model/{model}/invoke-with-response-stream, "
                          "as the AnthropicBedrock client does) or send \"stream\": false.", param="stream")
_PLATFORM_VERSION = Problem("invalid_request_body", "The body already has an 'anthropic_version'; the gateway sets "
                            "the platform's.", param="anthropic_version")
_STREAM_NOT_BOOLEAN = Problem("invalid_request_body", "'stream' must be true or false.", param="stream")


def hosted_edits(body: JsonModel | None, hosted: providers.HostedAnthropic
                 ) -> tuple[list[tuple[int, int, bytes, bytes]], bool] | Problem:
    """The byte edits that turn a checked Anthropic Messages body into the platform's, and
    whether it asks to stream."""
    if body is None or not body.present:
        return _MODEL_IN_BODY
    found = members(body)
    if any(m.name == "anthropic_version" for m in found):
        return _PLATFORM_VERSION
    raw = body.body
    version = f'"anthropic_version": {json.dumps(hosted.version)}'.encode()
    edits, streams = [], False
    for index, member in enumerate(found):
        if member.name == "model":
            edits.append((member.start, member.value_end, raw[member.start:member.value_end], version))
        elif member.name == "stream":
            start, end = _value_span(raw, member)
            value = raw[start:end]
            if value not in (b"true", b"false"):
                return _STREAM_NOT_BOOLEAN
            streams = value == b"true"
            if streams and not hosted.streams_sse:
                return _BEDROCK_STREAM
            if not hosted.keeps_stream:
                start, end = removal_span(found, index)
                edits.append((start, end, raw[start:end], b""))
    return sorted(edits), streams


# OpenAI-format streams report their usage only when asked (stream_options.include_usage);
# a counted call is asked, so that its tokens and cost are known; Envoy's usage filter takes it out again for a client
# that did not ask (docs/usage-limits.md).
STREAMED_USAGE = ("chat/completions", "completions")
INCLUDE_USAGE = b'"include_usage": true'
# Azure OpenAI reads stream_options from this API version on; older ones refuse the field.
AZURE_STREAM_OPTIONS = "2024-09-01"
_STREAM_OPTIONS_NOT_OBJECT = Problem("invalid_request_body", "'stream_options' must be an object.",
                                     param="stream_options")


def _stream_variant(name: str) -> Problem:
    return Problem("invalid_request_body", f"The JSON body has a member {name[:64]!r} besides the one the API "
                   "names; some parsers match member names without regard to case. Send it in lower case.",
                   param=name.casefold()[:64])


def usage_edit(body: JsonModel) -> tuple[int, int, bytes, bytes] | Problem | None:
    """The edit that makes a streamed OpenAI-format request report its usage: a
    "stream_options" member added as the body's first, or "include_usage": true set in the
    one it has (its value replaced, or the member added first); every other byte as sent.
    None when the body does not stream or already asks; a Problem for a body a lenient
    reader could stream from without being asked ("stream": 1, a member "Stream")."""
    if body.stream_variant is not None:
        return _stream_variant(body.stream_variant)
    if body.stream is ABSENT or body.stream is False:
        return None
    if body.stream is not True:
        return _STREAM_NOT_BOOLEAN
    options, raw = body.stream_options, body.body
    if options is ABSENT:
        first = raw.index(b"{") + 1
        return first, first, b"", b'"stream_options": {' + INCLUDE_USAGE + b"}, "
    if options is not None and not isinstance(options, dict):
        return _STREAM_OPTIONS_NOT_OBJECT
    if isinstance(options, dict):
        variant = next((n for n in options if n != "include_usage" and n.casefold() == "include_usage"), None)
        if variant is not None:
            return _stream_variant(variant)
        if options.get("include_usage") is True:
            return None  # asked already
    start, end = _value_span(raw, next(m for m in members(body) if m.name == "stream_options"))
    if options is None:  # "stream_options": null
        return start, end, raw[start:end], b"{" + INCLUDE_USAGE + b"}"
    inner = JsonModel(None, False, raw[start:end])
    found = next((m for m in members(inner) if m.name == "include_usage"), None)
    if found is None:  # added as the object's first member
        first = start + 1
        return first, first, b"", INCLUDE_USAGE + (b", " if options else b"")
    value_start, value_end = _value_span(inner.body, found)
    return start + value_start, start + value_end, raw[start + value_start:start + value_end], b"true"


def _value_span(raw: bytes, member: Member) -> tuple[int, int]:
    """Where a member's value is: past its name and colon (a name of plain letters: the
    first colon after it), to its end."""
    colon = raw.index(b":", member.start + 1)
    value = raw[colon + 1:member.value_end]
    return colon + 1 + len(value) - len(value.lstrip()), member.value_end


def streams_unasked(facts_body: JsonModel | None) -> bool:
    """Whether a body streams without asking for its usage (and so would go unpriced)."""
    return facts_body is not None and facts_body.stream is True and not (
        isinstance(facts_body.stream_options, dict) and facts_body.stream_options.get("include_usage") is True)


def model_edits(body: JsonModel, model: str, insert: bool) -> list[tuple[int, int, bytes, bytes]]:
    """``splice_plan``'s change, as an edit among others (none when the model stays)."""
    if body.model == model if body.present else not insert:
        return []
    span = model_span(body)
    token = _json_string(model)
    if not body.present:
        token = f'"model": {token}' + (", " if span.members_after else "")
    return [(span.start, span.end, span.original, token.encode())]


def edits_plan(body_length: int, edits: list[tuple[int, int, bytes, bytes]]) -> str:
    """The SPLICE_HEADER value for several edits: each span, its bytes as checked and its
    replacement, all in hex (see splice.lua)."""
    return f"{body_length} * " + " ".join(f"{s},{e},{old.hex()},{new.hex()}" for s, e, old, new in edits)


@dataclass(frozen=True)
class AdminRoute:
    """A JWT admin's request to the admin API, allowed by the check: the token is swapped
    for the master key, which the admin API checks as for any admin."""

    headers: Headers
    headers_to_remove: tuple[str, ...]
    prefix: bytes
    route_id: str = "admin_api"

    @classmethod
    def of(cls, master_key: str) -> "AdminRoute":
        headers = (("authorization", f"Bearer {master_key}"),)
        remove = tuple(h for h in (*providers.CLIENT_KEY_HEADERS[1:], *INTERNAL_HEADERS))
        return cls(headers, remove, allow_prefix(headers, remove))


@dataclass(frozen=True)
class PassThroughRoute(Fixed):
    """An operator-declared path forwarded to a fixed target with key authentication only."""

    config: PassThroughConfig

    @classmethod
    def of(cls, c: PassThroughConfig, proxy: Proxy = Proxy()) -> "PassThroughRoute":
        return cls(**_fixed(providers.upstream(c.target), f"pass_through:{c.path}",
                            c.headers + ((SPLICE_HEADER, NO_SPLICE),), authority=proxy.authority), config=c)

    def forward_headers(self, facts: Facts, capture: str | None = None, counted: bool = False) -> Headers | Problem:
        request = facts.endpoint
        assert isinstance(request, PassThrough)
        subpath = request.path[len(self.config.path):] if self.config.include_subpath else ""
        upstream_path = self.upstream.base_path + subpath or "/"
        # The target itself was checked at load; a client's subpath is checked here.
        called = model_call_segment(subpath) if subpath else None
        if called is not None:
            return Problem("pass_through_model_call", (
                f"{request.path!r} would reach {called!r}, a model call, through a pass-through that checks no "
                "model; call the model through the gateway's own endpoints."), status=403)
        return ((":path", _join(upstream_path, request.query)),)
