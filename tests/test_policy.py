"""The decision engine, table-driven and without I/O."""

from __future__ import annotations

import json

import pytest

from extauthz.check.catalog import canonical_name
from extauthz.config import from_dict
from extauthz.domain.endpoints import classify
from extauthz.check.facts import Facts, Problem
from extauthz.check.decision import Allow
from extauthz.domain.deny import Deny
from extauthz.check.policy import decide, visible_models
from extauthz.domain.record import MASTER, KeyRecord, TeamRecord
from extauthz.check.json_body import read_json_model
from extauthz.domain.envoy_names import CLUSTER_HEADER, NO_SPLICE, SPLICE_HEADER
from extauthz.check.runtime import Runtime

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


def body_of(model):
    return json.dumps({"messages": [], "model": model}).encode()


def facts(model="gpt-4", token="sk-virtual", path="/v1/chat/completions", **kw):
    endpoint = classify(path)
    if isinstance(model, str) and endpoint is not None and endpoint.body == "json" and "json_model" not in kw:
        kw["json_model"] = read_json_model(body_of(model))  # as if the body were {"model": model}
    return Facts(token=token, model=model, path=path, endpoint=endpoint, **kw)


def written_model(decision, model):
    """The model the provider reads once Envoy applied the decision's splice plan to body_of(model)."""
    body, plan = body_of(model), dict(decision.headers)[SPLICE_HEADER]
    if plan != NO_SPLICE:
        length, start, end, original, token = plan.split(" ", 4)
        assert int(length) == len(body) and body[int(start):int(end)] == bytes.fromhex(original)
        body = body[:int(start)] + token.encode() + body[int(end):]
    return json.loads(body)["model"]


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
    ("blocked key", key(blocked=True), None, "gpt-4", (401, "key_blocked")),
    ("blocked team", key(team_id="t1"), team(blocked=True), "gpt-4", (401, "team_blocked")),
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
    assert written_model(d, "openai/gpt-4") == "gpt-4"
    assert headers["authorization"] == "Bearer sk-prov"
    assert headers[CLUSTER_HEADER] == "upstream_http_upstream_8000"
    assert headers[":authority"] == "upstream:8000"
    assert headers[":path"] == "/v1/chat/completions"
    assert set(d.headers_to_remove) == {"x-api-key", "api-key", "x-goog-api-key", "cookie", "proxy-authorization",
                                        "x-litellm-api-key", "openai-organization", "openai-project",
                                        "x-goog-user-project", "x-goog-fieldmask", "x-amz-security-token", "x-amz-date",
                                        "x-amz-content-sha256", "x-amz-target", "x-amzn-bedrock-service-tier",
                                        "x-amzn-bedrock-guardrailidentifier", "x-amzn-bedrock-guardrailversion",
                                        "x-amzn-bedrock-trace", "x-amzn-bedrock-performanceconfig-latency",
                                        "x-extauthz-sign"}
    assert d.metadata["deployment"] == "6:openai/*" and d.metadata["model"] == "openai/gpt-4"
    assert d.metadata["key_alias"] == "my-key" and d.metadata["key_hash"] == "ab" * 6


def test_behind_a_gateway_that_rematches_routes_the_allow_leaves_the_host_alone():
    """upstream_authority: false (Istio clearRouteCache, Envoy Gateway recomputeRoute): a
    new :authority would match none of the gateway's host-bound routes; the route sets it."""
    config = from_dict({"model_list": [deployment("gpt-4", "openai/gpt-4", key="sk-prov-4")],
                        "extauthz_settings": {"upstream_authority": False}})
    d = decide(facts("gpt-4"), key(["gpt-4"]), None, Runtime.of(config).catalog, NOW, 0.0)
    headers = dict(d.headers)
    assert ":authority" not in headers and ":authority" not in d.headers_to_remove
    assert headers[CLUSTER_HEADER] == "upstream_http_upstream_8000" and headers["authorization"] == "Bearer sk-prov-4"


