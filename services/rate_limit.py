"""Token-bucket rate limits (OWASP API4), in-process or shared through Redis.

A bucket holds at most `burst` tokens and refills at `rate` tokens per second; a request takes one token
or is refused with the time until one is available (the Retry-After). Buckets are named by the caller
(e.g. `api:<key id>`, `create:<key id>`, `anon:<client ip>`).

* `MemoryBuckets`: this process only (the embedded default; N processes allow N times the rate).
* `RedisBuckets`: one Lua script per request (refill + take, atomic, on the Redis server's clock), so every
  API process shares each bucket. A true token bucket, not a fixed window: no double burst at window
  edges. State is one small hash per bucket that expires once it would be full again. If Redis fails, the
  process falls back to its own in-memory buckets (logged) and retries Redis after a few seconds:
  an outage of the limiter's store must not take the API down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("chorus.ratelimit")


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens per second (sustained requests per second)
    burst: int  # bucket size (requests allowed at once after a quiet period)

    def describe(self) -> str:
        if self.rate >= 1:
            return f"{self.rate:g}/s, burst {self.burst}"
        return f"{self.rate * 60:g}/min, burst {self.burst}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float  # seconds until one token is available (0 when allowed)
    remaining: float  # tokens left


class Buckets(Protocol):
    async def take(self, name: str, limit: Limit, consume: bool = True) -> Decision: ...


class MemoryBuckets:
    """Token buckets of this process. At most `max_buckets` (least recently used dropped: a dropped bucket
    comes back full, which only ever errs on the side of allowing)."""

    def __init__(self, max_buckets: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_buckets = max_buckets
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # name -> (tokens, at)

    def take_now(self, name: str, limit: Limit, consume: bool = True) -> Decision:
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(name, (float(limit.burst), now))
            tokens = min(float(limit.burst), tokens + max(0.0, now - at) * limit.rate)
            allowed = tokens >= 1.0
            if allowed and consume:
                tokens -= 1.0
            if consume:
                self._buckets[name] = (tokens, now)
                self._buckets.move_to_end(name)
                while len(self._buckets) > self.max_buckets:
                    self._buckets.popitem(last=False)
        return Decision(allowed, 0.0 if allowed else (1.0 - tokens) / limit.rate, tokens)

    async def take(self, name: str, limit: Limit, consume: bool = True) -> Decision:
        return self.take_now(name, limit, consume)


# KEYS[1] bucket hash; ARGV rate, burst, consume (1/0). Returns {allowed, retry_after, tokens} (as strings:
# Lua numbers would be truncated to integers on the way out).
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local consume = ARGV[3] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local retry = 0
if tokens >= 1 then
  allowed = 1
  if consume then tokens = tokens - 1 end
else
  retry = (1 - tokens) / rate
end
if consume then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.min(math.ceil((burst - tokens) / rate * 1000) + 1000, 604800000))
end
return {allowed, tostring(retry), tostring(tokens)}
"""


class RedisBuckets:
    """Token buckets in Redis, shared by every process using the same URL and prefix."""

    def __init__(
        self,
        url: str,
        prefix: str = "chorus:ratelimit:",
        timeout: float = 0.25,
        retry_seconds: float = 5.0,
        fallback: MemoryBuckets | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.fallback = fallback or MemoryBuckets()
        self._clients: dict[int, tuple[Any, Any]] = {}  # event loop id -> (client, script)
        self._down_until = 0.0

    def _script(self) -> Any:
        """A client per event loop (asyncio connections belong to the loop that opened them)."""
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        item = self._clients.get(id(loop))
        if item is None:
            client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout, health_check_interval=30
            )
            item = self._clients[id(loop)] = (client, client.register_script(_TAKE))
        return item[1]

    async def take(self, name: str, limit: Limit, consume: bool = True) -> Decision:
        from redis.exceptions import RedisError

        if time.monotonic() < self._down_until:
            return self.fallback.take_now(name, limit, consume)
        try:
            allowed, retry, tokens = await self._script()(
                keys=[self.prefix + name], args=[repr(limit.rate), limit.burst, 1 if consume else 0]
            )
        except (RedisError, OSError) as exc:
            log.warning(
                "rate limiter: Redis at %s failed (%s); using in-process limits for %.0f s",
                _safe_url(self.url),
                exc,
                self.retry_seconds,
            )
            self._down_until = time.monotonic() + self.retry_seconds
            return self.fallback.take_now(name, limit, consume)
        return Decision(bool(int(allowed)), float(retry), float(tokens))

    async def aclose(self) -> None:
        for client, _ in self._clients.values():
            try:
                await client.aclose()
            except Exception:  # pragma: no cover - a client of another (closed) loop
                pass
        self._clients.clear()


def _safe_url(url: str) -> str:
    """The URL without credentials, for logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}"


def retry_after_header(seconds: float) -> str:
    """Retry-After in whole seconds, at least 1 (RFC 9110 delay-seconds)."""
    return str(max(1, math.ceil(seconds)))
