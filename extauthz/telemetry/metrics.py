"""Prometheus metrics.

One process: the default registry, served by the process itself. ``--workers N``: the
supervisor sets PROMETHEUS_MULTIPROC_DIR before the workers import prometheus_client,
each worker writes its values there, and the supervisor serves their sum.

Counters the hot path would otherwise touch per request (cache hits and misses) stay
plain integers in the cache and are copied here once a second.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from typing import Callable

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
SYNC_INTERVAL_S = 1.0

DECISIONS = Counter("extauthz_decisions_total", "Check decisions by outcome and reason code",
                    ["outcome", "code"])
DECISION_SECONDS = Histogram("extauthz_decision_seconds", "Time to decide one Check, lookups included",
                             buckets=LATENCY_BUCKETS)
GRPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server",
                       ["grpc_type", "grpc_service", "grpc_method", "grpc_code"])
GRPC_SECONDS = Histogram("grpc_server_handling_seconds", "RPC handling time on the server",
                         ["grpc_type", "grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS)
CACHE_EVENTS = Counter("extauthz_cache_events_total", "Record cache events",
                       ["event"])  # hit, miss, eviction, invalidation
STALE_DECISIONS = Counter("extauthz_stale_decisions_total",
                          "Lookups answered from the cache while Redis was unreachable")
REDIS_ERRORS = Counter("extauthz_redis_errors_total", "Redis lookups that failed or timed out")
REDIS_RECONNECTS = Counter("extauthz_redis_reconnects_total", "Reconnections of the invalidation channel")
REDIS_TRACKING = Gauge("extauthz_redis_tracking", "1 while invalidation tracking is established and the record "
                       "cache trusted, else 0 (lookups then go to Redis)", multiprocess_mode="min")
REDIS_TARGET = Gauge("extauthz_redis_target", "The Redis the sidecar uses (always 1): its mode and endpoint",
                     ["mode", "endpoint"], multiprocess_mode="max")
REDIS_PRIMARY = Gauge("extauthz_redis_primary", "1 for each Redis primary the invalidation channel tracks now "
                      "(a cluster's every primary, sentinel's current one); 0 for those it tracked just before",
                      ["address"], multiprocess_mode="livemax")
REDIS_UNSAFE = Gauge("extauthz_redis_unsafe_settings", "Settings of the Redis server that can lose records "
                     "(eviction, no persistence), as found at start-up", multiprocess_mode="max")
CONFIG_RELOADS = Counter("extauthz_config_reloads_total", "Config reloads", ["result"])  # ok, failed
DEPLOYMENTS = Gauge("extauthz_deployments", "Deployments in the config, by whether the gateway can route them",
                    ["routable"], multiprocess_mode="max")
PASS_THROUGH = Gauge("extauthz_pass_through_endpoints", "Pass-through endpoints in the config, by whether they "
                     "are served (one reaching a provider's model calls is not)", ["served"], multiprocess_mode="max")
TOKEN_REFRESHES = Counter("extauthz_token_refreshes_total", "Refreshes of provider OAuth tokens (Vertex, Entra)",
                          ["result"])  # ok, failed
LIMIT_DENIALS = Counter("extauthz_limit_denials_total", "Requests refused by a usage limit, by the limit and team",
                        ["limit", "team"])  # rpm_limit, tpm_limit, ...; a team id, "none" or "other"
SPEND = Counter("extauthz_spend_usd_total", "Spend settled from the providers' reported usage, in USD, by team",
                ["team"])  # a team id, "none" (keys without a team) or "other"
SOFT_BUDGET_CROSSINGS = Counter("extauthz_soft_budget_crossings_total",
                                "Settlements that took a key's or team's spend past its soft_budget", ["team"])
USAGE_REPORTS = Counter("extauthz_usage_reports_total", "Usage reports from Envoy, by what became of them",
                        ["result"])  # settled, held (ended without usage: at its hold), unpriced, duplicate, failed
# Distinct team labels a process gives a metric; later teams are counted as "other".
LIMIT_TEAM_LABELS = 100


class TeamLabels:
    """A team's label on a metric: its id for the first LIMIT_TEAM_LABELS teams a process
    labels, then "other", so a flood of team ids cannot grow the series."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, team_id: str | None) -> str:
        if team_id is None:
            return "none"
        if team_id not in self.seen:
            if len(self.seen) >= LIMIT_TEAM_LABELS:
                return "other"
            self.seen.add(team_id)
        return team_id