def test_without_a_body_rewrite_a_call_needing_one_is_refused_not_sent_under_the_clients_name():
    """Envoy Gateway (and Istio without the splice EnvoyFilter) cannot rewrite the body: a
    call whose provider knows the model by another name is refused; one named as the
    provider names it goes through unchanged."""
    def decided(body_rewrite: bool, model: str):
        config = from_dict({"model_list": [deployment("gpt-4", "openai/gpt-4", key="sk-prov-4"),
                                           deployment("smart", "openai/gpt-4o", key="sk-prov-4o")],
                            "extauthz_settings": {"body_rewrite": body_rewrite}})
        return decide(facts(model), key([model]), None, Runtime.of(config).catalog, NOW, 0.0)

    refused = decided(False, "smart")
    assert isinstance(refused, Deny) and refused.code == "model_rewrite_unavailable" and refused.status == 400
    assert isinstance(decided(True, "smart"), Allow) and written_model(decided(True, "smart"), "smart") == "gpt-4o"
    same = decided(False, "gpt-4")
    assert isinstance(same, Allow) and dict(same.headers)[SPLICE_HEADER] == "-"


def test_behind_a_gateway_pass_through_allows_leave_the_host_alone_too():
    config = from_dict({"model_list": [deployment("gpt-4", "openai/gpt-4")],
                        "general_settings": {"pass_through_endpoints": [
                            {"path": "/p", "target": "http://upstream.local/files"}]},
                        "extauthz_settings": {"upstream_authority": False}})
    (route,) = Runtime.of(config).catalog.pass_through
    assert ":authority" not in dict(route.headers) and ":authority" not in route.headers_to_remove
    default = from_dict({"model_list": [deployment("gpt-4", "openai/gpt-4")], "general_settings": {
        "pass_through_endpoints": [{"path": "/p", "target": "http://upstream.local/files"}]}})
    assert dict(Runtime.of(default).catalog.pass_through[0].headers)[":authority"] == "upstream.local"


def test_the_rendered_envoy_refuses_a_config_that_leaves_the_host_to_the_routes():
    """Its routes keep the host the allow sets: without it the provider would get the client's."""
    from extauthz.envoy.render import render
    config = from_dict({"model_list": [deployment("gpt-4", "openai/gpt-4")],
                        "extauthz_settings": {"upstream_authority": False}})
    with pytest.raises(ValueError, match="upstream_authority"):
        render(config)


def test_azure_deployment_gets_api_key_and_deployment_path():
    d = run(key(), f=facts("azure-gpt-3.5"))
    headers = dict(d.headers)
    assert headers["api-key"] == "az-secret" and "authorization" not in headers
    assert headers[":path"] == "/openai/deployments/chatgpt-v-2/chat/completions?api-version=2024-02-01"
    assert headers[":authority"] == "corp.openai.azure.com"
    assert written_model(d, "azure-gpt-3.5") == "chatgpt-v-2"


def test_anthropic_deployment_gets_x_api_key():
    d = run(key(), f=facts("claude", path="/v1/messages"))
    headers = dict(d.headers)
    assert headers["x-api-key"] == "ant-secret" and "x-api-key" not in d.headers_to_remove
    assert {"authorization", "api-key", "x-goog-api-key"} <= set(d.headers_to_remove)
    assert headers["anthropic-version"] == "2023-06-01" and written_model(d, "claude") == "claude-3-5-sonnet"
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


# Case and separator variants: a name that differs from another only in letter case or
# a repeated leading path segment must not reach a less restricted group through a pattern.

def catalog_of(*deployments, aliases=None):
    config = {"model_list": list(deployments)}
    if aliases:
        config["router_settings"] = {"model_group_alias": aliases}
    return Runtime.of(from_dict(config)).catalog


STAR_AND_GPT4 = catalog_of(deployment("gpt-4", "openai/gpt-4", ["beta-models"]), deployment("*", "openai/*"))


