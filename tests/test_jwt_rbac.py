"""JWT role-based access beyond the basics: team_allowed_routes / admin_allowed_routes,
team_id_upsert and user_id_upsert, the internal_user_viewer role and a team admin
member acting with its token. Real Envoy validates real signatures (see test_jwt.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.conftest import Gateway
from tests.harness import http, start_stack, write_config
from tests.test_jwt import AUDIENCE, IdentityProvider, idp  # noqa: F401 (idp: the fixture)


@pytest.fixture(scope="module")
def rbac(workdir: Path, redis_port: int, upstream_port: int, idp: IdentityProvider) -> Iterator[Gateway]:  # noqa: F811
    base = yaml.safe_load(write_config(workdir, upstream_port).read_text())
    base["general_settings"].update({"enable_jwt_auth": True, "litellm_jwtauth": {
        "public_key_url": f"{idp.base}/.well-known/openid-configuration", "audience": AUDIENCE,
        "team_ids_jwt_field": "groups", "roles_jwt_field": "roles", "user_email_jwt_field": "email",
        "team_id_upsert": True, "user_id_upsert": True,
        "team_allowed_routes": ["/v1/chat/completions", "info_routes", "/key/generate", "/team/member_add"],
        "admin_allowed_routes": ["management_routes", "info_routes"],
        "role_mappings": [{"role": "admin", "internal_role": "proxy_admin"},
                          {"role": "dev", "internal_role": "internal_user"},
                          {"role": "reader", "internal_role": "internal_user_viewer"}]}})
    path = workdir / "jwt-rbac.yaml"
    path.write_text(yaml.safe_dump(base))
    stack = start_stack(workdir, path, f"redis://127.0.0.1:{redis_port}/12")
    g = Gateway(stack.envoy, upstream_port, stack.sidecar)
    assert g.admin("/team/new", {"team_id": "core", "models": ["gpt-4"]}).status == 200
    try:
        yield g
    finally:
        stack.stop()


def call(gw: Gateway, method: str, path: str, token: str, body: Any = None):
    return http(method, gw.envoy.url + path, body, {"Authorization": f"Bearer {token}"})


def code(response: Any) -> tuple[int, str]:
    return response.status, response.json()["error"]["code"]


def test_team_allowed_routes_limit_a_team_token(rbac: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    token = idp.token(sub="svc", groups=["core"])
    assert rbac.chat(token, "gpt-4").status == 200
    refused = rbac.chat(token, "gpt-4", path="/v1/embeddings")
    assert code(refused) == (403, "route_not_allowed") and "team_allowed_routes" in refused.json()["error"]["message"]
    assert code(rbac.chat(token, "gpt-4", path="/chat/completions")) == (403, "route_not_allowed")
    assert call(rbac, "GET", "/v1/models", token).status == 200  # info_routes


def test_admin_allowed_routes_limit_an_admin_token(rbac: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    admin = idp.token(sub="root", roles=["admin"])
    assert call(rbac, "POST", "/team/new", admin, {"team_id": "by-admin-token"}).status == 200
    # LiteLLM's admin lists hold no model routes: with admin_allowed_routes set, none.
    assert code(rbac.chat(admin, "gpt-4")) == (403, "route_not_allowed")


def test_team_id_upsert_creates_a_team_that_grants_nothing(rbac: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    token = idp.token(sub="newcomer", groups=["brand-new-team"])
    refused = rbac.chat(token, "gpt-4")
    assert code(refused) == (403, "model_not_allowed")
    team = rbac.admin("/team/info?team_id=brand-new-team", method="GET")
    assert team.status == 200 and team.json()["team_info"]["models"] == ["no-default-models"]
    assert rbac.admin("/team/update", {"team_id": "brand-new-team", "models": ["gpt-4"]}).status == 200
    assert rbac.chat(token, "gpt-4").status == 200


def test_user_id_upsert_records_the_tokens_user(rbac: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    token = idp.token(sub="u-upserted", email="up@example.com", groups=["core"])
    assert rbac.chat(token, "gpt-4").status == 200
    info = rbac.admin("/user/info?user_id=u-upserted", method="GET")
    assert info.status == 200, info.text
    assert info.json()["user_info"]["user_email"] == "up@example.com"
    assert info.json()["user_info"]["user_role"] == "internal_user_viewer"  # grants no admin power by itself


def test_an_internal_user_viewer_reads_its_keys_only(rbac: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    assert rbac.admin("/key/generate", {"user_id": "u-reader", "team_id": "core", "key_alias": "reader-key"}).status \
        == 200
    reader = idp.token(sub="u-reader", groups=["core"], roles=["reader"])
    listed = call(rbac, "GET", "/key/list?return_full_object=true", reader)
    assert listed.status == 200, listed.text
    assert [k["key_alias"] for k in listed.json()["keys"]] == ["reader-key"]
    assert code(call(rbac, "POST", "/key/generate", reader, {"team_id": "core"})) == (401, "admin_not_allowed")


def test_a_token_naming_too_many_teams_is_refused(rbac: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    # Each team is a lookup (and, with team_id_upsert, a write) on the request's path.
    token = idp.token(sub="svc", groups=[f"g-{i}" for i in range(201)])
    assert code(rbac.chat(token, "gpt-4")) == (403, "too_many_teams")
    assert rbac.admin("/team/info?team_id=g-0", method="GET").status == 404  # nothing was created


def test_a_team_admin_member_acts_with_its_token(rbac: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    assert rbac.admin("/team/new", {"team_id": "squad", "models": ["gpt-4"]}).status == 200
    assert rbac.admin("/team/member_add", {"team_id": "squad", "member": {"role": "admin", "user_id": "u-captain"}}) \
        .status == 200
    captain = idp.token(sub="u-captain", groups=["squad"], roles=["dev"])
    member = idp.token(sub="u-crew", groups=["squad"], roles=["dev"])
    # A team admin adds existing users (as in LiteLLM, only proxy admins create them).
    assert rbac.admin("/user/new", {"user_id": "u-crew", "auto_create_key": False}).status == 200
    added = call(rbac, "POST", "/team/member_add", captain, {"team_id": "squad", "member": {"user_id": "u-crew"}})
    assert added.status == 200, added.text
    made = call(rbac, "POST", "/key/generate", captain, {"team_id": "squad", "user_id": "u-crew"})
    assert made.status == 200 and made.json()["created_by"] == "u-captain"  # no admin powers as u-crew
    assert code(call(rbac, "POST", "/team/member_add", member, {"team_id": "squad",
                                                                "member": {"user_id": "u-x"}})) == (403,
                                                                                                    "admin_not_allowed")
    # team_allowed_routes still apply to it: /key/delete is not in them.
    assert code(call(rbac, "POST", "/key/delete", captain, {"keys": [made.json()["key"]]})) == (403,
                                                                                                "route_not_allowed")


def test_a_shadow_teams_jwt_callers_are_recorded_not_refused(rbac: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    # Shadow mode for a team's token callers: a model no team of the token may use is
    # recorded and routed; a token for a team not in shadow mode is still refused.
    assert rbac.admin("/team/new", {"team_id": "rollout", "models": ["gpt-4"],
                                    "metadata": {"enforcement": "shadow"}}).status == 200
    shadowed = idp.token(sub="svc-rollout", groups=["rollout"])
    rbac.forget_upstream()
    assert rbac.chat(shadowed, "gpt-4o").status == 200
    assert rbac.upstream_seen()[0]["body"]["model"] == "gpt-4o"
    enforced = idp.token(sub="svc-core", groups=["core"])
    assert code(rbac.chat(enforced, "gpt-4o")) == (403, "model_not_allowed")


def test_the_audit_trail_names_the_tokens_user_and_role(rbac: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    admin = idp.token(sub="auditor-root", roles=["admin"])
    assert call(rbac, "POST", "/team/new", admin, {"team_id": "audited-by-token"}).status == 200
    (entry,) = rbac.admin("/audit?target=audited-by-token", method="GET").json()["entries"]
    assert entry["actor"] == {"type": "jwt", "user_id": "auditor-root", "role": "proxy_admin"}
    assert entry["route"] == "/team/new"
    # A team a token's claims created is recorded too, as the check path's.
    assert rbac.chat(idp.token(sub="first-sight", groups=["upserted-for-audit"]), "gpt-4").status == 403
    (upserted,) = rbac.admin("/audit?target=upserted-for-audit", method="GET").json()["entries"]
    assert upserted["actor"] == {"type": "system"} and upserted["route"] == "team_id_upsert"
    # A client's own actor header never reaches the admin API.
    r = http("POST", rbac.envoy.url + "/team/new", {"team_id": "forged-actor"},
             {"Authorization": f"Bearer {admin}",
              "x-extauthz-admin-actor": '{"user_id": "someone-else", "role": "proxy_admin"}'})
    assert r.status == 200
    (forged,) = rbac.admin("/audit?target=forged-actor", method="GET").json()["entries"]
    assert forged["actor"]["user_id"] == "auditor-root"
    # Reading the trail: not for a viewer's token (a GET it may otherwise make).
    reader = idp.token(sub="auditor-reader", roles=["reader"])
    assert call(rbac, "GET", "/audit", reader).status == 403


def test_explaining_a_team_answers_as_its_tokens_are_checked(rbac: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    assert rbac.admin("/team/new", {"team_id": "explained-team", "models": ["beta-models", "openai/o1-*"]}).status \
        == 200
    token = idp.token(sub="explained-member", groups=["explained-team"])
    for model in ("gpt-4", "gpt-4o", "fireworks-llama-v3-70b-instruct", "openai/o1-mini", "openai/O1-mini",
                  "openai/gpt-5", "no-such-model"):
        checked = rbac.chat(token, model)
        explained = rbac.admin("/access/explain", {"team_id": "explained-team", "model": model}).json()
        got = (checked.status, "ok" if checked.status == 200 else checked.json()["error"]["code"])
        assert (explained["status"], explained.get("code", "ok")) == got, (model, explained)


def test_a_tokens_user_is_narrowed_by_its_terms_in_the_team(rbac: Gateway, idp: IdentityProvider) -> None:  # noqa: F811
    assert rbac.admin("/team/new", {"team_id": "terms", "models": ["gpt-4", "gpt-4o"]}).status == 200
    assert rbac.admin("/team/member_add", {"team_id": "terms", "member": {"user_id": "u-narrow"},
                                           "allowed_models": ["gpt-4o"]}).status == 200
    narrow, other = idp.token(sub="u-narrow", groups=["terms"]), idp.token(sub="u-other", groups=["terms"])
    assert rbac.chat(narrow, "gpt-4o").status == 200
    refused = rbac.chat(narrow, "gpt-4")
    assert refused.status == 403 and "'u-narrow' in team 'terms'" in refused.json()["error"]["message"]
    assert rbac.chat(other, "gpt-4").status == 200
    listed = http("GET", rbac.envoy.url + "/v1/models", None, {"Authorization": f"Bearer {narrow}"}).json()
    assert [m["id"] for m in listed["data"]] == ["gpt-4o"]
