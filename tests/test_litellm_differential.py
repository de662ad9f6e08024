"""LiteLLM's answers against this gateway's, case by case: the same records made on both
sides (the same fields, the same raw key), the same request asked of both, and the HTTP
status a client gets from each compared.

The oracle (tests/litellm_oracle.py) is LiteLLM 1.110.2's own proxy code, run in this
process with its database replaced by in-memory tables:

- runs: ``user_api_key_auth`` whole (the builder, ``validate_resolved_virtual_key``, the
  key, team, user and team-membership loaders, ``common_checks`` with its model, budget
  and route checks, budget reservation, and its exception handler); for a chat completion
  it admits, the v3 rate limiter's ``async_pre_call_hook`` and ``route_request`` on a
  ``litellm.Router`` of examples/config.yaml's deployments, each given a ``mock_response``
  (no network), a failure made the client's answer by ``handle_llm_api_exception``; for a
  read route it admits, its handler (``info_key_fn``, ``list_team``, ``model_list``; an
  escaping error answered by the app's unhandled-exception handler). Records are built by
  LiteLLM's own request and table models (``_effective_key_for_generate`` of a
  ``GenerateKeyRequest``, ``NewTeamRequest`` into ``LiteLLM_TeamTable``,
  ``LiteLLM_UserTable``, ``LiteLLM_TeamMembership`` with a ``LiteLLM_BudgetTable``).
- stubbed: the database (``prisma_client`` answers ``get_data("combined_view")`` and
  ``db.<table>.find_*`` from dicts; LiteLLM caches what it reads in its own
  ``UserApiKeyCache``); spend, set on the rows as its spend tracking writes it; and the
  handlers of admin writes (``/team/new``, ``/key/generate``), not run: a request
  LiteLLM's auth admits there counts as 200. proxy_server's globals (``master_key``,
  ``prisma_client``, ``user_api_key_cache``, ``llm_router``, ``llm_model_list``,
  ``general_settings``) are set for this module and restored after it.

The gateway side is the session's Envoy, sidecar and Redis (the ``gateway`` fixture),
records made through its admin API, spend settled by real calls (``x-fake-usage``).

A case agrees, or is tagged with the row of docs/migrating-from-litellm.md's "Deliberate
differences" it exercises and asserts both answers (so it fails when either side
changes), or, for a difference that document does not list, is an
``xfail(strict=True)`` whose reason starts with UNDOCUMENTED and names LiteLLM's line
that decides it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.conftest import Gateway
from tests.harness import EXAMPLE_CONFIG, MASTER_KEY, ROOT, http
from tests.litellm_oracle import Oracle
from tests.test_budgets import COST, spend_of
from tests.test_budgets import call as spending_call
from tests.test_usage import wait_for


@pytest.fixture(scope="module")
def oracle() -> Iterator[Oracle]:
    lite = Oracle(yaml.safe_load(EXAMPLE_CONFIG.read_text())["model_list"], MASTER_KEY)
    try:
        yield lite
    finally:
        lite.close()


@dataclass
class Both:
    """Records made alike on the gateway and in LiteLLM's tables; requests asked of both."""

    gateway: Gateway
    oracle: Oracle

    @staticmethod
    def name(what: str) -> str:
        return f"dx-{what}-{secrets.token_hex(4)}"

    def key(self, **fields: Any) -> str:
        raw = self.gateway.new_key(**fields)
        expires = fields.pop("expires", None)   # LiteLLM's /key/generate takes a duration: set on its row
        self.oracle.key(raw, expires=expires, **fields)
        return raw

    def team(self, **fields: Any) -> str:
        team_id = self.name("team")
        self.gateway.new_team(team_id=team_id, **fields)
        self.oracle.team(team_id, **fields)
        return team_id

    def user(self, **fields: Any) -> str:
        user_id = self.name("user")
        made = self.gateway.admin("/user/new", {"user_id": user_id, "auto_create_key": False, **fields})
        assert made.status == 200, made.text
        self.oracle.user(user_id, **fields)
        return user_id

    def member(self, team_id: str, user_id: str, role: str = "user", **terms: Any) -> None:
        added = self.gateway.admin("/team/member_add", {"team_id": team_id, "member": {"user_id": user_id,
                                                                                        "role": role}, **terms})
        assert added.status == 200, added.text
        self.oracle.member(team_id, user_id, role, **terms)

    def spend(self, key: str, team_id: str | None = None, member: str | None = None) -> None:
        """One gpt-4 call costing COST, settled on the gateway (the key's spend, and its
        team's and the member's when given); the same spend on LiteLLM's rows."""
        assert spending_call(self.gateway, key).status == 200
        wait_for(lambda: spend_of(self.gateway, key) == pytest.approx(COST), "the key's spend settled")
        if team_id is not None:
            team = lambda: self.gateway.admin(f"/team/info?team_id={team_id}", method="GET").json()
            wait_for(lambda: team()["team_info"]["spend"] == pytest.approx(COST), "the team's spend settled")
            if member is not None:
                wait_for(lambda: [m["spend"] for m in team()["team_memberships"] if m["user_id"] == member]
                         == [pytest.approx(COST)], "the member's spend settled")
        self.oracle.settle(key, COST)

    def ask(self, method: str, path: str, key: str | None, body: Any = None) -> tuple[int, int]:
        """(the gateway's status, LiteLLM's)."""
        here = http(method, self.gateway.envoy.url + path, body,
                    {"Authorization": f"Bearer {key}"} if key else {}).status
        return here, self.oracle.answer(method, path, key, body)

    def chat(self, key: str | None, model: str) -> tuple[int, int]:
        return self.ask("POST", "/v1/chat/completions", key,
                        {"model": model, "messages": [{"role": "user", "content": "Hello"}]})