@pytest.mark.parametrize("k,model", [
    (key(["default-models"]), "openai/O1-mini"),
    (key(["default-models"]), "openai/openai/o1-mini"),
    (key(["default-models"]), "openai/openai/openai/O1-Preview"),
    (key(["restricted-models", "default-models"]), "openai/O1-mini"),  # refused even when both groups are granted
    (MASTER, "openai/O1-mini"),
])
def test_variant_reaching_a_less_restricted_pattern_is_invalid_model(k, model):
    d = run(k, f=facts(model))
    assert outcome(d) == (400, "invalid_model") and d.param == "model"
    assert repr(model) in d.message and "'openai/o1-*'" in d.message and "exact name" in d.message


@pytest.mark.parametrize("k,model,expected", [
    (key(["default-models"]), "openai/o1-mini", (403, "model_not_allowed")),  # the canonical name: as before
    (key(["restricted-models"]), "openai/o1-mini", "allow"),
    (key(["default-models"]), "openai/gpt-4", "allow"),
    (key(["default-models"]), "openai/GPT-4o", "allow"),  # canonical openai/gpt-4o is served by openai/* too
    (key(["beta-models"]), "gpt-4", "allow"),
    (key(["beta-models"]), "GPT-4", (403, "model_not_allowed")),  # no pattern serves it: unknown, as before
    (key(["default-models"]), "OpenAI/openai/o1-mini", (403, "model_not_allowed")),  # unknown as spelled
])
def test_canonical_and_ordinary_names_are_unaffected(k, model, expected):
    assert outcome(run(k, f=facts(model))) == expected


def test_case_variant_keeps_its_capture_when_allowed():
    d = run(key(["default-models"]), f=facts("openai/GPT-4o"))
    assert written_model(d, "openai/GPT-4o") == "GPT-4o"


def test_case_variant_of_an_exact_group_is_refused_rather_than_served_by_star():
    d = decide(facts("GPT-4"), key(["*"]), None, STAR_AND_GPT4, NOW)
    assert outcome(d) == (400, "invalid_model") and "'GPT-4'" in d.message and "'gpt-4'" in d.message
    assert outcome(decide(facts("gpt-4"), key(["*"]), None, STAR_AND_GPT4, NOW)) == "allow"
    assert outcome(decide(facts("mistral-large"), key(["*"]), None, STAR_AND_GPT4, NOW)) == "allow"


def test_groups_differing_only_in_case_each_resolve_to_themselves():
    catalog = catalog_of(deployment("gpt-4", "openai/gpt-4", key="sk-lower"),
                         deployment("GPT-4", "openai/GPT-4", key="sk-upper"),
                         deployment("OpenAI/*", "openai/*", key="sk-upper-star"),
                         deployment("openai/*", "openai/*", key="sk-lower-star"),
                         deployment("*", "openai/*"))
    for model, upstream_key in [("gpt-4", "sk-lower"), ("GPT-4", "sk-upper"),
                                ("OpenAI/x", "sk-upper-star"), ("openai/x", "sk-lower-star")]:
        d = decide(facts(model), key(), None, catalog, NOW)
        assert outcome(d) == "allow" and dict(d.headers)["authorization"] == f"Bearer {upstream_key}", model
    assert outcome(decide(facts("Gpt-4"), key(), None, catalog, NOW)) == (400, "invalid_model")


def test_exact_names_the_config_spells_out_are_not_variants():
    catalog = catalog_of(deployment("openai/openai/x", "openai/x", key="sk-doubled"),
                         deployment("openai/x", "openai/x"), deployment("GPT4", "openai/gpt-4"),
                         deployment("*", "openai/*"), aliases={"gpt4": "GPT4", "OPENAI/X": "openai/x"})
    for model in ["openai/openai/x", "openai/x", "GPT4", "gpt4", "OPENAI/X"]:
        assert outcome(decide(facts(model), key(), None, catalog, NOW)) == "allow", model
    assert outcome(decide(facts("Gpt4"), key(), None, catalog, NOW)) == (400, "invalid_model")


def test_canonical_name():
    assert canonical_name("openai/O1-mini") == "openai/o1-mini"
    assert canonical_name("OpenAI/openai/OPENAI/o1-mini") == "openai/o1-mini"
    assert canonical_name("openai/gpt-4/gpt-4") == "openai/gpt-4/gpt-4"  # only leading repeats go
    assert canonical_name("a/a") == "a"


