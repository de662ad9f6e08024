"""Rate limits (rpm_limit, model_rpm_limit) on keys and teams: the pure rules, the Redis
admission script, and what a caller sees through Envoy, with two replicas sharing Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis.asyncio as aioredis

from extauthz.domain import limits
from extauthz.records.keyspace import Keyspace
from extauthz.usage.counters import RateCounters, Settlement
from extauthz.domain.limits import Counter, Limits, rate_counters
from tests.conftest import Gateway, example_stack
from tests.harness import start_stack


# -- pure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc, expected", [
    ({}, None),
    ({"rpm_limit": None, "model_rpm_limit": {}}, None),
    ({"rpm_limit": 10}, Limits(10)),
    ({"rpm_limit": 0}, Limits(0)),
    ({"rpm_limit": 5.0}, Limits(5)),
    ({"model_rpm_limit": {"gpt-4": 2, "gpt-4o": 3}}, Limits(None, (("gpt-4", 2), ("gpt-4o", 3)))),
])
def test_parse(doc: dict, expected: Limits | None) -> None:
    assert limits.parse(doc) == expected


@pytest.mark.parametrize("doc", [
    {"rpm_limit": -1}, {"rpm_limit": 1.5}, {"rpm_limit": "10"}, {"rpm_limit": True}, {"rpm_limit": float("inf")},
    {"rpm_limit": float("nan")}, {"rpm_limit": 10**12},
    {"model_rpm_limit": ["gpt-4"]}, {"model_rpm_limit": {"gpt-4": "2"}}, {"model_rpm_limit": {"": 2}},
])
def test_unreadable_limits_are_refused_and_fail_closed(doc: dict) -> None:
    with pytest.raises(ValueError):
        limits.parse(doc)
    assert limits.read(doc) == Limits(rpm=0)  # a record written by hand refuses, not lifts


def test_counters_are_per_scope_model_and_minute() -> None:
    key, team = Limits(5, (("gpt-4", 1),)), Limits(10)
    now = 6_000_030.0  # 30 s into minute 100000
    taken = rate_counters([("key:h", "key 'k'", key), ("team:t", "team 't'", team)], "gpt-4", now)
    assert [(c.suffix, c.limit, c.name) for c in taken] == [
        ("rpm:key:h:100000", 5, "rpm_limit"), ("rpm:key:h:model:gpt-4:100000", 1, "model_rpm_limit"),
        ("rpm:team:t:100000", 10, "rpm_limit")]
    assert [c.name for c in rate_counters([("key:h", "k", key)], "gpt-4o", now)] == ["rpm_limit"]
    assert rate_counters([("key:h", "k", None)], "gpt-4", now) == []


def test_tokens_are_counted_only_where_a_limit_reads_them() -> None:
    limited, per_model = Limits(rpm=5), Limits(model_tpm=(("gpt-4", 100),))
    now = 6_000_030.0
    assert limits.usage_counters([("key:a", limited), ("team:t", None)], "gpt-4", now) == ["tpm:key:a:100000"]
    assert limits.usage_counters([("key:a", per_model)], "gpt-4", now) == [
        "tpm:key:a:100000", "tpm:key:a:model:gpt-4:100000"]
    assert limits.usage_counters([("key:a", per_model)], "gpt-4o", now) == ["tpm:key:a:100000"]
    assert limits.usage_counters([("key:a", None)], "gpt-4", now) == []


def test_a_parallel_limit_is_a_set_of_requests_in_flight() -> None:
    taken = rate_counters([("key:h", "key 'k'", Limits(parallel=2))], "gpt-4", 6_000_030.0)
    assert taken == [Counter("inflight:key:h", 2, "max_parallel_requests", "key 'k'", 1, "s")]
    deny = limits.refusal(taken[0], 6_000_030.0, None)
    assert deny.status == 429 and deny.headers == (("retry-after", "1"),)
    assert "max_parallel_requests is 2" in deny.message
    assert limits.parse({"max_parallel_requests": 0}) == Limits(parallel=0)


def test_admission_of_requests_in_flight(redis_port: int) -> None:
    async def run() -> None:
        redis = aioredis.Redis(port=redis_port, db=9)
        await redis.flushdb()
        counters = RateCounters(redis, Keyspace("t:"), 2.0)
        place = Counter("inflight:key:a", 2, "max_parallel_requests", "key", 1, "s")
        now = time.time()
        assert await counters.admit([place], "u1", now) is None
        assert await counters.admit([place], "u2", now) is None
        assert await counters.admit([place], "u3", now) == (place, 2)
        await counters.settle([Settlement("u1", 0, [], ["inflight:key:a"])])  # u1 ended: its place is free
        assert await counters.admit([place], "u3", now) is None
        assert await counters.admit([place], "u4", now) == (place, 2)
        # A report never came for u2 and u3: their places lapse after the route timeout.
        assert await counters.admit([place], "u4", now + 661) is None
        await redis.aclose()
    asyncio.run(run())


def test_a_refusal_names_the_limit_and_when_to_retry() -> None:
    deny = limits.refusal(Counter("x", 5, "rpm_limit", "key 'ci'"), 6_000_045.2, {"key_hash": "ab"})
    assert deny.status == 429 and deny.code == "rate_limit_exceeded" and deny.type == "rate_limit_error"
    assert deny.headers == (("retry-after", "15"),)
    assert "key 'ci'" in deny.message and "rpm_limit is 5 requests per minute" in deny.message
    assert deny.metadata == {"key_hash": "ab", "limit": "rpm_limit"}


# -- the admission script, on a real Redis -------------------------------------------------------

def test_admission_takes_every_counter_or_none(redis_port: int) -> None:
    async def run() -> None:
        redis = aioredis.Redis(port=redis_port, db=9)
        await redis.flushdb()
        counters = RateCounters(redis, Keyspace("t:"), 2.0)
        key, team = Counter("rpm:key:a:1", 3, "rpm_limit", "key"), Counter("rpm:team:t:1", 2, "rpm_limit", "team")
        assert await counters.admit([key, team]) is None
        assert await counters.admit([key, team]) is None
        assert await counters.admit([key, team]) == (team, 2)     # the team is full...
        assert int(await redis.get("t:rpm:key:a:1")) == 2      # ...and the key's place was not taken
        assert await counters.admit([key]) is None
        assert await counters.admit([key]) == (key, 3)
        assert 0 < await redis.ttl("t:rpm:key:a:1") <= 65
        await redis.aclose()
    asyncio.run(run())


# -- through Envoy --------------------------------------------------------------------------------

def fresh_window() -> None:
    """Start a test's requests early in a minute, so that none of them straddles two windows."""
    left = 60 - time.time() % 60
    if left < 20:
        time.sleep(left + 0.5)


