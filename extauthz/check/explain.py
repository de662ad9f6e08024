"""Why a decision is what it is, step by step (POST /access/explain).

The decision itself comes from the check path's own code (key_decision.KeyDecision.decide_key, with
nothing taken from the rate limits); this module only describes, from the same records
and catalog, what that code looked at: the caller, how the model name resolved, which
entry of which list admitted or refused it, which deployments serve it and with what
weights, and which limit (if any) said no. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from extauthz.check.catalog import Catalog, Resolution
from extauthz.check.decision import Allow, Reply
from extauthz.check.policy import admitting_entry
from extauthz.domain.deny import Deny
from extauthz.domain.endpoints import Endpoint
from extauthz.domain.model_names import ALL_TEAM_MODELS
from extauthz.domain.record import KeyRecord, MemberScope, Owner, TeamRecord, format_time
from extauthz.domain.wildcard import matches

Doc = dict[str, Any]
LIMIT_CODES = frozenset({"rate_limit_exceeded", "budget_exceeded", "unpriced_model", "usage_not_reported"})


def resolution_view(catalog: Catalog, model: str) -> Doc:
    """How a name resolves: an exact model group, an alias, or the most specific wildcard."""
    found = catalog.resolve(model)
    if found is None:
        return {"requested": model, "kind": "none", "why": "no model group, alias or wildcard matches it"}
    view: Doc = {"requested": model, "model_group": found.group.name,
                 "access_groups": sorted(found.group.access_groups)}
    if found.alias_of is not None:
        view.update(kind="alias", alias_of=found.alias_of)
    elif found.capture is None:
        view["kind"] = "exact"
    else:
        matching = [g.name for g in catalog.patterns if matches(g.name, model)]
        view.update(kind="wildcard", pattern=found.group.name, captured=found.capture, matching_patterns=matching,
                    why="the most specific matching pattern: the longest text before its first '*', then the "
                        "longest pattern, then the first in the config" if len(matching) > 1 else
                        "the only matching pattern")
    variant = catalog.variant_of(model)
    if variant is not None:
        view["variant_of"] = variant
    return view


def list_view(owner: str, allowed: tuple[str, ...], resolution: Resolution | None, team_decides: bool = False) -> Doc:
    """One allowed-models list and the entry that admitted the model (an alias must be
    admitted both as asked and as the group it names)."""
    view: Doc = {"list": owner, "models": list(allowed)}
    if resolution is None:
        return view
    if team_decides:
        view.update(admits=True, matched=ALL_TEAM_MODELS, why="the team's list decides")
        return view
    if not allowed:
        view.update(admits=True, matched=None, why="an empty list admits every model")
        return view
    entry = admitting_entry(allowed, resolution)
    view.update(admits=entry is not None, matched=entry)
    if resolution.alias_of is not None:
        target = admitting_entry(allowed, Resolution(resolution.alias_of, resolution.group))
        view.update(admits=entry is not None and target is not None, matched_alias_target=target)
    return view


def lists_view(key: KeyRecord, team: TeamRecord | None, owner: Owner | None,
               resolution: Resolution | None) -> list[Doc]:
    team_decides = ALL_TEAM_MODELS in key.models and team is not None
    key_models = key.models if team_decides or ALL_TEAM_MODELS not in key.models else \
        tuple(m for m in key.models if m != ALL_TEAM_MODELS)
    views = [list_view("key", key_models, resolution, team_decides)]
    if team is not None:
        views.append(list_view(f"team {team.team_id}", team.models, resolution))
    if owner is not None:
        where = f" in team {owner.team_id}" if isinstance(owner, MemberScope) else ""
        views.append(list_view(f"user {owner.user_id}{where}", owner.models, resolution))
    return views


def deployments_view(resolution: Resolution | None, endpoint: Any) -> list[Doc]:
    """The deployments that would serve the model on this endpoint, with their weights
    and the share of requests each gets."""
    if resolution is None:
        return []
    api_format = endpoint.api_format if isinstance(endpoint, Endpoint) else None
    serving = resolution.group.serving(api_format) if api_format else resolution.group.routable_deployments
    total = sum(d.weight for d in serving) or 1.0
    return [{"id": d.name, "provider": d.provider, "model": d.provider_model, "weight": d.weight,
             "share": round(d.weight / total, 4) if d in serving else 0.0,
             "routable": d.routable, **({"unavailable": d.unavailable} if d.unavailable else {})}
            for d in resolution.group.deployments]


def caller_view(key: KeyRecord, team: TeamRecord | None) -> Doc:
    view: Doc = {"key_hash": key.token_hash if not key.token_hash.startswith("team:") else None,
                 "key_alias": key.key_alias, "team_id": key.team_id, "user_id": key.user_id,
                 "blocked": key.blocked,
                 "expires": format_time(key.expires_at) if key.expires_at is not None else None}
    if key.retired_at is not None:
        view["regenerated_grace_until"] = format_time(key.retired_at)
    if team is not None:
        view["team"] = {"team_id": team.team_id, "blocked": team.blocked, "shadow": team.shadow}
    return {k: v for k, v in view.items() if v is not None}


def outcome_view(decision: Any) -> Doc:
    if isinstance(decision, Allow):
        shadowed = decision.metadata.get("shadow_deny")
        view: Doc = {"decision": "allow", "status": 200,
                     "deployment": decision.metadata.get("deployment")}
        if shadowed is not None:
            view.update(shadow_deny=shadowed, shadow_status=int(decision.metadata.get("shadow_status", 0)))
        return view
    if isinstance(decision, Deny):
        return {"decision": "deny", "status": decision.status, "code": decision.code, "message": decision.message}
    if isinstance(decision, Reply):
        return {"decision": "reply", "status": decision.status}
    return {"decision": "deny", "status": 500, "code": "internal_error"}


def explain(decision: Any, key: KeyRecord, team: TeamRecord | None, owner: Owner | None, catalog: Catalog,
            model: str, endpoint: Any) -> Doc:
    """The decision and the steps behind it."""
    resolution = catalog.resolve(model)
    outcome = outcome_view(decision)
    code = outcome.get("code") or outcome.get("shadow_deny")
    steps: list[Doc] = [{"step": "caller", **caller_view(key, team)},
                        {"step": "model", **resolution_view(catalog, model)}]
    steps += [{"step": "allowed_models", **v} for v in lists_view(key, team, owner, resolution)]
    steps.append({"step": "deployments", "serving": deployments_view(resolution, endpoint)})
    limits: Doc = {"step": "limits", "key": _limits_of(key), "team": _limits_of(team) if team else None}
    if isinstance(owner, MemberScope) and owner.budget is not None:
        limits["member"] = {"user_id": owner.user_id, **_limits_of(owner)}
    if code in LIMIT_CODES:
        limits["refused_by"] = code
    steps.append(limits)
    return {**outcome, "steps": steps}


def _limits_of(record: Any) -> Doc:
    found, budget = record.limits, record.budget
    out: Doc = {}
    if found is not None:
        out.update({k: v for k, v in (("rpm_limit", found.rpm), ("tpm_limit", found.tpm),
                                      ("max_parallel_requests", found.parallel)) if v is not None})
        if found.model_rpm:
            out["model_rpm_limit"] = dict(found.model_rpm)
        if found.model_tpm:
            out["model_tpm_limit"] = dict(found.model_tpm)
    if budget is not None:
        out["max_budget"] = budget.max
        if budget.soft is not None:
            out["soft_budget"] = budget.soft
    return out
