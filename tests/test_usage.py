"""Usage reports through real Envoy: the tokens a provider reports (JSON and event
streams, OpenAI and Anthropic formats) reach the sidecar in Envoy's gRPC access log,
are settled once per request, and tpm_limit refuses once a minute's tokens are used."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from extauthz.usage.estimate import DEFAULT_MAX_OUTPUT_TOKENS
from extauthz.usage.prices import price_of
from google.protobuf import struct_pb2

from extauthz.proto.envoy.data.accesslog.v3 import accesslog_pb2
from extauthz.usage.reports import read_entry, tokens
from tests.conftest import Gateway
from tests.harness import http
from tests.test_limits import fresh_window


def entry(decision: dict[str, Any], usage: dict[str, Any] | None = None, request_id: str = "r1") -> Any:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.request_id = request_id
    namespaces = e.common_properties.metadata.filter_metadata
    namespaces["envoy.filters.http.ext_authz"].CopyFrom(struct_pb2.Struct())
    namespaces["envoy.filters.http.ext_authz"].update(decision)
    if usage is not None:
        namespaces["extauthz.usage"].update(usage)
    return e


def test_reading_an_entry() -> None:
    allowed = {"key_id": "ab" * 32, "team_id": "t", "model": "gpt-4", "deployment": "1:gpt-4", "usage_id": "u1"}
    report = read_entry(entry(allowed, {"prompt_tokens": 7, "completion_tokens": 5}))
    assert report is not None and report.tokens.total == 12 and report.key_id == "ab" * 32 and report.team_id == "t"
    assert report.usage_id == "u1" and report.deployment == "1:gpt-4"
    assert read_entry(entry(allowed)).tokens is None                        # no usage reported: unpriced
    assert read_entry(entry({**allowed, "deployment": "admin_api"})) is None  # not a model call
    assert read_entry(entry({"key_hash": "ab"})) is None                     # a deny's metadata
    without = {k: v for k, v in allowed.items() if k != "usage_id"}
    assert read_entry(entry(without)) is None                                # not counted: nothing to settle
    jwt = read_entry(entry({**allowed, "key_id": "jwt:alice"}, {"input_tokens": 1, "output_tokens": 1}))
    assert jwt is not None and jwt.key_id is None and jwt.team_id == "t"


@pytest.mark.parametrize("usage, expected", [
    ({"prompt_tokens": 10, "completion_tokens": 3}, 13),
    ({"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5}, 118),
    ({"output_tokens": 4}, 4),
    ({}, None),
    ({"prompt_tokens": -5}, None),
    ({"prompt_tokens": 1e20}, None),
])
def test_tokens(usage: dict, expected: int | None) -> None:
    assert tokens(usage) == expected


def tpm_used(gateway: Gateway, key: str) -> int:
    return gateway.admin(f"/key/info?key={key}", method="GET").json()["info"]["tpm_used"]


def wait_for(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not seen in {timeout} s"
        time.sleep(0.1)


def call(gateway: Gateway, key: str, path: str, body: dict, usage: str) -> Any:
    return http("POST", gateway.envoy.url + path, body, {"Authorization": f"Bearer {key}", "x-fake-usage": usage})


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                              "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/messages", {"model": "claude-sonnet", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/messages", {"model": "claude-sonnet", "max_tokens": 5, "stream": True,
                      "messages": [{"role": "user", "content": "hi"}]}),
], ids=["openai-json", "openai-sse", "anthropic-json", "anthropic-sse"])
def test_reported_tokens_are_counted_and_tpm_limit_refuses(provider_gateway: Gateway, path: str, body: dict) -> None:
    gateway = provider_gateway
    key = gateway.new_key(models=[body["model"]], tpm_limit=250)
    fresh_window()
    r = call(gateway, key, path, body, "30,40")
    assert r.status == 200, r.text
    wait_for(lambda: tpm_used(gateway, key) == 70, "the first response's 70 tokens")
    # 70, and what it may take (its body's bytes and max_tokens) fit in 250: admitted.
    assert call(gateway, key, path, body, "100,80").status == 200
    wait_for(lambda: tpm_used(gateway, key) == 250, "250 tokens")
    refused = call(gateway, key, path, body, "1,1")
    assert refused.status == 429, refused.text
    assert "tpm_limit is 250 tokens per minute" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1


def test_only_the_top_level_usage_of_a_json_body_is_read(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"], tpm_limit=1000)
    # The fake echoes the request after its own "usage": a client's nested "usage" (as the
    # Responses API echoes tools and schemas) and counts in its text must not count.
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": '"usage": {"prompt_tokens": 900}'}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "tools": [{"usage": {"input_tokens": 1}}]}
    fresh_window()
    assert call(gateway, key, "/v1/chat/completions", body, "3,4").status == 200
    wait_for(lambda: tpm_used(gateway, key) == 7, "exactly the provider's 7 tokens")


def test_usage_after_a_large_body_is_read_across_chunks(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"], tpm_limit=10**6)
    big = {"model": "gpt-4", "messages": [{"role": "user", "content": "x" * 3_000_000}]}
    fresh_window()
    r = http("POST", gateway.envoy.url + "/v1/chat/completions", big,
             {"Authorization": f"Bearer {key}", "x-fake-usage": "1234,5", "x-fake-usage-last": "1"}, timeout=60)
    assert r.status == 200 and len(r.text) > 6_000_000  # passed on whole, not cut at a buffer limit
    wait_for(lambda: tpm_used(gateway, key) == 1239, "the usage at the end of a 6 MB body")


def test_a_client_request_id_cannot_merge_reports(gateway: Gateway) -> None:
    # On a trusted network Envoy keeps the client's x-request-id: the same one on every
    # request must not make the reports after the first look like duplicates.
    key = gateway.new_key(models=["gpt-4"], tpm_limit=1000)
    fresh_window()
    gateway.forget_upstream()
    for _ in range(3):
        # (max_tokens: each holds little of the window while its report is on its way)
        r = http("POST", gateway.envoy.url + "/v1/chat/completions", {"model": "gpt-4", "messages": [],
                                                                       "max_tokens": 5},
                 {"Authorization": f"Bearer {key}", "x-fake-usage": "5,5", "x-request-id": "same-every-time"})
        assert r.status == 200
    wait_for(lambda: tpm_used(gateway, key) == 30, "all three reports")
    # The gateway's marker that turns the usage filter on never reaches the provider.
    assert all("x-extauthz-usage" not in seen["headers"] for seen in gateway.upstream_seen())


def unpriced(sidecar: Any) -> float:
    metrics = http("GET", f"http://127.0.0.1:{sidecar.metrics_port}/metrics").text
    found = re.search(r'^extauthz_usage_reports_total\{result="unpriced"\} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def held(sidecar: Any) -> float:
    metrics = http("GET", f"http://127.0.0.1:{sidecar.metrics_port}/metrics").text
    found = re.search(r'^extauthz_usage_reports_total\{result="held"\} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_response_without_usage_costs_what_it_held(gateway: Gateway, sidecar: Any) -> None:
    # A provider that reports no usage, even asked for it (Azure's API versions before
    # 2024-09-01 on a stream): the call is settled at what it held, never at nothing.
    body = {"model": "gpt-4", "messages": [], "stream": True, "max_tokens": 100}
    hold = len(json.dumps(body)) + 100       # the body's bytes and its max_tokens
    key = gateway.new_key(models=["gpt-4"], tpm_limit=2 * hold + 50)
    before = held(sidecar)
    fresh_window()
    gateway.forget_upstream()
    assert call(gateway, key, "/v1/chat/completions", body, "none").status == 200
    assert all(seen["body"]["stream_options"] == {"include_usage": True} for seen in gateway.upstream_seen())
    wait_for(lambda: held(sidecar) >= before + 1, "a report settled at its hold")
    assert tpm_used(gateway, key) == hold
    assert call(gateway, key, "/v1/chat/completions", body, "none").status == 200
    wait_for(lambda: tpm_used(gateway, key) == 2 * hold, "two holds")
    refused = call(gateway, key, "/v1/chat/completions", body, "none")
    assert refused.status == 429 and f"tpm_limit is {2 * hold + 50}" in refused.json()["error"]["message"]


def test_a_teams_tokens_are_shared_by_its_keys(gateway: Gateway) -> None:
    team = gateway.new_team(models=["gpt-4"], tpm_limit=50)
    one, two = gateway.new_key(team_id=team), gateway.new_key(team_id=team)
    body = {"model": "gpt-4", "messages": []}
    fresh_window()
    assert call(gateway, one, "/v1/chat/completions", body, "30,30").status == 200
    wait_for(lambda: gateway.admin(f"/team/info?team_id={team}", method="GET").json()["team_info"]["tpm_used"] == 60,
             "the team's 60 tokens")
    assert call(gateway, two, "/v1/chat/completions", body, "1,1").status == 429


# -- max_parallel_requests -----------------------------------------------------------------------

def stream_slowly(gateway: Gateway, key: str, read_all: bool = True, started: Any = None) -> Any:
    """A streamed chat whose events come 1.5 s apart (4.5 s in all); with ``read_all`` false
    the client goes away after the first bytes."""
    import http.client
    from urllib.parse import urlsplit
    target = urlsplit(gateway.envoy.url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "gpt-4", "messages": [], "stream": True}),
                 headers={"Authorization": f"Bearer {key}", "content-type": "application/json",
                          "x-fake-delay": "1.5"})
    response = conn.getresponse()
    assert response.status == 200
    first = response.read(16)
    if started is not None:
        started.set()
    if read_all:
        rest = response.read()
        conn.close()
        return first + rest
    conn.close()  # mid-stream
    return first


def test_max_parallel_requests_counts_requests_in_flight(gateway: Gateway) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor
    key = gateway.new_key(models=["gpt-4"], max_parallel_requests=1)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(stream_slowly, gateway, key, True, started)
        assert started.wait(30)
        refused = gateway.chat(key, "gpt-4")  # the stream has seconds to go
        assert refused.status == 429 and refused.headers["retry-after"] == "1"
        assert "max_parallel_requests is 1" in refused.json()["error"]["message"]
        assert b"data:" in slow.result()
    # Its usage report frees the place once the stream has ended.
    wait_for(lambda: gateway.chat(key, "gpt-4").status == 200, "the place freed after the stream")


def test_a_client_sending_one_request_after_another_is_never_refused(gateway: Gateway) -> None:
    # The place is freed before the response's end reaches the client, not when the usage
    # report comes a moment later.
    key = gateway.new_key(models=["gpt-4"], max_parallel_requests=1)
    statuses = [gateway.chat(key, "gpt-4").status for _ in range(20)]
    assert statuses == [200] * 20
    body = {"model": "gpt-4", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    assert [call(gateway, key, "/v1/chat/completions", body, "1,1").status for _ in range(10)] == [200] * 10


def test_the_release_route_is_not_reachable_through_envoy(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"])
    r = http("POST", gateway.envoy.url + "/internal/usage/release", None,
             {"Authorization": f"Bearer {key}", "x-usage-id": "0" * 24})
    assert r.status == 404 and r.json()["error"]["code"] == "unsupported_endpoint"


def test_a_client_that_goes_away_mid_stream_frees_its_place(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"], max_parallel_requests=1)
    stream_slowly(gateway, key, read_all=False)
    wait_for(lambda: gateway.chat(key, "gpt-4").status == 200, "the place freed after the client went away")


# -- what an attacker tried ---------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1beta/models/gemini-flash:generateContent",
                                  "/v1beta/models/gemini-flash:streamGenerateContent",
                                  "/v1beta/models/gemini-flash:streamGenerateContent?alt=sse"])
def test_geminis_usage_metadata_is_counted(provider_gateway: Gateway, path: str) -> None:
    gateway = provider_gateway
    key = gateway.new_key(models=["gemini-flash"], tpm_limit=100)
    fresh_window()
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    r = call(gateway, key, path, body, "30,40")
    assert r.status == 200, r.text
    wait_for(lambda: tpm_used(gateway, key) == 70, "Gemini's 70 tokens (the last, cumulative, count)")


FORGED_SCHEMA = {"type": "object", "prompt_tokens": 999999, "usage": {"input_tokens": 999999, "prompt_tokens": 9},
                 "properties": {"usage": {"type": "object", "output_tokens": 999999}}}


@pytest.mark.parametrize("instructions", ["Be brief.", "x" * 100_000], ids=["short", "event-over-64-KiB"])
def test_a_streamed_echo_of_the_clients_json_cannot_pose_as_usage(gateway: Gateway, instructions: str) -> None:
    # The Responses API echoes the request's tools (their JSON schemas, objects) in its
    # events: counts a client wrote there are never read, only response.usage.
    key = gateway.new_key(models=["gpt-4"], tpm_limit=1_000_000)
    fresh_window()
    body = {"model": "gpt-4", "input": "hi", "stream": True, "instructions": instructions,
            "tools": [{"type": "function", "name": "f", "parameters": FORGED_SCHEMA}]}
    r = call(gateway, key, "/v1/responses", body, "12,3")
    assert r.status == 200 and "response.completed" in r.text and '"prompt_tokens": 999999' in r.text
    wait_for(lambda: tpm_used(gateway, key) == 15, "the response's own 12 + 3 tokens")
    time.sleep(0.3)
    assert tpm_used(gateway, key) == 15


def cut_after(gateway: Gateway, key: str, path: str, body: dict, usage: str, seen: bytes) -> None:
    """A slow stream (1.5 s between its parts), which the client leaves once ``seen`` came."""
    import http.client
    from urllib.parse import urlsplit
    target = urlsplit(gateway.envoy.url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    conn.request("POST", path, body=json.dumps(body), headers={
        "Authorization": f"Bearer {key}", "content-type": "application/json", "x-fake-usage": usage,
        "x-fake-delay": "1.5"})
    response = conn.getresponse()
    assert response.status == 200
    got = b""
    while seen not in got:
        more = response.read1(4096)
        assert more, f"{seen!r} never came"
        got += more
    conn.close()  # long before the stream's end


def test_a_client_that_cuts_a_stream_pays_what_was_reported_or_what_it_held(provider_gateway: Gateway) -> None:
    # Anthropic reports the input tokens in its first event; a client going away before the
    # last one pays those, or what the call held when admitted when that is more.
    key = provider_gateway.new_key(models=["claude-sonnet"], tpm_limit=100_000)
    reported = {"model": "claude-sonnet", "max_tokens": 5, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}
    fresh_window()
    cut_after(provider_gateway, key, "/v1/messages", reported, "500,7", b"message_start")
    wait_for(lambda: tpm_used(provider_gateway, key) == 501, "message_start's 500 input tokens and 1 output token")
    key = provider_gateway.new_key(models=["claude-sonnet"], tpm_limit=100_000)
    fresh_window()
    cut_after(provider_gateway, key, "/v1/messages", {**reported, "max_tokens": 900}, "100,7", b"message_start")
    held = len(json.dumps({**reported, "max_tokens": 900})) + 900  # the body's bytes, and max_tokens
    wait_for(lambda: tpm_used(provider_gateway, key) == held, "what the call held")


def test_a_client_that_cuts_geminis_json_stream_pays_at_least_what_it_held(provider_gateway: Gateway) -> None:
    # streamGenerateContent without alt=sse: a JSON array, each chunk with a running
    # usageMetadata; a client going away after the first pays at least its hold: its
    # body's bytes and an output ceiling (the request names none).
    key = provider_gateway.new_key(models=["gemini-flash"], tpm_limit=100_000)
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    fresh_window()
    cut_after(provider_gateway, key, "/v1beta/models/gemini-flash:streamGenerateContent", body, "40,9",
              b"usageMetadata")
    assert price_of("gemini", "gemini-2.0-flash", {}) is None    # a model the table lacks...
    ceiling = DEFAULT_MAX_OUTPUT_TOKENS                          # ...holds default_max_output_tokens
    wait_for(lambda: tpm_used(provider_gateway, key) == len(json.dumps(body)) + ceiling, "what the call held")


def test_a_caller_cannot_ask_google_to_leave_the_usage_out(provider_gateway: Gateway) -> None:
    # Google's system parameters filter or re-encode the answer: usageMetadata would go.
    gateway = provider_gateway
    key = gateway.new_key(models=["gemini-flash"])
    gateway.forget()
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    r = http("POST", gateway.envoy.url + "/v1beta/models/gemini-flash:generateContent?fields=candidates&%24fields=x"
             "&alt=proto&Alt=PROTO&callback=f&%24callback=g&%24ct=text/plain&prettyPrint=false", body,
             {"Authorization": f"Bearer {key}", "X-Goog-FieldMask": "candidates"})
    assert r.status == 200, r.text
    (seen,) = gateway.seen("gemini")
    for name in ("fields", "alt=", "Alt=", "callback", "%24ct"):
        assert name not in seen["path"], seen["path"]
    assert "prettyPrint=false" in seen["path"]
    assert "x-goog-fieldmask" not in seen["headers"]


def test_a_counted_call_asks_the_provider_for_an_uncompressed_response(gateway: Gateway) -> None:
    # Envoy does not inflate responses: usage in a gzip body could not be read.
    key = gateway.new_key(models=["gpt-4"], tpm_limit=1000)
    gateway.forget_upstream()
    r = http("POST", gateway.envoy.url + "/v1/chat/completions", {"model": "gpt-4", "messages": []},
             {"Authorization": f"Bearer {key}", "accept-encoding": "gzip, br"})
    assert r.status == 200
    (seen,) = gateway.upstream_seen()
    assert seen["headers"]["accept-encoding"] == "identity"
    # (A caller whose calls are not counted is left as it asked: test_budgets, spend_tracking off.)


def test_team_ids_with_colons_do_not_share_counters(gateway: Gateway) -> None:
    a = gateway.new_team(team_id="t-colon", models=["gpt-4"], model_rpm_limit={"gpt-4": 2})
    b = gateway.new_team(team_id="t-colon:model:gpt-4", models=["gpt-4"], rpm_limit=100)
    key_a, key_b = gateway.new_key(team_id=a), gateway.new_key(team_id=b)
    fresh_window()
    for _ in range(3):
        assert gateway.chat(key_b, "gpt-4").status == 200
    assert gateway.chat(key_a, "gpt-4").status == 200


def test_a_model_limit_of_null_is_no_limit_and_patterns_are_refused(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"], model_rpm_limit={"gpt-4": None})
    assert gateway.chat(key, "gpt-4").status == 200
    r = gateway.admin("/key/generate", {"model_rpm_limit": {"gpt-*": 1}})
    assert r.status == 400 and r.json()["error"]["param"] == "model_rpm_limit"


def test_the_decision_log_names_a_key_by_its_prefix_only(gateway: Gateway) -> None:
    from extauthz.telemetry.logs import DecisionLog
    log = DecisionLog("json")
    log.enabled = True
    log.write("deny", "rate_limit_exceeded", 429, {"key_hash": "ab" * 6, "key_id": "ab" * 32}, "r", 0.0)
    assert "ab" * 32 not in "".join(log.lines) and "ab" * 6 in "".join(log.lines)
