"""Self-service that no ordinary user can abuse, through real Envoy and Redis: a user's
keys, metadata and admin writes are bounded (and so is what every tenant shares: Redis,
the audit trail); LiteLLM's default and upper-bound key parameters apply to every key
minted; secrets are kept out of the audit trail whatever they are named; readiness
details stay off the public listener."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from tests.conftest import Gateway, example_stack
from tests.harness import MASTER_KEY, http
from tests.test_limits import fresh_window

PREFIX = "selfsvc:"
BOUNDS = {"EXTAUTHZ_KEY_PREFIX": PREFIX, "EXTAUTHZ_MAX_KEYS_PER_USER": "3", "EXTAUTHZ_ADMIN_WRITES_PER_MINUTE": "12",
          "EXTAUTHZ_AUDIT_MAX_BYTES": "40000"}
LITELLM_SETTINGS = {
    "default_key_generate_params": {"max_budget": 5, "models": ["gpt-4"]},
    "upperbound_key_generate_params": {"max_budget": 10, "rpm_limit": 100, "duration": "30d"},
}


@pytest.fixture(scope="module")
def bounded(workdir: Path, upstream_port: int, redis_port: int) -> Iterator[Gateway]:
    def edit(config: dict) -> None:
        config["litellm_settings"] = LITELLM_SETTINGS
    with example_stack(workdir, upstream_port, f"redis://127.0.0.1:{redis_port}/0", "self-service", edit,
                       BOUNDS) as gateway:
        yield gateway


@pytest.fixture
def client(redis_port: int) -> Iterator[redis.Redis]:
    c = redis.Redis(port=redis_port)
    yield c
    c.close()


def user(gateway: Gateway) -> tuple[str, str]:
    """A new internal user, in a team of its own, and its personal key."""
    user_id = "u-" + secrets.token_hex(4)
    team = gateway.new_team(models=["gpt-4"], team_member_permissions=[
        "/key/generate", "/key/update", "/key/delete", "/key/regenerate"])
    made = gateway.admin("/user/new", {"user_id": user_id, "user_role": "internal_user"})
    assert made.status == 200, made.text
    assert gateway.admin("/team/member_add", {"team_id": team, "member": {"user_id": user_id}}).status == 200
    return made.json()["key"], team


def error(r: Any) -> tuple[int, str, str]:
    found = r.json()["error"]
    return r.status, found["code"], found["message"]


def prefixed_bytes(client: redis.Redis) -> int:
    return sum(client.memory_usage(k) or 0 for k in client.scan_iter(f"{PREFIX}*"))


def test_one_user_cannot_fill_the_shared_redis(bounded: Gateway, client: redis.Redis) -> None:
    key, team = user(bounded)
    fresh_window()
    own = bounded.admin("/key/generate", {"team_id": team}, key=key).json()["token"]
    before = prefixed_bytes(client)
    # The attack: 400 KB of metadata per call. Refused, naming the setting.
    big = {"blob": "x" * 400_000}
    for path, body in (("/key/update", {"key": own, "metadata": big}), ("/key/generate", {"team_id": team,
                                                                                           "metadata": big})):
        status, code, message = error(bounded.admin(path, body, key=key))
        assert (status, code) == (400, "invalid_request") and "max_metadata_bytes" in message
    deep: dict = {}
    for _ in range(20):
        deep = {"d": deep}
    assert "max_metadata_depth" in error(bounded.admin("/key/update", {"key": own, "metadata": deep}, key=key))[2]
    # An admin is bound by the same record size (every replica caches the record).
    assert bounded.admin("/key/update", {"key": own, "metadata": big}).status == 400
    # Writes are counted per user: the 13th in a minute is refused until the next.
    answers = [bounded.admin("/key/update", {"key": own, "metadata": {"n": i}}, key=key).status for i in range(12)]
    assert answers.count(429) >= 1 and set(answers) == {200, 429}, answers
    status, code, message = error(bounded.admin("/key/update", {"key": own, "metadata": {"n": -1}}, key=key))
    assert (status, code) == (429, "rate_limit_exceeded") and "admin_writes_per_minute" in message
    assert bounded.admin("/key/update", {"key": own, "metadata": {"by": "admin"}}).status == 200  # not the admin's
    assert prefixed_bytes(client) - before < 256 * 1024


def test_a_user_owns_a_bounded_number_of_keys(bounded: Gateway) -> None:
    key, team = user(bounded)        # its personal key is one of its keys
    fresh_window()
    made = [bounded.admin("/key/generate", {"team_id": team}, key=key) for _ in range(3)]
    assert [r.status for r in made] == [200, 200, 400]
    status, code, message = error(made[-1])
    assert (status, code) == (400, "limit_reached") and "max_keys_per_user" in message
    assert bounded.admin("/key/delete", {"keys": [made[0].json()["token"]]}, key=key).status == 200
    assert bounded.admin("/key/generate", {"team_id": team}, key=key).status == 200
    # Nor does a key given to it, or an old one kept in its grace, count for nothing.
    assert error(bounded.admin("/key/regenerate", {"key": made[1].json()["token"], "grace_period": "1h"},
                               key=key))[:2] == (400, "limit_reached")
    owner = made[1].json()["user_id"]
    other = bounded.admin("/key/generate", {"team_id": team, "user_id": "someone-else"}).json()["token"]
    members = bounded.admin("/team/member_add", {"team_id": team, "member": {"user_id": owner, "role": "admin"}})
    assert members.status == 200, members.text
    moved = bounded.admin("/key/update", {"key": other, "user_id": owner}, key=key)
    assert error(moved)[:2] == (400, "limit_reached"), moved.text
    # The admin is not bound by it: it may give the user more.
    assert bounded.admin("/key/generate", {"team_id": team, "user_id": owner}).status == 200


def test_the_audit_trail_is_bounded_in_bytes_and_keeps_no_secret(bounded: Gateway, client: redis.Redis) -> None:
    key = bounded.new_key(key_alias="audited-" + secrets.token_hex(4))
    token = bounded.admin(f"/key/info?key={key}", method="GET").json()["key"]
    named = "AKIA" + "QRSTUVWXYZABCDEF"
    assert bounded.admin("/key/update", {"key": key, "key_alias": "sk-proj-" + "Zx9Qm2Lp8Rt4Vb7Nc1Ka5Hs3",
                                         "metadata": {named: "x"}}).status == 200
    secrets_given = {"passphrase": "correct horse battery", "pwd": "hunter2hunter2", "bearer": "abc123abc123",
                     "note": "sk-proj-" + secrets.token_urlsafe(24), "cfg": "AKIA" + "ABCDEFGHIJKLMNOP",
                     "jwt_like": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2lnbmF0dXJl",
                     "blob": secrets.token_urlsafe(40), "plain": "team analytics, cost centre 42"}
    assert bounded.admin("/key/update", {"key": key, "metadata": secrets_given}).status == 200
    large = {"notes": ["line %d of a long description" % i for i in range(400)]}    # about 12 KB
    assert bounded.admin("/key/update", {"key": key, "metadata": large}).status == 200
    entries = bounded.admin(f"/audit?target={token}", method="GET").json()["entries"]
    shown = json.dumps(entries)
    for value in [*list(secrets_given.values())[:-1], named, "Zx9Qm2Lp8Rt4Vb7Nc1Ka5Hs3"]:
        assert value not in shown, value
    assert "team analytics, cost centre 42" in shown
    digest = entries[0]["records"][0]["changes"]["metadata"]["after"]
    assert set(digest) == {"sha256", "bytes"} and digest["bytes"] > 10_000
    assert bounded.sidecar is not None
    log = bounded.sidecar.proc.log_text()
    assert not any(value in log for value in list(secrets_given.values())[:-1])
    # Many writes later, the stream holds at most its bytes (the newest entry always).
    for i in range(60):
        assert bounded.admin("/key/update", {"key": key, "metadata": {"i": i, "pad": "p" * 900}}).status == 200
    sizes = [len(fields[b"entry"]) for _, fields in client.xrange(f"{PREFIX}audit")]
    assert sum(sizes) <= 40_000 and int(client.get(f"{PREFIX}audit_bytes")) == sum(sizes)


def test_litellms_key_generate_params_bound_every_key(bounded: Gateway) -> None:
    made = bounded.admin("/key/generate", {}).json()
    assert made["max_budget"] == 5 and made["models"] == ["gpt-4"] and made["expires"] is not None
    over = bounded.admin("/key/generate", {"rpm_limit": 1000})
    status, code, message = error(over)
    assert status == 400 and "rpm_limit is over max limit set in config" in message and "upperbound" in message
    assert bounded.admin("/key/generate", {"duration": "90d"}).status == 400
    assert bounded.admin("/key/update", {"key": made["key"], "max_budget": 50}).status == 400
    assert bounded.admin("/key/regenerate", {"key": made["key"], "rpm_limit": 101}).status == 400
    assert bounded.admin("/key/update", {"key": made["key"], "max_budget": 9}).status == 200
    # Taking a bound off (null) is over it too.
    for lifted in ({"duration": None}, {"expires": None}, {"max_budget": None}):
        assert bounded.admin("/key/update", {"key": made["key"], **lifted}).status == 400, lifted
    # The key /user/new makes for a user is bound as any other.
    auto = bounded.admin("/user/new", {"user_id": "auto-" + secrets.token_hex(3), "duration": "900d"})
    assert auto.status == 400
    auto = bounded.admin("/user/new", {"user_id": "auto-" + secrets.token_hex(3)}).json()
    info = bounded.admin(f"/key/info?key={auto['key']}", method="GET").json()["info"]
    assert info["max_budget"] == 5 and info["expires"] is not None
    # A user minting its own key gets the same bounds: no way around what the admin set.
    key, team = user(bounded)
    own = bounded.admin("/key/generate", {"team_id": team}, key=key).json()
    assert own["max_budget"] == 5 and own["expires"] is not None
    assert bounded.admin("/key/generate", {"team_id": team, "max_budget": 11}, key=key).status == 400


def test_readiness_details_stay_off_the_public_listener(bounded: Gateway) -> None:
    public = http("GET", bounded.envoy.url + "/health/readiness")
    assert public.status == 200 and public.json() == {"status": "healthy"}
    assert "redis" not in public.text and "127.0.0.1" not in public.text
    assert "redis_endpoint" in http("GET", bounded.envoy.url + "/health/readiness", None,
                                    {"Authorization": f"Bearer {MASTER_KEY}"}).text
    assert bounded.sidecar is not None
    direct = http("GET", f"http://127.0.0.1:{bounded.sidecar.admin_port}/health/readiness")
    assert "redis_endpoint" in direct.text


def test_an_alias_is_unique_per_owner_and_tells_nothing_of_others(bounded: Gateway) -> None:
    alias = "prod-billing-" + secrets.token_hex(3)
    first, first_team = user(bounded)
    second, second_team = user(bounded)
    fresh_window()
    mine = bounded.admin("/key/generate", {"team_id": first_team, "key_alias": alias}, key=first)
    assert mine.status == 200, mine.text
    # Another user, and the admin, may use the same name: a user reserves nothing for others,
    # and its answer does not tell that the name is taken elsewhere.
    theirs = bounded.admin("/key/generate", {"team_id": second_team, "key_alias": alias}, key=second)
    assert theirs.status == 200, theirs.text
    admins = bounded.admin("/key/generate", {"key_alias": alias})
    assert admins.status == 200, admins.text
    # Within one owner, still unique (as LiteLLM's aliases are).
    again = bounded.admin("/key/generate", {"team_id": first_team, "key_alias": alias}, key=first)
    assert error(again)[:2] == (409, "conflict") and "this owner" in error(again)[2]
    assert bounded.admin("/key/generate", {"key_alias": alias}).status == 409
    listed = bounded.admin(f"/key/list?key_alias={alias}", method="GET").json()["keys"]
    assert sorted(listed) == sorted(r.json()["token"] for r in (mine, theirs, admins))
    assert bounded.admin(f"/key/list?key_alias={alias}", method="GET", key=first).json()["keys"] == \
        [mine.json()["token"]]
    # By alias, each deletes its own; the admin is asked which one.
    assert error(bounded.admin("/key/delete", {"key_aliases": [alias]}))[:2] == (409, "conflict")
    gone = bounded.admin("/key/delete", {"key_aliases": [alias]}, key=second)
    assert gone.status == 200 and gone.json()["deleted_keys"] == [theirs.json()["token"]]
    assert bounded.chat(mine.json()["key"], "gpt-4").status == 200
