"""The reconciler: claim due renders, look them up at Shotstack, write each result (SPEC §5).

Claim (one short committed transaction) -> call Shotstack (no transaction open) -> write each
result (one short transaction, only while this worker still owns the lease). Several workers on
several hosts share the work through `FOR UPDATE SKIP LOCKED` and leases; SQLite runs the same
statements with one worker (it ignores the row locks).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from types import FrameType
from typing import Any, Protocol

from sqlalchemy import case, func, literal, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .assets import AssetFacts, create_render, record_asset, settles
from .config import Settings
from .db import UTCDateTime, utcnow
from .events import Housekeeper
from .logs import with_request_id
from .metrics import LEASES_TAKEN_OVER
from .models import Asset, Render, Source, WebhookEvent
from .shotstack import (
    ShotstackAuthError,
    ShotstackError,
    ShotstackHeld,
    ShotstackNotConfigured,
    ShotstackRateLimited,
)

log = logging.getLogger(__name__)

JITTER = 0.25  # a delay is drawn from [75 %, 100 %] of its exponential value: it still doubles
EXPECTED_LATENCY = 0.5  # seconds of one Shotstack call, for sizing the pool of lookups in flight
MAX_THREADS = 32
DB_CONNECTIONS = 6  # per worker process, whatever its number of threads
NAG_INTERVAL = 60.0  # a standing problem (bad key, no key) is logged once a minute
AUTH_RETRY = 60.0  # after a 401/403 the worker tries again this much later (or the backoff cap)
LEASE_MARGIN = 0.2  # no call is started in the last 20 % of a lease: its result could not be kept


class Lookups(Protocol):
    """The part of ServeClient that the reconciler uses; tests may pass a fake."""

    def assets_by_render(self, render_id: str) -> list[AssetFacts]: ...

    def get_asset(self, asset_id: str) -> AssetFacts | None: ...

    def bounded(self, total: float, hold: Callable[[], bool] | None = None) -> Lookups:
        """A client whose calls, the wait for a budget slot included, end within `total` s.

        `hold`, asked once a slot is taken: True means the call is not sent (ShotstackHeld).
        """
        ...


@dataclass
class ReconcilerStats:
    """Counters and flags of this process, for logs and the worker's /metrics."""

    lookups: int = 0
    settled: int = 0
    expired: int = 0
    not_yet: int = 0
    errors: int = 0
    rate_limited: int = 0
    auth_errors: int = 0
    lost_leases: int = 0
    events_confirmed: int = 0
    auth_failing: bool = False  # the last call answered 401/403: a wrong key or environment
    not_configured: bool = False  # no SHOTSTACK_API_KEY

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int | bool]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self)}


STATS = ReconcilerStats()  # one per process; the metrics exporter reads it


@dataclass(frozen=True, slots=True)
class Policy:
    """The timing of SPEC §5, from RECONCILE_* settings."""

    grace: float
    max_interval: float
    max_age: float
    lease: float
    batch: int
    idle: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            grace=settings.reconcile_grace,
            max_interval=settings.reconcile_max_interval,
            max_age=settings.reconcile_max_age,
            lease=settings.reconcile_lease,
            batch=settings.reconcile_batch,
            idle=settings.reconcile_idle,
        )

    def backoff(self, attempts: int, rng: random.Random) -> float:
        """Return the seconds to wait after the `attempts`-th lookup that did not settle.

        The first wait is the grace period (one second when there is none), then it doubles up
        to RECONCILE_MAX_INTERVAL; jitter takes up to a quarter off, so workers drift apart.
        """
        first = self.grace or 1.0
        raw = min(self.max_interval, first * 2.0 ** min(max(attempts - 1, 0), 64))
        return raw * (1.0 - JITTER * rng.random())

    @property
    def auth_retry(self) -> float:
        return min(AUTH_RETRY, self.max_interval)


@dataclass(frozen=True, slots=True)
class Claim:
    """A render this worker leased, and when: the lease ends at `lease_until`."""

    render_id: str
    claimed_at: datetime
    lease_until: datetime


# --- Domain functions: each takes a session and never commits ----------------------------


