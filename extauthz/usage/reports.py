"""Usage reports: Envoy's gRPC access log (AccessLogService) streams an entry for every
counted model call once its response has ended, carrying the check's metadata (key,
team, model, deployment) and the usage Envoy read from the response (namespace
``extauthz.usage``, by envoy/usage.lua: a JSON body's top-level "usage", an event
stream's counts). Each is settled once per usage id into the token windows the check
compares with ``tpm_limit`` and, priced (usage/prices.py), into the spend counters it
compares with the budgets. The report travels after the response, off the request's path; a lost
one costs only its count (see docs/usage-limits.md).
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator, Callable, Collection, NamedTuple

import grpc

from extauthz.domain.budgets import spend_counters
from extauthz.domain.limits import inflight_sets, scope, usage_counters
from extauthz.domain.record import MemberScope, UserRecord
from extauthz.proto.envoy.service.accesslog.v3 import als_pb2
from extauthz.records.store import RecordReader, StoreUnavailable
from extauthz.telemetry.metrics import SOFT_BUDGET_CROSSINGS, SPEND, USAGE_REPORTS, TeamLabels
from extauthz.usage import prices
from extauthz.usage.counters import INFLIGHT_MAX_S, OVER, SOFT, RateCounters, Settlement
from extauthz.usage.prices import Price, TokenCounts, tokens_of

log = logging.getLogger("extauthz.usage")

SERVICE = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name
EXT_AUTHZ = "envoy.filters.http.ext_authz"
USAGE = "extauthz.usage"
ENDED = "ended"          # set by envoy/usage.lua once the response's end has passed
MAX_BATCH = 500          # reports per settlement script call (Envoy sends a few dozen at a time)
UNPRICED_LOG_S = 60.0
CLOCK_SKEW_S = 60.0      # how far replicas' clocks may differ


class Report(NamedTuple):
    usage_id: str           # set by the check on the allow (see check/enforcement.within_limits)
    key_id: str | None      # None for a JWT caller (it has no key of its own)
    team_id: str | None
    model: str
    deployment: str         # the route id: its price
    tokens: TokenCounts | None   # None: the response reported no usage
    inflight: bool = False  # it held a place in an in-flight set (max_parallel_requests)
    account: str | None = None  # a regenerated key's counters (its line's first key), when not its own
    held: bool = False      # it held an estimate of its cost and tokens when admitted
    ended: bool = True      # it ended with its usage told (or ended refused): settled at what was reported
    admitted: float | None = None  # when it was admitted: the windows and periods its holds are in
    user_id: str | None = None  # the key's owner (or the token's user): its terms in the team


def _string(fields: Any, name: str) -> str | None:
    """A string member of a metadata Struct, read in place (a Struct's JSON form costs
    more than the rest of a settlement)."""
    if name not in fields:
        return None
    value = fields[name]
    return value.string_value if value.WhichOneof("kind") == "string_value" else None


def read_entry(entry: Any) -> Report | None:
    """The usage report in one access log entry, or None when it is not an allowed model call."""
    namespaces = entry.common_properties.metadata.filter_metadata
    if EXT_AUTHZ not in namespaces:
        return None
    decision = namespaces[EXT_AUTHZ].fields
    key_id, usage_id, deployment = (_string(decision, n) for n in ("key_id", "usage_id", "deployment"))
    # Only counted calls carry a usage id. It is the check's, never the client's (Envoy keeps
    # a client's x-request-id on a trusted network: the same one on every request would be
    # settled once).
    if key_id is None or usage_id is None or deployment in (None, "admin_api"):
        return None
    usage = {}
    if USAGE in namespaces:
        usage = {name: value.number_value for name, value in namespaces[USAGE].fields.items()
                 if value.WhichOneof("kind") == "number_value"}
    reported = tokens_of({n: v for n, v in usage.items() if n != ENDED})
    # Ended: envoy/usage.lua saw the response's last byte pass (a client that went away, or
    # a reset, never gets there), with its usage, or as a refusal (providers bill none).
    status = entry.response.response_code.value if entry.response.HasField("response_code") else 0
    ended = usage.get(ENDED) == 1 and (reported is not None or not 200 <= status < 300)
    admitted = _string(decision, "admitted")
    return Report(usage_id, None if key_id.startswith("jwt:") else key_id, _string(decision, "team_id"),
                  _string(decision, "model") or "", deployment, reported,
                  _string(decision, "inflight") == "1", _string(decision, "key_account"),
                  _string(decision, "hold") == "1", ended, _seconds(admitted), _string(decision, "user_id"))


def _seconds(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def tokens(usage: dict[str, Any]) -> int | None:
    found = tokens_of(usage)
    return None if found is None else found.total


class UsageReports:
    """The AccessLogService the rendered Envoy streams its usage reports to: each report
    settled once, into the token windows (tpm_limit) and the spend counters (budgets)."""

    def __init__(self, counters: RateCounters, store: RecordReader, price: Callable[[str, str], Price | None],
                 same_model: Callable[[str], Collection[str]] = lambda model: (model,)) -> None:
        self.counters = counters
        self.store = store
        self.price = price              # (route id, model) -> price, from the running config
        self.same_model = same_model    # model -> its every name (Catalog.same_model), from the running config
        self.team_label = TeamLabels()
        self.settled = self.duplicates = self.unpriced = self.failed = 0
        self.last_warning = 0.0
        self.unpriced_logged: dict[tuple[str, str, str], float] = {}

    def add_to(self, server: grpc.aio.Server) -> None:
        handler = grpc.stream_unary_rpc_method_handler(
            self.StreamAccessLogs, request_deserializer=als_pb2.StreamAccessLogsMessage.FromString,
            response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"StreamAccessLogs": handler}),))

    async def StreamAccessLogs(self, messages: AsyncIterator[Any], context: Any) -> Any:  # noqa: N802
        async for message in messages:
            reports = []
            for entry in message.http_logs.log_entry:
                try:
                    report = read_entry(entry)
                except Exception:  # one bad entry must not end the stream of every other
                    log.exception("usage report could not be read")
                    continue
                if report is not None:
                    reports.append(report)
            for start in range(0, len(reports), MAX_BATCH):
                try:
                    await self.settle(reports[start:start + MAX_BATCH])
                except Exception:
                    log.exception("usage reports could not be settled")
        return als_pb2.StreamAccessLogsResponse()

    async def owners(self, report: Report) -> list[tuple[str, Any]]:
        """(scope, record) of the key, the team and the member in that team (one with a
        budget of its own) a report is for."""
        out: list[tuple[str, Any]] = []
        if report.key_id is not None:  # (the master key has no record)
            key = await self.store.get_key(report.key_id) if report.key_id != "master" else None
            # The counters the check took (its metadata): this key's record may be gone by now.
            out.append((scope("key", report.account or report.key_id), key))
        if report.team_id is None and report.user_id is not None and report.key_id is not None:
            user = await self.store.get_user(report.user_id)  # (a personal key's owner's budget)
            if user is not None and user.budget is not None:
                out.append((scope("user", report.user_id), user))
        if report.team_id is not None:
            team = await self.store.get_team(report.team_id)
            out.append((scope("team", report.team_id), team))
            member = team.member(report.user_id) if team is not None else None
            if member is not None and member.budget is not None:
                out.append((member.spend_scope, member))
        return out

    async def settlement(self, report: Report, now: float) -> Settlement:
        """What settling a report changes: its counters, its cost and spend counters, in the
        windows and periods it was admitted in (where its holds are)."""
        owners = await self.owners(report)
        # (in-flight sets are a key's and a team's: max_parallel_requests)
        scopes = [where for where, record in owners if not isinstance(record, (MemberScope, UserRecord))]
        # (Another replica's clock may differ a little; a time no call could have been
        # admitted at is not believed.)
        admitted = report.admitted
        at = admitted if admitted is not None and now - INFLIGHT_MAX_S - CLOCK_SKEW_S <= admitted \
            <= now + CLOCK_SKEW_S else now
        price = self.price(report.deployment, report.model)
        cost = prices.cost(price, report.tokens) if price is not None and report.tokens is not None else None
        names = self.same_model(report.model)
        spend = [c for where, record in owners
                 for c in spend_counters(where, record.budget if record is not None else None,
                                         names, at)] if cost is not None or report.held else []
        limited = [(where, record.limits if record is not None else None) for where, record in owners]
        # Ended, with or without usage: it leaves the in-flight sets either way.
        return Settlement(report.usage_id, report.tokens.total if report.tokens else 0,
                          usage_counters(limited, names, at) if report.tokens or report.held else [],
                          inflight_sets(scopes) if report.inflight else [], cost, spend, report.held,
                          report.ended)

    async def settle(self, reports: list[Report]) -> None:
        """Settle a batch of reports (one Redis script call): tokens and cost to the key's and
        team's counters, once per usage id."""
        now = time.time()
        batch, kept = [], []
        try:
            for report in reports:
                try:
                    batch.append(await self.settlement(report, now))
                    kept.append(report)
                except StoreUnavailable:
                    raise
                except Exception:  # one report that cannot be priced must not lose the batch's others
                    log.exception("usage report for model %r could not be priced", report.model)
                    self.failed += 1
                    USAGE_REPORTS.labels("failed").inc()
            reports = kept
            results = await self.counters.settle(batch)
        except StoreUnavailable as e:
            self.failed += len(reports)
            USAGE_REPORTS.labels("failed").inc(len(reports))
            now = time.monotonic()
            if now - self.last_warning >= 1.0:
                self.last_warning = now
                log.warning("%d usage reports not settled (Redis: %s); their tokens and cost are not counted",
                            len(reports), e)
            return
        outcomes: dict[str, int] = {}
        spent: dict[str, float] = {}
        for report, item, flags in zip(reports, batch, results, strict=False):
            if flags is None:
                outcome = "duplicate"
            elif item.held and not item.ended:
                outcome = "held"  # no usage told at its end: settled at least at its hold
                self.budget_notes(report, item, flags)
            elif item.cost is None:
                outcome = "unpriced"  # counted for rpm at admission already
                self.unpriced_note(report)
            else:
                outcome = "settled"
                team = self.team_label(report.team_id)
                spent[team] = spent.get(team, 0.0) + item.cost
                self.budget_notes(report, item, flags)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        self.settled += outcomes.get("settled", 0)
        self.unpriced += outcomes.get("unpriced", 0)
        self.duplicates += outcomes.get("duplicate", 0)
        for outcome, n in outcomes.items():  # per batch, not per report: a label lookup takes a lock
            USAGE_REPORTS.labels(outcome).inc(n)
        for team, amount in spent.items():
            SPEND.labels(team).inc(amount)

    def unpriced_note(self, report: Report) -> None:
        """A log line per deployment and model a minute, not one per response."""
        why = "no usage reported" if report.tokens is None else "no price for it"
        now = time.monotonic()
        key = (report.deployment, report.model, why)
        if now - self.unpriced_logged.get(key, -UNPRICED_LOG_S) < UNPRICED_LOG_S:
            return
        if len(self.unpriced_logged) >= 10_000:
            self.unpriced_logged.clear()
        self.unpriced_logged[key] = now
        log.info("unpriced responses: model %r, deployment %s: %s (logged once a minute)", report.model,
                 report.deployment, why)

    def budget_notes(self, report: Report, item: Settlement, flags: list[int]) -> None:
        for counter, flag in zip(item.spend, flags, strict=False):
            if not flag:
                continue
            # A key by its hash's prefix, as the decision log names it.
            who = f"key {(report.key_id or '')[:12]}" if counter.suffix.startswith("spend:key:") \
                else f"user {report.user_id!r}" if counter.suffix.startswith("spend:user:") \
                else f"user {report.user_id!r} in team {report.team_id!r}" if ":member:" in counter.suffix \
                else f"team {report.team_id!r}"
            which = f" for model {counter.model!r}" if counter.model else ""
            if flag == SOFT:
                SOFT_BUDGET_CROSSINGS.labels(self.team_label(report.team_id)).inc()
                log.warning("soft budget crossed: %s spent past its soft_budget of %s%s", who, counter.soft, which)
            elif flag == OVER and counter.max is not None:
                log.info("budget reached: %s is at or over its budget of %s%s; its calls are refused", who,
                         counter.max, which)
