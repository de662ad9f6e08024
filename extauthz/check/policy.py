"""The decision, pure: request facts + key + team + catalog -> Grant or Deny.

It answers one question: may this caller use this model, and through which deployment?
What the upstream request then becomes is routing's (routing.forward). No I/O happens
here: the caller looks the records up and passes the clock and a random draw in, so
every rule is testable as a table.
"""

from __future__ import annotations

from typing import Any

from extauthz.check.catalog import Catalog, Resolution, matches
from extauthz.check.decision import Allow, Grant, Reply
from extauthz.check.facts import Facts, Problem
from extauthz.domain import route_access
from extauthz.domain.deny import Deny
from extauthz.domain.endpoints import PassThrough
from extauthz.domain.model_names import ALL_MODELS, ALL_TEAM_MODELS
from extauthz.domain.record import KeyRecord, Owner, TeamRecord

LISTED_MODELS_MAX = 50


Decision = Allow | Deny | Reply

MISSING_KEY = Problem("missing_api_key", "No API key: send it as 'Authorization: Bearer <key>'.", 401)
UNAVAILABLE = Deny(503, "authz_unavailable", "Authorization is temporarily unavailable; try again.")


def admits(allowed: tuple[str, ...], resolution: Resolution) -> bool:
    """Whether one allowed-models list admits a resolved model (empty list: every model)."""
    return not allowed or admitting_entry(allowed, resolution) is not None


def admitting_entry(allowed: tuple[str, ...], resolution: Resolution) -> str | None:
    """The first entry of a list that admits a resolved model: a special name, the name
    itself, one of its group's access groups, or a pattern; None when none does."""
    name = resolution.requested
    groups = resolution.group.access_groups
    for entry in allowed:
        if entry in ALL_MODELS or entry == name or entry in groups:
            return entry
        if "*" in entry and matches(entry, name):
            return entry
    return None


def list_admits(allowed: tuple[str, ...], resolution: Resolution) -> bool:
    """An alias must be admitted both as asked and as the model group it names, so an
    alias can never reach a model the list does not grant."""
    if resolution.alias_of is None:
        return admits(allowed, resolution)
    return admits(allowed, resolution) and admits(allowed, Resolution(resolution.alias_of, resolution.group))


def key_admits(key: KeyRecord, team: TeamRecord | None, resolution: Resolution) -> bool:
    if ALL_TEAM_MODELS not in key.models:
        return list_admits(key.models, resolution)
    if team is not None:
        return True  # the team's own list decides
    others = tuple(m for m in key.models if m != ALL_TEAM_MODELS)
    return bool(others) and list_admits(others, resolution)


def allowed_by(key: KeyRecord, team: TeamRecord | None, resolution: Resolution,
               owner: Owner | None = None) -> bool:
    return key_admits(key, team, resolution) and (team is None or list_admits(team.models, resolution)) \
        and (owner is None or list_admits(owner.models, resolution))


def visible_models(key: KeyRecord, team: TeamRecord | None, catalog: Catalog,
                   owner: Owner | None = None) -> list[str]:
    """The model names a key can call; /v1/models and deny messages both use this.
    It depends only on the lists, so it is computed once per catalog and set of lists."""
    lists = (key.models, team.models if team is not None else None, owner.models if owner is not None else None)
    return list(catalog.visible.get(lists, lambda: _visible(key, team, catalog, owner)))


def _visible(key: KeyRecord, team: TeamRecord | None, catalog: Catalog,
             owner: Owner | None) -> tuple[str, ...]:
    names = [g.name for g in catalog.groups.values() if allowed_by(key, team, Resolution(g.name, g), owner)]
    names += [a.name for a in catalog.aliases.values() if not a.hidden
              and allowed_by(key, team, Resolution(a.name, catalog.groups[a.target], alias_of=a.target), owner)]
    return tuple(names)


def authenticate(facts: Facts, key: KeyRecord | None, team: TeamRecord | None, now: float,
                 meta: dict[str, Any] | None = None) -> Deny | None:
    """The checks that depend on the key alone, before any model is looked at."""
    if facts.token is None:
        problem = facts.token_problem or MISSING_KEY
        return Deny(problem.status, problem.code, problem.message)
    if key is None or (key.retired_at is not None and key.retired_at <= now):
        # A regenerated key past its grace period is answered as a key that never was.
        return Deny(401, "invalid_api_key", "Invalid API key.")
    meta = meta if meta is not None else _metadata(facts, key)
    if key.expires_at is not None and key.expires_at <= now:
        return Deny(401, "key_expired", f"Key {key.label!r} has expired.", metadata=meta)
    if key.blocked:
        return Deny(401, "key_blocked", f"Key {key.label!r} is blocked.", metadata=meta)
    if key.team_id is not None:
        if team is None:
            return Deny(403, "team_not_found", f"The team of key {key.label!r} does not exist.", metadata=meta)
        if team.blocked:
            return Deny(401, "team_blocked", f"Team {team.label!r} is blocked.", metadata=meta)
    return None


def decide(facts: Facts, key: KeyRecord | None, team: TeamRecord | None,
           catalog: Catalog, now: float, draw: float = 0.0, owner: Owner | None = None) -> Decision:
    """``draw`` in [0, 1) picks among a model group's deployments by weight."""
    denied = authenticate(facts, key, team, now)
    if denied is not None:
        return denied
    assert key is not None
    granted = authorize(facts, key, team, catalog, draw, owner)
    return forward(granted, facts) if isinstance(granted, Grant) else granted


