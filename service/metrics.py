"""Prometheus metrics: `GET /metrics` of the web, and the worker's own metrics server.

Under gunicorn, `PROMETHEUS_MULTIPROC_DIR` is set (gunicorn.conf.py sees to it) before this
module is imported, so every worker process writes its counters to files there and a scrape
of any worker sums them all. Counts of big tables are never taken per scrape: a collector
keeps them in the process for CACHE_SECONDS, and on a big Postgres table uses the planner's
statistics instead of counting.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, current_app, g, has_request_context, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine

from .models import ASSET_STATUSES, TRACKING_STATES, Asset, Render

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_SECONDS = 30.0
# Above this many rows (by the planner's estimate) a gauge reads pg_stats, not count(*).
EXACT_COUNT_LIMIT = 100_000
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 8.0, 10.0, 30.0)
CALLBACK_TYPES = ("edit", "serve")

# --- Web ----------------------------------------------------------------------------------

CALLBACKS = Counter(
    "asset_tracker_callbacks",
    "Callbacks received, by type and outcome (processed, ignored, duplicate, rejected, ...).",
    ["type", "outcome"],
)
HTTP_REQUESTS = Counter(
    "asset_tracker_http_requests",
    "HTTP requests answered, by route (the URL rule, not the path), method and status.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "asset_tracker_http_request_duration_seconds",
    "Time to answer an HTTP request, by route and method.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)

# --- Shotstack (web and worker) -----------------------------------------------------------

SHOTSTACK_CALLS = Counter(
    "asset_tracker_shotstack_calls",
    "Calls to the Shotstack Serve API, by endpoint and outcome.",
    ["endpoint", "outcome"],
)
SHOTSTACK_LATENCY = Histogram(
    "asset_tracker_shotstack_call_duration_seconds",
    "Duration of one call to the Shotstack Serve API, by endpoint.",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
RATE_BUDGET_WAIT = Histogram(
    "asset_tracker_rate_budget_wait_seconds",
    "Time a call waited for its slot in the shared Shotstack rate budget.",
    buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0),
)
AUTH_FAILURES = Counter(
    "asset_tracker_shotstack_auth_failures",
    "Shotstack answers of 401/403: a wrong key or environment.",
)

# --- Worker -------------------------------------------------------------------------------

LEASES_TAKEN_OVER = Counter(
    "asset_tracker_leases_taken_over",
    "Renders claimed whose earlier lease had ended without its worker finishing.",
)
EVENTS_RETRIED = Counter(
    "asset_tracker_events_retried",
    "Failed webhook events retried by the worker or `replay`, by outcome.",
    ["outcome"],
)
EVENTS_PURGED = Counter(
    "asset_tracker_events_deleted",
    "Processed webhook events deleted after EVENT_RETENTION_DAYS.",
)


def callback_type(value: Any) -> str:
    """Bound the label: a forged callback must not mint a new time series per request."""
    return value if value in CALLBACK_TYPES else "other"


def count_callback(event_type: Any, outcome: str) -> None:
    """Count one callback; the webhook view calls this once it knows the outcome."""
    CALLBACKS.labels(type=callback_type(event_type), outcome=outcome).inc()
    if has_request_context():
        g.callback_counted = True


def observe_shotstack(endpoint: str, outcome: str, seconds: float) -> None:
    SHOTSTACK_CALLS.labels(endpoint=endpoint, outcome=outcome).inc()
    SHOTSTACK_LATENCY.labels(endpoint=endpoint).observe(seconds)


def shotstack_endpoint(method: str, path: str) -> str:
    """Name a Serve API call by what it does, never by its ids (bounded labels)."""
    if path.startswith("/assets/render/"):
        return "assets_by_render"
    return "delete_asset" if method == "DELETE" else "get_asset"


_FAILURE_OUTCOMES = {
    "timed out": "timeout",
    "could not connect": "connection_error",
    "answered": "server_error",
}
_ERROR_OUTCOMES = {
    "ShotstackAuthError": "auth_error",
    "ShotstackRateLimited": "rate_limited",
}


def timed_attempt(method: str, path: str, attempt: Callable[[], T]) -> T:
    """Make one attempt of a Shotstack call, counting it by endpoint and outcome, timed.

    The outcome is the HTTP status of an answer, or what went wrong: timeout,
    connection_error, server_error (5xx), auth_error (401/403), rate_limited (429), error.
    """
    started = time.perf_counter()
    outcome = "error"
    try:
        result = attempt()
        status = getattr(result, "status_code", None)
        if status is not None:
            outcome = str(status)
        elif isinstance(result, str):
            outcome = next(
                (name for prefix, name in _FAILURE_OUTCOMES.items() if result.startswith(prefix)),
                "error",
            )
        return result
    except Exception as exc:
        outcome = _ERROR_OUTCOMES.get(type(exc).__name__, "error")
        if outcome == "auth_error":
            AUTH_FAILURES.inc()
        raise
    finally:
        observe_shotstack(shotstack_endpoint(method, path), outcome, time.perf_counter() - started)


# --- Gauges of table sizes, cached --------------------------------------------------------


class TableStates:
    """Renders by tracking state and assets by status, refreshed at most every CACHE_SECONDS."""

    def __init__(self, engine: Engine, ttl: float = CACHE_SECONDS) -> None:
        self.engine, self.ttl = engine, ttl
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._values: dict[str, dict[str, float]] = {}
        self.refreshes = 0

    def values(self) -> dict[str, dict[str, float]]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._values = self._read()
                    self.refreshes += 1
                except Exception as exc:  # a scrape must not fail with the database
                    log.warning("table state gauges not refreshed: %s", type(exc).__name__)
                # Failed or not, wait a full period: a down database is not hammered.
                self._at = time.monotonic()
            return self._values

    def _read(self) -> dict[str, dict[str, float]]:
        with self.engine.connect() as conn:
            found = {
                "renders": self._counts(conn, "renders", "tracking", Render.tracking),
                "assets": self._counts(conn, "assets", "status", Asset.status),
            }
            conn.rollback()
        return found

    def _counts(self, conn: Any, table: str, column: str, attr: Any) -> dict[str, float]:
        if conn.dialect.name == "postgresql":
            estimate = conn.execute(
                text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}
            ).scalar()
            if estimate is not None and estimate > EXACT_COUNT_LIMIT:
                return self._estimated(conn, table, column, float(estimate))
        rows = conn.execute(select(attr, func.count()).group_by(attr)).all()
        return {str(value): float(count) for value, count in rows}

    @staticmethod
    def _estimated(conn: Any, table: str, column: str, total: float) -> dict[str, float]:
        """Share out the planner's row estimate by the column's most common values."""
        row = conn.execute(
            text(
                "SELECT most_common_vals::text::text[], most_common_freqs FROM pg_stats"
                " WHERE schemaname = current_schema() AND tablename = :t AND attname = :c"
            ),
            {"t": table, "c": column},
        ).first()
        if row is None or row[0] is None:
            return {}
        return {str(v): round(total * float(f)) for v, f in zip(row[0], row[1], strict=False)}


class TableStatesCollector:
    """Expose TableStates as two gauge families at scrape time."""

    def __init__(self, states: TableStates) -> None:
        self.states = states

    def describe(self) -> list[Any]:
        return []  # no collect() at registration: that would query the database

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self.states.values()
        for table, label, states, about in (
            ("renders", "tracking", TRACKING_STATES, "Renders by tracking state"),
            ("assets", "status", ASSET_STATUSES, "Assets by status"),
        ):
            family = GaugeMetricFamily(
                f"asset_tracker_{table}",
                f"{about} (cached {CACHE_SECONDS:.0f} s; estimated on big tables).",
                labels=[label],
            )
            for state in states:
                family.add_metric([state], values.get(table, {}).get(state, 0.0))
            yield family


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition(extra: CollectorRegistry | None = None) -> bytes:
    """The text of a scrape: this process, or every process of the multiprocess directory."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        output = generate_latest(registry)
    else:
        output = generate_latest(REGISTRY)
    if extra is not None:
        output += generate_latest(extra)
    return bytes(output)


