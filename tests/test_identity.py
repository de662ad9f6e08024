"""A JWT's verified claims mapped to user, teams, role and scopes, as litellm_jwtauth reads them."""

from __future__ import annotations

from typing import Any

import pytest

from extauthz.check.identity import claim, identify, scope_models
from extauthz.config import JwtAuth

JWT = JwtAuth(public_key_urls=("https://idp/keys",), team_ids_jwt_field="groups", team_id_jwt_field="team",
              roles_jwt_field="realm_access.roles", role_mappings=(("viewer", "proxy_admin_viewer"),
                                                                  ("admin", "proxy_admin"), ("dev", "internal_user")),
              admin_jwt_scope="gw.admin", user_email_jwt_field="email")


def test_nested_and_dotted_claims() -> None:
    claims = {"realm_access": {"roles": ["a"]}, "https://example.com/groups": ["g"]}
    assert claim(claims, "realm_access.roles") == ["a"]
    assert claim(claims, "https://example.com/groups") == ["g"]
    assert claim(claims, "realm_access.missing") is None and claim(claims, None) is None


def test_teams_come_from_both_fields_once_each_else_the_default() -> None:
    assert identify({"groups": ["ml", "research"], "team": "ml"}, JWT).teams == ("ml", "research")
    assert identify({}, JWT).teams == ()
    default = JwtAuth(public_key_urls=("x",), team_id_default="everyone")
    assert identify({}, default).teams == ("everyone",)


@pytest.mark.parametrize("claims,role", [
    ({"realm_access": {"roles": ["viewer", "admin"]}}, "proxy_admin"),      # the most powerful mapped role
    ({"realm_access": {"roles": ["dev"]}}, "internal_user"),
    ({"scope": "openid gw.admin"}, "proxy_admin"),
    ({"scp": ["gw.admin"]}, "proxy_admin"),
    ({"realm_access": {"roles": ["unmapped"]}}, "team"),
    ({"realm_access": "not-a-list"}, "team"),
])
def test_roles(claims: dict, role: str) -> None:
    assert identify(claims, JWT).role == role


def test_enforce_rbac_leaves_an_unmapped_token_without_a_role() -> None:
    strict = JwtAuth(public_key_urls=("x",), roles_jwt_field="roles", enforce_rbac=True)
    assert identify({"roles": ["unknown"]}, strict).role is None


def test_scope_mappings_grant_the_union_of_the_tokens_scopes() -> None:
    scoped = JwtAuth(public_key_urls=("x",), scope_mappings=(("basic", ("gpt-4o-mini",)), ("beta", ("beta-models",
                                                                                                      "gpt-4o-mini"))))
    assert scope_models(identify({"scope": "basic beta"}, scoped), scoped) == ("gpt-4o-mini", "beta-models")
    assert scope_models(identify({"scope": "other"}, scoped), scoped) == ()
    assert scope_models(identify({}, JWT), JWT) is None


def test_user_and_email() -> None:
    who = identify({"sub": "u-1", "email": "a@b.c"}, JWT)
    assert (who.user_id, who.email) == ("u-1", "a@b.c")
    assert identify({"sub": 42}, JWT).user_id is None


# --- the check, in process: claims only from the jwt_authn metadata ---------------------------------

import asyncio  # noqa: E402
import json  # noqa: E402

from extauthz.check.runtime import Runtime  # noqa: E402
from extauthz.check.service import AuthorizationService  # noqa: E402
from extauthz.config import from_dict  # noqa: E402
from extauthz.proto.envoy.service.auth.v3.external_auth_pb2 import CheckResponse  # noqa: E402
from extauthz.domain.record import TeamRecord
from tests.harness import check_request  # noqa: E402


class Teams:
    async def get_key(self, token_hash: str) -> None:
        return None

    async def get_team(self, team_id: str) -> TeamRecord | None:
        return {"ml": TeamRecord("ml", "ml", ("gpt-4", "gpt-4o"), False)}.get(team_id)

    async def get_user(self, user_id: str) -> None:
        return None


