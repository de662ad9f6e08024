"""Where LiteLLM's users rely on its answers, the gateway gives the same, through real
Envoy and Redis: the statuses of blocked keys and admin-only routes; a JWT's required
team claim and user record, and a user record's proxy_admin role; team members' key
permissions (team_member_permissions); internal users' personal keys, own teams and
/model/info; a key reading its own /key/info; budgets skipped for a deployment the config
prices at zero. Each difference kept on purpose is in docs/migrating-from-litellm.md."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.conftest import Gateway, example_stack
from tests.harness import http
from tests.test_jwt import AUDIENCE, IdentityProvider, idp  # noqa: F401 (idp: the fixture)

FREE_MODEL = {"model_name": "local-llama", "litellm_params": {
    "model": "openai/llama-3-8b", "api_base": "http://127.0.0.1:8081/v1", "api_key": "sk-upstream-local"},
    "model_info": {"input_cost_per_token": 0, "output_cost_per_token": 0}}


@pytest.fixture(scope="module")
def parity(workdir: Path, upstream_port: int, redis_port: int, idp: IdentityProvider) -> Iterator[Gateway]:  # noqa: F811
    def edit(config: dict) -> None:
        config["model_list"].append(yaml.safe_load(yaml.safe_dump(FREE_MODEL).replace(
            "127.0.0.1:8081", f"127.0.0.1:{upstream_port}")))
        config["general_settings"].update({"enable_jwt_auth": True, "litellm_jwtauth": {
            "public_key_url": f"{idp.base}/.well-known/openid-configuration", "audience": AUDIENCE,
            "team_id_jwt_field": "team", "team_ids_jwt_field": "groups", "user_id_jwt_field": "sub",
            "roles_jwt_field": "roles", "role_mappings": [{"role": "dev", "internal_role": "internal_user"}]}})
    with example_stack(workdir, upstream_port, f"redis://127.0.0.1:{redis_port}/9", "parity", edit) as gateway:
        yield gateway


def refusal(r: Any) -> tuple[int, str]:
    return r.status, r.json()["error"]["code"]


def call(gw: Gateway, method: str, path: str, key: str, body: Any = None) -> Any:
    return http(method, gw.envoy.url + path, body, {"Authorization": f"Bearer {key}"})


def new_user(gw: Gateway, role: str = "internal_user", **fields: Any) -> tuple[str, str]:
    """A user and its personal key (its owner's admin powers)."""
    user_id = "p-" + secrets.token_hex(4)
    made = gw.admin("/user/new", {"user_id": user_id, "user_role": role, **fields})
    assert made.status == 200, made.text
    return user_id, made.json()["key"]


# -- statuses ---------------------------------------------------------------------------------

def test_blocked_keys_and_teams_are_authentication_errors_as_in_litellm(parity: Gateway) -> None:
    import openai
    key = parity.new_key(models=["gpt-4"])
    assert parity.admin("/key/block", {"key": key}).status == 200
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=f"{parity.envoy.url}/v1", api_key=key, max_retries=0).chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 401 and refused.value.body["code"] == "key_blocked"
    team = parity.new_team(models=["gpt-4"])
    in_team = parity.new_key(team_id=team)
    assert parity.admin("/team/block", {"team_id": team}).status == 200
    assert refusal(parity.chat(in_team, "gpt-4")) == (401, "team_blocked")


def test_an_admin_only_route_is_refused_with_litellms_401(parity: Gateway) -> None:
    _, key = new_user(parity)
    assert refusal(call(parity, "POST", "/team/new", key, {"team_alias": "mine"})) == (401, "admin_not_allowed")
    _, viewer = new_user(parity, "proxy_admin_viewer")
    assert refusal(call(parity, "POST", "/key/generate", viewer, {})) == (403, "admin_not_allowed")  # a viewer's write
    # A record the caller may not touch stays 404: whether it exists is not the caller's to learn.
    other = parity.new_key(models=["gpt-4"])
    assert call(parity, "GET", f"/key/info?key={other}", key).status == 404


# -- JWT ----------------------------------------------------------------------------------------

def test_team_id_jwt_field_is_required_even_when_groups_name_teams(parity: Gateway,
                                                                  idp: IdentityProvider) -> None:  # noqa: F811
    assert parity.admin("/team/new", {"team_id": "jwt-core", "models": ["gpt-4"]}).status == 200
    assert parity.admin("/user/new", {"user_id": "jwt-ann", "auto_create_key": False}).status == 200
    assert parity.chat(idp.token(sub="jwt-ann", team="jwt-core"), "gpt-4").status == 200
    refused = parity.chat(idp.token(sub="jwt-ann", groups=["jwt-core"]), "gpt-4")
    assert refusal(refused) == (401, "missing_team")
    assert "team_id field 'team'" in refused.json()["error"]["message"]
    assert refusal(parity.chat(idp.token(sub="jwt-ann", team="no-such-team"), "gpt-4")) == (404, "team_not_found")


