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

# ARGV: the windows' lifetime, then per counter its limit and what admitting adds.
# Returns 0 when every counter was below its limit (and each then takes its share), else
# the 1-based index of the first counter at its limit (and nothing is taken).
ADMIT = """
for i = 1, #KEYS do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used >= tonumber(ARGV[2 * i]) then return i end
end
for i = 1, #KEYS do
  local take = tonumber(ARGV[2 * i + 1])
  if take > 0 and redis.call('INCRBY', KEYS[i], take) == take then redis.call('EXPIRE', KEYS[i], ARGV[1]) end
end
return 0
"""
# A response's usage, once per request id: KEYS[1] marks the request settled (for a
# day: Envoy may send a report twice, never a day apart); the other keys are token
# counters. ARGV: the mark's lifetime, the windows' lifetime, the tokens. 1 if settled now.
SETTLE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 2, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[3])
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
return 1
"""
SETTLED_TTL_S = 86400


class RateCounters:
    def __init__(self, redis: aioredis.Redis, prefix: str, timeout_s: float) -> None:
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.redis = redis
        self.script = redis.register_script(ADMIT)
        self.settle_script = redis.register_script(SETTLE)

    async def admit(self, counters: list[Counter]) -> Counter | None:
        """Take one of each counter, or none; the counter at its limit when refused."""
        keys = [self.prefix + c.suffix for c in counters]
        try:
            args = [WINDOW_S + 5, *(n for c in counters for n in (c.limit, c.take))]
            over = await asyncio.wait_for(self.script(keys=keys, args=args), self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from None
        return counters[int(over) - 1] if over else None

    async def settle(self, request_id: str, counters: list[str], tokens: int) -> bool:
        """Add a response's tokens to its counters, unless this request was settled before."""
        keys = [f"{self.prefix}settled:{request_id}", *(self.prefix + c for c in counters)]
        try:
            done = await asyncio.wait_for(
                self.settle_script(keys=keys, args=[SETTLED_TTL_S, WINDOW_S + 5, tokens]), self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from None
        return bool(done)

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
