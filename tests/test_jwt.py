"""JWT callers: Envoy verifies (jwt_authn, real cryptography), the sidecar maps the verified
claims to teams and roles. A local identity provider serves the discovery document and
the JWKS; tokens are signed with PyJWT."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import jwt as pyjwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import Gateway
from tests.harness import http, start_stack, write_config

MASTER = "sk-1234"
AUDIENCE = "extauthz-test"


class IdentityProvider:
    """Discovery document and JWKS on loopback, as an IdP serves them."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.jwks: list[dict[str, Any]] = []
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": provider.issuer, "jwks_uri": f"{provider.base}/keys"}
                elif self.path == "/keys":
                    body = {"keys": provider.jwks}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.issuer = self.base + "/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_key(self, kid: str, key: Any, publish: bool = True) -> None:
        self.keys[kid] = key
        if publish:
            algorithm = pyjwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) \
                else pyjwt.algorithms.ECAlgorithm
            jwk = json.loads(algorithm.to_jwk(key.public_key()))
            self.jwks.append({**jwk, "kid": kid, "use": "sig",
                              "alg": "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"})

    def token(self, kid: str = "rsa-1", **claims: Any) -> str:
        key = self.keys[kid]
        now = int(time.time())
        payload = {"iss": self.issuer, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, **claims}
        payload = {k: v for k, v in payload.items() if v is not None}
        algorithm = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        return pyjwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    provider = IdentityProvider()
    provider.add_key("rsa-1", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    provider.add_key("ec-1", ec.generate_private_key(ec.SECP256R1()))
    provider.add_key("stranger", rsa.generate_private_key(public_exponent=65537, key_size=2048), publish=False)
    yield provider
    provider.server.shutdown()


@pytest.fixture(scope="module")
def gw(workdir: Path, redis_port: int, upstream_port: int, idp: IdentityProvider) -> Iterator[Gateway]:
    base = yaml.safe_load(write_config(workdir, upstream_port).read_text())
    base["general_settings"].update({"enable_jwt_auth": True, "litellm_jwtauth": {
        "public_key_url": f"{idp.base}/.well-known/openid-configuration", "audience": AUDIENCE,
        "team_ids_jwt_field": "groups", "roles_jwt_field": "realm_access.roles",
        "role_mappings": [{"role": "gw-admin", "internal_role": "proxy_admin"},
                          {"role": "gw-viewer", "internal_role": "proxy_admin_viewer"},
                          {"role": "gw-dev", "internal_role": "internal_user"}],
        "admin_jwt_scope": "gw.admin"}})
    path = workdir / "jwt.yaml"
    path.write_text(yaml.safe_dump(base))
    stack = start_stack(workdir, path, f"redis://127.0.0.1:{redis_port}/13")
    g = Gateway(stack.envoy, upstream_port, stack.sidecar)
    for team_id, models in (("ml", ["gpt-4"]), ("research", ["gpt-4o"]), ("frozen", ["gpt-4"])):
        assert g.admin("/team/new", {"team_id": team_id, "models": models, "team_member_permissions": [
            "/key/generate", "/key/update", "/key/delete", "/key/regenerate"]}).status == 200
    assert g.admin("/team/block", {"team_id": "frozen"}).status == 200
    try:
        yield g
    finally:
        stack.stop()
    log = stack.sidecar.proc.log_text()
    assert idp.token() not in log and "eyJ" not in log  # no token reaches a log


def test_a_token_calls_its_teams_models(gw: Gateway, idp: IdentityProvider) -> None:
    token = idp.token(groups=["ml"])
    gw.forget_upstream()
    r = gw.chat(token, "gpt-4")
    assert r.status == 200, r.text
    (seen,) = gw.upstream_seen()
    assert token not in json.dumps(seen) and seen["headers"]["authorization"].startswith("Bearer sk-")
    denied = gw.chat(token, "gpt-4o")
    assert denied.status == 403 and denied.json()["error"]["code"] == "model_not_allowed"


def test_with_several_teams_any_that_allows_the_model_allows_it(gw: Gateway, idp: IdentityProvider) -> None:
    token = idp.token(kid="ec-1", groups=["ml", "research"])
    assert gw.chat(token, "gpt-4").status == 200
    assert gw.chat(token, "gpt-4o").status == 200
    r = gw.chat(token, "gpt-3.5-turbo")
    assert r.status == 403
    message = r.json()["error"]["message"]
    assert "'ml'" in message and "'research'" in message


# LiteLLM's statuses: an unknown team 404, no team claim 401, a blocked team 401.
@pytest.mark.parametrize("groups,status,code", [(["nobody-has-this"], 404, "team_not_found"),
                                                ([], 401, "missing_team"), (["frozen"], 401, "team_blocked")])
def test_a_token_without_a_usable_team_is_refused(gw: Gateway, idp: IdentityProvider, groups: list[str],
                                                  status: int, code: str) -> None:
    r = gw.chat(idp.token(groups=groups), "gpt-4")
    assert (r.status, r.json()["error"]["code"]) == (status, code), r.text


def test_the_admin_scope_calls_every_model_a_mapped_admin_role_its_teams(gw: Gateway, idp: IdentityProvider) -> None:
    assert gw.chat(idp.token(scope="openid gw.admin"), "gpt-3.5-turbo").status == 200
    # As in LiteLLM, a role mapped to proxy_admin feeds the admin routes, not the models.
    mapped = idp.token(groups=["ml"], realm_access={"roles": ["gw-admin"]})
    assert gw.chat(mapped, "gpt-4").status == 200
    refused = gw.chat(mapped, "gpt-3.5-turbo")
    assert refused.status == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    no_team = gw.chat(idp.token(realm_access={"roles": ["gw-admin"]}), "gpt-4")   # no team: no model
    assert (no_team.status, no_team.json()["error"]["code"]) == (401, "missing_team")


def forged(idp: IdentityProvider, kind: str) -> str:
    now = int(time.time())
    claims = {"iss": idp.issuer, "aud": AUDIENCE, "sub": "mallory", "iat": now, "exp": now + 300, "groups": ["ml"]}
    rsa_key = idp.keys["rsa-1"]
    if kind == "expired":
        return idp.token(exp=now - 120, iat=now - 600, groups=["ml"])
    if kind == "not_yet_valid":
        return idp.token(nbf=now + 600, groups=["ml"])
    if kind == "wrong_issuer":
        return idp.token(iss="https://evil.example.com/", groups=["ml"])
    if kind == "wrong_audience":
        return idp.token(aud="someone-else", groups=["ml"])
    if kind == "unknown_kid":
        return idp.token(kid="stranger", groups=["ml"])
    if kind == "second_key_pair_claiming_a_known_kid":
        return pyjwt.encode(claims, idp.keys["stranger"], algorithm="RS256", headers={"kid": "rsa-1"})
    if kind == "alg_none":
        return pyjwt.encode(claims, None, algorithm="none", headers={"kid": "rsa-1"}) + "x"
    if kind == "hs256_with_the_public_key":
        from cryptography.hazmat.primitives import serialization
        public = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        header = pyjwt.utils.base64url_encode(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
        body = pyjwt.utils.base64url_encode(json.dumps(claims).encode())
        import hashlib
        import hmac
        signature = hmac.new(public, header + b"." + body, hashlib.sha256).digest()
        return (header + b"." + body + b"." + pyjwt.utils.base64url_encode(signature)).decode()
    if kind == "no_expiry":
        return idp.token(exp=None, groups=["ml"])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["expired", "not_yet_valid", "wrong_issuer", "wrong_audience", "unknown_kid",
                                  "second_key_pair_claiming_a_known_kid", "alg_none", "hs256_with_the_public_key",
                                  "no_expiry"])
def test_a_jwt_envoy_rejects_is_a_json_401_and_reaches_no_one(gw: Gateway, idp: IdentityProvider, kind: str) -> None:
    gw.forget_upstream()
    r = gw.chat(forged(idp, kind), "gpt-4")
    assert r.status == 401, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_jwt" and error["type"] == "authentication_error"
    assert gw.upstream_seen() == []


def test_virtual_keys_keep_working_beside_jwts(gw: Gateway) -> None:
    key = gw.admin("/key/generate", {"models": ["gpt-4"]}).json()["key"]
    assert gw.chat(key, "gpt-4").status == 200
    assert gw.chat(key, "gpt-4o").status == 403


def test_a_forged_claims_header_is_not_read(gw: Gateway, idp: IdentityProvider) -> None:
    key = gw.admin("/key/generate", {"models": ["gpt-4"]}).json()["key"]
    # Claims come only from Envoy's filter metadata: a header that looks like a payload is nothing.
    r = http("POST", gw.envoy.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []},
             {"Authorization": f"Bearer {key}", "x-jwt-payload": json.dumps({"realm_access": {"roles": ["gw-admin"]}})})
    assert r.status == 403


