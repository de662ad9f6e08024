"""The Istio path as shipped (deploy/istio): the policy scoped to the LLM host, the routes
for every provider the config names, the model splice as an EnvoyFilter that runs on a
real Envoy the way istio-proxy would run it (after ext_authz, on every request of the
gateway), and the extension providers merged into a mesh config without losing others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from extauthz.domain.envoy_names import CLUSTER_HEADER, INTERNAL_HEADERS
from extauthz.envoy import istio
from extauthz.envoy.render import SPLICE_FILTER
from tests.harness import BIN, MASTER_KEY, Envoy, Proc, Sidecar, http, http_ok, listener_port, ready_file, render_envoy

ROOT = Path(__file__).resolve().parent.parent
ISTIO = ROOT / "deploy" / "istio"
SIDECAR_ENVOY = ROOT / "deploy" / "kubernetes" / "overlays" / "sidecar" / "envoy.yaml"


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def upstream_clusters() -> dict[str, str]:
    """The provider clusters the rendered config for deploy/kubernetes/base/config.yaml
    routes to: name -> host."""
    bootstrap = yaml.safe_load(SIDECAR_ENVOY.read_text())
    found = {}
    for cluster in bootstrap["static_resources"]["clusters"]:
        if cluster["name"].startswith("upstream_"):
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            found[cluster["name"]] = endpoint["address"]["socket_address"]["address"]
    return found


# -- the manifests ------------------------------------------------------------------------

def test_the_gateway_policy_checks_the_llm_host_only() -> None:
    """A shared ingress gateway carries other applications: a policy without hosts would
    send all their traffic to extauthz (404 unsupported_endpoint)."""
    (policy,) = docs(ISTIO / "authorization-policy.yaml")
    assert policy["spec"]["action"] == "CUSTOM" and "selector" in policy["spec"]
    for rule in policy["spec"]["rules"]:
        for to in rule["to"]:
            assert to["operation"]["hosts"] == ["llm.example.com", "llm.example.com:*"]
    (gateway_api,) = docs(ISTIO / "authorization-policy-gateway-api.yaml")
    assert "selector" not in gateway_api["spec"]
    assert gateway_api["spec"]["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                                  "name": "llm"}]
    assert gateway_api["spec"]["rules"] == [{"to": [{"operation": {
        "notPaths": policy["spec"]["rules"][0]["to"][0]["operation"]["notPaths"]}}]}]


def test_every_provider_of_the_config_has_its_route_service_entry_and_tls_origination() -> None:
    found = docs(ISTIO / "routing.yaml")
    (service,) = [d for d in found if d["kind"] == "VirtualService"]
    (gateway,) = [d for d in found if d["kind"] == "Gateway"]
    assert service["spec"]["gateways"] == [gateway["metadata"]["name"]]
    assert service["spec"]["hosts"] == gateway["spec"]["servers"][0]["hosts"] == ["llm.example.com"]
    routes = service["spec"]["http"]
    assert routes[-1]["directResponse"]["status"] == 503 and "match" not in routes[-1]  # nothing unchecked leaves
    by_cluster = {r["match"][0]["headers"][CLUSTER_HEADER]["exact"]: r for r in routes
                  if "headers" in r.get("match", [{}])[0]}
    clusters = upstream_clusters()
    assert set(by_cluster) == set(clusters)
    entries = {d["spec"]["hosts"][0]: d for d in found if d["kind"] == "ServiceEntry"}
    rules = {d["spec"]["host"]: d for d in found if d["kind"] == "DestinationRule"}
    for cluster, host in clusters.items():
        route = by_cluster[cluster]
        assert route["rewrite"]["authority"] == host  # extauthz leaves :authority alone in this mode
        assert set(route["headers"]["request"]["remove"]) == set(INTERNAL_HEADERS)
        (destination,) = route["route"]
        port = destination["destination"]["port"]["number"]
        assert destination["destination"]["host"] == host
        (entry_port,) = entries[host]["spec"]["ports"]
        assert entry_port["number"] == port and entry_port["protocol"] == "HTTP" and entry_port["targetPort"] == 443
        (tls,) = rules[host]["spec"]["trafficPolicy"]["portLevelSettings"]
        assert tls["port"]["number"] == port and tls["tls"] == {"mode": "SIMPLE", "sni": host}
    admin = routes[0]
    assert admin["route"][0]["destination"]["port"]["number"] == 4001
    assert {"uri": {"prefix": "/key/"}} in admin["match"] and {"uri": {"exact": "/audit"}} in admin["match"]


def test_the_policy_checks_every_host_the_routes_send_to_providers() -> None:
    """A host the VirtualService serves but the policy does not name would reach the
    providers' routes unchecked (their header match alone is a client's to send)."""
    (policy,) = docs(ISTIO / "authorization-policy.yaml")
    (service,) = [d for d in docs(ISTIO / "routing.yaml") if d["kind"] == "VirtualService"]
    checked = set(policy["spec"]["rules"][0]["to"][0]["operation"]["hosts"])
    assert checked == {h for host in service["spec"]["hosts"] for h in (host, f"{host}:*")}


@pytest.mark.parametrize("given,flags,why", [
    ("apiVersion: v1\nkind: ConfigMap\ndata: {mesh: ''}\n", (), "not a mesh config"),
    ("meshConfig: {}\n", (), "--format helm"),
    ("kind: ConfigMap\n", ("--format", "istiooperator"), "not an IstioOperator"),
    ("meshConfig: {}\n", ("--format", "helm", "--configmap-patch"), "takes --format mesh"),
])
def test_a_document_of_another_kind_is_refused_not_merged_where_it_would_be_ignored(
        given: str, flags: tuple[str, ...], why: str) -> None:
    refused = merge(given, *flags)
    assert refused.returncode == 2 and why in refused.stderr and refused.stdout == "", refused.stderr


def test_the_providers_choose_the_route_after_the_check_and_fail_closed() -> None:
    (operator,) = docs(ISTIO / "mesh-config.yaml")
    for provider in operator["spec"]["meshConfig"]["extensionProviders"]:
        grpc = provider["envoyExtAuthzGrpc"]
        assert grpc["clearRouteCache"] is True and grpc["failOpen"] is False and grpc["statusOnError"] == "503"
    standalone = (ROOT / "deploy" / "kubernetes" / "overlays" / "standalone" / "deployment.yaml").read_text()
    assert "EXTAUTHZ_UPSTREAM_AUTHORITY" in standalone


def test_the_shipped_envoyfilter_is_the_one_rendered_from_splice_lua() -> None:
    shipped = yaml.safe_load((ISTIO / "splice-envoyfilter.yaml").read_text())
    assert shipped == istio.splice_envoy_filter()
    made = subprocess.run([sys.executable, "-m", "extauthz", "istio-envoyfilter"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert made.returncode == 0 and yaml.safe_load(made.stdout) == shipped


# -- the splice on a gateway, with a real Envoy -------------------------------------------

def gateway_envoy(workdir: Path, config: Path, sidecar: Sidecar, lua: dict[str, Any]) -> Envoy:
    """The rendered Envoy, but with its splice filter replaced by ``lua`` and running on
    every route, as an EnvoyFilter makes it run on an Istio gateway."""
    name = ready_file(workdir, "istio-envoy").stem
    bootstrap = yaml.safe_load(render_envoy(config, workdir / f"{name}.rendered.yaml", 0, sidecar, 0).read_text())
    manager = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (splice,) = [f for f in manager["http_filters"]
                 if f["name"] == SPLICE_FILTER and "x-extauthz-splice" in json.dumps(f)]
    splice["typed_config"] = lua
    for host in manager["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            route.get("typed_per_filter_config", {}).pop(SPLICE_FILTER, None)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    admin_file = workdir / f"{name}.admin"
    proc = Proc("envoy", [str(BIN / "envoy"), "-c", str(path), "--disable-hot-restart", "--log-level", "warn",
                          "--admin-address-path", str(admin_file)], workdir / f"{name}.log").start()
    proc.wait_ready(lambda: admin_file.exists() and admin_file.read_text().strip() != "")
    admin_port = int(admin_file.read_text().strip().rsplit(":", 1)[1])
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin_port}/ready"))
    return Envoy(proc, listener_port(admin_port, "ingress"), admin_port, path)


@pytest.fixture(scope="module")
def istio_lua() -> dict[str, Any]:
    patch = istio.splice_envoy_filter()["spec"]["configPatches"][0]["patch"]["value"]
    return patch["typed_config"]


@pytest.fixture(scope="module")
def gated(workdir: Path, config_path: Path, sidecar: Sidecar, istio_lua: dict[str, Any]) -> Iterator[Envoy]:
    envoy = gateway_envoy(workdir, config_path, sidecar, istio_lua)
    yield envoy
    envoy.proc.stop()


def test_on_a_gateway_the_splice_rewrites_only_the_model_of_allowed_calls(
        gated: Envoy, sidecar: Sidecar, upstream_port: int) -> None:
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    key = http("POST", sidecar.admin + "/key/generate", {"models": ["openai/gpt-4"]}, headers).json()["key"]
    http("DELETE", f"http://127.0.0.1:{upstream_port}/__fake/requests")
    raw = b'{"model": "openai/gpt-4", "messages": [{"role": "user", "content": "hi"}], "n": 100000000000000000001}'
    r = http("POST", gated.url + "/v1/chat/completions", raw=raw,
             headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status == 200, r.text
    (seen,) = http("GET", f"http://127.0.0.1:{upstream_port}/__fake/requests").json()
    sent = seen["body"] if isinstance(seen["body"], str) else json.dumps(seen["body"])
    assert sent == raw.decode().replace('"openai/gpt-4"', '"gpt-4"')  # the model's bytes only
    # A request extauthz did not check (the admin API's, another host's) passes untouched.
    assert http("GET", gated.url + "/health/liveliness").status == 200
    assert http("GET", gated.url + "/v1/models", headers=headers).status == 200


def test_without_the_gate_the_splice_would_refuse_every_unchecked_request(
        workdir: Path, config_path: Path, sidecar: Sidecar) -> None:
    """The control: splice.lua as the rendered config runs it refuses a request with no
    plan, which on a gateway is every request extauthz did not check."""
    plain = {"@type": istio.LUA, "default_source_code": {"inline_string": (
        ROOT / "extauthz" / "envoy" / "splice.lua").read_text()}}
    envoy = gateway_envoy(workdir, config_path, sidecar, plain)
    try:
        refused = http("GET", envoy.url + "/health/liveliness")
        assert refused.status == 500 and "body_rewrite_failed" in refused.text
    finally:
        envoy.proc.stop()


# -- merging the providers into a mesh config ---------------------------------------------

MESH = """\
defaultProviders:
  tracing: [zipkin]