@pytest.mark.parametrize("model", ["openai/\uff4f1-mini", "openai/\U0001d428\U0001d7cf-mini"])
def test_compatibility_forms_of_a_restricted_name_are_refused(model):
    assert outcome(run(key(["default-models"]), f=facts(model))) == (400, "invalid_model")


# --- deployments the gateway cannot route ---------------------------------------------------------

MIXED = Runtime.of(from_dict({"model_list": [
    deployment("claude", "bedrock/meta.llama3-70b", aws_region_name="us-east-1"),  # unroutable
    deployment("claude", "anthropic/claude-3-5-sonnet", base="https://api.anthropic.com"),
    deployment("titan", "bedrock/amazon.titan"),                               # unroutable only
    deployment("gpt-4o", "openai/gpt-4o", key="os.environ/EXTAUTHZ_TEST_UNSET_VARIABLE"),
]}))


def test_a_model_group_serves_from_its_routable_deployments_only() -> None:
    for draw in (0.0, 0.3, 0.99):
        d = decide(facts("claude", path="/v1/messages"), key(), None, MIXED.catalog, NOW, draw)
        assert isinstance(d, Allow) and d.route.deployment.provider == "anthropic"


@pytest.mark.parametrize("model,reason", [("titan", "family 'amazon'"),
                                          ("gpt-4o", "EXTAUTHZ_TEST_UNSET_VARIABLE")])
def test_a_model_with_no_routable_deployment_is_a_503_naming_why(model: str, reason: str) -> None:
    d = decide(facts(model), key(), None, MIXED.catalog, NOW)
    assert isinstance(d, Deny) and (d.status, d.code, d.type) == (503, "deployment_unavailable",
                                                                  "service_unavailable_error")
    assert reason in d.message


def test_a_caller_not_allowed_the_model_still_gets_403_not_the_reason() -> None:
    d = decide(facts("titan"), key(["claude"]), None, MIXED.catalog, NOW)
    assert isinstance(d, Deny) and d.status == 403 and "AWS" not in d.message


# --- Bedrock ---------------------------------------------------------------------------------------

BEDROCK = Runtime.of(from_dict({"model_list": [
    {"model_name": "claude", "litellm_params": {"model": "bedrock/us.anthropic.claude-3-5-sonnet-20240620-v1:0",
                                               "aws_region_name": "eu-west-1"}},
    {"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o", "api_base": "http://upstream:8000/v1",
                                            "api_key": "sk-prov"}},
]})).catalog


def bedrock_facts(raw: bytes, path: str = "/v1/messages") -> Facts:
    return Facts(token="sk-virtual", model="claude", path=path, endpoint=classify(path),
                 json_model=read_json_model(raw))


def test_an_anthropic_body_to_bedrock_is_planned_as_the_invoke_body() -> None:
    raw = b'{"stream":false,"model":"claude","max_tokens":1}'
    d = decide(bedrock_facts(raw), key(), None, BEDROCK, NOW)
    assert isinstance(d, Allow)
    headers = dict(d.headers)
    assert headers[":path"] == "/model/us.anthropic.claude-3-5-sonnet-20240620-v1%3A0/invoke"
    assert headers[":authority"] == "bedrock-runtime.eu-west-1.amazonaws.com"
    assert "authorization" not in headers and "authorization" in d.headers_to_remove  # Envoy signs
    length, star, *edits = headers[SPLICE_HEADER].split(" ")
    assert (int(length), star) == (len(raw), "*")
    applied, at = b"", 0
    for edit in edits:
        start, end, old, new = edit.split(",")
        assert raw[int(start):int(end)] == bytes.fromhex(old)
        applied += raw[at:int(start)] + bytes.fromhex(new)
        at = int(end)
    applied += raw[at:]
    assert json.loads(applied) == {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 1}


@pytest.mark.parametrize("raw,code", [
    (b'{"model":"claude","stream":true}', "unsupported_route"),
    (b'{"model":"claude","anthropic_version":"x"}', "invalid_request_body"),
])
def test_what_an_anthropic_body_to_bedrock_cannot_carry(raw: bytes, code: str) -> None:
    d = decide(bedrock_facts(raw), key(), None, BEDROCK, NOW)
    assert isinstance(d, Deny) and d.code == code


