"""The audit trail through real Envoy and Redis: one entry per admin write, in the write's
own transaction (a failed write leaves none; no entry without its write), who made it,
field changes without secrets, and GET /audit's filters, paging and access."""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway
from tests.harness import MASTER_KEY, http, start_stack


def trail(gateway: Gateway, query: str = "", key: str = MASTER_KEY) -> list[dict]:
    r = gateway.admin(f"/audit?{query}", method="GET", key=key)
    assert r.status == 200, r.text
    return r.json()["entries"]


def newest(gateway: Gateway) -> dict | None:
    entries = trail(gateway, "limit=1")
    return entries[0] if entries else None


def redis_cli(redis_port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(redis_port), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_every_write_route_appends_one_entry_naming_its_route_and_target(gateway: Gateway) -> None:
    suffix = secrets.token_hex(4)
    team, user = f"audit-team-{suffix}", f"audit-user-{suffix}"
    raw = f"sk-audit-{suffix}-0001"
    regenerated = f"sk-audit-{suffix}-0002"
    again = f"sk-audit-{suffix}-0003"
    steps: list[tuple[str, dict, str]] = [
        ("/team/new", {"team_id": team, "models": ["gpt-4"]}, team),
        ("/team/update", {"team_id": team, "models": ["gpt-4", "gpt-4o"]}, team),
        ("/team/block", {"team_id": team}, team),
        ("/team/unblock", {"team_id": team}, team),
        ("/key/generate", {"key": raw, "team_id": team, "key_alias": f"audited-{suffix}"}, f"audited-{suffix}"),
        ("/key/update", {"key": raw, "models": ["gpt-4"]}, raw),
        ("/key/block", {"key": raw}, raw),
        ("/key/unblock", {"key": raw}, raw),
        ("/key/regenerate", {"key": raw, "new_key": regenerated}, regenerated),
        (f"/key/{regenerated}/regenerate", {"new_key": again}, again),
        ("/user/new", {"user_id": user, "auto_create_key": False}, user),
        ("/user/update", {"user_id": user, "user_role": "internal_user_viewer"}, user),
        ("/team/member_add", {"team_id": team, "member": {"user_id": user, "role": "user"}}, team),
        ("/team/member_delete", {"team_id": team, "user_id": user}, user),
        ("/user/delete", {"user_ids": [user]}, user),
        ("/key/delete", {"keys": [again]}, again),
        ("/team/delete", {"team_ids": [team]}, team),
    ]
    seen: set[str] = set()
    for path, body, target in steps:
        before = newest(gateway)
        r = gateway.admin(path, body)
        assert r.status == 200, (path, r.text)
        entry = newest(gateway)
        assert entry is not None and entry != before, path
        assert entry["id"] not in seen
        seen.add(entry["id"])
        route = "/key/{key}/regenerate" if path.endswith("/regenerate") and path != "/key/regenerate" else path
        assert entry["route"] == route and entry["actor"] == {"type": "master_key"}, entry
        hashed = __import__("hashlib").sha256(target.encode()).hexdigest()
        ids = {t for rec in entry["records"] for t in (rec["id"], rec.get("alias"))}
        assert target in ids or hashed in ids, (path, entry)
        # No raw key, ever: the trail knows keys by their hashes.
        text = json.dumps(entry)
        for secret in (raw, regenerated, again, MASTER_KEY):
            assert secret not in text, path


def test_changes_are_field_by_field_and_secrets_are_redacted(gateway: Gateway) -> None:
    raw = "sk-audit-fields-" + secrets.token_hex(4)
    assert gateway.admin("/key/generate", {"key": raw, "models": ["gpt-4"],
                                           "metadata": {"owner": "ml", "api_key": "sk-provider-secret"}}).status == 200
    assert gateway.admin("/key/update", {"key": raw, "models": ["gpt-4", "gpt-4o"], "rpm_limit": 5}).status == 200
    entry = newest(gateway)
    (record,) = entry["records"]
    assert record["op"] == "update" and record["type"] == "key"
    assert record["changes"] == {"models": {"before": ["gpt-4"], "after": ["gpt-4", "gpt-4o"]},
                                 "rpm_limit": {"before": None, "after": 5}}
    created = trail(gateway, f"target={raw}&limit=10")[-1]
    assert created["records"][0]["op"] == "create"
    assert created["records"][0]["changes"]["metadata"]["after"] == {"owner": "ml", "api_key": "[redacted]"}
    assert "sk-provider-secret" not in json.dumps(trail(gateway, "limit=50"))


def test_a_write_that_fails_leaves_no_entry(gateway: Gateway) -> None:
    team = gateway.new_team(models=["gpt-4"])
    alias = "taken-" + secrets.token_hex(4)
    gateway.new_key(key_alias=alias)
    before = newest(gateway)
    failing = [("/key/generate", {"team_id": "no-such-team"}, 400),
               ("/key/generate", {"key_alias": alias}, 409),              # the alias is taken
               ("/key/generate", {"team_id": team, "models": ["gpt-4o"]}, 400),  # outside the team's models
               ("/key/update", {"key": "sk-no-such-key-here", "models": []}, 404),
               ("/team/update", {"team_id": "no-such-team", "models": []}, 404),
               ("/key/regenerate", {"key": "sk-no-such-key-here"}, 404),
               ("/team/delete", {"team_ids": ["no-such-team"]}, 404)]
    for path, body, status in failing:
        r = gateway.admin(path, body)
        assert r.status == status, (path, r.text)
    assert newest(gateway) == before


def test_no_entry_without_its_write_under_concurrent_changes(gateway: Gateway) -> None:
    """Twenty concurrent updates of one key: each that succeeded has exactly one entry,
    and the newest entry's 'after' is what the record holds."""
    raw = "sk-audit-race-" + secrets.token_hex(4)
    gateway.new_key(key=raw, metadata={"n": -1})
    statuses: list[int] = []

    def update(n: int) -> None:
        statuses.append(gateway.admin("/key/update", {"key": raw, "metadata": {"n": n}}).status)

    threads = [threading.Thread(target=update, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = trail(gateway, f"target={raw}&limit=100")
    updates = [e for e in entries if e["route"] == "/key/update"]
    assert len(updates) == statuses.count(200) == 20
    stored = gateway.admin(f"/key/info?key={raw}", method="GET").json()["info"]["metadata"]
    assert updates[0]["records"][0]["changes"]["metadata"]["after"] == stored
    # Each entry's 'before' is the previous one's 'after': no change went unrecorded.
    chain = [u["records"][0]["changes"]["metadata"] for u in reversed(updates)]
    assert all(a["after"] == b["before"] for a, b in zip(chain, chain[1:]))


def test_filters_and_paging(gateway: Gateway) -> None:
    team = gateway.new_team(models=["gpt-4"], team_alias="paged")
    for n in range(5):
        assert gateway.admin("/team/update", {"team_id": team, "metadata": {"n": n}}).status == 200
    page1 = trail(gateway, f"target={team}&limit=4")
    assert len(page1) == 4 and [e["records"][0]["changes"]["metadata"]["after"]["n"] for e in page1] == [4, 3, 2, 1]
    r = gateway.admin(f"/audit?target={team}&limit=4", method="GET").json()
    rest = trail(gateway, f"target={team}&limit=4&before={r['next']}")
    assert [e["route"] for e in rest] == ["/team/update", "/team/new"]
    assert all(e["id"] < page1[-1]["id"] or len(e["id"]) < len(page1[-1]["id"]) for e in rest)
    assert trail(gateway, f"target={team}&actor=master_key&limit=100") == page1 + rest
    assert trail(gateway, f"target={team}&actor=someone-else") == []
    assert trail(gateway, "since=2999-01-01T00:00:00Z") == []
    assert len(trail(gateway, f"target={team}&since=2000-01-01T00:00:00Z")) == 6
    for bad in ("limit=0", "limit=1001", "limit=x", "before=nope", "since=yesterday"):
        assert gateway.admin(f"/audit?{bad}", method="GET").status == 400, bad


def test_the_actor_is_the_management_key_and_only_admins_read_the_trail(gateway: Gateway) -> None:
    suffix = secrets.token_hex(4)
    admins = {}
    for role in ("proxy_admin", "proxy_admin_viewer", "internal_user"):
        user = f"{role}-{suffix}"
        r = gateway.admin("/user/new", {"user_id": user, "user_role": role})
        assert r.status == 200, r.text
        admins[role] = (user, r.json()["key"])
    user, key = admins["proxy_admin"]
    created = gateway.admin("/team/new", {"team_id": f"by-key-{suffix}"}, key=key)
    assert created.status == 200, created.text
    entry = newest(gateway)
    assert entry["actor"] == {"type": "key", "user_id": user, "role": "proxy_admin",
                              "key_hash": __import__("hashlib").sha256(key.encode()).hexdigest()}
    assert trail(gateway, f"actor={user}&limit=1", key=key)[0]["id"] == entry["id"]   # a proxy_admin reads it
    for role in ("proxy_admin_viewer", "internal_user"):
        r = gateway.admin("/audit", method="GET", key=admins[role][1])
        assert r.status == 401 and r.json()["error"]["code"] == "admin_not_allowed", (role, r.text)
    assert gateway.admin("/audit", method="GET", key="sk-not-a-key-at-all").status == 401
    assert http("GET", gateway.envoy.url + "/audit").status == 401


def test_entries_are_logged_as_json(gateway: Gateway, sidecar: Any) -> None:
    team = gateway.new_team(models=["gpt-4"], team_alias="logged-" + secrets.token_hex(4))
    lines = [json.loads(line) for line in Path(sidecar.proc.log).read_text().splitlines() if line.startswith("{")]
    (logged,) = [e for e in lines if e.get("logger") == "extauthz.audit"
                 and any(r["id"] == team for r in e["audit"]["records"])]
    stored = trail(gateway, f"target={team}")[0]
    assert logged["audit"] == {k: v for k, v in stored.items() if k != "id"}


def test_the_stream_is_capped(workdir: Path, config_path: Path, redis_port: int, upstream_port: int) -> None:
    db = 15  # a database of its own: this test breaks the trail on purpose
    redis_cli(redis_port, "-n", str(db), "FLUSHDB")
    stack = start_stack(workdir, config_path, f"redis://127.0.0.1:{redis_port}/{db}",
                        {"EXTAUTHZ_AUDIT_MAX_ENTRIES": "50"})
    try:
        g = Gateway(stack.envoy, upstream_port, stack.sidecar)
        team = g.new_team(models=["gpt-4"])
        for n in range(400):
            assert g.admin("/team/update", {"team_id": team, "metadata": {"n": n}}).status == 200
        length = int(redis_cli(redis_port, "-n", str(db), "XLEN", "extauthz:audit"))
        # Trimmed in Redis's own steps (whole stream nodes of 100): about the cap, never the whole history.
        assert 50 <= length <= 200, length
        assert len(trail(g, "limit=1000")) == length
        # A trail that cannot be written: the write is refused, not made unrecorded.
        redis_cli(redis_port, "-n", str(db), "DEL", "extauthz:audit")
        redis_cli(redis_port, "-n", str(db), "SET", "extauthz:audit", "not a stream")
        r = g.admin("/team/new", {"team_id": "never-recorded"})
        assert r.status == 503 and r.json()["error"]["code"] == "audit_unavailable"
        assert g.admin("/team/info?team_id=never-recorded", method="GET").status == 404
    finally:
        stack.stop()
        redis_cli(redis_port, "-n", str(db), "FLUSHDB")


@pytest.mark.parametrize("value", ["not json", json.dumps({"user_id": 7, "role": "proxy_admin"})])
def test_an_unreadable_actor_header_refuses_the_write(gateway: Gateway, sidecar: Any, value: str) -> None:
    """The header only the check sets (Envoy strips it from clients); one that does not read
    refuses the request rather than record a wrong actor."""
    r = http("POST", sidecar.admin + "/team/new", {}, {"Authorization": f"Bearer {MASTER_KEY}",
                                                        "x-extauthz-admin-actor": value})
    assert r.status == 403 and r.json()["error"]["code"] == "admin_not_allowed"
    # Through Envoy a client's value never arrives: the write is the master key's.
    r = http("POST", gateway.envoy.url + "/team/new", {}, {"Authorization": f"Bearer {MASTER_KEY}",
                                                           "x-extauthz-admin-actor": value})
    assert r.status == 200
    assert newest(gateway)["actor"] == {"type": "master_key"}
