"""Usage counters shared by every replica, in Redis: one Lua script per admission, so a
request is counted against all its limits at once or against none (a request refused by
its team's limit does not use up its key's).

Keys (``<p>`` the key prefix): ``<p>rpm:<scope>:<minute>`` and
``<p>rpm:<scope>:model:<model>:<minute>``, where scope is ``key:<token hash>`` or
``team:<team_id>``; each expires shortly after its minute.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extauthz.records.store import StoreUnavailable
from extauthz.usage.limits import WINDOW_S, Counter, window_of

# ARGV: the windows' lifetime, now, the request's usage id and its in-flight deadline;
# then per counter its limit, what admitting adds, and its kind ("n": a count in a
# window; "s": a set of requests in flight, scored by deadline, the expired dropped).
# Returns 0 when every counter was below its limit (and each then takes its share), else
# the 1-based index of the first counter at its limit (and nothing is taken).
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
# A finished request: it leaves its in-flight sets (always: idempotent), then, once per
# usage id, adds its tokens. KEYS: the settled mark (kept 15 minutes: Envoy may send a
# report twice, seconds apart), the token counters, the in-flight sets. ARGV: the mark's
# lifetime, the windows' lifetime, the tokens, how many token counters, the usage id.
# 1 if the tokens were added now.
SETTLE = """
local counters = tonumber(ARGV[4])
for i = 2 + counters, #KEYS do redis.call('ZREM', KEYS[i], ARGV[5]) end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 2, 1 + counters do
  redis.call('INCRBY', KEYS[i], ARGV[3])
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
return 1
"""
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

    async def settle(self, usage_id: str, counters: list[str], tokens: int, inflight: list[str] = ()) -> bool:
        """A finished request leaves its in-flight sets and adds its tokens to its counters,
        unless it was settled before."""
        keys = [f"{self.prefix}settled:{usage_id}", *(self.prefix + c for c in (*counters, *inflight))]
        try:
            done = await asyncio.wait_for(self.settle_script(
                keys=keys, args=[SETTLED_TTL_S, WINDOW_S + 5, tokens, len(counters), usage_id]), self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from None
        return bool(done)

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
