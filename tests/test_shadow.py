"""Shadow mode through real Envoy: model and limit denials are recorded (decision log and
metrics, outcome shadow_deny) while the request is routed as if permitted; authentication
is always enforced; /v1/models still lists only what enforcement would allow."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.conftest import Gateway
from tests.harness import http, start_stack
from tests.test_usage import wait_for


def shadow_lines(sidecar: Any, key_alias: str) -> list[dict]:
    lines = [json.loads(line) for line in Path(sidecar.proc.log).read_text().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("outcome") == "shadow_deny" and e.get("key_alias") == key_alias]


def metric(sidecar: Any, code: str) -> float:
    text = http("GET", f"http://127.0.0.1:{sidecar.metrics_port}/metrics").text
    found = re.search(rf'^extauthz_decisions_total\{{code="{code}",outcome="shadow_deny"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_shadow_teams_model_denials_are_recorded_and_let_through(gateway: Gateway, sidecar: Any) -> None:
    team = gateway.new_team(models=["gpt-4"], metadata={"enforcement": "shadow"})
    key = gateway.new_key(team_id=team, key_alias="shadow-rollout")
    before = metric(sidecar, "model_not_allowed")
    gateway.forget_upstream()
    r = gateway.chat(key, "gpt-4o")                           # enforce would answer 403
    assert r.status == 200, r.text
    (seen,) = gateway.upstream_seen()
    assert seen["body"]["model"] == "gpt-4o" and seen["headers"]["authorization"] == "Bearer sk-upstream-gpt-4o"
    wait_for(lambda: shadow_lines(sidecar, "shadow-rollout"), "the shadow denial in the decision log")
    (line,) = shadow_lines(sidecar, "shadow-rollout")
    assert line["code"] == "model_not_allowed" and line["shadow_status"] == "403" and line["model"] == "gpt-4o"
    wait_for(lambda: metric(sidecar, "model_not_allowed") >= before + 1, "the shadow_deny metric")
    # A model that does not exist cannot be routed: refused as under enforcement.
    assert gateway.chat(key, "no-such-model").status == 403
    # /v1/models lists what enforcement would allow.
    listed = http("GET", gateway.envoy.url + "/v1/models", None, {"Authorization": f"Bearer {key}"}).json()
    assert [m["id"] for m in listed["data"]] == ["gpt-4"]


def test_authentication_is_always_enforced(gateway: Gateway) -> None:
    team = gateway.new_team(models=["gpt-4"], metadata={"enforcement": "shadow"})
    blocked = gateway.new_key(team_id=team)
    assert gateway.admin("/key/block", {"key": blocked}).status == 200
    r = gateway.chat(blocked, "gpt-4o")
    assert r.status == 401 and r.json()["error"]["code"] == "key_blocked"
    assert gateway.chat("sk-not-a-key", "gpt-4o").status == 401
    assert gateway.chat(None, "gpt-4o").status == 401
    expired = gateway.new_key(team_id=team, expires="2020-01-01T00:00:00Z")
    assert gateway.chat(expired, "gpt-4").status == 401
    member = gateway.new_key(team_id=team)
    assert gateway.chat(member, "gpt-4o").status == 200          # shadowed: a model denial
    assert gateway.admin("/team/block", {"team_id": team}).status == 200
    r = gateway.chat(member, "gpt-4")
    assert r.status == 401 and r.json()["error"]["code"] == "team_blocked"


def test_a_shadow_teams_limits_are_recorded_and_let_through(gateway: Gateway, sidecar: Any) -> None:
    team = gateway.new_team(models=["gpt-4"], metadata={"enforcement": "shadow"}, max_budget=0, rpm_limit=1)
    key = gateway.new_key(team_id=team, key_alias="shadow-limits")
    statuses = [gateway.chat(key, "gpt-4").status for _ in range(3)]
    assert statuses == [200, 200, 200]
    wait_for(lambda: len(shadow_lines(sidecar, "shadow-limits")) == 3, "three shadow denials")
    assert {line["code"] for line in shadow_lines(sidecar, "shadow-limits")} == {"budget_exceeded"}
    # The same limits on an enforcing team refuse.
    enforcing = gateway.new_key(team_id=gateway.new_team(models=["gpt-4"], max_budget=0))
    assert gateway.chat(enforcing, "gpt-4").status == 422


def test_the_setting_puts_every_caller_in_shadow_mode(workdir: Path, config_path: Path, redis_port: int,
                                                      upstream_port: int) -> None:
    stack = start_stack(workdir, config_path, f"redis://127.0.0.1:{redis_port}/0", {"EXTAUTHZ_ENFORCEMENT": "shadow"})
    try:
        g = Gateway(stack.envoy, upstream_port, stack.sidecar)
        key = g.new_key(models=["gpt-4"], rpm_limit=1, key_alias="shadow-everyone")
        assert [g.chat(key, "gpt-4o").status for _ in range(2)] == [200, 200]
        wait_for(lambda: len(shadow_lines(stack.sidecar, "shadow-everyone")) == 2, "two shadow denials")
        codes = [line["code"] for line in shadow_lines(stack.sidecar, "shadow-everyone")]
        assert codes[0] == "model_not_allowed" and codes[1] in ("model_not_allowed", "rate_limit_exceeded")
        assert g.chat("sk-unknown", "gpt-4").status == 401
    finally:
        stack.stop()
