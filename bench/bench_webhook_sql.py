"""Postgres alone: the service's callback transaction against the floor's, with no Python.

pgbench (a C client: 16 connections, prepared statements) runs each transaction as the web
processes send it to Postgres: the floor's BEGIN, upsert, COMMIT (bench/floor_app.py), and the
service's BEGIN, event INSERT, SAVEPOINT and render+asset upsert in one pipeline, then COMMIT
(service/webhooks.py, whose statements are compiled here); and, third, the same statements
inside the PL/pgSQL function of floor_app.py's service-function mode, one call in autocommit.
Prints transactions/s of each and the ratios to the floor: what the write of SPEC §3 costs
the database itself, whatever Python costs.
bench_webhooks.py's ratio cannot go above this one by much, since the web process shares the
machine's CPUs with Postgres.

    .venv/bin/python bench/bench_webhook_sql.py [--seconds 8] [--rounds 3]

Needs `pgbench` (installed with Postgres); uses the database of bench_webhooks.py.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_webhooks import database_url, prepare_database
from floor_app import service_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.assets import _asset_upsert
from service.db import driver_sql
from service.webhooks import _event_insert

ID = "(:n)::text"  # pgbench's random number of each transaction, as text
PAYLOAD = json.dumps(  # ": " and no times: pgbench would read ":word" as one of its variables
    {
        "type": "serve",
        "action": "copy",
        "id": "a-1",
        "render": "r-1",
        "owner": "5ca6hu7s9k",
        "status": "ready",
        "url": "https://cdn.shotstack.io/au/stage/5ca6hu7s9k/r-1.mp4",
        "error": None,
        "completed": "2021-07-12",
    },
    separators=(", ", ": "),
)
VALUES = {
    # The event
    "dedupe_key": f"'serve copy a-' || {ID} || ' ready'",  # the service's key, less the colons
    "received_at": "now()",
    "event_type": "'serve'",
    "event_action": "'copy'",
    "object_id": f"'a-' || {ID}",
    "object_status": "'ready'",
    "render_id": f"'r-' || {ID}",
    "state": "'processed'",
    "http_status": "200",
    "payload": f"'{PAYLOAD}'",
    "raw": "NULL",
    "error": "NULL",
    "next_attempt_at": "NULL",
    "processed_at": "now()",
    # The render and the asset
    "render_status": "'unknown'",
    "now": "now()",
    "due": "now() + interval '60 seconds'",
    "asset_id": f"'a-' || {ID}",
    "a_render_id": f"'r-' || {ID}",
    "a_owner": "'5ca6hu7s9k'",
    "a_region": "'au'",
    "a_filename": "'r-1.mp4'",
    "a_url": "'https://cdn.shotstack.io/au/stage/5ca6hu7s9k/r-1.mp4'",
    "a_status": "'ready'",
    "a_status_source": "0",
    "a_kind": "'video'",
    "a_created": "now()",
    "a_updated": "now()",
    "a_last_synced_at": "NULL",
    "a_deleted_at": "NULL",
}
FLOOR_UPSERT = (
    f"INSERT INTO floor_callbacks (dedupe_key, payload) VALUES ('serve copy a-' || {ID},"
    f" '{PAYLOAD}') ON CONFLICT (dedupe_key) DO UPDATE SET payload = EXCLUDED.payload,"
    " received_at = now();"
)


def pgbench_sql(statement: Any) -> str:
    """A service statement with its parameters written in, one line, for a pgbench script."""
    sql = driver_sql(statement)
    sql = re.sub(r"%\((\w+)\)s", lambda m: f"({VALUES[m.group(1)]})", sql)
    # The same instant, without a ":00" that pgbench would take for a variable.
    sql = sql.replace("'1970-01-01 00:00:00+00'", "'epoch'")
    return _checked(" ".join(sql.split()) + ";")


def _checked(sql: str) -> str:
    unexpected = re.findall(r"(?<!:):(?!:)(?!n\))\w+", sql)
    assert not unexpected, f"pgbench would read these as variables: {unexpected}"
    return sql


def function_call() -> str:
    """floor_app's call of the PL/pgSQL function, its text arguments written in."""
    _, call = service_function()
    call = re.sub(r"%\([eu]_(\w+)\)s", lambda m: f"({VALUES[m.group(1)]})::text", call)
    return _checked(call + ";")


def scripts(directory: Path) -> dict[str, Path]:
    event = pgbench_sql(_event_insert("postgresql", skip_duplicate=False))
    upsert = pgbench_sql(_asset_upsert("postgresql", lookup=False, with_render=True))
    texts = {
        "floor": ["BEGIN;", _checked(FLOOR_UPSERT), "COMMIT;"],
        "service": [
            r"\startpipeline",
            "BEGIN;",
            event,
            "SAVEPOINT apply;",
            upsert,
            r"\endpipeline",
            "COMMIT;",
        ],
        "service-function": [function_call()],
    }
    paths = {}
    for name, lines in texts.items():
        path = directory / f"{name}.sql"
        path.write_text("\n".join([r"\set n random(1, 9000000000000000000)", *lines]) + "\n")
        paths[name] = path
    return paths


def tps(script: Path, *, seconds: float) -> float:
    url = database_url()
    done = subprocess.run(
        [
            *("pgbench", "-n", "-M", "prepared", "-c", "16", "-j", "2"),
            *("-T", str(int(seconds)), "-f", str(script), url),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"^tps = ([\d.]+)", done.stdout, re.MULTILINE)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"pgbench failed: {done.stderr[-2000:]}")
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("pgbench") is None:
        print("SKIPPED: pgbench is not installed (it comes with Postgres's packages)")
        return 0
    prepare_database()
    rates: dict[str, list[float]] = {"floor": [], "service": [], "service-function": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = scripts(Path(tmp))
        for _ in range(args.rounds):  # take turns, as bench_webhooks.py does
            for name, path in paths.items():
                rates[name].append(tps(path, seconds=args.seconds))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print("pgbench, 16 connections, prepared statements, one callback per transaction")
    for name, values in rates.items():
        rounds = ", ".join(f"{r:.0f}" for r in values)
        print(f"{name + ':':18s} {median[name]:8.0f} transactions/s  (rounds: {rounds})")
    print(f"ratio service/floor in Postgres alone: {median['service'] / median['floor']:.2f}")
    function = median["service-function"] / median["floor"]
    print(f"  the same statements in one PL/pgSQL function (autocommit): {function:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
