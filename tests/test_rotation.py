"""Key rotation (/key/regenerate and /key/{key}/regenerate) through real Envoy and Redis:
the new key inherits the old one's record and counters; the old one stops at once or at
the end of its grace period, on every replica and across a restart; a repeated call with
the same new_key answers as the first; and no raw key reaches Envoy's access log."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import pytest

from tests.conftest import Gateway
from tests.harness import MASTER_KEY, Stack, http, start_stack, wait_until
from tests.test_budgets import COST, call, spend_of


def digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def regenerate(gateway: Gateway, key: str, **body: object) -> dict:
    r = gateway.admin("/key/regenerate", {"key": key, **body})
    assert r.status == 200, r.text
    return r.json()


def explained(gateway: Gateway, key: str) -> str:
    """What the gateway's sidecar would decide for ``key`` now, from its own cache."""
    assert gateway.sidecar is not None
    r = http("POST", gateway.sidecar.admin + "/access/explain", {"key": key, "model": "gpt-4", "max_tokens": 500},
             {"Authorization": f"Bearer {MASTER_KEY}"})
    return r.json().get("code", "ok")


def code_of(gateway: Gateway, key: str) -> str:
    r = gateway.chat(key, "gpt-4")
    return "ok" if r.status == 200 else r.json()["error"]["code"]


def test_without_grace_the_old_key_stops_at_once_on_every_replica(gateway: Gateway, replica: Gateway) -> None:
    old = gateway.new_key(models=["gpt-4"], key_alias="rotated-" + secrets.token_hex(4),
                          metadata={"owner": "ml"})
    assert code_of(gateway, old) == code_of(replica, old) == "ok"      # both replicas cache it
    new = regenerate(gateway, old)
    assert new["key"] != old and new["token"] == digest(new["key"]) and new["old_key_expires"] is None
    assert new["models"] == ["gpt-4"] and new["metadata"] == {"owner": "ml"}
    for g in (gateway, replica):
        wait_until(lambda: code_of(g, old) == "invalid_api_key", what="the old key refused")
        assert code_of(g, new["key"]) == "ok"
    # The alias moved with it; the old key is gone from the listings.
    listed = gateway.admin(f"/key/list?key_alias={new['key_alias']}", method="GET").json()["keys"]
    assert listed == [new["token"]]
    assert gateway.admin(f"/key/info?key={old}", method="GET").status == 404


def test_with_grace_both_keys_work_until_it_ends(gateway: Gateway, replica: Gateway) -> None:
    old = gateway.new_key(models=["gpt-4"])
    assert code_of(replica, old) == "ok"
    new = regenerate(gateway, old, grace_period="1h")
    assert new["old_key_expires"] is not None
    for g in (gateway, replica):
        assert code_of(g, old) == "ok" and code_of(g, new["key"]) == "ok"
    # A short grace: the old key stops when it ends, on both replicas; the new one goes on.
    brief = gateway.new_key(models=["gpt-4"])
    assert code_of(replica, brief) == "ok"
    successor = regenerate(gateway, brief, grace_period="2s")
    for g in (gateway, replica):
        wait_until(lambda: code_of(g, brief) == "invalid_api_key", timeout=30, what="the grace period's end")
        assert code_of(g, successor["key"]) == "ok"


def test_a_key_whose_grace_ended_leaves_the_indexes(gateway: Gateway, redis_port: int) -> None:
    import redis
    client = redis.Redis(port=redis_port)
    brief = gateway.new_key(models=["gpt-4"])
    regenerate(gateway, brief, grace_period="1s")
    assert client.sismember("extauthz:keys", digest(brief))      # listed while it works
    # Redis drops its record a minute after; the next rotation unindexes what has ended.
    ended = [m for m in client.zrange("extauthz:retired", 0, -1) if digest(brief) in m.decode()]
    client.zadd("extauthz:retired", dict.fromkeys(ended, 0))
    client.delete(f"extauthz:key:{digest(brief)}")
    regenerate(gateway, gateway.new_key(models=["gpt-4"]))
    assert not client.sismember("extauthz:keys", digest(brief))
    assert not any(digest(brief) in m.decode() for m in client.zrange("extauthz:retired", 0, -1))
    client.close()


