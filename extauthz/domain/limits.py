"""The limits a key or team carries, as LiteLLM names them, and what they decide. Pure:
a record's fields come in, a ``Limits`` comes out; counters and a clock come in, the
counters to take (or the limit that refuses) come out.

Rate windows are fixed minutes of the epoch (every replica agrees on them without
talking): ``rpm_limit`` counts the requests admitted in the current minute, ``tpm_limit``
the tokens the provider reported for the responses settled in it (usage/reports.py); a
refused request is told to retry when the minute turns.
"""

from __future__ import annotations

import math
from typing import Any, Collection, NamedTuple
from urllib.parse import quote

from extauthz.domain.deny import Deny

WINDOW_S = 60
MAX_COUNT = 1_000_000_000  # more is a typo (and no window holds it)


class Limits(NamedTuple):
    rpm: int | None = None
    # A model's name (covering its other names: Catalog.same_model) -> requests per minute
    model_rpm: tuple[tuple[str, int], ...] = ()
    tpm: int | None = None
    model_tpm: tuple[tuple[str, int], ...] = ()   # the same, tokens per minute
    parallel: int | None = None                   # requests in flight at once

    @property
    def rate_limited(self) -> bool:
        return self.rpm is not None or bool(self.model_rpm) or self.tpm is not None or bool(self.model_tpm) \
            or self.parallel is not None


# A stored limit that does not read as one refuses every request (rpm 0), rather than
# lifting the limit an admin meant to set.
UNREADABLE = Limits(rpm=0)


def count(value: Any, name: str) -> int | None:
    """A non-negative whole number, or None (no limit); ValueError for anything else."""
    if value is None:
        return None
    # Compared before any conversion: a huge integer (10**400) overflows a float.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_COUNT \
            or isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise ValueError(f"'{name}' must be a whole number from 0 to {MAX_COUNT}, got {str(value)[:40]}")
    return int(value)


def per_model(value: Any, name: str) -> tuple[tuple[str, int], ...]:
    if value in (None, {}):
        return ()
    if not isinstance(value, dict) or not all(isinstance(m, str) and m and "*" not in m for m in value):
        raise ValueError(f"'{name}' must map model names (as requested, no patterns) to whole numbers")
    # A model given null has no limit, as in LiteLLM.
    return tuple((m, count(v, f"{name}.{m}")) for m, v in sorted(value.items()) if v is not None)  # type: ignore


def parse(doc: dict[str, Any]) -> Limits | None:
    """The enforced limits of a key or team document; None when it sets none (most do)."""
    found = Limits(count(doc.get("rpm_limit"), "rpm_limit"), per_model(doc.get("model_rpm_limit"), "model_rpm_limit"),
                   count(doc.get("tpm_limit"), "tpm_limit"), per_model(doc.get("model_tpm_limit"), "model_tpm_limit"),
                   count(doc.get("max_parallel_requests"), "max_parallel_requests"))
    return found if found.rate_limited else None


def read(doc: dict[str, Any]) -> Limits | None:
    """As ``parse``, for the check path: a stored value that does not read fails closed."""
    try:
        return parse(doc)
    except (ValueError, TypeError, OverflowError):
        return UNREADABLE


class Counter(NamedTuple):
    """One counter a request is checked against: where it lives (after the prefix), its
    limit, and what admitting the request takes of it."""

    suffix: str
    limit: float
    name: str       # the LiteLLM field, for the message and the decision log
    owner: str      # "key 'alias'" or "team 'alias'" (a budget's: "Key='alias'", LiteLLM's form)
    take: float = 1
    # "n": requests in a window (take 1); "s": the set of requests in flight, scored by
    # deadline; "t": tokens in a window, "b": USD spent in a budget period, each taking the
    # call's estimate as a hold its settlement trues up. The estimate must fit in what is
    # left ("t": or the window be empty, so that a call larger than the whole window is
    # not refused for good: it overshoots by itself at most).
    kind: str = "n"
    expires_at: float = 0.0             # a spend counter's end of life (0: kept)
    reset_at: float | None = None       # a budget period's end, for the refusal's message
    model: str | None = None            # model_max_budget's model


