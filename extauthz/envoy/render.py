"""Render the Envoy bootstrap that fronts the sidecar.

Envoy asks the sidecar (gRPC ext_authz) about every LLM request, then routes it to the
cluster named in the header the sidecar set. The sidecar's admin API is reached through
the same listener, without ext_authz, because it authenticates callers itself.
"""

from __future__ import annotations

import copy
import ipaddress
from importlib import resources
from typing import Any, TypeVar

import yaml

from extauthz.check import listing
from extauthz.check.policy import MISSING_KEY
from extauthz.check.responses import error_body
from extauthz.check.routing import JWT_ADMIN_PATHS, JWT_ADMIN_PATTERNS, JWT_ADMIN_PREFIXES, signer
from extauthz.config import Config, EnvoySettings, Settings
from extauthz.domain import providers
from extauthz.domain.deny import Deny
from extauthz.domain.envoy_names import (
    ACTING_HEADERS,
    CLUSTER_HEADER,
    COUNTED,
    COUNTED_IN_FLIGHT,
    DYNAMIC_CLUSTERS,
    INTERNAL_HEADERS,
    SIGN_HEADER,
    USAGE_HEADER,
    USAGE_ID,
)
from extauthz.envoy import jwt
from extauthz.envoy.jwt import JWT_BEARER

AUTHZ_CLUSTER = "extauthz"
ADMIN_CLUSTER = "extauthz_admin"
STATS_CLUSTER = "envoy_admin_stats"  # the admin interface, for /stats/prometheus only
DECOMPRESSOR_FILTER = "envoy.filters.http.decompressor"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
SPLICE_FILTER = "envoy.filters.http.lua"
ROUTER_FILTER = "envoy.filters.http.router"
DYNAMIC_FORWARD_FILTER = "envoy.filters.http.dynamic_forward_proxy"
DYNAMIC_MAX_HOSTS = 1024       # provider hosts of runtime models Envoy keeps a cluster for
DYNAMIC_HOST_TTL = "3600s"     # a host unused this long loses its cluster (made again on use)
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Non-streamed answers of large models can take minutes, silent until the first byte.
LLM_TIMEOUT = "600s"
# Envoy warns at start-up when there is no cap; this is its edge-proxy recommendation.
MAX_DOWNSTREAM_CONNECTIONS = 50_000
# Per provider: a streamed answer holds its request (and, over HTTP/1.1, its connection)
# for up to the route timeout (600 s), so Envoy's defaults (1,024 each) would refuse calls
# at a modest rate of long streams. Past these a call gets 503 at once, not a queue.
UPSTREAM_MAX_REQUESTS = 10_000
UPSTREAM_MAX_PENDING = 1_000
# Memory: bodies are buffered whole for the check (up to max_request_bytes each). Near the
# heap limit Envoy gives memory back, then refuses new requests (503) rather than be killed.
SHRINK_HEAP_AT, STOP_ACCEPTING_AT = 0.90, 0.95
AUTHZ_CONNECTIONS_PER_WORKER = 4

# Paths served by the admin API (extauthz/admin.py); everything else is an LLM call.
ADMIN_PATHS = ("/v1/models", "/models", "/model/info", "/v1/model/info", "/v2/model/info", "/model_group/info",
               "/audit", "/access/explain", "/model/new", "/model/update", "/model/delete")
# Gemini's calls on its v1 path, which the admin API's /v1/models/ prefix would take.
# As classify reads it (matched without the query).
GEMINI_V1_CALL = r"^/v1/models/[^/:]+:(generateContent|streamGenerateContent)/?$"
# Not "/model/": Bedrock's InvokeModel path (/model/{id}/invoke) is an LLM call.
ADMIN_PREFIXES = ("/key/", "/team/", "/user/", "/v1/models/", "/models/", "/health/")
# Routes the sidecar is not asked about: the admin API checks the master key itself (its
# JSON bodies are not LLM requests), and a request with no key at all is refused by Envoy.
USAGE_FILTER = "extauthz.usage"  # a second Lua filter, under a name of its own
USAGE_RELEASE_FILTER = "extauthz.usage_release"  # the same, for calls holding an in-flight place
UNCHECKED_ROUTE_FILTERS = {name: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
                           for name in (EXT_AUTHZ_FILTER, SPLICE_FILTER, USAGE_FILTER, USAGE_RELEASE_FILTER)}
