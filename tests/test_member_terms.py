"""A member's own terms in a team (LiteLLM's team membership): ``max_budget_in_team``,
``budget_duration`` and ``allowed_models`` given to /team/member_add or
/team/member_update narrow the team's keys the member owns, and its tokens' calls
through the team. Pure reading of the stored form, then what callers see through Envoy."""

from __future__ import annotations

from typing import Any

import pytest

from extauthz.domain.record import ANY_MEMBER, MemberScope, TeamRecord, with_terms
from extauthz.domain.budgets import Budget, Period
from tests.conftest import Gateway
from tests.harness import http
from tests.test_budgets import COST, call
from tests.test_usage import wait_for


# -- pure ---------------------------------------------------------------------------------------

def team_doc(**fields: Any) -> dict[str, Any]:
    return {"team_id": "t", "models": [], **fields}


def test_a_members_terms_are_read_from_the_team_record() -> None:
    team = TeamRecord.from_document(team_doc(team_memberships=[
        {"user_id": "ann", "max_budget_in_team": 5, "budget_duration": "1d", "allowed_models": ["gpt-4"]},
        {"user_id": "bob", "allowed_models": ["gpt-4o"]}]))
    assert team.member("ann") == MemberScope("ann", "t", ("gpt-4",), Budget(5.0, None, Period(86400)))
    assert team.member("bob") == MemberScope("bob", "t", ("gpt-4o",), None)
    assert team.member("cid") is None and team.member(None) is None
    assert TeamRecord.from_document(team_doc()).member("ann") is None


@pytest.mark.parametrize("stored", [
    "ann", [{"user_id": 7}], [{"user_id": "ann", "max_budget_in_team": -1}],
    [{"user_id": "ann", "allowed_models": "gpt-4"}], [{"user_id": "ann", "budget_duration": "1y"}], [["ann"]],
])
def test_terms_that_do_not_read_narrow_every_member_to_nothing(stored: Any) -> None:
    member = TeamRecord.from_document(team_doc(team_memberships=stored)).member("anyone")
    assert member is not None and member.user_id == ANY_MEMBER
    assert member.budget == Budget(max=0.0) and member.models == ("<unreadable team_memberships>",)


def test_terms_are_merged_over_those_a_member_has_and_removed_with_it() -> None:
    doc = with_terms(team_doc(), "ann", {"max_budget_in_team": 5.0, "allowed_models": ["gpt-4"]})
    assert doc["team_memberships"] == [{"user_id": "ann", "max_budget_in_team": 5.0, "allowed_models": ["gpt-4"]}]
    doc = with_terms(doc, "ann", {"allowed_models": []})  # (LiteLLM: [] lifts the member's narrowing)
    assert doc["team_memberships"] == [{"user_id": "ann", "max_budget_in_team": 5.0}]
    assert with_terms(doc, "ann", {}) is doc
    assert with_terms(doc, "ann", None)["team_memberships"] == []


# -- through Envoy ------------------------------------------------------------------------------

def member_key(gateway: Gateway, team: str, user: str) -> str:
    return gateway.new_key(team_id=team, user_id=user)


