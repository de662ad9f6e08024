"""Limits and budgets at the check: an allowed call admitted within its caller's rate
windows and budgets in one Redis round trip (holding its estimate until its usage report
settles it), or refused; which calls are counted, and what a counted call's response
carries back (Envoy's usage filter, the stream usage the gateway asked for)."""

from __future__ import annotations

import secrets
import time
from typing import Collection

from extauthz.check.decision import Allow
from extauthz.check.facts import Facts
from extauthz.check.policy import UNAVAILABLE, Decision
from extauthz.check.routing import STREAMED_USAGE, Route, streams_unasked
from extauthz.check.runtime import Runtime
from extauthz.domain import budgets
from extauthz.domain.deny import Deny
from extauthz.domain.endpoints import Endpoint
from extauthz.domain.envoy_names import (
    COUNTED,
    COUNTED_IN_FLIGHT,
    USAGE_HEADER,
    USAGE_ID,
    USAGE_ID_LENGTH,
    USAGE_UNASKED,
)
from extauthz.domain.limits import Counter, rate_counters, refusal, scope
from extauthz.domain.record import KeyRecord, TeamRecord
from extauthz.records.store import StoreUnavailable
from extauthz.telemetry.metrics import CheckMetrics
from extauthz.usage.counters import RateCounters
from extauthz.usage.estimate import Estimate, estimate

# A counted allow: Envoy's usage filter runs on its response, which must come
# uncompressed (Envoy does not inflate responses; usage in a gzip body could not be read).
COUNTED_HEADERS = ((USAGE_HEADER, COUNTED), ("accept-encoding", "identity"))
COUNTED_IN_FLIGHT_HEADERS = ((USAGE_HEADER, COUNTED_IN_FLIGHT), ("accept-encoding", "identity"))
# Operations whose responses report the tokens they cost; those free of charge; any other
# (images, audio) has no price per token, so a caller with a budget cannot be counted on it.
PRICED_OPERATIONS = frozenset({"chat/completions", "completions", "embeddings", "responses", "messages",
                               "generateContent", "streamGenerateContent", "invoke", "invoke-with-response-stream",
                               "rawPredict", "streamRawPredict"})
FREE_OPERATIONS = frozenset({"messages/count_tokens", "moderations"})


def budget_counters(key: KeyRecord, team: TeamRecord | None, names: Collection[str], now: float,
                    cost: float) -> list[Counter]:
    """The budgets a call is admitted against, its key's, its owner's (a personal key's),
    its team's, then its owner's in that team (max_budget_in_team), each to hold ``cost``
    (0: only whether one is spent already), named as LiteLLM's refusal names them.
    ``names``: the model's every name (Catalog.same_model), for its model_max_budget."""
    counters = budgets.admission_counters(scope("key", key.account), f"Key={key.label!r}", key.budget, names, now,
                                          cost)
    if key.user_budget is not None and key.user_id is not None:  # (a personal key's owner's)
        counters += budgets.admission_counters(scope("user", key.user_id), f"User={key.user_id!r}",
                                               key.user_budget, names, now, cost)
    if team is not None:
        counters += budgets.admission_counters(scope("team", team.team_id), f"Team={team.label!r}", team.budget,
                                               names, now, cost)
        member = team.member(key.user_id)
        if member is not None:
            counters += budgets.admission_counters(member.spend_scope, f"User={member.user_id!r} in Team="
                                                   f"{team.label!r}", member.budget, names, now, cost)
    return counters


def budgeted(key: KeyRecord, team: TeamRecord | None) -> str | None:
    """Whose budget a call of this caller is admitted against, named (the key's, its
    owner's, its team's, or its owner's in the team), or None."""
    if budgets.binding(key.budget):
        return f"Key {key.label!r}"
    if budgets.binding(key.user_budget):
        return f"User {key.user_id!r}"
    if team is None:
        return None
    if budgets.binding(team.budget):
        return f"Team {team.label!r}"
    member = team.member(key.user_id)
    if member is not None and budgets.binding(member.budget):
        return f"User {member.user_id!r} in team {team.label!r}"
    return None


def unpriced(decision: Allow, facts: Facts, runtime: Runtime) -> str | None:
    """Why an allowed call's cost could not be counted, or None. A caller with a budget is
    refused such a call: letting it through uncounted would lift the budget."""
    endpoint = facts.endpoint
    if not isinstance(decision.route, Route) or not isinstance(endpoint, Endpoint):
        return "a pass-through path has no price"
    if endpoint.operation in FREE_OPERATIONS and (endpoint.operation != "moderations"
                                                  or decision.route.deployment.provider in ("openai", "azure")):
        return None  # (OpenAI's moderations are free; others' are not)
    if endpoint.operation not in PRICED_OPERATIONS:
        return f"{endpoint.operation!r} calls are not priced per token"
    if runtime.price(decision.route.route_id, str(decision.metadata.get("model", ""))) is None:
        return (f"its deployment ({decision.route.route_id}) has no price: set input_cost_per_token and "
                "output_cost_per_token on it")
    if endpoint.operation in STREAMED_USAGE and streams_unasked(facts.json_model) \
            and not decision.route.takes_stream_options:
        return (f"its deployment's API version ({decision.route.deployment.api_version}) does not report a "
                "stream's usage; send \"stream\": false, or use api_version 2024-09-01 or later")
    return None