def checked(claims: dict | None, model: str, general: dict | None = None, path: str = "/v1/chat/completions",
            **jwtauth: object) -> tuple[int, str]:
    runtime = Runtime.of(from_dict({"model_list": [
        {"model_name": m, "litellm_params": {"model": f"openai/{m}", "api_base": "http://up:1/v1"}}
        for m in ("gpt-4", "gpt-4o")], "general_settings": {"enable_jwt_auth": True, "litellm_jwtauth": {
            "public_key_url": "https://idp.example.com/keys", "issuer": "https://idp.example.com",
            "audience": "gw", "team_ids_jwt_field": "groups", **jwtauth}, "master_key": "sk-master",
            **(general or {})}}))
    service = AuthorizationService(lambda: runtime, Teams())
    request = check_request({"authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"},
                            json.dumps({"model": model}).encode(), path=path)
    if claims is not None:
        claims = {"iss": "https://idp.example.com", "aud": "gw", **claims}
        request.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update(
            {"jwt_payload": claims})
    try:
        response = CheckResponse.FromString(asyncio.run(service.Check(request, None)))
    finally:
        service.close()
    if response.HasField("denied_response"):
        return response.denied_response.status.code, json.loads(response.denied_response.body)["error"]["code"]
    return 200, "ok"


def test_claims_come_only_from_the_filters_metadata() -> None:
    assert checked({"sub": "a", "groups": ["ml"]}, "gpt-4") == (200, "ok")
    # The same bearer with no verified claims is looked up as a virtual key: unknown.
    assert checked(None, "gpt-4") == (401, "invalid_api_key")


def test_scope_mappings_narrow_the_teams_models() -> None:
    mappings = {"scope_mappings": {"basic": ["gpt-4"]}}
    assert checked({"groups": ["ml"], "scope": "basic"}, "gpt-4", **mappings) == (200, "ok")
    assert checked({"groups": ["ml"], "scope": "basic"}, "gpt-4o", **mappings) == (403, "model_not_allowed")
    assert checked({"groups": ["ml"], "scope": "other"}, "gpt-4", **mappings) == (403, "scope_not_allowed")


def test_enforce_rbac_refuses_a_token_without_a_role() -> None:
    assert checked({"groups": ["ml"], "roles": ["x"]}, "gpt-4", roles_jwt_field="roles",
                   enforce_rbac=True) == (403, "no_role")


@pytest.mark.parametrize("claims,accepted", [
    ({}, True),
    ({"iss": "https://idp.example.com/"}, True),                  # a trailing slash is the same issuer
    ({"aud": ["other", "gw"]}, True),
    ({"iss": "https://evil.example.com"}, False),
    ({"aud": "another-app"}, False),
    ({"aud": None}, False),
])
def test_the_sidecar_checks_issuer_and_audience_against_its_own_config(claims: dict, accepted: bool) -> None:
    expected = (200, "ok") if accepted else (401, "invalid_jwt")
    assert checked({"groups": ["ml"], **claims}, "gpt-4") == expected


@pytest.mark.parametrize("claims", [{"groups": ["ml"]}, {"scope": "x", "roles": ["admin"]}])
def test_restricting_settings_refuse_jwt_callers_too(claims: dict) -> None:
    refused = checked(claims, "gpt-4", general={"allowed_ips": ["10.9.9.9"]}, roles_jwt_field="roles",
                      role_mappings=[{"role": "admin", "internal_role": "proxy_admin"}])
    assert refused == (403, "unenforced_setting")


