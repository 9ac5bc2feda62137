"""Benchmark POST /webhooks/shotstack: the real gunicorn web process against a floor.

Starts, in turn and with the same gunicorn settings (the project's gunicorn.conf.py, the same
worker and thread counts), the service (`service:create_app()`, on a database this script
creates and migrates) and bench/floor_app.py (one psycopg upsert and one commit per callback).
Each gets the same closed-loop load of distinct serve callbacks over keep-alive connections on
127.0.0.1; the service then also gets an open-loop load at a fixed rate, for its latency.

Prints callbacks/s of both and their ratio (target >= 0.8), and the service's p50/p99 latency
at 300 callbacks/s (target p99 < 50 ms). Two more apps of floor_app.py, under the same load,
split the gap: the service's statements sent with no Python around them (service-sql), and
the same statements inside one PL/pgSQL function (service-function). Everything is bounded in
time and count.

    .venv/bin/python bench/bench_webhooks.py [--workers 4] [--threads 4] [--seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from floor_app import service_function

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_NAME = os.environ.get("BENCH_DATABASE", "bench_webhooks")
TOKEN = "bench-token-0123456789"  # noqa: S105 (a throwaway secret of a throwaway database)
CONNECTIONS = 16
OPEN_LOOP_RATE = 300.0


def database_url() -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME


def prepare_database() -> None:
    """Create the bench database if needed, empty it and migrate it; add the floor's table."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone():
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (DB_NAME,),
            )
            conn.execute(f'DROP DATABASE "{DB_NAME}"')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    env = {**os.environ, "DATABASE_URL": database_url()}
    subprocess.run(
        [str(BIN / "alembic"), "upgrade", "head"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    with psycopg.connect(database_url(), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE floor_callbacks (dedupe_key text PRIMARY KEY, payload jsonb NOT NULL,"
            " received_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(service_function()[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def gunicorn(app: str, *, workers: int, threads: int, extra_env: dict[str, str]) -> Iterator[int]:
    """Run gunicorn with the project's config on a free loopback port; yield the port."""
    port = free_port()
    env = {**os.environ, **extra_env, "PORT": str(port)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn.conf.py makes a fresh one
    command = [
        str(BIN / "gunicorn"),
        "--config",
        str(ROOT / "gunicorn.conf.py"),
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--bind",
        f"127.0.0.1:{port}",
        "--pythonpath",
        f"{ROOT},{ROOT / 'bench'}",
        app,
    ]
    # Logs go to a file, never to an unread pipe that would block the server when full.
    with tempfile.TemporaryFile() as log_file:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    log_file.seek(0)
                    raise RuntimeError(f"{app} exited: {log_file.read().decode()[-2000:]}")
                with contextlib.suppress(OSError):
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/healthz")
                    if conn.getresponse().status == 200:
                        conn.close()
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{app} did not come up on port {port}")
                time.sleep(0.1)
            # Every worker answers before the clock starts (each imports and connects lazily),
            # and each connection has run each statement often enough for psycopg to prepare it
            # (prepare_threshold, 5 runs): the figures are of a warm server.
            warm(port, count=workers * threads * 25, tag=f"warm-{port}")
            yield port
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Feed:
    """Distinct serve callbacks, numbered, safe to draw from many threads."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._next = 0
        self._lock = threading.Lock()

    def body(self) -> bytes:
        with self._lock:
            n = self._next
            self._next += 1
        render = f"{self.tag}-r-{n // 3}"
        name = render + ("", "-poster", "-thumb")[n % 3] + (".mp4", ".jpg", ".jpg")[n % 3]
        return json.dumps(
            {
                "type": "serve",
                "action": "copy",
                "id": f"{self.tag}-a-{n}",
                "render": render,
                "owner": "5ca6hu7s9k",
                "status": "ready",
                "url": f"https://cdn.shotstack.io/au/stage/5ca6hu7s9k/{name}",
                "error": None,
                "completed": "2021-07-12T11:04:44.574Z",
            }
        ).encode()


def post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request(
        "POST",
        f"/webhooks/shotstack?token={TOKEN}",
        body=body,
        headers={"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    response.read()
    return response.status


def warm(port: int, *, count: int, tag: str) -> None:
    feed = Feed(tag)

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(count // CONNECTIONS + 1):
            post(conn, feed.body())
        conn.close()

    threads = [threading.Thread(target=run) for _ in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def closed_loop(port: int, *, seconds: float, tag: str) -> tuple[float, int]:
    """Drive CONNECTIONS keep-alive clients flat out for `seconds`; return (per second, errors)."""
    feed = Feed(tag)
    counts = [0] * CONNECTIONS
    errors = [0] * CONNECTIONS
    start_gate = threading.Barrier(CONNECTIONS + 1)
    stop_at = [0.0]

    def run(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        start_gate.wait()
        while time.monotonic() < stop_at[0]:
            if post(conn, feed.body()) == 200:
                counts[i] += 1
            else:
                errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CONNECTIONS)]
    for t in threads:
        t.start()
    started = time.monotonic()
    stop_at[0] = started + seconds
    start_gate.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return sum(counts) / elapsed, sum(errors)


def open_loop(port: int, *, rate: float, seconds: float, tag: str) -> tuple[list[float], int]:
    """Send at a fixed rate whatever the answers do; latency counts from the scheduled time.

    Each client connects and sends one unmeasured callback before the schedule starts, so
    that the figures are of a steady load, not of 32 connections opened in the same instant.
    """
    feed = Feed(tag)
    total = int(rate * seconds)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    slot = [0]
    clients = CONNECTIONS * 2
    ready = threading.Barrier(clients + 1)
    start = [0.0]

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        post(conn, feed.body())
        ready.wait()
        while True:
            with lock:
                n = slot[0]
                slot[0] += 1
            if n >= total:
                break
            due = start[0] + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            body = feed.body()
            status = post(conn, body)
            took = time.monotonic() - due
            with lock:
                latencies.append(took)
                if status != 200:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    start[0] = time.monotonic() + 0.2
    ready.wait()
    for t in threads:
        t.join()
    return latencies, errors[0]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def table_counts() -> dict[str, int]:
    with psycopg.connect(database_url()) as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            for table in ("webhook_events", "assets", "renders", "floor_callbacks")
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()

    prepare_database()
    service_env = {
        "DATABASE_URL": database_url(),
        "WEBHOOK_TOKEN": TOKEN,
        "API_KEYS": "bench:bench-api-key",
        "LOG_LEVEL": args.log_level,
    }
    apps = {
        "service": ("service:create_app()", service_env),
        "floor": ("floor_app:create_app()", {"FLOOR_DATABASE_URL": database_url()}),
        "service-sql": (
            "floor_app:create_app()",
            {"FLOOR_DATABASE_URL": database_url(), "FLOOR_MODE": "service-sql"},
        ),
        "service-function": (
            "floor_app:create_app()",
            {"FLOOR_DATABASE_URL": database_url(), "FLOOR_MODE": "service-function"},
        ),
    }
    shape = dict(workers=args.workers, threads=args.threads)
    rates: dict[str, list[float]] = {name: [] for name in apps}
    failures = 0
    # Take turns, so that none always runs on a warmer (or fuller) database.
    for round_no in range(args.rounds):
        for name, (app, env) in apps.items():
            with gunicorn(app, extra_env=env, **shape) as port:
                rate, errors = closed_loop(port, seconds=args.seconds, tag=f"{name}{round_no}")
                rates[name].append(rate)
                failures += errors
    latency: dict[str, tuple[float, float, int]] = {}
    for name in ("service", "floor"):
        app, env = apps[name]
        with gunicorn(app, extra_env=env, **shape) as port:
            latencies, errors = open_loop(
                port, rate=OPEN_LOOP_RATE, seconds=args.seconds, tag=f"open-{name}"
            )
            failures += errors
        latency[name] = (percentile(latencies, 50), percentile(latencies, 99), len(latencies))

    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"gunicorn gthread, {args.workers} workers x {args.threads} threads;"
        f" {CONNECTIONS} keep-alive clients; {os.cpu_count()} CPUs"
    )
    for name, values in rates.items():
        rounds = ", ".join(f"{r:.0f}" for r in values)
        print(f"{name + ':':18s} {median[name]:8.0f} callbacks/s  (rounds: {rounds})")
    print(f"ratio service/floor: {median['service'] / median['floor']:.2f}  (target >= 0.80)")
    print(
        f"  of which the SQL (service-sql/floor): {median['service-sql'] / median['floor']:.2f},"
        f" the Python around it (service/service-sql):"
        f" {median['service'] / median['service-sql']:.2f}"
    )
    print(
        "  the same SQL in one PL/pgSQL function, no Python around it (service-function/floor):"
        f" {median['service-function'] / median['floor']:.2f}  (a path the service does not have)"
    )
    for name, (p50, p99, count) in latency.items():
        print(
            f"{name} at {OPEN_LOOP_RATE:.0f}/s open loop, {count} callbacks:"
            f" p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
            + ("  (target p99 < 50 ms)" if name == "service" else "")
        )
    print(f"non-200 answers: {failures}; rows: {table_counts()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