def test_a_token_with_a_second_credential_beside_it_is_refused(gw: Gateway, idp: IdentityProvider) -> None:
    key = gw.admin("/key/generate", {"models": ["gpt-4"]}).json()["key"]
    token = idp.token(realm_access={"roles": ["gw-admin"]})
    r = gw.chat(token, "gpt-4", headers={"x-api-key": key})
    assert r.status == 401 and r.json()["error"]["code"] == "conflicting_api_keys"


def test_an_admin_token_is_logged_as_its_user_not_as_the_master_key(gw: Gateway, idp: IdentityProvider) -> None:
    token = idp.token(sub="root-alice", scope="gw.admin")
    assert gw.chat(token, "gpt-4o").status == 200

    def logged() -> list[dict]:
        lines = [json.loads(line) for line in gw.envoy.proc.log_text().splitlines() if line.startswith("{")]
        return [e for e in lines if e.get("key_alias") == "root-alice"]
    from tests.harness import wait_until
    wait_until(lambda: bool(logged()), what="the access log line")
    assert logged()[-1]["key_hash"] != "master"


def test_a_wrong_request_from_several_teams_keeps_its_own_error(gw: Gateway, idp: IdentityProvider) -> None:
    token = idp.token(groups=["ml", "research"])
    r = http("POST", gw.envoy.url + "/v1/chat/completions", {"messages": []}, {"Authorization": f"Bearer {token}"})
    assert r.status == 400 and r.json()["error"]["code"] == "missing_model"


