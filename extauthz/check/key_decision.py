"""A virtual key's decision: its records (cache, then Redis), then authentication, the
decision from the body (pure), routing, and the caller's limits and budgets, or their
shadow. The JWT caller's decision (check/jwt_decision.py) ends in the same steps."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from extauthz.check import shadow as shadow_mode
from extauthz.check.decision import Allow, Grant
from extauthz.check.enforcement import LimitEnforcement, counted, hide_asked_usage
from extauthz.check.facts import Facts
from extauthz.check.policy import UNAVAILABLE, Decision, authenticate, authorize, forward, route_denied
from extauthz.check.request import with_body
from extauthz.check.runtime import Runtime
from extauthz.domain.deny import Deny
from extauthz.domain.envoy_names import USAGE_ID
from extauthz.domain.record import KeyRecord, Owner, TeamRecord
from extauthz.records.lookup import lookup
from extauthz.records.store import RecordReader, StoreUnavailable
from extauthz.telemetry.metrics import CheckMetrics
from extauthz.usage.counters import RateCounters

log = logging.getLogger("extauthz.check")

# Bodies larger than this are read on a thread of their own: the event loop goes on
# answering other checks meanwhile (the parser gives up the GIL between its steps).
INLINE_BODY_BYTES = 64 * 1024


def decide_with_body(facts: Facts, body: bytes, key: Any, team: Any, runtime: Runtime, draw: float,
                     owner: Any = None) -> tuple[Decision, Facts]:
    """The model from the body, the decision (pure), then routing: what the upstream request
    becomes; with the facts the body added."""
    facts = with_body(facts, body)
    granted = authorize(facts, key, team, runtime.catalog, draw, owner)
    return (forward(granted, facts, counted(key, team, runtime)) if isinstance(granted, Grant) else granted), facts


class KeyDecision:
    """A virtual key's decision, and the steps every caller's decision ends in (the body,
    then the limits)."""

    def __init__(self, store: RecordReader, counters: RateCounters | None, metrics: CheckMetrics) -> None:
        self.store = store
        self.last_store_warning = 0.0
        # One thread: large bodies queue for it rather than crowd the event loop out.
        self.body_reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extauthz-body")
        self.limits = LimitEnforcement(counters, metrics)

    async def decide(self, facts: Facts, body: bytes, runtime: Runtime) -> Decision:
        """The caller's records, then its decision."""
        try:
            key, team, owner = await lookup(facts.token, self.store, runtime.is_master)
        except StoreUnavailable as e:
            now = time.monotonic()
            if now - self.last_store_warning >= 1.0:  # one line a second, not one per request of an outage
                self.last_store_warning = now
                log.warning("store unavailable: %s", e)
            return UNAVAILABLE
        return await self.decide_key(facts, body, runtime, key, team, owner)

    async def decide_key(self, facts: Facts, body: bytes, runtime: Runtime, key: KeyRecord | None,
                         team: TeamRecord | None, owner: Owner | None, peek: bool = False) -> Decision:
        """A virtual key's decision, from its records (also /access/explain's, with ``peek``:
        its rate limits looked at, nothing taken)."""
        now = time.time()
        # The key first: a caller without a valid one never costs a body parse.
        denied = authenticate(facts, key, team, now) or route_denied(facts, key)  # type: ignore[arg-type]
        if denied is not None:
            return denied
        if runtime.refusal is not None:
            return runtime.refusal
        # Reading the body, and a rewrite's plan over it, on the body thread when large.
        decision, facts = await self.with_body(facts, body, key, team, runtime, owner)  # type: ignore[arg-type]
        return await self.enforced(decision, facts, key, team, runtime, peek)  # type: ignore[arg-type]

    async def enforced(self, decision: Decision, facts: Facts, key: KeyRecord, team: TeamRecord | None,
                       runtime: Runtime, peek: bool = False) -> Decision:
        """The decision within the caller's limits; in shadow mode a model or limit denial is
        recorded on an allow instead (check/shadow.py)."""
        shadow = shadow_mode.shadowed(runtime.config.settings.enforcement, team)
        if shadow and isinstance(decision, Deny) and decision.code in shadow_mode.MODEL_CODES:
            permitted = shadow_mode.as_permitted(decision, facts, key, runtime.catalog, random.random(),
                                                 counted(key, team, runtime))
            decision = permitted if permitted is not None else decision
        limited = await self.limits.within_limits(decision, facts, key, team, runtime, peek)
        if shadow and isinstance(limited, Deny) and limited.code in shadow_mode.LIMIT_CODES \
                and isinstance(decision, Allow):
            decision.metadata.pop(USAGE_ID, None)  # let through uncounted: its limit said no
            read = hide_asked_usage(decision, facts) if counted(key, team, runtime) else decision
            return shadow_mode.mark(read, limited)
        return limited

    async def with_body(self, facts: Facts, body: bytes, key: KeyRecord, team: TeamRecord | None,
                        runtime: Runtime, owner: Owner | None = None) -> tuple[Decision, Facts]:
        if len(body) <= INLINE_BODY_BYTES:
            return decide_with_body(facts, body, key, team, runtime, random.random(), owner)
        return await asyncio.get_running_loop().run_in_executor(
            self.body_reader, decide_with_body, facts, body, key, team, runtime, random.random(), owner)

    def close(self) -> None:
        self.body_reader.shutdown(wait=False, cancel_futures=True)