def test_a_members_budget_and_models_narrow_its_team_keys(gateway: Gateway) -> None:
    team = gateway.new_team(models=["gpt-4", "gpt-4o"], team_alias="squad")
    added = gateway.admin("/team/member_add", {"team_id": team, "member": [{"user_id": "m-ann"}],
                                               "max_budget_in_team": 0.05, "allowed_models": ["gpt-4"]})
    assert added.status == 200, added.text
    assert gateway.admin("/team/member_add", {"team_id": team, "member": {"user_id": "m-bob"}}).status == 200
    ann, bob = member_key(gateway, team, "m-ann"), member_key(gateway, team, "m-bob")

    refused = call(gateway, ann, "gpt-4o")
    error = refused.json()["error"]
    assert refused.status == 403 and error["code"] == "model_not_allowed"
    assert f"not allowed for its user 'm-ann' in team {team!r}" in error["message"]
    assert call(gateway, bob, "gpt-4o").status == 200        # another member: the team's models

    assert call(gateway, ann).status == 200                   # 0.06 of 0.05: the member's budget is spent
    info = lambda: gateway.admin(f"/team/info?team_id={team}", method="GET").json()  # noqa: E731
    wait_for(lambda: info()["team_memberships"][0]["spend"] == pytest.approx(COST), "the member's spend settled")
    (membership,) = info()["team_memberships"]
    assert membership["user_id"] == "m-ann" and membership["litellm_budget_table"]["max_budget"] == 0.05
    assert membership["litellm_budget_table"]["allowed_models"] == ["gpt-4"]

    spent = call(gateway, ann, usage="0,0")
    assert spent.status == 422 and spent.json()["error"]["code"] == "budget_exceeded"
    assert "User='m-ann' in Team='squad'" in spent.json()["error"]["message"]
    listed = http("GET", gateway.envoy.url + "/v1/models", None, {"Authorization": f"Bearer {ann}"})
    assert listed.status == 422                               # as a spent key's, in LiteLLM
    assert call(gateway, bob).status == 200                   # the team's other members are not touched

    # An admin raising the member's budget lets it through again at once.
    raised = gateway.admin("/team/member_update", {"team_id": team, "user_id": "m-ann", "max_budget_in_team": 1})
    assert raised.status == 200 and raised.json()["max_budget_in_team"] == 1
    assert call(gateway, ann).status == 200
    # Terms this gateway does not enforce are refused, never stored unread.
    unread = gateway.admin("/team/member_update", {"team_id": team, "user_id": "m-ann", "rpm_limit": 1})
    assert unread.status == 400 and unread.json()["error"]["param"] == "rpm_limit"

    # Its terms outlive its membership: a token's groups may still name the team, and one
    # who joins again does not come back wider than it left.
    assert gateway.admin("/team/member_delete", {"team_id": team, "user_id": "m-ann"}).status == 200
    assert gateway.admin("/team/member_add", {"team_id": team, "member": {"user_id": "m-ann"}}).status == 200
    assert [m["user_id"] for m in info()["team_memberships"]] == ["m-ann"]
    assert call(gateway, member_key(gateway, team, "m-ann"), "gpt-4o").status == 403


@pytest.mark.parametrize("body, param", [
    ({"max_budget_in_team": -1}, "max_budget_in_team"),
    ({"max_budget_in_team": "5"}, "max_budget_in_team"),
    ({"budget_duration": "1y"}, "budget_duration"),
    ({"allowed_models": ["no-such-model"]}, "allowed_models"),
    ({"allowed_models": "gpt-4"}, "allowed_models"),
])
def test_careless_member_terms_are_refused(gateway: Gateway, body: dict, param: str) -> None:
    team = gateway.new_team(models=["gpt-4"])
    refused = gateway.admin("/team/member_add", {"team_id": team, "member": {"user_id": "m-careless"}, **body})
    assert refused.status == 400 and refused.json()["error"]["param"] == param, refused.text
    assert gateway.admin(f"/team/info?team_id={team}", method="GET").json()["team_info"]["members_with_roles"] == []


def test_a_team_admin_sets_its_members_terms_and_no_one_elses(gateway: Gateway) -> None:
    team, other = gateway.new_team(models=["gpt-4", "gpt-4o"]), gateway.new_team(models=["gpt-4"])
    for user in ("m-lead", "m-crew"):
        assert gateway.admin("/user/new", {"user_id": user, "auto_create_key": False}).status == 200
    assert gateway.admin("/team/member_add", {"team_id": team, "member": [
        {"user_id": "m-lead", "role": "admin"}, {"user_id": "m-crew"}]}).status == 200
    assert gateway.admin("/team/member_add", {"team_id": other, "member": {"user_id": "m-crew"}}).status == 200
    lead = gateway.new_key(user_id="m-lead")
    assert gateway.admin("/team/member_update", {"team_id": team, "user_id": "m-crew", "allowed_models": ["gpt-4"]},
                         key=lead).status == 200
    assert call(gateway, member_key(gateway, team, "m-crew"), "gpt-4o").status == 403
    crew = gateway.new_key(user_id="m-crew")
    refused = gateway.admin("/team/member_update", {"team_id": team, "user_id": "m-crew", "allowed_models": []},
                            key=crew)                          # a plain member may not lift its own
    assert refused.status in (401, 403)
    # Nor a team admin its own: they are the bounds an admin set on it.
    assert gateway.admin("/team/member_update", {"team_id": team, "user_id": "m-lead", "allowed_models": ["gpt-4"]}
                         ).status == 200
    own = gateway.admin("/team/member_update", {"team_id": team, "user_id": "m-lead", "allowed_models": []}, key=lead)
    assert own.status == 403 and "its own terms" in own.json()["error"]["message"]
    assert gateway.admin("/team/member_add", {"team_id": team, "member": {"user_id": "m-lead", "role": "admin"},
                                              "max_budget_in_team": 100}, key=lead).status == 403
    assert call(gateway, member_key(gateway, team, "m-lead"), "gpt-4o").status == 403
    assert gateway.admin("/team/member_update", {"team_id": other, "user_id": "m-crew", "max_budget_in_team": 9},
                         key=lead).status in (401, 403)        # not its team


