"""The admin API against a real redis-server: validation, LiteLLM field names, atomic updates."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.harness import MASTER_KEY, Sidecar, http


def call(sidecar: Sidecar, path: str, body: Any = None, method: str = "POST", key: str | None = MASTER_KEY,
         raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http(method, sidecar.admin + path, body, headers, raw=raw)


def error_code(r) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text
    return r.json()["error"]["code"]


@pytest.mark.parametrize("key", [None, "sk-wrong", "sk-12345"])
def test_admin_routes_need_the_master_key(sidecar: Sidecar, key: str | None) -> None:
    for path, method in [("/key/generate", "POST"), ("/team/list", "GET"), ("/model/info", "GET")]:
        r = call(sidecar, path, {} if method == "POST" else None, method, key=key)
        assert r.status == 401 and error_code(r) == "unauthorized"


@pytest.mark.parametrize("body,raw,status,param", [
    (None, b"{oops", 400, None),
    (None, b"[1, 2]", 400, None),
    ({"models": "gpt-4"}, None, 400, "models"),
    ({"models": ["gpt-4", 7]}, None, 400, "models"),
    ({"models": ["no-such-model"]}, None, 400, "models"),
    ({"team_id": "no-such-team"}, None, 400, "team_id"),
    ({"duration": "forever"}, None, 400, "duration"),
    ({"key_alias": 12}, None, 400, "key_alias"),
    ({"blocked": "yes"}, None, 400, "blocked"),
    ({"frobnicate": True}, None, 400, "frobnicate"),
    ({"models": ["all-team-models"]}, None, 400, "models"),
])
def test_key_generate_rejects_bad_input(sidecar: Sidecar, body: Any, raw: bytes | None, status: int,
                                        param: str | None) -> None:
    r = call(sidecar, "/key/generate", body, raw=raw)
    assert r.status == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param


def key_count(sidecar: Sidecar) -> int:
    return call(sidecar, "/key/list?size=1", method="GET").json()["total_count"]


@pytest.mark.parametrize("body,param", [
    ({"duration": "99999999999999d"}, "duration"),  # once a 500: the expiry time overflowed
    ({"duration": "9" * 5000 + "s"}, "duration"),  # past int()'s digit limit
    ({"duration": "0s"}, "duration"),
    ({"duration": "000d"}, "duration"),
    ({"duration": "36501d"}, "duration"),  # over 100 years
    ({"duration": "1217mo"}, "duration"),  # 36510 days
    ({"expires": ""}, "expires"),  # once a key that expired in 1970
    ({"expires": " "}, "expires"),
    ({"expires": "tomorrow"}, "expires"),
    ({"expires": "2030-13-01T00:00:00Z"}, "expires"),
    ({"expires": "9999-12-31T23:59:59-01:00"}, "expires"),  # year 10000 in UTC
    ({"expires": "0001-01-01T00:00:00+01:00"}, "expires"),  # year 0 in UTC
    ({"expires": 1893456000}, "expires"),
    ({"models": ["*-*-*-*-*-x"]}, "models"),  # more than 4 '*'
    ({"models": ["gpt-4", "a*b*c*d*e*f"]}, "models"),
])
def test_key_generate_refuses_bad_expiry_and_starry_patterns(sidecar: Sidecar, body: Any, param: str) -> None:
    before = key_count(sidecar)
    r = call(sidecar, "/key/generate", body)
    assert r.status == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert "key" not in r.json() and key_count(sidecar) == before


def test_key_update_refuses_bad_expiry_and_keeps_the_old_one(sidecar: Sidecar) -> None:
    key = call(sidecar, "/key/generate", {"duration": "1h"}).json()["key"]
    expires = call(sidecar, f"/key/info?key={key}", method="GET").json()["info"]["expires"]
    for body, param in [({"duration": "0s"}, "duration"), ({"duration": "99999999999999d"}, "duration"),
                        ({"expires": ""}, "expires"), ({"models": ["*-*-*-*-*"]}, "models")]:
        r = call(sidecar, "/key/update", {"key": key, **body})
        assert r.status == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert call(sidecar, f"/key/info?key={key}", method="GET").json()["info"]["expires"] == expires


def test_expiry_limits_that_are_accepted(sidecar: Sidecar) -> None:
    for body in [{"duration": "36500d"}, {"duration": "1s"}, {"expires": "2030-01-31T00:00:00Z"},
                 {"expires": None}, {"duration": None}, {"models": ["openai/*-*-*-*"]}]:
        r = call(sidecar, "/key/generate", body)
        assert r.status == 200, (body, r.text)
    assert call(sidecar, "/key/generate", {"expires": "2030-01-31T00:00:00Z"}).json()["expires"] == \
        "2030-01-31T00:00:00+00:00"


def test_team_models_refuse_more_than_four_stars(sidecar: Sidecar) -> None:
    r = call(sidecar, "/team/new", {"models": ["*-*-*-*-*"]})
    assert r.status == 400 and r.json()["error"]["param"] == "models"


def test_unknown_model_error_lists_what_is_valid(sidecar: Sidecar) -> None:
    r = call(sidecar, "/key/generate", {"models": ["gpt-5"]})
    message = r.json()["error"]["message"]
    assert "gpt-5" in message and "beta-models" in message and "gpt-4o" in message


def test_key_models_must_be_within_the_team(sidecar: Sidecar) -> None:
    team = call(sidecar, "/team/new", {"models": ["beta-models"]}).json()["team_id"]
    r = call(sidecar, "/key/generate", {"team_id": team, "models": ["gpt-4o"]})
    assert r.status == 400 and "gpt-4o" in r.json()["error"]["message"]
    assert call(sidecar, "/key/generate", {"team_id": team, "models": ["gpt-4"]}).status == 200
    assert call(sidecar, "/key/generate", {"team_id": team, "models": ["beta-models"]}).status == 200
    assert call(sidecar, "/key/generate", {"team_id": team, "models": ["all-team-models"]}).status == 200


def test_generated_key_is_stored_only_as_a_hash(sidecar: Sidecar, redis_port: int) -> None:
    r = call(sidecar, "/key/generate", {"models": ["gpt-4"], "key_alias": "hash-check", "metadata": {"a": 1}})
    body = r.json()
    key = body["key"]
    assert body["key_name"] == f"sk-...{key[-4:]}" and body["metadata"] == {"a": 1}
    dump = subprocess.run(["redis-cli", "-p", str(redis_port), "--scan"], capture_output=True, text=True).stdout
    values = subprocess.run(["redis-cli", "-p", str(redis_port), "get", f"extauthz:key:{body['token']}"],
                            capture_output=True, text=True).stdout
    assert key not in dump and key not in values and body["token"] in dump
    info = call(sidecar, f"/key/info?key={key}", method="GET")
    assert info.status == 200 and info.json()["info"]["key_alias"] == "hash-check"
    assert key not in info.text
    by_hash = call(sidecar, f"/key/info?key={body['token']}", method="GET")
    assert by_hash.json()["info"]["token"] == body["token"]


def test_key_alias_is_unique(sidecar: Sidecar) -> None:
    results = list(ThreadPoolExecutor(10).map(
        lambda _: call(sidecar, "/key/generate", {"key_alias": "only-one"}).status, range(10)))
    assert sorted(results) == [200] + [409] * 9


def test_concurrent_alias_changes_leave_one_alias(sidecar: Sidecar) -> None:
    key = call(sidecar, "/key/generate", {}).json()["key"]
    aliases = [f"race-{i}" for i in range(100)]
    statuses = list(ThreadPoolExecutor(10).map(
        lambda a: call(sidecar, "/key/update", {"key": key, "key_alias": a}).status, aliases))
    assert statuses == [200] * 100
    final = call(sidecar, f"/key/info?key={key}", method="GET").json()["info"]["key_alias"]
    # Every alias the key no longer holds is free again: no stale alias record survived a race.
    for alias in aliases:
        r = call(sidecar, "/key/generate", {"key_alias": alias})
        assert r.status == (409 if alias == final else 200), (alias, final)


def test_concurrent_updates_of_different_fields_lose_nothing(sidecar: Sidecar) -> None:
    keys = [call(sidecar, "/key/generate", {"models": ["gpt-4"]}).json()["key"] for _ in range(20)]
    jobs = [("/key/block", {"key": k}) for k in keys] + \
           [("/key/update", {"key": k, "models": ["gpt-4o"]}) for k in keys]
    statuses = list(ThreadPoolExecutor(16).map(lambda job: call(sidecar, *job).status, jobs))
    assert set(statuses) == {200}
    for k in keys:
        info = call(sidecar, f"/key/info?key={k}", method="GET").json()["info"]
        assert info["blocked"] is True and info["models"] == ["gpt-4o"]


def test_team_delete_racing_key_generate_leaves_no_orphan(sidecar: Sidecar) -> None:
    teams = [call(sidecar, "/team/new", {"models": ["gpt-4"]}).json()["team_id"] for _ in range(15)]
    jobs = [("/team/delete", {"team_ids": [t]}) for t in teams] + \
           [("/key/generate", {"team_id": t}) for t in teams for _ in range(3)]
    list(ThreadPoolExecutor(16).map(lambda job: call(sidecar, *job), jobs))
    existing = {t["team_id"] for t in call(sidecar, "/team/list", method="GET").json()}
    keys = call(sidecar, "/key/list?return_full_object=true&size=1000", method="GET").json()["keys"]
    orphans = [k for k in keys if k.get("team_id") and k["team_id"] not in existing]
    assert orphans == []


def test_team_info_and_list(sidecar: Sidecar) -> None:
    team = call(sidecar, "/team/new", {"team_alias": "info-team", "models": ["gpt-4"], "max_budget": 10,
                                       "tags": ["a"]}).json()
    assert team["not_enforced"] == ["tags"]
    key = call(sidecar, "/key/generate", {"team_id": team["team_id"]}).json()
    info = call(sidecar, f"/team/info?team_id={team['team_id']}", method="GET").json()
    assert info["team_info"]["team_alias"] == "info-team"
    assert [k["token"] for k in info["keys"]] == [key["token"]]
    assert call(sidecar, "/team/info?team_id=nope", method="GET").status == 404
    assert call(sidecar, "/team/update", {"team_id": "nope", "models": []}).status == 404
    assert call(sidecar, "/team/update", {"team_id": team["team_id"], "bogus": 1}).status == 400


def test_model_info_hides_provider_keys(sidecar: Sidecar) -> None:
    r = call(sidecar, "/model/info", method="GET")
    assert r.status == 200
    names = [m["model_name"] for m in r.json()["data"]]
    assert "azure-gpt-3.5" in names and "openai/*" in names
    assert "upstream" not in json.dumps([m["litellm_params"].get("api_key") for m in r.json()["data"]])
    assert "azure-upstream-key" not in r.text and "sk-upstream" not in r.text


def test_oversized_body_is_413(sidecar: Sidecar) -> None:
    r = call(sidecar, "/key/generate", raw=b'{"metadata": "' + b"x" * (2 * 1024 * 1024) + b'"}')
    assert r.status == 413 and error_code(r) == "request_too_large"


def test_key_list_pages_through_many_keys_reading_one_page(workdir, config_path, redis_port: int) -> None:
    """5,000 keys: each page is the next 100 in order, the whole list without a repeat or a gap;
    filters by alias and hash come from their index. (A page used to read every key's
    document, which timed out past some ten thousand keys.)"""
    import redis as sync_redis
    from extauthz.domain.record import new_key_doc
    from tests.harness import start_sidecar
    db = 14
    r = sync_redis.Redis(port=redis_port, db=db)
    r.flushdb()
    pipe = r.pipeline(transaction=False)
    raws = [f"sk-many-{n:05d}" for n in range(5000)]
    for n, raw in enumerate(raws):
        doc = new_key_doc(raw, key_alias=f"many-{n}")
        pipe.set(f"extauthz:key:{doc['token']}", json.dumps(doc))
        pipe.set(f"extauthz:alias:many-{n}", doc["token"])
        pipe.sadd("extauthz:keys", doc["token"])
    pipe.execute()
    side = start_sidecar(workdir, config_path, f"redis://127.0.0.1:{redis_port}/{db}")
    try:
        seen = []
        for page in range(1, 51):
            body = call(side, f"/key/list?page={page}&size=100", method="GET").json()
            assert body["total_count"] == 5000 and body["total_pages"] == 50 and len(body["keys"]) == 100
            seen.extend(body["keys"])
        assert seen == sorted(seen) and len(set(seen)) == 5000
        assert call(side, "/key/list?page=51&size=100", method="GET").json()["keys"] == []
        one = call(side, "/key/list?key_alias=many-4321&return_full_object=true", method="GET").json()
        assert one["total_count"] == 1 and one["keys"][0]["key_alias"] == "many-4321"
        by_hash = call(side, f"/key/list?key_hash={one['keys'][0]['token']}", method="GET").json()
        assert by_hash["keys"] == [one["keys"][0]["token"]]
        assert call(side, "/key/list?key_hash=" + "0" * 64, method="GET").json()["total_count"] == 0
    finally:
        side.proc.stop()
        r.flushdb()