def claim_due(
    session: Session,
    *,
    owner: str,
    now: datetime,
    lease: float,
    limit: int,
    due_by: datetime | None = None,
) -> list[Claim]:
    """Lease up to `limit` due pending renders that no live lease holds; soonest due first."""
    until = now + timedelta(seconds=lease)
    free = or_(Render.lease_until.is_(None), Render.lease_until < now)
    due = (
        select(Render.id, Render.lease_until.label("previous_lease"))
        .where(Render.tracking == "pending", Render.next_check_at <= (due_by or now), free)
        .order_by(Render.next_check_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .subquery("due")
    )
    # One statement: UPDATE … FROM (SELECT … FOR UPDATE SKIP LOCKED) RETURNING. The lease it
    # replaced tells a takeover (its worker died) from a render nobody held. SQLite cannot
    # return a column of the FROM table; it runs one worker, so there is no one to take over.
    postgres = session.get_bind().dialect.name == "postgresql"
    taken_over = due.c.previous_lease.is_not(None) if postgres else literal(False)
    stmt = (
        update(Render)
        .where(Render.id == due.c.id, free)  # `free` again: SQLite takes no row locks
        .values(lease_owner=owner, lease_until=until)
        .returning(Render.id, taken_over)
        .execution_options(synchronize_session=False)
    )
    rows = session.execute(stmt).all()
    LEASES_TAKEN_OVER.inc(sum(1 for _, taken_over in rows if taken_over))
    ids = [render_id for render_id, _ in rows]
    return [Claim(render_id, now, until) for render_id in ids]


def claim_one(
    session: Session, render_id: str, *, owner: str, now: datetime, lease: float
) -> Claim | None:
    """Lease one render whatever its tracking or due time, unless another live lease holds it."""
    until = now + timedelta(seconds=lease)
    stmt = (
        update(Render)
        .where(
            Render.id == render_id,
            or_(
                Render.lease_until.is_(None),
                Render.lease_until < now,
                Render.lease_owner == owner,
            ),
        )
        .values(lease_owner=owner, lease_until=until)
        .returning(Render.id)
        .execution_options(synchronize_session=False)
    )
    found = session.execute(stmt).scalar()
    return None if found is None else Claim(found, now, until)


def release(
    session: Session,
    *,
    owner: str,
    render_ids: Sequence[str] | None = None,
    not_before: datetime | None = None,
) -> int:
    """End this worker's leases (all, or of `render_ids`); count no attempt.

    `not_before` pushes a render's next lookup to at least that time (a paused budget).
    """
    stmt = update(Render).where(Render.lease_owner == owner)
    if render_ids is not None:
        stmt = stmt.where(Render.id.in_(render_ids))
    values: dict[str, Any] = {"lease_owner": None, "lease_until": None}
    if not_before is not None:
        values["next_check_at"] = _later(Render.next_check_at, not_before)
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        stmt.values(**values).execution_options(synchronize_session=False)
    )
    return int(result.rowcount)


def _later(column: Any, moment: datetime) -> Any:
    """The later of a timestamp column and a moment, a NULL counting as never (portable)."""
    value = literal(moment, UTCDateTime)
    return case((column.is_(None), value), (column < value, value), else_=column)


@dataclass(frozen=True, slots=True)
class _Held:
    tracking: str
    attempts: int
    first_seen_at: datetime


def _hold(session: Session, claim: Claim, *, owner: str, now: datetime) -> _Held | None:
    """Lock the render if this worker's lease on it is still live; None when it was lost."""
    row = session.execute(
        select(Render.tracking, Render.attempts, Render.first_seen_at)
        .where(Render.id == claim.render_id, Render.lease_owner == owner, Render.lease_until > now)
        .with_for_update()
    ).one_or_none()
    return None if row is None else _Held(row.tracking, row.attempts, row.first_seen_at)


def _finish(session: Session, claim: Claim, *, owner: str, **values: Any) -> None:
    session.execute(
        update(Render)
        .where(Render.id == claim.render_id, Render.lease_owner == owner)
        .values(lease_owner=None, lease_until=None, **values)
        .execution_options(synchronize_session=False)
    )


