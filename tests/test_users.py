"""Users, team members and virtual-key RBAC, through Envoy, as LiteLLM users drive them:
/user/*, /team/member_*, a key's allowed_routes and key_type, and a user's own key on
the admin API (its powers come from its user_role and its team roles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway
from tests.harness import MASTER_KEY, http
from tests.test_litellm_cli import lite

# The key routes LiteLLM's teams grant their plain members when asked (team_member_permissions).
MEMBER_KEYS = {"team_member_permissions": ["/key/generate", "/key/update", "/key/delete", "/key/regenerate"]}


def call(gateway: Gateway, method: str, path: str, key: str, body: Any = None):
    return http(method, gateway.envoy.url + path, body, {"Authorization": f"Bearer {key}"})


def ok(response: Any) -> dict:
    assert response.status == 200, response.text
    return response.json()


def code(response: Any) -> tuple[int, str]:
    return response.status, response.json()["error"]["code"]


def user_key(gateway: Gateway, user_id: str, **fields: Any) -> str:
    return ok(gateway.admin("/key/generate", {"user_id": user_id, **fields}))["key"]


def test_a_user_and_its_personal_key(gateway: Gateway) -> None:
    made = ok(gateway.admin("/user/new", {"user_id": "u-ann", "user_email": "ann@example.com", "models": ["gpt-4"]}))
    assert made["user_role"] == "internal_user" and made["key"].startswith("sk-")
    key = made["key"]
    # The key has no models of its own: the user's decide.
    assert gateway.chat(key, "gpt-4").status == 200
    assert code(gateway.chat(key, "gpt-4o")) == (403, "model_not_allowed")
    listed = call(gateway, "GET", "/v1/models", key).json()["data"]
    assert [m["id"] for m in listed] == ["gpt-4"]
    ok(gateway.admin("/user/update", {"user_id": "u-ann", "models": ["gpt-4o"]}))
    assert gateway.chat(key, "gpt-4o").status == 200
    assert gateway.chat(key, "gpt-4").status == 403
    ok(gateway.admin("/user/update", {"user_id": "u-ann", "models": ["no-default-models"]}))
    assert gateway.chat(key, "gpt-4o").status == 403
    info = ok(gateway.admin("/user/info?user_id=u-ann", method="GET"))
    assert info["user_info"]["user_email"] == "ann@example.com" and len(info["keys"]) == 1
    assert key not in json.dumps(info)  # only its hash is stored
    assert any(u["user_id"] == "u-ann" for u in ok(gateway.admin("/user/list", method="GET"))["users"])
    deleted = ok(gateway.admin("/user/delete", {"user_ids": ["u-ann"]}))
    assert deleted["deleted_keys"] == 1
    assert code(gateway.chat(key, "gpt-4o")) == (401, "invalid_api_key")
    assert gateway.admin("/user/info?user_id=u-ann", method="GET").status == 404


def test_a_team_key_follows_the_team_not_the_user(gateway: Gateway) -> None:
    # As in LiteLLM: a user's models narrow its personal keys only.
    ok(gateway.admin("/team/new", {"team_id": "t-pers", "models": ["gpt-4o"], **MEMBER_KEYS}))
    ok(gateway.admin("/user/new", {"user_id": "u-pers", "models": ["gpt-4"], "auto_create_key": False}))
    key = user_key(gateway, "u-pers", team_id="t-pers")
    assert gateway.chat(key, "gpt-4o").status == 200


@pytest.mark.parametrize("body, param", [
    ({"user_id": "u-bad", "user_role": "superuser"}, "user_role"),
    ({"user_id": "u-bad", "models": ["no-such-model"]}, "models"),
    ({"user_id": "u-bad", "teams": ["no-such-team"]}, "team_id"),
    ({"user_id": "u-bad", "models": ["no-default-models", "gpt-4"]}, "models"),
    ({"user_id": "u-bad", "teams": "t-one"}, "teams"),
])
def test_a_careless_user_record_is_refused(gateway: Gateway, body: dict, param: str) -> None:
    r = gateway.admin("/user/new", body)
    assert r.status == 400 and r.json()["error"]["param"] == param, r.text
    assert gateway.admin("/user/info?user_id=u-bad", method="GET").status == 404


def test_team_members_are_added_and_removed(gateway: Gateway) -> None:
    ok(gateway.admin("/team/new", {"team_id": "t-mem", "models": ["gpt-4"], **MEMBER_KEYS}))
    team = ok(gateway.admin("/team/member_add", {"team_id": "t-mem", "member": [
        {"role": "admin", "user_id": "u-lead"}, {"role": "user", "user_email": "dev@example.com"}]}))
    roles = {m.get("user_id") if m["role"] == "admin" else m["user_email"]: m["role"]
             for m in team["members_with_roles"]}
    assert roles == {"u-lead": "admin", "dev@example.com": "user"}
    lead = ok(gateway.admin("/user/info?user_id=u-lead", method="GET"))
    assert lead["user_info"]["teams"] == ["t-mem"] and [t["team_id"] for t in lead["teams"]] == ["t-mem"]
    ok(gateway.admin("/team/member_delete", {"team_id": "t-mem", "user_email": "dev@example.com"}))
    team = ok(gateway.admin("/team/info?team_id=t-mem", method="GET"))["team_info"]
    assert [m["user_id"] for m in team["members_with_roles"]] == ["u-lead"]
    assert gateway.admin("/team/member_delete", {"team_id": "t-mem", "user_id": "nobody"}).status == 404
    assert gateway.admin("/team/member_add", {"team_id": "no-team", "member": {"user_id": "x"}}).status == 400
    bad = gateway.admin("/team/member_add", {"team_id": "t-mem", "member": {"role": "owner", "user_id": "x"}})
    assert code(bad) == (400, "invalid_request")


def test_key_type_and_allowed_routes_limit_what_a_key_calls(gateway: Gateway) -> None:
    llm = gateway.new_key(key_type="llm_api")
    assert gateway.chat(llm, "gpt-4").status == 200
    assert call(gateway, "GET", "/v1/models", llm).status == 200
    assert code(call(gateway, "GET", "/key/list", llm)) == (403, "route_not_allowed")
    read_only = gateway.new_key(key_type="read_only")
    assert code(gateway.chat(read_only, "gpt-4")) == (403, "route_not_allowed")
    assert call(gateway, "GET", "/v1/models", read_only).status == 200
    embeddings = gateway.new_key(allowed_routes=["/v1/embeddings"])
    assert code(gateway.chat(embeddings, "gpt-4")) == (403, "route_not_allowed")
    r = http("POST", gateway.envoy.url + "/v1/embeddings", {"model": "gpt-4", "input": "x"},
             {"Authorization": f"Bearer {embeddings}"})
    assert r.status == 200, r.text
    assert code(gateway.admin("/key/generate", {"allowed_routes": ["llm_api_route"]})) == (400, "invalid_request")
    assert code(gateway.admin("/key/generate", {"key_type": "admin"})) == (400, "invalid_request")
    # A key's routes can be lifted by the admin, and every replica sees it at once.
    info = ok(gateway.admin(f"/key/info?key={read_only}", method="GET"))["info"]
    assert info["allowed_routes"] == ["info_routes"] and "allowed_routes" not in info["not_enforced"]
    ok(gateway.admin("/key/update", {"key": read_only, "key_type": "default", "allowed_routes": None}))
    assert gateway.chat(read_only, "gpt-4").status == 200


def test_a_key_on_the_admin_api_has_its_owners_role(gateway: Gateway) -> None:
    for user_id, role in (("u-root", "proxy_admin"), ("u-audit", "proxy_admin_viewer")):
        ok(gateway.admin("/user/new", {"user_id": user_id, "user_role": role, "auto_create_key": False}))
    root = user_key(gateway, "u-root", key_type="management")
    assert ok(call(gateway, "POST", "/team/new", root, {"team_id": "t-by-root"}))["team_id"] == "t-by-root"
    audit = user_key(gateway, "u-audit", key_type="management")
    assert call(gateway, "GET", "/team/list", audit).status == 200
    # A viewer's write: LiteLLM's 403 (a route a role may not use at all is 401).
    assert code(call(gateway, "POST", "/team/new", audit, {"team_id": "t-by-audit"})) == (403, "admin_not_allowed")
    # A key with no owner, or an owner without a record, has no admin powers.
    assert code(call(gateway, "GET", "/team/list", gateway.new_key())) == (401, "admin_not_allowed")
    assert code(call(gateway, "GET", "/team/list", user_key(gateway, "u-ghost"))) == (401, "admin_not_allowed")
    assert code(call(gateway, "GET", "/team/list", "sk-not-a-key-at-all")) == (401, "unauthorized")
    blocked = user_key(gateway, "u-root", blocked=True)
    assert code(call(gateway, "GET", "/team/list", blocked)) == (401, "key_blocked")
    assert MASTER_KEY not in call(gateway, "GET", "/team/list", root).text


@pytest.fixture(scope="module")
def team_with_roles(gateway: Gateway) -> dict[str, str]:
    """Team t-a with lead (admin) and dev (user); t-b where lead is a plain user; keys of each."""
    ok(gateway.admin("/team/new", {"team_id": "t-a", "models": ["gpt-4", "gpt-4o"], **MEMBER_KEYS}))
    ok(gateway.admin("/team/new", {"team_id": "t-b", "models": ["gpt-4"], **MEMBER_KEYS}))
    ok(gateway.admin("/user/new", {"user_id": "u-boss", "user_role": "proxy_admin", "auto_create_key": False}))
    ok(gateway.admin("/team/member_add", {"team_id": "t-a", "member": [
        {"role": "admin", "user_id": "u-lead"}, {"role": "user", "user_id": "u-dev"}, {"role": "user",
                                                                                          "user_id": "u-boss"}]}))
    ok(gateway.admin("/team/member_add", {"team_id": "t-b", "member": {"role": "user", "user_id": "u-lead"}}))
    return {"lead": user_key(gateway, "u-lead"), "dev": user_key(gateway, "u-dev"),
            "dev_team_key": user_key(gateway, "u-dev", team_id="t-a", models=["gpt-4"], key_alias="dev-a"),
            "b_key": gateway.new_key(team_id="t-b", key_alias="in-b")}


def test_a_team_admin_manages_the_teams_keys_and_members(gateway: Gateway, team_with_roles: dict) -> None:
    lead, dev_team_key = team_with_roles["lead"], team_with_roles["dev_team_key"]
    for_dev = ok(call(gateway, "POST", "/key/generate", lead, {"team_id": "t-a", "user_id": "u-dev",
                                                               "models": ["gpt-4o"]}))
    assert gateway.chat(for_dev["key"], "gpt-4o").status == 200
    # A key made for someone else has no admin powers: it would otherwise act with that user's role.
    assert for_dev["created_by"] == "u-lead"
    assert code(call(gateway, "GET", "/key/list", for_dev["key"])) == (401, "admin_not_allowed")
    listed = ok(call(gateway, "GET", "/key/list?return_full_object=true", lead))["keys"]
    # Its own keys, and the team's: none of another team's, none of another user's elsewhere.
    assert all(k["user_id"] == "u-lead" or k["team_id"] == "t-a" for k in listed)
    assert "dev-a" in {k["key_alias"] for k in listed} and "in-b" not in {k["key_alias"] for k in listed}
    assert ok(call(gateway, "GET", "/team/info?team_id=t-a", lead))["team_id"] == "t-a"
    ok(gateway.admin("/user/new", {"user_id": "u-new", "auto_create_key": False}))
    ok(call(gateway, "POST", "/team/member_add", lead, {"team_id": "t-a", "member": {"user_id": "u-new"}}))
    ok(call(gateway, "POST", "/key/delete", lead, {"keys": [dev_team_key]}))
    assert gateway.chat(dev_team_key, "gpt-4").status == 401
    # Not in a team where it is a plain member, and nothing outside the teams' routes.
    assert call(gateway, "POST", "/key/generate", lead, {"team_id": "t-b", "user_id": "u-dev"}).status == 403
    assert call(gateway, "POST", "/team/member_add", lead, {"team_id": "t-b", "member": {"user_id": "x"}}).status \
        == 403
    assert call(gateway, "POST", "/key/delete", lead, {"key_aliases": ["in-b"]}).status == 404
    assert call(gateway, "POST", "/team/new", lead, {"team_id": "t-lead"}).status == 401
    assert call(gateway, "POST", "/user/new", lead, {"user_id": "u-made-by-lead"}).status == 401
    assert call(gateway, "GET", "/user/info?user_id=u-dev", lead).status == 404


def test_a_team_admin_cannot_lend_itself_another_users_role(gateway: Gateway, team_with_roles: dict) -> None:
    lead = team_with_roles["lead"]
    # u-boss (a proxy_admin) is a member of t-a: a management key of its would act as a proxy_admin.
    made = ok(call(gateway, "POST", "/key/generate", lead, {"team_id": "t-a", "user_id": "u-boss",
                                                            "key_type": "management"}))
    assert code(call(gateway, "GET", "/team/list", made["key"])) == (401, "admin_not_allowed")
    assert code(call(gateway, "POST", "/team/new", made["key"], {"team_id": "t-x"})) == (401, "admin_not_allowed")
    # The master key's own key for u-boss does act as u-boss; a team admin's change takes that away.
    boss = ok(gateway.admin("/key/generate", {"user_id": "u-boss", "team_id": "t-a"}))["key"]
    assert call(gateway, "GET", "/team/list", boss).status == 200
    ok(call(gateway, "POST", "/key/update", lead, {"key": boss, "metadata": {"touched": True}}))
    assert code(call(gateway, "GET", "/team/list", boss)) == (401, "admin_not_allowed")


def test_a_plain_member_manages_its_own_keys_only(gateway: Gateway, team_with_roles: dict) -> None:
    dev = team_with_roles["dev"]
    own = ok(call(gateway, "POST", "/key/generate", dev, {"team_id": "t-a", "models": ["gpt-4"]}))
    assert own["user_id"] == "u-dev"
    assert call(gateway, "POST", "/key/generate", dev, {"team_id": "t-a", "user_id": "u-lead"}).status == 403
    assert call(gateway, "POST", "/key/generate", dev, {"team_id": "t-b"}).status == 403
    lead_key = ok(gateway.admin("/key/generate", {"user_id": "u-lead", "team_id": "t-a"}))["key"]
    assert call(gateway, "GET", f"/key/info?key={lead_key}", dev).status == 404
    assert call(gateway, "POST", "/key/delete", dev, {"keys": [lead_key]}).status == 404
    assert call(gateway, "POST", "/team/member_add", dev, {"team_id": "t-a", "member": {"user_id": "x"}}).status \
        == 403
    # What the admin decided on its key stays the admin's.
    ok(gateway.admin("/key/block", {"key": own["key"]}))
    lifted = call(gateway, "POST", "/key/update", dev, {"key": own["key"], "blocked": False})
    assert code(lifted) == (403, "admin_not_allowed")
    assert call(gateway, "POST", "/key/unblock", dev, {"key": own["key"]}).status == 401
    assert code(gateway.chat(own["key"], "gpt-4")) == (401, "key_blocked")
    moved = call(gateway, "POST", "/key/update", dev, {"key": own["key"], "team_id": "t-b"})
    assert moved.status == 403
    assert ok(call(gateway, "GET", "/user/info", dev))["user_id"] == "u-dev"


def test_litellm_cli_users_and_teams(gateway: Gateway, tmp_path: Path) -> None:
    ok(gateway.admin("/team/new", {"team_id": "t-cli", "models": ["gpt-4"], **MEMBER_KEYS}))
    made = json.loads(lite(gateway, "users", "create", "--email", "cli@example.com", "--role", "internal_user",
                           "--team", "t-cli", home=tmp_path))
    user_id = made["user_id"]
    assert made["teams"] == ["t-cli"] and gateway.chat(made["key"], "gpt-4").status == 200
    table = lite(gateway, "users", "list", home=tmp_path)
    assert "cli@example.com" in table and "t-cli" in table
    got = json.loads(lite(gateway, "users", "get", "--id", user_id, home=tmp_path))
    assert got["user_info"]["user_email"] == "cli@example.com"
    assert "t-cli" in lite(gateway, "teams", "list", home=tmp_path)
    lite(gateway, "users", "delete", user_id, home=tmp_path)
    assert gateway.chat(made["key"], "gpt-4").status == 401


# -- what an attacker tried ---------------------------------------------------------------------

def test_a_key_a_team_admin_made_for_someone_else_has_no_admin_powers(gateway: Gateway,
                                                                      team_with_roles: dict) -> None:
    lead = team_with_roles["lead"]
    # Routes that no probe list would think of: the key is refused by who made it, not by its routes.
    made = ok(call(gateway, "POST", "/key/generate", lead, {
        "team_id": "t-a", "user_id": "u-boss",
        "allowed_routes": ["/user/list", "/team/list", "/key/unblock", "/team/block", "/user/delete"]}))
    assert made["created_by"] == "u-lead"
    for method, path, body in (("GET", "/user/list", None), ("GET", "/team/list", None),
                               ("POST", "/team/block", {"team_id": "t-b"}),
                               ("POST", "/user/delete", {"user_ids": ["u-dev"]})):
        assert code(call(gateway, method, path, made["key"], body)) == (401, "admin_not_allowed"), path
    # Nor can it hand its own key to a proxy_admin: changed by it, the key is its, not theirs.
    own = ok(call(gateway, "POST", "/key/generate", lead, {"team_id": "t-a"}))["key"]
    ok(call(gateway, "POST", "/key/update", lead, {"key": own, "user_id": "u-boss"}))
    assert code(call(gateway, "GET", "/team/list", own)) == (401, "admin_not_allowed")
    assert ok(gateway.admin("/user/info?user_id=u-dev", method="GET"))["user_id"] == "u-dev"


def test_a_value_a_team_admin_was_given_never_acts_as_its_owner(gateway: Gateway, team_with_roles: dict) -> None:
    lead, dev = team_with_roles["lead"], team_with_roles["dev"]
    ok(gateway.admin("/team/new", {"team_id": "t-devs-own", "models": ["gpt-4"], **MEMBER_KEYS}))
    ok(gateway.admin("/team/member_add", {"team_id": "t-devs-own", "member": {"role": "admin", "user_id": "u-dev"}}))
    # The team admin makes a key for a member (and sees its value); the member renames it.
    made = ok(call(gateway, "POST", "/key/generate", lead, {"team_id": "t-a", "user_id": "u-dev"}))
    ok(call(gateway, "POST", "/key/update", dev, {"key": made["token"], "key_alias": "devs-now"}))
    assert made["created_by"] == "u-lead" and made["secret_holders"] == ["u-dev", "u-lead"]
    # The value the team admin holds does not make it an admin of the member's other team.
    took = call(gateway, "POST", "/team/member_add", made["key"],
                {"team_id": "t-devs-own", "member": {"role": "admin", "user_id": "u-lead"}})
    assert code(took) == (401, "admin_not_allowed")
    members = ok(gateway.admin("/team/info?team_id=t-devs-own", method="GET"))["team_info"]["members_with_roles"]
    assert [m["user_id"] for m in members] == ["u-dev"]
    # The owner regenerating it (a value only it sees) gets its powers back; the old value stops.
    fresh = ok(call(gateway, "POST", "/key/regenerate", dev, {"key": made["token"]}))
    assert fresh["secret_holders"] == ["u-dev"]
    assert call(gateway, "GET", "/team/info?team_id=t-devs-own", fresh["key"]).status == 200
    assert call(gateway, "GET", "/team/info?team_id=t-devs-own", made["key"]).status == 401


def test_a_key_moved_to_a_team_admin_does_not_act_as_it(gateway: Gateway, team_with_roles: dict) -> None:
    lead, dev = team_with_roles["lead"], team_with_roles["dev"]
    own = ok(call(gateway, "POST", "/key/generate", dev, {"team_id": "t-a"}))
    # The team admin takes the member's key (by its hash: it never saw the value).
    moved = ok(call(gateway, "POST", "/key/update", lead, {"key": own["token"], "user_id": "u-lead"}))
    assert moved["user_id"] == "u-lead" and moved["secret_holders"] == ["u-dev"]
    # The member, who still holds the value, does not act as the team admin.
    added = call(gateway, "POST", "/team/member_add", own["key"], {"team_id": "t-a", "member": {"user_id": "u-x1"}})
    assert code(added) == (401, "admin_not_allowed")
    assert code(call(gateway, "GET", "/key/list", own["key"])) == (401, "admin_not_allowed")
    # Nor through the JWT-free path of naming a key by its value: a team admin who does holds it.
    boss = ok(gateway.admin("/key/generate", {"user_id": "u-boss", "team_id": "t-a"}))
    assert boss["secret_holders"] == ["u-boss"]
    ok(call(gateway, "POST", "/key/update", lead, {"key": boss["token"], "metadata": {"seen": False}}))
    assert call(gateway, "GET", "/team/list", boss["key"]).status == 200  # by its hash: still u-boss's alone


def test_a_key_made_without_an_owner_never_acts_as_the_owner_given_later(gateway: Gateway,
                                                                        team_with_roles: dict) -> None:
    lead = team_with_roles["lead"]
    # A team key the admin made for no one (its value shared with the team, the lead among them).
    shared = ok(gateway.admin("/key/generate", {"team_id": "t-a"}))
    assert shared["secret_holders"] == ["*"]
    # The team admin gives it to the team's proxy_admin member, by its hash.
    ok(call(gateway, "POST", "/key/update", lead, {"key": shared["token"], "user_id": "u-boss"}))
    for method, path in (("GET", "/user/list"), ("GET", "/team/list")):
        assert code(call(gateway, method, path, shared["key"])) == (401, "admin_not_allowed"), path
    assert code(call(gateway, "POST", "/user/new", shared["key"], {"user_id": "u-minted", "user_role": "proxy_admin"})) \
        == (401, "admin_not_allowed")


def test_a_team_admin_gives_team_keys_to_members_only(gateway: Gateway, team_with_roles: dict) -> None:
    lead = team_with_roles["lead"]
    ok(gateway.admin("/user/new", {"user_id": "u-outsider", "auto_create_key": False}))
    for owner in ("u-outsider", "u-never-made"):   # not in t-a: its key count and aliases are not the lead's
        made = call(gateway, "POST", "/key/generate", lead, {"team_id": "t-a", "user_id": owner})
        assert code(made) == (403, "admin_not_allowed"), owner
    own = ok(call(gateway, "POST", "/key/generate", lead, {"team_id": "t-a"}))
    for owner in (None, "u-outsider"):
        moved = call(gateway, "POST", "/key/update", lead, {"key": own["token"], "user_id": owner})
        assert moved.status in (400, 403), (owner, moved.text)
    assert ok(gateway.admin(f"/key/info?key={own['token']}", method="GET"))["info"]["user_id"] == "u-lead"


def test_a_proxy_admin_demoted_keeps_no_power_through_keys_it_made(gateway: Gateway) -> None:
    ok(gateway.admin("/user/new", {"user_id": "u-p-admin", "user_role": "proxy_admin", "auto_create_key": False}))
    ok(gateway.admin("/user/new", {"user_id": "u-alice-admin", "user_role": "proxy_admin", "auto_create_key": False}))
    p_key = user_key(gateway, "u-p-admin")
    for_alice = ok(call(gateway, "POST", "/key/generate", p_key, {"user_id": "u-alice-admin"}))
    assert for_alice["secret_holders"] == ["u-alice-admin", "u-p-admin"]
    assert call(gateway, "GET", "/user/list", for_alice["key"]).status == 200     # p is an admin: it lends nothing
    ok(gateway.admin("/user/update", {"user_id": "u-p-admin", "user_role": "internal_user"}))
    assert code(call(gateway, "GET", "/user/list", for_alice["key"])) == (401, "admin_not_allowed")
    # Regenerated by the master key (for her, a value only she is handed), it is hers again.
    fresh = ok(gateway.admin("/key/regenerate", {"key": for_alice["token"]}))
    assert call(gateway, "GET", "/user/list", fresh["key"]).status == 200


def test_leaving_a_team_ends_its_keys_there(gateway: Gateway) -> None:
    for team in ("t-left", "t-stayed"):
        ok(gateway.admin("/team/new", {"team_id": team, "models": ["gpt-4"], **MEMBER_KEYS}))
        ok(gateway.admin("/team/member_add", {"team_id": team, "member": {"user_id": "u-leaver"}}))
    leaver = user_key(gateway, "u-leaver")
    in_left = ok(call(gateway, "POST", "/key/generate", leaver, {"team_id": "t-left"}))
    in_stayed = ok(call(gateway, "POST", "/key/generate", leaver, {"team_id": "t-stayed"}))
    # A copy kept in its grace period goes too.
    successor = ok(call(gateway, "POST", "/key/regenerate", leaver, {"key": in_left["token"], "grace_period": "1h"}))
    assert gateway.chat(in_left["key"], "gpt-4").status == 200
    removed = ok(gateway.admin("/team/member_delete", {"team_id": "t-left", "user_id": "u-leaver"}))
    assert sorted(removed["deleted_keys"]) == sorted([in_left["token"], successor["token"]])
    for gone in (in_left["key"], successor["key"]):
        assert gateway.chat(gone, "gpt-4").status == 401
    assert gateway.chat(in_stayed["key"], "gpt-4").status == 200
    (entry,) = ok(gateway.admin(f"/audit?target={successor['token']}", method="GET"))["entries"][:1]
    assert entry["route"] == "/team/member_delete"
    # A team admin that leaves keeps no value it made for a member: that key is blocked.
    ok(gateway.admin("/team/member_add", {"team_id": "t-stayed", "member": {"user_id": "u-made-for"}}))
    ok(gateway.admin("/team/member_add", {"team_id": "t-stayed", "member": {"user_id": "u-leaver", "role": "admin"}}))
    for_member = ok(call(gateway, "POST", "/key/generate", leaver, {"team_id": "t-stayed", "user_id": "u-made-for"}))
    left = ok(gateway.admin("/team/member_delete", {"team_id": "t-stayed", "user_id": "u-leaver"}))
    assert left["blocked_keys"] == [for_member["token"]] and in_stayed["token"] in left["deleted_keys"]
    assert code(gateway.chat(for_member["key"], "gpt-4")) == (401, "key_blocked")
    # Deleted, a user keeps no key of any team.
    ok(gateway.admin("/team/member_add", {"team_id": "t-stayed", "member": {"user_id": "u-leaver"}}))
    in_stayed = ok(call(gateway, "POST", "/key/generate", leaver, {"team_id": "t-stayed"}))
    ok(gateway.admin("/user/delete", {"user_ids": ["u-leaver"]}))
    assert gateway.chat(in_stayed["key"], "gpt-4").status == 401 and gateway.chat(leaver, "gpt-4").status == 401


def test_a_user_cannot_bring_back_a_blocked_secret(gateway: Gateway, team_with_roles: dict) -> None:
    dev = team_with_roles["dev"]
    chosen = call(gateway, "POST", "/key/generate", dev, {"team_id": "t-a", "key": "sk-chosen-by-the-user-123"})
    assert code(chosen) == (403, "admin_not_allowed")
    own = ok(call(gateway, "POST", "/key/generate", dev, {"team_id": "t-a", "key_type": "llm_api"}))
    # Routes the admin (or its key_type) set stay: a user does not widen them.
    lifted = call(gateway, "POST", "/key/update", dev, {"key": own["key"], "allowed_routes": None})
    assert code(lifted) == (403, "admin_not_allowed")


def test_a_team_admin_adds_members_by_user_id_and_learns_nothing_else(gateway: Gateway,
                                                                      team_with_roles: dict) -> None:
    lead = team_with_roles["lead"]
    ok(gateway.admin("/user/new", {"user_id": "u-secret", "user_email": "secret@example.com",
                                   "user_role": "proxy_admin", "metadata": {"k": "v"}, "auto_create_key": False}))
    by_email = call(gateway, "POST", "/team/member_add", lead, {"team_id": "t-a",
                                                                "member": {"user_email": "secret@example.com"}})
    assert code(by_email) == (403, "admin_not_allowed")
    ok(gateway.admin("/user/new", {"user_id": "u-added", "user_email": "added@example.com", "auto_create_key": False}))
    added = ok(call(gateway, "POST", "/team/member_add", lead, {"team_id": "t-a", "member": {"user_id": "u-added"}}))
    assert added["updated_users"] == [{"user_id": "u-added"}]     # its e-mail is not the team admin's to read
    assert "added@example.com" not in added_text(added)
    # No user record is made, nor an admin pulled in, and the answer does not tell the two apart.
    made_up = call(gateway, "POST", "/team/member_add", lead, {"team_id": "t-a", "member": {"user_id": "u-made-up"}})
    admin = call(gateway, "POST", "/team/member_add", lead, {"team_id": "t-a", "member": {"user_id": "u-secret"}})
    assert code(made_up) == code(admin) == (404, "not_found")
    assert made_up.json()["error"]["message"].replace("u-made-up", "?") == \
        admin.json()["error"]["message"].replace("u-secret", "?")
    assert gateway.admin("/user/info?user_id=u-made-up", method="GET").status == 404
    # A user id with an e-mail the team admin claims: refused, nothing stored under it.
    claimed = call(gateway, "POST", "/team/member_add", lead, {"team_id": "t-a", "member": {
        "user_id": "u-claim", "user_email": "ceo@example.com"}})
    assert claimed.status == 404 and gateway.admin("/user/info?user_id=u-claim", method="GET").status == 404
    assert code(gateway.admin("/team/member_add", {"team_id": "t-a", "member": []})) == (400, "invalid_request")


def added_text(answer: dict) -> str:
    return json.dumps(answer["updated_users"]) + json.dumps(answer.get("members_with_roles"))


def test_a_deleted_team_leaves_no_membership_behind(gateway: Gateway) -> None:
    ok(gateway.admin("/team/new", {"team_id": "t-gone", "models": ["gpt-4"], **MEMBER_KEYS}))
    ok(gateway.admin("/team/member_add", {"team_id": "t-gone", "member": {"user_id": "u-ex"}}))
    ex_key = user_key(gateway, "u-ex")
    ok(gateway.admin("/team/delete", {"team_ids": ["t-gone"]}))
    assert ok(gateway.admin("/user/info?user_id=u-ex", method="GET"))["user_info"]["teams"] == []
    ok(gateway.admin("/team/new", {"team_id": "t-gone", "models": ["gpt-4o"], **MEMBER_KEYS}))
    assert code(call(gateway, "POST", "/key/generate", ex_key, {"team_id": "t-gone"})) == (403, "admin_not_allowed")
    assert call(gateway, "GET", "/team/info?team_id=t-gone", ex_key).status == 404


def test_a_refused_user_call_writes_nothing(gateway: Gateway) -> None:
    bad = gateway.admin("/user/new", {"user_id": "u-half", "duration": "forever"})
    assert bad.status == 400 and gateway.admin("/user/info?user_id=u-half", method="GET").status == 404
    ok(gateway.admin("/user/new", {"user_id": "u-kept", "auto_create_key": False}))
    partial = gateway.admin("/user/delete", {"user_ids": ["u-kept", "u-never-was"]})
    assert partial.status == 404
    assert gateway.admin("/user/info?user_id=u-kept", method="GET").status == 200
    assert code(gateway.admin("/key/generate", {"allowed_routes": ["/{a}{b}{c}{d}x"]})) == (400, "invalid_request")


def test_records_written_by_hand_fail_closed(gateway: Gateway, redis_port: int) -> None:
    import redis
    r = redis.Redis(port=redis_port, db=0)
    key = gateway.new_key(models=["gpt-4"])
    from extauthz.domain.record import hash_token
    doc = json.loads(r.get(f"extauthz:key:{hash_token(key)}"))
    r.set(f"extauthz:key:{hash_token(key)}", json.dumps(dict(doc, allowed_routes=42, user_id={"x": 1})))
    assert code(gateway.chat(key, "gpt-4")) == (403, "route_not_allowed")
    r.set(f"extauthz:key:{hash_token(key)}", json.dumps(dict(doc, key_type="read_only")))  # LiteLLM's form
    assert code(gateway.chat(key, "gpt-4")) == (403, "route_not_allowed")
    ok(gateway.admin("/team/new", {"team_id": "t-odd"}))
    team = json.loads(r.get("extauthz:team:t-odd"))
    r.set("extauthz:team:t-odd", json.dumps(dict(team, members_with_roles=["someone", 3, None])))
    ok(gateway.admin("/team/member_add", {"team_id": "t-odd", "member": {"user_id": "u-odd", "role": "admin"}}))
    odd_key = user_key(gateway, "u-odd")
    assert call(gateway, "GET", "/team/info?team_id=t-odd", odd_key).status == 200


def test_concurrent_team_delete_and_key_update_leave_no_dangling_alias(gateway: Gateway) -> None:
    from concurrent.futures import ThreadPoolExecutor
    for i in range(15):
        team = f"t-race-{i}"
        ok(gateway.admin("/team/new", {"team_id": team, **MEMBER_KEYS}))
        key = gateway.new_key(team_id=team, key_alias=f"race-old-{i}")
        with ThreadPoolExecutor(2) as pool:
            deleting = pool.submit(gateway.admin, "/team/delete", {"team_ids": [team]})
            renaming = pool.submit(gateway.admin, "/key/update", {"key": key, "key_alias": f"race-new-{i}"})
            assert deleting.result().status == 200 and renaming.result().status in (200, 400, 404)
        # Whatever order they ran in, the key is gone and its aliases are free again.
        assert gateway.chat(key, "gpt-4").status == 401
        for alias in (f"race-old-{i}", f"race-new-{i}"):
            ok(gateway.admin("/key/generate", {"key_alias": alias}))
