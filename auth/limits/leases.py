"""Leased permits: a worker takes a block of a busy key's rate-limit permits from Redis in one
check and spends them in its own memory, so that most of that key's requests make no round trip.

A lease is taken by the ordinary check (``auth.limits.redis_checks``: ``limits``' own scripts,
every limit of the key tested before any is counted) with a cost of the block's size: Redis
counts the whole block at once, so the permits a worker holds are already counted against every
window they can be spent in, and no window ever admits more than its limit across all workers.
How each strategy keeps that true:

- **moving window** (the default, exact over any span): a lease of lifetime ``L`` is recorded in
  Redis at ``t + L`` (``t`` the grant's time), the latest instant any of its permits can be
  spent, and checked against the window ending at ``t`` (the script is given ``t + L`` as its
  time and ``W + L`` as each window's length, so its look-back is ``t - W`` as for a request of
  its own). Take any span of ``W`` and the last grant ``g`` whose permits were spent in it: every
  other grant spent in the span is recorded at or after its spend, so at or after the span's
  start, which is no earlier than ``t_g - W``; ``g``'s check counted them all with its own block,
  and refused unless the total fitted the limit.
- **fixed window and sliding window counter**: every request is checked in Redis (not leased).
  They are not the default, and their counters cannot give a permit back once their window
  may have turned.

What a lease leaves unspent when it lapses (or when the worker stops) is given back: its
entries are removed from the window (they stood for no request), so a bursty key loses no
permits to its leases.

What a lease costs is under-admission, never over-admission, and it is bounded: a block is at
most 1/50 of the key's smallest limit and at most ``rate_limit_lease_max`` permits; while one
worker holds permits another may be refused them, for at most a lifetime; what a worker killed
holding a lease had not spent stays counted until its window passes; and a lease's permits are
held ``L`` (1 s, at most 1/60 of the window) longer than a request's. A lease grows only while
its key's requests outrun it (it doubles when asked for again within half its lifetime, and
shrinks by what it left when it lapses unspent), so a key asked once a second keeps the exact
per-request check. Keys whose smallest limit is under ``LEASE_MIN_AMOUNT`` per window or whose
shortest window is under a minute, and keys with a ``max_in_flight`` (whose slot is per
request), are checked in Redis on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from limits.util import WindowStats

from auth.limits.policy import RateLimitPolicy

logger = structlog.get_logger(__name__)

# Below this many permits per window a key is checked in Redis on every request: a block of a
# small limit would strand too large a share of it.
LEASE_MIN_AMOUNT = 100
# A block is at most this fraction (1/n) of the key's smallest limit.
BLOCK_SHARE = 50
# A lease's lifetime (s). Whole seconds, because limits' moving-window script sets the key's
# EXPIRE from the window's length, which a lease lengthens by its lifetime (see above).
LIFETIME = 1
# Keys with a shorter window are checked in Redis on every request: a lease held a second
# longer than a request's permit would cost a short window too large a share of its rate.
LEASE_MIN_WINDOW = 60
# The strategy whose permits may be leased (see above).
LEASED_STRATEGY = "moving-window"
# Leases remembered per worker; past this many the idle ones are forgotten (what they held stays
# counted in Redis until their window passes: fewer requests admitted, never more).
MAX_LEASES = 10_000

# (refused limit's index or 0, each limit's window as the grant left it)
Answer = tuple[int, list[WindowStats]]
# ``grant(size, now)``: the check of ``size`` permits at ``now`` (recorded at ``now + lifetime``).
Grant = Callable[[int, float], Awaitable[Answer]]
# ``give_back(key_id, policy, recorded_at, count)``: remove unspent permits from Redis.
GiveBack = Callable[[str, RateLimitPolicy, float, int], Awaitable[None]]


@dataclass(frozen=True)
class LeaseTerms:
    """How a policy's permits may be leased: the largest block and a lease's lifetime (s)."""

    max_block: int
    lifetime: int


def lease_terms(policy: RateLimitPolicy, lease_max: int) -> LeaseTerms | None:
    """The terms for ``policy``, or None when its every request is to be checked in Redis."""
    smallest = min(item.amount for item in policy.items)
    max_block = min(lease_max, smallest // BLOCK_SHARE)
    shortest = min(item.get_expiry() for item in policy.items)
    if smallest < LEASE_MIN_AMOUNT or max_block < 2 or shortest < LEASE_MIN_WINDOW:
        return None
    return LeaseTerms(max_block, LIFETIME)


@dataclass
class _Asking:
    """A block this worker is asking Redis for: requests of the key that find the lease empty
    claim its permits while it is asked for, and wait for its answer instead of asking for
    blocks of their own."""

    unclaimed: int
    # Set before the answer: the block was granted, the claimants are admitted.
    granted: bool
    # None: the block was granted (the claims are admitted) or could not be (each claimant then
    # checks for itself); else the refusal, which answers the claimants too: the window was full.
    answer: asyncio.Future[Answer | None]


@dataclass
class Lease:
    """One key's permits held by this worker, and the size of its next block."""

    key_id: str
    policy: RateLimitPolicy
    left: int = 0
    expires_at: float = 0.0  # wall-clock time, the clock the grants' times were sent with
    windows: list[WindowStats] = field(default_factory=list)
    # The grants whose permits are pooled in ``left``: (the time Redis recorded them at, how
    # many), so that what is left can be given back.
    records: list[tuple[float, int]] = field(default_factory=list)
    size: int = 1
    asked_at: float = float("-inf")
    grow_after: float = float("-inf")
    asking: _Asking | None = None
    lapse_timer: asyncio.TimerHandle | None = None

    def spend(self, cost: int, now: float) -> list[WindowStats] | None:
        """Spend ``cost`` permits, or None when the lease has not that many left (or lapsed)."""
        if self.left < cost or now >= self.expires_at:
            return None
        self.left -= cost
        if not self.left:
            self.records.clear()
        return self.figures()

    def figures(self) -> list[WindowStats]:
        """Each window as the last grant left it, with this lease's unspent permits added back:
        Redis counted them before they were spent."""
        return [WindowStats(w.reset_time, w.remaining + self.left) for w in self.windows]

    def unspent(self) -> list[tuple[float, int]]:
        """Give up what is left: the permits to remove from Redis, by the time they were
        recorded at (any of the pooled grants' entries will do: each was recorded no earlier
        than the pool's lapse, after every permit spent from it; the latest first)."""
        left, given = self.left, []
        for recorded_at, count in reversed(self.records):
            if not left:
                break
            given.append((recorded_at, min(left, count)))
            left -= given[-1][1]
        self.left = 0
        self.records.clear()
        return given

    def next_size(self, now: float, cost: int, lapsed_unspent: int, terms: LeaseTerms) -> int:
        """The next block's size: doubled while the key's requests outrun its leases (asked for
        again within half a lifetime), shrunk by what was left when a lease lapsed unspent."""
        if lapsed_unspent:
            self.size = max(1, self.size - lapsed_unspent)
        elif now - self.asked_at < terms.lifetime / 2 and now >= self.grow_after:
            self.size = min(terms.max_block, self.size * 2)
        self.asked_at = now
        return max(self.size, cost)

    def add(self, permits: int, expires_at: float, windows: list[WindowStats], size: int) -> None:
        """Hold ``permits`` more of a grant of ``size`` lapsing at ``expires_at`` (the earlier
        lapse of two grants holds for both: a permit is never spent after its own grant's)."""
        if self.left:
            self.expires_at = min(self.expires_at, expires_at)
        else:
            self.expires_at = expires_at
            self.records.clear()  # every permit of those grants was spent
        self.left += permits
        self.records.append((expires_at, size))
        self.windows = windows


