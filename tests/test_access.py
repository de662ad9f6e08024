"""Who an admin API request acts as, and which records that lets it touch: pure rules."""

from __future__ import annotations

import json

import pytest

from extauthz.admin.access import (Acting, Refused, acting_from_headers, holders_after_change, holders_of_new_value,
                                   key_owner_power)

LEAD = Acting("lead", ("t-a", "t-b")).with_admin_teams([
    {"team_id": "t-a", "members_with_roles": [{"user_id": "lead", "role": "admin"}]},
    {"team_id": "t-b", "members_with_roles": [{"user_id": "lead", "role": "user"},
                                              {"user_id": "other", "role": "admin"}]},
    None])


def test_admin_teams_are_those_where_it_is_an_admin_member() -> None:
    assert LEAD.admin_teams == {"t-a"}


@pytest.mark.parametrize("key, owns", [
    ({"user_id": "lead", "team_id": None}, True),
    ({"user_id": "dev", "team_id": "t-a"}, True),
    ({"user_id": "dev", "team_id": "t-b"}, False),
    ({"user_id": None, "team_id": None}, False),
    (None, False),
])
def test_owns(key: dict | None, owns: bool) -> None:
    assert LEAD.owns(key) is owns


# As LEAD, in a t-b that lets its plain members make and change their own keys.
GRANTED = Acting("lead", ("t-a", "t-b")).with_admin_teams([
    {"team_id": "t-a", "members_with_roles": [{"user_id": "lead", "role": "admin"}]},
    {"team_id": "t-b", "members_with_roles": [{"user_id": "lead", "role": "user"}],
     "team_member_permissions": ["/key/generate", "/key/update"]}])


@pytest.mark.parametrize("who, key, requested, route, refused", [
    (GRANTED, {"team_id": "t-b"}, None, "/key/generate", False),  # its own key where members may make one
    (LEAD, {"team_id": "t-b"}, None, "/key/generate", True),      # not where they may not (LiteLLM's default)
    (GRANTED, {"team_id": "t-b"}, None, "/key/regenerate", True),  # nor by a route the team did not grant
    (LEAD, {"team_id": "t-a"}, "dev", "/key/generate", False),    # anyone's in a team it administers
    (GRANTED, {"team_id": "t-b"}, "dev", "/key/generate", True),  # not someone else's where it is a plain member
    (LEAD, {"team_id": "t-c"}, None, "/key/generate", True),      # not outside its teams
    (LEAD, {"team_id": None}, None, "/key/generate", False),      # its personal key (its record narrows it)
    (LEAD, {"team_id": None}, "dev", "/key/generate", True),      # not another user's personal key
])
def test_new_keys(who: Acting, key: dict, requested: str | None, route: str, refused: bool) -> None:
    if refused:
        with pytest.raises(Refused):
            who.check_new_key(key, requested, route)
    else:
        who.check_new_key(key, requested, route)


def test_a_key_owner_s_teams_count_only_where_the_team_lists_it() -> None:
    # A key's owner's record says t-a and t-gone; t-gone was deleted and made again without it.
    who = Acting("dev", ("t-a", "t-gone")).with_admin_teams(
        [{"team_id": "t-a", "members_with_roles": [{"user_id": "dev", "role": "user"}]},
         {"team_id": "t-gone", "members_with_roles": []}], members_only=True)
    assert who.teams == ("t-a",) and who.admin_teams == frozenset()
    odd = Acting("dev", ("t-x",)).with_admin_teams([{"team_id": "t-x", "members_with_roles": ["dev", 3]}],
                                                  members_only=True)
    assert odd.teams == ()


def test_routes_by_method_and_role() -> None:
    assert LEAD.may_use("POST", "/key/generate") and LEAD.may_use("GET", "/key/list")
    assert not LEAD.may_use("POST", "/key/block") and not LEAD.may_use("POST", "/team/new")
    assert not LEAD.may_use("GET", "/key/generate")  # a write route is not a read because of its method
    viewer = Acting("v", ("t-a",), read_only=True)
    assert viewer.may_use("GET", "/key/list") and not viewer.may_use("POST", "/key/generate")


def test_teams() -> None:
    LEAD.check_team("t-b", manage=False)
    LEAD.check_team("t-a", manage=True)
    with pytest.raises(Refused):
        LEAD.check_team("t-b", manage=True)
    with pytest.raises(Refused) as hidden:
        LEAD.check_team("t-z", manage=False)
    assert hidden.value.status == 404


