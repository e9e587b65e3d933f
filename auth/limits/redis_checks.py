"""The rate limiter's Redis path: one Lua script per check that tests and counts all of a key's
limits (and takes the request's concurrency slot) at once, sent in one pipeline with the checks of
every other request of the same event-loop turn, and the window figures computed from its answer.

The script is built from the strategy's own Lua scripts in ``limits`` (its acquire, then the read
of the window it leaves); the figures are computed as ``limits`` computes its window statistics.
``auth.limits.limiter.RateLimiter`` decides what to do with the answer and when Redis fails.
"""

from __future__ import annotations

from math import floor, inf
from typing import Any

from limits import RateLimitItem
from limits.util import WindowStats
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from auth.limits.concurrency import Slot
from auth.limits.policy import RateLimitPolicy
from auth.redis_connection import hash_tag, redis_client
from auth.turn_batch import TurnBatch

# What says Redis itself is unreachable or too slow (as opposed to an error it answered with).
OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)

# The script's first answer when the request's concurrency slot is refused (nothing counted).
IN_FLIGHT_REFUSED = -1

NAMESPACE = "mg:key"
# Redis key names remembered per (key id, limit); cleared when this many are held.
_KEY_NAMES_CACHED = 10_000


def sliding_window_stats(item: RateLimitItem, window: Any, now: float) -> WindowStats:
    """The remaining count and reset time of a sliding window counter, from the reply of
    limits' ``sliding_window`` script, as ``SlidingWindowCounterRateLimiter`` computes them."""
    previous_count, previous_ttl, current_count, current_ttl = 0, 0.0, 0, 0.0
    if window:
        previous_count, current_count = int(window[0] or 0), int(window[2] or 0)
        previous_ttl = max(0.0, float(window[1] or 0)) / 1000
        current_ttl = max(0.0, float(window[3] or 0)) / 1000
    expiry = item.get_expiry()
    weighted = previous_count * previous_ttl / expiry + current_count
    remaining = max(0, item.amount - floor(weighted))
    if not (previous_count or current_count):
        return WindowStats(now, remaining)
    previous_reset, current_reset = inf, inf
    if previous_count:
        previous_reset = previous_ttl % (expiry / previous_count)
    if current_count:
        # A window's counter lives for two windows, so its TTL is twice the expiry when the
        # window opens. Read in the very call that opened it (Redis stops the clock during a
        # script), limits' modulo would give 0, "resets now", for a window that has all of its
        # length left; limits itself reads the window in a later call and never sees that.
        current_reset = current_ttl % expiry if current_ttl < 2 * expiry else expiry
    return WindowStats(now + min(previous_reset, current_reset), remaining)


