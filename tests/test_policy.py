"""The decision engine, table-driven and without I/O."""

from __future__ import annotations

import pytest

from extauthz.config import from_dict
from extauthz.endpoints import classify
from extauthz.facts import Facts, Problem
from extauthz.policy import Allow, Deny, decide, visible_models
from extauthz.records import MASTER, KeyRecord, TeamRecord
from extauthz.routing import CLUSTER_HEADER, MODEL_HEADER
from extauthz.runtime import Runtime

NOW = 1_800_000_000.0


def deployment(name, model, groups=(), base="http://upstream:8000/v1", key="sk-prov", **params):
    return {"model_name": name, "litellm_params": {"model": model, "api_base": base, "api_key": key, **params},
            "model_info": {"access_groups": list(groups)}}


CATALOG = Runtime.of(from_dict({"model_list": [
    deployment("gpt-3.5-turbo", "openai/gpt-3.5-turbo", key="sk-prov-35"),
    deployment("gpt-4", "openai/gpt-4", ["beta-models"], key="sk-prov-4"),
    deployment("gpt-4o", "openai/gpt-4o"),
    deployment("azure-gpt-3.5", "azure/chatgpt-v-2", base="https://corp.openai.azure.com",
               key="az-secret", api_version="2024-02-01"),
    deployment("claude", "anthropic/claude-3-5-sonnet", base="https://api.anthropic.com", key="ant-secret"),
    deployment("openai/o1-*", "openai/o1-*", ["restricted-models"]),
    deployment("openai/*", "openai/*", ["default-models"]),
    deployment("bedrock/*", "bedrock/*"),
    deployment("llama", "hosted_vllm/llama", ["beta-models"], base="http://vllm-a:8000/v1", key="a", weight=3),
    deployment("llama", "hosted_vllm/llama", ["beta-models"], base="http://vllm-b:8000/v1", key="b", weight=1),
]})).catalog


def key(models=(), team_id=None, alias="my-key", expires_at=None, blocked=False):
    return KeyRecord("ab" * 32, alias, tuple(models), team_id, expires_at, blocked)


def team(models=(), alias="litellm-dev", blocked=False, team_id="t1"):
    return TeamRecord(team_id, alias, tuple(models), blocked)


def facts(model="gpt-4", token="sk-virtual", path="/v1/chat/completions", **kw):
    return Facts(token=token, model=model, path=path, endpoint=classify(path), **kw)


def run(k, t=None, f=None, draw=0.0):
    return decide(f or facts(), k, t, CATALOG, NOW, draw)


def outcome(decision):
    return "allow" if isinstance(decision, Allow) else (decision.status, decision.code)


