"""Usage counters shared by every replica, in Redis: one Lua script per admission, so a
request is counted against all its limits at once or against none (a request refused by
its team's limit does not use up its key's). In a Redis Cluster, one script per scope's
slot: a refusal on the second gives back what the first took (see RateCounters).

Keys (``<p>`` the key prefix; in a cluster the scope is the hash tag,
``<p>rpm:{<scope>}:<minute>``: records/keyspace.py): ``<p>rpm:<scope>:<minute>`` and
``<p>rpm:<scope>:model:<model>:<minute>`` (``tpm:`` the same), where scope is
``key:<token hash>`` or ``team:<team_id>``, each expiring shortly after its minute;
``<p>inflight:<scope>`` (requests in flight); ``<p>spend:<scope>…`` (domain/budgets.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import NamedTuple, Sequence

import redis.asyncio as aioredis

from extauthz.domain.budgets import SpendCounter
from extauthz.domain.limits import HELD, WINDOW_S, Counter, window_of
from extauthz.records.keyspace import Keyspace, scope_of
from extauthz.records.store import REDIS_FAILURES, StoreUnavailable
from extauthz.usage.estimate import Estimate

log = logging.getLogger("extauthz.usage")

SOFT, OVER = 1, 2  # what a settlement did to a spend counter

# ARGV: the windows' lifetime, now, the request's usage id, its in-flight deadline, the
# hold record's lifetime (0: no record), the call's estimate (tokens, USD); then per
# counter its limit, what admitting takes, its kind (domain/limits.Counter) and when it
# expires (a spend counter's end of life, 0: kept). KEYS: the counters, then the hold
# record when there is one: what each counter held of the estimate, read back by SETTLE.
# Returns {0, ''} when every counter admitted the request (and each then takes its share),
# else {the 1-based index of the first that refused, its value} (and nothing is taken). An
# empty usage id is a peek (/access/explain): the answer, and nothing taken.
ADMIT = """
local n = #KEYS
if ARGV[5] ~= '0' then n = n - 1 end
local took = {}
for i = 1, n do
  local a = 7 + 4 * (i - 1)
  local limit, take, kind = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
  local used
  if kind == 's' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[2])
    used = redis.call('ZCARD', KEYS[i])
  else
    -- (a counter written by hand that is no number refuses, rather than lifts, its limit)
    used = tonumber(redis.call('GET', KEYS[i]) or '0') or math.huge
  end
  if used >= limit or (kind == 'b' and used + take > limit * (1 + 1e-12))
      or (kind == 't' and used > 0 and used + take > limit) then
    return {i, tostring(used)}
  end
  took[i] = take
end
if ARGV[3] == '' then return {0, ''} end
local held = {}
for i = 1, n do
  local a = 7 + 4 * (i - 1)
  local kind, take = ARGV[a + 3], took[i]
  if kind == 's' then
    redis.call('ZADD', KEYS[i], ARGV[4], ARGV[3])
    redis.call('EXPIREAT', KEYS[i], math.ceil(tonumber(ARGV[4])))
  elseif kind == 'b' then
    if take > 0 then
      redis.call('INCRBYFLOAT', KEYS[i], string.format('%.17g', take))
      if tonumber(ARGV[a + 4]) > 0 then redis.call('EXPIREAT', KEYS[i], ARGV[a + 4]) end
      held[KEYS[i]] = {take, 'b'}
    end
  elseif take > 0 then
    if redis.call('INCRBY', KEYS[i], take) == take then redis.call('EXPIRE', KEYS[i], ARGV[1]) end
    if kind == 't' then held[KEYS[i]] = {take, 't'} end
  end
