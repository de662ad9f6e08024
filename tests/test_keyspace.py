"""Names in Redis, pure: in a cluster every record, index and the audit trail share one
hash slot (one primary runs each admin transaction), and each caller's counters share
their scope's (a request's script runs per scope); elsewhere the names are as they were."""

from __future__ import annotations


import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from extauthz.records.connection import UnusableTarget, target
from extauthz.records.keyspace import Keyspace, scope_of, tagged
from extauthz.domain.budgets import SpendCounter
from extauthz.usage.counters import RateCounters, Settlement
from extauthz.domain.limits import Counter, scope
from tests.test_redis_connection import settings

TEAM = "ml-platform/prod:a"  # an IdP group name: slashes and a colon


def slot(name: str) -> int:
    return key_slot(name.encode())


def test_standalone_names_are_unchanged() -> None:
    k = Keyspace("extauthz:")
    assert k.key_id("h") == "extauthz:key:h" and k.team_id("t") == "extauthz:team:t"
    assert k.counter("rpm:key:h:29930317") == "extauthz:rpm:key:h:29930317"
    assert k.counter(k.settled_mark("u1", "key:h")) == "extauthz:settled:u1"


def test_in_a_cluster_every_record_index_and_the_audit_trail_share_one_slot() -> None:
    k = Keyspace("extauthz:", cluster=True)
    names = [k.key_id("a" * 64), k.key_id("b" * 64), k.team_id(TEAM), k.alias_id("alias"), k.user_id("u@x"),
             k.team_keys_id(TEAM), k.user_keys_id("u@x"), f"{k.prefix}keys", f"{k.prefix}audit",
             f"{k.prefix}replication_probe", k.legacy_alias_id("alias"), k.retired_id, f"{k.prefix}audit_bytes"]
    assert len({slot(n) for n in names}) == 1
    assert k.key_id("h") == "{extauthz:}key:h"


def test_in_a_cluster_a_callers_counters_share_its_scopes_slot_and_spread_by_caller() -> None:
    k = Keyspace("extauthz:", cluster=True)
    where = scope("team", TEAM)
    team_counters = [f"rpm:{where}:1", f"tpm:{where}:model:gpt-4:1", f"inflight:{where}", f"spend:{where}",
                     f"spend:{where}:model:gpt-4:86400s:3", k.settled_mark("u1", where)]
    assert len({slot(k.counter(c)) for c in team_counters}) == 1
    assert k.counter(f"rpm:{where}:1") == "extauthz:rpm:{team:ml-platform%2Fprod%3Aa}:1"
    assert k.counter("settled:u1") == "extauthz:settled:u1"  # no scope: a key of its own
    spread = {slot(k.counter(f"rpm:{scope('key', f'{n:064x}')}:1")) for n in range(200)}
    assert len(spread) > 150  # 200 keys' windows over many slots, not one


@pytest.mark.parametrize("team_id", ["}", "{x}", "a}b{c", "{", "x:{key:h}"])
def test_no_team_id_chooses_another_slot_or_tag(team_id: str) -> None:
    """A brace in an id is percent-encoded by scope(): the tag stays the scope itself."""
    k = Keyspace("extauthz:", cluster=True)
    where = scope("team", team_id)
    assert "{" not in where and "}" not in where
    name = k.counter(f"rpm:{where}:1")
    assert name == "extauthz:rpm:{" + where + "}:1"
    assert slot(name) == slot("{" + where + "}")


def test_scope_and_tag_of_a_counter_suffix() -> None:
    assert scope_of("rpm:key:h:1") == "key:h" and scope_of("inflight:team:t") == "team:t"
    assert scope_of("settled:u1") is None and scope_of("replication_probe") is None
    assert tagged("inflight:team:t") == "inflight:{team:t}" and tagged("settled:u1") == "settled:u1"
    # A user's spend (its personal keys') has its own slot; a member's shares its team's.
    assert tagged("spend:user:u%2F1:86400s:3") == "spend:{user:u%2F1}:86400s:3"
    assert tagged("spend:team:t:member:ann") == "spend:{team:t}:member:ann"