@pytest.mark.parametrize("jwtauth,problem", [
    ({"public_key_url": "https://idp.example.com/keys", "audience": "gw"}, "JWKS URL without an issuer"),
    ({"public_key_url": ["https://a.example.com/keys", "https://b.example.com/keys"], "issuer": "https://a",
      "audience": "gw"}, "JWKS URL without an issuer"),
    ({"public_key_url": "https://idp.example.com/.well-known/openid-configuration"}, "audience is not set"),
])
def test_jwt_settings_that_would_admit_foreign_tokens_turn_jwts_off(jwtauth: dict, problem: str) -> None:
    c = from_dict({"model_list": [{"model_name": "m", "litellm_params": {"model": "openai/m", "api_key": "x"}}],
                   "general_settings": {"enable_jwt_auth": True, "litellm_jwtauth": jwtauth}})
    assert c.jwt is None
    (name, effect), = c.unenforced
    assert name == "enable_jwt_auth" and problem in effect and "refused (401)" in effect


def test_each_key_set_has_its_own_issuer() -> None:
    c = from_dict({"model_list": [{"model_name": "m", "litellm_params": {"model": "openai/m", "api_key": "x"}}],
                   "general_settings": {"enable_jwt_auth": True, "litellm_jwtauth": {"audience": "gw", "public_key_url": [
                       "https://login.example.com/t1/v2.0/.well-known/openid-configuration",
                       {"url": "https://keys.example.com/jwks", "issuer": "https://keys.example.com/"}]}}})
    # As configured (Envoy compares "iss" byte for byte); the sidecar's own check ignores a trailing slash.
    assert c.jwt is not None and c.jwt.issuers == ("https://login.example.com/t1/v2.0", "https://keys.example.com/")
    from extauthz.check.identity import issued_for
    for iss in ("https://keys.example.com/", "https://keys.example.com", "https://login.example.com/t1/v2.0"):
        assert issued_for({"iss": iss, "aud": "gw"}, c.jwt)
    assert not issued_for({"iss": "https://keys.example.com/x", "aud": "gw"}, c.jwt)