# --- Flask --------------------------------------------------------------------------------

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics_view() -> Response:
    registry: CollectorRegistry = current_app.extensions["metrics_registry"]
    return Response(exposition(registry), mimetype=None, content_type=CONTENT_TYPE_LATEST)


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _observe(response: Response) -> Response:
    started = g.pop("metrics_started", None)
    if started is None or request.endpoint == "metrics.metrics_view":
        return response
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    method = request.method if request.url_rule is not None else "other"
    HTTP_REQUESTS.labels(route=route, method=method, status=str(response.status_code)).inc()
    HTTP_LATENCY.labels(route=route, method=method).observe(time.perf_counter() - started)
    if request.endpoint == "webhooks.receive" and not g.get("callback_counted"):
        # Answered before the view knew a type: a bad token, a body too big, a database down.
        count_callback(None, f"http_{response.status_code}")
    return response


def init_app(app: Flask) -> None:
    registry = CollectorRegistry(auto_describe=False)
    states = TableStates(app.extensions["db"].engine)
    registry.register(TableStatesCollector(states))
    app.extensions["metrics_registry"] = registry
    app.extensions["metrics_states"] = states
    app.before_request(_start_timer)
    app.after_request(_observe)
    app.register_blueprint(bp)


# --- Worker -------------------------------------------------------------------------------