# Dynamic metadata the sidecar returns on a decision (see policy.py).
EXT_AUTHZ_METADATA = ("key_alias", "key_hash", "team_id", "user_id", "role", "model", "deployment")

T = TypeVar("T")


def render(config: Config, listen_port: int | None = None, authz_port: int | None = None,
           admin_port: int | None = None, envoy_admin_port: int | None = None,
           authz_host: str | None = None, admin_host: str | None = None,
           listen_host: str | None = None) -> dict[str, Any]:
    """A complete v3 bootstrap; an argument left as None comes from the config's settings.
    With JWTs on, an OIDC discovery document is read here (``jwt.fetch_json``)."""
    s, e = config.settings, config.envoy
    if not s.upstream_authority:
        # Its routes keep the host the allow sets (auto_host_rewrite off): without it the
        # provider would get the client's Host.
        raise ValueError("upstream_authority is false (for Istio or Envoy Gateway, whose routes set the host); "
                         "the config envoy-config renders needs it true")
    sources = jwt.jwks_sources(config.jwt) if config.jwt else []
    return {
        "admin": {"address": _address("127.0.0.1", _pick(envoy_admin_port, e.envoy_admin_port))},
        "static_resources": {
            "listeners": [_listener(s, e, _pick(listen_host, e.listen_host), _pick(listen_port, e.listen_port),
                                    _signers(config),
                                    [jwt.jwt_filter(config.jwt, sources)] if config.jwt else []),
                          *([_stats_listener(e.envoy_stats_port)] if e.envoy_stats_port else [])],
            "clusters": [
                *([_cluster(STATS_CLUSTER, "127.0.0.1", _pick(envoy_admin_port, e.envoy_admin_port), "1s")]
                  if e.envoy_stats_port else []),
                _authz_cluster(_pick(authz_host, s.grpc_host), _pick(authz_port, s.grpc_port), s.workers, e),
                _cluster(ADMIN_CLUSTER, _pick(admin_host, s.admin_host), _pick(admin_port, s.admin_port), "1s"),
                *_upstream_clusters(config),
                *(_dynamic_cluster(scheme, e.upstream_ca_file) for scheme in DYNAMIC_CLUSTERS),
                *jwt.jwks_clusters(sources, lambda u: _upstream_cluster(u, e.upstream_ca_file)),
            ],
        },
        "overload_manager": _overload_manager(e.envoy_max_heap_bytes),
    }


def render_yaml(config: Config, listen_port: int | None = None, authz_port: int | None = None,
                admin_port: int | None = None, envoy_admin_port: int | None = None,
                authz_host: str | None = None, admin_host: str | None = None, listen_host: str | None = None) -> str:
    bootstrap = render(config, listen_port=listen_port, authz_port=authz_port, admin_port=admin_port,
                       envoy_admin_port=envoy_admin_port, authz_host=authz_host, admin_host=admin_host,
                       listen_host=listen_host)
    return yaml.dump(bootstrap, Dumper=_PlainDumper, sort_keys=False)


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated values out in full: operators read and copy this file, and
    YAML anchors (&id001 / *id001) make that harder for no gain."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _pick(value: T | None, default: T) -> T:
    return default if value is None else value


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _overload_manager(max_heap: int) -> dict[str, Any]:
    monitors: list[dict[str, Any]] = [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": _typed("envoy.extensions.resource_monitors.downstream_connections.v3."
                               "DownstreamConnectionsConfig",
                               max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS),
    }]
    if not max_heap:
        return {"resource_monitors": monitors}
    heap = "envoy.resource_monitors.fixed_heap"
    monitors.append({"name": heap, "typed_config": _typed(
        "envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig", max_heap_size_bytes=max_heap)})
    return {"refresh_interval": "0.25s", "resource_monitors": monitors, "actions": [
        {"name": "envoy.overload_actions.shrink_heap",
         "triggers": [{"name": heap, "threshold": {"value": SHRINK_HEAP_AT}}]},
        {"name": "envoy.overload_actions.stop_accepting_requests",
         "triggers": [{"name": heap, "threshold": {"value": STOP_ACCEPTING_AT}}]},
    ]}