def test_a_keys_rpm_limit(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4", "gpt-4o"], rpm_limit=2)
    fresh_window()
    assert gateway.chat(key, "gpt-4").status == 200
    # A request refused for its model takes no place in the window.
    assert gateway.chat(key, "claude-3").status == 403
    gateway.forget_upstream()
    assert gateway.chat(key, "gpt-4o").status == 200
    refused = gateway.chat(key, "gpt-4")
    assert refused.status == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    assert "rpm_limit is 2" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert len(gateway.upstream_seen()) == 1  # the refused one never reached the provider
    info = gateway.admin(f"/key/info?key={key}", method="GET").json()["info"]
    assert info["rpm_limit"] == 2 and "rpm_limit" not in info["not_enforced"]
    assert info["rpm_used"] == 2  # this minute's window: the two admitted, not the refused


def test_a_teams_rpm_limit_is_shared_by_its_keys_and_a_models_is_its_own(gateway: Gateway) -> None:
    team = gateway.new_team(models=["gpt-4", "gpt-4o"], rpm_limit=3, model_rpm_limit={"gpt-4o": 1})
    one, two = gateway.new_key(team_id=team), gateway.new_key(team_id=team)
    fresh_window()
    assert gateway.chat(one, "gpt-4o").status == 200
    assert gateway.chat(two, "gpt-4o").status == 429          # the team's gpt-4o minute is used
    assert gateway.chat(two, "gpt-4").status == 200
    assert gateway.chat(one, "gpt-4").status == 200
    r = gateway.chat(two, "gpt-4")
    assert r.status == 429 and "team" in r.json()["error"]["message"]
    info = gateway.admin(f"/team/info?team_id={team}", method="GET").json()
    assert info["team_info"]["rpm_used"] == 3
    listed = {t["team_id"]: t for t in gateway.admin("/team/list", method="GET").json()}
    assert listed[team]["rpm_used"] == 3
    keys = gateway.admin(f"/key/list?team_id={team}&return_full_object=true", method="GET").json()["keys"]
    # Keys without a limit of their own take no counter: they show none (a 0 would read as unused).
    assert [("rpm_used" in k, "tpm_used" in k) for k in keys] == [(False, False)] * 2


@pytest.mark.parametrize("body, param", [({"rpm_limit": -1}, "rpm_limit"), ({"rpm_limit": "5"}, "rpm_limit"),
                                         ({"model_rpm_limit": {"gpt-4": 1.5}}, "model_rpm_limit")])
def test_a_careless_limit_is_refused(gateway: Gateway, body: dict, param: str) -> None:
    r = gateway.admin("/key/generate", body)
    assert r.status == 400 and r.json()["error"]["param"] == param


def test_the_limit_holds_across_replicas(gateway: Gateway, replica: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"], rpm_limit=3)
    fresh_window()
    statuses = [g.chat(key, "gpt-4").status for g in (gateway, replica, gateway, replica, gateway)]
    assert statuses == [200, 200, 200, 429, 429]


def test_without_redis_a_rate_limited_key_fails_closed(workdir: Path, config_path: Path,
                                                       upstream_port: int) -> None:
    # A key known to the cache, whose limit cannot be counted: refused (503), not let through.
    from tests.harness import start_redis
    proc, port = start_redis(workdir)
    stack = start_stack(workdir, config_path, f"redis://127.0.0.1:{port}/0")
    try:
        g = Gateway(stack.envoy, upstream_port, stack.sidecar)
        limited, free = g.new_key(models=["gpt-4"], rpm_limit=100), g.new_key(models=["gpt-4"])
        assert g.chat(limited, "gpt-4").status == 200 and g.chat(free, "gpt-4").status == 200
        proc.stop()
        r = g.chat(limited, "gpt-4")
        assert r.status == 503 and r.json()["error"]["code"] == "authz_unavailable"
    finally:
        stack.stop()
        proc.stop()


def test_the_limit_metric_labels_a_bounded_set_of_teams() -> None:
    from extauthz.telemetry.metrics import LIMIT_DENIALS, LIMIT_TEAM_LABELS, CheckMetrics

    def count(limit: str, team: str) -> float:
        return LIMIT_DENIALS.labels(limit, team)._value.get()

    metrics = CheckMetrics("probe")
    before = count("rpm_limit", "other")
    for i in range(LIMIT_TEAM_LABELS + 5):
        metrics.limited("rpm_limit", f"bounded-team-{i}")
    assert count("rpm_limit", "bounded-team-0") >= 1
    assert count("rpm_limit", "other") - before == 5      # past the bound, one series for the rest
    metrics.limited("rpm_limit", "bounded-team-0")        # a team already labelled keeps its label
    assert count("rpm_limit", "other") - before == 5
    metrics.limited("tpm_limit", None)
    assert count("tpm_limit", "none") >= 1


# -- another name for the same model --------------------------------------------------------------

ALIASED = {"gpt4-alias": "gpt-4", "gpt4-hidden": {"model": "gpt-4", "hidden": True}}


def test_a_model_and_its_aliases_are_one_model_for_per_model_limits() -> None:
    from tests.test_policy import catalog_of, deployment
    catalog = catalog_of(deployment("gpt-4", "openai/gpt-4"), deployment("*", "openai/*"), aliases=ALIASED)
    whole = frozenset({"gpt-4", "gpt4-alias", "gpt4-hidden"})
    assert catalog.same_model("gpt-4") == catalog.same_model("gpt4-alias") == catalog.same_model("gpt4-hidden") \
        == whole
    assert catalog.same_model("openai/gpt-4o") == {"openai/gpt-4o"}   # a name a pattern serves is its own
    assert catalog.same_model("nothing-serves-this") == {"nothing-serves-this"}
    # The counter is the limit's, whichever name the call asked for.
    key = Limits(model_rpm=(("gpt-4", 1),))
    for asked in ("gpt-4", "gpt4-alias"):
        (counter,) = rate_counters([("key:h", "k", key)], catalog.same_model(asked), 6_000_030.0)
        assert counter.suffix == "rpm:key:h:model:gpt-4:100000"
    assert rate_counters([("key:h", "k", Limits(model_rpm=(("gpt4-alias", 1),)))], catalog.same_model("gpt-4"),
                         6_000_030.0)[0].suffix == "rpm:key:h:model:gpt4-alias:100000"
    # One name is a name, never a string whose substrings match.
    assert rate_counters([("key:h", "k", Limits(model_rpm=(("gpt-4", 1),)))], "gpt-4o", 6_000_030.0) == []


@pytest.fixture(scope="module")
def aliased(workdir: Path, upstream_port: int, redis_port: int) -> Iterator[Gateway]:
    def alias(config: dict) -> None:
        config["router_settings"] = {"model_group_alias": {"gpt4-alias": "gpt-4"}}
    with example_stack(workdir, upstream_port, f"redis://127.0.0.1:{redis_port}/8", "aliased", alias) as gateway:
        yield gateway


def test_an_alias_takes_its_models_limits_and_budget(aliased: Gateway) -> None:
    fresh_window()
    limited = aliased.new_key(models=["gpt-4", "gpt4-alias"], model_rpm_limit={"gpt-4": 1})
    assert aliased.chat(limited, "gpt4-alias").status == 200
    refused = aliased.chat(limited, "gpt-4")                   # the same model, by its own name
    assert refused.status == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert aliased.chat(limited, "gpt4-alias").status == 429
    budgeted = aliased.new_key(models=["gpt-4", "gpt4-alias", "gpt-4o"], model_max_budget={"gpt4-alias": 0})
    for asked in ("gpt-4", "gpt4-alias"):
        spent = aliased.chat(budgeted, asked)
        assert spent.status == 422 and spent.json()["error"]["code"] == "budget_exceeded", asked
    assert aliased.chat(budgeted, "gpt-4o").status == 200      # another model: its own budget (none)
