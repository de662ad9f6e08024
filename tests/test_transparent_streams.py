"""Streams are transparent: to count a streamed OpenAI-format call the gateway asks the
provider for its usage (stream_options.include_usage), and Envoy's usage filter takes
what that adds out of the stream (the last chunk, with no choices; "usage": null in the
others) once it has read the counts. A client that did not ask gets the bytes the
provider sends a request that did not ask; one that asked gets them unchanged. Through
real Envoy, with the official OpenAI SDK's plain loop and stream helper."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import Gateway
from tests.harness import http
from tests.test_budgets import COST, USAGE
from tests.test_limits import fresh_window
from tests.test_usage import tpm_used, wait_for

HELLO = [{"role": "user", "content": "Hello"}]


def streamed(gateway: Gateway, key: str, body: dict[str, Any], headers: dict[str, str] | None = None,
             path: str = "/v1/chat/completions") -> str:
    r = http("POST", gateway.envoy.url + path, body, {"Authorization": f"Bearer {key}", **(headers or {})})
    assert r.status == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return r.text


def direct(gateway: Gateway, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    """What the provider sends for ``body`` itself (the fake upstream, called directly)."""
    return http("POST", f"http://127.0.0.1:{gateway.upstream_port}{path}", body, headers).text


def as_the_provider_got(gateway: Gateway, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The path and the body the provider got, less what the gateway added to it."""
    (seen,) = gateway.upstream_seen()
    sent = dict(seen["body"])
    assert sent["stream_options"]["include_usage"] is True  # asked, to count the call
    if "stream_options" not in body:
        del sent["stream_options"]
    else:
        sent["stream_options"] = body["stream_options"]
    return seen["path"], sent


@pytest.mark.parametrize("headers", [
    {},
    {"x-fake-crlf": "1"},             # lines ended with \r\n
    {"x-fake-piece-bytes": "7"},      # events cut across the network's chunks
    {"x-fake-piece-bytes": "1", "x-fake-crlf": "1"},
    {"x-fake-unended": "1", "x-fake-piece-bytes": "5"},   # the last event without its newline
    {"x-fake-cr": "1", "x-fake-piece-bytes": "3"},        # lines ended with a bare \r
    {"x-fake-usage-shape": "no-choices"},                 # the usage chunk has no "choices" member
    {"x-fake-usage-shape": "last-choice", "x-fake-piece-bytes": "4"},  # the counts on the last chunk
    {"x-fake-usage-shape": "string-event"},               # an event that is a JSON string
], ids=["plain", "crlf", "pieces", "bytes-crlf", "unended", "cr", "no-choices", "last-choice", "string-event"])
@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "gpt-4", "messages": HELLO, "stream": True}),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": HELLO, "stream": True,
                              "stream_options": {"include_usage": False}}),
    ("/v1/completions", {"model": "gpt-4", "prompt": "Hello", "stream": True}),
], ids=["chat", "chat-asked-not", "completions"])
def test_a_client_that_did_not_ask_gets_the_providers_stream_and_its_tokens_are_counted(
        gateway: Gateway, path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
    key = gateway.new_key(models=["gpt-4"], tpm_limit=100000)
    fresh_window()
    gateway.forget_upstream()
    got = streamed(gateway, key, body, {"x-fake-usage": "7,5", **headers}, path)
    provider_path, provider_body = as_the_provider_got(gateway, body)
    assert got == direct(gateway, provider_path, provider_body, headers)
    assert '"usage"' not in got and '"choices": []' not in got
    assert got.rstrip().endswith("data: [DONE]") and len(got) > 200
    wait_for(lambda: tpm_used(gateway, key) == 12, "the stream's 12 tokens counted")


def test_a_client_that_asked_gets_the_usage_chunk_unchanged(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"], tpm_limit=100000)
    body = {"model": "gpt-4", "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    fresh_window()
    gateway.forget_upstream()
    got = streamed(gateway, key, body, {"x-fake-usage": "7,5"})
    (seen,) = gateway.upstream_seen()
    assert got == direct(gateway, seen["path"], seen["body"], {"x-fake-usage": "7,5"})
    assert '"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5' in got
    wait_for(lambda: tpm_used(gateway, key) == 12, "the stream's 12 tokens counted")


def test_the_common_sdk_loop_reads_every_chunk_and_spend_is_counted(gateway: Gateway) -> None:
    # `for chunk in stream: chunk.choices[0]` raised IndexError on the chunk the gateway
    # had asked for; the call's spend is counted all the same, and the stream helper's too.
    key = gateway.new_key(models=["gpt-4"], max_budget=100)
    client = openai.OpenAI(api_key=key, base_url=gateway.envoy.url + "/v1", max_retries=0)

    def spend() -> float:
        return float(gateway.admin(f"/key/info?key={key}", method="GET").json()["info"]["spend"])

    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="gpt-4", messages=HELLO, stream=True, extra_headers={"x-fake-usage": USAGE}))
    assert text == "fake stream"
    wait_for(lambda: spend() == pytest.approx(COST), "the stream's spend, at its reported usage")
    with client.chat.completions.stream(model="gpt-4", messages=HELLO, extra_headers={"x-fake-usage": USAGE}) as events:
        final = events.get_final_completion()
    assert final.choices[0].message.content == "fake stream" and final.usage is None
    wait_for(lambda: spend() == pytest.approx(2 * COST), "the second stream's spend")


def test_a_shadow_allow_past_its_limit_streams_as_the_provider_sent_too(gateway: Gateway) -> None:
    # Let through uncounted (its limit said no, the team is in shadow mode), but asked for
    # its usage all the same: the client still gets the stream its request would get.
    team = gateway.new_team(models=["gpt-4"], metadata={"enforcement": "shadow"}, max_budget=0)
    key = gateway.new_key(team_id=team)
    body = {"model": "gpt-4", "messages": HELLO, "stream": True}
    gateway.forget_upstream()
    got = streamed(gateway, key, body)
    provider_path, provider_body = as_the_provider_got(gateway, body)
    assert got == direct(gateway, provider_path, provider_body)
    assert '"usage"' not in got