# -- listener -----------------------------------------------------------------------------

def _stats_listener(port: int) -> dict[str, Any]:
    """Envoy's own metrics for Prometheus: GET /stats/prometheus, passed to the admin
    interface on loopback; every other path and method is refused here, so the admin API
    (drain, quit, config dump with its secrets) is never reachable from the network."""
    hcm = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="envoy_stats",
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action="REJECT_REQUEST",
        route_config={"name": "envoy_stats", "virtual_hosts": [{"name": "stats", "domains": ["*"], "routes": [
            {"match": {"path": "/stats/prometheus", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
             "route": {"cluster": STATS_CLUSTER, "timeout": "10s"}},
            {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
        ]}]},
        http_filters=[_router_filter()],
    )
    return {"name": "envoy_stats", "address": _address("0.0.0.0", port),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def _listener(s: Settings, e: EnvoySettings, host: str, port: int, signers: list[tuple[str, str]],
              identity: list[dict[str, Any]]) -> dict[str, Any]:
    hcm = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="extauthz_ingress",
        generate_request_id=True,
        use_remote_address=True,
        # Admin routes skip ext_authz by path prefix, so Envoy must route on the path the
        # admin API will see: "/v1/x/../../key/y" and "//key/y" are resolved first.
        normalize_path=True,
        merge_slashes=True,
        # An encoded slash or backslash is a path an upstream may decode into another one.
        path_with_escaped_slashes_action="REJECT_REQUEST",
        # "OpenAI_Organization" is OpenAI-Organization to servers that map '_' to '-' (CGI,
        # WSGI): dropped, so a header the sidecar strips cannot come back spelled that way.
        common_http_protocol_options={"headers_with_underscores_action": "DROP_HEADER"},
        # The gateway's own headers never come from a client, not even for route matching.
        early_header_mutation_extensions=[{
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": _typed("envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                                   mutations=[{"remove": h} for h in INTERNAL_HEADERS + ACTING_HEADERS])}],
        access_log=[*_access_logs(), _usage_log()],
        local_reply_config=_local_reply_config(s),
        http_filters=[_decompressor_filter(), *identity, _ext_authz_filter(s, e, bool(identity)), _splice_filter(),
                      *_usage_filters(), *_aws_signing_filters(signers),
                      _dynamic_forward_filter(), _router_filter()],
        route_config=_route_config(bool(identity)),
    )
    return {
        "name": "ingress",
        "address": _address(host, port),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


# LiteLLM's /key/{key}/regenerate carries a key in the path (no admin route has more
# than two segments under /key/ otherwise): such lines show the route, not the path.
KEY_IN_PATH = r"^/key/[^/?]+/.*$"


def _access_logs() -> list[dict[str, Any]]:
    """The access log: one line per request, its path shown unless a key could be in it."""
    key_in_path = {"name": ":path", "string_match": {"safe_regex": {"regex": KEY_IN_PATH}}}
    return [{**_access_log(), "filter": {"header_filter": {"header": {**key_in_path, "invert_match": True}}}},
            {**_access_log("/key/{key}/..."), "filter": {"header_filter": {"header": key_in_path}}}]


def _access_log(path: str = "%PATH(NQ:ORIG_OR_PATH)%") -> dict[str, Any]:
    fields = {
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        # No query string: "/key/info?key=sk-..." would put a live key in the log.
        "path": path,
        "protocol": "%PROTOCOL%",
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "response_code_details": "%RESPONSE_CODE_DETAILS%",
        "duration_ms": "%DURATION%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_host": "%UPSTREAM_HOST%",
        # The sidecar's decision, so one line ties a request to its key and deployment.
        **{key: f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:{key})%" for key in EXT_AUTHZ_METADATA},
    }
    return {"name": "envoy.access_loggers.stdout",
            "typed_config": _typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                                   log_format={"json_format": fields})}