@pytest.fixture(scope="module")
def both(gateway: Gateway, oracle: Oracle) -> Both:
    return Both(gateway, oracle)


# -- cases --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Deviation:
    """A row of docs/migrating-from-litellm.md's "Deliberate differences" (its topic, as
    written there), and what each side answers for it."""

    topic: str
    litellm: int
    here: int


@dataclass(frozen=True)
class Undocumented:
    """A difference the migration guide does not list: the answers found, and why."""

    litellm: int
    here: int
    reason: str


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Both], tuple[int, int]]
    expect: Deviation | Undocumented | None = None


CASES: list[Case] = []


def case(expect: Deviation | Undocumented | None = None) -> Callable:
    def register(run: Callable[[Both], tuple[int, int]]) -> Callable:
        CASES.append(Case(run.__name__, run, expect))
        return run
    return register


# budgets: keys

@case()
def key_budget_unspent(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["gpt-4"], max_budget=10), "gpt-4")


@case()
def key_budget_of_zero(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["gpt-4"], max_budget=0), "gpt-4")


@case()
def key_budget_spent(b: Both) -> tuple[int, int]:
    key = b.key(models=["gpt-4"], max_budget=0.05)
    b.spend(key)
    return b.chat(key, "gpt-4")


@case()
def key_budget_partly_spent(b: Both) -> tuple[int, int]:
    key = b.key(models=["gpt-4"], max_budget=5)
    b.spend(key)
    return b.chat(key, "gpt-4")


# budgets: teams

@case()
def team_budget_unspent(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4"], max_budget=10)), "gpt-4")


@case(Deviation("a team at its budget", litellm=200, here=422))
def team_budget_of_zero(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4"], max_budget=0)), "gpt-4")


@case()
def team_budget_spent(b: Both) -> tuple[int, int]:
    team = b.team(models=["gpt-4"], max_budget=0.05)
    b.spend(b.key(team_id=team), team)
    return b.chat(b.key(team_id=team), "gpt-4")        # another key of the team


@case()
def team_budget_partly_spent(b: Both) -> tuple[int, int]:
    team = b.team(models=["gpt-4"], max_budget=5)
    key = b.key(team_id=team)
    b.spend(key, team)
    return b.chat(key, "gpt-4")


@case()
def team_key_budget_spent_in_a_team_with_budget_left(b: Both) -> tuple[int, int]:
    team = b.team(models=["gpt-4"], max_budget=5)
    key = b.key(team_id=team, max_budget=0.05)
    b.spend(key, team)
    return b.chat(key, "gpt-4")


# blocked, expired

@case()
def blocked_key(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["gpt-4"], blocked=True), "gpt-4")


@case()
def blocked_team(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4"], blocked=True)), "gpt-4")


@case()
def expired_key_asking_for_its_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["gpt-4"], expires="2020-01-01T00:00:00Z"), "gpt-4")


@case(Deviation("an expired key asking for a forbidden model", litellm=403, here=401))
def expired_key_asking_for_a_forbidden_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["gpt-4"], expires="2020-01-01T00:00:00Z"), "gpt-4o")


# a key's models, a team's

@case()
def key_models_allow(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["gpt-4"]), "gpt-4")


@case()
def key_models_refuse(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["gpt-4"]), "gpt-4o")


@case()
def key_models_and_an_unknown_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["gpt-4"]), "no-such-model")


@case(Deviation("a model no deployment serves, for a key of every model", litellm=400, here=403))
def key_of_every_model_and_an_unknown_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(), "no-such-model")