class WorkerCollector:
    """The worker's own figures at scrape time: its counters, and the lag of the oldest render.

    The lag says whether the workers keep up: how long the most overdue pending render has
    waited past its check time (0 when none is due). One indexed query per scrape.
    """

    def __init__(self, engine: Engine | None) -> None:
        self.engine = engine

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from .reconciler import STATS

        for name, value in STATS.snapshot().items():
            words = name.replace("_", " ")
            if isinstance(value, bool):
                gauge = GaugeMetricFamily(
                    f"asset_tracker_worker_{name}", f"1 while the worker finds: {words}."
                )
                gauge.add_metric([], float(value))
                yield gauge
            else:
                counter = CounterMetricFamily(
                    f"asset_tracker_worker_{name}", f"Worker outcomes counted: {words}."
                )
                counter.add_metric([], float(value))
                yield counter
        if self.engine is None:
            return
        try:
            seconds = self._lag()
        except Exception as exc:  # a scrape must not fail with the database
            log.warning("oldest due lag not read: %s", type(exc).__name__)
            return
        lag = GaugeMetricFamily(
            "asset_tracker_oldest_due_lag_seconds",
            "Seconds the oldest due pending render has waited past its check time.",
        )
        lag.add_metric([], seconds)
        yield lag

    def _lag(self) -> float:
        assert self.engine is not None
        now = datetime.now(UTC)
        with self.engine.connect() as conn:
            oldest = conn.execute(
                select(func.min(Render.next_check_at)).where(
                    Render.tracking == "pending", Render.next_check_at <= now
                )
            ).scalar()
        return 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())


_worker_collector: WorkerCollector | None = None


def serve_worker_metrics(
    port: int,
    *,
    database_url: str | None = None,
    start: Callable[..., Any] = start_http_server,
) -> int | None:
    """Serve this process's metrics on `port` (0: any free one); warn and go on if taken.

    With `database_url`, the lag of the oldest due render is read at each scrape. Return the
    port bound, or None when there is no metrics server.
    """
    try:
        server, _thread = start(port, addr="0.0.0.0")  # noqa: S104 - scraped from outside
    except OSError as exc:
        log.warning("worker metrics not served: port %s is unavailable (%s)", port, exc.strerror)
        return None
    global _worker_collector
    if _worker_collector is None:  # once per process: the registry is the process's
        engine = None
        if database_url is not None:
            from .db import make_engine

            engine = make_engine(database_url, pool_size=1, max_overflow=0)
        _worker_collector = WorkerCollector(engine)
        REGISTRY.register(_worker_collector)
    bound = int(server.server_address[1])
    log.info("worker metrics served", extra={"port": bound})
    return bound