def _usage_log() -> dict[str, Any]:
    """The usage report: after each allowed model call has ended (a client that went away
    included), its entry (the check's metadata and the usage read from the response) goes
    to the sidecar over gRPC, batched, off the request's path (usage/reports.py)."""
    return {"name": "envoy.access_loggers.http_grpc",
            "typed_config": _typed("envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig", common_config={
                "log_name": "extauthz_usage", "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": AUTHZ_CLUSTER}},
                "buffer_flush_interval": "0.1s", "buffer_size_bytes": 65536}),
            # Allowed calls of keys and teams with limits: those the check gave a usage id.
            "filter": {"metadata_filter": {"matcher": {"filter": EXT_AUTHZ_FILTER, "path": [{"key": USAGE_ID}],
                                                       "value": {"present_match": True}},
                                           "match_if_key_not_found": False}}}


def _usage_filters() -> list[dict[str, Any]]:
    """What a response reports of its usage, as metadata for the usage report: read by
    envoy/usage.lua as the chunks pass (a JSON body's top-level "usage", an event stream's
    events), nothing buffered. (Envoy's json_to_metadata would read JSON with its own
    parser, but it holds the whole response first, and answers 500 past its buffer limit:
    an embeddings response of some megabytes.) Run only for the calls whose usage is
    counted (the sidecar set USAGE_HEADER on their allow, as SIGN_HEADER): "1", or "2" for
    a call holding an in-flight place, whose filter also frees it as the response ends (a
    second copy, so that no other response pays for looking)."""
    code = resources.files("extauthz.envoy").joinpath("usage.lua").read_text(encoding="utf-8")
    out = []
    for name, value, release in ((USAGE_FILTER, COUNTED, "false"), (USAGE_RELEASE_FILTER, COUNTED_IN_FLIGHT, "true")):
        lua = {"name": "envoy.filters.http.lua", "typed_config": _typed(
            "envoy.extensions.filters.http.lua.v3.Lua",
            default_source_code={"inline_string": f"local RELEASE = {release}\n{code}"})}
        out.append(_only_when(name, USAGE_HEADER, value, lua))
    return out


def _only_when(name: str, header: str, value: str, extension: dict[str, Any]) -> dict[str, Any]:
    """``extension`` run only on requests whose allow set ``header`` to ``value`` (Envoy's
    ExtensionWithMatcher skips it on every other request)."""
    ours = {"single_predicate": {
        "input": {"name": "request-headers", "typed_config": _typed(
            "envoy.type.matcher.v3.HttpRequestHeaderMatchInput", header_name=header)},
        "value_match": {"exact": value}}}
    return {"name": name, "typed_config": _typed(
        "envoy.extensions.common.matching.v3.ExtensionWithMatcher", extension_config=extension,
        xds_matcher={"matcher_list": {"matchers": [{
            "predicate": {"not_matcher": ours},
            "on_match": {"action": {"name": "skip", "typed_config": _typed(
                "envoy.extensions.filters.common.matcher.action.v3.SkipFilter")}}}]}})}


def _decompressor_filter() -> dict[str, Any]:
    # Envoy hands ext_authz the body as received: a gzip body must be inflated first so
    # the sidecar checks the model the provider will read (other encodings it refuses).
    def enabled(on: bool, direction: str) -> dict[str, Any]:
        return {"common_config": {"enabled": {"default_value": on,
                                              "runtime_key": f"decompressor.{direction}.enabled"}}}

    return {"name": DECOMPRESSOR_FILTER, "typed_config": _typed(
        "envoy.extensions.filters.http.decompressor.v3.Decompressor",
        decompressor_library={"name": "gzip", "typed_config": _typed(
            "envoy.extensions.compression.gzip.decompressor.v3.Gzip")},
        request_direction_config=enabled(True, "request"),
        response_direction_config=enabled(False, "response"),
    )}