@case()
def key_of_every_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(), "azure-gpt-3.5")


@case()
def team_models_allow(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4"])), "gpt-4")


@case()
def team_models_refuse(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4"])), "gpt-4o")


@case()
def team_models_and_an_unknown_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4"])), "no-such-model")


@case()
def key_models_narrow_its_teams(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4", "gpt-4o"]), models=["gpt-4"]), "gpt-4o")


@case()
def key_models_within_its_teams(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4", "gpt-4o"]), models=["gpt-4"]), "gpt-4")


@case()
def team_without_models(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team()), "gpt-4o")


@case()
def key_of_all_team_models_within_its_team(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4"]), models=["all-team-models"]), "gpt-4")


@case()
def key_of_all_team_models_outside_its_team(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4"]), models=["all-team-models"]), "gpt-4o")


@case()
def master_key_calls_a_model(b: Both) -> tuple[int, int]:
    return b.chat(MASTER_KEY, "gpt-4o")


@case()
def unknown_key(b: Both) -> tuple[int, int]:
    return b.chat("sk-" + secrets.token_urlsafe(16), "gpt-4")


@case()
def no_key(b: Both) -> tuple[int, int]:
    return b.chat(None, "gpt-4")


# access groups

@case()
def key_access_group_allows_its_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["beta-models"]), "gpt-4")


@case()
def key_access_group_allows_its_other_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["beta-models"]), "fireworks-llama-v3-70b-instruct")


@case()
def key_access_group_refuses_a_model_outside_it(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["beta-models"]), "gpt-4o")


@case()
def team_access_group_allows_its_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["beta-models"])), "gpt-4")


@case()
def team_access_group_refuses_a_model_outside_it(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["beta-models"])), "gpt-4o")


@case()
def key_access_group_of_a_wildcard_deployment(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["restricted-models"]), "openai/o1-mini")


@case()
def key_access_group_of_a_wildcard_deployment_refuses_another(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["restricted-models"]), "openai/gpt-4o-mini")


# wildcards

@case()
def key_wildcard_allows_a_model_under_it(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["openai/*"]), "openai/gpt-4o-mini")


@case()
def key_wildcard_refuses_another_provider(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["openai/*"]), "anthropic/claude-3-haiku")


@case(Deviation("a pattern and a bare name (`openai/*` asked for `gpt-4`)", litellm=200, here=403))
def key_wildcard_and_a_model_name_without_provider(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["openai/*"]), "gpt-4")


@case()
def team_wildcard_allows_a_model_under_it(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["openai/*"])), "openai/gpt-4o-mini")


@case()
def key_of_every_model_and_a_wildcard_deployment(b: Both) -> tuple[int, int]:
    return b.chat(b.key(), "openai/gpt-4o-mini")


# key_type and allowed_routes

@case()
def llm_api_key_calls_a_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(key_type="llm_api"), "gpt-4")


@case()
def llm_api_key_on_a_management_route(b: Both) -> tuple[int, int]:
    return b.ask("GET", "/key/list", b.key(key_type="llm_api"))


@case()
def read_only_key_calls_a_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(key_type="read_only"), "gpt-4")


@case()
def read_only_key_lists_models(b: Both) -> tuple[int, int]:
    return b.ask("GET", "/v1/models", b.key(key_type="read_only"))


@case()
def management_key_calls_a_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(key_type="management"), "gpt-4")


@case()
def key_allowed_only_embeddings_calls_chat(b: Both) -> tuple[int, int]:
    return b.chat(b.key(allowed_routes=["/v1/embeddings"]), "gpt-4")


# a user's models on its personal keys

@case()
def user_models_allow_a_personal_key(b: Both) -> tuple[int, int]:
    return b.chat(b.key(user_id=b.user(models=["gpt-4"])), "gpt-4")


@case()
def user_models_narrow_a_personal_key(b: Both) -> tuple[int, int]:
    return b.chat(b.key(user_id=b.user(models=["gpt-4"])), "gpt-4o")


@case()
def user_without_models_and_a_personal_key(b: Both) -> tuple[int, int]:
    return b.chat(b.key(user_id=b.user()), "gpt-4o")


@case()
def user_models_do_not_narrow_a_team_key(b: Both) -> tuple[int, int]:
    user = b.user(models=["gpt-4"])
    team = b.team(models=["gpt-4o"])
    b.member(team, user)
    return b.chat(b.key(team_id=team, user_id=user), "gpt-4o")


# team members' own terms