end
if n < #KEYS then
  redis.call('SET', KEYS[#KEYS], cjson.encode({k = held, t = tonumber(ARGV[6]), x = tonumber(ARGV[7])}),
             'EX', ARGV[5])
end
return {0, ''}
"""
# Finished requests, a batch (one usage report message of Envoy's) at once: each leaves
# its in-flight sets (always: idempotent), then, once per usage id, adds its tokens and
# its cost. A request that held an estimate at admission (its hold record, "h") trues the
# counters it held up to what it is settled at: what the response reported when it ended
# and said ("e" 1), else at least what it held (a stream cut before its usage, a reset, a
# response without usage: never less than the hold). A counter it did not hold gets the
# same, at least the estimate when the call did not end with its usage.
# KEYS: every key the batch names. ARGV[1]: the batch, JSON: per request its usage id
# ("u"), the index of its settled mark ("m", kept 15 minutes: Envoy may resend a report
# seconds later), of its hold record ("h", when it has one), whether it ended with its
# usage ("e"), its in-flight sets ("i"), its tokens ("t") and token counters ("c"), its
# cost ("x", a decimal string; absent when unpriced) and spend counters ("s": index, when
# it expires or 0, max and soft budget or -1).
# ARGV[2], ARGV[3]: the marks' and the token windows' lifetimes.
# Returns, JSON, per request 0 when settled before, else a flag per spend counter
# (1: past its soft budget now; 2: at or over its max).
SETTLE = """
local batch = cjson.decode(ARGV[1])
local out = {}
for r = 1, #batch do
  local req = batch[r]
  for _, i in ipairs(req.i) do redis.call('ZREM', KEYS[i], req.u) end
  if not redis.call('SET', KEYS[req.m], '1', 'NX', 'EX', ARGV[2]) then
    out[r] = 0
  else
    local hold, k = nil, {}
    if req.h then
      local raw = redis.call('GET', KEYS[req.h])
      if raw then
        hold = cjson.decode(raw)
        k = hold.k
        redis.call('DEL', KEYS[req.h])
      end
    end
    local function at_least(reported, held)
      if held ~= nil and req.e ~= 1 and held > reported then return held end
      return reported
    end
    for _, i in ipairs(req.c) do
      local held = k[KEYS[i]]
      if held then
        local delta = at_least(req.t, held[1]) - held[1]
        if delta ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
          redis.call('INCRBY', KEYS[i], string.format('%d', delta))
        end
      else
        local add = at_least(req.t, hold and hold.t)
        if add > 0 then
          redis.call('INCRBY', KEYS[i], string.format('%d', add))
          redis.call('EXPIRE', KEYS[i], ARGV[3])
        end
      end
    end
    local flags = {}
    if req.x or hold then
      local cost = tonumber(req.x or '0')
      for j, s in ipairs(req.s) do
        local held = k[KEYS[s[1]]]
        local add
        if held then add = at_least(cost, held[1]) - held[1] else add = at_least(cost, hold and hold.x) end
        local after = tonumber(redis.call('INCRBYFLOAT', KEYS[s[1]], string.format('%.17g', add)))
        if s[2] > 0 then redis.call('EXPIREAT', KEYS[s[1]], s[2]) end
        local flag = 0
        if s[3] >= 0 and after >= s[3] then
          flag = 2
        elseif s[4] >= 0 and after - add < s[4] and after >= s[4] then
          flag = 1
        end
        flags[j] = flag
      end
    end
    out[r] = flags
  end
end
return cjson.encode(out)
"""


# Cluster only: an admission refused on one slot gives back what the request took on the
# slots before it (ADMIT is atomic per slot, not across them). KEYS: one slot's counters,
# then its hold record; ARGV[1]: the usage id; then per counter what admitting took and its
# kind (a held counter's share is its hold record's).
GIVE_BACK = """
local hold = redis.call('GET', KEYS[#KEYS])
local held = hold and cjson.decode(hold).k or {}
redis.call('DEL', KEYS[#KEYS])
for i = 1, #KEYS - 1 do
  local kind = ARGV[2 * i + 1]
  if kind == 's' then
    redis.call('ZREM', KEYS[i], ARGV[1])
  elseif redis.call('EXISTS', KEYS[i]) == 1 then
    if kind == 'n' then
      redis.call('DECRBY', KEYS[i], ARGV[2 * i])
    elseif held[KEYS[i]] and held[KEYS[i]][2] == 'b' then
      redis.call('INCRBYFLOAT', KEYS[i], string.format('%.17g', -held[KEYS[i]][1]))
    elseif held[KEYS[i]] then
      redis.call('DECRBY', KEYS[i], string.format('%d', held[KEYS[i]][1]))
    end
  end
end
return 0
"""


class Settlement(NamedTuple):
    """One finished request, as the settlement script takes it."""

    usage_id: str
    tokens: int                                 # 0 when the response reported none
    counters: list[str]                         # token windows
    inflight: list[str]                         # in-flight sets it leaves
    cost: float | None = None                   # None: unpriced
    spend: Sequence[SpendCounter] = ()
    held: bool = False      # it held an estimate at admission (a hold record to settle)
    ended: bool = True      # it ended with its usage reported: settled at that, not at least its hold


class _Part(NamedTuple):
    """What one settlement script call settles of one request: all of it, or in a cluster
    what lies in one scope's slot (``spend_at``: where its spend counters are in the request's)."""

    request: int
    mark: str
    item: Settlement
    spend_at: tuple[int, ...]
    hold: str | None = None  # its hold record's suffix


# A request in flight longer than this has ended: Envoy's route timeout (600 s) has cut
# it. A lost report holds its place in a max_parallel_requests set no longer than that.
INFLIGHT_MAX_S = 660
HOLD_TTL_S = INFLIGHT_MAX_S + 60  # a hold record outlives its call; a lost report keeps its holds counted
SETTLED_TTL_S = 900  # Envoy resends a report within seconds (a reconnect), never minutes later


class RateCounters:
    """The counters' scripts. In a cluster each scope's counters share a slot
    (records/keyspace.py): a request is admitted slot by slot (what it took on one is given
    back when another refuses it) and settled slot by slot (each with its own settled mark)."""

    def __init__(self, redis: aioredis.Redis, keyspace: Keyspace, timeout_s: float) -> None:
        self.keyspace = keyspace
        self.timeout_s = timeout_s
        self.redis = redis
        self.script = redis.register_script(ADMIT)
        self.settle_script = redis.register_script(SETTLE)
        self.give_back_script = redis.register_script(GIVE_BACK)
        self.giving_back: set[asyncio.Task[None]] = set()  # give-backs outliving a cancelled check

    async def peek(self, counters: list[Counter], now: float) -> tuple[Counter, float] | None:
        """The counter that would refuse a request now (with its value), taking nothing."""
        return await self.admit(counters, "", now)

    def _by_slot(self, counters: list[Counter]) -> list[list[Counter]]:
        if not self.keyspace.cluster:
            return [counters] if counters else []
        groups: dict[str | None, list[Counter]] = {}
        for c in counters:
            groups.setdefault(scope_of(c.suffix), []).append(c)
        return list(groups.values())

    def _hold_record(self, usage_id: str, group: list[Counter]) -> str:
        return self.keyspace.counter(self.keyspace.hold_record(usage_id, scope_of(group[0].suffix)))

    async def admit(self, counters: list[Counter], usage_id: str = "-", now: float = 0.0,
                    estimate: Estimate | None = None) -> tuple[Counter, float] | None:
        """Take one of each counter, or none; the counter that refused, with its value. A
        held counter (domain/limits.HELD) takes the ``estimate``, and what it took is kept
        in a hold record for the settlement."""
        taken: list[list[Counter]] = []
        try:
            for group in self._by_slot(counters):
                keys = [self.keyspace.counter(c.suffix) for c in group]
                holding = estimate is not None and usage_id and any(c.kind in HELD for c in group)
                if holding:
                    keys.append(self._hold_record(usage_id, group))
                args = [WINDOW_S + 5, now, usage_id, now + INFLIGHT_MAX_S, HOLD_TTL_S if holding else 0,
                        estimate.tokens if estimate is not None else 0,
                        repr(estimate.cost) if estimate is not None and estimate.cost is not None else "",
                        *(v for c in group for v in (c.limit, repr(c.take), c.kind, int(math.ceil(c.expires_at))))]
                over, value = await asyncio.wait_for(self.script(keys=keys, args=args), self.timeout_s)
                if over:
                    await self._give_back(taken, usage_id)
                    return group[int(over) - 1], float(value)
                taken.append(group)
        except REDIS_FAILURES as e:
            await self._give_back(taken, usage_id)
            raise StoreUnavailable(type(e).__name__) from None
        except asyncio.CancelledError:  # the check was cancelled between two slots: give back anyway
            if taken:
                task = asyncio.get_running_loop().create_task(self._give_back(taken, usage_id))
                self.giving_back.add(task)
                task.add_done_callback(self.giving_back.discard)
            raise
        return None

    async def _give_back(self, taken: list[list[Counter]], usage_id: str) -> None:
        """Best effort: a give-back lost leaves a window one request fuller than it is (it
        refuses sooner, never later) until the minute ends, a place in flight until its
        deadline, or a hold until the period ends."""
        if not taken or not usage_id:
            return
        for group in taken:
            try:
                await asyncio.wait_for(self.give_back_script(
                    keys=[*(self.keyspace.counter(c.suffix) for c in group), self._hold_record(usage_id, group)],
                    args=[usage_id, *(v for c in group for v in (repr(c.take), c.kind))]), self.timeout_s)
            except REDIS_FAILURES as e:
                log.warning("redis: an admission refused on one slot could not give back what it took on "
                            "another (%s)", type(e).__name__)

    def _parts(self, batch: list[Settlement]) -> list[_Part]:
        """The batch as script calls take it: whole requests, or in a cluster each request's
        share in each scope's slot."""
        hold = self.keyspace.hold_record
        if not self.keyspace.cluster:
            return [_Part(r, self.keyspace.settled_mark(item.usage_id, None), item, tuple(range(len(item.spend))),
                          hold(item.usage_id, None) if item.held else None) for r, item in enumerate(batch)]
        parts = []
        for r, item in enumerate(batch):
            scopes: dict[str | None, None] = dict.fromkeys(scope_of(n) for n in (*item.counters, *item.inflight))
            scopes.update(dict.fromkeys(scope_of(c.suffix) for c in item.spend))
            for where in scopes or [None]:
                at = tuple(j for j, c in enumerate(item.spend) if scope_of(c.suffix) == where)
                parts.append(_Part(r, self.keyspace.settled_mark(item.usage_id, where), item._replace(
                    counters=[n for n in item.counters if scope_of(n) == where],
                    inflight=[n for n in item.inflight if scope_of(n) == where],
                    spend=[item.spend[j] for j in at]), at,
                    hold(item.usage_id, where) if item.held else None))
        return parts

    async def settle(self, batch: list[Settlement]) -> list[list[int] | None]:
        """Settle finished requests (one script call for the batch, one per slot in a
        cluster): per request None when it was settled before, else a flag per spend
        counter (SOFT, OVER or 0). In a cluster, a slot that fails raises StoreUnavailable
        once the others have settled (their marks keep a resent report from counting twice)."""
        if not batch:
            return []
        parts = self._parts(batch)
        groups: dict[str | None, list[_Part]] = {}
        for part in parts:  # in a cluster: a call per scope, and one per mark without a scope (its own slot)
            groups.setdefault((scope_of(part.mark) or part.mark) if self.keyspace.cluster else None, []).append(part)
        answers = await asyncio.gather(*(self._settle(group) for group in groups.values()), return_exceptions=True)
        results: list[list[int] | None] = [None] * len(batch)
        failure: BaseException | None = None
        for group, answer in zip(groups.values(), answers, strict=False):
            if isinstance(answer, BaseException):
                failure = answer
                continue
            for part, flags in zip(group, answer, strict=False):
                if flags is None:
                    continue
                merged = results[part.request]
                if merged is None:  # (unpriced: no flag at all, as the script answers)
                    item = batch[part.request]
                    priced = item.cost is not None or item.held
                    merged = results[part.request] = [0] * len(item.spend) if priced else []
                for j, flag in zip(part.spend_at, flags, strict=False):
                    merged[j] = flag
        if failure is not None:
            if not isinstance(failure, REDIS_FAILURES):
                raise failure
            raise StoreUnavailable(type(failure).__name__)
        return results

    async def _settle(self, parts: list[_Part]) -> list[list[int] | None]:
        keys: dict[str, int] = {}

        def index(name: str) -> int:
            return keys.setdefault(name, len(keys) + 1)

        counter = self.keyspace.counter
        requests = []
        for part in parts:
            item = part.item
            request: dict = {"u": item.usage_id, "m": index(counter(part.mark)), "t": item.tokens,
                             "c": [index(counter(c)) for c in item.counters], "e": int(item.ended),
                             "i": [index(counter(c)) for c in item.inflight], "s": []}
            if part.hold is not None:
                request["h"] = index(counter(part.hold))
            if item.cost is not None:
                request["x"] = repr(item.cost)
            if item.cost is not None or part.hold is not None:
                request["s"] = [[index(counter(c.suffix)), int(math.ceil(c.expires_at)) if c.expires_at else 0,
                                 c.max if c.max is not None else -1, c.soft if c.soft is not None else -1]
                                for c in item.spend]
            requests.append(request)
        raw = await asyncio.wait_for(self.settle_script(
            keys=list(keys), args=[json.dumps(requests, separators=(",", ":")), SETTLED_TTL_S, WINDOW_S + 5]),
            self.timeout_s)
        # cjson writes an empty list as {}.
        return [None if r == 0 else (list(r) if isinstance(r, list) else []) for r in json.loads(raw)]

    async def release(self, usage_id: str, inflight: list[str]) -> None:
        """A call has ended: it leaves its in-flight sets (its tokens come with its report)."""
        if not inflight:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in inflight:
                    pipe.zrem(self.keyspace.counter(name), usage_id)
                await asyncio.wait_for(pipe.execute(), self.timeout_s)
        except REDIS_FAILURES as e:
            raise StoreUnavailable(type(e).__name__) from None

    async def used(self, scopes: list[str], now: float) -> list[tuple[int, int]]:
        """(requests admitted, tokens settled) of each scope in the current minute."""
        if not scopes:
            return []
        window = window_of(now)
        names = [f"{kind}:{s}:{window}" for s in scopes for kind in ("rpm", "tpm")]
        try:
            raws = await asyncio.wait_for(self._mget(names), self.timeout_s)
        except REDIS_FAILURES as e:
            raise StoreUnavailable(type(e).__name__) from None
        values = [int(r) if r is not None else 0 for r in raws]
        return list(zip(values[0::2], values[1::2], strict=False))

    async def admin_write(self, user_id: str, now: float) -> int:
        """Count one admin write of a user acting for itself in this minute's window;
        the count so far (bounded by extauthz_settings.admin_writes_per_minute)."""
        name = self.keyspace.counter(f"admin_writes:{window_of(now)}:{user_id}")
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incr(name)
                pipe.expire(name, WINDOW_S + 5)
                count, _ = await asyncio.wait_for(pipe.execute(), self.timeout_s)
        except REDIS_FAILURES as e:
            raise StoreUnavailable(type(e).__name__) from None
        return int(count)

    async def spent(self, names: list[str]) -> list[float]:
        """The amounts in these spend counters (0 for one not written yet)."""
        if not names:
            return []
        try:
            raws = await asyncio.wait_for(self._mget(names), self.timeout_s)
        except REDIS_FAILURES as e:
            raise StoreUnavailable(type(e).__name__) from None
        return [round(float(r), 10) if r is not None else 0.0 for r in raws]

    async def _mget(self, suffixes: list[str]) -> list[bytes | str | None]:
        """Counters of several scopes, in order (in a cluster, one MGET per slot)."""
        names = [self.keyspace.counter(n) for n in suffixes]
        if self.keyspace.cluster:
            return await self.redis.mget_nonatomic(names)  # type: ignore[attr-defined]
        return await self.redis.mget(names)