def _ext_authz_filter(s: Settings, e: EnvoySettings, with_jwt: bool = False) -> dict[str, Any]:
    # With JWTs, the verified claims go to the sidecar as the check's metadata.
    jwt_metadata = {"metadata_context_namespaces": [jwt.JWT_FILTER]} if with_jwt else {}
    return {"name": EXT_AUTHZ_FILTER, "typed_config": _typed(
        "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        grpc_service={"envoy_grpc": {"cluster_name": AUTHZ_CLUSTER},
                      "timeout": f"{e.authz_timeout_ms / 1000:.3f}s"},
        transport_api_version="V3",
        # The sidecar reads "model" from the body and a cut body could hide it, so Envoy
        # answers 413 itself above the limit. Bytes, because a body need not be UTF-8.
        with_request_body={"max_request_bytes": s.max_request_bytes,
                           "allow_partial_message": False, "pack_as_bytes": True},
        # The sidecar picks the upstream through a header: the route must be chosen again.
        clear_route_cache=True,
        # Fail closed: a sidecar that does not answer must never mean "allowed".
        failure_mode_allow=False,
        status_on_error={"code": "ServiceUnavailable"},
        include_peer_certificate=False,
        **jwt_metadata,
    )}


def _splice_filter() -> dict[str, Any]:
    # Writes the provider-side model name into the body's top-level "model", replacing
    # those bytes only, as the sidecar planned (splice.lua); every other byte is the client's.
    code = resources.files("extauthz.envoy").joinpath("splice.lua").read_text(encoding="utf-8")
    return {"name": SPLICE_FILTER,
            "typed_config": _typed("envoy.extensions.filters.http.lua.v3.Lua",
                                   default_source_code={"inline_string": code})}


def _error_body(message: str, error_type: str, code: str) -> dict[str, Any]:
    # The shape of every deny the sidecar answers, so clients parse Envoy's own refusals too.
    return {"json_format": {"error": {"message": message, "type": error_type, "param": None, "code": code}}}


def _local_reply_config(s: Settings) -> dict[str, Any]:
    """Envoy's own replies (its check failing, a body over the limit, an upstream that
    cannot be reached) get the JSON error body of the sidecar's denies. The sidecar's
    denies and the splice filter's refusals already have it and are left alone."""
    def mapper(expression: str, body: dict[str, Any], status: int | None = None) -> dict[str, Any]:
        return {"filter": {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel", "typed_config":
                _typed("envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter", expression=expression)}},
                "body_format_override": body, **({"status_code": status} if status else {})}

    not_ours = ("!(response.code_details in ['ext_authz_denied', 'direct_response'])"
                " && !response.code_details.startsWith('lua')")
    return {"mappers": [
        # jwt_authn answers 403 for a wrong audience or issuer: every rejected token is a 401.
        mapper("response.code_details.startsWith('jwt_authn_access_denied')", _error_body(
            "The bearer token is a JWT that failed validation (%LOCAL_REPLY_BODY%); the request was not forwarded.",
            "authentication_error", "invalid_jwt"), 401),
        mapper("response.code_details == 'ext_authz_error'", _error_body(
            "The authorization service did not answer; the request was not forwarded. Try again.",
            "service_unavailable_error", "authz_unavailable")),
        mapper("response.code_details == 'request_payload_too_large'", _error_body(
            f"The request body is larger than {s.max_request_bytes} bytes, the most this gateway checks.",
            "invalid_request_error", "body_too_large")),
        mapper(f"response.code >= 500 && {not_ours}", _error_body(
            "%LOCAL_REPLY_BODY%", "api_error", "%RESPONSE_CODE_DETAILS%")),
        mapper(f"response.code >= 400 && {not_ours}", _error_body(
            "%LOCAL_REPLY_BODY%", "invalid_request_error", "%RESPONSE_CODE_DETAILS%")),
    ]}