def test_the_new_key_inherits_limits_and_spend(gateway: Gateway, replica: Gateway) -> None:
    old = gateway.new_key(models=["gpt-4"], rpm_limit=3, max_budget=10)
    assert call(gateway, old).status == 200
    assert call(gateway, old).status == 200
    wait_until(lambda: spend_of(gateway, old) == pytest.approx(2 * COST), what="the old key's spend")
    new = regenerate(gateway, old, grace_period="1h")["key"]
    assert spend_of(gateway, new) == pytest.approx(2 * COST)
    info = gateway.admin(f"/key/info?key={new}", method="GET").json()["info"]
    assert info["rpm_limit"] == 3 and info["max_budget"] == 10 and info["rpm_used"] == 2
    # One rate window for the two keys while both work: the third call of the minute is the last.
    assert call(replica, new).status == 200
    refused = call(gateway, old)
    assert refused.status == 429, refused.text


def test_a_budget_crossed_by_one_key_refuses_the_other(gateway: Gateway, replica: Gateway) -> None:
    old = gateway.new_key(models=["gpt-4"], max_budget=0.1)
    new = regenerate(gateway, old, grace_period="1h")["key"]
    assert call(replica, new).status == 200          # cached by the replica
    wait_until(lambda: spend_of(gateway, new) == pytest.approx(COST), what="the new key's call settled")
    assert call(gateway, old).status == 200          # 0.12: crossed by the old key's call
    # Asked without a call: the replica reads the line's one spend counter, whichever key crossed it.
    wait_until(lambda: explained(replica, new) == "budget_exceeded", what="the crossing seen by the new key")
    assert call(replica, new).status == 422


def test_a_crossing_reaches_every_key_of_a_line(gateway: Gateway, replica: Gateway) -> None:
    first = gateway.new_key(models=["gpt-4"], max_budget=0.1)
    second = regenerate(gateway, first, grace_period="1h")["key"]
    third = regenerate(gateway, second, grace_period="1h")["key"]
    for key in (first, second, third):
        assert explained(replica, key) == "ok"                  # each cached by the replica
    assert call(gateway, first).status == 200
    wait_until(lambda: spend_of(gateway, third) == pytest.approx(COST), what="the first call settled")
    assert call(gateway, first).status == 200                  # 0.12: crossed by the first key of the line
    for key in (first, second, third):
        wait_until(lambda: explained(replica, key) == "budget_exceeded", what="the crossing seen by every key")


def test_a_repeated_regenerate_with_the_same_new_key_answers_as_the_first(gateway: Gateway) -> None:
    old = gateway.new_key(models=["gpt-4"])
    chosen = "sk-chosen-" + secrets.token_hex(8)
    first = regenerate(gateway, old, new_key=chosen, grace_period="1h")
    count = gateway.admin("/key/list?size=1", method="GET").json()["total_count"]
    again = regenerate(gateway, old, new_key=chosen, grace_period="1h")
    assert again["key"] == first["key"] == chosen and again["token"] == first["token"]
    assert gateway.admin("/key/list?size=1", method="GET").json()["total_count"] == count
    entries = gateway.admin(f"/audit?target={chosen}", method="GET").json()["entries"]
    assert [e["route"] for e in entries] == ["/key/regenerate"]
    # Another new key for a key already regenerated: refused, its successor is the one to rotate.
    r = gateway.admin("/key/regenerate", {"key": old, "new_key": "sk-another-" + secrets.token_hex(8)})
    assert r.status == 409 and r.json()["error"]["code"] == "conflict"


@pytest.mark.parametrize("body,status,param", [
    ({"key": "sk-never-existed-1234"}, 404, None),
    ({"grace_period": "forever"}, 400, "grace_period"),
    ({"grace_period": "1000d"}, 400, "grace_period"),
    ({"new_key": "short"}, 400, "new_key"),
    ({"new_master_key": "sk-new-master"}, 400, "new_master_key"),
    ({"models": ["no-such-model"]}, 400, "models"),
    ({"frobnicate": 1}, 400, "frobnicate"),
])
def test_bad_regenerations_are_refused_and_change_nothing(gateway: Gateway, body: dict, status: int,
                                                          param: str | None) -> None:
    old = gateway.new_key(models=["gpt-4"])
    r = gateway.admin("/key/regenerate", {"key": old, **body})
    assert r.status == status, r.text
    assert r.json()["error"]["param"] == param
    assert code_of(gateway, old) == "ok"


def test_the_new_key_cannot_be_an_existing_key(gateway: Gateway) -> None:
    old, other = gateway.new_key(models=["gpt-4"]), gateway.new_key(models=["gpt-4o"])
    r = gateway.admin("/key/regenerate", {"key": old, "new_key": other})
    assert r.status == 409
    assert code_of(gateway, old) == "ok"
    assert gateway.admin("/key/regenerate", {"key": old, "new_key": old}).status == 400