extensionProviders:
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
- name: extauthz
  envoyExtAuthzGrpc: {service: an-old-one, port: 1}
- name: oauth2-proxy
  envoyExtAuthzHttp: {service: oauth2-proxy.auth.svc.cluster.local, port: 4180}
"""


def merge(text: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extauthz", "istio-mesh-config", "--providers",
                           str(ISTIO / "mesh-config.yaml"), *flags], input=text, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_merging_keeps_every_other_provider_and_replaces_extauthzs() -> None:
    ours = docs(ISTIO / "mesh-config.yaml")[0]["spec"]["meshConfig"]["extensionProviders"]
    merged = merge(MESH)
    assert merged.returncode == 0, merged.stderr
    mesh = yaml.safe_load(merged.stdout)
    assert [p["name"] for p in mesh["extensionProviders"]] == ["zipkin", "extauthz", "oauth2-proxy",
                                                               "extauthz-local"]
    assert mesh["extensionProviders"][1] == ours[0] and mesh["extensionProviders"][3] == ours[1]
    assert mesh["defaultProviders"] == {"tracing": ["zipkin"]}
    again = merge(merged.stdout)
    assert yaml.safe_load(again.stdout) == mesh  # idempotent
    # Helm values of istiod: the list under meshConfig, created where the values have none
    # (a list at the top would be ignored by the chart).
    nested = "meshConfig:\n" + "".join(f"  {line}\n" for line in MESH.splitlines())
    values = yaml.safe_load(merge(nested, "--format", "helm").stdout)
    assert [p["name"] for p in values["meshConfig"]["extensionProviders"]][:3] == ["zipkin", "extauthz",
                                                                                  "oauth2-proxy"]
    bare = yaml.safe_load(merge("global: {hub: docker.io/istio}\n", "--format", "helm").stdout)
    assert bare["global"] == {"hub": "docker.io/istio"}
    assert [p["name"] for p in bare["meshConfig"]["extensionProviders"]] == ["extauthz", "extauthz-local"]
    operator = yaml.safe_load(merge("apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec: {}\n",
                                    "--format", "istiooperator").stdout)
    assert [p["name"] for p in operator["spec"]["meshConfig"]["extensionProviders"]] == ["extauthz", "extauthz-local"]


def test_the_configmap_patch_sets_only_the_mesh_key() -> None:
    patched = merge(MESH, "--configmap-patch")
    assert patched.returncode == 0, patched.stderr
    patch = json.loads(patched.stdout)
    assert list(patch) == ["data"] and list(patch["data"]) == ["mesh"]
    assert [p["name"] for p in yaml.safe_load(patch["data"]["mesh"])["extensionProviders"]][0] == "zipkin"


@pytest.mark.parametrize("given", ["extensionProviders: {a: 1}\n", "extensionProviders: [{port: 1}]\n", "- 1\n",
                                   "meshConfig: 5\n"])
def test_a_mesh_config_that_is_not_one_is_refused_not_overwritten(given: str) -> None:
    refused = merge(given)
    assert refused.returncode == 2 and "cannot merge the mesh config" in refused.stderr and refused.stdout == ""