AWS_SIGNING_FILTER = "envoy.filters.http.aws_request_signing"
AWS_SIGNING = "envoy.extensions.filters.http.aws_request_signing.v3.AwsRequestSigning"


def _signers(config: Config) -> list[tuple[str, str]]:
    """The (AWS service, region) pairs Envoy signs requests for."""
    found = set()
    for d in config.routable:
        service = providers.provider(d.provider, d.provider_model).aws_service
        if service and d.region:
            found.add((service, d.region))
    return sorted(found)


def _aws_signing_filters(signers: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One AWS signing filter per (service, region), after the splice so the signature
    covers the body the provider receives. Each runs only when the sidecar's allow named
    it in SIGN_HEADER, which it sets only for deployments of that service and region: no
    other request is signed, whatever host it reaches. (A route's own filter config would
    not do: which filters run is fixed by the route chosen before the check.) Credentials
    come from Envoy's own AWS chain (environment, web identity / IRSA, container or
    instance role), never from the sidecar."""
    return [_only_when(f"{AWS_SIGNING_FILTER}.{service}.{region}", SIGN_HEADER, signer(service, region),
                       {"name": AWS_SIGNING_FILTER,
                        "typed_config": _typed(AWS_SIGNING, **_aws_signing(service, region))})
            for service, region in signers]


def _aws_signing(service: str, region: str) -> dict[str, Any]:
    # The payload is hashed (the body is buffered for it): never an unsigned payload. The
    # gateway's own headers are removed after signing, so they are not signed.
    return {"service_name": service, "region": region, "use_unsigned_payload": False,
            "match_excluded_headers": [{"exact": h} for h in INTERNAL_HEADERS]}


def _router_filter() -> dict[str, Any]:
    return {"name": ROUTER_FILTER, "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")}


# -- routes -------------------------------------------------------------------------------

def _route_config(with_jwt: bool = False) -> dict[str, Any]:
    matches = [{"path": p} for p in ADMIN_PATHS] + [{"prefix": p} for p in ADMIN_PREFIXES] \
        + [{"safe_regex": {"regex": p}} for p in JWT_ADMIN_PATTERNS]
    return {
        "name": "extauthz_routes",
        "virtual_hosts": [{"name": "all", "domains": ["*"],
                           "routes": [_llm_route({"prefix": "/", "headers": [
                                                      {"name": CLUSTER_HEADER, "present_match": True}]}),
                                      _llm_route({"safe_regex": {"regex": GEMINI_V1_CALL}}),
                                      *(_jwt_listing_route(m) for m in (LISTING_MATCHES + JWT_ADMIN_MATCHES
                                                                        if with_jwt else ())),
                                      *(_admin_route(m) for m in matches),
                                      _no_credential_route(),
                                      _llm_route({"prefix": "/"})]}],
    }


def _no_credential_route() -> dict[str, Any]:
    """A request that carries no key at all is answered here, before Envoy buffers its
    body or asks the sidecar: a flood without keys costs the sidecar nothing."""
    absent = [{"name": h, "present_match": True, "invert_match": True} for h in providers.CLIENT_KEY_HEADERS]
    return {
        "match": {"prefix": "/", "headers": absent},
        "direct_response": {"status": 401, "body": {"inline_string": error_body(
            Deny(401, MISSING_KEY.code, MISSING_KEY.message))}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "typed_per_filter_config": UNCHECKED_ROUTE_FILTERS,
    }


# The listing routes, for a JWT caller: the check answers them (only it sees the claims).
LISTING_MATCHES = (*({"path": p} for p in (*listing.LIST_PATHS, listing.GROUP_INFO_PATH)),
                   *({"prefix": p + "/"} for p in listing.LIST_PATHS))


# The admin API for a JWT caller: the check decides by its role and, allowed, swaps the
# token for the master key (the route then chosen again is the plain admin route).
JWT_ADMIN_MATCHES: tuple[dict[str, Any], ...] = (
    *({"prefix": p} for p in JWT_ADMIN_PREFIXES), *({"path": p} for p in JWT_ADMIN_PATHS),
    *({"safe_regex": {"regex": p}} for p in JWT_ADMIN_PATTERNS))


def _jwt_listing_route(match: dict[str, Any]) -> dict[str, Any]:
    only_get = [] if match in JWT_ADMIN_MATCHES else [{"name": ":method", "string_match": {"exact": "GET"}}]
    route = _admin_route({**match, "headers": [
        {"name": "authorization", "string_match": {"safe_regex": {"regex": JWT_BEARER}}}, *only_get]})
    route["typed_per_filter_config"] = {SPLICE_FILTER: UNCHECKED_ROUTE_FILTERS[SPLICE_FILTER]}
    return route


def _admin_route(match: dict[str, Any]) -> dict[str, Any]:
    return {
        "match": match,
        "route": {"cluster": ADMIN_CLUSTER},
        "typed_per_filter_config": UNCHECKED_ROUTE_FILTERS,
        # No ext_authz here to overwrite them, so a client's values are dropped.
        "request_headers_to_remove": list(INTERNAL_HEADERS),
    }


def _llm_route(match: dict[str, Any]) -> dict[str, Any]:
    # Once allowed (the sidecar's header present), the rewritten path goes to the provider
    # whatever prefix it starts with; before, this route only says that ext_authz runs.
    return {
        "match": match,
        "route": {
            # The sidecar sets it on every allow, so a client's value never picks the upstream.
            "cluster_header": CLUSTER_HEADER,
            "timeout": LLM_TIMEOUT,
            "idle_timeout": LLM_TIMEOUT,
            # The sidecar sets :authority to the provider's host itself.
            "auto_host_rewrite": False,
        },
        # Applied by the router, after routing and the splice filter have used them:
        # internal headers the provider has no business seeing.
        "request_headers_to_remove": list(INTERNAL_HEADERS),
    }


# -- clusters -----------------------------------------------------------------------------

def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(name: str, host: str, port: int, connect_timeout: str, dns_type: str = "STRICT_DNS") -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        # An IP literal needs no resolver, and a STATIC cluster is ready at once.
        "type": "STATIC" if _is_ip(host) else dns_type,
        "connect_timeout": connect_timeout,
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}]},
    }
    if not _is_ip(host):
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster


def _authz_cluster(host: str, port: int, workers: int, e: EnvoySettings) -> dict[str, Any]:
    # The sidecar is local: a connect that takes long means it is down, so fail fast.
    cluster = _cluster(AUTHZ_CLUSTER, host, port, "0.250s")
    if e.authz_tls_ca_file:
        cluster["transport_socket"] = _authz_tls(e)
    if workers > 1:
        # Envoy multiplexes checks over one HTTP/2 connection per host and worker thread,
        # and the kernel spreads connections, not requests, over SO_REUSEPORT workers:
        # listing the sidecar several times opens several connections, round-robined.
        (locality,) = cluster["load_assignment"]["endpoints"]
        (endpoint,) = locality["lb_endpoints"]
        locality["lb_endpoints"] = [copy.deepcopy(endpoint) for _ in range(AUTHZ_CONNECTIONS_PER_WORKER * workers)]
    options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    # gRPC runs over HTTP/2 only.
    cluster["typed_extension_protocol_options"] = {
        options: _typed(options, explicit_http_config={"http2_protocol_options": {}})}
    return cluster


def _authz_tls(e: EnvoySettings) -> dict[str, Any]:
    """TLS to the sidecar (its grpc_tls_* settings): its certificate verified against
    authz_tls_ca_file and required to name authz_tls_server_name; Envoy's own certificate
    for mutual TLS. An allow carries provider credentials: never over plaintext on a network."""
    if not e.authz_tls_server_name:
        raise ValueError("authz_tls_ca_file needs authz_tls_server_name: the name the sidecar's certificate carries")
    if bool(e.authz_tls_cert_file) != bool(e.authz_tls_key_file):
        raise ValueError("authz_tls_cert_file and authz_tls_key_file go together")
    context: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {"trusted_ca": {"filename": e.authz_tls_ca_file},
                               "match_typed_subject_alt_names": [
                                   {"san_type": "DNS", "matcher": {"exact": e.authz_tls_server_name}}]}}
    if e.authz_tls_cert_file:
        context["tls_certificates"] = [{"certificate_chain": {"filename": e.authz_tls_cert_file},
                                        "private_key": {"filename": e.authz_tls_key_file}}]
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": _typed("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                                   sni=e.authz_tls_server_name, common_tls_context=context)}


def _upstream_clusters(config: Config) -> list[dict[str, Any]]:
    upstreams: dict[str, providers.Upstream] = {}
    for base in config.upstream_bases:
        u = providers.upstream(base)
        upstreams.setdefault(u.cluster, u)
    return [_upstream_cluster(u, config.envoy.upstream_ca_file) for u in upstreams.values()]


def _circuit_breakers() -> dict[str, Any]:
    """Each provider host's bound on connections and requests (a static cluster's, and each
    dynamic sub cluster's)."""
    return {"thresholds": [{"max_connections": UPSTREAM_MAX_REQUESTS, "max_requests": UPSTREAM_MAX_REQUESTS,
                            "max_pending_requests": UPSTREAM_MAX_PENDING, "track_remaining": True}]}