HELD = frozenset("tb")  # kinds that hold an estimate until the call is settled


def scope(kind: str, ident: str) -> str:
    """A counter's scope, ``key:<hash>`` or ``team:<id>``: the id percent-encoded, so that no
    team id (one named after an IdP group, say) can spell another's counter ("a:model:b")."""
    return f"{kind}:{quote(ident, safe='')}"


def window_of(now: float) -> int:
    return int(now // WINDOW_S)


def model_names(names: str | Collection[str]) -> Collection[str]:
    """A model's names as the per-model matches take them: one name is a name, never a
    string whose every substring would match."""
    return (names,) if isinstance(names, str) else names


def rate_counters(scopes: list[tuple[str, str, Limits | None]], names: str | Collection[str], now: float,  # noqa: C901
                  tokens: int = 0) -> list[Counter]:
    """The counters a request is checked against: for each scope (its id, its label, its
    limits), its rpm and tpm limits and those for this model (``names``: every name of it,
    Catalog.same_model, so that an alias takes its model's limit), in the current minute;
    a tpm window holds ``tokens``, the call's estimate."""
    names = model_names(names)
    window = window_of(now)
    out = []
    for where, label, limits in scopes:
        if limits is None:
            continue
        for kind, whole, per_model_limits, take, how in (("rpm", limits.rpm, limits.model_rpm, 1, "n"),
                                                         ("tpm", limits.tpm, limits.model_tpm, tokens, "t")):
            if whole is not None:
                out.append(Counter(f"{kind}:{where}:{window}", whole, f"{kind}_limit", label, take, how))
            for name, limit in per_model_limits:
                if name in names:  # (the counter is the limit's: every name of the model takes it)
                    out.append(Counter(f"{kind}:{where}:model:{quote(name, safe='')}:{window}", limit,
                                       f"model_{kind}_limit", label, take, how))
        if limits.parallel is not None:
            out.append(Counter(f"inflight:{where}", limits.parallel, "max_parallel_requests", label, 1, "s"))
    return out


def inflight_sets(scopes: list[str]) -> list[str]:
    """The in-flight sets a finished request leaves (whether or not a limit put it there)."""
    return [f"inflight:{where}" for where in scopes]


def usage_counters(scopes: list[tuple[str, Limits | None]], names: str | Collection[str], now: float) -> list[str]:
    """The token counters a settled response adds to: those of the scopes with rate limits
    (the whole minute's, shown as tpm_used), and the model's where a model_tpm_limit names
    it. A scope without limits counts nothing: its every report would cost Redis writes no
    check reads."""
    names = model_names(names)
    window = window_of(now)
    out = []
    for where, limits in scopes:
        if limits is None or not limits.rate_limited:
            continue
        out.append(f"tpm:{where}:{window}")
        out += [f"tpm:{where}:model:{quote(name, safe='')}:{window}" for name, _ in limits.model_tpm if name in names]
    return out


def refusal(counter: Counter, now: float, metadata: dict[str, Any] | None) -> Deny:
    meta = dict(metadata or {}, limit=counter.name)
    if counter.kind == "s":
        return Deny(429, "rate_limit_exceeded", f"Parallel request limit reached for {counter.owner}: "
                    f"max_parallel_requests is {counter.limit}, all in flight. Retry in 1 s.", None, meta,
                    (("retry-after", "1"),))
    retry = max(1, math.ceil(WINDOW_S - now % WINDOW_S))
    which = f"{counter.name} for this model" if counter.name.startswith("model_") else counter.name
    unit = "tokens" if "tpm" in counter.name else "requests"
    return Deny(429, "rate_limit_exceeded", f"Rate limit reached for {counter.owner}: {which} is "
                f"{counter.limit} {unit} per minute. Retry in {retry} s.", None, meta,
                (("retry-after", str(retry)),))