@pytest.mark.parametrize("headers", [
    {"x-extauthz-acting-user": "not json"},
    {"x-extauthz-acting-user": json.dumps(" ")},
    {"x-extauthz-acting-user": json.dumps(["a"])},
    {"x-extauthz-acting-teams": json.dumps(["t-a"])},
    {"x-extauthz-acting-user": json.dumps("a"), "x-extauthz-acting-teams": json.dumps("t-a")},
])
def test_unreadable_acting_headers_refuse(headers: dict) -> None:
    with pytest.raises(Refused):
        acting_from_headers(headers)


def test_acting_headers() -> None:
    assert acting_from_headers({}) is None
    who = acting_from_headers({"x-extauthz-acting-user": json.dumps("a"),
                               "x-extauthz-acting-teams": json.dumps(["t-a", 3])})
    assert who == Acting("a", ("t-a",))


@pytest.mark.parametrize("owner, method, power", [
    ({"user_id": "r", "user_role": "proxy_admin"}, "POST", "master"),
    ({"user_id": "v", "user_role": "proxy_admin_viewer"}, "GET", "read"),
    ({"user_id": "u", "user_role": "internal_user", "teams": ["t"]}, "POST", Acting("u", ("t",))),
    ({"user_id": "u", "user_role": "internal_user_viewer"}, "GET", Acting("u", (), read_only=True)),
])
def test_a_keys_power_is_its_owners(owner: dict, method: str, power: object) -> None:
    assert key_owner_power({"user_id": owner["user_id"]}, owner, method) == power
    # Its value held by someone else too (made for the owner, reassigned, named by value): no power at all.
    for holders in (["team-lead"], [owner["user_id"], "team-lead"], "team-lead", [None]):
        with pytest.raises(Refused):
            key_owner_power({"user_id": owner["user_id"], "secret_holders": holders}, owner, method)
    assert key_owner_power({"user_id": owner["user_id"], "secret_holders": [owner["user_id"]]}, owner,
                           method) == power
    # A record from before secret_holders: made by someone else, no power; by its owner, its own.
    with pytest.raises(Refused):
        key_owner_power({"user_id": owner["user_id"], "created_by": "team-lead"}, owner, method)
    assert key_owner_power({"user_id": owner["user_id"], "created_by": owner["user_id"]}, owner, method) == power


def test_who_holds_a_keys_value() -> None:
    mine = {"user_id": "m", "secret_holders": ["m"]}
    # Renamed by its owner, or changed by an admin by its hash: the same holders.
    assert holders_after_change(mine, dict(mine, key_alias="x"), "m", True) == ["m"]
    assert holders_after_change(mine, dict(mine, models=[]), "lead", False) == ["m"]
    # Given to someone else: the previous owner keeps the value.
    assert holders_after_change(mine, dict(mine, user_id="lead"), "lead", False) == ["m"]
    # Named by its value in another user's call: that user holds it.
    assert holders_after_change(mine, dict(mine), "lead", True) == ["lead", "m"]
    # A new value: the user it was returned to and its owner (the master key's holder: not counted).
    assert holders_of_new_value("lead", "m") == ["lead", "m"] and holders_of_new_value(None, "m") == ["m"]
    assert holders_of_new_value("m", "m") == ["m"]
    # A proxy admin that holds it lends nothing while it is one (the caller says who is, now).
    admin_made = {"user_id": "u", "secret_holders": ["p", "u"]}
    user = {"user_id": "u", "user_role": "internal_user", "teams": []}
    assert key_owner_power(admin_made, user, "GET", frozenset({"p"})) == Acting("u", ())
    with pytest.raises(Refused):
        key_owner_power(admin_made, user, "GET")
    assert holders_of_new_value(None, None) == ["*"]
    # A key made without an owner was handed to nobody known: given an owner, it has no powers.
    ownerless = {"user_id": None, "secret_holders": holders_of_new_value(None, None)}
    assert holders_after_change(ownerless, dict(ownerless, user_id="p"), "lead", False) == ["*"]
    with pytest.raises(Refused):
        key_owner_power({"user_id": "p", "secret_holders": ["*"]}, {"user_id": "p", "user_role": "proxy_admin"}, "GET")
    with pytest.raises(Refused):  # an empty list, or a record from before without owner or creator
        key_owner_power({"user_id": "p", "secret_holders": []}, {"user_id": "p", "user_role": "proxy_admin"}, "GET")


@pytest.mark.parametrize("owner, method", [
    (None, "GET"), ({"user_id": "x"}, "GET"), ({"user_id": "x", "user_role": "team"}, "GET"),
    ({"user_id": "v", "user_role": "proxy_admin_viewer"}, "POST"),
])
def test_a_key_without_an_owners_role_has_no_power(owner: dict | None, method: str) -> None:
    with pytest.raises(Refused):
        key_owner_power({"user_id": "x"}, owner, method)
