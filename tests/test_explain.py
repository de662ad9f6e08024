"""POST /access/explain: the decision the gateway would make now, and why. It must never
disagree with Check: a generated set of callers and models is decided by both, the
sidecar's gRPC Check and the explain endpoint, and the answers compared."""

from __future__ import annotations

import json
import random
import secrets
from typing import Any, Iterator

import grpc
import pytest

from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from tests.conftest import Gateway
from tests.harness import MASTER_KEY, Sidecar, check_request, http

ENTRIES = ["gpt-4", "gpt-4o", "gpt-3.5-turbo", "azure-gpt-3.5", "beta-models", "default-models",
           "restricted-models", "openai/*", "openai/o1-*", "openai/gpt-*", "*", "all-team-models",
           "no-default-models"]
MODELS = ["gpt-4", "gpt-4o", "gpt-3.5-turbo", "azure-gpt-3.5", "fireworks-llama-v3-70b-instruct",
          "openai/o1-mini", "openai/o1-preview", "openai/gpt-5", "openai/O1-mini", "openai/openai/o1-mini",
          "no-such-model", "beta-models"]


@pytest.fixture(scope="module")
def check(sidecar: Sidecar) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
        yield external_auth_pb2_grpc.AuthorizationStub(channel).Check


def admin(sidecar: Sidecar, path: str, body: Any) -> Any:
    return http("POST", sidecar.admin + path, body, {"Authorization": f"Bearer {MASTER_KEY}"})


def explain(sidecar: Sidecar, **body: Any) -> dict:
    r = admin(sidecar, "/access/explain", body)
    assert r.status == 200, r.text
    return r.json()


def checked(check: Any, raw_key: str, model: str) -> tuple[int, str]:
    response = check(check_request({"authorization": f"Bearer {raw_key}", "content-type": "application/json"},
                                   raw_body=json.dumps({"model": model}).encode()), timeout=10)
    if response.WhichOneof("http_response") == "ok_response":
        return 200, "ok"
    return response.denied_response.status.code, json.loads(response.denied_response.body)["error"]["code"]


def explained(found: dict) -> tuple[int, str]:
    return found["status"], found.get("code", "ok")


def test_explain_equals_check_on_generated_cases(sidecar: Sidecar, check: Any) -> None:
    rng = random.Random(20261127)
    compared, outcomes = 0, set()
    while compared < 80:
        team_id = None
        if rng.random() < 0.6:
            team = {"team_id": "explain-" + secrets.token_hex(4),
                    "models": rng.sample(ENTRIES[:-2], rng.randint(0, 3)), "blocked": rng.random() < 0.1}
            if rng.random() < 0.2:
                team["rpm_limit"] = 1
            if admin(sidecar, "/team/new", team).status != 200:
                continue
            team_id = team["team_id"]
        key: dict[str, Any] = {"models": rng.sample(ENTRIES, rng.randint(0, 3))}
        if team_id is not None:
            key["team_id"] = team_id
        if rng.random() < 0.1:
            key["blocked"] = True
        if rng.random() < 0.1:
            key["expires"] = "2020-01-01T00:00:00Z"
        if rng.random() < 0.2:
            key["rpm_limit"] = 1
        if rng.random() < 0.1:
            key["max_budget"] = 0
        r = admin(sidecar, "/key/generate", key)
        if r.status != 200:
            continue  # a combination the admin API refuses (models outside the team's...)
        raw = r.json()["key"]
        if rng.random() < 0.3:
            checked(check, raw, rng.choice(MODELS))   # uses up an rpm_limit of 1, if it has one
        model = rng.choice(MODELS)
        by = {"key": raw} if rng.random() < 0.5 else {"key": r.json()["token"]}
        want = explained(explain(sidecar, model=model, **by))
        got = checked(check, raw, model)
        assert want == got, (key, model, want, got)
        outcomes.add(got[1])
        compared += 1
    # The cases reached every kind of answer, not one over and over.
    assert {"ok", "model_not_allowed", "invalid_model", "key_blocked", "key_expired", "rate_limit_exceeded",
            "budget_exceeded"} <= outcomes, sorted(outcomes)