CASES = [
    # (name, key, team, model, expected)
    ("guide: key with two models may call gpt-4", key(["gpt-3.5-turbo", "gpt-4"]), None, "gpt-4", "allow"),
    ("guide: key with two models may not call gpt-4o", key(["gpt-3.5-turbo", "gpt-4"]), None, "gpt-4o",
     (403, "model_not_allowed")),
    ("empty list admits every model", key([]), None, "gpt-4o", "allow"),
    ("'*' admits every model", key(["*"]), None, "azure-gpt-3.5", "allow"),
    ("all-proxy-models admits every model", key(["all-proxy-models"]), None, "azure-gpt-3.5", "allow"),
    ("model the catalog lacks is denied even for '*'", key(["*"]), None, "gpt-5", (403, "model_not_allowed")),
    ("guide: team models bind a team key", key([], team_id="t1"), team(["azure-gpt-3.5"]), "azure-gpt-3.5", "allow"),
    ("guide: team key cannot leave the team's models", key([], team_id="t1"), team(["azure-gpt-3.5"]),
     "gpt-4", (403, "model_not_allowed")),
    ("guide: access group admits its members", key(["beta-models"]), None, "gpt-4", "allow"),
    ("access group does not admit other models", key(["beta-models"]), None, "gpt-4o", (403, "model_not_allowed")),
    ("team access group", key([], team_id="t1"), team(["beta-models"]), "llama", "allow"),
    ("guide: wildcard group admits openai/gpt-4", key(["default-models"]), None, "openai/gpt-4", "allow"),
    ("guide: wildcard group denies openai/o1-mini", key(["default-models"]), None, "openai/o1-mini",
     (403, "model_not_allowed")),
    ("#8113: restricted group stays restricted", key(["default-models"]), None, "openai/o1-preview",
     (403, "model_not_allowed")),
    ("restricted group admits its own models", key(["restricted-models"]), None, "openai/o1-mini", "allow"),
    ("key wildcard entry admits matching names", key(["openai/*"]), None, "openai/o1-mini", "allow"),
    ("#33030: bedrock/* does not admit bedrockz/", key(["bedrock/*"]), None, "bedrockz/claude",
     (403, "model_not_allowed")),
    ("#33030: '.' in a pattern is literal", key(["openai/gpt-4.*"]), None, "openai/gpt-4xo",
     (403, "model_not_allowed")),
    ("#38629: key models are checked against the team", key(["gpt-4"], team_id="t1"), team(["gpt-3.5-turbo"]),
     "gpt-4", (403, "model_not_allowed")),
    ("intersection: team admits, key does not", key(["gpt-3.5-turbo"], team_id="t1"), team(["*"]), "gpt-4",
     (403, "model_not_allowed")),
    ("PR #40957: team alias equal to a model does not widen", key(["gpt-3.5-turbo"], team_id="t1"),
     team(["gpt-3.5-turbo"], alias="gpt-4"), "gpt-4", (403, "model_not_allowed")),
    ("all-team-models defers to the team", key(["all-team-models"], team_id="t1"), team(["gpt-4o"]), "gpt-4o",
     "allow"),
    ("all-team-models without a team admits nothing", key(["all-team-models"]), None, "gpt-4o",
     (403, "model_not_allowed")),
    ("expired key", key(expires_at=NOW - 1), None, "gpt-4", (401, "key_expired")),
    ("key not yet expired", key(expires_at=NOW + 60), None, "gpt-4", "allow"),
    ("blocked key", key(blocked=True), None, "gpt-4", (403, "key_blocked")),
    ("blocked team", key(team_id="t1"), team(blocked=True), "gpt-4", (403, "team_blocked")),
    ("team record missing", key(team_id="t1"), None, "gpt-4", (403, "team_not_found")),
    ("unknown key", None, None, "gpt-4", (401, "invalid_api_key")),
    ("master key may call everything", MASTER, None, "openai/o1-pro", "allow"),
    ("OpenAI-format request to an Anthropic deployment", key(), None, "claude", (400, "unsupported_route")),
    ("master key cannot call what does not exist", MASTER, None, "nope", (403, "model_not_allowed")),
]


@pytest.mark.parametrize("name,k,t,model,expected", CASES, ids=[c[0] for c in CASES])
def test_rules(name, k, t, model, expected):
    assert outcome(run(k, t, facts(model))) == expected


def test_no_key_is_401_missing_api_key():
    assert outcome(run(None, f=facts(token=None))) == (401, "missing_api_key")


def test_key_problems_come_before_body_problems():
    bad_body = facts(model=None, body_problem=Problem("invalid_request_body", "not JSON"))
    assert outcome(run(None, f=bad_body)) == (401, "invalid_api_key")
    assert outcome(run(key(), f=bad_body)) == (400, "invalid_request_body")


def test_team_denial_names_the_team_and_lists_usable_models():
    d = run(key([], team_id="t1"), team(["azure-gpt-3.5"]), facts("BEDROCK_GROUP"))
    assert isinstance(d, Deny) and d.status == 403 and d.param == "model"
    assert "litellm-dev" in d.message and "['azure-gpt-3.5']" in d.message


def test_key_denial_names_the_key_alias():
    d = run(key(["gpt-4"], alias="ci-bot"), None, facts("gpt-4o"))
    assert "'ci-bot'" in d.message and "['gpt-4']" in d.message


