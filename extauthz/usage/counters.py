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

# Returns 0 when every counter was below its limit (and each is then incremented), else
# the 1-based index of the first counter at its limit (and nothing is incremented).
ADMIT = """
for i = 1, #KEYS do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used >= tonumber(ARGV[i + 1]) then return i end
end
for i = 1, #KEYS do
  if redis.call('INCR', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ARGV[1]) end
end
return 0
"""


class RateCounters:
    def __init__(self, redis: aioredis.Redis, prefix: str, timeout_s: float) -> None:
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.redis = redis
        self.script = redis.register_script(ADMIT)

    async def admit(self, counters: list[Counter]) -> Counter | None:
        """Take one of each counter, or none; the counter at its limit when refused."""
        keys = [self.prefix + c.suffix for c in counters]
        try:
            over = await asyncio.wait_for(
                self.script(keys=keys, args=[WINDOW_S + 5, *(c.limit for c in counters)]), self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from None
        return counters[int(over) - 1] if over else None

    async def used(self, scopes: list[str], now: float) -> list[int]:
        """Requests each scope has been admitted for in the current minute."""
        if not scopes:
            return []
        window = window_of(now)
        try:
            raws = await asyncio.wait_for(
                self.redis.mget([f"{self.prefix}rpm:{s}:{window}" for s in scopes]),
                self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(type(e).__name__) from None
        return [int(r) if r is not None else 0 for r in raws]
