"""Budgets (max_budget, budget_duration, soft_budget, model_max_budget) on keys and teams:
the pure rules, the settlement script on a real Redis, and what a caller sees through
Envoy: spend priced from the provider's reported usage, the request after the crossing
refused with 422 budget_exceeded, on every replica, and a new period starting afresh."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis.asyncio as aioredis

from extauthz.check.json_body import read_json_model
from extauthz.check.routing import usage_edit
from extauthz.domain import budgets
from extauthz.domain.budgets import Budget, ModelBudget, Period, SpendCounter
from extauthz.records.keyspace import Keyspace
from extauthz.usage.counters import OVER, SOFT, RateCounters, Settlement
from tests.conftest import Gateway
from tests.harness import http, start_stack
from tests.test_usage import wait_for

# gpt-4's bundled price: 3e-05 USD per input token, 6e-05 per output token.
USAGE = "1000,500"
COST = 0.06


# -- pure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc, expected", [
    ({}, None),
    ({"max_budget": None, "model_max_budget": {}}, None),
    ({"max_budget": 0}, Budget(0.0)),
    ({"max_budget": 10, "budget_duration": "1mo", "soft_budget": 8}, Budget(10.0, 8.0, Period(0, 1))),
    ({"budget_duration": "30s"}, Budget(period=Period(30))),   # spend resets, nothing refused
    ({"model_max_budget": {"gpt-4o": 5}, "budget_duration": "1d"},
     Budget(None, None, Period(86400), (ModelBudget("gpt-4o", 5.0, Period(86400)),))),
    ({"model_max_budget": {"gpt-4o": {"budget_limit": 0.5, "time_period": "1h"}}},
     Budget(models=(ModelBudget("gpt-4o", 0.5, Period(3600)),))),
])
def test_parse(doc: dict, expected: Budget | None) -> None:
    assert budgets.parse(doc) == expected


@pytest.mark.parametrize("doc", [
    {"max_budget": -1}, {"max_budget": "10"}, {"max_budget": True}, {"max_budget": float("nan")},
    {"max_budget": 1e13}, {"budget_duration": "0d"}, {"budget_duration": "1y"}, {"budget_duration": 30},
    {"budget_duration": "99999999d"}, {"model_max_budget": {"gpt-*": 1}}, {"model_max_budget": ["gpt-4"]},
    {"model_max_budget": {"gpt-4": {"budget_limit": 1, "per": "1d"}}},
])
def test_a_careless_budget_is_refused_and_fails_closed(doc: dict) -> None:
    with pytest.raises(ValueError):
        budgets.parse(doc)
    assert budgets.read(doc) == Budget(max=0.0)  # a record written by hand refuses, not lifts


def test_periods_are_shared_by_every_replica_without_talking() -> None:
    # 1d resets at midnight UTC, 1h on the hour; months are calendar months in UTC.
    noon = 1_764_244_800.0  # 2025-11-27T12:00:00Z
    assert budgets.bounds(Period(86400), noon) == (20419, 1_764_288_000.0)   # 2025-11-28T00:00Z
    assert budgets.bounds(Period(3600), noon + 1) == (490068, noon + 3600)
    assert budgets.bounds(Period(0, 1), noon)[1] == 1_764_547_200.0          # 2025-12-01T00:00Z
    december = 1_765_000_000.0                                               # 2025-12-06
    assert budgets.bounds(Period(0, 1), december)[1] == 1_767_225_600.0      # 2026-01-01T00:00Z
    assert budgets.bounds(Period(0, 12), noon)[1] == 1_767_225_600.0         # a year: on January 1st


def test_a_call_is_admitted_against_this_periods_counter_and_its_models() -> None:
    budget = Budget(1.0, period=Period(60), models=(ModelBudget("gpt-4o", 0.1, None),))
    (counter,) = budgets.admission_counters("key:h", "Key='ci'", budget, "gpt-4", 6_000_030.0, 0.02)
    assert counter.suffix == "spend:key:h:60s:100000" and counter.reset_at == 6_000_060.0
    assert (counter.limit, counter.take, counter.kind, counter.name) == (1.0, 0.02, "b", "max_budget")
    assert counter.expires_at == 6_000_060.0 + budgets.SPEND_GRACE_S
    # Next minute: another counter, whose spend starts at 0.
    (later,) = budgets.admission_counters("key:h", "Key='ci'", budget, "gpt-4", 6_000_061.0, 0.02)
    assert later.suffix == "spend:key:h:60s:100001"
    whole, own = budgets.admission_counters("key:h", "Key='ci'", budget, "gpt-4o", 6_000_030.0, 0.02)
    assert own.suffix == "spend:key:h:model:gpt-4o" and own.model == "gpt-4o" and own.kind == "b"
    assert own.name == "model_max_budget" and own.expires_at == 0.0
    # A soft budget or a period alone refuses nothing: no counter to be admitted against.
    assert budgets.admission_counters("key:h", "Key='ci'", Budget(soft=1.0), "gpt-4", 1.0, 0.02) == []


def test_a_refusal_says_what_was_spent_of_what() -> None:
    counter = budgets.admission_counters("key:h", "Key='ci'", Budget(0.1, period=Period(3600)), "gpt-4", 3700.0,
                                         0.05)[0]
    deny = budgets.refusal(counter, 0.12, {"key_hash": "ab"})
    assert deny.status == 422 and deny.code == "budget_exceeded" and deny.type == "budget_exceeded"
    assert deny.message == ("Budget has been exceeded! Key='ci' Current cost: 0.12, Max budget: 0.1. "
                            "It resets at 1970-01-01T02:00:00+00:00.")
    assert deny.metadata == {"key_hash": "ab", "limit": "max_budget"}
    # An estimate that does not fit in what is left is named, as LiteLLM's strict budgets do.
    deny = budgets.refusal(counter, 0.08, None)
    assert "Current cost: 0.08, Estimated request cost: 0.05, Max budget: 0.1." in deny.message


@pytest.mark.parametrize("body, edited", [
    # No stream_options: one added as the first member, every other byte as sent.
    (b'{"model":"gpt-4","stream":true,"messages":[]}',
     b'{"stream_options": {"include_usage": true}, "model":"gpt-4","stream":true,"messages":[]}'),
    (b' \n{ "stream": true}', b' \n{"stream_options": {"include_usage": true},  "stream": true}'),
    # include_usage set where it is, the client's other options byte for byte.
    (b'{"stream": true, "stream_options": {"include_usage": false, "x": 1.00000000000000001}, "model": "m"}',
     b'{"stream": true, "stream_options": {"include_usage": true, "x": 1.00000000000000001}, "model": "m"}'),
    (b'{"stream": true, "stream_options": {"x": "\xc3\xa9"}}',
     b'{"stream": true, "stream_options": {"include_usage": true, "x": "\xc3\xa9"}}'),
    (b'{"stream": true, "stream_options": {}}', b'{"stream": true, "stream_options": {"include_usage": true}}'),
    (b'{"stream": true, "stream_options": null, "model": "m"}',
     b'{"stream": true, "stream_options": {"include_usage": true}, "model": "m"}'),
    (b'{"model": "m", "stream": false}', None),
    (b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}', None),
    (b'{"model": "m", "messages": [{"content": "\\"stream\\": true"}]}', None),
    (b'{"model": "m", "x": {"stream": true}}', None),
    # Names spelled with escapes are read as every parser reads them.
    (b'{"model":"m","str\\u0065am":true}', b'{"stream_options": {"include_usage": true}, "model":"m","str\\u0065am":true}'),
    (b'{"stream":true,"stream_option\\u0073":{"include_usage":false}}',
     b'{"stream":true,"stream_option\\u0073":{"include_usage":true}}'),
])
def test_a_streamed_openai_request_is_asked_for_its_usage(body: bytes, edited: bytes | None) -> None:
    edit = usage_edit(read_json_model(body))
    if edited is None:
        assert edit is None
        return
    start, end, original, text = edit
    assert body[start:end] == original and body[:start] + text + body[end:] == edited
    json.loads(edited)


@pytest.mark.parametrize("body, param", [
    # What a lenient reader would stream from without being asked for its usage.
    (b'{"model": "m", "stream": 1}', "stream"), (b'{"model": "m", "stream": "true"}', "stream"),
    (b'{"model": "m", "Stream": true}', "stream"), (b'{"model": "m", "STREAM_OPTIONS": {}, "stream": true}',
                                                     "stream_options"),
    (b'{"stream": true, "stream_options": {"include_usage": false, "INCLUDE_USAGE": false}}', "include_usage"),
    (b'{"stream": true, "stream_options": []}', "stream_options"),
])
def test_a_stream_a_lenient_reader_could_start_unasked_is_refused(body: bytes, param: str) -> None:
    problem = usage_edit(read_json_model(body))
    assert problem is not None and problem.code == "invalid_request_body" and problem.param == param


def test_a_wildcard_route_is_priced_by_the_model_requested(config_path: Path) -> None:
    from extauthz import config
    from extauthz.check.runtime import Runtime
    from extauthz.usage.prices import price_of
    runtime = Runtime.of(config.load(str(config_path)))
    (route_id,) = [r.route_id for r in runtime.catalog.routes.values() if r.deployment.model_name == "openai/*"]
    assert runtime.prices[route_id] is None                        # "openai/*" names no model to price
    assert runtime.price(route_id, "openai/gpt-4o") == price_of("openai", "gpt-4o", {}) is not None
    assert runtime.price(route_id, "openai/no-such-model") is None  # unpriced (logged), never another's price


# -- the settlement script, on a real Redis ---------------------------------------------------------

def test_settlement_adds_the_cost_once_and_flags_the_crossings(redis_port: int) -> None:
    async def run() -> None:
        redis = aioredis.Redis(port=redis_port, db=9)
        await redis.flushdb()
        counters = RateCounters(redis, Keyspace("t:"), 2.0)
        spend = [SpendCounter("spend:key:h", 0.1, 0.05, None, None)]

        async def settle(usage_id: str, cost: float | None, which: list = spend) -> list[int] | None:
            (flags,) = await counters.settle([Settlement(usage_id, 0, [], [], cost, which)])
            return flags

        assert await settle("u1", 0.04) == [0]
        assert await settle("u1", 0.04) is None        # a report sent twice
        assert await settle("u2", 0.04) == [SOFT]      # 0.08: past the soft budget
        assert await settle("u3", 0.01) == [0]         # past it already: no new flag
        assert await settle("u4", 0.04) == [OVER]      # 0.13 >= 0.1
        assert float(await redis.get("t:spend:key:h")) == pytest.approx(0.13)
        assert await settle("u5", None) == []          # unpriced: no spend
        periodic = [SpendCounter("spend:key:h:60s:1", None, None, None, time.time() + 100)]
        assert await settle("u6", 1e-9, periodic) == [0]
        assert 0 < await redis.ttl("t:spend:key:h:60s:1") <= 101
        assert await counters.spent(["spend:key:h:60s:1", "spend:none"]) == [1e-9, 0.0]
        # A batch: each request once, tokens and in-flight places too.
        await redis.zadd("t:inflight:key:h", {"u7": time.time() + 600})
        batch = [Settlement("u7", 30, ["tpm:key:h:1"], ["inflight:key:h"], 0.5, spend),
                 Settlement("u7", 30, ["tpm:key:h:1"], ["inflight:key:h"], 0.5, spend),
                 Settlement("u8", 12, ["tpm:key:h:1"], ["inflight:key:h"], None, spend)]
        assert await counters.settle(batch) == [[OVER], None, []]
        assert int(await redis.get("t:tpm:key:h:1")) == 42 and await redis.zcard("t:inflight:key:h") == 0
        assert float(await redis.get("t:spend:key:h")) == pytest.approx(0.63)
        await redis.aclose()
    asyncio.run(run())


# -- through Envoy --------------------------------------------------------------------------------

def spend_of(gateway: Gateway, key: str) -> float:
    return gateway.admin(f"/key/info?key={key}", method="GET").json()["info"]["spend"]


def call(gateway: Gateway, key: str, model: str = "gpt-4", usage: str = USAGE, **body: Any) -> Any:
    # max_tokens: what the call may cost (its hold) is about 0.03, well inside these budgets.
    return http("POST", gateway.envoy.url + "/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500, **body},
                {"Authorization": f"Bearer {key}", "x-fake-usage": usage})


def test_the_request_after_the_crossing_is_refused(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"], max_budget=0.1, key_alias="budgeted")
    assert call(gateway, key).status == 200
    wait_for(lambda: spend_of(gateway, key) == pytest.approx(COST), "the first response's cost")
    # 0.06 < 0.1: allowed, holding what is left of the budget (its estimate is more) until
    # its usage is settled; it takes the spend to 0.12.
    assert call(gateway, key).status == 200
    wait_for(lambda: spend_of(gateway, key) == pytest.approx(0.12), "the second response's cost")
    refused = call(gateway, key)
    error = refused.json()["error"]
    assert refused.status == 422 and error["type"] == "budget_exceeded" and error["code"] == "budget_exceeded"
    assert "Key='budgeted' Current cost: 0.12, Max budget: 0.1" in error["message"]
    info = gateway.admin(f"/key/info?key={key}", method="GET").json()["info"]
    assert info["spend"] == pytest.approx(0.12) and info["max_budget"] == 0.1 and info["budget_reset_at"] is None
    assert info["not_enforced"] == []
    # An admin raising the budget lets the key through again at once (the record changed);
    # a spend it sends (as LiteLLM's clients may) is not the counted one.
    assert gateway.admin("/key/update", {"key": key, "max_budget": 1, "spend": 0}).status == 200
    assert call(gateway, key).status == 200
    info = gateway.admin(f"/key/info?key={key}", method="GET").json()["info"]
    assert info["spend"] >= 0.12 and info["not_enforced"] == []


def test_a_streamed_call_is_priced_from_its_last_chunk(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"])
    gateway.forget_upstream()
    r = call(gateway, key, stream=True)  # no stream_options: the gateway asks for the usage
    assert r.status == 200 and '"usage"' not in r.text  # (the client did not ask for it)
    (seen,) = gateway.upstream_seen()
    sent = json.loads(seen["body"]) if isinstance(seen["body"], str) else seen["body"]
    assert sent["stream_options"] == {"include_usage": True} and sent["stream"] is True
    wait_for(lambda: spend_of(gateway, key) == pytest.approx(COST), "the streamed response's cost")


def test_a_teams_budget_holds_for_all_its_keys_and_a_models_for_its_model(gateway: Gateway) -> None:
    team = gateway.new_team(models=["gpt-4", "gpt-4o"], max_budget=0.05)
    one, two = gateway.new_key(team_id=team), gateway.new_key(team_id=team)
    assert call(gateway, one).status == 200                      # 0.06: the team's budget is spent
    wait_for(lambda: gateway.admin(f"/team/info?team_id={team}", method="GET").json()["team_info"]["spend"]
             == pytest.approx(COST), "the team's spend settled (its hold trued up)")
    assert call(gateway, two, usage="0,0").status == 422
    error = call(gateway, two, "gpt-4o").json()["error"]
    assert error["type"] == "budget_exceeded" and "Team=" in error["message"]
    listed = {t["team_id"]: t for t in gateway.admin("/team/list", method="GET").json()}
    assert listed[team]["spend"] == pytest.approx(COST)
    keys = gateway.admin(f"/key/list?team_id={team}&return_full_object=true", method="GET").json()["keys"]
    assert sorted(k["spend"] for k in keys) == pytest.approx([0.0, COST])

    key = gateway.new_key(models=["gpt-4", "gpt-4o"], model_max_budget={"gpt-4": 0.01})
    assert call(gateway, key, max_tokens=500).status == 422    # what it may cost (0.03) does not fit
    assert call(gateway, key, max_tokens=100).status == 200    # 0.008 does
    wait_for(lambda: call(gateway, key, usage="0,0").status == 422, "gpt-4's budget enforced")
    assert call(gateway, key, "gpt-4o").status == 200           # another model: its own budget (none)
    wait_for(lambda: gateway.admin(f"/key/info?key={key}", method="GET").json()["info"]["model_spend"]
             == {"gpt-4": pytest.approx(COST)}, "gpt-4's spend settled")


def test_a_soft_budget_warns_and_allows(gateway: Gateway, sidecar: Any) -> None:
    key = gateway.new_key(models=["gpt-4"], soft_budget=0.05)
    assert call(gateway, key).status == 200
    wait_for(lambda: spend_of(gateway, key) == pytest.approx(COST), "the cost")
    assert call(gateway, key).status == 200
    metrics = http("GET", f"http://127.0.0.1:{sidecar.metrics_port}/metrics").text
    assert "extauthz_soft_budget_crossings_total" in metrics and "extauthz_spend_usd_total" in metrics
    assert "soft budget crossed" in Path(sidecar.proc.log).read_text()


def test_a_new_period_starts_afresh(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"], max_budget=0.05, budget_duration="15s")
    left = 15 - time.time() % 15
    if left < 10:
        time.sleep(left + 0.2)    # the whole of what follows within one period
    assert call(gateway, key).status == 200
    wait_for(lambda: call(gateway, key, usage="0,0").status == 422, "the budget enforced", timeout=8)
    wait_for(lambda: spend_of(gateway, key) == pytest.approx(COST), "the cost settled", timeout=4)
    info = gateway.admin(f"/key/info?key={key}", method="GET").json()["info"]
    reset_at = info["budget_reset_at"]
    assert reset_at is not None and info["spend"] == pytest.approx(COST)
    time.sleep(max(0.0, 15 - time.time() % 15) + 0.5)
    assert call(gateway, key, usage="0,0").status == 200
    wait_for(lambda: spend_of(gateway, key) == 0, "a free call's hold given back", timeout=4)
    info = gateway.admin(f"/key/info?key={key}", method="GET").json()["info"]
    assert info["spend"] == 0 and info["budget_reset_at"] > reset_at


def test_a_budget_is_never_lifted_by_a_call_whose_cost_cannot_be_counted(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4", "azure-gpt-3.5", "openai/*"], max_budget=5)
    gateway.forget_upstream()
    # A deployment without a price (an operator's Azure name, no base_model): refused.
    r = call(gateway, key, "azure-gpt-3.5")
    error = r.json()["error"]
    assert r.status == 403 and error["code"] == "unpriced_model" and "input_cost_per_token" in error["message"]
    # A wildcard route: priced by the model requested, refused for one the table lacks.
    assert call(gateway, key, "openai/gpt-4o").status == 200
    assert call(gateway, key, "openai/made-up-model").json()["error"]["code"] == "unpriced_model"
    # An endpoint not priced per token.
    r = http("POST", gateway.envoy.url + "/v1/images/generations", {"model": "gpt-4", "prompt": "a cat"},
             {"Authorization": f"Bearer {key}"})
    assert r.status == 403 and "not priced per token" in r.json()["error"]["message"]
    # A stream a lenient server could start without being asked for its usage.
    r = call(gateway, key, stream=1)
    assert r.status == 400 and r.json()["error"]["param"] == "stream"
    assert len(gateway.upstream_seen()) == 1
    # Without a budget the same calls go through (counted where they can be).
    free = gateway.new_key(models=["azure-gpt-3.5"])
    assert call(gateway, free, "azure-gpt-3.5").status == 200


@pytest.mark.parametrize("body, param", [
    ({"max_budget": -1}, "max_budget"), ({"max_budget": 10**400}, "max_budget"),
    ({"model_max_budget": {"gpt-4": {}}}, "model_max_budget"), ({"max_budget": "5"}, "max_budget"),
    ({"budget_duration": "0d"}, "budget_duration"), ({"budget_duration": "1y"}, "budget_duration"),
    ({"model_max_budget": {"gpt-*": 1}}, "model_max_budget"), ({"soft_budget": True}, "soft_budget"),
])
def test_a_careless_budget_is_refused_by_the_admin_api(gateway: Gateway, body: dict, param: str) -> None:
    r = gateway.admin("/key/generate", body)
    assert r.status == 400 and r.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def replica(workdir: Path, config_path: Path, redis_port: int, upstream_port: int) -> Iterator[Gateway]:
    """A second sidecar and Envoy on the same Redis, with spend_tracking off."""
    stack = start_stack(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0",
                        {"EXTAUTHZ_SPEND_TRACKING": "false"})
    try:
        yield Gateway(stack.envoy, upstream_port, stack.sidecar)
    finally:
        stack.stop()


def test_a_budget_holds_on_every_replica_at_once(gateway: Gateway, replica: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"], max_budget=0.05)
    assert call(replica, key).status == 200          # it held the budget's whole 0.05, then settled at 0.06
    refused = call(gateway, key)                     # at once, whether or not the report has arrived
    assert refused.status == 422 and refused.json()["error"]["type"] == "budget_exceeded"
    wait_for(lambda: spend_of(gateway, key) == pytest.approx(COST), "the cost settled")
    assert call(replica, key, usage="0,0").status == 422


def test_without_spend_tracking_only_callers_with_limits_are_counted(gateway: Gateway, replica: Gateway) -> None:
    free = gateway.new_key(models=["gpt-4"])
    replica.forget_upstream()
    r = http("POST", replica.envoy.url + "/v1/chat/completions",
             {"model": "gpt-4", "messages": [], "stream": True},
             {"Authorization": f"Bearer {free}", "accept-encoding": "gzip", "x-fake-usage": USAGE})
    assert r.status == 200
    (seen,) = replica.upstream_seen()
    assert seen["headers"]["accept-encoding"] == "gzip" and "stream_options" not in seen["body"]
    budgeted = gateway.new_key(models=["gpt-4"], max_budget=10)
    assert call(replica, budgeted).status == 200
    wait_for(lambda: spend_of(gateway, budgeted) == pytest.approx(COST), "the budgeted key's cost")
    time.sleep(0.5)
    assert spend_of(gateway, free) == 0


def test_where_envoy_sends_no_usage_reports_a_limit_that_needs_them_refuses(workdir: Path, config_path: Path,
                                                                            redis_port: int,
                                                                            upstream_port: int) -> None:
    # Istio and Envoy Gateway, until the usage filter is added (the standalone overlay).
    stack = start_stack(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0",
                        {"EXTAUTHZ_USAGE_REPORTS": "false"})
    try:
        g = Gateway(stack.envoy, upstream_port, stack.sidecar)
        for limit in ({"max_budget": 10}, {"tpm_limit": 1000}, {"max_parallel_requests": 2}):
            r = call(g, g.new_key(models=["gpt-4"], **limit))
            assert r.status == 403 and r.json()["error"]["code"] == "usage_not_reported", (limit, r.text)
        team = g.new_team(models=["gpt-4"], budget_duration="1d", max_budget=5)
        assert call(g, g.new_key(team_id=team)).json()["error"]["code"] == "usage_not_reported"
        # rpm_limit needs no report: it holds; a caller without limits goes as it was sent.
        limited = g.new_key(models=["gpt-4"], rpm_limit=1)
        left = 60 - time.time() % 60
        if left < 10:
            time.sleep(left + 0.5)
        assert call(g, limited).status == 200 and call(g, limited).status == 429
        free = g.new_key(models=["gpt-4"])
        g.forget_upstream()
        r = http("POST", g.envoy.url + "/v1/chat/completions", {"model": "gpt-4", "messages": [], "stream": True},
                 {"Authorization": f"Bearer {free}", "accept-encoding": "gzip"})
        assert r.status == 200
        (seen,) = g.upstream_seen()
        assert seen["headers"]["accept-encoding"] == "gzip" and "stream_options" not in seen["body"]
    finally:
        stack.stop()


def test_the_budget_status_is_litellms_and_settable_as_there() -> None:
    from extauthz.config import ConfigError, from_dict
    model = {"model_name": "m", "litellm_params": {"model": "openai/gpt-4o", "api_key": "x"}}
    assert from_dict({"model_list": [model]}).budget_exceeded_status == 422
    set_back = from_dict({"model_list": [model], "litellm_settings": {"budget_exceeded_status_code": 429}})
    assert set_back.budget_exceeded_status == 429 and not any("budget_exceeded" in w for w in set_back.warnings)
    for bad in (200, "429", True):
        with pytest.raises(ConfigError, match="budget_exceeded_status_code"):
            from_dict({"model_list": [model], "litellm_settings": {"budget_exceeded_status_code": bad}})


def test_the_openai_sdk_raises_its_unprocessable_entity_error_for_a_spent_budget(gateway: Gateway) -> None:
    import openai
    key = gateway.new_key(models=["gpt-4"], max_budget=0)
    client = openai.OpenAI(base_url=f"{gateway.envoy.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 422 and refused.value.body["code"] == "budget_exceeded"


def test_a_key_whose_budget_is_spent_lists_no_models_as_in_litellm(gateway: Gateway) -> None:
    import openai
    key = gateway.new_key(models=["gpt-4"], max_budget=0, key_alias="spent-lister")
    listed = http("GET", gateway.envoy.url + "/v1/models", None, {"Authorization": f"Bearer {key}"})
    assert listed.status == 422 and listed.json()["error"]["code"] == "budget_exceeded"
    assert "Key='spent-lister'" in listed.json()["error"]["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        openai.OpenAI(base_url=f"{gateway.envoy.url}/v1", api_key=key, max_retries=0).models.list()
    assert http("GET", gateway.envoy.url + "/v1/models", None,
                {"Authorization": f"Bearer {gateway.new_key(models=['gpt-4'], max_budget=1)}"}).status == 200
