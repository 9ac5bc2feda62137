"""Find the Postgres of the suite: TEST_DATABASE_URL, the local server, or a throwaway cluster."""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time

import psycopg

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _binaries() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(found)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(candidates[-1]) if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def throwaway_cluster() -> str | None:
    """Start a cluster from installed binaries in a temp dir; return its URL, or None."""
    bindir = _binaries()
    if bindir is None:
        return None
    datadir = tempfile.mkdtemp(prefix="asset-tracker-pg-")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        shutil.chown(datadir, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    try:
        subprocess.run(
            [
                *prefix,
                f"{bindir}/initdb",
                "-D",
                datadir,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *prefix,
                f"{bindir}/pg_ctl",
                "-D",
                datadir,
                "-w",
                "-l",
                f"{datadir}/log",
                "-o",
                f"-p {port} -k {datadir} -h 127.0.0.1",
                "start",
            ],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError, KeyError, LookupError):
        shutil.rmtree(datadir, ignore_errors=True)
        return None

    def stop() -> None:
        subprocess.run(
            [*prefix, f"{bindir}/pg_ctl", "-D", datadir, "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(datadir, ignore_errors=True)

    atexit.register(stop)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    for _ in range(50):
        if reachable(url):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE DATABASE test")
            return url.rsplit("/", 1)[0] + "/test"
        time.sleep(0.1)
    return None


def find_postgres() -> str | None:
    url = os.environ.get("TEST_DATABASE_URL", DEFAULT_URL)
    if reachable(url):
        return url
    return throwaway_cluster()