def test_allow_routes_swaps_credential_and_rewrites_model():
    d = run(key(["default-models"]), f=facts("openai/gpt-4"))
    headers = dict(d.headers)
    assert headers[MODEL_HEADER] == "gpt-4"
    assert headers["authorization"] == "Bearer sk-prov"
    assert headers[CLUSTER_HEADER] == "upstream_http_upstream_8000"
    assert headers[":authority"] == "upstream:8000"
    assert headers[":path"] == "/v1/chat/completions"
    assert set(d.headers_to_remove) == {"x-api-key", "api-key", "x-goog-api-key"}
    assert d.metadata["deployment"] == "6:openai/*" and d.metadata["model"] == "openai/gpt-4"
    assert d.metadata["key_alias"] == "my-key" and d.metadata["key_hash"] == "ab" * 6


def test_azure_deployment_gets_api_key_and_deployment_path():
    headers = dict(run(key(), f=facts("azure-gpt-3.5")).headers)
    assert headers["api-key"] == "az-secret" and "authorization" not in headers
    assert headers[":path"] == "/openai/deployments/chatgpt-v-2/chat/completions?api-version=2024-02-01"
    assert headers[":authority"] == "corp.openai.azure.com"
    assert headers[MODEL_HEADER] == "chatgpt-v-2"


def test_anthropic_deployment_gets_x_api_key():
    d = run(key(), f=facts("claude", path="/v1/messages"))
    headers = dict(d.headers)
    assert headers["x-api-key"] == "ant-secret" and "x-api-key" not in d.headers_to_remove
    assert set(d.headers_to_remove) == {"authorization", "api-key", "x-goog-api-key"}
    assert headers["anthropic-version"] == "2023-06-01" and headers[MODEL_HEADER] == "claude-3-5-sonnet"
    assert headers[":path"] == "/v1/messages"
    kept = run(key(), f=facts("claude", path="/v1/messages", headers={"anthropic-version": "2024-01-01"}))
    assert "anthropic-version" not in dict(kept.headers)


def test_weighted_choice_follows_draw():
    picks = [dict(run(key(), f=facts("llama"), draw=x / 100).headers)[":authority"] for x in range(100)]
    assert picks.count("vllm-a:8000") == 75 and picks.count("vllm-b:8000") == 25


@pytest.mark.parametrize("k,t,expected", [
    (key(["gpt-3.5-turbo", "gpt-4"]), None, ["gpt-3.5-turbo", "gpt-4"]),
    (key(["beta-models"]), None, ["gpt-4", "llama"]),
    (key(["default-models"]), None, ["openai/*"]),
    (key(["all-team-models"], team_id="t1"), team(["azure-gpt-3.5"]), ["azure-gpt-3.5"]),
    (key(["gpt-4", "gpt-4o"], team_id="t1"), team(["gpt-4"]), ["gpt-4"]),
])
def test_visible_models(k, t, expected):
    assert visible_models(k, t, CATALOG) == expected


def test_21032_every_listed_model_is_callable():
    """/v1/models and Check share one rule: every listed name is allowed."""
    for k, t in [(key(["beta-models"]), None), (key(["all-team-models"], team_id="t1"), team(["gpt-4"])),
                 (key(["gpt-4", "claude"], team_id="t1"), team(["claude", "gpt-4o"])), (key(["*"]), None)]:
        for name in visible_models(k, t, CATALOG):
            if "*" not in name:
                path = "/v1/messages" if name == "claude" else "/v1/chat/completions"
                assert isinstance(run(k, t, facts(name, path=path)), Allow), name
        assert "all-team-models" not in visible_models(k, t, CATALOG)


def test_most_specific_wildcard_wins_regardless_of_config_order():
    catalog = Runtime.of(from_dict({"model_list": [
        deployment("openai/*", "openai/*", ["default-models"]),
        deployment("openai/o1-*", "openai/o1-*", ["restricted-models"]),
    ]})).catalog
    res = catalog.resolve("openai/o1-mini")
    assert res.group.name == "openai/o1-*" and res.capture == "mini"
    assert catalog.resolve("openai/gpt-4").group.name == "openai/*"
    assert catalog.resolve("azure/gpt-4") is None