def test_a_token_lists_what_it_may_call(gw: Gateway, idp: IdentityProvider) -> None:
    def get(path: str, token: str):
        return http("GET", gw.envoy.url + path, headers={"Authorization": f"Bearer {token}"})

    token = idp.token(groups=["ml", "research", "frozen"])
    models = get("/v1/models", token)
    assert models.status == 200, models.text
    assert [m["id"] for m in models.json()["data"]] == ["gpt-4", "gpt-4o"]
    assert get("/v1/models/gpt-4o", token).json()["id"] == "gpt-4o"
    assert get("/v1/models/gpt-3.5-turbo", token).status == 404
    groups = get("/model_group/info", token).json()["data"]
    assert [g["model_group"] for g in groups] == ["gpt-4", "gpt-4o"]
    admin = get("/v1/models", idp.token(scope="gw.admin")).json()["data"]
    assert "gpt-3.5-turbo" in [m["id"] for m in admin]
    assert get("/v1/models", forged(idp, "expired")).status == 401
    # A virtual key's list still comes from the admin API.
    key = gw.admin("/key/generate", {"models": ["gpt-4"]}).json()["key"]
    assert [m["id"] for m in get("/v1/models", key).json()["data"]] == ["gpt-4"]


def test_the_admin_api_by_role(gw: Gateway, idp: IdentityProvider) -> None:
    def call(method: str, path: str, token: str, body: Any = None):
        return http(method, gw.envoy.url + path, body, {"Authorization": f"Bearer {token}"})

    admin = idp.token(sub="ops-admin", realm_access={"roles": ["gw-admin"]})
    viewer = idp.token(sub="ops-viewer", realm_access={"roles": ["gw-viewer"]})
    member = idp.token(groups=["ml"])
    made = call("POST", "/team/new", admin, {"team_id": "made-by-jwt", "models": ["gpt-4"]})
    assert made.status == 200, made.text
    assert any(t["team_id"] == "made-by-jwt" for t in call("GET", "/team/list", viewer).json())
    assert call("GET", "/model/info", viewer).status == 200
    refused = call("POST", "/key/generate", viewer, {"models": ["gpt-4"]})
    assert refused.status == 403 and refused.json()["error"]["code"] == "admin_not_allowed"   # LiteLLM's status
    assert call("GET", "/team/list", member).status == 401
    assert call("GET", "/team/list", forged(idp, "expired")).status == 401
    # The admin API never sees the token, and nothing it answers carries the master key.
    assert MASTER not in made.text


