"""Budgets in USD, as LiteLLM names them: ``max_budget``, ``soft_budget``,
``budget_duration`` and ``model_max_budget`` on keys and teams. Pure: a record's fields
come in, a ``Budget`` comes out; a budget, the spend read with its record and a clock come
in, the refusal (or nothing) comes out.

Spend lives in Redis counters (``<p>spend:<scope>[:model:<m>][:<period>:<n>]``), one per
budget period. Periods are fixed and shared by every replica without talking, as LiteLLM
standardises its resets: ``Ns``/``Nm``/``Nh``/``Nd``/``Nw`` are multiples of their length
since the epoch (``1d`` resets at midnight UTC, ``1h`` on the hour), ``Nmo`` calendar months
in UTC (``1mo`` on the first of the month). A new period reads a counter that does not
exist yet: spend starts again at zero, with nothing to reset and nothing to reset twice.

A call is admitted against its spend counters in Redis, atomically with its rate windows
(usage/counters.py): it holds its estimate (usage/estimate.py) there until its usage
report settles it, so calls in flight at once cannot together spend past the budget by
more than one call's worth. Nothing is cached: every replica reads the same counters.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any, Collection, NamedTuple
from urllib.parse import quote

from extauthz.domain.deny import Deny
from extauthz.domain.limits import Counter, model_names

DURATION = re.compile(r"([0-9]{1,6})(s|m|h|d|w|mo)")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_PERIOD_S = 36500 * 86400       # 100 years
MAX_USD = 1e12                     # more is a typo
SPEND_GRACE_S = 3600               # a period's counter outlives it by this (a late report, /key/info)


class Period(NamedTuple):
    """A budget period: ``seconds`` long, or ``months`` calendar months (then seconds is 0)."""

    seconds: int
    months: int = 0

    @property
    def tag(self) -> str:
        return f"{self.months}mo" if self.months else f"{self.seconds}s"


def period(text: Any, name: str = "budget_duration") -> Period | None:
    """A LiteLLM duration (``30s``, ``1h``, ``1d``, ``1mo``), None for none; ValueError otherwise."""
    if text is None:
        return None
    m = DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    count = int(m.group(1)) if m else 0
    if not m or count == 0:
        raise ValueError(f"'{name}' must look like 30s, 5m, 1h, 1d, 2w or 1mo (longer than zero), got {text!r}")
    if m.group(2) == "mo":
        if count > 1200:
            raise ValueError(f"'{name}' must be at most 1200mo (100 years), got {text!r}")
        return Period(0, count)
    seconds = count * UNIT_SECONDS[m.group(2)]
    if seconds > MAX_PERIOD_S:
        raise ValueError(f"'{name}' must be at most 36500d (100 years), got {text!r}")
    return Period(seconds)


def bounds(which: Period, now: float) -> tuple[int, float]:
    """The current period's number and the time it ends (the ``budget_reset_at``)."""
    if which.months:
        stamp = datetime.fromtimestamp(now, timezone.utc)
        index = (stamp.year * 12 + stamp.month - 1) // which.months
        year, month0 = divmod((index + 1) * which.months, 12)
        end = datetime(year, month0 + 1, 1, tzinfo=timezone.utc).timestamp() if year <= 9999 else float("inf")
        return index, end
    index = int(now // which.seconds)
    return index, float((index + 1) * which.seconds)


def usd(value: Any, name: str) -> float | None:
    """A non-negative amount in USD, or None (no budget); ValueError for anything else."""
    if value is None:
        return None
    # Compared before any conversion: a huge integer (10**400) overflows a float.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_USD \
            or isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"'{name}' must be an amount in USD from 0 to {MAX_USD:g}, got {str(value)[:40]}")
    return float(value)


class ModelBudget(NamedTuple):
    model: str              # a model's name (it covers the model's other names: Catalog.same_model)
    max: float
    period: Period | None   # its own time_period, else the record's budget_duration


class Budget(NamedTuple):
    max: float | None = None
    soft: float | None = None
    period: Period | None = None          # None: spend is never reset
    models: tuple[ModelBudget, ...] = ()

    @property
    def enforced(self) -> bool:
        """Whether the check compares spend with it (a soft budget only warns)."""
        return self.max is not None or bool(self.models)


UNREADABLE = Budget(max=0.0)  # a stored budget that does not read refuses, rather than lifts


def binding(budget: Budget | None) -> bool:
    """Whether a record's budget refuses calls (one with only a period or a soft budget
    counts spend and refuses nothing)."""
    return budget is not None and budget.enforced


