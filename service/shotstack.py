"""Shotstack's Serve API behind one client: timeouts, retries, typed errors, one shared budget.

Every call, from any process on any host, first takes a slot from the rate budget kept in the
`shotstack_budget` row (SPEC §5), so the deployment as a whole never sends more than
SHOTSTACK_RATE_LIMIT calls in any one-second window, and a 429 pauses everyone.
"""

from __future__ import annotations

import copy
import email.utils
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import requests
from flask import Flask, current_app
from requests.adapters import HTTPAdapter
from sqlalchemy import Connection, insert, select, text, update
from sqlalchemy.engine import Engine

from .assets import STATUS_RANK, AssetFacts
from .config import Settings
from .metrics import RATE_BUDGET_WAIT, timed_attempt
from .models import ShotstackBudget

log = logging.getLogger(__name__)

BUDGET_ID = 1
DEFAULT_PAUSE = 60.0  # SPEC §5: a 429 without Retry-After pauses for a minute
# The spacing is stretched by this many seconds per `rate` calls, so that calls reaching
# Shotstack a little later than their slots (a busy CPU, sleep overshoot, the network) still
# cannot put limit + 1 calls into one second: it absorbs up to 70 ms of such lateness per
# second. Measured on 2 busy cores: up to ~27 ms from slot to send (later ones rebook, see
# LATE_RETRIES), ~30 ms from send to arrival. It costs 7 % of the throughput.
JITTER_MARGIN = 0.07
# A call that wakes later than this after its slot gives the slot up and takes a new one,
# since sent late it could crowd the calls of the slots after it into one second.
LATE_RETRIES = 3
WEB_DEADLINE = 8.0  # SPEC §4: calls made while serving a request
STATUS_IF_UNKNOWN = "importing"  # not settled, never terminal, overruled by any later status


class ShotstackError(Exception):
    """A call to Shotstack did not succeed; the message never holds the API key."""


class ShotstackUnavailable(ShotstackError):
    """Shotstack answered 5xx, timed out or could not be reached, after the retries."""


class ShotstackRateLimited(ShotstackError):
    """Shotstack answered 429, or the deployment is paused, or the budget is too far ahead."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, retry_after)


class ShotstackAuthError(ShotstackError):
    """Shotstack refused the key (401/403): a wrong key or the wrong environment."""


class ShotstackNotConfigured(ShotstackError):
    """SHOTSTACK_API_KEY is not set, so no call is made."""


class ShotstackHeld(ShotstackError):
    """The call was not sent: its caller's `hold` said so once the slot came (stop, pause)."""


# --- The shared budget -----------------------------------------------------------------------

# One statement, so the row is locked only for its own duration: take the next free slot,
# at least now, and move the next free slot one interval past it. Refused (no row) while
# paused or when the slot is further away than the caller will wait. Postgres's clock is
# the one clock every host shares.
_RESERVE_PG = text(
    """
    WITH clock AS (SELECT clock_timestamp() AS now)
    UPDATE shotstack_budget AS b
    SET next_slot_at = greatest(coalesce(b.next_slot_at, clock.now), clock.now)
        + make_interval(secs => :interval)
    FROM clock
    WHERE b.id = :id
      AND (b.paused_until IS NULL OR b.paused_until <= clock.now)
      AND (CAST(:max_wait AS double precision) IS NULL
           OR b.next_slot_at IS NULL
           OR b.next_slot_at <= clock.now + make_interval(secs => :max_wait))
    RETURNING extract(epoch FROM b.next_slot_at - clock.now) - :interval
    """
)