def _reschedule(
    session: Session,
    claim: Claim,
    held: _Held,
    *,
    owner: str,
    now: datetime,
    policy: Policy,
    rng: random.Random,
    error: str | None,
    due_by: datetime | None = None,
) -> str:
    """Count an attempt that did not settle: back off, or expire a render past its age.

    `due_by` caps the backoff: a callback that came during the lookup makes the render due
    after RECONCILE_GRACE, however long its backoff has grown (SPEC §5).
    """
    attempts = held.attempts + 1
    # The age runs from the newest thing learned about the render, so that a new asset
    # re-opening an old render gets a full RECONCILE_MAX_AGE of lookups.
    newest_asset = session.execute(
        select(func.max(Asset.first_seen_at)).where(Asset.render_id == claim.render_id)
    ).scalar()
    opened = max(held.first_seen_at, newest_asset or held.first_seen_at)
    deadline = opened + timedelta(seconds=policy.max_age)
    common = {"attempts": attempts, "last_lookup_at": now, "last_error": error}
    if now >= deadline:
        _finish(session, claim, owner=owner, tracking="expired", next_check_at=None, **common)
        return "expired"
    delay = timedelta(seconds=policy.backoff(attempts, rng))
    due = min(now + delay, deadline, *([due_by] if due_by is not None else []))
    _finish(session, claim, owner=owner, next_check_at=due, **common)
    return "pending"


def write_lookup(
    session: Session,
    claim: Claim,
    found: Sequence[AssetFacts],
    *,
    owner: str,
    now: datetime,
    policy: Policy,
    rng: random.Random,
) -> str | None:
    """Write a lookup by render id while the lease holds; return the render's tracking.

    Returns None when the lease was lost (another worker may hold the render now). A lookup
    that listed at least one asset and none `importing` settles the render, unless an asset
    that it did not list arrived meanwhile (a callback during the call): then it is looked up
    again. Anything else is "not yet": backoff, or `expired` past RECONCILE_MAX_AGE.
    """
    held = _hold(session, claim, owner=owner, now=now)
    if held is None:
        return None
    for facts in found:
        record_asset(session, facts, source=Source.LOOKUP, now=now, grace=policy.grace)
    listed = {facts.id for facts in found}
    arrived = set(
        session.scalars(
            select(Asset.id).where(
                Asset.render_id == claim.render_id, Asset.first_seen_at >= claim.claimed_at
            )
        )
    )
    if settles(found) and arrived <= listed:
        _finish(
            session,
            claim,
            owner=owner,
            tracking="settled",
            settled_at=now,
            next_check_at=None,
            attempts=held.attempts + 1,
            last_lookup_at=now,
            last_error=None,
        )
        return "settled"
    # record_asset re-opens a settled or expired render (attempts from 0) when the lookup
    # brought a new asset, so read the render again.
    now_row = session.execute(
        select(Render.tracking, Render.attempts).where(Render.id == claim.render_id)
    ).one()
    if now_row.tracking != "pending":  # a manual sync of a finished render that changed nothing
        _finish(session, claim, owner=owner, last_lookup_at=now)
        return str(now_row.tracking)
    held = _Held("pending", now_row.attempts, held.first_seen_at)
    # A callback during the lookup (a `done` edit, any serve, or an asset it did not list)
    # makes the render due after the grace, as it would have between two lookups.
    came = session.scalar(
        select(WebhookEvent.id)
        .where(
            WebhookEvent.received_at >= claim.claimed_at,
            WebhookEvent.render_id == claim.render_id,
            WebhookEvent.state == "processed",
            or_(WebhookEvent.event_type == "serve", WebhookEvent.object_status == "done"),
        )
        .limit(1)
    )
    due_by = now + timedelta(seconds=policy.grace) if arrived - listed or came else None
    return _reschedule(
        session,
        claim,
        held,
        owner=owner,
        now=now,
        policy=policy,
        rng=rng,
        error=None,
        due_by=due_by,
    )


def write_failure(
    session: Session,
    claim: Claim,
    error: str,
    *,
    owner: str,
    now: datetime,
    policy: Policy,
    rng: random.Random,
) -> str | None:
    """Record a lookup that failed (5xx, timeout): count it and back off. None: lease lost."""
    held = _hold(session, claim, owner=owner, now=now)
    if held is None:
        return None
    if held.tracking != "pending":
        _finish(session, claim, owner=owner, last_error=error[:2000])
        return held.tracking
    return _reschedule(
        session, claim, held, owner=owner, now=now, policy=policy, rng=rng, error=error[:2000]
    )


@dataclass(frozen=True, slots=True)
class EventClaim:
    """An unconfirmed callback leased for confirmation; `token` is its leased next_attempt_at."""

    event_id: int
    asset_id: str
    attempts: int
    token: datetime


