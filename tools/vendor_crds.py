"""Regenerate tests/crds/ from local checkouts of the projects that publish the CRDs.

    python tools/vendor_crds.py \\
        --gateway-api ../gateway-api@v1.4.1 \\
        --envoy-gateway ../gateway@v1.9.0 \\
        --istio ../istio@1.30.3 \\
        --istio-api ../api@1.30.3

Each argument is a git checkout, optionally followed by @<tag or commit>: with a ref the
files are read with ``git show <ref>:<path>`` (the work tree is not touched), without one
from the work tree as it is. Only the kinds listed below are kept; of each served version
only the openAPIV3Schema, without descriptions and without ``status`` (a manifest has no
business setting it), is written as compact JSON to
tests/crds/<group>[/<channel>]/<Kind>-<version>.json, and tests/crds/sources.json records
where every file came from. The tests read these files only; nothing is fetched while they
run.

IstioOperator has had no CRD schema since Istio 1.24 (istioctl reads it): its spec's field
names are taken from operator/pkg/apis/types.go (istio/istio), and its meshConfig is
checked the way istiod and istioctl read it, as a strict protobuf JSON of
istio.mesh.v1alpha1.MeshConfig: a schema derived from mesh/v1alpha1/config.proto
(istio/api, compiled with grpc_tools' protoc) is written to
tests/crds/install.istio.io/IstioOperator-v1alpha1.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import tempfile

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "crds"

GATEWAY_API_KINDS = {"HTTPRoute", "GRPCRoute", "Gateway", "BackendTLSPolicy", "ReferenceGrant"}
GATEWAY_API_FILES = {
    channel: [f"config/crd/{channel}/gateway.networking.k8s.io_{name}.yaml"
              for name in ("httproutes", "grpcroutes", "gateways", "backendtlspolicies", "referencegrants")]
    for channel in ("standard", "experimental")
}
ENVOY_GATEWAY_KINDS = {"SecurityPolicy", "Backend", "BackendTrafficPolicy", "ClientTrafficPolicy"}
# The chart's CRD directory moved in v1.8.
ENVOY_GATEWAY_DIRS = ("charts/gateway-helm/charts/crds/crds/generated", "charts/gateway-helm/crds/generated")
ENVOY_GATEWAY_FILES = ("securitypolicies", "backends", "backendtrafficpolicies", "clienttrafficpolicies")
ISTIO_KINDS = {"AuthorizationPolicy", "PeerAuthentication", "ServiceEntry", "DestinationRule", "VirtualService",
               "EnvoyFilter", "Gateway", "Sidecar"}
ISTIO_FILE = "manifests/charts/base/files/crd-all.gen.yaml"
PROMETHEUS_OPERATOR_KINDS = {"PodMonitor": "podmonitors", "ServiceMonitor": "servicemonitors",
                             "PrometheusRule": "prometheusrules"}
PROMETHEUS_OPERATOR_DIR = "example/prometheus-operator-crd"
# Validation needs none of these.
DROP = {"description", "example", "externalDocs"}
# Values, not schemas: kept as they are.
LITERAL = {"default", "enum", "required", "x-kubernetes-validations", "x-kubernetes-list-map-keys"}


class Source:
    def __init__(self, spec: str) -> None:
        path, _, ref = spec.partition("@")
        self.path = Path(path)
        self.ref = ref or None

    def read(self, file: str) -> str | None:
        if self.ref is None:
            p = self.path / file
            return p.read_text(encoding="utf-8") if p.is_file() else None
        result = subprocess.run(["git", "-C", str(self.path), "show", f"{self.ref}:{file}"],
                                capture_output=True, text=True)
        return result.stdout if result.returncode == 0 else None

    def commit(self) -> str:
        result = subprocess.run(["git", "-C", str(self.path), "rev-parse", f"{self.ref or 'HEAD'}^{{commit}}"],
                                capture_output=True, text=True, check=True)
        return result.stdout.strip()


def strip(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key in DROP and not isinstance(value, dict):
                continue
            if key in LITERAL:
                out[key] = value
            elif key == "properties":
                out[key] = {k: strip(v) for k, v in value.items()}  # a property may be called "description"
            else:
                out[key] = strip(value)
        return out
    if isinstance(schema, list):
        return [strip(v) for v in schema]
    return schema


def crds(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"]


def write(crd: dict[str, Any], directory: Path, source: dict[str, str], index: dict[str, Any]) -> None:
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue
        schema = strip(version["schema"]["openAPIV3Schema"])
        schema.get("properties", {}).pop("status", None)
        target = directory / f"{kind}-{version['name']}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n", encoding="utf-8")
        index[str(target.relative_to(OUT))] = {**source, "group": group, "kind": kind, "version": version["name"],
                                               "bytes": target.stat().st_size}
        print(f"{target.relative_to(OUT)}: {target.stat().st_size} bytes", file=sys.stderr)


ISTIO_OPERATOR_TYPES = "operator/pkg/apis/types.go"
MESH_PROTO = "mesh/v1alpha1/config.proto"


def istio_operator_fields(go: str) -> list[str]:
    body = re.search(r"type IstioOperatorSpec struct \{(.*?)\n\}", go, re.S)
    return re.findall(r'json:"(\w+)', body.group(1)) if body else []


# protobuf's JSON mapping (what istiod and istioctl parse meshConfig with).
WELL_KNOWN = {
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.Struct": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    "google.protobuf.Value": {"x-kubernetes-preserve-unknown-fields": True},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Any": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    "google.protobuf.Timestamp": {"type": "string"},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": {"type": "string"},
    "google.protobuf.DoubleValue": {"type": ["number", "string"]},
    "google.protobuf.FloatValue": {"type": ["number", "string"]},
    "google.protobuf.Int32Value": {"type": ["integer", "string"], "pattern": r"^-?[0-9]+$"},
    "google.protobuf.UInt32Value": {"type": ["integer", "string"], "pattern": r"^[0-9]+$", "minimum": 0},
    "google.protobuf.Int64Value": {"type": ["integer", "string"], "pattern": r"^-?[0-9]+$"},
    "google.protobuf.UInt64Value": {"type": ["integer", "string"], "pattern": r"^[0-9]+$", "minimum": 0},
}


def scalar(field: Any) -> dict[str, Any]:
    from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F
    t = field.type
    if t == F.TYPE_BOOL:
        return {"type": "boolean"}
    if t in (F.TYPE_STRING, F.TYPE_BYTES):
        return {"type": "string"}
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return {"type": ["number", "string"]}
    unsigned = t in (F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_FIXED32, F.TYPE_FIXED64)
    return {"type": ["integer", "string"], "pattern": r"^[0-9]+$" if unsigned else r"^-?[0-9]+$",
            **({"minimum": 0} if unsigned else {})}


def proto_schemas(api: Source, root: str) -> dict[str, Any]:
    """JSON schemas of ``root`` and every message it reaches, as protobuf's JSON mapping
    reads them: either spelling of a field name, no unknown field, one field of a oneof."""
    from google.protobuf import descriptor_pb2
    from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        todo, seen = [MESH_PROTO], set()
        while todo:
            name = todo.pop()
            if name in seen or name.startswith("google/protobuf/"):
                continue
            seen.add(name)
            text = api.read(name) or api.read(f"common-protos/{name}")
            if text is None:
                sys.exit(f"istio-api: {name} not found")
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_text(text, encoding="utf-8")
            todo += re.findall(r'^import\s+(?:public\s+)?"([^"]+)";', text, re.M)
        out = Path(tmp) / "set.pb"
        include = Path(grpc_tools.__file__).parent / "_proto"
        if protoc.main(["protoc", f"-I{tmp}", f"-I{include}", "--include_imports",
                        f"--descriptor_set_out={out}", MESH_PROTO]) != 0:
            sys.exit("protoc failed")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())

    messages: dict[str, Any] = {}
    enums: dict[str, list[str]] = {}

    def collect(prefix: str, msgs: Any, enum_types: Any) -> None:
        for e in enum_types:
            enums[f"{prefix}.{e.name}"] = [v.name for v in e.value]
        for m in msgs:
            messages[f"{prefix}.{m.name}"] = m
            collect(f"{prefix}.{m.name}", m.nested_type, m.enum_type)

    for f in files.file:
        collect(f.package, f.message_type, f.enum_type)

    definitions: dict[str, Any] = {}

    def field_schema(field: Any) -> dict[str, Any]:
        type_name = field.type_name.lstrip(".")
        if field.type == F.TYPE_ENUM:
            return {"anyOf": [{"type": "string", "enum": enums[type_name]}, {"type": "integer"}]}
        if field.type == F.TYPE_MESSAGE:
            if type_name in WELL_KNOWN:
                return WELL_KNOWN[type_name]
            message(type_name)
            return {"$ref": f"#/definitions/{type_name}"}
        return scalar(field)

    def message(name: str) -> None:
        if name in definitions:
            return
        definitions[name] = {}
        m = messages[name]
        properties: dict[str, Any] = {}
        oneofs: dict[int, list[str]] = {}
        for field in m.field:
            if field.type == F.TYPE_MESSAGE and messages.get(field.type_name.lstrip("."), None) is not None \
                    and messages[field.type_name.lstrip(".")].options.map_entry:
                entry = messages[field.type_name.lstrip(".")]
                schema = {"type": "object", "additionalProperties": field_schema(entry.field[1])}
            elif field.label == F.LABEL_REPEATED:
                schema = {"type": "array", "items": field_schema(field)}
            else:
                schema = field_schema(field)
            for spelling in {field.json_name, field.name}:
                properties[spelling] = schema
            if field.HasField("oneof_index") and not field.proto3_optional:
                oneofs.setdefault(field.oneof_index, []).append(field.json_name)
        schema = {"type": "object", "properties": properties}
        if oneofs:
            # At most one field of each oneof (tests/crd_schema.py checks it).
            schema["x-protobuf-oneof"] = list(oneofs.values())
        definitions[name] = schema

    message(root)
    return definitions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway-api", required=True, help="kubernetes-sigs/gateway-api checkout[@ref]")
    parser.add_argument("--envoy-gateway", required=True, help="envoyproxy/gateway checkout[@ref]")
    parser.add_argument("--istio", required=True, help="istio/istio checkout[@ref]")
    parser.add_argument("--istio-api", help="istio/api checkout[@ref], for IstioOperator's meshConfig")
    parser.add_argument("--prometheus-operator", required=True,
                        help="prometheus-operator/prometheus-operator checkout[@ref] (deploy/monitoring's kinds)")
    args = parser.parse_args()
    index: dict[str, Any] = {}
    for old in OUT.rglob("*.json"):  # a kind no longer listed goes
        old.unlink()

    gw = Source(args.gateway_api)
    for channel, files in GATEWAY_API_FILES.items():
        for file in files:
            text = gw.read(file)
            if text is None:
                sys.exit(f"gateway-api: {file} not found")
            for crd in crds(text):
                if crd["spec"]["names"]["kind"] in GATEWAY_API_KINDS:
                    source = {"repo": "kubernetes-sigs/gateway-api", "path": file, "ref": gw.ref or "",
                              "commit": gw.commit(), "channel": channel}
                    write(crd, OUT / crd["spec"]["group"] / channel, source, index)

    eg = Source(args.envoy_gateway)
    for name in ENVOY_GATEWAY_FILES:
        for directory in ENVOY_GATEWAY_DIRS:
            file = f"{directory}/gateway.envoyproxy.io_{name}.yaml"
            text = eg.read(file)
            if text is not None:
                break
        else:
            sys.exit(f"envoy-gateway: gateway.envoyproxy.io_{name}.yaml not found in {ENVOY_GATEWAY_DIRS}")
        for crd in crds(text):
            if crd["spec"]["names"]["kind"] in ENVOY_GATEWAY_KINDS:
                source = {"repo": "envoyproxy/gateway", "path": file, "ref": eg.ref or "", "commit": eg.commit()}
                write(crd, OUT / crd["spec"]["group"], source, index)

    istio = Source(args.istio)
    text = istio.read(ISTIO_FILE)
    if text is None:
        sys.exit(f"istio: {ISTIO_FILE} not found")
    found = set()
    for crd in crds(text):
        if crd["spec"]["names"]["kind"] in ISTIO_KINDS:
            found.add(crd["spec"]["names"]["kind"])
            source = {"repo": "istio/istio", "path": ISTIO_FILE, "ref": istio.ref or "", "commit": istio.commit()}
            write(crd, OUT / crd["spec"]["group"], source, index)
    if found != ISTIO_KINDS:
        sys.exit(f"istio: no CRD for {sorted(ISTIO_KINDS - found)}")

    if args.istio_api:
        api = Source(args.istio_api)
        spec_fields = istio_operator_fields(istio.read(ISTIO_OPERATOR_TYPES) or "")
        if not spec_fields:
            sys.exit(f"istio: no IstioOperatorSpec in {ISTIO_OPERATOR_TYPES}")
        schema = {"type": "object", "required": ["apiVersion", "kind", "spec"], "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
            "spec": {"type": "object", "properties": {
                name: ({"$ref": "#/definitions/istio.mesh.v1alpha1.MeshConfig"} if name == "meshConfig"
                       else {"x-kubernetes-preserve-unknown-fields": True})
                for name in spec_fields}},
        }, "definitions": proto_schemas(api, "istio.mesh.v1alpha1.MeshConfig")}
        target = OUT / "install.istio.io" / "IstioOperator-v1alpha1.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n", encoding="utf-8")
        index[str(target.relative_to(OUT))] = {
            "repo": "istio/istio + istio/api", "path": f"{ISTIO_OPERATOR_TYPES} + {MESH_PROTO}",
            "ref": api.ref or "", "commit": f"{istio.commit()} + {api.commit()}", "group": "install.istio.io",
            "kind": "IstioOperator", "version": "v1alpha1", "bytes": target.stat().st_size}
        print(f"{target.relative_to(OUT)}: {target.stat().st_size} bytes", file=sys.stderr)

    po = Source(args.prometheus_operator)
    for kind, name in PROMETHEUS_OPERATOR_KINDS.items():
        file = f"{PROMETHEUS_OPERATOR_DIR}/monitoring.coreos.com_{name}.yaml"
        text = po.read(file)
        if text is None:
            sys.exit(f"prometheus-operator: {file} not found")
        source = {"repo": "prometheus-operator/prometheus-operator", "path": file, "ref": po.ref or "",
                  "commit": po.commit()}
        for crd in crds(text):
            write(crd, OUT / crd["spec"]["group"], source, index)

    (OUT / "sources.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
