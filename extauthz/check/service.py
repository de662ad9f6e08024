"""The Check servicer: CheckRequest -> facts -> records -> decision -> CheckResponse bytes."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from extauthz.check import shadow as shadow_mode
from extauthz.check.decision import Allow, Reply
from extauthz.check.facts import Facts
from extauthz.check.jwt_decision import JwtDecision
from extauthz.check.key_decision import KeyDecision
from extauthz.check.policy import Decision
from extauthz.check.request import body_of, facts_from_check
from extauthz.check.responses import allow_bytes, deny_bytes, reply_bytes
from extauthz.check.runtime import Runtime
from extauthz.domain.deny import Deny
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2
from extauthz.records.store import RecordReader
from extauthz.records.upsert import Upserts
from extauthz.telemetry import logs, tracing
from extauthz.telemetry.metrics import CheckMetrics
from extauthz.usage.counters import RateCounters

log = logging.getLogger("extauthz.check")

SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
INTERNAL = Deny(500, "internal_error", "The authorization service failed to decide; the request was not forwarded.")
TOO_LARGE = Deny(413, "body_too_large", "The check request is larger than this gateway reads; the request "
                "was not forwarded.")
UNREADABLE = Deny(400, "invalid_check_request", "The check request could not be decoded; the request was "
                  "not forwarded.")
DEADLINE_SLACK_S = 0.1


class AuthorizationService:
    def __init__(self, runtime: Callable[[], Runtime], store: RecordReader, log_allowed: bool = False,
                 decision_log: logs.DecisionLog | None = None, max_message_bytes: int = 64 * 1024 * 1024,
                 upserts: Upserts | None = None, counters: RateCounters | None = None) -> None:
        self.max_message_bytes = max_message_bytes
        self.runtime = runtime
        self.store = store
        self.log_allowed = log_allowed
        self.metrics = CheckMetrics(SERVICE)
        self.decision_log = decision_log or logs.DecisionLog()
        self.keys = KeyDecision(store, counters, self.metrics)
        self.jwt = JwtDecision(self.keys, store, upserts)

    def add_to(self, server: grpc.aio.Server) -> None:
        # Registered by hand so Check can return bytes it assembled (see responses.py)
        # instead of a message gRPC would serialize again.
        handler = grpc.unary_unary_rpc_method_handler(
            self.Check, request_deserializer=self.read_request, response_serializer=bytes)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Check": handler}),))

    def read_request(self, data: bytes) -> external_auth_pb2.CheckRequest | Deny:
        """gRPC's deserializer: a check too large or unreadable becomes a deny here, where
        it is answered and counted, rather than a gRPC error Envoy turns into a bare 503."""
        if len(data) > self.max_message_bytes:
            return TOO_LARGE
        try:
            return external_auth_pb2.CheckRequest.FromString(data)
        except DecodeError:
            return UNREADABLE

    async def Check(self, request: external_auth_pb2.CheckRequest | Deny, context: Any) -> bytes:
        if isinstance(request, Deny):
            self.metrics.record("deny", request.code, 0.0)
            self.decision_log.write("deny", request.code, request.status, None, "", 0.0)
            return deny_bytes(request)
        try:
            if tracing.enabled():
                with tracing.check_span(request.attributes.request.http.headers):
                    return await self.check(request)
            return await self.check(request)
        except asyncio.CancelledError:
            # Envoy gave up (its timeout) or went away: no answer is sent, but it is counted.
            # A client that times out resets the stream at its own deadline, which reaches
            # here a little before the deadline this side computed: near it means timed out.
            remaining = context.time_remaining() if context is not None else None
            timed_out = remaining is not None and remaining <= DEADLINE_SLACK_S
            self.metrics.aborted("DEADLINE_EXCEEDED" if timed_out else "CANCELLED")
            raise

    async def check(self, request: external_auth_pb2.CheckRequest) -> bytes:
        started = time.perf_counter()
        runtime = self.runtime()
        request_id = ""
        try:
            facts = facts_from_check(request, runtime.pass_through)
            request_id = facts.request_id
            decision = await self.decide(facts, request, runtime)
            if isinstance(decision, Reply):
                self.metrics.record("reply", str(decision.status), time.perf_counter() - started)
                return reply_bytes(decision)
            if isinstance(decision, Allow):
                answer = allow_bytes(decision)
                seconds = time.perf_counter() - started
                shadowed = decision.metadata.get(shadow_mode.SHADOW_DENY)
                if shadowed is not None:  # allowed, and logged as the denial it stands for
                    self.metrics.record(shadow_mode.SHADOW_DENY, shadowed, seconds)
                    self.decision_log.write(shadow_mode.SHADOW_DENY, shadowed, 200, decision.metadata, request_id,
                                            seconds)
                    return answer
                self.metrics.record("allow", "ok", seconds)
                if self.log_allowed:
                    self.decision_log.write("allow", "ok", 200, decision.metadata, request_id, seconds)
                return answer
        except Exception:
            # A bug must still answer with a deny, never a gRPC error that Envoy might fail open on.
            log.exception("check failed")
            decision = INTERNAL
        seconds = time.perf_counter() - started
        self.metrics.record("deny", decision.code, seconds)
        self.decision_log.write("deny", decision.code, decision.status, decision.metadata, request_id, seconds)
        return deny_bytes(decision)

    async def decide(self, facts: Facts, request: external_auth_pb2.CheckRequest, runtime: Runtime) -> Decision:
        if facts.claims is not None:
            return await self.jwt.decide(facts, request, runtime)
        return await self.keys.decide(facts, body_of(request), runtime)

    def close(self) -> None:
        self.keys.close()
