"""The commands of LiteLLM's "Control Model Access" guide, replayed through a real Envoy,
a real sidecar and a real redis-server, with a fake upstream echoing what it received."""

from __future__ import annotations

import pytest

from tests.conftest import Gateway

VIRTUAL_KEY_HEADERS = ("authorization", "x-api-key", "api-key")


def assert_error(r, status: int, code: str) -> dict:
    assert r.status == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    return error


def assert_reached(r, credential: tuple[str, str], model: str, path: str, virtual_key: str) -> dict:
    """The upstream got the deployment's credential and model, and never the virtual key."""
    assert r.status == 200, r.text
    echo = r.json()["echo"]
    name, value = credential
    assert echo["headers"][name] == value
    assert echo["body"]["model"] == model
    assert echo["path"] == path
    assert virtual_key not in str(echo["headers"])
    for header in VIRTUAL_KEY_HEADERS:
        if header != name:
            assert header not in echo["headers"], header
    assert not any(h.startswith("x-extauthz") for h in echo["headers"])
    return echo


def test_key_with_two_models(gateway: Gateway) -> None:
    r = gateway.admin("/key/generate", {"models": ["gpt-3.5-turbo", "gpt-4"]})
    assert r.status == 200, r.text
    key = r.json()["key"]
    assert key.startswith("sk-") and r.json()["models"] == ["gpt-3.5-turbo", "gpt-4"]

    allowed = gateway.chat(key, "gpt-4")
    echo = assert_reached(allowed, ("authorization", "Bearer sk-upstream-gpt-4"), "gpt-4",
                          "/v1/chat/completions", key)
    assert echo["host"] == f"127.0.0.1:{gateway.upstream_port}"
    assert echo["body"]["messages"] == [{"role": "user", "content": "Hello"}]

    gateway.forget_upstream()
    denied = gateway.chat(key, "gpt-4o")
    error = assert_error(denied, 403, "model_not_allowed")
    assert "gpt-4o" in error["message"] and "['gpt-3.5-turbo', 'gpt-4']" in error["message"]
    assert error["type"] == "permission_error" and error["param"] == "model"
    assert gateway.upstream_seen() == []


def test_team_models_and_azure_deployment(gateway: Gateway) -> None:
    r = gateway.admin("/team/new", {"team_alias": "litellm-dev", "models": ["azure-gpt-3.5"]})
    assert r.status == 200, r.text
    team_id = r.json()["team_id"]
    key = gateway.new_key(team_id=team_id)

    allowed = gateway.chat(key, "azure-gpt-3.5")
    assert_reached(allowed, ("api-key", "azure-upstream-key"), "chatgpt-v-2",
                   "/openai/deployments/chatgpt-v-2/chat/completions?api-version=2024-02-01", key)

    denied = gateway.chat(key, "BEDROCK_GROUP")
    error = assert_error(denied, 403, "model_not_allowed")
    assert "litellm-dev" in error["message"] and "['azure-gpt-3.5']" in error["message"]
    assert "Traceback" not in denied.text
    assert_error(gateway.chat(key, "gpt-4"), 403, "model_not_allowed")


def test_access_group_on_a_key(gateway: Gateway) -> None:
    # The guide's key has "max_budget": 0, which LiteLLM itself treats as a spent budget
    # (spend >= max_budget): its group's models get 422 budget_exceeded, the others still
    # 403 model_not_allowed (the model check comes first, as in LiteLLM).
    r = gateway.admin("/key/generate", {"models": ["beta-models"], "max_budget": 0})
    assert r.status == 200, r.text
    body = r.json()
    assert body["max_budget"] == 0 and body["not_enforced"] == []
    key = body["key"]
    gateway.forget_upstream()
    for model in ("gpt-4", "fireworks-llama-v3-70b-instruct"):
        error = assert_error(gateway.chat(key, model), 422, "budget_exceeded")
        assert error["type"] == "budget_exceeded"
        assert "Current cost: 0, Max budget: 0" in error["message"]
    assert_error(gateway.chat(key, "gpt-4o"), 403, "model_not_allowed")
    assert gateway.upstream_seen() == []
    # The same group on a key with a budget left reaches each model's deployment.
    key = gateway.admin("/key/generate", {"models": ["beta-models"], "max_budget": 5}).json()["key"]
    assert_reached(gateway.chat(key, "gpt-4"), ("authorization", "Bearer sk-upstream-gpt-4"), "gpt-4",
                   "/v1/chat/completions", key)
    assert_reached(gateway.chat(key, "fireworks-llama-v3-70b-instruct"),
                   ("authorization", "Bearer fw-upstream-key"), "accounts/fireworks/models/llama-v3-70b-instruct",
                   "/inference/v1/chat/completions", key)
    assert_error(gateway.chat(key, "gpt-4o"), 403, "model_not_allowed")


