"""Usage counters shared by every replica, in Redis: one Lua script per admission, so a
request is counted against all its limits at once or against none (a request refused by
its team's limit does not use up its key's). In a Redis Cluster, one script per scope's
slot: a refusal on the second gives back what the first took (see RateCounters).

Keys (``<p>`` the key prefix; in a cluster the scope is the hash tag,
``<p>rpm:{<scope>}:<minute>``: records/keyspace.py): ``<p>rpm:<scope>:<minute>`` and
``<p>rpm:<scope>:model:<model>:<minute>`` (``tpm:`` the same), where scope is
``key:<token hash>`` or ``team:<team_id>``, each expiring shortly after its minute;
``<p>inflight:<scope>`` (requests in flight); ``<p>spend:<scope>…`` (usage/budgets.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import NamedTuple, Sequence

import redis.asyncio as aioredis

from extauthz.records.keyspace import Keyspace, scope_of
from extauthz.records.store import REDIS_FAILURES, StoreUnavailable
from extauthz.usage.budgets import SpendCounter
from extauthz.usage.limits import WINDOW_S, Counter, window_of

log = logging.getLogger("extauthz.usage")

SOFT, OVER = 1, 2  # what a settlement did to a spend counter

# ARGV: the windows' lifetime, now, the request's usage id and its in-flight deadline;
# then per counter its limit, what admitting adds, and its kind ("n": a count in a
# window; "s": a set of requests in flight, scored by deadline, the expired dropped).
# Returns 0 when every counter was below its limit (and each then takes its share), else
# the 1-based index of the first counter at its limit (and nothing is taken). An empty
# usage id is a peek (/access/explain): the answer, and nothing taken.
ADMIT = """
for i = 1, #KEYS do
  local limit = tonumber(ARGV[3 * i + 2])
  local used
  if ARGV[3 * i + 4] == 's' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[2])
    used = redis.call('ZCARD', KEYS[i])
  else
    used = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
  if used >= limit then return i end
end
if ARGV[3] == '' then return 0 end
for i = 1, #KEYS do
  local take = tonumber(ARGV[3 * i + 3])
  if ARGV[3 * i + 4] == 's' then
    redis.call('ZADD', KEYS[i], ARGV[4], ARGV[3])
    redis.call('EXPIREAT', KEYS[i], math.ceil(tonumber(ARGV[4])))
  elseif take > 0 and redis.call('INCRBY', KEYS[i], take) == take then
    redis.call('EXPIRE', KEYS[i], ARGV[1])
  end
