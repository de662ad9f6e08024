"""The rendered Envoy bootstrap: accepted by Envoy itself, and shaped the way the sidecar needs."""

from __future__ import annotations

import dataclasses
import json
import re

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz import config as config_module
from extauthz.envoy import render as envoy_config
from extauthz.domain import providers
from extauthz.config import Config
from extauthz.domain.envoy_names import DYNAMIC_CLUSTERS
from extauthz.domain.envoy_names import CLUSTER_HEADER, ACTING_HEADERS, INTERNAL_HEADERS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "config.yaml"
COMMITTED = ROOT / "envoy" / "envoy.yaml"
ENVOY = Path(sys.executable).parent / "envoy"

HTTPS_CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params: {model: openai/gpt-4o, api_base: "https://api.openai.com/v1", api_key: os.environ/OPENAI_API_KEY}
  - model_name: gpt-4o-mini
    litellm_params: {model: openai/gpt-4o-mini, api_key: os.environ/OPENAI_API_KEY}
  - model_name: azure-gpt
    litellm_params: {model: azure/gpt-deploy, api_base: "https://x.openai.azure.com", api_version: "2024-02-01",
                     api_key: os.environ/AZURE_API_KEY}
  - model_name: local
    litellm_params: {model: openai/llama, api_base: "http://llm.internal:8000/v1"}