def test_access_group_on_a_team(gateway: Gateway) -> None:
    team_id = gateway.new_team(models=["beta-models"])
    key = gateway.new_key(team_id=team_id)
    assert gateway.chat(key, "gpt-4").status == 200
    assert_error(gateway.chat(key, "gpt-3.5-turbo"), 403, "model_not_allowed")


def test_wildcard_access_groups(gateway: Gateway) -> None:
    key = gateway.new_key(models=["default-models"])
    assert_reached(gateway.chat(key, "openai/gpt-4"), ("authorization", "Bearer sk-upstream-openai-wildcard"),
                   "gpt-4", "/v1/chat/completions", key)
    gateway.forget_upstream()
    refused = gateway.chat(key, "openai/o1-mini")
    assert_error(refused, 403, "model_not_allowed")
    # The refusal says what decided, not only that openai/* is among the valid models.
    assert "served by the model group 'openai/o1-*', access groups ['restricted-models']" in \
        refused.json()["error"]["message"]
    assert gateway.upstream_seen() == []


def test_master_key_calls_any_model(gateway: Gateway) -> None:
    assert_reached(gateway.chat("sk-1234", "openai/o1-mini"), ("authorization", "Bearer sk-upstream-o1"),
                   "o1-mini", "/v1/chat/completions", "sk-1234")


@pytest.mark.parametrize("headers", [{"x-api-key": "{key}"}, {"api-key": "{key}"}])
def test_key_in_other_headers_is_accepted_and_removed(gateway: Gateway, headers: dict[str, str]) -> None:
    key = gateway.new_key(models=["gpt-4"])
    sent = {k: v.format(key=key) for k, v in headers.items()}
    assert_reached(gateway.chat(None, "gpt-4", sent), ("authorization", "Bearer sk-upstream-gpt-4"), "gpt-4",
                   "/v1/chat/completions", key)