def claim_unconfirmed(
    session: Session, *, now: datetime, lease: float, limit: int
) -> list[EventClaim]:
    """Lease due unconfirmed callbacks by moving their next attempt past the lease."""
    token = now + timedelta(seconds=lease)
    due = (
        select(WebhookEvent.id)
        .where(
            WebhookEvent.state == "unconfirmed",
            WebhookEvent.next_attempt_at <= now,
            WebhookEvent.object_id.is_not(None),
        )
        .order_by(WebhookEvent.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id.in_(due.scalar_subquery()))
        .values(next_attempt_at=token)
        .returning(WebhookEvent.id, WebhookEvent.object_id, WebhookEvent.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    return [EventClaim(row.id, row.object_id, row.attempts, token) for row in rows]


def _event_guard(claim: EventClaim) -> Any:
    return update(WebhookEvent).where(
        WebhookEvent.id == claim.event_id,
        WebhookEvent.state == "unconfirmed",
        WebhookEvent.next_attempt_at == claim.token,
    )


def confirm_event(
    session: Session, claim: EventClaim, facts: AssetFacts | None, *, now: datetime, grace: float
) -> bool:
    """Apply what `GET /assets/{id}` said and mark the callback processed; False if lost."""
    note = None if facts is not None else "GET /assets/{id} answered 404; nothing applied"
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        _event_guard(claim)
        .values(state="processed", processed_at=now, next_attempt_at=None, error=note)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:
        return False
    if facts is not None:
        record_asset(session, facts, source=Source.LOOKUP, now=now, grace=grace)
    return True


def retry_event_later(
    session: Session,
    claim: EventClaim,
    *,
    at: datetime,
    error: str | None,
    count_attempt: bool,
) -> None:
    """Put a callback back in the queue for `at`, counting an attempt when it was one."""
    values: dict[str, Any] = {"next_attempt_at": at}
    if count_attempt:
        values["attempts"] = claim.attempts + 1
        values["error"] = (error or "")[:2000] or None
    session.execute(
        _event_guard(claim).values(**values).execution_options(synchronize_session=False)
    )


# --- The worker process --------------------------------------------------------------------


def threads_for(rate_limit: float) -> int:
    """Size the pool so the whole rate limit can be in flight at the expected latency."""
    return max(2, min(MAX_THREADS, math.ceil(rate_limit * EXPECTED_LATENCY)))


def worker_id() -> str:
    """Name this process as a lease owner: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Nagger:
    """Log a standing problem once a minute, not on every call."""

    def __init__(self, interval: float = NAG_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, key: str) -> bool:
        """Return True if `key` was not logged in the last interval, and count it as logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                return False
            self._last[key] = now
            return True

    def __call__(self, key: str, level: int, message: str, *args: Any) -> None:
        if self.due(key):
            log.log(level, message, *args)


class Reconciler:
    """One worker: a main thread that claims and a small pool that looks up and writes."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        client: Lookups,
        settings: Settings,
        *,
        owner: str | None = None,
        threads: int | None = None,
        rng: random.Random | None = None,
        stats: ReconcilerStats = STATS,
    ) -> None:
        self.sessions = sessions
        self.client = client
        self.settings = settings
        self.policy = Policy.from_settings(settings)
        self.owner = owner or worker_id()
        self.threads = threads or threads_for(settings.shotstack_rate_limit)
        self.rng = rng or random.Random()
        self.stats = stats
        self.stopping = threading.Event()
        self._paused_until = 0.0  # monotonic: no claims before (a 429, a bad key)
        self._pause_lock = threading.Lock()
        self._nag = _Nagger()
        self._last_housekeeping = -math.inf
        self.events = Housekeeper(sessions, settings)  # failed callbacks, old events
        # Renders in hand at once: enough to keep the pool busy, few enough that all of them
        # are looked up well within one lease even at this worker's share of the rate limit.
        fits_in_lease = int(settings.shotstack_rate_limit * self.policy.lease * 0.5)
        self.in_hand = max(1, min(self.policy.batch, self.threads * 2, fits_in_lease))

    @contextmanager
    def _txn(self) -> Iterator[Session]:
        with self.sessions() as session, session.begin():
            yield session

    # -- pausing -------------------------------------------------------------------------

    def _pause(self, seconds: float) -> None:
        with self._pause_lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def paused_for(self) -> float:
        """Return the seconds left before this worker claims again (after a 429 or a 401)."""
        return max(0.0, self._paused_until - time.monotonic())

    def _held(self) -> bool:
        """True when a call whose slot has come should not be sent: stopping, or paused."""
        return self.stopping.is_set() or self.paused_for() > 0

    # -- one render ------------------------------------------------------------------------

    def process(self, claim: Claim, deadline: float) -> str | None:
        """Look one claimed render up and write the result; return its tracking or None."""
        render_id = claim.render_id
        left = deadline - time.monotonic()
        if self.stopping.is_set() or self.paused_for() > 0 or left <= 0:
            # Not started: hand it back untouched, for this worker later or another now.
            with self._txn() as session:
                release(session, owner=self.owner, render_ids=[render_id])
            return None
        try:
            # Bounded so that the answer is written while the lease holds: a call that could
            # not be kept would be repeated by the next owner.
            found = self.client.bounded(left, self._held).assets_by_render(render_id)
        except ShotstackHeld:
            # Its slot came after a SIGTERM or a 401: hand it back, as if never started.
            with self._txn() as session:
                release(session, owner=self.owner, render_ids=[render_id])
            return None
        except ShotstackRateLimited as exc:
            at = self._rate_limited(exc)
            with self._txn() as session:
                release(session, owner=self.owner, render_ids=[render_id], not_before=at)
            # A 429 (the whole deployment pauses) or a budget booked past this lease.
            log.warning("lookups deferred for %.1f s: %s", exc.retry_after, exc)
            return None
        except (ShotstackAuthError, ShotstackNotConfigured) as exc:
            self._auth_problem(exc)
            with self._txn() as session:
                release(session, owner=self.owner, render_ids=[render_id])
            return None
        except ShotstackError as exc:
            self.stats.add("lookups")
            self.stats.add("errors")
            with self._txn() as session:
                outcome = write_failure(
                    session,
                    claim,
                    str(exc),
                    owner=self.owner,
                    now=utcnow(),
                    policy=self.policy,
                    rng=self.rng,
                )
            log.info("lookup of render %s failed: %s", render_id, exc)
            return self._count(outcome)
        self.stats.add("lookups")
        self.stats.auth_failing = False
        with self._txn() as session:
            outcome = write_lookup(
                session,
                claim,
                found,
                owner=self.owner,
                now=utcnow(),
                policy=self.policy,
                rng=self.rng,
            )
        return self._count(outcome)

    def _count(self, outcome: str | None) -> str | None:
        name = {
            None: "lost_leases",
            "settled": "settled",
            "expired": "expired",
            "pending": "not_yet",
        }.get(outcome)
        if name:
            self.stats.add(name)
        return outcome

    def _rate_limited(self, exc: ShotstackRateLimited) -> datetime:
        """Count a 429 and pause this worker for it; return when the call may be made again."""
        self.stats.add("rate_limited")
        self._pause(exc.retry_after)
        return utcnow() + timedelta(seconds=exc.retry_after)

    def _auth_problem(self, exc: ShotstackError) -> None:
        self._pause(self.policy.auth_retry)
        if isinstance(exc, ShotstackNotConfigured):
            self.stats.not_configured = True
            self._nag("config", logging.WARNING, "Shotstack is not configured: %s", exc)
            return
        self.stats.add("auth_errors")
        self.stats.auth_failing = True
        self._nag(
            "auth",
            logging.ERROR,
            "Shotstack refused the key (wrong key or SHOTSTACK_ENV?): %s; no attempts are counted",
            exc,
        )

    # -- housekeeping --------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Run the steps besides render lookups; each keeps to its own short transactions.

        One line per step: each must return quickly and never raise for a passing problem.
        """
        self._step(self.confirm_callbacks)
        self._step(self.events)

    def _step(self, step: Callable[[], object]) -> None:
        name = getattr(step, "__name__", repr(step))
        try:
            step()
        except Exception:
            if self._nag.due(f"step:{name}"):  # a database outage would fail it every pass
                log.exception("housekeeping step %s failed", name)

    def confirm_callbacks(self) -> int:
        """Confirm stored `deleted`/unknown-status callbacks by `GET /assets/{id}`."""
        if self.paused_for() > 0:
            return 0
        with self._txn() as session:
            claims = claim_unconfirmed(
                session, now=utcnow(), lease=self.policy.lease, limit=self.policy.batch
            )
        if not claims:
            return 0
        done = 0
        for ok in self._pool.map(self._confirm_one, claims):
            done += ok
        return done

    def _confirm_one(self, claim: EventClaim) -> bool:
        """Confirm one leased callback by `GET /assets/{id}`; True when it was applied."""
        if self.stopping.is_set() or self.paused_for() > 0:  # not started: hand it back
            with self._txn() as session:
                retry_event_later(session, claim, at=utcnow(), error=None, count_attempt=False)
            return False
        try:
            bound = self.policy.lease * (1 - LEASE_MARGIN)
            facts = self.client.bounded(bound, self._held).get_asset(claim.asset_id)
        except ShotstackHeld:
            with self._txn() as session:
                retry_event_later(session, claim, at=utcnow(), error=None, count_attempt=False)
            return False
        except ShotstackRateLimited as exc:
            at = self._rate_limited(exc)
            with self._txn() as session:
                retry_event_later(session, claim, at=at, error=None, count_attempt=False)
            return False
        except (ShotstackAuthError, ShotstackNotConfigured) as exc:
            self._auth_problem(exc)
            with self._txn() as session:
                retry_event_later(session, claim, at=utcnow(), error=None, count_attempt=False)
            return False
        except ShotstackError as exc:
            delay = self.policy.backoff(claim.attempts + 1, self.rng)
            with self._txn() as session:
                retry_event_later(
                    session,
                    claim,
                    at=utcnow() + timedelta(seconds=delay),
                    error=str(exc),
                    count_attempt=True,
                )
            return False
        with self._txn() as session:
            ok = confirm_event(session, claim, facts, now=utcnow(), grace=self.policy.grace)
        if ok:
            self.stats.add("events_confirmed")
        return ok

    # -- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish the renders in hand and return (safe from a signal)."""
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: finishing the renders in hand", signum)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, *, once: bool = False) -> None:
        """Claim and look up until stopped; with `once`, only what is due now, then return."""
        log.info(
            "reconciler %s started: %d lookups in flight, %d renders in hand",
            self.owner,
            self.threads,
            self.in_hand,
        )
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lookup")
        started = utcnow()
        in_flight: dict[Future[str | None], Claim] = {}
        try:
            while not self.stopping.is_set():
                self._maybe_housekeeping()
                try:
                    self._top_up(in_flight, due_by=started if once else None)
                except SQLAlchemyError as exc:
                    # The database is down or slow: say so, and try again after a pause.
                    self._nag("db", logging.ERROR, "cannot claim renders: %s", exc)
                    if once and not in_flight:
                        raise
                    self.stopping.wait(self.policy.idle)
                    continue
                if not in_flight:
                    if once:
                        break
                    self.stopping.wait(self.paused_for() or self.policy.idle)
                    continue
                done, _ = wait(in_flight, timeout=self.policy.idle, return_when=FIRST_COMPLETED)
                for future in done:
                    self._settle_future(future, in_flight.pop(future))
        finally:
            self._shutdown(in_flight)
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _top_up(
        self, in_flight: dict[Future[str | None], Claim], *, due_by: datetime | None
    ) -> int:
        """Claim more renders when fewer than a poolful wait to be looked up."""
        if self.paused_for() > 0 or len(in_flight) > self.threads:
            return 0
        room = self.in_hand - len(in_flight)
        if room <= 0:
            return 0
        now = utcnow()
        with self._txn() as session:
            claims = claim_due(
                session,
                owner=self.owner,
                now=now,
                lease=self.policy.lease,
                limit=room,
                due_by=due_by,
            )
        # A render whose call would start in the last part of its lease is handed back.
        deadline = time.monotonic() + self.policy.lease * (1 - LEASE_MARGIN)
        for claim in claims:
            job = self._pool.submit(with_request_id, claim.render_id, self.process, claim, deadline)
            in_flight[job] = claim
        return len(claims)

    def _settle_future(self, future: Future[str | None], claim: Claim) -> None:
        exc = future.exception()
        if exc is not None:
            # A database error while writing: the lease runs out and another pass retries.
            log.error("render %s: %s: %s", claim.render_id, type(exc).__name__, exc)

    def _maybe_housekeeping(self) -> None:
        if time.monotonic() - self._last_housekeeping < self.policy.idle:
            return
        self._last_housekeeping = time.monotonic()
        with_request_id("housekeeping", self.housekeeping)

    def _shutdown(self, in_flight: dict[Future[str | None], Claim]) -> None:
        """Let the calls under way finish and write; hand back every other lease."""
        for future in list(in_flight):
            if future.cancel():
                in_flight.pop(future)
        for future, claim in list(in_flight.items()):
            try:
                future.result()
            except Exception as exc:
                log.error("render %s: %s: %s", claim.render_id, type(exc).__name__, exc)
        try:
            with self._txn() as session:
                released = release(session, owner=self.owner)
        except Exception:
            log.exception("could not release the leases; they end by themselves")
            released = 0
        counts = " ".join(f"{k}={v}" for k, v in self.stats.snapshot().items())
        log.info("reconciler %s stopped; %d leases released; %s", self.owner, released, counts)


# --- One-off commands ----------------------------------------------------------------------


def sync_render(
    sessions: sessionmaker[Session], client: Lookups, settings: Settings, render_id: str
) -> tuple[str | None, list[AssetFacts]]:
    """Look one render up now and write the result; return its tracking and what was found.

    The render is tracked if it was not. Raises ShotstackError when the lookup fails, and
    LookupError when a worker holds its lease right now.
    """
    policy = Policy.from_settings(settings)
    owner = f"sync:{worker_id()}"
    with sessions() as session, session.begin():
        now = utcnow()
        create_render(session, render_id, now=now, grace=policy.grace)
        claim = claim_one(session, render_id, owner=owner, now=now, lease=policy.lease)
    if claim is None:
        raise LookupError(f"render {render_id} is being looked up by a worker; try again")
    rng = random.Random()
    try:
        found = client.assets_by_render(render_id)
    except ShotstackError as exc:
        with sessions() as session, session.begin():
            if isinstance(exc, ShotstackAuthError | ShotstackNotConfigured | ShotstackRateLimited):
                release(session, owner=owner, render_ids=[render_id])
            else:
                write_failure(
                    session, claim, str(exc), owner=owner, now=utcnow(), policy=policy, rng=rng
                )
        raise
    with sessions() as session, session.begin():
        tracking = write_lookup(
            session, claim, found, owner=owner, now=utcnow(), policy=policy, rng=rng
        )
    return tracking, found


def sync_asset(
    sessions: sessionmaker[Session], client: Lookups, settings: Settings, asset_id: str
) -> AssetFacts | None:
    """Read one asset from Shotstack now and write it; None when Shotstack does not know it."""
    facts = client.get_asset(asset_id)
    if facts is not None:
        with sessions() as session, session.begin():
            record_asset(
                session,
                facts,
                source=Source.LOOKUP,
                now=utcnow(),
                grace=settings.reconcile_grace,
            )
    return facts


def run_worker(settings: Settings, *, once: bool = False) -> ReconcilerStats:
    """Run the reconciler process: engine, budget and client made here, after start.

    Returns its figures, which tell `--once` whether Shotstack refused the key.
    """
    from .db import make_engine
    from .shotstack import RateBudget, ServeClient

    threads = threads_for(settings.shotstack_rate_limit)
    # The threads spend their time waiting for slots and for Shotstack; their writes are short,
    # so a few connections serve them all and the database's connection limit is spared. They
    # wait for one rather than fail: the worker serves no one who is waiting.
    engine = make_engine(
        settings.database_url,
        pool_size=min(threads, DB_CONNECTIONS),
        max_overflow=2,
        pool_timeout=settings.reconcile_lease / 2,
    )
    budget = RateBudget(engine, settings.shotstack_rate_limit)
    client = ServeClient(settings, budget, pool_size=threads)
    if settings.shotstack_api_key is None:
        STATS.not_configured = True
        log.warning("SHOTSTACK_API_KEY is not set: renders stay due until it is")
    reconciler = Reconciler(
        sessionmaker(engine, expire_on_commit=False), client, settings, threads=threads
    )
    reconciler.install_signal_handlers()
    try:
        reconciler.run(once=once)
    finally:
        client.close()
        engine.dispose()
    return reconciler.stats
