"""The Check servicer: CheckRequest -> facts -> records -> decision -> CheckResponse."""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any, Callable

from google.protobuf import struct_pb2, wrappers_pb2

from extauthz.policy import UNAVAILABLE, Allow, Decision, Deny, decide
from extauthz.proto.envoy.config.core.v3 import base_pb2
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from extauthz.proto.envoy.type.v3 import http_status_pb2
from extauthz.proto.google.rpc import status_pb2
from extauthz.records import MASTER, KeyRecord, TeamRecord, hash_token
from extauthz.request import facts_from_check
from extauthz.runtime import Runtime
from extauthz.store import RecordStore, StoreUnavailable

log = logging.getLogger("extauthz.check")

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
NO_APPEND = wrappers_pb2.BoolValue(value=False)
GRPC_OK, GRPC_PERMISSION_DENIED, GRPC_UNAUTHENTICATED, GRPC_UNAVAILABLE = 0, 7, 16, 14
INTERNAL = Deny(500, "internal_error", "The authorization service failed to decide; the request was not forwarded.")


def header(name: str, value: str) -> base_pb2.HeaderValueOption:
    # Both fields are set because Envoy versions disagree on which one wins.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append=NO_APPEND, append_action=OVERWRITE)


JSON_CONTENT_TYPE = header("content-type", "application/json")


def metadata_struct(metadata: dict[str, Any] | None) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    if metadata:
        struct.update(metadata)
    return struct


def error_body(deny: Deny) -> str:
    return json.dumps({"error": {"message": deny.message, "type": deny.type,
                                 "param": deny.param, "code": deny.code}})


def to_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    if isinstance(decision, Allow):
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=GRPC_OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[header(k, v) for k, v in decision.headers],
                headers_to_remove=decision.headers_to_remove),
            dynamic_metadata=metadata_struct(decision.metadata))
    grpc_code = {401: GRPC_UNAUTHENTICATED, 503: GRPC_UNAVAILABLE}.get(decision.status, GRPC_PERMISSION_DENIED)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=grpc_code, message=decision.code),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=[JSON_CONTENT_TYPE],
            body=error_body(decision)),
        dynamic_metadata=metadata_struct(decision.metadata))


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, runtime: Callable[[], Runtime], store: RecordStore) -> None:
        self.runtime = runtime
        self.store = store

    async def Check(self, request: external_auth_pb2.CheckRequest, context: Any) -> external_auth_pb2.CheckResponse:
        try:
            decision = await self.decide(request)
        except Exception:
            # A bug must still answer with a deny, never a gRPC error that Envoy might fail open on.
            log.exception("check failed")
            decision = INTERNAL
        if isinstance(decision, Deny):
            log.info("deny %s %s", decision.status, decision.code)
        return to_response(decision)

    async def decide(self, request: external_auth_pb2.CheckRequest) -> Decision:
        runtime = self.runtime()
        facts = facts_from_check(request, runtime.pass_through)
        try:
            key, team = await lookup(facts.token, runtime, self.store)
        except StoreUnavailable as e:
            log.warning("store unavailable: %s", e)
            return UNAVAILABLE
        return decide(facts, key, team, runtime.catalog, time.time(), random.random())


async def lookup(token: str | None, runtime: Runtime, store: RecordStore) -> tuple[KeyRecord | None, TeamRecord | None]:
    """The records behind a presented key; raises StoreUnavailable."""
    if token is None:
        return None, None
    token_hash = hash_token(token)
    if runtime.is_master(token_hash):
        return MASTER, None
    key = await store.get_key(token_hash)
    team = None
    if key is not None and key.team_id is not None:
        team = await store.get_team(key.team_id)
    return key, team
