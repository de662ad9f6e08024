"""The Envoy Gateway path as shipped (deploy/envoy-gateway): an outage answered 503, and
each provider's route setting the provider's host itself, so that the route recomputed
after the check still matches the Gateway's listener and the route's hostnames."""

from __future__ import annotations

from pathlib import Path

from extauthz.domain.envoy_names import CLUSTER_HEADER
from tests.test_istio import docs, upstream_clusters

EG = Path(__file__).resolve().parent.parent / "deploy" / "envoy-gateway"


def test_an_outage_is_a_503_and_nothing_passes_unchecked() -> None:
    (policy,) = docs(EG / "security-policy.yaml")
    ext = policy["spec"]["extAuth"]
    assert ext["statusOnError"] == 503 and ext["failOpen"] is False and ext["recomputeRoute"] is True


def test_every_provider_route_sets_the_providers_host() -> None:
    (route,) = [d for d in docs(EG / "httproute.yaml") if d["metadata"]["name"] == "llm"]
    clusters = upstream_clusters()
    by_cluster = {}
    for rule in route["spec"]["rules"]:
        headers = rule["matches"][0].get("headers", [])
        if headers:
            (match,) = headers
            assert match["name"] == CLUSTER_HEADER and match["type"] == "Exact"
            by_cluster[match["value"]] = rule
        else:
            assert "backendRefs" not in rule  # the catch-all: nothing unchecked leaves the gateway
    assert set(by_cluster) == set(clusters)
    for cluster, host in clusters.items():
        rewrites = [f["urlRewrite"] for f in by_cluster[cluster]["filters"] if f["type"] == "URLRewrite"]
        assert rewrites == [{"hostname": host}], cluster


def test_check_config_names_the_calls_a_proxy_without_body_rewrite_refuses() -> None:
    import subprocess
    import sys
    root = EG.parent.parent
    env = {"PATH": "/usr/bin:/bin", "EXTAUTHZ_BODY_REWRITE": "false", "MASTER_KEY": "x", "OPENAI_API_KEY": "x",
           "AZURE_API_KEY": "x", "ANTHROPIC_API_KEY": "x"}
    out = subprocess.run([sys.executable, "-m", "extauthz", "check-config", "--config", "examples/config.yaml"],
                         capture_output=True, text=True, cwd=root, env=env, timeout=60).stdout
    (line,) = [x for x in out.splitlines() if "body_rewrite is off" in x]
    assert "openai/*" in line and "model_rewrite_unavailable" in line and "gpt-3.5-turbo," not in line
    shipped = subprocess.run([sys.executable, "-m", "extauthz", "check-config", "--config",
                              "deploy/kubernetes/base/config.yaml"], capture_output=True, text=True, cwd=root,
                             env=env, timeout=60).stdout
    assert "body_rewrite is off" not in shipped  # its model names are the providers': nothing refused