def hide_asked_usage(decision: Allow, facts: Facts) -> Allow:
    """A counted stream whose usage only the gateway asked for (routing.usage_edit): Envoy's
    usage filter reads the usage, then takes out what the client did not ask for (the last
    chunk, "usage": null in the others), so the client gets the provider's stream as sent
    for its own request. The filter runs on its response even where nothing is settled (a
    shadow-mode allow past its limit, no Redis to count in)."""
    endpoint = facts.endpoint
    if isinstance(decision.route, Route) and isinstance(endpoint, Endpoint) and endpoint.operation in STREAMED_USAGE \
            and streams_unasked(facts.json_model) and decision.route.takes_stream_options:
        decision.metadata[USAGE_UNASKED] = "1"
        if all(name != USAGE_HEADER for name, _ in decision.dynamic_headers):
            return decision._replace(dynamic_headers=decision.dynamic_headers + COUNTED_HEADERS)
    return decision


def needs_reports(key: KeyRecord, team: TeamRecord | None) -> str | None:
    """The limit of a caller that only usage reports can enforce (a budget, tokens per
    minute, requests in flight), named, or None."""
    owner = budgeted(key, team)
    if owner is not None:
        return f"{owner}'s budget"
    for owner, record in ((f"Key {key.label!r}", key), (f"Team {team.label!r}" if team else "", team)):
        if record is None:
            continue
        found = record.limits
        if found is not None and (found.tpm is not None or found.model_tpm or found.parallel is not None):
            return f"{owner}'s {'max_parallel_requests' if found.parallel is not None else 'tpm_limit'}"
    return None


def counted(key: KeyRecord, team: TeamRecord | None, runtime: Runtime) -> bool:
    """Whether an allowed call's response is read for its usage: every call while spend is
    tracked (the default), else those of keys and teams with a rate limit or a budget;
    none where Envoy sends no usage reports."""
    settings = runtime.config.settings
    if not settings.usage_reports:
        return False
    return settings.spend_tracking or budgeted(key, team) is not None or any(
        r is not None and (r.budget is not None or r.limits is not None and r.limits.rate_limited)
        for r in (key, team))


