"""Holds: what a call may cost is held against its budgets and token windows when it is
admitted, atomically with the check, and trued up when its usage is settled. The
estimate (pure), the admission and settlement scripts on a real Redis, and, through real
Envoy and Redis with the official SDK as concurrent clients, the ways a client could
spend past a limit: concurrent bursts and streams cut before their usage."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from extauthz.records.keyspace import Keyspace
from extauthz.domain import budgets
from extauthz.domain.budgets import SpendCounter
from extauthz.usage.counters import RateCounters, Settlement
from extauthz.usage.estimate import DEFAULT_MAX_OUTPUT_TOKENS, Estimate, estimate
from extauthz.domain.limits import Counter
from extauthz.usage.prices import Price, price_of

PRICE = Price(1e-6, 2e-6, max_output=1000, max_input=50_000)


# -- the estimate (pure) --------------------------------------------------------------------------

@pytest.mark.parametrize("doc, operation, tokens", [
    ({"max_tokens": 10}, "chat/completions", 100 + 10),
    ({"max_completion_tokens": 10, "max_tokens": 20}, "chat/completions", 100 + 20),   # the most it asks for
    ({"max_output_tokens": 50}, "responses", 100 + 50),
    ({}, "chat/completions", 100 + 1000),                                              # the model's ceiling
    ({"max_tokens": 10**9}, "chat/completions", 100 + 10**9),      # as asked: a table's ceiling may be old
    ({"max_tokens": 10, "n": 3}, "chat/completions", 100 + 30),
    ({"max_tokens": 10, "best_of": 4, "n": 2}, "completions", 100 + 40),
    ({"generationConfig": {"maxOutputTokens": 7, "candidateCount": 2}}, "generateContent", 100 + 14),
    ({"inferenceConfig": {"maxTokens": 9}}, "converse", 100 + 9),
    ({"max_tokens": "10"}, "chat/completions", 100 + 1000),      # not a number a provider is held to
    ({"max_tokens": True}, "chat/completions", 100 + 1000),
    ({"max_tokens": 0}, "chat/completions", 100 + 1000),
    ({"max_tokens": 10, "MAX_TOKENS": 900}, "chat/completions", 100 + 1000),  # a lenient reader's other value
    ({"max_tokens": 10, "N": 5}, "chat/completions", 100 + 5 * 1000),   # its count counts, at the ceiling
    ({"max_tokens": 10, "n": "8"}, "chat/completions", 100 + 128 * 10),    # a count read leniently: the most
    ({"max_tokens": 10, "n": 8.0}, "chat/completions", 100 + 128 * 10),
    ({"max_tokens": 10, "n": None}, "chat/completions", 100 + 10),
    ({"generationConfig": {"maxOutputTokens": 7, "candidateCount": "8"}}, "generateContent", 100 + 128 * 7),
    ({"generation_config": {"max_output_tokens": 7, "candidate_count": 8}}, "generateContent", 100 + 8 * 1000),
    ({"previous_response_id": "resp_1", "max_output_tokens": 5}, "responses", 50_000 + 5),  # stored context
    ({"prompt": {"id": "pmpt_1"}, "max_output_tokens": 5}, "responses", 50_000 + 5),
    ({"prompt": "inline text", "max_tokens": 5}, "completions", 100 + 5),
    ({"max_tokens": 10}, "embeddings", 100),                     # no output
    ({}, "moderations", 100),
    ({}, "messages/count_tokens", 100),
])
def test_the_estimate_bounds_what_a_call_asks_for(doc: dict, operation: str, tokens: int) -> None:
    found = estimate(doc, 100, operation, PRICE)
    assert found.tokens == tokens
    held_input = 50_000 if tokens >= 50_000 and tokens < 10**9 else 100
    assert found.cost == pytest.approx(held_input * 1e-6 + (tokens - held_input) * 2e-6)


@pytest.mark.parametrize("doc", [
    {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]},
    {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x/a.pdf"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/i.png"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": "https://x"}}]}]},
    {"contents": [{"parts": [{"fileData": {"fileUri": "https://youtube.com/watch?v=1"}}]}]},
    {"tools": [{"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 10}]},
    {"tools": [{"type": "web_search_preview"}]},
    {"mcp_servers": [{"type": "url", "url": "https://mcp"}]},
])
def test_input_the_provider_fetches_holds_the_models_input_window(doc: dict) -> None:
    assert estimate(dict(doc, max_tokens=5), 100, "chat/completions", PRICE).tokens == 50_000 + 5
    # An image sent inline is in the body's bytes already.
    inline = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,AAAA"}}]}], "max_tokens": 5}
    assert estimate(inline, 100, "chat/completions", PRICE).tokens == 100 + 5


def test_a_forms_size_is_its_input_and_its_count_multiplies() -> None:
    assert estimate(None, 5000, "images/edits", PRICE, form_counts=("4",)).tokens == 5000 + 4 * 1000
    assert estimate(None, 5000, "images/edits", PRICE, form_counts=("4.0",)).tokens == 5000 + 128 * 1000
    assert estimate(None, 5000, "audio/transcriptions", PRICE).tokens == 5000 + 1000


def test_an_unknown_models_ceiling_is_the_default_and_an_unpriced_call_has_no_cost() -> None:
    assert estimate({}, 10, "chat/completions", None) == Estimate(10 + DEFAULT_MAX_OUTPUT_TOKENS, None)
    assert estimate({}, 10, "chat/completions", None, default_max_output=50) == Estimate(60, None)
    # Input that may be billed as a cache write is held at that price.
    cached = Price(1e-6, 2e-6, cache_write=3e-6, max_output=10)
    assert estimate({}, 100, "messages", cached).cost == pytest.approx(100 * 3e-6 + 10 * 2e-6)


# -- the scripts, on a real Redis -----------------------------------------------------------------

def budget(limit: float, take: float, suffix: str = "spend:key:h") -> Counter:
    return Counter(suffix, limit, "max_budget", "Key='k'", take, "b")


def tokens(limit: int, take: int, suffix: str = "tpm:key:h:1") -> Counter:
    return Counter(suffix, limit, "tpm_limit", "key 'k'", take, "t")


def run(redis_port: int, body: Any) -> None:
    async def main() -> None:
        redis = aioredis.Redis(port=redis_port, db=9)
        await redis.flushdb()
        try:
            await body(redis, RateCounters(redis, Keyspace("t:"), 2.0))
        finally:
            await redis.aclose()
    asyncio.run(main())


async def value(redis: aioredis.Redis, name: str) -> float:
    return float(await redis.get("t:" + name) or 0)


def test_calls_in_flight_hold_their_estimate_which_must_fit(redis_port: int) -> None:
    async def body(redis: aioredis.Redis, counters: RateCounters) -> None:
        guess = Estimate(0, 0.2)
        assert await counters.admit([budget(0.5, 0.2)], "u1", 1.0, guess) is None
        assert await counters.admit([budget(0.5, 0.2)], "u2", 1.0, guess) is None
        assert await value(redis, "spend:key:h") == pytest.approx(0.4)
        refused = await counters.admit([budget(0.5, 0.2)], "u3", 1.0, guess)   # 0.6 > 0.5
        assert refused is not None and refused[1] == pytest.approx(0.4)
        deny = budgets.refusal(refused[0], refused[1], None)
        assert "Current cost: 0.4, Estimated request cost: 0.2, Max budget: 0.5." in deny.message
        assert "max_tokens" in deny.message
        assert await counters.admit([budget(0.5, 0.1)], "u4", 1.0, Estimate(0, 0.1)) is None   # one that fits
        assert await value(redis, "spend:key:h") == pytest.approx(0.5)
        # A peek answers and takes nothing.
        assert (await counters.peek([budget(0.5, 0.0)], 1.0)) is not None
        assert await value(redis, "spend:key:h") == pytest.approx(0.5)
        held = json.loads(await redis.get("t:hold:u2"))
        assert held["k"] == {"t:spend:key:h": [pytest.approx(0.2), "b"]} and held["x"] == 0.2
        # A budget of 0 refuses even a free call, as in LiteLLM.
        assert await counters.admit([budget(0, 0.0, "spend:key:z")], "u5", 1.0, Estimate(0, 0.0)) is not None
    run(redis_port, body)


def test_a_token_window_holds_the_estimate_and_refuses_once_full(redis_port: int) -> None:
    async def body(redis: aioredis.Redis, counters: RateCounters) -> None:
        guess = Estimate(2500, None)
        assert await counters.admit([tokens(6000, 2500)], "u1", 1.0, guess) is None
        assert await counters.admit([tokens(6000, 2500)], "u2", 1.0, guess) is None
        assert await value(redis, "tpm:key:h:1") == 5000
        assert await counters.admit([tokens(6000, 2500)], "u3", 1.0, guess) is not None   # 7500 > 6000
        assert await counters.admit([tokens(6000, 1000)], "u4", 1.0, Estimate(1000, None)) is None
        assert 0 < await redis.ttl("t:tpm:key:h:1") <= 65
        # A call larger than the whole window is admitted into an empty one only.
        assert await counters.admit([tokens(6000, 9000, "tpm:key:h:2")], "u5", 1.0, Estimate(9000, None)) is None
        assert await counters.admit([tokens(6000, 1, "tpm:key:h:2")], "u6", 1.0, Estimate(1, None)) is not None
    run(redis_port, body)


def test_settlement_trues_a_hold_up_or_keeps_it_for_a_call_that_did_not_end(redis_port: int) -> None:
    async def body(redis: aioredis.Redis, counters: RateCounters) -> None:
        spend = [SpendCounter("spend:key:h", 10.0, None, None, None)]

        async def admitted(usage_id: str) -> None:
            assert await counters.admit([budget(10, 0.3), tokens(10_000, 900)], usage_id, 1.0,
                                        Estimate(900, 0.3)) is None

        def report(usage_id: str, used: int, cost: float | None, ended: bool) -> Settlement:
            return Settlement(usage_id, used, ["tpm:key:h:1"], [], cost, spend, held=True, ended=True) \
                if ended else Settlement(usage_id, used, ["tpm:key:h:1"], [], cost, spend, True, False)

        await admitted("done")
        assert await counters.settle([report("done", 100, 0.05, True)]) == [[0]]   # what it reported
        assert await value(redis, "spend:key:h") == pytest.approx(0.05)
        assert await value(redis, "tpm:key:h:1") == 100
        assert await redis.get("t:hold:done") is None
        assert await counters.settle([report("done", 100, 0.05, True)]) == [None]  # sent twice: once
        await admitted("cut")
        assert await counters.settle([report("cut", 0, None, False)]) == [[0]]     # nothing reported: its hold
        assert await value(redis, "spend:key:h") == pytest.approx(0.35)
        assert await value(redis, "tpm:key:h:1") == 1000
        await admitted("partly")
        assert await counters.settle([report("partly", 2000, 0.4, False)]) == [[0]]  # reported more: that
        assert await value(redis, "spend:key:h") == pytest.approx(0.75)
        assert await value(redis, "tpm:key:h:1") == 3000
        await admitted("lost")  # a report that never comes: its hold stays counted
        assert await value(redis, "spend:key:h") == pytest.approx(1.05)
        assert 0 < await redis.ttl("t:hold:lost") <= 780
    run(redis_port, body)


def test_a_counter_it_did_not_hold_is_charged_at_least_the_estimate(redis_port: int) -> None:
    async def body(redis: aioredis.Redis, counters: RateCounters) -> None:
        # The team holds (a budget); the key's spend counter (none) is not held, and a cut
        # call costs it the estimate too.
        assert await counters.admit([budget(10, 0.3, suffix="spend:team:t")], "u1", 1.0, Estimate(900, 0.3)) is None
        spend = [SpendCounter("spend:key:h", None, None, None, None),
                 SpendCounter("spend:team:t", 10.0, None, None, None)]
        assert await counters.settle([Settlement("u1", 0, [], [], None, spend, True, False)]) == [[0, 0]]
        assert await value(redis, "spend:key:h") == pytest.approx(0.3)
        assert await value(redis, "spend:team:t") == pytest.approx(0.3)
    run(redis_port, body)


def test_a_hold_is_trued_up_in_the_window_it_was_taken_in(redis_port: int) -> None:
    async def body(redis: aioredis.Redis, counters: RateCounters) -> None:
        assert await counters.admit([tokens(10_000, 900, "tpm:key:h:7")], "u1", 1.0, Estimate(900, None)) is None
        # Settled a minute later (the window's name is the admission's, passed by the report).
        await counters.settle([Settlement("u1", 50, ["tpm:key:h:7"], [], None, (), True, True)])
        assert await value(redis, "tpm:key:h:7") == 50
        # A window gone by the time of the settlement is not brought back.
        assert await counters.admit([tokens(10_000, 900, "tpm:key:h:8")], "u2", 1.0, Estimate(900, None)) is None
        await redis.delete("t:tpm:key:h:8")
        await counters.settle([Settlement("u2", 50, ["tpm:key:h:8"], [], None, (), True, True)])
        assert await redis.get("t:tpm:key:h:8") is None
    run(redis_port, body)


def test_a_hold_outlives_its_call() -> None:
    # A hold record outlives the longest call (Envoy's route timeout), so its settlement
    # always finds it; a spend period's counter outlives the period by an hour.
    from extauthz.usage.counters import HOLD_TTL_S, INFLIGHT_MAX_S
    assert HOLD_TTL_S > INFLIGHT_MAX_S and budgets.SPEND_GRACE_S > INFLIGHT_MAX_S


# -- through Envoy, as a client would try it -------------------------------------------------------

# A prompt of 1,000 bytes: the fake provider's 1,000 prompt tokens are within what its body
# bounds (a token is at least a byte). gpt-4: 3e-05 USD per input token, 6e-05 per output.
PROMPT = "x" * 1000
CALL_COST = 1000 * 3e-05 + 2000 * 6e-05   # 0.15: the usage "1000,2000"


def client(gateway: Any, key: str) -> Any:
    import openai
    return openai.AsyncOpenAI(base_url=f"{gateway.envoy.url}/v1", api_key=key, max_retries=0, timeout=60)


async def burst(gateway: Any, key: str, n: int, usage: str, **body: Any) -> list[int]:
    """``n`` chat calls at once through the official SDK: the status each got."""
    import openai
    sdk = client(gateway, key)

    async def one() -> int:
        try:
            await sdk.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": PROMPT}],
                                              extra_headers={"x-fake-usage": usage, "x-fake-delay": "0.5"}, **body)
            return 200
        except openai.APIStatusError as e:
            return e.status_code
    try:
        return list(await asyncio.gather(*(one() for _ in range(n))))
    finally:
        await sdk.close()


def key_info(gateway: Any, key: str) -> dict:
    return gateway.admin(f"/key/info?key={key}", method="GET").json()["info"]


def test_concurrent_calls_never_spend_past_a_budget(gateway: Any) -> None:
    from tests.test_usage import wait_for
    key = gateway.new_key(models=["gpt-4"], max_budget=0.5)
    statuses = asyncio.run(burst(gateway, key, 40, "1000,2000", max_tokens=2000))
    admitted = statuses.count(200)
    # Each holds what it may cost (0.153: its body and max_tokens): three fit in 0.5.
    assert set(statuses) == {200, 422} and admitted == 3, statuses
    wait_for(lambda: key_info(gateway, key)["spend"] == pytest.approx(3 * CALL_COST), "the three calls settled")
    # Settled at 0.45, what is left (0.05) holds no call of this size: refused, naming the estimate.
    r = asyncio.run(burst(gateway, key, 1, "1000,2000", max_tokens=2000))
    assert r == [422]
    assert asyncio.run(burst(gateway, key, 1, "10,10", max_tokens=10)) == [200]   # a small call still fits


def test_concurrent_calls_never_take_a_token_window_past_its_limit(gateway: Any) -> None:
    from tests.test_limits import fresh_window
    from tests.test_usage import wait_for
    key = gateway.new_key(models=["gpt-4"], tpm_limit=6000)
    fresh_window()
    statuses = asyncio.run(burst(gateway, key, 30, "1000,2000", max_tokens=2000))
    admitted = statuses.count(200)
    assert set(statuses) == {200, 429} and admitted == 1, statuses   # 3,100 held each: one fits with another's
    wait_for(lambda: key_info(gateway, key)["tpm_used"] == 3000, "the call settled")
    assert asyncio.run(burst(gateway, key, 5, "1000,2000", max_tokens=2000)).count(200) == 0   # 3,000 + 3,100
    assert asyncio.run(burst(gateway, key, 1, "10,10", max_tokens=10)) == [200]


def cut_stream(gateway: Any, key: str, path: str, body: dict, first: bytes) -> int:
    """A slow stream (1.5 s between its events) that the client leaves after ``first``."""
    import http.client
    from urllib.parse import urlsplit
    target = urlsplit(gateway.envoy.url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    conn.request("POST", path, body=json.dumps(body), headers={
        "Authorization": f"Bearer {key}", "content-type": "application/json", "x-fake-usage": "1000,2000",
        "x-fake-delay": "1.5"})
    response = conn.getresponse()
    if response.status != 200:
        conn.close()
        return response.status
    got = b""
    while first not in got:
        more = response.read1(4096)
        assert more, f"{first!r} never came"
        got += more
    conn.close()  # before the usage
    return 200


@pytest.mark.parametrize("path, body, first", [
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": PROMPT}], "stream": True},
     b"fake "),
    ("/v1/completions", {"model": "gpt-4", "prompt": PROMPT, "stream": True}, b"fake "),
    ("/v1/responses", {"model": "gpt-4", "input": PROMPT, "stream": True}, b"output_text"),
], ids=["chat", "completions", "responses"])
def test_streams_cut_before_their_usage_cost_what_they_held(gateway: Any, path: str, body: dict,
                                                            first: bytes) -> None:
    from tests.test_usage import wait_for
    key = gateway.new_key(models=["gpt-4"], max_budget=0.5)
    # Each may cost 0.27 (its bytes, and gpt-4's 4,096 output tokens): the first holds it,
    # the second does not fit beside it.
    served = [cut_stream(gateway, key, path, body, first) for _ in range(8)]
    assert served.count(200) == 1 and set(served) == {200, 422}, served
    held = len(json.dumps(body)) * 3e-05 + 4096 * 6e-05
    wait_for(lambda: key_info(gateway, key)["spend"] == pytest.approx(held), "the cut stream settled at its hold")
    assert cut_stream(gateway, key, path, body, first) == 422


def test_an_anthropic_stream_cut_after_its_input_tokens_costs_what_it_held(provider_gateway: Any) -> None:
    # Anthropic tells the input tokens in its first event: a client leaving after it paid
    # only those; now it pays what the call held (its bytes, and its max_tokens).
    from tests.test_usage import wait_for
    price = price_of("anthropic", "claude-sonnet-4-5", {})
    assert price is not None
    body = {"model": "claude-sonnet", "max_tokens": 4000, "stream": True,
            "messages": [{"role": "user", "content": PROMPT}]}
    held = len(json.dumps(body)) * max(price.input, price.cache_write or 0) + 4000 * price.output
    key = provider_gateway.new_key(models=["claude-sonnet"], max_budget=held * 1.5)
    served = [cut_stream(provider_gateway, key, "/v1/messages", body, b"message_start") for _ in range(8)]
    assert served.count(200) == 1 and set(served) == {200, 422}, served
    wait_for(lambda: key_info(provider_gateway, key)["spend"] == pytest.approx(held), "the hold settled")


def test_a_cut_stream_holds_a_token_window(gateway: Any) -> None:
    from tests.test_limits import fresh_window
    from tests.test_usage import wait_for
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": PROMPT}], "stream": True, "max_tokens": 500}
    key = gateway.new_key(models=["gpt-4"], tpm_limit=4000)
    fresh_window()
    assert cut_stream(gateway, key, "/v1/chat/completions", body, b"fake ") == 200
    held = len(json.dumps(body)) + 500
    wait_for(lambda: key_info(gateway, key)["tpm_used"] == held, "the cut stream's hold kept in the window")