def test_user_id_jwt_field_admits_only_users_with_a_record(parity: Gateway,
                                                           idp: IdentityProvider) -> None:  # noqa: F811
    assert parity.admin("/team/new", {"team_id": "jwt-rec", "models": ["gpt-4"]}).status == 200
    token = idp.token(sub="jwt-stranger", team="jwt-rec")
    refused = parity.chat(token, "gpt-4")
    assert refusal(refused) == (401, "user_not_found") and "/user/new" in refused.json()["error"]["message"]
    assert parity.admin("/user/new", {"user_id": "jwt-stranger", "auto_create_key": False}).status == 200
    assert parity.chat(token, "gpt-4").status == 200


def test_a_user_record_with_the_proxy_admin_role_makes_its_token_a_proxy_admin(
        parity: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    assert parity.admin("/team/new", {"team_id": "jwt-narrow", "models": ["gpt-4"]}).status == 200
    assert parity.admin("/user/new", {"user_id": "jwt-boss", "user_role": "proxy_admin",
                                      "auto_create_key": False}).status == 200
    assert parity.admin("/user/new", {"user_id": "jwt-plain", "auto_create_key": False}).status == 200
    boss, plain = idp.token(sub="jwt-boss", team="jwt-narrow"), idp.token(sub="jwt-plain", team="jwt-narrow")
    assert parity.chat(boss, "gpt-4o").status == 200          # every model, as LiteLLM's proxy admin
    # A token without the user claim this config names is no one's (stricter than LiteLLM).
    assert refusal(parity.chat(idp.token(sub=None, team="jwt-narrow"), "gpt-4")) == (401, "user_not_found")
    assert refusal(parity.chat(plain, "gpt-4o")) == (403, "model_not_allowed")
    assert call(parity, "POST", "/team/new", boss, {"team_alias": "by-boss"}).status == 200


def test_an_internal_user_token_lists_its_teams_and_reads_its_models(parity: Gateway,
                                                                    idp: IdentityProvider) -> None:  # noqa: F811
    assert parity.admin("/team/new", {"team_id": "jwt-dev", "models": ["gpt-4o"]}).status == 200
    assert parity.admin("/team/new", {"team_id": "jwt-elsewhere", "models": ["gpt-4"]}).status == 200
    assert parity.admin("/user/new", {"user_id": "jwt-dev-1", "auto_create_key": False}).status == 200
    assert parity.admin("/team/member_add", {"team_id": "jwt-dev", "member": {"user_id": "jwt-dev-1"}}).status == 200
    token = idp.token(sub="jwt-dev-1", team="jwt-dev", roles=["dev"])
    listed = call(parity, "GET", "/team/list?user_id=jwt-dev-1", token)
    assert listed.status == 200, listed.text
    assert [t["team_id"] for t in listed.json()] == ["jwt-dev"]
    assert call(parity, "GET", "/team/list?user_id=someone-else", token).status == 401
    info = call(parity, "GET", "/model/info", token)
    assert info.status == 200, info.text
    assert {d["model_name"] for d in info.json()["data"]} == {"gpt-4o"}


# -- team members' key permissions --------------------------------------------------------------

def test_a_plain_member_manages_team_keys_only_as_team_member_permissions_allow(parity: Gateway) -> None:
    team = parity.new_team(models=["gpt-4"])
    member, key = new_user(parity)
    assert parity.admin("/team/member_add", {"team_id": team, "member": {"user_id": member}}).status == 200
    refused = call(parity, "POST", "/key/generate", key, {"team_id": team})
    assert refusal(refused) == (401, "admin_not_allowed")
    assert "/key/generate" in refused.json()["error"]["message"] and "team_member_permissions" in \
        refused.json()["error"]["message"]

    assert parity.admin("/team/update", {"team_id": team, "team_member_permissions": ["/key/generate"]}).status \
        == 200
    made = call(parity, "POST", "/key/generate", key, {"team_id": team})
    assert made.status == 200, made.text
    team_key = made.json()["key"]
    assert call(parity, "GET", f"/key/info?key={team_key}", key).status == 200          # the baseline
    assert refusal(call(parity, "POST", "/key/update", key, {"key": team_key, "key_alias": "x"})) \
        == (401, "admin_not_allowed")
    assert refusal(call(parity, "POST", "/key/delete", key, {"keys": [team_key]})) == (401, "admin_not_allowed")
    assert parity.admin("/team/update", {"team_id": team, "team_member_permissions": [
        "/key/generate", "/key/delete"]}).status == 200
    assert call(parity, "POST", "/key/delete", key, {"keys": [team_key]}).status == 200
    # A route LiteLLM does not know is refused rather than stored unread.
    unknown = parity.admin("/team/update", {"team_id": team, "team_member_permissions": ["/team/delete"]})
    assert unknown.status == 400 and unknown.json()["error"]["param"] == "team_member_permissions"


# -- internal users' personal keys, a key's own /key/info ---------------------------------------

def test_an_internal_user_makes_a_personal_key_narrowed_by_its_record(parity: Gateway) -> None:
    _, key = new_user(parity, models=["gpt-4o"])
    made = call(parity, "POST", "/key/generate", key, {"key_alias": "personal"})
    assert made.status == 200, made.text
    personal = made.json()["key"]
    assert parity.chat(personal, "gpt-4o").status == 200
    assert refusal(parity.chat(personal, "gpt-4")) == (403, "model_not_allowed")   # its user's models only
    assert call(parity, "POST", "/key/generate", key, {"user_id": "someone-else"}).status == 403


def test_a_user_granted_no_models_by_name_gets_no_personal_key(parity: Gateway,
                                                                idp: IdentityProvider) -> None:  # noqa: F811
    # A record member_add (or user_id_upsert) made holds models [], LiteLLM's "every model":
    # a key narrowed by it alone would reach what no admin granted the user.
    team = parity.new_team(models=["gpt-4"], team_member_permissions=["/key/generate", "/key/update",
                                                                      "/key/regenerate"])
    member = "p-" + secrets.token_hex(4)
    assert parity.admin("/team/member_add", {"team_id": team, "member": {"user_id": member}}).status == 200
    key = parity.new_key(user_id=member)
    refused = call(parity, "POST", "/key/generate", key, {})
    assert refused.status == 403 and refused.json()["error"]["param"] == "team_id"
    team_key = call(parity, "POST", "/key/generate", key, {"team_id": team}).json()["key"]
    for path in ("/key/update", "/key/regenerate"):                  # nor by moving a team key out of its team
        moved = call(parity, "POST", path, key, {"key": team_key, "team_id": None})
        assert moved.status == 403, (path, moved.text)
    assert refusal(parity.chat(team_key, "gpt-4o")) == (403, "model_not_allowed")
    # A JWT user too (its record, made here by an admin, names no model).
    assert parity.admin("/team/new", {"team_id": "jwt-personal", "models": ["gpt-4"],
                                      "team_member_permissions": ["/key/generate"]}).status == 200
    assert parity.admin("/user/new", {"user_id": "jwt-personal-1", "auto_create_key": False}).status == 200
    token = idp.token(sub="jwt-personal-1", team="jwt-personal", roles=["dev"])
    assert call(parity, "POST", "/key/generate", token, {}).status == 403
    assert call(parity, "POST", "/key/generate", token, {"team_id": "jwt-personal"}).status == 200


def test_any_key_reads_its_own_key_info_and_models(parity: Gateway) -> None:
    key = parity.new_key(models=["gpt-4"], max_budget=3, key_alias="no-owner")  # no user: no admin powers
    own = call(parity, "GET", "/key/info", key)
    assert own.status == 200, own.text
    assert own.json()["info"]["key_alias"] == "no-owner" and own.json()["info"]["max_budget"] == 3
    assert call(parity, "GET", f"/key/info?key={key}", key).status == 200
    assert call(parity, "GET", f"/key/info?key={parity.new_key()}", key).status == 404   # not another's
    models = call(parity, "GET", "/model/info", key)
    assert models.status == 200 and {d["model_name"] for d in models.json()["data"]} == {"gpt-4"}
    assert call(parity, "GET", "/key/list", key).status == 401                           # nothing else


# -- budgets and deployments priced at zero -----------------------------------------------------

def test_a_spent_budget_does_not_refuse_a_deployment_priced_at_zero(parity: Gateway) -> None:
    key = parity.new_key(models=["gpt-4", "local-llama"], max_budget=0)
    assert refusal(parity.chat(key, "gpt-4")) == (422, "budget_exceeded")
    assert parity.chat(key, "local-llama").status == 200


def test_only_a_deployment_priced_at_zero_for_everything_is_free() -> None:
    from extauthz.usage.prices import free_of_charge
    assert free_of_charge({"input_cost_per_token": 0, "output_cost_per_token": 0.0, "input_cost_per_image": "0"})
    assert not free_of_charge({"input_cost_per_token": 0, "output_cost_per_token": 0, "input_cost_per_image": 0.04})
    assert not free_of_charge({"input_cost_per_token": 0, "output_cost_per_token": 0,
                               "output_cost_per_second": "1e-4"})
    assert not free_of_charge({"input_cost_per_token": 0, "output_cost_per_token": 0, "input_cost_per_image": "x"})
    assert not free_of_charge({"input_cost_per_token": 0})          # not given: a price not known
    assert not free_of_charge({})