class RateBudget:
    """The deployment's one budget of calls to Shotstack, kept in the database (SPEC §5).

    Calls are spaced evenly, `(1 + jitter_margin) / rate` seconds apart, with no burst: an
    even spacing is the only schedule that keeps every one-second window, however placed,
    within the limit without knowing where Shotstack's gateway starts counting.
    Every method uses its own short transaction on `engine`, never a caller's session.
    """

    def __init__(self, engine: Engine, rate: float, *, jitter_margin: float = JITTER_MARGIN):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.engine = engine
        self.rate = rate
        self.interval = (1.0 + jitter_margin) / rate
        self.late_tolerance = jitter_margin / 2
        self._postgres = engine.dialect.name == "postgresql"

    def acquire(self, *, max_wait: float | None = None) -> None:
        """Reserve the next slot, then sleep until it with no transaction open.

        A slot woken up to too late is given up for a new one (LATE_RETRIES times at most).
        Raise ShotstackRateLimited while the deployment is paused (also when a pause began
        while this call waited for its slot), or when the slot would be
        more than `max_wait` seconds away (then no slot is taken).
        """
        until = None if max_wait is None else time.monotonic() + max_wait
        for attempt in range(LATE_RETRIES + 1):
            start = time.monotonic()
            left = None if until is None else max(0.0, until - start)
            delay = self.reserve(max_wait=left)
            RATE_BUDGET_WAIT.observe(delay)
            if delay > 0:
                time.sleep(delay)
                # A 429 may have paused everyone while this call waited for its slot.
                left = self.paused_for()
                if left > 0:
                    raise ShotstackRateLimited(
                        f"calls to Shotstack are paused for {left:.1f} s after a 429", left
                    )
            late = time.monotonic() - (start + delay)
            if late <= self.late_tolerance or attempt == LATE_RETRIES:
                return
            log.debug("woke %.0f ms after the slot; taking a new one", late * 1000)

    def reserve(self, *, max_wait: float | None = None) -> float:
        """Reserve the next slot; return the seconds until it (acquire without the sleep)."""
        if self._postgres:
            # Autocommit: the row lock ends with the statement, not a round trip later at
            # COMMIT, so many processes reserving at once do not queue on it and lose slots.
            autocommit = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            with autocommit as conn:
                fast = conn.execute(
                    _RESERVE_PG,
                    {"id": BUDGET_ID, "interval": self.interval, "max_wait": max_wait},
                ).scalar()
            if fast is not None:
                return max(0.0, float(fast))
        # Refused (paused, booked too far ahead) or SQLite: find out why in a transaction.
        for _ in range(2):
            with self.engine.begin() as conn:
                if self._postgres:
                    delay = conn.execute(
                        _RESERVE_PG,
                        {"id": BUDGET_ID, "interval": self.interval, "max_wait": max_wait},
                    ).scalar()
                else:
                    delay = self._reserve_portable(conn, max_wait)
                if delay is not None:
                    return max(0.0, float(delay))
                row = conn.execute(
                    select(ShotstackBudget.next_slot_at, ShotstackBudget.paused_until).where(
                        ShotstackBudget.id == BUDGET_ID
                    )
                ).one_or_none()
                if row is None:  # a database migrated without its row: put it back
                    conn.execute(insert(ShotstackBudget).values(id=BUDGET_ID))
                    continue
                now = self._now(conn)
                if row.paused_until is not None and row.paused_until > now:
                    left = (row.paused_until - now).total_seconds()
                    raise ShotstackRateLimited(
                        f"calls to Shotstack are paused for {left:.1f} s after a 429", left
                    )
                if row.next_slot_at is None or max_wait is None:
                    continue  # the pause ended between the two statements: try again
                left = (row.next_slot_at - now).total_seconds()
                raise ShotstackRateLimited(
                    f"the Shotstack rate budget is booked {left:.1f} s ahead", left
                )
        raise ShotstackRateLimited("the Shotstack rate budget is contended", self.interval)

    def _reserve_portable(self, conn: Connection, max_wait: float | None) -> float | None:
        """Reserve by compare-and-set, for SQLite (one host, so one clock; writers serialize)."""
        budget = ShotstackBudget.__table__.c
        for _ in range(50):
            row = conn.execute(
                select(budget.next_slot_at, budget.paused_until).where(budget.id == BUDGET_ID)
            ).one_or_none()
            if row is None:
                return None
            now = self._now(conn)
            if row.paused_until is not None and row.paused_until > now:
                return None
            slot = max(row.next_slot_at or now, now)
            if max_wait is not None and (slot - now).total_seconds() > max_wait:
                return None
            same = (
                budget.next_slot_at.is_(None)
                if row.next_slot_at is None
                else budget.next_slot_at == row.next_slot_at
            )
            changed = conn.execute(
                update(ShotstackBudget)
                .where(budget.id == BUDGET_ID, same)
                .values(next_slot_at=slot + timedelta(seconds=self.interval))
            )
            if changed.rowcount == 1:
                return (slot - now).total_seconds()
        return None

    def pause(self, seconds: float) -> None:
        """Pause every process's calls for `seconds` (after a 429); never shorten a pause."""
        with self.engine.begin() as conn:
            until = self._now(conn) + timedelta(seconds=seconds)
            budget = ShotstackBudget.__table__.c
            conn.execute(
                update(ShotstackBudget)
                .where(
                    budget.id == BUDGET_ID,
                    (budget.paused_until.is_(None)) | (budget.paused_until < until),
                )
                .values(paused_until=until)
            )
        log.warning("Shotstack answered 429: every process pauses its calls for %.1f s", seconds)

    def paused_for(self) -> float:
        """Return the seconds left of a pause, 0 when calls may go."""
        with self.engine.begin() as conn:
            until = conn.execute(
                select(ShotstackBudget.paused_until).where(ShotstackBudget.id == BUDGET_ID)
            ).scalar()
            now = self._now(conn)
        return max(0.0, (until - now).total_seconds()) if until else 0.0

    def record_auth_error(self, message: str | None) -> None:
        """Set (or with None, clear) the auth error that /readyz shows."""
        budget = ShotstackBudget.__table__.c
        with self.engine.begin() as conn:
            if message is None:
                conn.execute(
                    update(ShotstackBudget)
                    .where(budget.id == BUDGET_ID, budget.auth_error.is_not(None))
                    .values(auth_error=None, auth_error_at=None)
                )
            else:
                conn.execute(
                    update(ShotstackBudget)
                    .where(budget.id == BUDGET_ID)
                    .values(auth_error=message[:500], auth_error_at=self._now(conn))
                )

    def auth_error(self) -> str | None:
        """Return the auth error recorded by the last call that had one, if not cleared."""
        with self.engine.begin() as conn:
            return conn.execute(
                select(ShotstackBudget.auth_error).where(ShotstackBudget.id == BUDGET_ID)
            ).scalar()

    def reset(self) -> None:
        """Forget slots, pause and auth error (tests; an operator after a key change)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(ShotstackBudget)
                .where(ShotstackBudget.id == BUDGET_ID)
                .values(next_slot_at=None, paused_until=None, auth_error=None, auth_error_at=None)
            )

    def _now(self, conn: Connection) -> datetime:
        if self._postgres:
            now: datetime = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
            return now.astimezone(UTC)
        return datetime.now(UTC)


# --- The client ------------------------------------------------------------------------------


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _resources(body: Any) -> Iterator[dict[str, Any]]:
    """Yield the attributes of each resource of a Serve answer, whatever its shape."""
    data = body.get("data") if isinstance(body, dict) else None
    items = data if isinstance(data, list) else [data]
    for item in items:
        if isinstance(item, dict):
            attributes = item.get("attributes", item)
            if isinstance(attributes, dict):
                yield attributes


def parse_asset(attributes: dict[str, Any], *, render_id: str | None = None) -> AssetFacts | None:
    """Read one asset's attributes leniently; None when it has no id or render id."""
    asset_id = _text(attributes.get("id"))
    render = _text(attributes.get("renderId")) or render_id
    if asset_id is None or render is None:
        return None
    status = _text(attributes.get("status")) or STATUS_IF_UNKNOWN
    if status not in STATUS_RANK:
        log.warning("Shotstack gave asset %s the unknown status %r", asset_id, status[:40])
        status = STATUS_IF_UNKNOWN
    return AssetFacts(
        id=asset_id,
        render_id=render,
        status=status,
        owner=_text(attributes.get("owner")),
        region=_text(attributes.get("region")),
        filename=_text(attributes.get("filename")),
        url=_text(attributes.get("url")),
        created=_parse_time(attributes.get("created")),
        updated=_parse_time(attributes.get("updated")),
    )