ADMIN_REQUESTS = Counter("extauthz_admin_requests_total", "Admin API requests", ["route", "status"])


def count_pass_through(served: int, unavailable: int) -> None:
    PASS_THROUGH.labels("true").set(served)
    PASS_THROUGH.labels("false").set(unavailable)


def count_deployments(routable: int, unavailable: int) -> None:
    DEPLOYMENTS.labels("true").set(routable)
    DEPLOYMENTS.labels("false").set(unavailable)


class CheckMetrics:
    """Per-request counts kept in plain Python and added to the Prometheus metrics once a
    second: a Prometheus increment takes a lock (and a file write with --workers), which
    would cost more than the decision itself."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.handled = GRPC_HANDLED.labels("unary", service, "Check", "OK")
        self.not_answered: dict[str, int] = {}  # grpc_code -> calls that ended without an answer
        self.handling = GRPC_SECONDS.labels("unary", service, "Check")
        self.decisions: dict[tuple[str, str], int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0
        self.team_label = TeamLabels()

    def record(self, outcome: str, code: str, seconds: float) -> None:
        key = (outcome, code)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds

    def limited(self, limit: str, team_id: str | None) -> None:
        """A limit refused a request (rare next to decisions: counted at once)."""
        LIMIT_DENIALS.labels(limit, self.team_label(team_id)).inc()

    def aborted(self, grpc_code: str) -> None:
        self.not_answered[grpc_code] = self.not_answered.get(grpc_code, 0) + 1

    def flush(self) -> None:
        decisions, buckets, seconds = self.decisions, self.buckets, self.seconds
        self.decisions, self.buckets, self.seconds = {}, [0] * len(buckets), 0.0
        not_answered, self.not_answered = self.not_answered, {}
        for code, n in not_answered.items():
            GRPC_HANDLED.labels("unary", self.service, "Check", code).inc(n)
        for (outcome, code), n in decisions.items():
            DECISIONS.labels(outcome, code).inc(n)
        self.handled.inc(sum(buckets))
        for histogram in (DECISION_SECONDS, self.handling):
            # Histogram.observe adds one observation; these are many, added bucket by bucket
            # (its internal buckets are per bound, not cumulative).
            histogram._sum.inc(seconds)
            for i, n in enumerate(buckets):
                if n:
                    histogram._buckets[i].inc(n)


async def sync_forever(read: Callable[[], dict[str, int]], flush: Callable[[], None],
                       primaries: Callable[[], list[str]] = list) -> None:
    """Copy counters kept as plain integers (``read`` gives their current totals) into
    Prometheus counters, as deltas, once a second; ``flush`` does the same for others;
    ``primaries``: the Redis primaries tracked now."""
    targets = {
        "hits": CACHE_EVENTS.labels("hit"), "misses": CACHE_EVENTS.labels("miss"),
        "evictions": CACHE_EVENTS.labels("eviction"), "invalidations": CACHE_EVENTS.labels("invalidation"),
        "stale_served": STALE_DECISIONS, "redis_errors": REDIS_ERRORS, "reconnects": REDIS_RECONNECTS,
    }
    seen: dict[str, int] = {}
    shown: set[str] = set()   # addresses with a series now
    before: set[str] = set()  # the last addresses tracked (shown at 0 once they are not)
    while True:
        flush()
        current = read()
        REDIS_TRACKING.set(1 if current.get("trusted") else 0)
        tracked = set(primaries())
        if tracked and tracked != before:
            for gone in shown - tracked - before:  # (pod addresses change: no series kept for ever)
                REDIS_PRIMARY.remove(gone)
            shown, before = tracked | before, tracked
        for address in shown:
            REDIS_PRIMARY.labels(address).set(1 if address in tracked else 0)
        for name, target in targets.items():
            delta = current.get(name, 0) - seen.get(name, 0)
            if delta > 0:
                target.inc(delta)
            seen[name] = current.get(name, 0)
        await asyncio.sleep(SYNC_INTERVAL_S)

