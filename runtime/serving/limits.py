"""What one caller may cost the router (no torch): the request-size, stream and rate limits, and the
per-key token bucket behind the rate limit (docs/limits.md).

    limits = Limits(max_request_bytes=1 << 20, rate_limit=5.0, rate_limit_burst=10)
    limiter = RateLimiter(limits.rate_limit, limits.rate_limit_burst)
    wait = limiter.wait_time(caller_key(key_id, peer))    # None: admitted; else seconds until it would be

The limiter keeps one bucket per key (an API key's id, else the client's address). Memory is bounded: a
bucket that has refilled completely is indistinguishable from a new one, so it is dropped once idle that
long; beyond `max_keys` buckets, the least recently used go first (a flood of distinct addresses then
costs at most `max_keys` small entries, and an evicted caller merely starts again with a full bucket).
Every decision takes `now` (monotonic seconds) so that the table tests need no clock.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_MAX_REQUEST_BYTES = 1 << 20        # 1 MiB: far above any prompt a session_len of a small GPU fits
DEFAULT_MAX_STREAMS_PER_CONNECTION = 100   # gRPC (HTTP/2) concurrent calls on one connection
DEFAULT_MAX_PROMPTS_PER_REQUEST = 256      # EngineConfig.max_prompts_per_request's default (the workers')
DEFAULT_MAX_KEYS = 10_000                  # buckets kept at most (about 100 bytes each)


@dataclass(frozen=True)
class Limits:
    """The router's limits on one request and one caller. `rate_limit` None: no rate limit (the default)."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_streams_per_connection: int = DEFAULT_MAX_STREAMS_PER_CONNECTION
    rate_limit: float | None = None          # requests per second per key
    rate_limit_burst: int | None = None      # the bucket's size; None: max(1, ceil(rate_limit))
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST

    def __post_init__(self):
        for name, flag, value in (("max_request_bytes", "--max-request-bytes", self.max_request_bytes),
                                  ("max_streams_per_connection", "--max-streams-per-connection",
                                   self.max_streams_per_connection),
                                  ("max_prompts_per_request", "--max-prompts-per-request",
                                   self.max_prompts_per_request)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({flag}) {value!r}: give a whole number, 1 or more")
        if self.max_request_bytes >= 2 ** 31:   # gRPC's message length is a signed 32-bit integer
            raise ValueError(f"max_request_bytes (--max-request-bytes) {self.max_request_bytes}: at most "
                             f"{2 ** 31 - 1} (gRPC's largest message)")
        if self.rate_limit is not None:
            if isinstance(self.rate_limit, bool) or not isinstance(self.rate_limit, (int, float)) \
                    or not math.isfinite(self.rate_limit) or self.rate_limit <= 0:
                raise ValueError(f"rate_limit (--rate-limit) {self.rate_limit!r}: give requests per second per "
                                 "key, more than 0 (e.g. 5 or 0.5); leave it unset for no rate limit")
        if self.rate_limit_burst is not None:
            if isinstance(self.rate_limit_burst, bool) or not isinstance(self.rate_limit_burst, int) \
                    or self.rate_limit_burst < 1:
                raise ValueError(f"rate_limit_burst (--rate-limit-burst) {self.rate_limit_burst!r}: give a whole "
                                 "number of requests, 1 or more")
            if self.rate_limit is None:
                raise ValueError("rate_limit_burst (--rate-limit-burst) needs rate_limit (--rate-limit): the "
                                 "burst is the size of a bucket that refills at that rate")

    @property
    def burst(self) -> int:
        """The bucket's size: what a caller may send at once after being idle."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1, math.ceil(self.rate_limit or 1))

    def rate_limiter(self) -> RateLimiter | None:
        return None if self.rate_limit is None else RateLimiter(float(self.rate_limit), self.burst)


def caller_key(key_id: str | None, address: str | None) -> str:
    """Whose bucket a request draws on: its API key's id where the caller authenticated, else its address
    (host only: every connection of one client shares a bucket; a port changes per connection)."""
    if key_id:
        return f"key:{key_id}"
    return f"addr:{host_of(address or '')}"


def host_of(peer: str) -> str:
    """The host of an aiohttp remote ("127.0.0.1", "::1") or a gRPC peer ("ipv4:127.0.0.1:5555",
    "ipv6:[::1]:5555", "unix:/path")."""
    kind, sep, rest = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6", "unix", "unix-abstract"):
        return peer   # already a bare address (aiohttp's request.remote)
    if kind.startswith("unix"):
        return peer
    if rest.startswith("["):
        return rest[1:].partition("]")[0]
    return rest.rpartition(":")[0] or rest


class RateLimiter:
    """Token buckets per key: `rate` tokens a second up to `burst`; a request takes one."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = DEFAULT_MAX_KEYS):
        if not rate > 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"rate {rate!r} > 0, burst {burst!r} >= 1 and max_keys {max_keys!r} >= 1 needed")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._full_after = burst / rate   # idle seconds after which a bucket is full again: droppable
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # key -> (tokens, at), LRU first

    def __len__(self) -> int:
        return len(self._buckets)

    def wait_time(self, key: str, now: float | None = None) -> float | None:
        """Take a token from `key`'s bucket: None if there was one, else the seconds until there will be."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = None
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)   # most recently used last
        self._evict(now)
        return wait

    def _evict(self, now: float) -> None:
        # Oldest first: drop those idle long enough to be full again (nothing is lost), then, past max_keys,
        # the least recently used (that caller gets a full bucket back: lenient, never stricter).
        while self._buckets:
            key, (_, at) = next(iter(self._buckets.items()))
            if now - at >= self._full_after or len(self._buckets) > self.max_keys:
                del self._buckets[key]
            else:
                break


def too_large_message(size: int | None, limit: int) -> str:
    got = f"is {size} bytes, more than" if size is not None else "is larger than"
    return (f"the request body {got} this gateway's limit of {limit} bytes (max_request_bytes: "
            f"spec.limits.maxRequestBytes, kubellm router --max-request-bytes); send a smaller request or raise "
            f"the limit")


def rate_limited_message(limits: Limits, wait: float) -> str:
    return (f"Rate limit reached: {limits.rate_limit:g} requests per second per key, bursts of {limits.burst} "
            f"(spec.limits.rateLimit: requestsPerSecond, burst; kubellm router --rate-limit, --rate-limit-burst). "
            f"Please try again in {wait:.2g}s.")