class LimitEnforcement:
    """The check's limits, on the shared counters (None: no Redis to count in)."""

    def __init__(self, counters: RateCounters | None, metrics: CheckMetrics) -> None:
        self.counters = counters
        self.metrics = metrics

    async def within_limits(self, decision: Decision, facts: Facts, key: KeyRecord, team: TeamRecord | None,
                             runtime: Runtime, peek: bool = False) -> Decision:
        """An allowed request within its rate windows and budgets, in one Redis round trip
        (for callers with a limit or a budget only), or refused: a call of a caller with a
        budget or a tpm_limit holds its estimate there until its usage report settles it.
        A counted one carries the id its usage report is settled under."""
        if not isinstance(decision, Allow):
            return decision
        now = time.time()
        # (LiteLLM skips budgets for a model its config prices at zero: a self-hosted one.)
        free = isinstance(decision.route, Route) and decision.route.route_id in runtime.free_routes
        owner = None if free else budgeted(key, team)
        if owner is not None:
            why = unpriced(decision, facts, runtime)
            if why is not None:
                spent = await self.spent(decision, key, team, runtime, now, peek)
                if spent is not None:
                    return spent
                return Deny(403, "unpriced_model", f"{owner} has a budget, and this call's cost cannot be counted: "
                            f"{why}.", "model", decision.metadata)
        if not runtime.config.settings.usage_reports:
            needing = needs_reports(key, team)
            if needing is not None:
                return Deny(403, "usage_not_reported", f"{needing} needs the usage providers report, and this "
                            "gateway's Envoy does not send it (extauthz_settings.usage_reports is false), so the "
                            "limit cannot be enforced.", None, decision.metadata)
        key_limits, team_limits = key.limits, team.limits if team is not None else None
        limited = (key_limits is not None and key_limits.rate_limited) or (
            team_limits is not None and team_limits.rate_limited) or owner is not None
        track = counted(key, team, runtime)
        if not (limited or track):
            return decision
        if self.counters is None:  # (no Redis to count in: a limit is never lifted for it)
            return UNAVAILABLE if limited else hide_asked_usage(decision, facts)
        # The id its usage report will be settled under: Envoy's request id is the client's
        # own on a trusted network, and one sent on every request would settle only once.
        decision.metadata[USAGE_ID] = secrets.token_hex(USAGE_ID_LENGTH // 2)
        # The whole hash, for the usage report's counters (the logs show its prefix only).
        decision.metadata["key_id"] = key.token_hash
        if key.counter_id is not None:  # a regenerated key: its line's counters, whatever becomes of its record
            decision.metadata["key_account"] = key.counter_id
        if limited:
            refused = await self.admitted(decision, facts, key, team, runtime, now, peek, owner is not None)
            if refused is not None:
                return refused
            if decision.metadata.get("inflight") == "1":  # Envoy frees the place as the response ends
                return hide_asked_usage(decision._replace(
                    dynamic_headers=decision.dynamic_headers + COUNTED_IN_FLIGHT_HEADERS), facts)
        if not track:  # no usage reports: its rpm window was counted, nothing else
            return decision
        return hide_asked_usage(decision._replace(dynamic_headers=decision.dynamic_headers + COUNTED_HEADERS), facts)

    async def spent(self, decision: Allow, key: KeyRecord, team: TeamRecord | None, runtime: Runtime, now: float,
                    peek: bool) -> Deny | None:
        """A budget already used up refuses as budget_exceeded before any question of price
        (as LiteLLM: a spent budget is the answer whatever the model)."""
        if self.counters is None:
            return UNAVAILABLE
        counters = budget_counters(key, team, runtime.catalog.same_model(str(decision.metadata.get("model", ""))),
                                   now, 0.0)
        try:
            refused = await self.counters.peek(counters, now)
        except StoreUnavailable:
            return UNAVAILABLE
        if refused is None:
            return None
        counter, value = refused
        if not peek:
            self.metrics.limited(counter.name, team.team_id if team is not None else None)
        return budgets.refusal(counter, value, decision.metadata, runtime.config.budget_exceeded_status)

    async def admitted(self, decision: Allow, facts: Facts, key: KeyRecord, team: TeamRecord | None,
                       runtime: Runtime, now: float, peek: bool, budgeted_call: bool) -> Deny | None:
        """The call admitted against every counter of its key and team (taking a place in
        each, and holding its estimate in its token windows and, when ``budgeted_call``, its
        budgets), or the refusal."""
        assert self.counters is not None
        model = str(decision.metadata.get("model", ""))
        scopes = [(scope("key", key.account), f"key {key.label!r}", key.limits)]
        if team is not None:
            scopes.append((scope("team", team.team_id), f"team {team.label!r}", team.limits))
        holds = any(limits is not None and (limits.tpm is not None or limits.model_tpm) for _, _, limits in scopes) \
            or budgeted_call
        estimate = self.estimate(decision, facts, runtime) if holds else None
        names = runtime.catalog.same_model(model)  # (an alias takes its model's limits)
        counters = rate_counters(scopes, names, now, estimate.tokens if estimate is not None else 0)
        if budgeted_call:
            counters += budget_counters(key, team, names, now, estimate.cost or 0.0 if estimate is not None else 0.0)
        try:
            refused = await (self.counters.peek(counters, now) if peek else
                             self.counters.admit(counters, decision.metadata[USAGE_ID], now, estimate))
        except StoreUnavailable:
            return UNAVAILABLE
        if refused is not None:
            counter, value = refused
            if not peek:
                self.metrics.limited(counter.name, team.team_id if team is not None else None)
            metadata = {k: v for k, v in decision.metadata.items() if k != USAGE_ID}
            return budgets.refusal(counter, value, metadata, runtime.config.budget_exceeded_status) \
                if counter.kind == "b" else refusal(counter, now, metadata)
        if estimate is not None:  # its settlement trues up what it held, in the windows it held it in
            decision.metadata["hold"] = "1"
            decision.metadata["admitted"] = repr(now)
        if any(c.kind == "s" for c in counters):
            decision.metadata["inflight"] = "1"
        return None

    @staticmethod
    def estimate(decision: Allow, facts: Facts, runtime: Runtime) -> Estimate:
        """What the call may cost (usage/estimate.py), at its route's price."""
        route, endpoint, body, form = decision.route, facts.endpoint, facts.json_model, facts.form
        price = runtime.price(route.route_id, str(decision.metadata.get("model", ""))) \
            if isinstance(route, Route) else None
        size = len(body.body) if body is not None else form.size if form is not None else 0
        return estimate(body.doc if body is not None else None, size,
                        endpoint.operation if isinstance(endpoint, Endpoint) else None, price,
                        runtime.config.settings.default_max_output_tokens, form.counts if form is not None else ())