def test_the_path_form_keeps_the_key_out_of_envoys_access_log(gateway: Gateway) -> None:
    old = gateway.new_key(models=["gpt-4"])
    r = gateway.admin(f"/key/{old}/regenerate", {"models": ["gpt-4", "gpt-4o"]})
    assert r.status == 200, r.text
    new = r.json()
    assert new["models"] == ["gpt-4", "gpt-4o"]
    assert gateway.chat(new["key"], "gpt-4o").status == 200
    assert gateway.admin(f"/key/{old}/regenerate", {"key": "sk-some-other-key"}).status == 400
    log = Path(gateway.envoy.proc.log)
    wait_until(lambda: "/key/{key}/..." in log.read_text(), what="the regenerate call's access log line")
    assert old not in log.read_text() and new["key"] not in log.read_text()


def test_rotation_survives_a_restart(workdir: Path, config_path: Path, redis_port: int, upstream_port: int,
                                     gateway: Gateway) -> None:
    old = gateway.new_key(models=["gpt-4"])
    gone = gateway.new_key(models=["gpt-4"])
    new = regenerate(gateway, old, grace_period="1h")["key"]
    gone_new = regenerate(gateway, gone)["key"]
    stack: Stack | None = None
    for _ in range(2):  # a replica started after the rotation, then restarted
        stack = start_stack(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0")
        try:
            g = Gateway(stack.envoy, upstream_port, stack.sidecar)
            assert code_of(g, old) == code_of(g, new) == code_of(g, gone_new) == "ok"
            assert code_of(g, gone) == "invalid_api_key"
        finally:
            stack.stop()


def test_blocking_or_deleting_the_new_key_stops_the_old_one_in_its_grace(gateway: Gateway,
                                                                          replica: Gateway) -> None:
    old = gateway.new_key(models=["gpt-4"])
    new = regenerate(gateway, old, grace_period="1h")["key"]
    assert code_of(replica, old) == code_of(replica, new) == "ok"
    assert gateway.admin("/key/block", {"key": new}).status == 200
    for g in (gateway, replica):
        wait_until(lambda: code_of(g, old) == "key_blocked", what="the old key blocked with the new one")
    assert gateway.admin("/key/unblock", {"key": new}).status == 200
    wait_until(lambda: code_of(replica, old) == "ok", what="both unblocked")
    assert gateway.admin("/key/delete", {"keys": [new]}).status == 200
    for g in (gateway, replica):
        wait_until(lambda: code_of(g, old) == "invalid_api_key", what="the old key gone with the new one")
    assert explained(replica, old) == "invalid_api_key"


def test_a_second_rotation_without_grace_ends_the_firsts(gateway: Gateway, replica: Gateway) -> None:
    first = gateway.new_key(models=["gpt-4"], key_alias="line-" + secrets.token_hex(4))
    second = regenerate(gateway, first, grace_period="30d")["key"]
    third = regenerate(gateway, second)["key"]
    for g in (gateway, replica):
        wait_until(lambda: code_of(g, first) == "invalid_api_key", what="the first key stopped with the second")
        assert code_of(g, second) == "invalid_api_key" and code_of(g, third) == "ok"


def test_a_key_in_its_grace_can_be_blocked_itself_and_a_retry_tells_the_first_answer(gateway: Gateway) -> None:
    old = gateway.new_key(models=["gpt-4"], key_alias="graced-" + secrets.token_hex(4))
    chosen = "sk-graced-" + secrets.token_hex(8)
    first = regenerate(gateway, old, new_key=chosen, grace_period="30d")
    assert gateway.admin("/key/block", {"key": old}).status == 200         # its alias is its successor's now
    assert code_of(gateway, old) == "key_blocked" and code_of(gateway, chosen) == "ok"
    r = gateway.admin("/key/update", {"key": old, "key_alias": "taken-by-the-old-one"})
    assert r.status == 409
    again = regenerate(gateway, old, new_key=chosen)                        # no grace this time: still the first's
    assert again["old_key_expires"] == first["old_key_expires"] is not None
    regenerate(gateway, chosen)
    r = gateway.admin("/key/regenerate", {"key": old, "new_key": chosen})
    assert r.status == 409                                                  # its successor was rotated since


@pytest.mark.parametrize("new_key", ["sk-\ud800abcdefgh", "sk-1234"])
def test_a_new_key_that_is_no_text_or_the_master_key_is_refused(gateway: Gateway, new_key: str) -> None:
    old = gateway.new_key(models=["gpt-4"])
    r = gateway.admin("/key/regenerate", {"key": old, "new_key": new_key})
    assert r.status == 400 and r.json()["error"]["param"] == "new_key", r.text
    r = gateway.admin(f"/key/{old}/regenerate", {"new_key": new_key})
    assert r.status == 400
    assert code_of(gateway, old) == "ok"
    assert gateway.admin("/key/generate", {"key": "sk-1234"}).status == 400


def test_a_user_regenerates_its_own_keys_only(gateway: Gateway) -> None:
    suffix = secrets.token_hex(4)
    team, user = gateway.new_team(models=["gpt-4"], team_member_permissions=["/key/generate", "/key/regenerate"]), \
        f"rotating-user-{suffix}"
    r = gateway.admin("/user/new", {"user_id": user, "user_role": "internal_user"})
    assert r.status == 200, r.text
    manager = r.json()["key"]
    assert gateway.admin("/team/member_add", {"team_id": team, "member": {"user_id": user, "role": "user"}}).status \
        == 200
    mine = gateway.admin("/key/generate", {"team_id": team}, key=manager).json()["key"]
    other = gateway.new_key(team_id=team)                         # the admin's key in the same team
    new = gateway.admin("/key/regenerate", {"key": mine, "grace_period": "1h"}, key=manager)
    assert new.status == 200, new.text
    assert code_of(gateway, new.json()["key"]) == code_of(gateway, mine) == "ok"
    entry = gateway.admin(f"/audit?target={new.json()['key']}", method="GET").json()["entries"][0]
    assert entry["actor"]["type"] == "key" and entry["actor"]["user_id"] == user
    refused = [gateway.admin("/key/regenerate", {"key": other}, key=manager),          # not its key: as missing
               gateway.admin("/key/regenerate", {"key": new.json()["key"], "new_key": "sk-chosen-" + suffix},
                             key=manager),                                               # no chosen secrets
               gateway.admin("/key/regenerate", {"key": new.json()["key"], "rpm_limit": 100000}, key=manager),
               gateway.admin(f"/key/{new.json()['key']}/regenerate", {}, key=manager)]   # the admin's form only
    assert [r.status for r in refused] == [404, 403, 403, 401], [r.text for r in refused]
    assert code_of(gateway, other) == code_of(gateway, new.json()["key"]) == "ok"


def test_a_key_in_its_grace_is_decided_as_its_successor_and_listed(gateway: Gateway, replica: Gateway) -> None:
    suffix = secrets.token_hex(4)
    team, user = gateway.new_team(models=["gpt-4", "gpt-4o"], team_member_permissions=[
        "/key/generate", "/key/update", "/key/delete", "/key/regenerate"]), f"hiding-user-{suffix}"
    manager = gateway.admin("/user/new", {"user_id": user, "user_role": "internal_user"}).json()["key"]
    assert gateway.admin("/team/member_add", {"team_id": team, "member": {"user_id": user}}).status == 200
    mine = gateway.admin("/key/generate", {"team_id": team}, key=manager).json()["key"]
    # A user keeps its old value an hour at most.
    long = gateway.admin("/key/regenerate", {"key": mine, "grace_period": "90d"}, key=manager)
    assert long.status == 400 and long.json()["error"]["param"] == "grace_period", long.text
    new = gateway.admin("/key/regenerate", {"key": mine, "grace_period": "1h"}, key=manager).json()
    # The admin limits the only key it thought there was: the old value gets the same at once.
    assert gateway.admin("/key/update", {"key": new["token"], "max_budget": 0, "key_type": "llm_api",
                                         "models": ["gpt-4"]}).status == 200
    for g in (gateway, replica):
        wait_until(lambda: code_of(g, mine) == "budget_exceeded", what="the successor's budget on the old key")
    assert gateway.admin("/key/generate", {"team_id": team}, key=mine).status == 403     # llm_api: no admin routes
    # It is listed, with when it stops, under its team and its owner.
    listed = gateway.admin(f"/key/list?team_id={team}&return_full_object=true", method="GET").json()["keys"]
    old = next(k for k in listed if k["token"] == digest(mine))
    assert old["rotated_to"] == new["token"] and old["grace_until"] == new["old_key_expires"]
    info = gateway.admin(f"/user/info?user_id={user}", method="GET").json()
    assert digest(mine) in {k["token"] for k in info["keys"]}
    # Nobody edits it (it would change nothing, or hide something); blocked or deleted, it stops.
    assert gateway.admin("/key/update", {"key": digest(mine), "max_budget": 100}).status == 409
    assert gateway.admin("/key/update", {"key": digest(mine), "metadata": {"x": 1}}, key=manager).status == 409
    assert gateway.admin("/key/delete", {"keys": [digest(mine)]}, key=manager).status == 200
    assert code_of(gateway, mine) == "invalid_api_key"