end
return 0
"""
# Finished requests, a batch of them (one usage report message of Envoy's) at once: each
# leaves its in-flight sets (always: idempotent), then, once per usage id, adds its tokens
# and its cost. A spend counter at or over its max_budget has its record rewritten in
# place (same value, same TTL), which every replica's cache is told of, so their next
# check reads the spend afresh.
# KEYS: every key the batch names. ARGV[1]: the batch, JSON: per request its usage id
# ("u"), the index of its settled mark ("m", kept 15 minutes: Envoy may resend a report
# seconds later), its in-flight sets ("i"), its tokens ("t") and token counters ("c"), its
# cost ("x", a decimal string; absent when unpriced) and spend counters ("s": index, when
# it expires or 0, max and soft budget or -1, then the indexes of the records that read it:
# a key's, and during a regeneration's grace period the other key's of its line).
# ARGV[2], ARGV[3]: the marks' and the token windows' lifetimes.
# Returns, JSON, per request 0 when settled before, else a flag per spend counter
# (1: past its soft budget now; 2: at or over its max).
SETTLE = """
local batch = cjson.decode(ARGV[1])
local out, touched = {}, {}
for r = 1, #batch do
  local req = batch[r]
  for _, i in ipairs(req.i) do redis.call('ZREM', KEYS[i], req.u) end
  if not redis.call('SET', KEYS[req.m], '1', 'NX', 'EX', ARGV[2]) then
    out[r] = 0
  else
    for _, i in ipairs(req.c) do
      redis.call('INCRBY', KEYS[i], req.t)
      redis.call('EXPIRE', KEYS[i], ARGV[3])
    end
    local flags = {}
    if req.x then
      local cost = tonumber(req.x)
      for j, s in ipairs(req.s) do
        local after = tonumber(redis.call('INCRBYFLOAT', KEYS[s[1]], req.x))
        if s[2] > 0 then redis.call('EXPIREAT', KEYS[s[1]], s[2]) end
        local flag = 0
        if s[3] >= 0 and after >= s[3] then
          flag = 2
          for k = 5, #s do
            if not touched[s[k]] then
              touched[s[k]] = true
              local doc = redis.call('GET', KEYS[s[k]])
              if doc then redis.call('SET', KEYS[s[k]], doc, 'KEEPTTL') end
            end
          end
        elseif s[4] >= 0 and after - cost < s[4] and after >= s[4] then
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
# slots before it (ADMIT is atomic per slot, not across them). KEYS: one slot's counters;
# ARGV[1]: the usage id; then per counter what admitting took and its kind.
GIVE_BACK = """
for i = 1, #KEYS do
  if ARGV[2 * i + 1] == 's' then
    redis.call('ZREM', KEYS[i], ARGV[1])
  else
    local take = tonumber(ARGV[2 * i])
    if take > 0 and redis.call('EXISTS', KEYS[i]) == 1 then redis.call('DECRBY', KEYS[i], take) end
  end
end
return 0
"""
# Cluster only: the records a settlement found at or over a budget, rewritten in place
# (same value, same TTL) so that every replica's cache reads the spend afresh. (Elsewhere
# SETTLE does it itself; in a cluster the records are on their own slot.)
TOUCH = """
for i = 1, #KEYS do
  local doc = redis.call('GET', KEYS[i])
  if doc then redis.call('SET', KEYS[i], doc, 'KEEPTTL') end
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
    # Spend counters, each with the Redis keys of the records that read it.
    spend: Sequence[tuple[SpendCounter, tuple[str, ...]]] = ()


class _Part(NamedTuple):
    """What one settlement script call settles of one request: all of it, or in a cluster
    what lies in one scope's slot (``spend_at``: where its spend counters are in the request's)."""

    request: int
    mark: str
    item: Settlement
    spend_at: tuple[int, ...]


# A request in flight longer than this has ended: Envoy's route timeout (600 s) has cut
# it. A lost report holds its place in a max_parallel_requests set no longer than that.
INFLIGHT_MAX_S = 660
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
        self.touch_script = redis.register_script(TOUCH)

    async def peek(self, counters: list[Counter], now: float) -> Counter | None:
        """The counter that would refuse a request now, taking nothing."""
        return await self.admit(counters, "", now)

    def _by_slot(self, counters: list[Counter]) -> list[list[Counter]]:
        if not self.keyspace.cluster:
            return [counters] if counters else []
        groups: dict[str | None, list[Counter]] = {}
        for c in counters:
            groups.setdefault(scope_of(c.suffix), []).append(c)
        return list(groups.values())

    async def admit(self, counters: list[Counter], usage_id: str = "-", now: float = 0.0) -> Counter | None:
        """Take one of each counter, or none; the counter at its limit when refused."""
        taken: list[Counter] = []
        try:
            for group in self._by_slot(counters):
                keys = [self.keyspace.counter(c.suffix) for c in group]
                args = [WINDOW_S + 5, now, usage_id, now + INFLIGHT_MAX_S,
                        *(n for c in group for n in (c.limit, c.take, c.kind))]
                over = await asyncio.wait_for(self.script(keys=keys, args=args), self.timeout_s)
                if over:
                    await self._give_back(taken, usage_id)
                    return group[int(over) - 1]
                taken.extend(group)
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

    async def _give_back(self, taken: list[Counter], usage_id: str) -> None:
        """Best effort: a give-back lost leaves a window one request fuller than it is (it
        refuses sooner, never later) until the minute ends, or a place in flight until
        its deadline."""
        if not taken or not usage_id:
            return
        for group in self._by_slot(taken):
            try:
                await asyncio.wait_for(self.give_back_script(
                    keys=[self.keyspace.counter(c.suffix) for c in group],
                    args=[usage_id, *(n for c in group for n in (c.take, c.kind))]), self.timeout_s)
            except REDIS_FAILURES as e:
                log.warning("redis: an admission refused on one slot could not give back what it took on "
                            "another (%s)", type(e).__name__)

    def _parts(self, batch: list[Settlement]) -> list[_Part]:
        """The batch as script calls take it: whole requests, or in a cluster each request's
        share in each scope's slot (its record rewrites left to ``_touch``)."""
        if not self.keyspace.cluster:
            return [_Part(r, self.keyspace.settled_mark(item.usage_id, None), item, tuple(range(len(item.spend))))
                    for r, item in enumerate(batch)]
        parts = []
        for r, item in enumerate(batch):
            scopes: dict[str | None, None] = dict.fromkeys(scope_of(n) for n in (*item.counters, *item.inflight))
            scopes.update(dict.fromkeys(scope_of(c.suffix) for c, _ in item.spend))
            for where in scopes or [None]:
                at = tuple(j for j, (c, _) in enumerate(item.spend) if scope_of(c.suffix) == where)
                parts.append(_Part(r, self.keyspace.settled_mark(item.usage_id, where), item._replace(
                    counters=[n for n in item.counters if scope_of(n) == where],
                    inflight=[n for n in item.inflight if scope_of(n) == where],
                    spend=[(item.spend[j][0], ()) for j in at]), at))
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
        for group, answer in zip(groups.values(), answers):
            if isinstance(answer, BaseException):
                failure = answer
                continue
            for part, flags in zip(group, answer):
                if flags is None:
                    continue
                merged = results[part.request]
                if merged is None:  # (unpriced: no flag at all, as the script answers)
                    item = batch[part.request]
                    merged = results[part.request] = [0] * len(item.spend) if item.cost is not None else []
                for j, flag in zip(part.spend_at, flags):
                    merged[j] = flag
        if self.keyspace.cluster:  # (the slots that settled: a budget they found reached is told)
            await self._touch(batch, results)
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
                             "c": [index(counter(c)) for c in item.counters],
                             "i": [index(counter(c)) for c in item.inflight], "s": []}
            if item.cost is not None:
                request["x"] = repr(item.cost)
                request["s"] = [[index(counter(c.suffix)), int(math.ceil(c.expires_at)) if c.expires_at else 0,
                                 c.max if c.max is not None else -1, c.soft if c.soft is not None else -1,
                                 *(index(r) for r in records)] for c, records in item.spend]
            requests.append(request)
        raw = await asyncio.wait_for(self.settle_script(
            keys=list(keys), args=[json.dumps(requests, separators=(",", ":")), SETTLED_TTL_S, WINDOW_S + 5]),
            self.timeout_s)
        # cjson writes an empty list as {}.
        return [None if r == 0 else (list(r) if isinstance(r, list) else []) for r in json.loads(raw)]

    async def _touch(self, batch: list[Settlement], results: list[list[int] | None]) -> None:
        """Cluster: rewrite the records of the budgets this batch found reached. A rewrite
        lost is made by the next settlement of that key or team (every one at or over its
        budget flags it again)."""
        records = {r: None for item, flags in zip(batch, results) if flags
                   for (_, names), flag in zip(item.spend, flags) if flag == OVER for r in names}
        if records:
            try:
                await asyncio.wait_for(self.touch_script(keys=list(records), args=[]), self.timeout_s)
            except REDIS_FAILURES as e:
                raise StoreUnavailable(type(e).__name__) from None

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
        return list(zip(values[0::2], values[1::2]))

    async def spent(self, names: list[str]) -> list[float]:
        """The amounts in these spend counters (0 for one not written yet)."""
        if not names:
            return []
        try:
            raws = await asyncio.wait_for(self._mget(names), self.timeout_s)
        except REDIS_FAILURES as e:
            raise StoreUnavailable(type(e).__name__) from None
        return [round(float(r), 10) if r is not None else 0.0 for r in raws]

    async def _mget(self, suffixes: list[str]) -> list[bytes | None]:
        """Counters of several scopes, in order (in a cluster, one MGET per slot)."""
        names = [self.keyspace.counter(n) for n in suffixes]
        if self.keyspace.cluster:
            return await self.redis.mget_nonatomic(names)  # type: ignore[attr-defined]
        return await self.redis.mget(names)
