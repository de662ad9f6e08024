"""Decisions on the wire: the CheckResponse bytes Envoy receives.

An allow is the concatenation of two serialized CheckResponses: a prefix fixed per
route (status, credential, cluster and authority headers, headers to remove), built
once at config load, and a small per-request part (path, model, metadata). Protobuf
merges concatenated messages field by field and appends repeated fields, so Envoy
reads one response; per request only a few headers are encoded.
"""

from __future__ import annotations

import json
from typing import Any, cast

from google.protobuf import wrappers_pb2

from extauthz.check.decision import Allow, Reply
from extauthz.check.memo import Memo
from extauthz.domain.deny import Deny
from extauthz.domain.envoy_names import USAGE_ID, USAGE_ID_LENGTH
from extauthz.proto.envoy.config.core.v3 import base_pb2
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2
from extauthz.proto.envoy.type.v3 import http_status_pb2
from extauthz.proto.google.rpc import status_pb2

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
NO_APPEND = wrappers_pb2.BoolValue(value=False)
GRPC_OK, GRPC_PERMISSION_DENIED, GRPC_UNAVAILABLE, GRPC_UNAUTHENTICATED = 0, 7, 14, 16

Headers = tuple[tuple[str, str], ...]


def header(name: str, value: str) -> base_pb2.HeaderValueOption:
    # Both fields are set because Envoy versions disagree on which one wins.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append=NO_APPEND, append_action=OVERWRITE)


JSON_CONTENT_TYPE = header("content-type", "application/json")


def allow_prefix(headers: Headers, headers_to_remove: tuple[str, ...]) -> bytes:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=GRPC_OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[header(k, v) for k, v in headers], headers_to_remove=headers_to_remove),
    ).SerializeToString()


def _with_metadata(response: external_auth_pb2.CheckResponse, metadata: dict[str, str] | None) -> None:
    if metadata:
        fields = response.dynamic_metadata.fields
        for name, value in metadata.items():
            fields[name].string_value = value


def _headers_part(headers: tuple) -> bytes:
    response = external_auth_pb2.CheckResponse()
    response.ok_response.headers.extend([header(k, v) for k, v in headers])
    return response.SerializeToString()


def _metadata_part(items: tuple) -> bytes:
    response = external_auth_pb2.CheckResponse()
    _with_metadata(response, dict(items))
    return response.SerializeToString()




def _usage_id_template() -> tuple[bytes, bytes]:
    blank = b"0" * USAGE_ID_LENGTH
    encoded = _metadata_part(((USAGE_ID, blank.decode()),))
    at = encoded.index(blank)
    return encoded[:at], encoded[at + USAGE_ID_LENGTH:]


def metadata_part(metadata: dict[str, str] | None) -> bytes:
    """``metadata`` as a CheckResponse holding only ``dynamic_metadata``."""
    if not metadata:
        return b""
    usage_id = metadata.get(USAGE_ID)
    if usage_id is None:
        items = tuple(metadata.items())
        return _METADATA.get(items, lambda: _metadata_part(items))
    items = tuple(item for item in metadata.items() if item[0] != USAGE_ID)
    rest = _METADATA.get(items, lambda: _metadata_part(items)) if items else b""
    assert len(usage_id) == USAGE_ID_LENGTH
    return rest + _USAGE_BEFORE + usage_id.encode("ascii") + _USAGE_AFTER


# Most allows repeat the same path and model headers, a key's metadata repeats for all
# its calls to one model, and a refused call is usually refused again the same way (its
# metadata, the key's, is appended to the refusal).
_HEADERS: Memo[bytes] = Memo(8192)
_METADATA: Memo[bytes] = Memo(8192)
_DENIES: Memo[bytes] = Memo(8192)


def allow_bytes(allow: Allow) -> bytes:
    headers = allow.dynamic_headers
    return allow.route.prefix + _HEADERS.get(headers, lambda: _headers_part(headers)) + metadata_part(allow.metadata)


def error_body(deny: Deny) -> str:
    return json.dumps({"error": {"message": deny.message, "type": deny.type,
                                 "param": deny.param, "code": deny.code}})


def deny_bytes(deny: Deny) -> bytes:
    key = (deny.status, deny.code, deny.message, deny.param, deny.headers, deny.error_type)
    return _DENIES.get(key, lambda: _deny_bytes(deny)) + metadata_part(deny.metadata)


def _deny_bytes(deny: Deny) -> bytes:
    grpc_code = {401: GRPC_UNAUTHENTICATED, 503: GRPC_UNAVAILABLE}.get(deny.status, GRPC_PERMISSION_DENIED)
    response = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=grpc_code, message=deny.code),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=cast(Any, deny.status)),  # (the enum's values are the codes)
            headers=[JSON_CONTENT_TYPE, *(header(k, v) for k, v in deny.headers)], body=error_body(deny)))
    return response.SerializeToString()


def reply_bytes(reply: Reply) -> bytes:
    # A non-OK gRPC status makes Envoy answer with the denied response, whatever its HTTP status.
    response = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=GRPC_PERMISSION_DENIED, message="answered by the gateway"),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=cast(Any, reply.status)), headers=[JSON_CONTENT_TYPE],
            body=reply.body))
    return response.SerializeToString() + metadata_part(reply.metadata)


_USAGE_BEFORE, _USAGE_AFTER = _usage_id_template()
