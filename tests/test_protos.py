"""The hand-written ext_authz protos: generated code is current, and the wire format
matches the official envoy.service.auth.v3 definitions shipped by xds-protos.

The official classes define the same proto full names as ours, so they live in a
subprocess (tests/official_probe.py) and only JSON and serialized bytes cross over.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from google.protobuf import struct_pb2, wrappers_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet

from extauthz.proto.envoy.config.core.v3 import base_pb2
from extauthz.proto.envoy.data.accesslog.v3 import accesslog_pb2
from extauthz.proto.envoy.service.accesslog.v3 import als_pb2
from extauthz.proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from extauthz.proto.envoy.type.v3 import http_status_pb2
from extauthz.proto.google.rpc import status_pb2

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "extauthz" / "proto"
PROBE_PATH = Path(__file__).with_name("official_probe.py")

_spec = importlib.util.spec_from_file_location("official_probe", PROBE_PATH)
assert _spec and _spec.loader
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

OUR_FILES: list[FileDescriptor] = [
    m.DESCRIPTOR for m in (external_auth_pb2, attribute_context_pb2, base_pb2, http_status_pb2, status_pb2,
                           accesslog_pb2, als_pb2)
]

# The subset we mean to carry: message -> field names.
SUBSET: dict[str, set[str]] = {
    "envoy.service.auth.v3.CheckRequest": {"attributes"},
    "envoy.service.auth.v3.DeniedHttpResponse": {"status", "headers", "body"},
    "envoy.service.auth.v3.OkHttpResponse": {"headers", "headers_to_remove", "response_headers_to_add"},
    "envoy.service.auth.v3.CheckResponse": {"status", "denied_response", "ok_response", "dynamic_metadata"},
    "envoy.service.auth.v3.AttributeContext": {"request", "context_extensions", "metadata_context"},
    "envoy.config.core.v3.Metadata": {"filter_metadata"},
    "envoy.config.core.v3.Metadata.FilterMetadataEntry": {"key", "value"},
    "envoy.service.auth.v3.AttributeContext.ContextExtensionsEntry": {"key", "value"},
    "envoy.service.auth.v3.AttributeContext.Request": {"http"},
    "envoy.service.auth.v3.AttributeContext.HttpRequest": {
        "id", "method", "headers", "path", "host", "scheme", "size", "protocol", "body", "raw_body",
    },
    "envoy.service.auth.v3.AttributeContext.HttpRequest.HeadersEntry": {"key", "value"},
    "envoy.config.core.v3.HeaderValue": {"key", "value", "raw_value"},
    "envoy.config.core.v3.HeaderValueOption": {"header", "append", "append_action", "keep_empty_value"},
    "envoy.type.v3.HttpStatus": {"code"},
    "google.rpc.Status": {"code", "message"},
    "envoy.service.accesslog.v3.StreamAccessLogsMessage": {"identifier", "http_logs"},
    "envoy.service.accesslog.v3.StreamAccessLogsMessage.Identifier": {"log_name"},
    "envoy.service.accesslog.v3.StreamAccessLogsMessage.HTTPAccessLogEntries": {"log_entry"},
    "envoy.service.accesslog.v3.StreamAccessLogsResponse": set(),
    "envoy.data.accesslog.v3.HTTPAccessLogEntry": {"common_properties", "request", "response"},
    "envoy.data.accesslog.v3.AccessLogCommon": {"upstream_cluster", "metadata", "route_name", "duration"},
    "envoy.data.accesslog.v3.HTTPRequestProperties": {"request_id"},
    "envoy.data.accesslog.v3.HTTPResponseProperties": {"response_code", "response_code_details"},
}
# Enums that must carry every upstream value, not just a subset.
COMPLETE_ENUMS = {"envoy.type.v3.StatusCode", "envoy.config.core.v3.HeaderValueOption.HeaderAppendAction"}

RAW_BODY = b'\x00\xff\xfe{"model":"gpt-4o"}\x80'
REQUEST_SPEC: dict[str, Any] = {
    "id": "8d1c9a0e-4f1b-4c7e-9d55-0b3f1e2a7c11",
    "method": "POST",
    "path": "/v1/chat/completions?stream=true",
    "host": "llm.example.com:8443",
    "scheme": "https",
    "protocol": "HTTP/2",
    "size": 4096,
    "headers": {
        ":authority": "llm.example.com:8443",
        "authorization": "Bearer sk-test-123",
        "content-type": "application/json",
        "x-team": "ml,infra",
    },
    "body": '{"model": "gpt-4o", "messages": [{"content": "héllo ✓"}]}',
    "raw_body": base64.b64encode(RAW_BODY).decode("ascii"),
    "context_extensions": {"route": "openai", "tenant": "acme"},
}


def _walk_messages(descs: Any) -> Iterator[Descriptor]:
    for desc in descs:
        yield desc
        yield from _walk_messages(desc.nested_types)


def _our_messages() -> dict[str, Descriptor]:
    return {d.full_name: d for f in OUR_FILES for d in _walk_messages(f.message_types_by_name.values())}


def _our_enums() -> dict[str, EnumDescriptor]:
    enums = [e for f in OUR_FILES for e in f.enum_types_by_name.values()]
    enums += [e for m in _our_messages().values() for e in m.enum_types]
    return {e.full_name: e for e in enums}


OUR_MESSAGES = _our_messages()
OUR_ENUMS = _our_enums()
OUR_SERVICES = {s.full_name: s for f in OUR_FILES for s in f.services_by_name.values()}


def _ok_response() -> external_auth_pb2.CheckResponse:
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    metadata = struct_pb2.Struct()
    metadata.update({"model": "gpt-4o", "tokens": 12, "limits": {"rpm": 60}})
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=0),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="x-extauthz-model", value="gpt-4o"),
                    append=wrappers_pb2.BoolValue(value=False),
                    append_action=overwrite,
                ),
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="x-extauthz-tenant", value="acme"),
                    append_action=overwrite,
                ),
            ],
            headers_to_remove=["authorization", "x-api-key"],
            response_headers_to_add=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="x-ratelimit-remaining", raw_value=b"59"),
                    append_action=overwrite,
                    keep_empty_value=True,
                ),
            ],
        ),
        dynamic_metadata=metadata,
    )


def _denied_response() -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=7, message="model not allowed"),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="content-type", value="application/json"),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                ),
            ],
            body='{"error": "model gpt-4o is not allowed for team ml"}',
        ),
    )


OUR_RESPONSES = {"ok": _ok_response(), "denied": _denied_response()}


def _run(args: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(args, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def official() -> dict[str, Any]:
    job = {
        "messages": sorted(OUR_MESSAGES),
        "enums": sorted(OUR_ENUMS),
        "services": sorted(OUR_SERVICES),
        "check_request": REQUEST_SPEC,
        "check_responses": {
            k: base64.b64encode(v.SerializeToString()).decode("ascii") for k, v in OUR_RESPONSES.items()
        },
    }
    return json.loads(_run([sys.executable, str(PROBE_PATH)], stdin=json.dumps(job)))


# --- generated code ----------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    _run([sys.executable, "-m", "extauthz.proto_gen", "--out", str(tmp_path)])
    fresh, committed = _tree(tmp_path), _tree(GENERATED)
    hint = "extauthz/proto is stale: run `make protos` and commit the result"
    assert fresh, "the generator produced no files"
    assert sorted(committed) == sorted(fresh), f"{hint} (file list differs)"
    differing = sorted(rel for rel in fresh if fresh[rel] != committed[rel])
    assert not differing, f"{hint} (content differs: {differing})"


def test_generated_code_does_not_use_top_level_envoy_or_google_rpc() -> None:
    code = (
        "import json, sys\n"
        "import extauthz.proto.envoy.service.auth.v3.external_auth_pb2_grpc\n"
        "print(json.dumps(sorted(m for m in sys.modules"
        " if m.split('.')[0] == 'envoy' or m == 'google.rpc' or m.startswith('google.rpc.'))))\n"
    )
    assert json.loads(_run([sys.executable, "-c", code])) == []
    assert external_auth_pb2.CheckRequest.__module__ == "extauthz.proto.envoy.service.auth.v3.external_auth_pb2"


# --- descriptors against the official ones -----------------------------------------------


def test_subset_declares_exactly_the_intended_messages_and_fields() -> None:
    assert {name: set(d.fields_by_name) for name, d in OUR_MESSAGES.items()} == SUBSET


@pytest.mark.parametrize("name", sorted(OUR_MESSAGES))
def test_message_matches_official(official: dict[str, Any], name: str) -> None:
    upstream = official["messages"][name]
    assert upstream is not None, f"{name} does not exist in the official definitions"
    ours = probe.describe_message(OUR_MESSAGES[name])
    assert ours["map_entry"] == upstream["map_entry"]
    for field, shape in ours["fields"].items():
        assert field in upstream["fields"], f"{name}.{field} does not exist upstream"
        assert shape == upstream["fields"][field], f"{name}.{field} differs from upstream"


@pytest.mark.parametrize("name", sorted(OUR_ENUMS))
def test_enum_matches_official(official: dict[str, Any], name: str) -> None:
    upstream = official["enums"][name]
    assert upstream is not None, f"{name} does not exist in the official definitions"
    ours = probe.describe_enum(OUR_ENUMS[name])
    assert {k: upstream.get(k) for k in ours} == ours
    if name in COMPLETE_ENUMS:
        assert ours == upstream


def test_complete_enums_are_checked() -> None:
    assert COMPLETE_ENUMS <= set(OUR_ENUMS)
    codes = probe.describe_enum(OUR_ENUMS["envoy.type.v3.StatusCode"])
    assert {400, 401, 403, 404, 413, 415, 429, 500, 503} <= set(codes.values())


def test_service_matches_official(official: dict[str, Any]) -> None:
    assert set(OUR_SERVICES) == {"envoy.service.auth.v3.Authorization", "envoy.service.accesslog.v3.AccessLogService"}
    for name, desc in OUR_SERVICES.items():
        assert official["services"][name] is not None, f"{name} does not exist upstream"
        assert probe.describe_service(desc) == official["services"][name]


def test_grpc_stub_uses_official_method_path(official: dict[str, Any]) -> None:
    class RecordingChannel:
        def __init__(self) -> None:
            self.paths: list[str] = []

        def unary_unary(self, path: str, *args: Any, **kwargs: Any) -> object:
            self.paths.append(path)
            return object()

    channel = RecordingChannel()
    external_auth_pb2_grpc.AuthorizationStub(channel)
    assert channel.paths == [official["services"]["envoy.service.auth.v3.Authorization"]["Check"]["path"]]
    assert channel.paths == ["/envoy.service.auth.v3.Authorization/Check"]


# --- messages across the wire ------------------------------------------------------------


def test_official_check_request_parses(official: dict[str, Any]) -> None:
    data = base64.b64decode(official["check_request"])
    req = external_auth_pb2.CheckRequest.FromString(data)
    http = req.attributes.request.http
    spec = REQUEST_SPEC
    assert (http.id, http.method, http.path, http.host) == (spec["id"], spec["method"], spec["path"], spec["host"])
    assert (http.scheme, http.protocol, http.size) == (spec["scheme"], spec["protocol"], spec["size"])
    assert dict(http.headers) == spec["headers"]
    assert http.body == spec["body"]
    assert http.raw_body == RAW_BODY
    with pytest.raises(UnicodeDecodeError):
        RAW_BODY.decode("utf-8")
    assert dict(req.attributes.context_extensions) == spec["context_extensions"]
    # The official-only fields really were on the wire, and were kept as unknown fields.
    assert {f.field_number for f in UnknownFieldSet(req.attributes)} == {1, 2, 12}
    # The filters' metadata (jwt_authn's verified claims) reads as the official message writes it.
    jwt = req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"]
    assert dict(jwt.fields)["sub"].string_value == "alice"
    assert {f.field_number for f in UnknownFieldSet(req.attributes.request)} == {1}
    assert {f.field_number for f in UnknownFieldSet(http)} == {7, 8, 13}
    assert len(req.SerializeToString()) == len(data)


def test_ok_response_read_by_official(official: dict[str, Any]) -> None:
    seen = official["check_responses"]["ok"]
    assert seen["http_response"] == "ok_response"
    assert seen["message"] == {
        "status": {},
        "ok_response": {
            "headers": [
                {
                    "header": {"key": "x-extauthz-model", "value": "gpt-4o"},
                    "append": False,
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
                {
                    "header": {"key": "x-extauthz-tenant", "value": "acme"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
            ],
            "headers_to_remove": ["authorization", "x-api-key"],
            "response_headers_to_add": [
                {
                    "header": {"key": "x-ratelimit-remaining", "raw_value": base64.b64encode(b"59").decode()},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    "keep_empty_value": True,
                },
            ],
        },
        "dynamic_metadata": {"model": "gpt-4o", "tokens": 12.0, "limits": {"rpm": 60.0}},
    }
    assert base64.b64decode(seen["reencoded"]) == OUR_RESPONSES["ok"].SerializeToString(deterministic=True)


def test_denied_response_read_by_official(official: dict[str, Any]) -> None:
    seen = official["check_responses"]["denied"]
    assert seen["http_response"] == "denied_response"
    assert seen["message"] == {
        "status": {"code": 7, "message": "model not allowed"},
        "denied_response": {
            "status": {"code": "Forbidden"},
            "headers": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
            ],
            "body": '{"error": "model gpt-4o is not allowed for team ml"}',
        },
    }
    assert base64.b64decode(seen["reencoded"]) == OUR_RESPONSES["denied"].SerializeToString(deterministic=True)