def test_bedrocks_own_path_forwards_the_body_untouched() -> None:
    raw = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":1}'
    d = decide(bedrock_facts(raw, "/model/claude/invoke-with-response-stream"), key(), None, BEDROCK, NOW)
    assert isinstance(d, Allow)
    headers = dict(d.headers)
    assert headers[SPLICE_HEADER] == NO_SPLICE
    assert headers[":path"].endswith("/invoke-with-response-stream")
    assert headers["accept"] == "application/vnd.amazon.eventstream"


@pytest.mark.parametrize("requested,allowed", [
    ("claude-x/../../publishers/google/models/gemini", False), ("claude-a%2Fb", False), ("claude-..", False),
    ("claude-3-5-sonnet-20240620-v1:0", True),
])
def test_what_a_wildcard_matched_goes_into_a_path_only_when_plain(requested: str, allowed: bool) -> None:
    catalog = Runtime.of(from_dict({"model_list": [{"model_name": "claude-*", "litellm_params": {
        "model": "bedrock/anthropic.claude-*", "aws_region_name": "us-east-1"}}]})).catalog
    raw = json.dumps({"model": requested, "max_tokens": 1}).encode()
    d = decide(bedrock_facts(raw)._replace(model=requested), key(), None, catalog, NOW)
    assert isinstance(d, Allow) is allowed, d
    if not allowed:
        assert d.code == "invalid_model"


# -- a user's models narrow its personal keys ------------------------------------------------

def owner(models=()):
    from extauthz.domain.record import UserRecord
    return UserRecord("u-ann", "internal_user", tuple(models))


@pytest.mark.parametrize("key_models, user_models, model, allowed", [
    ((), (), "gpt-4", True),                         # neither lists: every model
    ((), ("gpt-4",), "gpt-4", True),
    ((), ("gpt-4",), "gpt-4o", False),               # the user's list narrows the key's "every model"
    (("gpt-4o",), ("gpt-4",), "gpt-4o", False),      # both must allow
    (("beta-models",), ("gpt-4", "llama"), "llama", True),
    ((), ("no-default-models",), "gpt-4", False),    # none of its own
    ((), ("openai/*",), "openai/gpt-4.1", True),
])
def test_owner_models(key_models, user_models, model, allowed):
    decision = decide(facts(model), key(key_models), None, CATALOG, NOW, owner=owner(user_models))
    assert isinstance(decision, Allow) is allowed
    if not allowed:
        assert decision.code == "model_not_allowed"
        assert visible_models(key(key_models), None, CATALOG, owner(user_models)) == [
            n for n in visible_models(key(key_models), None, CATALOG) if n in visible_models(
                key(user_models), None, CATALOG)]


def test_a_keys_allowed_routes_refuse_before_the_body():
    from extauthz.check.policy import route_denied
    k = KeyRecord("ab" * 32, "k", (), None, None, False, None, None, ("info_routes",))
    denied = route_denied(facts("gpt-4"), k)
    assert denied is not None and denied.status == 403 and denied.code == "route_not_allowed"
    assert route_denied(facts("gpt-4"), key()) is None
    llm = k._replace(allowed_routes=("llm_api_routes",))
    assert route_denied(facts("gpt-4"), llm) is None
    assert route_denied(facts("gpt-4", path="/v1/embeddings"), k._replace(allowed_routes=("/v1/chat/*",))) is not None


def test_a_refusal_names_the_group_a_more_specific_pattern_or_an_alias_serves() -> None:
    denied = decide(facts("openai/o1-mini"), key(["default-models"]), None, CATALOG, NOW)
    assert isinstance(denied, Deny) and denied.code == "model_not_allowed"
    assert "it is served by the model group 'openai/o1-*', access groups ['restricted-models']" in denied.message
    plain = decide(facts("gpt-4o"), key(["gpt-4"]), None, CATALOG, NOW)
    assert isinstance(plain, Deny) and "served by" not in plain.message   # asked by its group's own name