def _dynamic_cluster(scheme: str, ca_file: str = CA_BUNDLE) -> dict[str, Any]:
    """Where a runtime model on a host the config does not name goes: Envoy's dynamic
    forward proxy, a sub cluster of its own per host and port (circuit breakers and
    connections per provider host, as the static clusters), made when first used, to the
    host the allow set as :authority. TLS: the name sent (SNI) and checked against the
    certificate (SAN) is that host's, against the system's CAs."""
    options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    cluster: dict[str, Any] = {
        "name": DYNAMIC_CLUSTERS[scheme],
        "connect_timeout": "5s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {"name": "envoy.clusters.dynamic_forward_proxy", "typed_config": _typed(
            "envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
            sub_clusters_config={"max_sub_clusters": DYNAMIC_MAX_HOSTS, "sub_cluster_ttl": DYNAMIC_HOST_TTL})},
        "dns_lookup_family": "V4_PREFERRED",
        "circuit_breakers": _circuit_breakers(),
    }
    if scheme == "https":
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            common_tls_context={"validation_context": {"trusted_ca": {"filename": ca_file}}})}
        cluster["typed_extension_protocol_options"] = {options: _typed(
            options, upstream_http_protocol_options={"auto_sni": True, "auto_san_validation": True},
            explicit_http_config={"http_protocol_options": {}})}
    return cluster