def retry_after_seconds(value: str | None) -> float | None:
    """Read a Retry-After header: seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class ServeClient:
    """The Serve API of SHOTSTACK_ENV: get an asset, list a render's assets, delete an asset.

    Every attempt takes a slot from `budget`. 5xx answers, timeouts and connection errors are
    retried with exponential backoff and full jitter (`max_retries` times; 3, or 1 when a
    `deadline` is given); a 429 pauses the budget and is raised at once. `deadline` bounds
    each public call in total, seconds; `pool_size` is the connections kept for threads.
    """

    def __init__(
        self,
        settings: Settings,
        budget: RateBudget,
        *,
        deadline: float | None = None,
        max_retries: int | None = None,
        backoff: float = 0.5,
        pool_size: int = 4,
    ) -> None:
        self.settings = settings
        self.budget = budget
        self.base = settings.serve_url
        self.timeout = settings.shotstack_timeout
        self.deadline = deadline
        self.max_retries = max_retries if max_retries is not None else (1 if deadline else 3)
        self.backoff = backoff
        key = settings.shotstack_api_key
        self._key = key.get_secret_value() if key else None
        self._until: float | None = None
        self._hold: Callable[[], bool] | None = None
        self.session = requests.Session()
        # Our own loop retries, so that every attempt takes a slot from the budget.
        # `pool_size`: connections kept for reuse; the worker passes its number of threads.
        adapter = HTTPAdapter(max_retries=0, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"Accept": "application/json", "User-Agent": "asset-tracker"})
        if self._key:
            self.session.headers["x-api-key"] = self._key

    def bounded(
        self, total: float = WEB_DEADLINE, hold: Callable[[], bool] | None = None
    ) -> ServeClient:
        """Return a client sharing this one's session whose calls together end within `total`.

        It keeps this client's retries: the web app's client (made with a deadline) has one.
        `hold` is asked after each wait for a budget slot: True raises ShotstackHeld instead
        of sending (the worker stopping, or paused by a 401 that another thread met meanwhile).
        """
        clone = copy.copy(self)
        clone.deadline = total
        clone._hold = hold
        clone._until = time.monotonic() + total
        return clone

    def close(self) -> None:
        self.session.close()

    # --- the three calls -------------------------------------------------------------------

    def get_asset(self, asset_id: str) -> AssetFacts | None:
        """Look an asset up by its id; None when Shotstack does not know it (404)."""
        response = self._call("GET", f"/assets/{quote(asset_id, safe='')}")
        if response is None:
            return None
        found = [
            facts for attrs in _resources(self._json(response)) if (facts := parse_asset(attrs))
        ]
        if not found:
            raise ShotstackUnavailable(f"Shotstack's answer for asset {asset_id} holds no asset")
        return next((f for f in found if f.id == asset_id), found[0])

    def assets_by_render(self, render_id: str) -> list[AssetFacts]:
        """List a render's assets; [] when Shotstack has none yet (an empty list or a 404)."""
        response = self._call("GET", f"/assets/render/{quote(render_id, safe='')}")
        if response is None:
            return []
        resources = _resources(self._json(response))
        return [f for a in resources if (f := parse_asset(a, render_id=render_id))]

    def delete_asset(self, asset_id: str) -> None:
        """Delete an asset; a 404 means it is already gone, which is as good."""
        self._call("DELETE", f"/assets/{quote(asset_id, safe='')}")

    # --- one call, with its attempts ---------------------------------------------------------

    def _json(self, response: requests.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ShotstackUnavailable(
                f"Shotstack answered {response.status_code} with a body that is not JSON"
            ) from None

    def _scrub(self, message: str) -> str:
        return message.replace(self._key, "***") if self._key else message

    def _call(self, method: str, path: str) -> requests.Response | None:
        """Make one call with its retries; None for a 404; raise a ShotstackError otherwise."""
        if not self._key:
            raise ShotstackNotConfigured(
                "SHOTSTACK_API_KEY is not set, so Shotstack cannot be called"
            )
        until = self._until
        if until is None and self.deadline is not None:
            until = time.monotonic() + self.deadline
        what = f"{method} {self.base}{path}"
        attempt = 0
        while True:
            left = None if until is None else until - time.monotonic()
            if left is not None and left <= 0:
                raise ShotstackUnavailable(f"{what}: no answer within the deadline")
            self.budget.acquire(max_wait=left)
            if self._hold is not None and self._hold():
                raise ShotstackHeld(f"{what}: not sent; the worker stops or is paused")
            failure = timed_attempt(method, path, lambda: self._attempt(method, path, what, until))
            if isinstance(failure, requests.Response):
                return failure if failure.status_code != 404 else None
            attempt += 1
            delay = random.uniform(0, self.backoff * 2 ** (attempt - 1))
            left = None if until is None else until - time.monotonic()
            if attempt > self.max_retries or (left is not None and left <= delay):
                raise ShotstackUnavailable(f"{what}: {failure}")
            log.warning("%s: %s; retry %d in %.2f s", what, failure, attempt, delay)
            time.sleep(delay)

    def _attempt(
        self, method: str, path: str, what: str, until: float | None
    ) -> requests.Response | str:
        """Make one attempt; return the response to use, or a reason to retry."""
        connect, read = self.timeout
        if until is not None:
            left = max(0.05, until - time.monotonic())
            connect, read = min(connect, left), min(read, left)
        try:
            response = self.session.request(
                method, self.base + path, timeout=(connect, read), allow_redirects=False
            )
        except requests.Timeout:
            return "timed out"
        except requests.ConnectionError as exc:
            return f"connection failed ({type(exc).__name__})"
        except requests.RequestException as exc:
            return f"failed ({type(exc).__name__})"
        status = response.status_code
        if status >= 500:
            return f"answered {status}"
        if status in (401, 403):
            message = self._scrub(
                f"Shotstack refused the API key ({status} {self._message(response)}): "
                f"check SHOTSTACK_API_KEY and that it is a key of SHOTSTACK_ENV="
                f"{self.settings.shotstack_env}"
            )
            self.budget.record_auth_error(message)
            raise ShotstackAuthError(f"{what}: {message}")
        if status == 429:
            wait = retry_after_seconds(response.headers.get("Retry-After"))
            wait = DEFAULT_PAUSE if wait is None else wait
            self.budget.pause(wait)
            raise ShotstackRateLimited(f"{what}: answered 429; paused for {wait:.0f} s", wait)
        if status in (200, 204, 404):
            self.budget.record_auth_error(None)
            return response
        raise ShotstackError(
            self._scrub(f"{what}: answered {status} {self._message(response)}".rstrip())
        )

    def _message(self, response: requests.Response) -> str:
        """Return the `message` of an error body, short, or nothing."""
        try:
            body = response.json()
        except ValueError:
            return ""
        message = body.get("message") if isinstance(body, dict) else None
        return f"{message[:200]!r}" if isinstance(message, str) else ""


def ceil_seconds(seconds: float) -> int:
    """Round a wait up to whole seconds for a Retry-After header (at least 1)."""
    return max(1, math.ceil(seconds))


def init_app(app: Flask) -> None:
    """Give the app its budget and client, made after any fork, on the app's engine."""
    settings: Settings = app.config["SETTINGS"]
    engine = app.extensions["db"].engine
    budget = RateBudget(engine, settings.shotstack_rate_limit)
    app.extensions["shotstack"] = ServeClient(settings, budget, deadline=WEB_DEADLINE)


def get_client(app: Flask | None = None) -> ServeClient:
    """The app's client; use `.bounded()` for the calls of one request."""
    client: ServeClient = (app or current_app).extensions["shotstack"]
    return client