@case()
def member_allowed_models_narrow_its_team_key(b: Both) -> tuple[int, int]:
    team = b.team(models=["gpt-4", "gpt-4o"])
    user = b.user()
    b.member(team, user, allowed_models=["gpt-4"])
    return b.chat(b.key(team_id=team, user_id=user), "gpt-4o")


@case()
def member_allowed_models_allow(b: Both) -> tuple[int, int]:
    team = b.team(models=["gpt-4", "gpt-4o"])
    user = b.user()
    b.member(team, user, allowed_models=["gpt-4"])
    return b.chat(b.key(team_id=team, user_id=user), "gpt-4")


@case()
def member_without_terms_has_the_teams_models(b: Both) -> tuple[int, int]:
    team = b.team(models=["gpt-4", "gpt-4o"])
    user = b.user()
    b.member(team, user)
    return b.chat(b.key(team_id=team, user_id=user), "gpt-4o")


@case()
def member_budget_in_team_spent(b: Both) -> tuple[int, int]:
    team = b.team(models=["gpt-4"])
    user = b.user()
    b.member(team, user, max_budget_in_team=0.05)
    key = b.key(team_id=team, user_id=user)
    b.spend(key, team, user)
    return b.chat(key, "gpt-4")


@case()
def member_budget_in_team_partly_spent(b: Both) -> tuple[int, int]:
    team = b.team(models=["gpt-4"])
    user = b.user()
    b.member(team, user, max_budget_in_team=5)
    key = b.key(team_id=team, user_id=user)
    b.spend(key, team, user)
    return b.chat(key, "gpt-4")


@case()
def member_budget_in_team_of_zero(b: Both) -> tuple[int, int]:
    team = b.team(models=["gpt-4"])
    user = b.user()
    b.member(team, user, max_budget_in_team=0)
    return b.chat(b.key(team_id=team, user_id=user), "gpt-4")


# a user's own budget

@case()
def user_budget_of_zero_on_a_personal_key(b: Both) -> tuple[int, int]:
    return b.chat(b.key(user_id=b.user(max_budget=0)), "gpt-4")


@case()
def user_budget_left_on_a_personal_key(b: Both) -> tuple[int, int]:
    return b.chat(b.key(user_id=b.user(max_budget=10)), "gpt-4")


@case()
def user_budget_of_zero_on_a_team_key(b: Both) -> tuple[int, int]:
    # LiteLLM applies a user's budget to its team keys only with apply_user_budget_to_team_keys.
    return b.chat(b.key(user_id=b.user(max_budget=0), team_id=b.team(models=["gpt-4"])), "gpt-4")


# rate limits

@case()
def key_max_parallel_requests_of_zero(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["gpt-4"], max_parallel_requests=0), "gpt-4")