def test_a_teams_default_member_models_narrow_a_member_given_none(gateway: Gateway) -> None:
    team = gateway.new_team(models=["gpt-4", "gpt-4o"], default_team_member_models=["gpt-4o"])
    assert gateway.admin("/team/member_add", {"team_id": team, "member": {"user_id": "m-default"}}).status == 200
    assert gateway.admin("/team/member_add", {"team_id": team, "member": {"user_id": "m-own"},
                                              "allowed_models": ["gpt-4"]}).status == 200
    defaulted, own = member_key(gateway, team, "m-default"), member_key(gateway, team, "m-own")
    assert call(gateway, defaulted, "gpt-4o").status == 200 and call(gateway, defaulted, "gpt-4").status == 403
    assert call(gateway, own, "gpt-4").status == 200 and call(gateway, own, "gpt-4o").status == 403
    refused = gateway.admin("/team/new", {"default_team_member_models": ["no-such-model"]})
    assert refused.status == 400 and refused.json()["error"]["param"] == "default_team_member_models"


@pytest.mark.parametrize("stored", [5, ["junk"], {"m-x": {}}])
def test_terms_stored_by_hand_that_do_not_read_fail_closed_and_answer_json(gateway: Gateway, redis_port: int,
                                                                           stored: Any) -> None:
    import json

    import redis
    team = gateway.new_team(models=["gpt-4"])
    assert gateway.admin("/team/member_add", {"team_id": team, "member": {"user_id": "m-hand"}}).status == 200
    client = redis.Redis(port=redis_port)
    doc = json.loads(client.get(f"extauthz:team:{team}"))
    client.set(f"extauthz:team:{team}", json.dumps({**doc, "team_memberships": stored}))
    client.close()
    key = member_key(gateway, team, "m-hand")
    assert call(gateway, key).status == 403                    # the check refuses, rather than lifts
    assert gateway.admin(f"/team/info?team_id={team}", method="GET").status == 200
    updated = gateway.admin("/team/member_update", {"team_id": team, "user_id": "m-hand", "role": "admin"})
    assert updated.status == 200 and updated.json()["role"] == "admin"


def test_a_users_budget_holds_for_its_personal_keys_together(gateway: Gateway) -> None:
    made = gateway.admin("/user/new", {"user_id": "m-budgeted", "max_budget": 0.05, "models": ["gpt-4"]})
    assert made.status == 200, made.text
    first, second = made.json()["key"], gateway.new_key(user_id="m-budgeted")
    assert call(gateway, first).status == 200                    # 0.06 of 0.05
    user = lambda: gateway.admin("/user/info?user_id=m-budgeted", method="GET").json()["user_info"]  # noqa: E731
    wait_for(lambda: user()["spend"] == pytest.approx(COST), "the user's spend settled")
    refused = call(gateway, second, usage="0,0")                 # its other personal key
    assert refused.status == 422 and "User='m-budgeted'" in refused.json()["error"]["message"]
    assert "max_budget" not in user()["not_enforced"]
    team = gateway.new_team(models=["gpt-4"])                    # a team key follows its team, as in LiteLLM
    assert call(gateway, gateway.new_key(user_id="m-budgeted", team_id=team)).status == 200
