"""Reconciler throughput against the rate limit: `.venv/bin/python bench/bench_reconciler.py`.

A Serve stand-in that answers after 100 ms and enforces SHOTSTACK_RATE_LIMIT=50 itself (a
sliding one-second window; above it, 429), 2,000 tracked renders whose assets are ready at the
first lookup, and worker processes (`asset-tracker worker`) running until all are settled.
Prints lookups per second as a ratio of the limit (target >= 0.9) and the 429s (target 0).

The database is BENCH_DATABASE_URL (default: a database of its own on the local server, made
and migrated here; its schema is dropped first).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import psycopg
from sqlalchemy import func, select, text
from sqlalchemy.orm import sessionmaker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.assets import create_render  # noqa: E402
from service.config import Settings  # noqa: E402
from service.db import make_engine, utcnow  # noqa: E402
from service.models import Render  # noqa: E402
from service.shotstack import RateBudget  # noqa: E402
from tests.conftest import migrate  # noqa: E402
from tests.standin import ServeStandIn, _Fault  # noqa: E402

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/asset_tracker_bench_reconciler"
KEY = "bench-key-0123456789"


class LimitedStandIn(ServeStandIn):
    """The stand-in, enforcing the rate limit as Shotstack's gateway does: 429 above it."""

    def __init__(self, limit: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.limit = limit
        self.window: deque[float] = deque()
        self.rejected = 0

    def _record(self, method: str, path: str) -> _Fault | None:
        fault = super()._record(method, path)
        with self._lock:
            now = time.monotonic()
            self.window.append(now)
            while self.window and now - self.window[0] > 1.0:
                self.window.popleft()
            if len(self.window) > self.limit:
                self.rejected += 1
                return _Fault(429, "1", None)
        return fault


def database(url: str) -> str:
    """Create the bench database when missing; return its SQLAlchemy URL."""
    base, _, name = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return Settings(_env_file=None, database_url=url).database_url  # type: ignore[call-arg]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--renders", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--verbose", action="store_true", help="print lookups per second")
    args = parser.parse_args()

    url = database(os.environ.get("BENCH_DATABASE_URL", DEFAULT_URL))
    engine = make_engine(url)
    migrate(engine)
    budget = RateBudget(engine, args.limit)
    budget.reset()
    interval = budget.interval  # the budget's spacing: its own ceiling is 1 / (interval * limit)

    standin = LimitedStandIn(args.limit, api_key=KEY, latency=args.latency)
    standin.start()
    for n in range(args.renders):
        standin.add_asset(f"asset-{n:05d}", f"render-{n:05d}")
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "SHOTSTACK_API_URL": standin.url,
        "SHOTSTACK_API_KEY": KEY,
        "SHOTSTACK_RATE_LIMIT": str(args.limit),
        "RECONCILE_GRACE": "0",
        "RECONCILE_IDLE": "0.2",
        "WORKER_METRICS_PORT": "0",
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "text",
    }
    workdir = tempfile.mkdtemp(prefix="bench-reconciler-")
    bin_dir = Path(sys.executable).parent
    logs = [Path(workdir) / f"worker-{n}.log" for n in range(args.workers)]
    workers = []
    for log in logs:
        with log.open("wb") as out:
            workers.append(
                subprocess.Popen(
                    [str(bin_dir / "asset-tracker"), "worker"],
                    env=env,
                    cwd=workdir,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        # The workers are long-running; renders arrive while they run. So the renders are
        # tracked once every worker is up, and the figure is not a measure of start-up.
        while not all("started:" in log.read_text(errors="replace") for log in logs):
            if any(worker.poll() is not None for worker in workers):
                raise SystemExit("a worker exited: see " + workdir)
            time.sleep(0.1)
        now = utcnow()
        with sessionmaker(engine).begin() as session:
            for n in range(args.renders):
                create_render(session, f"render-{n:05d}", now=now, grace=0)
        settled = 0
        give_up = time.monotonic() + 20 * args.renders / args.limit + 60
        while settled < args.renders and time.monotonic() < give_up:
            time.sleep(0.5)
            with engine.connect() as conn:
                settled = conn.execute(
                    select(func.count()).where(Render.tracking == "settled")
                ).scalar_one()
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = [worker.wait(timeout=60) for worker in workers]
        standin.stop()
    problems = [
        line
        for log in logs
        for line in log.read_text(errors="replace").splitlines()
        if " ERROR " in line or " WARNING " in line
    ]
    for line in problems[:10]:
        print("worker:", line)

    lookups = [t for t, _, p in standin.calls if "/assets/render/" in p]
    span = lookups[-1] - lookups[0] if len(lookups) > 1 else float("nan")
    # n calls spaced over `span` seconds: (n - 1) intervals, the rate the budget achieved.
    rate = (len(lookups) - 1) / span
    with engine.connect() as conn:
        repeated = conn.execute(
            text("SELECT count(*) FROM renders WHERE attempts > 1 OR tracking <> 'settled'")
        ).scalar_one()
    engine.dispose()
    ratio = rate / args.limit
    print(
        f"reconciler: {settled}/{args.renders} renders settled by {args.workers} workers; "
        f"{len(lookups)} lookups in {span:.1f} s = {rate:.1f}/s = {ratio:.3f} of the limit "
        f"{args.limit}/s (target >= 0.9); 429s: {standin.rejected} (target 0); "
        f"busiest 1 s window: {standin.max_in_window(1.0)} calls; "
        f"renders not settled at the first lookup: {repeated}; worker exit codes {codes}; "
        f"the budget's spacing allows at most {1 / (interval * args.limit):.3f} of the limit"
    )
    if args.verbose and lookups:
        per_second = [0] * (int(span) + 1)
        for t in lookups:
            per_second[int(t - lookups[0])] += 1
        print("lookups per second:", per_second)
        gaps = [b - a for a, b in itertools.pairwise(lookups)]
        long_gaps = [g for g in gaps if g > 1.5 * interval]
        print(
            f"gaps between lookups: median {sorted(gaps)[len(gaps) // 2] * 1000:.1f} ms; "
            f"{len(long_gaps)} longer than {1.5 * interval * 1000:.0f} ms, "
            f"{sum(long_gaps):.1f} s in all"
        )
    ok = settled == args.renders and ratio >= 0.9 and standin.rejected == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