class PipelinedScript:
    """Runs one Lua script per limit check, sending the checks of concurrent requests to Redis in
    one pipeline per event-loop turn (``auth.turn_batch``): the per-call overhead of the client,
    not Redis itself, is what a request would otherwise pay."""

    def __init__(self, client: Any, script: Any) -> None:
        self._client = client
        self._script = script
        self._batch: TurnBatch[tuple[list[str], list[Any]], Any] = TurnBatch(self._send)

    async def run(self, keys: list[str], args: list[Any]) -> Any:
        """Queue one run of the script and await its reply."""
        return await self._batch.call((keys, args))

    async def _send(self, batch: list[tuple[list[str], list[Any]]]) -> list[Any]:
        try:
            return await self._execute(batch)
        except NoScriptError:
            # Redis restarted (or was flushed) and forgot the script: load it, once.
            await self._client.script_load(self._script.script)
            return await self._execute(batch)

    async def _execute(self, batch: list[tuple[list[str], list[Any]]]) -> list[Any]:
        # No MULTI: each check is atomic by itself (a Lua script), and a transaction would add
        # work on the server without making the limit any more exact. EVALSHA rather than the
        # Script object: a pipeline holding Script objects first asks Redis whether they exist,
        # a second round trip every time.
        pipeline = self._client.pipeline(transaction=False)
        for keys, args in batch:
            pipeline.evalsha(self._script.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipeline.execute(raise_on_error=False)
        if any(isinstance(reply, NoScriptError) for reply in replies):
            raise NoScriptError("script not loaded")
        return replies


def _as_function(name: str, script: str | bytes) -> str:
    # A limits script, unchanged, as a local Lua function of its own KEYS and ARGV.
    text = script.decode() if isinstance(script, bytes) else script
    return f"local function {name}(KEYS, ARGV)\n{text}\nend\n"


# Every strategy's script has the same frame. ARGV: the number of limits n, the cost, the time
# (moving window), then each limit's amount and expiry (seconds); KEYS: each limit's keys. The
# strategy defines, per limit, ``fits`` (limits' own test of its acquire script, without
# counting), ``acquire`` (limits' acquire: test and count in one step) and ``read`` (the window
# the headers are computed from). With several limits every one is tested before any is
# counted, so that a request one limit refuses costs the others nothing; one limit alone goes
# straight to its acquire. The reply: 0 when counted, else the (1-based) index of a limit that
# refused, then each limit's window.
#
# A request with a concurrency slot (auth.limits.concurrency) adds, after the limits' ARGV, the
# key's max_in_flight, the slot's id and the slot's lifetime (ms), and its key's set of slots as
# the last KEYS. The slot is tested first (the entries older than their lifetime dropped, by the
# Redis server's clock): when the key already has max_in_flight requests in flight the reply is
# IN_FLIGHT_REFUSED alone and no limit counts the request; the slot is added last, only when
# every limit counted it, so that a request the rate limit refuses holds no slot.
_HEAD = """
local n, cost, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local slots = tonumber(ARGV[4 + 2 * n]) or 0
local slot_time
if slots > 0 then
  local clock = redis.call('TIME')
  slot_time = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', KEYS[#KEYS], '-inf', slot_time - tonumber(ARGV[6 + 2 * n]))
  if redis.call('ZCARD', KEYS[#KEYS]) >= slots then return {-1} end
end
"""
_BODY = """
local function keys_of(i) return {{{keys}}} end
local function amount_of(i) return tonumber(ARGV[2 + 2 * i]) end
local function expiry_of(i) return tonumber(ARGV[3 + 2 * i]) end
local refused = 0
if n > 1 then
  for i = 1, n do
    if not fits(keys_of(i), amount_of(i), expiry_of(i)) then refused = i break end
  end
end
local reply, counting = {{0}}, refused == 0
for i = 1, n do
  local window
  if counting then
    local counted
    counted, window = acquire(keys_of(i), amount_of(i), expiry_of(i))
    if not counted and refused == 0 then refused = i end
  else
    window = read(keys_of(i), amount_of(i), expiry_of(i))
  end
  -- a nil would end the reply's array early
  reply[i + 1] = window or {{}}
end
if slots > 0 and refused == 0 then
  redis.call('ZADD', KEYS[#KEYS], slot_time, ARGV[5 + 2 * n])
  redis.call('PEXPIRE', KEYS[#KEYS], tonumber(ARGV[6 + 2 * n]))
end
reply[1] = refused
return reply
"""


def _sliding_window_script(bridge: Any) -> str:
    return (
        _as_function("hit", bridge.SCRIPT_ACQUIRE_SLIDING_WINDOW)
        + _as_function("window", bridge.SCRIPT_SLIDING_WINDOW)
        + _HEAD
        + """
local function read(k, amount, expiry) return window(k, {expiry}) end
local function fits(k, amount, expiry)
  -- limits' acquire script's own test, on the window its read script leaves
  if cost > amount then return false end
  local w = window(k, {expiry})
  local previous_ttl = tonumber(w[2]) or 0
  if previous_ttl <= 0 then previous_ttl = 0 end
  local weighted = math.floor((tonumber(w[1]) or 0) * previous_ttl / (expiry * 1000))
    + (tonumber(w[3]) or 0)
  return weighted + cost <= amount
end
local function acquire(k, amount, expiry)
  local counted = hit(k, {amount, expiry, cost})
  return counted, read(k, amount, expiry)
end
"""
        + _BODY.format(keys="KEYS[2 * i - 1], KEYS[2 * i]")
    )


def _moving_window_script(bridge: Any) -> str:
    return (
        _as_function("hit", bridge.SCRIPT_ACQUIRE_MOVING_WINDOW)
        + _as_function("window", bridge.SCRIPT_MOVING_WINDOW)
        + _HEAD
        + """
local function read(k, amount, expiry) return window(k, {now - expiry, amount}) end
local function fits(k, amount, expiry)
  -- limits' acquire script's own test
  if cost > amount then return false end
  local entry = redis.call('lindex', k[1], amount - cost)
  return not (entry and tonumber(entry) >= now - expiry)
end
local function acquire(k, amount, expiry)
  local counted = hit(k, {now, amount, expiry, cost})
  return counted, read(k, amount, expiry)
end
"""
        + _BODY.format(keys="KEYS[i]")
    )


def _fixed_window_script(bridge: Any) -> str:
    return (
        _as_function("hit", bridge.SCRIPT_INCR_EXPIRE)
        + _HEAD
        + """
local function read(k, amount, expiry)
  return {tonumber(redis.call('get', k[1])) or 0, redis.call('ttl', k[1])}
end
local function fits(k, amount, expiry) return read(k)[1] + cost <= amount end
local function acquire(k, amount, expiry)
  local count = hit(k, {expiry, cost})
  return count <= amount, {count, redis.call('ttl', k[1])}
end
"""
        + _BODY.format(keys="KEYS[i]")
    )


# Leased permits given back unspent (auth.limits.leases, moving window): ARGV the time a lease
# recorded its permits at and how many to remove, KEYS each limit's list. The time is read as
# the acquire script reads it (tonumber), so that Redis writes it as the entries it pushed.
_GIVE_BACK = """
local recorded, count = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, #KEYS do redis.call('lrem', KEYS[i], -count, recorded) end
return 0
"""

_SCRIPTS = {
    "sliding-window-counter": _sliding_window_script,
    "moving-window": _moving_window_script,
    "fixed-window": _fixed_window_script,
}


class RedisChecks:
    """A strategy's checks on Redis, through ``limits``' asyncio Redis storage (its client, its
    key names and its scripts): ``check`` is one EVALSHA in a shared pipeline."""

    def __init__(self, storage: Any, strategy_name: str) -> None:
        self._storage = storage
        self._bridge = storage.bridge
        self._strategy_name = strategy_name
        # redis-py's asyncio client (limits' own), shared with the concurrency limit.
        self.client: Any = redis_client(storage)
        script = _SCRIPTS[strategy_name](self._bridge)
        self.pipeline = PipelinedScript(self.client, self.client.register_script(script))
        self._key_names: dict[tuple[str, int, int], list[str]] = {}
        self._give_back = PipelinedScript(self.client, self.client.register_script(_GIVE_BACK))

    async def check(
        self,
        policy: RateLimitPolicy,
        key_id: str,
        cost: int,
        now: float,
        slot: Slot | None = None,
        lease_seconds: float = 0.0,
    ) -> tuple[int, list[WindowStats]]:
        """Test and count ``cost`` against each of the policy's limits for ``key_id`` (and take
        ``slot``); the index of a limit that refused (0: none; ``IN_FLIGHT_REFUSED``: the slot
        was, and then there are no figures) and each limit's window.

        ``lease_seconds`` (moving window, ``auth.limits.leases``): the permits may be spent up to
        that long after ``now``, so they are recorded at ``now + lease_seconds`` and tested
        against the window ending at ``now`` (limits' script is given the later time and each
        window lengthened by as much)."""
        keys: list[str] = []
        args: list[Any] = [len(policy.items), cost, now + lease_seconds]
        for item in policy.items:
            keys.extend(self.keys_for(item, key_id))
            args.extend((item.amount, item.get_expiry() + lease_seconds))
        if slot is not None:
            keys.append(slot.redis_key)
            args.extend((slot.limit, slot.slot_id, slot.ttl_ms))
        reply = await self.pipeline.run(keys, args)
        refused = int(reply[0])
        if refused == IN_FLIGHT_REFUSED:
            return refused, []
        stats = [
            self._window_stats(item, window, now)
            for item, window in zip(policy.items, reply[1:], strict=True)
        ]
        return refused, stats

    async def give_back(
        self, policy: RateLimitPolicy, key_id: str, recorded_at: float, count: int
    ) -> None:
        """Remove ``count`` permits a lease recorded at ``recorded_at`` and did not spend
        (``check(..., lease_seconds=...)``: moving window) from each of the policy's windows."""
        keys = [name for item in policy.items for name in self.keys_for(item, key_id)]
        await self._give_back.run(keys, [recorded_at, count])

    def _window_stats(self, item: RateLimitItem, window: Any, now: float) -> WindowStats:
        expiry = item.get_expiry()
        if self._strategy_name == "sliding-window-counter":
            return sliding_window_stats(item, window, now)
        if self._strategy_name == "moving-window":
            start, count = (float(window[0]), int(window[1])) if window else (now, 0)
            return WindowStats(start + expiry, item.amount - count)
        count, ttl = int(window[0]), int(window[1])
        return WindowStats(now + max(ttl, 0), max(0, item.amount - count))

    def keys_for(self, item: RateLimitItem, key_id: str) -> list[str]:
        """The Redis keys of this key id's limit (remembered: they are the same on every request
        of a key). limits' names, with the key id as the hash tag (``hash_tag``): all of a key's
        limits and its set of requests in flight share one Redis Cluster slot, so that one script
        can check them. (limits' own sliding-window names put the whole limit in the tag, which
        sends each limit of a key to another slot.)"""
        cache_key = (key_id, item.amount, item.get_expiry())
        keys = self._key_names.get(cache_key)
        if keys is None:
            key = self._bridge.prefixed_key(item.key_for(NAMESPACE, hash_tag(key_id)))
            # The sliding window: the previous window's counter, then the current's.
            sliding = self._strategy_name == "sliding-window-counter"
            keys = [key + "/-1", key] if sliding else [key]
            if len(self._key_names) >= _KEY_NAMES_CACHED:
                self._key_names.clear()
            self._key_names[cache_key] = keys
        return keys
