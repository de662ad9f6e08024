"""Usage counters shared by every replica, in Redis: one Lua script per admission, so a
request is counted against all its limits at once or against none (a request refused by
its team's limit does not use up its key's).

Keys (``<p>`` the key prefix): ``<p>rpm:<scope>:<minute>`` and
``<p>rpm:<scope>:model:<model>:<minute>`` (``tpm:`` the same), where scope is
``key:<token hash>`` or ``team:<team_id>``, each expiring shortly after its minute;
``<p>inflight:<scope>`` (requests in flight); ``<p>spend:<scope>…`` (usage/budgets.py).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import NamedTuple, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extauthz.records.store import StoreUnavailable
from extauthz.usage.budgets import SpendCounter
from extauthz.usage.limits import WINDOW_S, Counter, window_of

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


class Settlement(NamedTuple):
    """One finished request, as the settlement script takes it."""

    usage_id: str
    tokens: int                                 # 0 when the response reported none
    counters: list[str]                         # token windows
    inflight: list[str]                         # in-flight sets it leaves
    cost: float | None = None                   # None: unpriced
    # Spend counters, each with the Redis keys of the records that read it.
    spend: Sequence[tuple[SpendCounter, tuple[str, ...]]] = ()


# A request in flight longer than this has ended: Envoy's route timeout (600 s) has cut
# it. A lost report holds its place in a max_parallel_requests set no longer than that.
INFLIGHT_MAX_S = 660
SETTLED_TTL_S = 900  # Envoy resends a report within seconds (a reconnect), never minutes later


class RateCounters:
    def __init__(self, redis: aioredis.Redis, prefix: str, timeout_s: float) -> None:
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.redis = redis
        self.script = redis.register_script(ADMIT)
        self.settle_script = redis.register_script(SETTLE)

    async def peek(self, counters: list[Counter], now: float) -> Counter | None:
        """The counter that would refuse a request now, taking nothing."""
        return await self.admit(counters, "", now)

    async def admit(self, counters: list[Counter], usage_id: str = "-", now: float = 0.0) -> Counter | None:
        """Take one of each counter, or none; the counter at its limit when refused."""
        keys = [self.prefix + c.suffix for c in counters]
        try:
            args = [WINDOW_S + 5, now, usage_id, now + INFLIGHT_MAX_S,
                    *(n for c in counters for n in (c.limit, c.take, c.kind))]
            over = await asyncio.wait_for(self.script(keys=keys, args=args), self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from None
        return counters[int(over) - 1] if over else None

    async def settle(self, batch: list[Settlement]) -> list[list[int] | None]:
        """Settle finished requests (one script call for the batch): per request None when
        it was settled before, else a flag per spend counter (SOFT, OVER or 0)."""
        if not batch:
            return []
        keys: dict[str, int] = {}

        def index(name: str) -> int:
            return keys.setdefault(name, len(keys) + 1)

        p = self.prefix
        requests = []
        for item in batch:
            request: dict = {"u": item.usage_id, "m": index(f"{p}settled:{item.usage_id}"), "t": item.tokens,
                             "c": [index(p + c) for c in item.counters], "i": [index(p + c) for c in item.inflight],
                             "s": []}
            if item.cost is not None:
                request["x"] = repr(item.cost)
                request["s"] = [[index(p + c.suffix), int(math.ceil(c.expires_at)) if c.expires_at else 0,
                                 c.max if c.max is not None else -1, c.soft if c.soft is not None else -1,
                                 *(index(r) for r in records)] for c, records in item.spend]
            requests.append(request)
        try:
            raw = await asyncio.wait_for(self.settle_script(
                keys=list(keys), args=[json.dumps(requests, separators=(",", ":")), SETTLED_TTL_S, WINDOW_S + 5]),
                self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from None
        # cjson writes an empty list as {}.
        return [None if r == 0 else (list(r) if isinstance(r, list) else []) for r in json.loads(raw)]

    async def release(self, usage_id: str, inflight: list[str]) -> None:
        """A call has ended: it leaves its in-flight sets (its tokens come with its report)."""
        if not inflight:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in inflight:
                    pipe.zrem(self.prefix + name, usage_id)
                await asyncio.wait_for(pipe.execute(), self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from None

    async def used(self, scopes: list[str], now: float) -> list[tuple[int, int]]:
        """(requests admitted, tokens settled) of each scope in the current minute."""
        if not scopes:
            return []
        window = window_of(now)
        names = [f"{self.prefix}{kind}:{s}:{window}" for s in scopes for kind in ("rpm", "tpm")]
        try:
            raws = await asyncio.wait_for(self.redis.mget(names), self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from None
        values = [int(r) if r is not None else 0 for r in raws]
        return list(zip(values[0::2], values[1::2]))

    async def spent(self, names: list[str]) -> list[float]:
        """The amounts in these spend counters (0 for one not written yet)."""
        if not names:
            return []
        try:
            raws = await asyncio.wait_for(self.redis.mget([self.prefix + n for n in names]), self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from None
        return [round(float(r), 10) if r is not None else 0.0 for r in raws]
