"""Usage reports: Envoy's gRPC access log (AccessLogService) streams an entry for every
allowed model call once its response has ended, carrying the check's metadata (key,
team, model) and the usage Envoy read from the response (namespace ``extauthz.usage``,
by envoy/usage.lua: a JSON body's top-level "usage", an event stream's counts).
Each is settled once per request id into the token windows the check compares with
``tpm_limit``. The report travels after the response, off the request's path; a lost
one costs only its count (see the README's usage section).
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator, NamedTuple

import grpc
from google.protobuf import json_format

from extauthz.proto.envoy.service.accesslog.v3 import als_pb2
from extauthz.records.store import StoreUnavailable
from extauthz.usage.counters import RateCounters
from extauthz.usage.limits import inflight_sets, scope, usage_counters

log = logging.getLogger("extauthz.usage")

SERVICE = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name
EXT_AUTHZ = "envoy.filters.http.ext_authz"
USAGE = "extauthz.usage"
# Reported token counts, as the providers name them (OpenAI: prompt/completion; Anthropic
# and OpenAI's Responses API: input/output, Anthropic's cache tokens beside its input;
# Gemini: promptTokenCount, candidatesTokenCount, thoughtsTokenCount).
INPUT_FIELDS = ("prompt_tokens", "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
                "promptTokenCount")
OUTPUT_FIELDS = ("completion_tokens", "output_tokens", "candidatesTokenCount", "thoughtsTokenCount")


class Report(NamedTuple):
    usage_id: str           # set by the check on the allow (see service.within_limits)
    key_id: str | None      # None for a JWT caller (it has no key of its own)
    team_id: str | None
    model: str
    tokens: int | None      # None: the response reported no usage


def read_entry(entry: Any) -> Report | None:
    """The usage report in one access log entry, or None when it is not an allowed model call."""
    namespaces = entry.common_properties.metadata.filter_metadata
    if EXT_AUTHZ not in namespaces:
        return None
    decision = json_format.MessageToDict(namespaces[EXT_AUTHZ])
    key_id, usage_id = decision.get("key_id"), decision.get("usage_id")
    # Only calls of keys and teams with a limit carry a usage id: the others count nothing.
    # It is the check's, never the client's (Envoy keeps a client's x-request-id on a
    # trusted network: the same one on every request would be settled once).
    if not isinstance(key_id, str) or not isinstance(usage_id, str) or decision.get("deployment") in (
            None, "admin_api"):
        return None
    usage = json_format.MessageToDict(namespaces[USAGE]) if USAGE in namespaces else {}
    return Report(usage_id, None if key_id.startswith("jwt:") else key_id,
                  decision.get("team_id"), str(decision.get("model", "")), tokens(usage))


def tokens(usage: dict[str, Any]) -> int | None:
    counts = {k: v for k, v in usage.items() if isinstance(v, (int, float)) and 0 <= v < 1e12}
    if not counts:
        return None
    # OpenAI's prompt_tokens include its cached tokens; Anthropic's input_tokens exclude its
    # cache reads and writes, which are counted beside them.
    return int(sum(counts.get(f, 0) for f in INPUT_FIELDS) + sum(counts.get(f, 0) for f in OUTPUT_FIELDS))


class UsageReports:
    """The AccessLogService the rendered Envoy streams its usage reports to."""

    def __init__(self, counters: RateCounters) -> None:
        self.counters = counters
        self.settled = self.duplicates = self.unpriced = self.failed = 0
        self.last_warning = 0.0

    def add_to(self, server: grpc.aio.Server) -> None:
        handler = grpc.stream_unary_rpc_method_handler(
            self.StreamAccessLogs, request_deserializer=als_pb2.StreamAccessLogsMessage.FromString,
            response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"StreamAccessLogs": handler}),))

    async def StreamAccessLogs(self, messages: AsyncIterator[Any], context: Any) -> Any:  # noqa: N802
        async for message in messages:
            for entry in message.http_logs.log_entry:
                try:
                    report = read_entry(entry)
                    if report is not None:
                        await self.settle(report)
                except Exception:  # one bad entry must not end the stream of every other
                    log.exception("usage report could not be read")
        return als_pb2.StreamAccessLogsResponse()

    async def settle(self, report: Report) -> None:
        scopes = ([scope("key", report.key_id)] if report.key_id else []) + \
            ([scope("team", report.team_id)] if report.team_id else [])
        if report.tokens is None:
            self.unpriced += 1  # counted for rpm at admission already; no tokens to add
        counters = usage_counters(scopes, report.model, time.time()) if report.tokens is not None else []
        try:
            # Ended, with or without usage: it leaves the in-flight sets either way.
            done = await self.counters.settle(report.usage_id, counters, report.tokens or 0, inflight_sets(scopes))
        except StoreUnavailable as e:
            self.failed += 1
            now = time.monotonic()
            if now - self.last_warning >= 1.0:
                self.last_warning = now
                log.warning("usage report not settled (Redis: %s); its tokens are not counted", e)
            return
        if done and counters:
            self.settled += 1
        elif not done:
            self.duplicates += 1