def model_budgets(value: Any, whole: Period | None) -> tuple[ModelBudget, ...]:
    """``model_max_budget``: ``{"gpt-4o": 10}`` (over the record's budget_duration), or
    LiteLLM's ``{"gpt-4o": {"budget_limit": 10, "time_period": "1d"}}``."""
    if value in (None, {}):
        return ()
    if not isinstance(value, dict) or not all(isinstance(m, str) and m and "*" not in m for m in value):
        raise ValueError("'model_max_budget' must map model names (as requested, no patterns) to budgets")
    out = []
    for model, spec in sorted(value.items()):
        where = f"model_max_budget.{model}"
        if isinstance(spec, dict):
            unknown = set(spec) - {"budget_limit", "max_budget", "time_period", "budget_duration"}
            if unknown:
                raise ValueError(f"'{where}' has unknown field(s) {sorted(unknown)}")
            limit = usd(spec.get("budget_limit", spec.get("max_budget")), f"{where}.budget_limit")
            if limit is None:  # {"gpt-4o": {}} would read as a budget and be none
                raise ValueError(f"'{where}' needs a budget_limit (null for the model: no budget)")
            own = period(spec.get("time_period", spec.get("budget_duration")), f"{where}.time_period")
        else:
            limit, own = usd(spec, where), None
        if limit is not None:
            out.append(ModelBudget(model, limit, own or whole))
    return tuple(out)


def parse(doc: dict[str, Any]) -> Budget | None:
    """The budget of a key or team document; None when it sets none (most do)."""
    whole = period(doc.get("budget_duration"))
    found = Budget(usd(doc.get("max_budget"), "max_budget"), usd(doc.get("soft_budget"), "soft_budget"), whole,
                   model_budgets(doc.get("model_max_budget"), whole))
    return found if found != Budget() else None


def read(doc: dict[str, Any]) -> Budget | None:
    """As ``parse``, for the check path: a stored value that does not read fails closed."""
    try:
        return parse(doc)
    except (ValueError, TypeError, OverflowError):
        return UNREADABLE


class SpendCounter(NamedTuple):
    """One spend counter a settled response adds to, and the budgets it is compared with."""

    suffix: str
    max: float | None
    soft: float | None
    model: str | None               # None: the whole budget
    expires_at: float | None        # None: kept (spend never reset)
    reset_at: float | None = None   # the end of its period


def _counter(base: str, which: Period | None, now: float) -> tuple[str, float | None, float | None]:
    if which is None:
        return base, None, None
    index, end = bounds(which, now)
    return f"{base}:{which.tag}:{index}", end + SPEND_GRACE_S, end


def spend_counters(where: str, budget: Budget | None, names: str | Collection[str] | None,
                   now: float) -> list[SpendCounter]:
    """The counters of a scope (``key:<hash>``, ``team:<id>``) in the current period: its
    whole spend, and that of the model named by ``names`` (every name of it: an alias
    spends its model's budget) when it has a budget of its own (every model's when
    ``names`` is None: what a record is read with)."""
    budget = budget or Budget()
    names = model_names(names) if names is not None else None
    suffix, expires, end = _counter(f"spend:{where}", budget.period, now)
    out = [SpendCounter(suffix, budget.max, budget.soft, None, expires, end)]
    for each in budget.models:
        if names is None or each.model in names:
            suffix, expires, end = _counter(f"spend:{where}:model:{quote(each.model, safe='')}", each.period, now)
            out.append(SpendCounter(suffix, each.max, None, each.model, expires, end))
    return out


def admission_counters(where: str, owner: str, budget: Budget | None, names: str | Collection[str], now: float,
                       cost: float) -> list[Counter]:
    """The spend counters a call to the model ``names`` names is admitted against (those with a max), each
    to hold ``cost``, the call's estimate, which must fit in what is left: ``spend + held +
    cost > max_budget`` refuses, and ``spend >= max_budget`` does even for a free call (a
    budget of 0 refuses at once, as in LiteLLM)."""
    if not binding(budget):
        return []
    return [Counter(c.suffix, c.max, "model_max_budget" if c.model else "max_budget", owner, cost, "b",
                    c.expires_at or 0.0, c.reset_at, c.model)
            for c in spend_counters(where, budget, names, now) if c.max is not None]


def money(value: float) -> str:
    return f"{value:.10g}"


# LiteLLM's status for budget_exceeded (litellm.budget_exceeded_status_code since 1.108;
# litellm_settings.budget_exceeded_status_code sets it, as in LiteLLM).
BUDGET_EXCEEDED_STATUS = 422


def refusal(counter: Counter, spend: float, metadata: dict[str, Any] | None,
            status: int = BUDGET_EXCEEDED_STATUS) -> Deny:
    """LiteLLM's budget_exceeded. ``spend`` counts the holds of the calls in flight; the
    refusal of an estimate that does not fit in what is left names the estimate too, as
    LiteLLM's fail_closed_budget_enforcement does, and how to make it smaller."""
    meta = dict(metadata or {}, limit=counter.name)
    which = f" for model {counter.model!r}" if counter.model else ""
    resets = f" It resets at {datetime.fromtimestamp(counter.reset_at, timezone.utc).isoformat()}." \
        if counter.reset_at is not None and counter.reset_at != float("inf") else ""
    estimated, hint = "", ""
    if spend < counter.limit:
        estimated = f"Estimated request cost: {money(counter.take)}, "
        hint = (" The estimate is what the call may cost at most (its prompt, and its max_tokens or the model's "
                "output limit): a lower max_tokens makes it smaller.")
    return Deny(status, "budget_exceeded", f"Budget has been exceeded{which}! {counter.owner} Current cost: "
                f"{money(spend)}, {estimated}Max budget: {money(counter.limit)}.{resets}{hint}", None, meta, (),
                "budget_exceeded")