class PermitLeases:
    """This worker's leases, by key and policy; ``hit`` spends from one or takes the next, and
    what a lease leaves unspent is given back when it lapses."""

    def __init__(self, clock: Callable[[], float], give_back: GiveBack) -> None:
        self._clock = clock
        self._give_back = give_back
        self._leases: dict[tuple[str, str], Lease] = {}
        self._giving_back: set[asyncio.Task[None]] = set()

    async def hit(
        self, key_id: str, policy: RateLimitPolicy, cost: int, terms: LeaseTerms, grant: Grant
    ) -> Answer:
        """Spend ``cost`` of the key's permits, taking a block from Redis when this worker holds
        too few. The refused limit's index (0: admitted) and the windows, as
        ``RedisChecks.check`` answers."""
        lease = self._lease(key_id, policy)
        while True:
            now = self._clock()
            windows = lease.spend(cost, now)
            if windows is not None:
                return 0, windows
            asking = lease.asking
            if asking is None or asking.unclaimed < cost:
                return await self._ask(lease, cost, now, terms, grant)
            # A block being asked for has permits unclaimed: claim one and wait for its answer.
            # (Shielded: a claimant cancelled must not cancel the others' answer.)
            asking.unclaimed -= cost
            answer = await asyncio.shield(asking.answer)
            if answer is not None:
                return answer
            if asking.granted:
                return 0, lease.figures()
            # Not granted (nor refused): check for itself.

    async def _ask(
        self, lease: Lease, cost: int, now: float, terms: LeaseTerms, grant: Grant
    ) -> Answer:
        lapsed = self._lapse(lease) if lease.left else 0
        size = lease.next_size(now, cost, lapsed, terms)
        answer_to_claims: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        asking = lease.asking = _Asking(size - cost, False, answer_to_claims)
        answer: Answer | None = None
        try:
            refused, windows = await grant(size, now)
            if refused and size > cost:
                # The block does not fit what is left of a window: the request alone may.
                lease.size = size = cost
                lease.grow_after = now + terms.lifetime
                refused, windows = await grant(size, now)
                if not refused:
                    # Admitted alone: the claimants check for themselves.
                    return 0, windows
            if refused:
                answer = (refused, windows)
                return answer
            asking.granted = True
            lease.add(asking.unclaimed, now + terms.lifetime, windows, size)
            if lease.left and lease.lapse_timer is None:
                self._arm(lease)
            return 0, lease.figures()
        finally:
            if lease.asking is asking:
                lease.asking = None
            answer_to_claims.set_result(answer)

    def _arm(self, lease: Lease) -> None:
        delay = max(0.0, lease.expires_at - self._clock()) + 0.01
        lease.lapse_timer = asyncio.get_running_loop().call_later(delay, self._on_timer, lease)

    def _on_timer(self, lease: Lease) -> None:
        lease.lapse_timer = None
        if not lease.left:
            return
        if self._clock() < lease.expires_at:
            self._arm(lease)  # renewed by a later grant
        else:
            self._lapse(lease)

    def _lapse(self, lease: Lease) -> int:
        """Give back what a lapsed lease left unspent (in the background: nothing waits on it);
        how many permits."""
        unspent = lease.unspent()
        for recorded_at, count in unspent:
            task = asyncio.get_running_loop().create_task(
                self._give_back_quietly(lease, recorded_at, count)
            )
            self._giving_back.add(task)
            task.add_done_callback(self._giving_back.discard)
        return sum(count for _, count in unspent)

    async def _give_back_quietly(self, lease: Lease, recorded_at: float, count: int) -> None:
        try:
            await self._give_back(lease.key_id, lease.policy, recorded_at, count)
        except Exception as exc:
            # Not given back: the permits stay counted until their window passes, which admits
            # fewer requests, never more.
            logger.debug("leased permits not given back", error=type(exc).__name__)

    async def close(self) -> None:
        """Give back every lease's unspent permits (a worker stopping), and wait for them."""
        for lease in self._leases.values():
            if lease.lapse_timer is not None:
                lease.lapse_timer.cancel()
                lease.lapse_timer = None
            if lease.left:
                self._lapse(lease)
        if self._giving_back:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._giving_back, return_exceptions=True)

    def _lease(self, key_id: str, policy: RateLimitPolicy) -> Lease:
        index = (key_id, policy.header)
        lease = self._leases.get(index)
        if lease is None:
            if len(self._leases) >= MAX_LEASES:
                self._leases = {
                    i: x for i, x in self._leases.items() if x.asking is not None or x.left
                }
            lease = self._leases[index] = Lease(key_id, policy)
        return lease