@case(Deviation("a team's `max_parallel_requests`", litellm=200, here=429))
def team_max_parallel_requests_of_zero(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4"], max_parallel_requests=0)), "gpt-4")


@case()
def key_rpm_limit_of_zero(b: Both) -> tuple[int, int]:
    return b.chat(b.key(models=["gpt-4"], rpm_limit=0), "gpt-4")


@case()
def team_model_rpm_limit_of_zero(b: Both) -> tuple[int, int]:
    return b.chat(b.key(team_id=b.team(models=["gpt-4"], model_rpm_limit={"gpt-4": 0})), "gpt-4")


@case(Deviation("a team's `model_rpm_limit` beside a key's", litellm=200, here=429))
def team_model_rpm_limit_beside_a_keys(b: Both) -> tuple[int, int]:
    team = b.team(models=["gpt-4"], model_rpm_limit={"gpt-4": 0})
    return b.chat(b.key(team_id=team, model_rpm_limit={"gpt-4": 5}), "gpt-4")


# admin rights

@case()
def internal_user_key_makes_a_team(b: Both) -> tuple[int, int]:
    return b.ask("POST", "/team/new", b.key(user_id=b.user(user_role="internal_user")), {"team_alias": "x"})


@case()
def proxy_admin_key_with_models_asks_for_another(b: Both) -> tuple[int, int]:
    return b.chat(b.key(user_id=b.user(user_role="proxy_admin"), models=["gpt-4"]), "gpt-4o")


@case()
def blocked_proxy_admin_key_on_an_admin_route(b: Both) -> tuple[int, int]:
    return b.ask("GET", "/team/list", b.key(user_id=b.user(user_role="proxy_admin"), blocked=True))


@case()
def internal_user_viewer_key_makes_a_team(b: Both) -> tuple[int, int]:
    return b.ask("POST", "/team/new", b.key(user_id=b.user(user_role="internal_user_viewer")), {"team_alias": "x"})


@case()
def internal_user_viewer_key_calls_a_model(b: Both) -> tuple[int, int]:
    return b.chat(b.key(user_id=b.user(user_role="internal_user_viewer")), "gpt-4")


@case()
def proxy_admin_key_makes_a_team(b: Both) -> tuple[int, int]:
    return b.ask("POST", "/team/new", b.key(user_id=b.user(user_role="proxy_admin")), {"team_alias": "x"})


@case()
def master_key_makes_a_team(b: Both) -> tuple[int, int]:
    return b.ask("POST", "/team/new", MASTER_KEY, {"team_alias": "x"})


@case()
def proxy_admin_viewer_key_makes_a_team(b: Both) -> tuple[int, int]:
    return b.ask("POST", "/team/new", b.key(user_id=b.user(user_role="proxy_admin_viewer")), {"team_alias": "x"})


@case()
def proxy_admin_viewer_key_makes_a_key(b: Both) -> tuple[int, int]:
    return b.ask("POST", "/key/generate", b.key(user_id=b.user(user_role="proxy_admin_viewer")), {})


@case()
def proxy_admin_viewer_key_lists_teams(b: Both) -> tuple[int, int]:
    return b.ask("GET", "/team/list", b.key(user_id=b.user(user_role="proxy_admin_viewer")))


@case()
def key_without_owner_lists_teams(b: Both) -> tuple[int, int]:
    return b.ask("GET", "/team/list", b.key())


@case(Deviation("a key's user without a record on `/team/list`", litellm=500, here=401))
def key_whose_owner_has_no_record_lists_teams(b: Both) -> tuple[int, int]:
    return b.ask("GET", "/team/list", b.key(user_id=b.name("ghost")))


@case()
def internal_user_lists_its_own_teams(b: Both) -> tuple[int, int]:
    user = b.user(user_role="internal_user")
    b.member(b.team(models=["gpt-4"]), user)
    return b.ask("GET", f"/team/list?user_id={user}", b.key(user_id=user))


@case()
def internal_user_lists_another_users_teams(b: Both) -> tuple[int, int]:
    other = b.user(user_role="internal_user")
    return b.ask("GET", f"/team/list?user_id={other}", b.key(user_id=b.user(user_role="internal_user")))


@case(Deviation("a key whose budget is spent, on `/v1/models`", litellm=200, here=422))
def key_with_a_spent_budget_lists_models(b: Both) -> tuple[int, int]:
    return b.ask("GET", "/v1/models", b.key(models=["gpt-4"], max_budget=0))


@case()
def internal_user_reads_its_own_key(b: Both) -> tuple[int, int]:
    user = b.user(user_role="internal_user")
    own, other = b.key(user_id=user), b.key(user_id=user)
    return b.ask("GET", f"/key/info?key={other}", own)


@case(Deviation("another user's key, user or team", litellm=403, here=404))
def internal_user_reads_another_users_key(b: Both) -> tuple[int, int]:
    own = b.key(user_id=b.user(user_role="internal_user"))
    other = b.key(user_id=b.user(user_role="internal_user"))
    return b.ask("GET", f"/key/info?key={other}", own)


def _param(c: Case) -> Any:
    marks = []
    if isinstance(c.expect, Undocumented):
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"UNDOCUMENTED: {c.expect.reason}")]
    return pytest.param(c, id=c.name, marks=marks)


@pytest.mark.parametrize("c", [_param(c) for c in CASES])
def test_the_gateway_answers_as_litellm_does(both: Both, c: Case) -> None:
    try:
        here, litellm = c.run(both)
    except AssertionError as e:         # a record not made: no expected failure
        pytest.fail(f"setting up {c.name} failed: {e}")
    if isinstance(c.expect, Deviation):
        assert (here, litellm) == (c.expect.here, c.expect.litellm), \
            f"{c.expect.topic!r}: documented as LiteLLM {c.expect.litellm}, here {c.expect.here}"
        return
    if isinstance(c.expect, Undocumented) and (here, litellm) != (c.expect.here, c.expect.litellm):
        pytest.fail(f"the difference found (LiteLLM {c.expect.litellm}, here {c.expect.here}) is now "
                    f"LiteLLM {litellm}, here {here}: look at this case again")
    assert here == litellm, f"here {here}, LiteLLM {litellm}"


def test_each_tagged_deviation_is_a_row_of_the_migration_guide() -> None:
    table = (ROOT / "docs" / "migrating-from-litellm.md").read_text().split("## Deliberate differences", 1)[1]
    for c in CASES:
        if isinstance(c.expect, Deviation):
            assert f"| {c.expect.topic} |" in table, c.name
