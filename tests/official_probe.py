"""Official side of tests/test_protos.py, run in a separate process.

The official classes (xds-protos) define the same proto full names as ``extauthz.proto``,
so the two cannot be loaded into one descriptor pool. This script imports only the
official ones: it reads a JSON job on stdin and prints a JSON report on stdout.

The ``describe_*`` helpers use nothing but ``google.protobuf``; the test imports them
too, so both sides are described the same way.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, ServiceDescriptor

FieldProto = descriptor_pb2.FieldDescriptorProto


def describe_message(desc: Descriptor) -> dict[str, Any]:
    """Wire-relevant shape of a message: each field's number, type, label, type name, oneof."""
    proto = descriptor_pb2.DescriptorProto()
    desc.CopyToProto(proto)
    fields = {
        f.name: {
            "number": f.number,
            "type": FieldProto.Type.Name(f.type),
            "label": FieldProto.Label.Name(f.label),
            "type_name": f.type_name,
            "oneof": proto.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None,
            "proto3_optional": f.proto3_optional,
        }
        for f in proto.field
    }
    return {"map_entry": proto.options.map_entry, "fields": fields}


def describe_enum(desc: EnumDescriptor) -> dict[str, int]:
    return {v.name: v.number for v in desc.values}


def describe_service(desc: ServiceDescriptor) -> dict[str, Any]:
    proto = descriptor_pb2.ServiceDescriptorProto()
    desc.CopyToProto(proto)
    return {
        m.name: {
            "path": f"/{desc.full_name}/{m.name}",
            "input_type": m.input_type,
            "output_type": m.output_type,
            "client_streaming": m.client_streaming,
            "server_streaming": m.server_streaming,
        }
        for m in proto.method
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _check_request(spec: dict[str, Any]) -> bytes:
    """An official CheckRequest from ``spec``, plus fields the subset does not declare."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.auth.v3 import external_auth_pb2

    req = external_auth_pb2.CheckRequest()
    attrs = req.attributes
    http = attrs.request.http
    http.id, http.method, http.path = spec["id"], spec["method"], spec["path"]
    http.host, http.scheme, http.protocol = spec["host"], spec["scheme"], spec["protocol"]
    http.size, http.body = spec["size"], spec["body"]
    http.raw_body = base64.b64decode(spec["raw_body"])
    http.headers.update(spec["headers"])
    attrs.context_extensions.update(spec["context_extensions"])
    # Official-only fields, unknown to the subset.
    attrs.source.address.socket_address.address = "10.1.2.3"
    attrs.source.address.socket_address.port_value = 54321
    attrs.source.principal = "spiffe://cluster.local/ns/default/sa/client"
    attrs.destination.labels["app"] = "llm-gateway"
    attrs.request.time.seconds = 1_700_000_000
    attrs.tls_session.sni = "llm.example.com"
    attrs.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update({"sub": "alice"})
    http.query, http.fragment = "stream=true", "top"
    http.header_map.headers.append(base_pb2.HeaderValue(key="x-raw", raw_value=b"\xc3\x28"))
    return req.SerializeToString()


def _check_response(data: bytes) -> dict[str, Any]:
    """What the official classes read from a serialized CheckResponse."""
    from envoy.service.auth.v3 import external_auth_pb2

    resp = external_auth_pb2.CheckResponse.FromString(data)
    return {
        "http_response": resp.WhichOneof("http_response"),
        "message": json_format.MessageToDict(resp, preserving_proto_field_name=True),
        "reencoded": _b64(resp.SerializeToString(deterministic=True)),
    }


def run(job: dict[str, Any]) -> dict[str, Any]:
    from envoy.service.accesslog.v3 import als_pb2  # noqa: F401  (fills the pool)
    from envoy.service.auth.v3 import external_auth_pb2  # noqa: F401

    pool = descriptor_pool.Default()

    def lookup(find: Any, name: str, describe: Any) -> Any:
        try:
            return describe(find(name))
        except KeyError:
            return None

    return {
        "messages": {n: lookup(pool.FindMessageTypeByName, n, describe_message) for n in job["messages"]},
        "enums": {n: lookup(pool.FindEnumTypeByName, n, describe_enum) for n in job["enums"]},
        "services": {n: lookup(pool.FindServiceByName, n, describe_service) for n in job["services"]},
        "check_request": _b64(_check_request(job["check_request"])),
        "check_responses": {
            key: _check_response(base64.b64decode(data)) for key, data in job["check_responses"].items()
        },
    }


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin)), sys.stdout, sort_keys=True)