def _dynamic_forward_filter() -> dict[str, Any]:
    """Resolves the host of a request routed to a dynamic cluster (it passes every other
    request on untouched), waiting for its sub cluster on the first call."""
    return {"name": DYNAMIC_FORWARD_FILTER, "typed_config": _typed(
        "envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
        sub_cluster_config={"cluster_init_timeout": "5s"})}


def _upstream_cluster(u: providers.Upstream, ca_file: str = CA_BUNDLE) -> dict[str, Any]:
    # LOGICAL_DNS: provider hosts answer from large, rotating address pools, where
    # connecting to whatever DNS returns now beats tracking every address.
    cluster = _cluster(u.cluster, u.host, u.port, "5s", "LOGICAL_DNS")
    cluster["circuit_breakers"] = _circuit_breakers()
    if u.tls:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls",
                                       "typed_config": _tls_context(u.host, ca_file)}
    return cluster


def _tls_context(host: str, ca_file: str = CA_BUNDLE) -> dict[str, Any]:
    ip = _is_ip(host)
    validation = {
        "trusted_ca": {"filename": ca_file},
        # Envoy checks the chain but not the name unless told to.
        "match_typed_subject_alt_names": [{"san_type": "IP_ADDRESS" if ip else "DNS", "matcher": {"exact": host}}],
    }
    # SNI carries host names only (RFC 6066).
    sni = {} if ip else {"sni": host}
    return _typed("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                  **sni, common_tls_context={"validation_context": validation})
