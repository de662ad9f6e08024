"""Istio, Envoy Gateway and Gateway API objects under deploy/ against the published
schemas of their kinds, vendored in tests/crds/ (tests/crds/README.md says from where and
how to refresh them), with the API server's structural-schema semantics
(tests/crd_schema.py): an unknown field, a wrong type, a value out of an enum or a pattern
and a missing required field are refused, as a cluster with those CRDs would refuse
``kubectl apply``. Every such object is checked, written as a file and as ``kubectl
kustomize`` renders it; a kind with no vendored schema fails.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from tests import crd_schema
from tests.test_deploy import DEPLOY, KUSTOMIZE_DIRS, REPO, describe, kustomize, load_docs

def governed_docs() -> list[tuple[str, dict[str, Any]]]:
    """(where, object) for every Istio, Envoy Gateway and Gateway API object, from the
    files and from the kustomize output of the directories that have a kustomization."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(load_docs(path)):
            if isinstance(doc, dict) and crd_schema.governed(str(doc.get("apiVersion", ""))):
                found.append((f"{path.relative_to(DEPLOY)}#{i} {doc['kind']}/{doc['metadata']['name']}", doc))
    return found


def kustomize_dirs_with_custom_resources() -> list[str]:
    return sorted(name for name, directory in KUSTOMIZE_DIRS.items()
                  if any(crd_schema.governed(str(d.get("apiVersion", ""))) for p in directory.glob("*.yaml")
                         if p.name != "kustomization.yaml" for d in load_docs(p) if isinstance(d, dict)))


DOCS = governed_docs()


def assert_valid(doc: dict[str, Any], where: str) -> None:
    try:
        problems = crd_schema.problems(doc)
    except crd_schema.NoSchema as e:
        pytest.fail(f"{where}: {e}", pytrace=False)
    assert not problems, f"{where}: {describe(doc)} would be refused by the API server:\n" + "\n".join(problems)


def test_deploy_has_objects_of_each_vendored_family() -> None:
    """The validation below has something to validate: the manifests hold Istio, Envoy
    Gateway and Gateway API objects, and the kustomize output too."""
    groups = {doc["apiVersion"].rpartition("/")[0] for _, doc in DOCS}
    assert {"gateway.envoyproxy.io", "gateway.networking.k8s.io"} <= groups, groups
    assert any(g.endswith(".istio.io") for g in groups), groups
    assert "envoy-gateway" in kustomize_dirs_with_custom_resources()


@pytest.mark.parametrize("where,doc", [pytest.param(w, d, id=w) for w, d in DOCS])
def test_manifest_matches_the_published_schema(where: str, doc: dict[str, Any]) -> None:
    assert_valid(doc, where)


@pytest.mark.parametrize("name", kustomize_dirs_with_custom_resources())
def test_kustomize_output_matches_the_published_schema(name: str) -> None:
    docs = [d for d in kustomize(KUSTOMIZE_DIRS[name]) if crd_schema.governed(d["apiVersion"])]
    assert docs, f"kubectl kustomize {name} rendered no custom resource"
    for doc in docs:
        assert_valid(doc, f"kubectl kustomize {name}: {describe(doc)}")


# -- the validator refuses what the API server refuses ----------------------------------------

def first(kind: str) -> dict[str, Any]:
    """A copy of the first object of ``kind`` under deploy/, to break."""
    found = [d for _, d in DOCS if d["kind"] == kind]
    assert found, f"no {kind} under deploy/"
    return copy.deepcopy(found[0])


def refused(doc: dict[str, Any]) -> str:
    problems = crd_schema.problems(doc)
    assert problems, f"{describe(doc)} was accepted"
    return "\n".join(problems)


def test_an_unknown_field_is_refused() -> None:
    policy = first("SecurityPolicy")
    policy["spec"]["extAuth"]["failopen"] = False  # a misspelt failOpen: the API server drops or refuses it
    assert "spec.extAuth: Additional properties are not allowed ('failopen' was unexpected)" in refused(policy)
    route = first("HTTPRoute")
    route["spec"]["rules"][0].setdefault("timeouts", {})["idle"] = "60s"  # not a Gateway API route timeout
    assert "spec.rules[0].timeouts: Additional properties are not allowed ('idle'" in refused(route)
    operator = first("IstioOperator")
    provider = operator["spec"]["meshConfig"]["extensionProviders"][0]
    provider["envoyExtAuthzGrpc"]["includeRequestBodyInCheck"]["packAsByte"] = True
    assert "includeRequestBodyInCheck: Additional properties are not allowed ('packAsByte'" in refused(operator)
    policy = first("AuthorizationPolicy")
    policy["spec"]["rules"][0]["to"][0]["operation"]["notPath"] = ["/audit"]
    assert "operation: Additional properties are not allowed ('notPath'" in refused(policy)
    entry = first("ServiceEntry")
    entry["status"] = {}
    assert "Additional properties are not allowed ('status'" in refused(entry)