"""

ADMIN_PATHS = ["/v1/models", "/models", "/model/info", "/v1/model/info", "/v2/model/info", "/model_group/info",
               "/audit", "/access/explain", "/model/new", "/model/update", "/model/delete"]
ADMIN_PREFIXES = ["/key/", "/team/", "/user/", "/v1/models/", "/models/", "/health/"]
# PATCH /model/{id}/update: a pattern, since /model/ is also Bedrock's InvokeModel path.
ADMIN_PATTERNS = [r"^/model/[^/]+/update$"]


def load(path: Path) -> Config:
    # No environment: the rendered file must not depend on who renders it.
    return config_module.load(str(path), environ={}, require_secrets=False)


def validate(bootstrap: str, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(bootstrap)
    run = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "deprecated" not in output.lower(), output


@pytest.fixture(scope="module")
def example() -> dict[str, Any]:
    return envoy_config.render(load(EXAMPLE))


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict[str, Any]]:
    path = tmp_path_factory.mktemp("https") / "config.yaml"
    path.write_text(HTTPS_CONFIG)
    config = load(path)
    return config, envoy_config.render(config)


def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    (listener,) = bootstrap["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (network_filter,) = chain["filters"]
    assert network_filter["name"] == "envoy.filters.network.http_connection_manager"
    return network_filter["typed_config"]


def http_filter(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [f["typed_config"] for f in hcm(bootstrap)["http_filters"] if f["name"] == name]
    return found


def routes(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    (vhost,) = hcm(bootstrap)["route_config"]["virtual_hosts"]
    assert vhost["domains"] == ["*"]
    return vhost["routes"]


def clusters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def endpoint(cluster: dict[str, Any]) -> tuple[str, int]:
    (locality,) = cluster["load_assignment"]["endpoints"]
    (lb_endpoint,) = locality["lb_endpoints"]
    address = lb_endpoint["endpoint"]["address"]["socket_address"]
    return address["address"], address["port_value"]


# -- Envoy accepts it ---------------------------------------------------------------------

def test_example_config_validates(tmp_path: Path) -> None:
    validate(envoy_config.render_yaml(load(EXAMPLE)), tmp_path)


def test_https_config_validates(https: tuple[Config, dict[str, Any]], tmp_path: Path) -> None:
    config, _ = https
    validate(envoy_config.render_yaml(config, listen_port=8080, authz_port=9100, admin_port=9200,
                                      envoy_admin_port=9300, authz_host="authz.internal"), tmp_path)


def test_committed_demo_config_is_current() -> None:
    fresh = envoy_config.render_yaml(load(EXAMPLE))
    assert COMMITTED.read_text() == fresh, "envoy/envoy.yaml is stale: re-render with `make envoy-config`"


# -- what the sidecar relies on -----------------------------------------------------------

def test_filter_order(example: dict[str, Any]) -> None:
    names = [f["name"] for f in hcm(example)["http_filters"]]
    assert names == ["envoy.filters.http.decompressor", "envoy.filters.http.ext_authz", "envoy.filters.http.lua",
                     "extauthz.usage", "extauthz.usage_release", "envoy.filters.http.dynamic_forward_proxy",
                     "envoy.filters.http.router"]


def test_ext_authz_fails_closed_and_sends_the_whole_body(example: dict[str, Any]) -> None:
    settings = load(EXAMPLE).settings
    authz = http_filter(example, "envoy.filters.http.ext_authz")
    assert authz["@type"].endswith("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz")
    assert authz["grpc_service"]["envoy_grpc"] == {"cluster_name": "extauthz"}
    assert authz["grpc_service"]["timeout"] == f"{load(EXAMPLE).envoy.authz_timeout_ms / 1000:.3f}s"
    assert authz["transport_api_version"] == "V3"
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}  # HTTP 503
    assert authz["clear_route_cache"] is True
    assert authz["include_peer_certificate"] is False
    assert authz["with_request_body"] == {"max_request_bytes": settings.max_request_bytes,
                                          "allow_partial_message": False, "pack_as_bytes": True}


def test_the_splice_filter_runs_the_packaged_lua(example: dict[str, Any]) -> None:
    splice = http_filter(example, "envoy.filters.http.lua")
    assert splice["@type"] == "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
    code = splice["default_source_code"]["inline_string"]
    assert code == (Path(envoy_config.__file__).parent / "splice.lua").read_text()
    assert "x-extauthz-splice" in code and "function envoy_on_request" in code


def test_envoys_own_refusals_are_mapped_to_json_errors(example: dict[str, Any]) -> None:
    mappers = hcm(example)["local_reply_config"]["mappers"]
    expressions = [m["filter"]["extension_filter"]["typed_config"]["expression"] for m in mappers]
    assert expressions[0] == "response.code_details.startsWith('jwt_authn_access_denied')"
    assert mappers[0]["status_code"] == 401  # jwt_authn's 403s (audience, issuer) too
    assert expressions[1] == "response.code_details == 'ext_authz_error'"
    assert expressions[2] == "response.code_details == 'request_payload_too_large'"
    # The sidecar's denies and the splice filter's refusals keep their own bodies.
    assert all("ext_authz_denied" in e for e in expressions[3:])
    for m in mappers:
        error = m["body_format_override"]["json_format"]["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] is None
    assert hcm(example)["path_with_escaped_slashes_action"] == "REJECT_REQUEST"


def test_connection_manager(example: dict[str, Any]) -> None:
    manager = hcm(example)
    assert manager["stat_prefix"]
    assert manager["generate_request_id"] is True
    assert manager["use_remote_address"] is True
    log, key_in_path, usage = manager["access_log"]
    assert log["name"] == key_in_path["name"] == "envoy.access_loggers.stdout"
    # A path that can carry a key (/key/{key}/regenerate) is logged as its route, the others as sent.
    matcher = key_in_path["filter"]["header_filter"]["header"]
    assert log["filter"]["header_filter"]["header"] == {**matcher, "invert_match": True}
    assert re.fullmatch(matcher["string_match"]["safe_regex"]["regex"], "/key/sk-live-1234/regenerate")
    assert not re.fullmatch(matcher["string_match"]["safe_regex"]["regex"], "/key/regenerate")
    assert key_in_path["typed_config"]["log_format"]["json_format"]["path"] == "/key/{key}/..."
    # The usage report: allowed model calls only, to the sidecar's gRPC port.
    assert usage["name"] == "envoy.access_loggers.http_grpc"
    assert usage["typed_config"]["common_config"]["grpc_service"] == {"envoy_grpc": {"cluster_name": "extauthz"}}
    assert usage["filter"]["metadata_filter"]["matcher"]["path"] == [{"key": "usage_id"}]
    fields = log["typed_config"]["log_format"]["json_format"]
    values = set(fields.values())
    for operator in ("%REQ(:METHOD)%", "%RESPONSE_CODE%", "%RESPONSE_FLAGS%", "%DURATION%",
                     "%REQ(X-REQUEST-ID)%", "%UPSTREAM_CLUSTER%"):
        assert operator in values, operator
    assert any(v.startswith("%PATH(") for v in values)
    for key in ("key_alias", "key_hash", "team_id", "user_id", "role", "model", "deployment"):
        assert fields[key] == f"%DYNAMIC_METADATA(envoy.filters.http.ext_authz:{key})%"


def test_admin_routes_skip_ext_authz_and_the_splice(example: dict[str, Any]) -> None:
    admin = [r for r in routes(example) if r.get("route", {}).get("cluster") == "extauthz_admin"]
    assert sorted(r["match"]["path"] for r in admin if "path" in r["match"]) == sorted(ADMIN_PATHS)
    assert sorted(r["match"]["prefix"] for r in admin if "prefix" in r["match"]) == sorted(ADMIN_PREFIXES)
    assert [r["match"]["safe_regex"]["regex"] for r in admin if "safe_regex" in r["match"]] == ADMIN_PATTERNS
    for route in admin:
        per_filter = route["typed_per_filter_config"]
        for name in ("envoy.filters.http.ext_authz", "envoy.filters.http.lua"):
            assert per_filter[name] == {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                                        "disabled": True}
        assert set(route["request_headers_to_remove"]) == set(INTERNAL_HEADERS)


def test_everything_else_is_routed_by_the_sidecar_header(example: dict[str, Any]) -> None:
    allowed, gemini_v1, *admin, no_key, llm = routes(example)
    assert all(r["route"]["cluster"] == "extauthz_admin" for r in admin)
    # Once allowed, the rewritten path goes upstream even if it starts like an admin path.
    assert allowed["match"] == {"prefix": "/", "headers": [{"name": CLUSTER_HEADER, "present_match": True}]}
    # Gemini's /v1/models/{model}:generateContent is a model call, not the admin API's /v1/models/.
    assert gemini_v1["match"] == {"safe_regex": {"regex": envoy_config.GEMINI_V1_CALL}}
    assert allowed["route"] == gemini_v1["route"] == llm["route"]
    assert llm["match"] == {"prefix": "/"}
    assert llm["route"]["cluster_header"] == CLUSTER_HEADER
    assert llm["route"]["auto_host_rewrite"] is False
    assert int(llm["route"]["timeout"].rstrip("s")) >= 300
    assert "typed_per_filter_config" not in llm  # ext_authz stays on for every LLM call
    # Internal headers are not forwarded to the provider.
    assert set(llm["request_headers_to_remove"]) == set(INTERNAL_HEADERS)
    # A request with no key header at all is answered by Envoy: no body buffered, no check.
    assert no_key["direct_response"]["status"] == 401
    assert {h["name"] for h in no_key["match"]["headers"]} == set(providers.CLIENT_KEY_HEADERS)
    assert all(h["invert_match"] and h["present_match"] for h in no_key["match"]["headers"])
    assert json.loads(no_key["direct_response"]["body"]["inline_string"])["error"]["code"] == "missing_api_key"


def test_client_headers_are_sanitized_before_routing(example: dict[str, Any]) -> None:
    manager = hcm(example)
    assert manager["common_http_protocol_options"] == {"headers_with_underscores_action": "DROP_HEADER"}
    (early,) = manager["early_header_mutation_extensions"]
    assert [m["remove"] for m in early["typed_config"]["mutations"]] == list(INTERNAL_HEADERS + ACTING_HEADERS)


def test_sidecar_clusters(example: dict[str, Any]) -> None:
    settings = load(EXAMPLE).settings
    by_name = clusters(example)
    authz, admin = by_name["extauthz"], by_name["extauthz_admin"]
    assert endpoint(authz) == (settings.grpc_host, settings.grpc_port)
    assert endpoint(admin) == (settings.admin_host, settings.admin_port)
    options = authz["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert "typed_extension_protocol_options" not in admin  # plain HTTP/1.1
    assert example["admin"]["address"]["socket_address"] == {"address": "127.0.0.1",
                                                             "port_value": load(EXAMPLE).envoy.envoy_admin_port}
    (listener,) = example["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": load(EXAMPLE).envoy.listen_port}


def test_one_cluster_per_upstream(example: dict[str, Any]) -> None:
    config = load(EXAMPLE)
    static = ("extauthz", "extauthz_admin", *DYNAMIC_CLUSTERS.values())
    upstream_names = [n for n in clusters(example) if n not in static]
    expected = {providers.upstream(d.api_base).cluster for d in config.deployments}
    assert len(upstream_names) == len(set(upstream_names)) == len(expected)
    assert set(upstream_names) == expected
    for name in upstream_names:
        assert "transport_socket" not in clusters(example)[name]  # the example's upstream is plain HTTP


def test_hosts_the_config_does_not_name_go_through_a_dynamic_cluster_checked_as_the_static_ones(
        example: dict[str, Any]) -> None:
    """A runtime model's new host: a sub cluster per host and port (its own connections and
    circuit breakers), TLS with the host as SNI and checked against the certificate."""
    by_name = clusters(example)
    for scheme, name in DYNAMIC_CLUSTERS.items():
        cluster = by_name[name]
        assert cluster["lb_policy"] == "CLUSTER_PROVIDED"
        kind = cluster["cluster_type"]
        assert kind["name"] == "envoy.clusters.dynamic_forward_proxy"
        assert set(kind["typed_config"]) == {"@type", "sub_clusters_config"}   # no shared DNS cache
        assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] > 0
        if scheme == "http":
            assert "transport_socket" not in cluster
            continue
        tls = cluster["transport_socket"]["typed_config"]
        assert tls["common_tls_context"]["validation_context"]["trusted_ca"] == {
            "filename": "/etc/ssl/certs/ca-certificates.crt"}
        (options,) = cluster["typed_extension_protocol_options"].values()
        assert options["upstream_http_protocol_options"] == {"auto_sni": True, "auto_san_validation": True}


def test_https_upstreams_get_tls_with_sni(https: tuple[Config, dict[str, Any]]) -> None:
    _, bootstrap = https
    by_name = clusters(bootstrap)
    # Two deployments share api.openai.com (one through the provider's default base).
    assert set(by_name) == {"extauthz", "extauthz_admin", "upstream_https_api_openai_com_443",
                            "upstream_https_x_openai_azure_com_443", "upstream_http_llm_internal_8000",
                            *DYNAMIC_CLUSTERS.values()}
    for host in ("api.openai.com", "x.openai.azure.com"):
        cluster = by_name[f"upstream_https_{host.replace('.', '_')}_443"]
        assert endpoint(cluster) == (host, 443)
        assert cluster["type"] in ("STRICT_DNS", "LOGICAL_DNS")
        assert cluster["dns_lookup_family"] == "V4_PREFERRED"
        socket = cluster["transport_socket"]
        assert socket["name"] == "envoy.transport_sockets.tls"
        tls = socket["typed_config"]
        assert tls["@type"].endswith("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext")
        assert tls["sni"] == host
        validation = tls["common_tls_context"]["validation_context"]
        assert validation["trusted_ca"] == {"filename": "/etc/ssl/certs/ca-certificates.crt"}
        assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": host}}]
    plain = by_name["upstream_http_llm_internal_8000"]
    assert endpoint(plain) == ("llm.internal", 8000)
    assert "transport_socket" not in plain


def test_overrides_are_honoured(https: tuple[Config, dict[str, Any]]) -> None:
    config, _ = https
    bootstrap = yaml.safe_load(envoy_config.render_yaml(
        config, listen_port=8080, authz_port=9100, admin_port=9200, envoy_admin_port=9300,
        authz_host="authz.internal", admin_host="10.1.2.3"))
    (listener,) = bootstrap["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == 8080
    assert bootstrap["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9300}
    by_name = clusters(bootstrap)
    assert endpoint(by_name["extauthz"]) == ("authz.internal", 9100)
    assert by_name["extauthz"]["type"] == "STRICT_DNS"
    assert endpoint(by_name["extauthz_admin"]) == ("10.1.2.3", 9200)
    assert by_name["extauthz_admin"]["type"] == "STATIC"


def test_settings_are_the_defaults_for_ports(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    settings = "extauthz_settings: {grpc_host: localhost, grpc_port: 9555, envoy_admin_port: 19901}\n"
    path.write_text(HTTPS_CONFIG + settings)
    bootstrap = envoy_config.render(load(path))
    assert bootstrap["admin"]["address"]["socket_address"]["port_value"] == 19901
    assert endpoint(clusters(bootstrap)["extauthz"]) == ("localhost", 9555)


def test_workers_get_enough_connections(example: dict[str, Any], tmp_path: Path) -> None:
    """Envoy balances per connection: with N sidecar workers it must open several."""
    config = load(EXAMPLE)
    config = dataclasses.replace(config, settings=dataclasses.replace(config.settings, workers=3))
    bootstrap = envoy_config.render(config)
    (locality,) = clusters(bootstrap)["extauthz"]["load_assignment"]["endpoints"]
    assert len(locality["lb_endpoints"]) == 12
    assert {endpoint({"load_assignment": {"endpoints": [{"lb_endpoints": [e]}]}}) for e in locality["lb_endpoints"]} \
        == {(config.settings.grpc_host, config.settings.grpc_port)}
    validate(envoy_config.render_yaml(config), tmp_path)
    (single,) = clusters(example)["extauthz"]["load_assignment"]["endpoints"]
    assert len(single["lb_endpoints"]) == 1


def test_long_streams_and_large_bodies_have_room_and_a_ceiling(tmp_path: Path) -> None:
    """Per provider, room for many long streams at once (Envoy's default is 1,024
    requests); with envoy_max_heap_bytes, Envoy gives memory back, then refuses new
    requests (503) before it outgrows its container."""
    config = load(EXAMPLE)
    bootstrap = envoy_config.render(config)
    for name, cluster in clusters(bootstrap).items():
        if name.startswith("upstream_"):
            (limits,) = cluster["circuit_breakers"]["thresholds"]
            assert limits["max_requests"] >= 10_000 and limits["max_connections"] >= 10_000, name
    assert "actions" not in bootstrap["overload_manager"]  # no heap limit given: none guessed
    capped = dataclasses.replace(config, envoy=dataclasses.replace(config.envoy, envoy_max_heap_bytes=2**30))
    bounded = envoy_config.render(capped)
    monitors = {m["name"]: m for m in bounded["overload_manager"]["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["typed_config"]["max_heap_size_bytes"] == 2**30
    actions = {a["name"]: a["triggers"][0]["threshold"]["value"] for a in bounded["overload_manager"]["actions"]}
    assert actions == {"envoy.overload_actions.shrink_heap": 0.90, "envoy.overload_actions.stop_accepting_requests": 0.95}
    validate(yaml.safe_dump(bounded), tmp_path)