def test_client_routing_and_model_headers_are_overwritten(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-3.5-turbo"])
    r = gateway.chat(key, "gpt-3.5-turbo", {"x-extauthz-cluster": "extauthz_admin", "x-extauthz-splice": "-"})
    assert_reached(r, ("authorization", "Bearer sk-upstream-gpt-35-turbo"), "gpt-3.5-turbo",
                   "/v1/chat/completions", key)


def test_denies_through_envoy(gateway: Gateway) -> None:
    assert_error(gateway.chat(None, "gpt-4"), 401, "missing_api_key")
    assert_error(gateway.chat("sk-not-a-key", "gpt-4"), 401, "invalid_api_key")
    key = gateway.new_key(models=["gpt-4"])
    assert_error(gateway.chat(key, 42), 400, "invalid_model")
    from tests.harness import http
    r = http("POST", gateway.envoy.url + "/v1/chat/completions", raw=b"{not json",
             headers={"Authorization": f"Bearer {key}"})
    assert_error(r, 400, "invalid_request_body")


def test_block_unblock_update_delete(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"], key_alias="ops-bot")
    assert gateway.admin("/key/block", {"key": key}).status == 200
    assert_error(gateway.chat(key, "gpt-4"), 401, "key_blocked")
    assert gateway.admin("/key/unblock", {"key": key}).status == 200
    assert gateway.chat(key, "gpt-4").status == 200

    assert_error(gateway.chat(key, "gpt-4o"), 403, "model_not_allowed")
    assert gateway.admin("/key/update", {"key": key, "models": ["gpt-4o"]}).status == 200
    assert gateway.chat(key, "gpt-4o").status == 200

    r = gateway.admin("/key/delete", {"key_aliases": ["ops-bot"]})
    assert r.status == 200, r.text
    assert_error(gateway.chat(key, "gpt-4o"), 401, "invalid_api_key")


def test_expired_key(gateway: Gateway) -> None:
    key = gateway.new_key(models=["gpt-4"], expires="2020-01-01T00:00:00Z")
    assert_error(gateway.chat(key, "gpt-4"), 401, "key_expired")
    fresh = gateway.new_key(models=["gpt-4"], duration="1h")
    assert gateway.chat(fresh, "gpt-4").status == 200


def test_blocked_team(gateway: Gateway) -> None:
    team_id = gateway.new_team(team_alias="blockable", models=["gpt-4"])
    key = gateway.new_key(team_id=team_id)
    assert gateway.chat(key, "gpt-4").status == 200
    assert gateway.admin("/team/block", {"team_id": team_id}).status == 200
    assert_error(gateway.chat(key, "gpt-4"), 401, "team_blocked")
    assert gateway.admin("/team/unblock", {"team_id": team_id}).status == 200
    assert gateway.chat(key, "gpt-4").status == 200


def test_team_update_narrows_existing_keys(gateway: Gateway) -> None:
    team_id = gateway.new_team(models=["gpt-4", "gpt-4o"])
    key = gateway.new_key(team_id=team_id)
    assert gateway.chat(key, "gpt-4o").status == 200
    assert gateway.admin("/team/update", {"team_id": team_id, "models": ["gpt-4"]}).status == 200
    assert_error(gateway.chat(key, "gpt-4o"), 403, "model_not_allowed")


def test_team_delete_takes_its_keys(gateway: Gateway) -> None:
    team_id = gateway.new_team(models=["gpt-4"])
    key = gateway.new_key(team_id=team_id)
    r = gateway.admin("/team/delete", {"team_ids": [team_id]})
    assert r.status == 200 and r.json()["deleted_keys"] == 1, r.text
    assert_error(gateway.chat(key, "gpt-4"), 401, "invalid_api_key")
    assert gateway.admin(f"/team/info?team_id={team_id}", method="GET").status == 404


def test_v1_models_lists_exactly_what_the_key_can_call(gateway: Gateway) -> None:
    key = gateway.new_key(models=["beta-models"])
    r = gateway.admin("/v1/models", method="GET", key=key)
    assert r.status == 200, r.text
    names = [m["id"] for m in r.json()["data"]]
    assert names == ["gpt-4", "fireworks-llama-v3-70b-instruct"]
    for name in names:
        assert gateway.chat(key, name).status == 200
    assert gateway.admin("/v1/models/gpt-4", method="GET", key=key).status == 200
    assert_error(gateway.admin("/v1/models/gpt-4o", method="GET", key=key), 404, "model_not_found")
    assert_error(gateway.admin("/v1/models", method="GET", key="sk-nope"), 401, "invalid_api_key")


def test_model_is_rewritten_whatever_the_content_type(gateway: Gateway) -> None:
    """curl -d sends form encoding; the checked JSON body must still reach the provider rewritten."""
    from tests.harness import http
    key = gateway.new_key(models=["default-models"])
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        r = http("POST", gateway.envoy.url + "/v1/chat/completions", raw=b'{"model": "openai/gpt-4o", "messages": []}',
                 headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})
        assert_reached(r, ("authorization", "Bearer sk-upstream-openai-wildcard"), "gpt-4o",
                       "/v1/chat/completions", key)


def test_duplicate_model_keys_are_refused(gateway: Gateway) -> None:
    """Parsers that take the first or the last member would read different models."""
    from tests.harness import http
    key = gateway.new_key(models=["gpt-4"])
    gateway.forget_upstream()
    for raw in (b'{"model": "gpt-4o", "model": "gpt-4"}', b'{"model": "gpt-4", "model": "gpt-4o"}'):
        r = http("POST", gateway.envoy.url + "/v1/chat/completions", raw=raw,
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        assert_error(r, 400, "invalid_request_body")
    assert gateway.upstream_seen() == []