def route_denied(facts: Facts, key: KeyRecord) -> Deny | None:
    """A key's allowed_routes (its key_type's preset, or its own list), before any body is read."""
    if key.allowed_routes is None or route_access.permits(key.allowed_routes, facts.path, facts.endpoint):
        return None
    return Deny(403, "route_not_allowed", f"Key {key.label!r} may not call {facts.path.partition('?')[0]!r}; "
                f"its allowed_routes are {list(key.allowed_routes)}.", None, _metadata(facts, key))


def authorize(facts: Facts, key: KeyRecord, team: TeamRecord | None, catalog: Catalog,
              draw: float, owner: Owner | None = None) -> Grant | Deny:
    """The decision for a caller ``authenticate`` let through, once the body is read.
    ``owner``: the user record of a key without a team, or its owner's terms in the key's
    team (a member's allowed_models): their models narrow the key's."""
    meta = _metadata(facts, key)
    endpoint = facts.endpoint
    if endpoint is None:
        return Deny(404, "unsupported_endpoint",
                    f"{facts.path.partition('?')[0]!r} is not an LLM endpoint this gateway serves.", None, meta)
    if facts.body_problem is not None:
        return _problem(facts.body_problem, meta)
    if isinstance(endpoint, PassThrough):
        passing = catalog.pass_through[endpoint.index]
        meta["deployment"] = passing.route_id
        if passing.config.unavailable is not None:
            # (Why, with its target, is for the operator: check-config, the logs, readiness.)
            return Deny(503, "pass_through_unavailable", f"The pass-through endpoint {passing.config.path!r} is not "
                        "served: its target reaches a provider's model calls, which are checked here. Ask the "
                        "operator (extauthz check-config names it).", None, meta)
        return Grant(passing, None, meta)
    model = facts.model or ""
    resolution = catalog.resolve(model)
    served_by = catalog.variant_of(model)  # e.g. openai/O1-mini reaching openai/* past openai/o1-*
    if served_by is not None:
        return Deny(400, "invalid_model", f"{model!r} differs only in letter case or separators from a name "
                    f"served by {served_by!r}; send the model's exact name.", "model", meta)
    if resolution is None:
        return _model_denied(model, "no such model", key, team, team is not None, catalog, meta, owner)
    if not key_admits(key, team, resolution):
        return _model_denied(model, "not allowed" + served_by_note(resolution), key, team, False, catalog, meta, owner)
    if team is not None and not list_admits(team.models, resolution):
        return _model_denied(model, "not allowed" + served_by_note(resolution), key, team, True, catalog, meta)
    if owner is not None and not list_admits(owner.models, resolution):
        return _model_denied(model, f"not allowed for {owner.narrows}{served_by_note(resolution)}", key, team, False,
                             catalog, meta, owner)
    index = _pick(resolution, draw, endpoint.api_format)
    if index is None:
        reasons = sorted({d.unavailable or "" for d in resolution.group.deployments})
        return Deny(503, "deployment_unavailable", f"Model {model!r} has no deployment this gateway can route: "
                    f"{'; '.join(reasons)}.", "model", meta)
    route = catalog.routes[index]
    meta["deployment"] = route.route_id
    return Grant(route, resolution.capture, meta)


def forward(grant: Grant, facts: Facts, counted: bool = False) -> Allow | Deny:
    """Routing's step: what the upstream request becomes, or why it cannot be sent
    (a format the deployment does not read, a body that cannot carry its model).
    ``counted``: its response's usage will be read (see enforcement.counted)."""
    headers = grant.route.forward_headers(facts, grant.capture, counted)
    if isinstance(headers, Problem):
        return _problem(headers, grant.metadata)
    return Allow(grant.route, headers, grant.metadata)


def _problem(problem: Problem, meta: dict[str, Any]) -> Deny:
    return Deny(problem.status, problem.code, problem.message, problem.param, meta)


def served_by_note(resolution: Resolution) -> str:
    """What decided, when the name is served under another: the model group a pattern or an
    alias leads to, and its access groups (``openai/o1-mini`` is ``openai/o1-*``'s, not
    ``openai/*``'s), so the common refusal needs no /access/explain."""
    group = resolution.group
    if group.name == resolution.requested:
        return ""
    groups = f", access groups {sorted(group.access_groups)}" if group.access_groups else ""
    return f"; it is served by the model group {group.name!r}{groups}"


def _model_denied(model: str, why: str, key: KeyRecord, team: TeamRecord | None, by_team: bool,
                  catalog: Catalog, meta: dict[str, Any], owner: Owner | None = None) -> Deny:
    who = f"team {team.label!r}" if by_team and team is not None else f"key {key.label!r}"
    usable = visible_models(key, team, catalog, owner)
    shown = usable[:LISTED_MODELS_MAX]
    more = f" and {len(usable) - len(shown)} more" if len(usable) > len(shown) else ""
    return Deny(403, "model_not_allowed",
                f"Invalid model for {who}: {model!r} ({why}). Valid models for {who}: {shown}{more}.",
                "model", meta)


def _pick(resolution: Resolution, draw: float, api_format: str) -> int | None:
    """A routable deployment of the group that reads this request's format, by weight
    (a group may mix, say, OpenAI and Bedrock deployments); None when it has none."""
    deployments = resolution.group.serving(api_format)
    if len(deployments) <= 1:
        return deployments[0].index if deployments else None
    point = draw * sum(d.weight for d in deployments)
    for d in deployments:
        point -= d.weight
        if point < 0:
            return d.index
    return deployments[-1].index


def _metadata(facts: Facts, key: KeyRecord) -> dict[str, Any]:
    meta: dict[str, Any] = {"key_hash": key.token_hash[:12], "model": facts.model or ""}
    if key.key_alias:
        meta["key_alias"] = key.key_alias
    if key.team_id:
        meta["team_id"] = key.team_id
    if key.user_id:
        meta["user_id"] = key.user_id
    return meta