def test_a_wildcard_resolution_and_the_entry_that_admitted_it(sidecar: Sidecar) -> None:
    raw = admin(sidecar, "/key/generate", {"models": ["restricted-models"]}).json()["key"]
    found = explain(sidecar, key=raw, model="openai/o1-mini")
    assert found["decision"] == "allow" and found["deployment"]
    steps = {s["step"]: s for s in found["steps"]}
    model = steps["model"]
    assert model["kind"] == "wildcard" and model["pattern"] == "openai/o1-*" and model["captured"] == "mini"
    assert model["matching_patterns"] == ["openai/o1-*", "openai/*"] and "most specific" in model["why"]
    assert steps["allowed_models"]["matched"] == "restricted-models" and steps["allowed_models"]["admits"]
    (serving,) = steps["deployments"]["serving"]
    assert serving["share"] == 1.0 and serving["provider"] == "openai"
    assert found["deployment"] == serving["id"]
    refused = explain(sidecar, key=raw, model="openai/gpt-5")
    assert refused["decision"] == "deny" and refused["code"] == "model_not_allowed" and refused["status"] == 403
    steps = {s["step"]: s for s in refused["steps"]}
    assert steps["model"]["pattern"] == "openai/*" and steps["allowed_models"]["admits"] is False
    variant = explain(sidecar, key=raw, model="openai/O1-mini")
    assert variant["code"] == "invalid_model"
    assert {s["step"]: s for s in variant["steps"]}["model"]["variant_of"] == "openai/o1-*"


def test_a_team_its_list_and_limits(sidecar: Sidecar) -> None:
    team = "explained-" + secrets.token_hex(4)
    assert admin(sidecar, "/team/new", {"team_id": team, "models": ["beta-models"], "rpm_limit": 10}).status == 200
    found = explain(sidecar, team_id=team, model="gpt-4")
    assert found["decision"] == "allow"
    lists = [s for s in found["steps"] if s["step"] == "allowed_models"]
    assert lists[0]["matched"] == "all-team-models" and lists[1]["list"] == f"team {team}"
    assert lists[1]["matched"] == "beta-models"
    limits = next(s for s in found["steps"] if s["step"] == "limits")
    assert limits["team"] == {"rpm_limit": 10}
    refused = explain(sidecar, team_id=team, model="gpt-4o")
    assert refused["code"] == "model_not_allowed"
    assert admin(sidecar, "/access/explain", {"team_id": "no-such-team", "model": "gpt-4"}).status == 404


def test_explaining_takes_nothing_from_the_limits(sidecar: Sidecar, check: Any) -> None:
    raw = admin(sidecar, "/key/generate", {"models": ["gpt-4"], "rpm_limit": 1}).json()["key"]
    for _ in range(5):
        assert explain(sidecar, key=raw, model="gpt-4")["decision"] == "allow"
    assert checked(check, raw, "gpt-4") == (200, "ok")
    over = explain(sidecar, key=raw, model="gpt-4")
    assert (over["status"], over["code"]) == (429, "rate_limit_exceeded")
    assert next(s for s in over["steps"] if s["step"] == "limits")["refused_by"] == "rate_limit_exceeded"


def test_unknown_keys_and_bad_requests(sidecar: Sidecar, gateway: Gateway) -> None:
    unknown = explain(sidecar, key="sk-not-a-key-anywhere", model="gpt-4")
    assert (unknown["status"], unknown["code"]) == (401, "invalid_api_key")
    for body in ({"model": "gpt-4"}, {"key": "sk-x-12345678", "team_id": "t", "model": "gpt-4"},
                 {"key": "sk-x-12345678"}, {"key": "sk-x-12345678", "model": "gpt-4", "endpoint": "v1/x"},
                 {"key": "sk-x-12345678", "model": "gpt-4", "extra": 1}):
        assert admin(sidecar, "/access/explain", body).status == 400, body
    # Another endpoint: an embeddings call for a chat model's key.
    raw = admin(sidecar, "/key/generate", {"models": ["gpt-4"]}).json()["key"]
    found = explain(sidecar, key=raw, model="gpt-4", endpoint="/v1/embeddings")
    assert found["decision"] == "allow"
    assert explain(sidecar, key=raw, model="gpt-4", endpoint="/not/an/llm/path")["code"] == "unsupported_endpoint"
    # The master key, as Check reads it; a multipart endpoint, with the form it reads.
    assert explain(sidecar, key=MASTER_KEY, model="gpt-4")["decision"] == "allow"
    form = explain(sidecar, key=raw, model="gpt-4o", endpoint="/v1/audio/transcriptions")
    assert form["code"] == "model_not_allowed", form
    # Through Envoy, for admins only.
    r = http("POST", gateway.envoy.url + "/access/explain", {"key": raw, "model": "gpt-4"},
             {"Authorization": f"Bearer {MASTER_KEY}"})
    assert r.status == 200 and r.json()["decision"] == "allow"
    r = http("POST", gateway.envoy.url + "/access/explain", {"key": raw, "model": "gpt-4"},
             {"Authorization": f"Bearer {raw}"})
    assert r.status == 401 and r.json()["error"]["code"] == "admin_not_allowed"