def test_a_wrong_type_or_value_is_refused() -> None:
    policy = first("SecurityPolicy")
    policy["spec"]["extAuth"]["failOpen"] = "false"
    assert "spec.extAuth.failOpen: 'false' is not of type 'boolean'" in refused(policy)
    policy = first("SecurityPolicy")
    policy["spec"]["extAuth"]["timeout"] = "1 s"
    assert "spec.extAuth.timeout: '1 s' does not match" in refused(policy)
    operator = first("IstioOperator")
    grpc = operator["spec"]["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]
    grpc["timeout"] = "1000ms"  # a protobuf Duration is in seconds
    assert "envoyExtAuthzGrpc.timeout: '1000ms' does not match" in refused(operator)
    operator = first("IstioOperator")
    operator["spec"]["meshConfig"]["extensionProviders"][0]["envoyExtAuthzHttp"] = {"service": "x", "port": 1}
    assert "only one of ['envoyExtAuthzHttp', 'envoyExtAuthzGrpc'] may be set" in refused(operator)
    policy = first("AuthorizationPolicy")
    policy["spec"]["action"] = "custom"
    assert "spec.action: 'custom' is not one of" in refused(policy)
    backend = first("Backend")
    backend["spec"]["endpoints"][0]["fqdn"]["port"] = "443"
    assert "spec.endpoints[0].fqdn.port: '443' is not of type 'integer'" in refused(backend)


def test_a_missing_required_field_is_refused() -> None:
    policy = first("SecurityPolicy")
    del policy["spec"]["extAuth"]["grpc"]["backendRefs"][0]["name"]
    assert "spec.extAuth.grpc.backendRefs[0]: 'name' is a required property" in refused(policy)
    tls = first("BackendTLSPolicy")
    del tls["spec"]["validation"]["hostname"]
    assert "spec.validation: 'hostname' is a required property" in refused(tls)


def test_a_kind_or_version_without_a_vendored_schema_fails() -> None:
    policy = first("SecurityPolicy")
    policy["apiVersion"] = "gateway.envoyproxy.io/v1"
    with pytest.raises(crd_schema.NoSchema, match="SecurityPolicy-v1alpha1.json"):
        crd_schema.problems(policy)
    with pytest.raises(crd_schema.NoSchema):
        crd_schema.problems({"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry", "metadata": {"name": "x"}})
    assert not crd_schema.governed("apps/v1") and crd_schema.governed("extensions.istio.io/v1alpha1")


def test_security_policy_ext_auth_takes_status_on_error() -> None:
    """Envoy Gateway 1.8 added extAuth.statusOnError (the status sent when extauthz cannot
    be reached); the vendored schema has it, with its enum of 4xx and 5xx codes."""
    policy = first("SecurityPolicy")
    policy["spec"]["extAuth"]["statusOnError"] = 503
    assert crd_schema.problems(policy) == []
    policy["spec"]["extAuth"]["statusOnError"] = 200
    assert "spec.extAuth.statusOnError: 200 is not one of" in refused(policy)


def test_int_or_string_nullable_and_list_types() -> None:
    """The Kubernetes extensions that JSON Schema lacks."""
    validator = crd_schema.validator({"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True},
        "name": {"type": "string", "nullable": True},
        "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
        "rules": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                  "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "closed": {"type": "object"},
    }})
    assert not list(validator.iter_errors({"port": 80, "name": None, "free": {"any": 1}, "rules": [{"name": "a"}]}))
    assert not list(validator.iter_errors({"port": "http"}))
    bad = {"port": 1.5, "tags": ["a", "a"], "rules": [{"name": "a"}, {"name": "a"}], "closed": {"x": 1}}
    messages = sorted(e.message for e in validator.iter_errors(bad))
    assert len(messages) == 4, messages
    assert any("non-unique" in m for m in messages) and any("duplicate entry" in m for m in messages)


def test_cel_rules_are_listed_not_evaluated() -> None:
    """CEL rules are not evaluated offline: the helper lists them (a cluster checks them)."""
    schema = json.loads((crd_schema.CRDS / "gateway.envoyproxy.io" / "SecurityPolicy-v1alpha1.json").read_text())
    rules = crd_schema.cel_rules(schema)
    assert any(path.startswith("spec.extAuth") for path, _ in rules), rules[:5]


def test_vendored_schemas_are_listed_in_the_readme() -> None:
    readme = (crd_schema.CRDS / "README.md").read_text()
    sources = json.loads((crd_schema.CRDS / "sources.json").read_text())
    files = {str(p.relative_to(crd_schema.CRDS)) for p in crd_schema.CRDS.rglob("*.json")} - {"sources.json"}
    assert files == set(sources), "re-run tools/vendor_crds.py: sources.json does not list what is vendored"
    for entry in sources.values():
        assert entry["commit"].split(" + ")[0] in readme, f"{entry['repo']} {entry['commit']} is not in the README"
    assert "tools/vendor_crds.py" in readme and (REPO / "tools" / "vendor_crds.py").is_file()