def test_a_prefix_with_a_brace_is_refused_in_a_cluster() -> None:
    for prefix in ("{tenant}:", ""):  # (an empty tag {} is no tag: records would spread over slots)
        with pytest.raises(ValueError, match="empty or holds a brace"):
            Keyspace(prefix, cluster=True)
    assert Keyspace("{tenant}:").key_id("h") == "{tenant}:key:h"  # standalone: no slots to decide


def counters(cluster: bool) -> RateCounters:
    return RateCounters(aioredis.Redis(), Keyspace("p:", cluster), 1.0)  # (no connection is made)


def test_a_request_is_admitted_slot_by_slot_in_a_cluster_only() -> None:
    ks, ts = scope("key", "h"), scope("team", "t")
    request = [Counter(f"rpm:{ks}:1", 5, "rpm_limit", "key"), Counter(f"inflight:{ks}", 2, "p", "key", 1, "s"),
               Counter(f"rpm:{ts}:1", 9, "rpm_limit", "team")]
    assert counters(False)._by_slot(request) == [request]
    assert counters(True)._by_slot(request) == [request[:2], request[2:]]
    assert counters(True)._by_slot([]) == []


def test_a_settlement_is_split_by_scope_in_a_cluster_each_part_with_its_own_mark() -> None:
    ks, ts = scope("key", "h"), scope("team", "t")
    spend = [SpendCounter(f"spend:{ks}", 1.0, None, None, None),
             SpendCounter(f"spend:{ts}", 5.0, None, None, None)]
    item = Settlement("u1", 30, [f"tpm:{ks}:1", f"tpm:{ts}:1"], [f"inflight:{ks}"], 0.5, spend)
    (whole,) = counters(False)._parts([item])
    assert whole.mark == "settled:u1" and whole.item == item and whole.spend_at == (0, 1)
    key_part, team_part = counters(True)._parts([item])
    assert key_part.mark == f"settled:{ks}:u1" and team_part.mark == f"settled:{ts}:u1"
    assert key_part.item.counters == [f"tpm:{ks}:1"] and key_part.item.inflight == [f"inflight:{ks}"]
    assert team_part.item.counters == [f"tpm:{ts}:1"] and team_part.item.inflight == []
    assert key_part.spend_at == (0,) and team_part.spend_at == (1,)
    assert key_part.item.spend == [spend[0]] and team_part.item.spend == [spend[1]]
    # A JWT caller without a team has no scope: one part, its mark a key of its own.
    (alone,) = counters(True)._parts([Settlement("u2", 0, [], [], None)])
    assert alone.mark == "settled:u2"


def test_cluster_settings_that_cannot_work_are_refused() -> None:
    found = target(settings(redis_url="redis://10.0.0.1:7000", redis_mode="cluster",
                            redis_cluster_nodes=("10.0.0.2:7000", "10.0.0.1:7000")))
    assert found.cluster_nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7000))  # the URL's first, once each
    assert found.describe().startswith("cluster via 10.0.0.1:7000,10.0.0.2:7000")
    for given, why in (({"redis_url": "unix:///r.sock"}, "redis:// or rediss://"),
                       ({"redis_url": "redis://r:7000/2"}, "only database 0"),
                       ({"redis_cluster_nodes": ("r",)}, r"not host:port \("),
                       ({"key_prefix": "a{b}:"}, "brace"),
                       ({"key_prefix": ""}, "empty")):
        with pytest.raises(UnusableTarget, match=why):
            target(settings(**{"redis_url": "redis://r:7000", "redis_mode": "cluster", **given}))
    # A seed given as a URL with a password, by mistake: refused, and not repeated.
    with pytest.raises(UnusableTarget) as refused:
        target(settings(redis_url="redis://r:7000", redis_mode="cluster",
                        redis_cluster_nodes=("redis://:s3cret@node1:7000",)))
    assert "s3cret" not in str(refused.value)
    with pytest.raises(UnusableTarget, match="redis_mode is not cluster"):
        target(settings(redis_cluster_nodes=("r:7000",)))


def test_the_master_key_is_no_scope_of_a_settled_mark_in_a_cluster() -> None:
    k = Keyspace("p:", cluster=True)
    assert k.settled_mark("u", scope("key", "master")) == "settled:key:master:u"
    assert k.counter(k.settled_mark("u", scope("key", "master"))) == "p:settled:{key:master}:u"