def test_an_internal_user_manages_its_own_keys_within_its_teams(gw: Gateway, idp: IdentityProvider) -> None:
    def call(method: str, path: str, token: str, body: Any = None):
        return http(method, gw.envoy.url + path, body, {"Authorization": f"Bearer {token}"})

    dev = idp.token(sub="dev-bob", groups=["ml"], realm_access={"roles": ["gw-dev"]})
    other = idp.token(sub="dev-carol", groups=["ml"], realm_access={"roles": ["gw-dev"]})
    made = call("POST", "/key/generate", dev, {"team_id": "ml", "models": ["gpt-4"], "key_alias": "bob-key"})
    assert made.status == 200, made.text
    key = made.json()["key"]
    assert gw.chat(key, "gpt-4").status == 200
    # Not for another user, not outside its teams, not beyond its team's models.
    assert call("POST", "/key/generate", dev, {"team_id": "ml", "user_id": "someone-else"}).status == 403
    assert call("POST", "/key/generate", dev, {"team_id": "research"}).status == 403
    assert call("POST", "/key/generate", dev, {"team_id": "ml", "models": ["gpt-4o"]}).status == 400
    listed = call("GET", "/key/list?return_full_object=true", dev).json()["keys"]
    assert [k["key_alias"] for k in listed] == ["bob-key"]
    assert call("GET", "/key/list?return_full_object=true", other).json()["keys"] == []
    assert call("GET", f"/key/info?key={key}", other).status == 404
    assert call("POST", "/key/delete", other, {"key_aliases": ["bob-key"]}).status == 404
    # Its own teams (as in LiteLLM), nothing else on the admin API; a client's acting
    # headers carry no weight.
    assert [t["team_id"] for t in call("GET", "/team/list", dev).json()] == ["ml"]
    assert call("GET", "/team/list?user_id=dev-carol", dev).status == 401
    assert call("POST", "/key/block", dev, {"key": key}).status == 401
    master_list = http("GET", gw.envoy.url + "/key/list", headers={"Authorization": f"Bearer {MASTER}",
                                                                   "x-extauthz-acting-user": "nobody"})
    assert master_list.status == 200 and master_list.json()["total_count"] >= 1
    assert call("POST", "/key/delete", dev, {"key_aliases": ["bob-key"]}).status == 200
    assert gw.chat(key, "gpt-4").status == 401


@pytest.mark.parametrize("sub", [" ", "\t", "dev-bob ", " dev-bob"])
def test_an_acting_user_is_never_trimmed_into_another_or_into_none(gw: Gateway, idp: IdentityProvider,
                                                                    sub: str) -> None:
    bob = idp.token(sub="dev-bob", groups=["ml"], realm_access={"roles": ["gw-dev"]})
    made = http("POST", gw.envoy.url + "/key/generate", {"team_id": "ml", "models": ["gpt-4"]},
                {"Authorization": f"Bearer {bob}"})
    assert made.status == 200, made.text
    odd = idp.token(sub=sub, groups=["ml"], realm_access={"roles": ["gw-dev"]})
    r = http("GET", gw.envoy.url + "/key/list?return_full_object=true", headers={"Authorization": f"Bearer {odd}"})
    assert r.status in (200, 401)
    if r.status == 200:
        assert all(k.get("user_id") == sub for k in r.json()["keys"])
    info = http("GET", gw.envoy.url + f"/key/info?key={made.json()['key']}", headers={"Authorization": f"Bearer {odd}"})
    assert info.status in (401, 404)


def test_a_sub_alone_never_reads_a_user_record_into_admin_powers(gw: Gateway, idp: IdentityProvider) -> None:
    # user_id_jwt_field is not set here: as in LiteLLM, no user record is read, so a "sub"
    # that happens to name a proxy_admin record (of another IdP, or typed by hand) is nobody.
    assert gw.admin("/user/new", {"user_id": "ops-root", "user_role": "proxy_admin",
                                  "auto_create_key": False}).status == 200
    token = idp.token(sub="ops-root", groups=["ml"])
    assert gw.chat(token, "gpt-4").status == 200
    refused = gw.chat(token, "gpt-4o")
    assert refused.status == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert http("POST", gw.envoy.url + "/team/new", {"team_alias": "nope"},
                {"Authorization": f"Bearer {token}"}).status == 401
