"""Stored webhook events after the fact: retry the failed ones, forget the old ones (SPEC §5).

A callback whose processing failed stays stored as `failed` (service/webhooks.py). The worker
retries it with backoff; `asset-tracker replay` retries every failed event at once. Applying a
callback is idempotent, so a retry that races a redelivery, or a replay run twice, changes
nothing more. Events the service is done with are deleted after EVENT_RETENTION_DAYS, in
bounded batches so that no transaction holds many locks or runs long.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from .config import Settings
from .db import utcnow
from .metrics import EVENTS_PURGED, EVENTS_RETRIED
from .models import WebhookEvent
from .schemas import EditCallback, ServeCallback
from .webhooks import apply_callback

log = logging.getLogger(__name__)

RETRY_BASE = 30.0  # seconds before the second try; doubles with each failure
RETRY_CAP = 3600.0
# After this many failed tries the worker stops (next_attempt_at is cleared); the event stays
# `failed` for `asset-tracker replay`, which an operator runs once the cause is fixed.
MAX_AUTOMATIC_ATTEMPTS = 20
RETRY_BATCH = 100
DELETE_BATCH = 1000
DELETE_BATCHES_PER_RUN = 10
RETENTION_EVERY = 60.0  # seconds between two retention runs of one worker
# States the service is done with. `failed` waits for a retry, `unconfirmed` for a lookup.
FINISHED_STATES = ("processed", "ignored", "rejected")


def retry_delay(attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failed try: exponential, capped."""
    return float(min(RETRY_CAP, RETRY_BASE * 2 ** max(0, attempts - 1)))


def parse_stored(payload: Any) -> EditCallback | ServeCallback:
    """Read a stored payload back into the callback model it was applied with."""
    if not isinstance(payload, dict):
        raise ValueError("the stored payload is not a JSON object")
    kind = (payload.get("type"), payload.get("action"))
    if kind == ("edit", "render"):
        return EditCallback.model_validate(payload)
    if kind == ("serve", "copy"):
        return ServeCallback.model_validate(payload)
    raise ValueError(f"a stored event of type {kind[0]!r}/{kind[1]!r} is not applied")


@dataclass
class RetryReport:
    processed: int = 0
    failed: int = 0
    ids: list[int] = field(default_factory=list)


def retry_failed_events(
    session: Session,
    *,
    now: datetime,
    grace: float,
    limit: int = RETRY_BATCH,
    due_only: bool = True,
    after_id: int = 0,
) -> RetryReport:
    """Apply up to `limit` failed events again, each in its own SAVEPOINT; never commit.

    `due_only` takes only the events whose backoff has run out (the worker); without it,
    every failed event is taken (`replay`). Events are taken in id order after `after_id`,
    locked and skipped when another process holds them, so two workers never apply one
    event at once. A success marks the event `processed`; a failure bumps `attempts` and
    sets the next try.
    """
    query = (
        select(WebhookEvent)
        .where(WebhookEvent.state == "failed", WebhookEvent.id > after_id)
        .order_by(WebhookEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if due_only:
        query = query.where(
            WebhookEvent.next_attempt_at.is_not(None), WebhookEvent.next_attempt_at <= now
        )
    report = RetryReport()
    for event in session.scalars(query):
        report.ids.append(event.id)
        attempts = event.attempts + 1
        try:
            callback = parse_stored(event.payload)
            with session.begin_nested():
                apply_callback(session, callback, now=now, grace=grace)
        except (ValidationError, ValueError) as exc:
            # The payload itself cannot be applied: no retry will change that.
            event.attempts, event.next_attempt_at = attempts, None
            event.error = f"not retried: {type(exc).__name__}: {exc}"[:2000]
            report.failed += 1
            EVENTS_RETRIED.labels(outcome="unreadable").inc()
            continue
        except Exception as exc:
            event.attempts = attempts
            event.error = f"{type(exc).__name__}: {exc}"[:2000]
            event.next_attempt_at = (
                now + timedelta(seconds=retry_delay(attempts))
                if attempts < MAX_AUTOMATIC_ATTEMPTS
                else None
            )
            log.warning(
                "stored callback %s failed again (try %d)",
                event.id,
                attempts,
                extra={"event_id": event.id, "error": event.error},
            )
            report.failed += 1
            EVENTS_RETRIED.labels(outcome="failed").inc()
            continue
        event.state, event.attempts, event.error = "processed", attempts, None
        event.processed_at, event.next_attempt_at = now, None
        report.processed += 1
        EVENTS_RETRIED.labels(outcome="processed").inc()
    session.flush()
    return report


def delete_old_events(session: Session, *, before: datetime, limit: int = DELETE_BATCH) -> int:
    """Delete up to `limit` finished events received before `before`, oldest first; never commit.

    Return how many were deleted.
    """
    oldest = (
        select(WebhookEvent.id)
        .where(WebhookEvent.received_at < before, WebhookEvent.state.in_(FINISHED_STATES))
        .order_by(WebhookEvent.received_at)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        oldest = oldest.with_for_update(skip_locked=True)
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        delete(WebhookEvent)
        .where(WebhookEvent.id.in_(oldest.scalar_subquery()))
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)


# --- Edges: the worker's housekeeping and `replay` commit here ------------------------------


class Housekeeper:
    """The worker's event housekeeping: retries every call, retention at most once a minute."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        *,
        clock: Callable[[], datetime] = utcnow,
        retention_every: float = RETENTION_EVERY,
    ) -> None:
        self.sessions, self.settings, self.clock = sessions, settings, clock
        self.retention_every = retention_every
        self._last_retention = -float("inf")

    def __call__(self) -> None:
        self.retry()
        if time.monotonic() - self._last_retention >= self.retention_every:
            self._last_retention = time.monotonic()
            self.delete_old()

    def retry(self) -> RetryReport:
        """Retry the failed events that are due, one batch in one short transaction."""
        with self.sessions() as session, session.begin():
            report = retry_failed_events(
                session, now=self.clock(), grace=self.settings.reconcile_grace
            )
        if report.ids:
            log.info(
                "retried stored callbacks",
                extra={"processed": report.processed, "failed": report.failed},
            )
        return report

    def delete_old(self) -> int:
        """Delete finished events older than EVENT_RETENTION_DAYS, a few batches at most."""
        before = self.clock() - timedelta(days=self.settings.event_retention_days)
        total = 0
        for _ in range(DELETE_BATCHES_PER_RUN):
            with self.sessions() as session, session.begin():
                deleted = delete_old_events(session, before=before)
            total += deleted
            if deleted < DELETE_BATCH:
                break
        if total:
            EVENTS_PURGED.inc(total)
            log.info("deleted old webhook events", extra={"deleted": total})
        return total


def replay(
    sessions: sessionmaker[Session],
    settings: Settings,
    *,
    now: datetime | None = None,
    batch: int = RETRY_BATCH,
) -> RetryReport:
    """Retry every stored event that failed, whatever its backoff; commit batch by batch."""
    total = RetryReport()
    after = 0
    while True:
        with sessions() as session, session.begin():
            report = retry_failed_events(
                session,
                now=now or utcnow(),
                grace=settings.reconcile_grace,
                limit=batch,
                due_only=False,
                after_id=after,
            )
        total.processed += report.processed
        total.failed += report.failed
        total.ids += report.ids
        if len(report.ids) < batch:
            return total
        after = report.ids[-1]