def test_an_unreachable_discovery_document_fails_rendering_in_one_line(tmp_path) -> None:
    import subprocess
    import sys

    import yaml as pyyaml

    from tests.harness import ROOT
    path = tmp_path / "c.yaml"
    path.write_text(pyyaml.safe_dump({
        "model_list": [{"model_name": "m", "litellm_params": {"model": "openai/m", "api_key": "x"}}],
        "general_settings": {"enable_jwt_auth": True, "litellm_jwtauth": {
            "public_key_url": "http://127.0.0.1:9/.well-known/openid-configuration", "audience": "gw"}}}))
    done = subprocess.run([sys.executable, "-m", "extauthz", "envoy-config", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "cannot render the Envoy config" in done.stderr
    assert "Traceback" not in done.stderr


def jwt_config(**jwtauth: object) -> Any:
    return from_dict({"model_list": [{"model_name": "m", "litellm_params": {"model": "openai/m", "api_key": "x"}}],
                      "general_settings": {"enable_jwt_auth": True, "litellm_jwtauth": {
                          "public_key_url": "https://idp.example.com/.well-known/openid-configuration",
                          "audience": "gw", **jwtauth}}})


def test_route_lists_are_read_and_an_unreadable_one_turns_jwts_off() -> None:
    c = jwt_config(team_allowed_routes=["openai_routes", "/v1/messages"], admin_allowed_routes=["management_routes"],
                   public_key_ttl=5)
    assert c.jwt.team_allowed_routes == ("openai_routes", "/v1/messages")
    assert c.jwt.admin_allowed_routes == ("management_routes",) and c.jwt.public_key_ttl_s == 5
    for bad in (["openai_routez"], "openai_routes", [""], [3]):
        c = jwt_config(team_allowed_routes=bad)
        assert c.jwt is None, bad
        (name, effect), = c.unenforced
        assert "team_allowed_routes" in effect and "refused (401)" in effect


def test_public_allowed_routes_not_supported_turn_jwts_off() -> None:
    c = jwt_config(public_allowed_routes=["/v1/chat/completions"])
    assert c.jwt is None and "public_allowed_routes not supported yet" in c.unenforced[0][1]


def test_role_permissions_not_supported_yet_turn_jwts_off() -> None:
    c = from_dict({"model_list": [{"model_name": "m", "litellm_params": {"model": "openai/m", "api_key": "x"}}],
                   "general_settings": {"role_permissions": [{"role": "team", "models": ["m"]}],
                                        "enable_jwt_auth": True, "litellm_jwtauth": {
                                            "public_key_url": "https://idp.example.com/.well-known/openid-configuration",
                                            "audience": "gw"}}})
    assert c.jwt is None and "role_permissions not supported yet" in c.unenforced[0][1]


def test_a_scoped_internal_user_cannot_mint_a_key_wider_than_its_scopes() -> None:
    dev = {"sub": "bob", "groups": ["ml"], "roles": ["dev"], "scope": "basic"}
    common = {"roles_jwt_field": "roles", "role_mappings": [{"role": "dev", "internal_role": "internal_user"}]}
    assert checked(dev, "", path="/key/generate", **common) == (200, "ok")
    assert checked(dev, "", path="/key/generate", scope_mappings={"basic": ["gpt-4"]},
                   **common) == (403, "admin_not_allowed")


def test_litellms_list_of_scope_mappings_loads_and_narrows() -> None:
    c = jwt_config(enforce_scope_based_access=True, scope_mappings=[
        {"scope": "basic", "models": ["gpt-4"]}, {"scope": "routes-only", "routes": ["/v1/chat/completions"]}])
    assert c.jwt is not None and c.jwt.scope_mappings == (("basic", ("gpt-4",)), ("routes-only", ()))
    assert any("scope_mappings[1].routes: not enforced" in w for w in c.warnings)
    listed = {"enforce_scope_based_access": True, "scope_mappings": [{"scope": "basic", "models": ["gpt-4"]}]}
    assert checked({"groups": ["ml"], "scope": "basic"}, "gpt-4", **listed) == (200, "ok")
    assert checked({"groups": ["ml"], "scope": "basic"}, "gpt-4o", **listed) == (403, "model_not_allowed")
    assert checked({"groups": ["ml"], "scope": "other"}, "gpt-4", **listed) == (403, "scope_not_allowed")


def test_a_list_of_scope_mappings_without_enforcement_is_refused_as_litellm_refuses_it() -> None:
    from extauthz.config import ConfigError
    with pytest.raises(ConfigError, match="enforce_scope_based_access: true"):
        jwt_config(scope_mappings=[{"scope": "basic", "models": ["gpt-4"]}])


def test_litellms_claim_and_record_requirements() -> None:
    # team_id_jwt_field set: its claim is required even when team_ids_jwt_field names teams.
    assert checked({"groups": ["ml"]}, "gpt-4", team_id_jwt_field="team") == (401, "missing_team")
    assert checked({"team": "ml"}, "gpt-4", team_id_jwt_field="team") == (200, "ok")
    assert checked({"groups": ["ml"]}, "gpt-4", team_id_jwt_field="team", team_id_default="ml") == (200, "ok")
    assert checked({"team": ["", 7]}, "gpt-4", team_id_jwt_field="team") == (401, "missing_team")
    assert checked({"groups": []}, "gpt-4") == (401, "missing_team")
    assert checked({"groups": ["nobody-has-this"]}, "gpt-4") == (404, "team_not_found")
    # user_id_jwt_field set, without user_id_upsert: the user needs a record (this store has none).
    assert checked({"sub": "bob", "groups": ["ml"]}, "gpt-4", user_id_jwt_field="sub") == (401, "user_not_found")
    assert checked({"sub": "bob", "groups": ["ml"]}, "gpt-4") == (200, "ok")   # unset: "sub" only names it
    assert jwt_config(user_id_jwt_field="sub").jwt.user_record_required
    assert not jwt_config(user_id_jwt_field="sub", user_id_upsert=True).jwt.user_record_required


def test_enforce_team_based_model_access_is_read_as_always_on() -> None:
    c = jwt_config(enforce_team_based_model_access=True)
    assert not any("enforce_team_based_model_access" in w for w in c.warnings)
