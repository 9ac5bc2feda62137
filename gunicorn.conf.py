"""gunicorn settings for the `web` process (see Procfile): `gunicorn -c gunicorn.conf.py ...`.

The workload: Shotstack's callbacks must be answered well under 1 s (it gives up after 10 s and
retries), while an API request that calls Shotstack may wait up to 8 s. So a slow Shotstack
call must never hold the thread that a callback needs.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
from typing import Any

import gunicorn.util

from service.config import ConfigError, load_settings

# Bad configuration stops the start with one line (SPEC §2), before any worker boots: a
# worker failing in create_app() would end in gunicorn's traceback instead.
try:
    load_settings()
except ConfigError as exc:
    sys.stderr.write(f"asset-tracker: {exc}\n")
    sys.exit(2)

# Threads, not processes alone: a request waiting on Shotstack (or on Postgres) blocks one
# thread of a worker, and the other threads keep answering callbacks. gthread also keeps
# its heartbeat on the main thread, so a long request never looks like a hung worker.
worker_class = "gthread"


# WEB_CONCURRENCY is the platform's convention for the number of processes. The default of
# two per core (at least 2) keeps one crash or GC pause from stalling everything; each has
# `threads` threads, well within the database pool of each process (5 + 10 overflow).
def _count(name: str, default: int) -> int:
    """A positive whole number from the environment; anything else stops the start in one line."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = int(raw) if raw.isdigit() else 0
    if value < 1:  # 0 would start a master with no worker: up, and answering no one
        sys.stderr.write(f"asset-tracker: {name}: must be a whole number of at least 1\n")
        sys.exit(2)
    return value


workers = _count("WEB_CONCURRENCY", max(2, 2 * (os.cpu_count() or 1)))
threads = _count("GUNICORN_THREADS", 8)
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# Longer than the 8 s deadline of a Shotstack call plus a database timeout, so a slow but
# healthy request is never killed; a stuck one is.
timeout = 30
graceful_timeout = 20
# Behind a load balancer that reuses connections; longer than the default 2 s avoids
# reconnecting for each of a burst of callbacks.
keepalive = 5

# The platform manages the process with signals; gunicorn 27's control socket would put one
# fixed path in $HOME for every gunicorn on the host.
control_socket_disable = True

# Logs go to stdout, as JSON lines, through the service's logger class: its access line has
# the path but never the query string, where the webhook token travels (SPEC §3), and every
# line passes the redactor of service/logs.py.
accesslog = "-"
errorlog = "-"
logger_class = "service.logs.GunicornLogger"


def _json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own refusals (a request line or headers too long, a request it cannot
    parse) as JSON:API errors like every other answer, not its HTML page (SPEC §4)."""
    from gunicorn.util import write_nonblock

    from service.logs import redact  # the detail may quote the request line, token and all

    error = {
        "status": str(status_int),
        "code": reason.lower().replace(" ", "_"),
        "title": reason,
        "detail": redact(mesg) or reason,
    }
    body = json.dumps({"errors": [error]}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/vnd.api+json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    write_nonblock(sock, head.encode("latin-1") + body)


# gunicorn has no setting for its error page; its workers call this function by name.
gunicorn.util.write_error = _json_error

# Metrics from all worker processes are summed by prometheus_client's multiprocess mode: each
# process writes its values to files in this directory. It must be set before the app (and
# prometheus_client) is imported, and it must not hold files of an earlier run.
_made_metrics_dir = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _made_metrics_dir = tempfile.mkdtemp(prefix="asset-tracker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _made_metrics_dir


def on_starting(server: Any) -> None:
    """Forget the metrics of an earlier run that used the same directory."""
    for stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(stale)


def on_exit(server: Any) -> None:
    """Remove the metrics directory this config made; one given by the operator stays."""
    if _made_metrics_dir:
        shutil.rmtree(_made_metrics_dir, ignore_errors=True)


def child_exit(server: Any, worker: Any) -> None:
    """Let a dead worker's live gauges go, keeping its counters in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
